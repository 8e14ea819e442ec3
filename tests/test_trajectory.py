"""Trajectory files: every error names the file; pose padding for short trajectories."""

import numpy as np
import pytest

from wm_jax.errors import OptionError
from wm_jax.io.trajectory import load_trajectory, poses_for_frames


def walk(n=9) -> np.ndarray:
    poses = np.tile(np.eye(4, dtype=np.float32), (n, 1, 1))
    poses[:, 2, 3] = 0.1 * np.arange(n)
    return poses


def write(tmp_path, poses=None, intrinsics=None, poses_name="cam_poses.npy", intr_name="cam_intr.npy"):
    poses = walk() if poses is None else poses
    intrinsics = np.tile(np.float32([503, 503, 416, 240]), (len(poses), 1)) if intrinsics is None else intrinsics
    p, k = tmp_path / poses_name, tmp_path / intr_name
    np.save(p, poses)
    np.save(k, intrinsics)
    return p, k


def test_loads_valid_files(tmp_path):
    p, k = write(tmp_path)
    poses, intrinsics = load_trajectory(p, k)
    assert poses.shape == (9, 4, 4) and poses.dtype == np.float32
    assert intrinsics.shape == (9, 4)
    np.testing.assert_array_equal(poses, walk())
    # Integer intrinsics and a single [4] row are accepted.
    p, k = write(tmp_path, intrinsics=np.array([503, 503, 416, 240]))
    _, intrinsics = load_trajectory(p, k)
    assert intrinsics.shape == (1, 4) and intrinsics.dtype.kind == "f"


def test_nan_pose_names_file_and_frame(tmp_path):
    poses = walk()
    poses[3, 0, 3] = np.nan
    p, k = write(tmp_path, poses=poses, poses_name="poses.npy")
    with pytest.raises(ValueError, match=r"poses\.npy: frame 3 contains NaN or inf"):
        load_trajectory(p, k)


def test_non_rigid_and_bottom_row(tmp_path):
    poses = walk()
    poses[5, :3, :3] *= 2.0
    p, k = write(tmp_path, poses=poses)
    with pytest.raises(ValueError, match=r"cam_poses\.npy: frame 5 is not a rigid"):
        load_trajectory(p, k)
    poses = walk()
    poses[2, 3] = [0, 0, 1, 1]
    p, k = write(tmp_path, poses=poses)
    with pytest.raises(ValueError, match=r"cam_poses\.npy: frame 2 bottom row"):
        load_trajectory(p, k)


def test_bad_intrinsics_name_intrinsics_file(tmp_path):
    p, k = write(tmp_path, intrinsics=np.tile(np.float32([0, 503, 416, 240]), (9, 1)))
    with pytest.raises(ValueError, match=r"cam_intr\.npy: row 0 must hold positive") as info:
        load_trajectory(p, k)
    assert "cam_poses.npy" not in str(info.value)
    p, k = write(tmp_path, intrinsics=np.tile(np.float32([503, 503, np.inf, 240]), (9, 1)))
    with pytest.raises(ValueError, match=r"cam_intr\.npy: row 0 contains NaN or inf"):
        load_trajectory(p, k)


def test_missing_files(tmp_path):
    p, k = write(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nowhere_poses\.npy"):
        load_trajectory(tmp_path / "nowhere_poses.npy", k)
    with pytest.raises(FileNotFoundError, match=r"nowhere_intr\.npy"):
        load_trajectory(p, tmp_path / "nowhere_intr.npy")


def test_wrong_shapes_name_file_found_and_expected(tmp_path):
    p, k = write(tmp_path, poses=np.zeros((9, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"cam_poses\.npy: .*\(9, 3, 4\).*expected \(N, 4, 4\)"):
        load_trajectory(p, k)
    p, k = write(tmp_path, intrinsics=np.zeros((9, 3), np.float32))
    with pytest.raises(ValueError, match=r"cam_intr\.npy: .*\(9, 3\).*expected \(N, 4\)"):
        load_trajectory(p, k)
    p, k = write(tmp_path, poses=np.zeros((0, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"cam_poses\.npy: holds no poses"):
        load_trajectory(p, k)


def test_unreadable_files(tmp_path):
    p, k = write(tmp_path)
    junk = tmp_path / "junk_poses.npy"
    junk.write_text("not an array")
    with pytest.raises(ValueError, match=r"junk_poses\.npy: cannot read"):
        load_trajectory(junk, k)
    obj = tmp_path / "obj_intr.npy"
    np.save(obj, np.array([{"fx": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"obj_intr\.npy"):
        load_trajectory(p, obj)
    text = tmp_path / "text_poses.npy"
    np.save(text, np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"text_poses\.npy: .*numeric"):
        load_trajectory(text, k)


def test_poses_for_frames():
    poses = walk(9)
    np.testing.assert_array_equal(poses_for_frames(poses, 5), poses[:5])
    np.testing.assert_array_equal(poses_for_frames(poses, 9, "strict"), poses)
    with pytest.raises(OptionError) as info:
        poses_for_frames(poses, 21)
    message = info.value.render(lambda name: f"--{name}")
    assert info.value.option == "pose_mode"
    assert "9 poses" in message and "21" in message and "--pose_mode hold" in message
    held = poses_for_frames(poses, 21, mode="hold")
    assert held.shape == (21, 4, 4)
    np.testing.assert_array_equal(held[:9], poses)
    np.testing.assert_array_equal(held[9:], np.repeat(poses[-1:], 12, axis=0))
    with pytest.raises(OptionError, match="unknown pose_mode 'loop'"):
        poses_for_frames(poses, 21, mode="loop")
