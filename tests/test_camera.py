"""LingBot camera preprocessing: stages vs upstream intermediates, off-grid slerp vs SciPy, bad input."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation, Slerp

from wm_jax.models import camera as cam
from wm_jax.parity import relative_l2


def _random_trajectory(n, seed):
    rng = np.random.default_rng(seed)
    rots = Rotation.from_rotvec(np.cumsum(rng.normal(0, 0.08, (n, 3)), axis=0)).as_matrix()
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, :3] = rots
    poses[:, :3, 3] = np.cumsum(rng.normal(0, 0.05, (n, 3)), axis=0)
    intrinsics = np.tile([502.91, 503.11, 415.78, 239.78], (n, 1))
    return poses.astype(np.float32), intrinsics.astype(np.float32)


def test_stages_match_upstream_intermediates(golden_dir):
    case = golden_dir / "lingbot_cam_forward"
    inputs, debug = np.load(case / "inputs.npz"), np.load(case / "debug.npz")
    poses, intrinsics = inputs["poses"], inputs["intrinsics"]
    n_lat, height, width = debug["plucker_pixels"].shape[:3]
    f = cam.usable_pixel_frames(len(poses), len(poses))
    k = cam.scale_intrinsics(intrinsics[0], height, width)
    np.testing.assert_allclose(k, debug["Ks_transformed"][0], rtol=1e-6)
    interp = cam.interpolate_poses(poses[:f], np.linspace(0, f - 1, n_lat))
    np.testing.assert_allclose(interp, debug["c2ws_interp"], atol=2e-6)
    rel = cam.framewise_relative_poses(interp)
    np.testing.assert_allclose(rel, debug["c2ws_relative"], atol=2e-6)
    rays = cam.ray_maps(rel, k, height, width)
    assert relative_l2(rays, debug["plucker_pixels"]) < 1e-6


def test_off_grid_interpolation_matches_scipy_slerp():
    poses, _ = _random_trajectory(41, seed=0)
    positions = np.linspace(0, 40, 9)[:-1] + 1.37  # fractional positions
    ours = cam.interpolate_poses(poses, positions)
    ref = Slerp(np.arange(41), Rotation.from_matrix(poses[:, :3, :3].astype(np.float64)))(positions)
    np.testing.assert_allclose(ours[:, :3, :3], ref.as_matrix(), atol=1e-6)
    lin = np.stack([np.interp(positions, np.arange(41), poses[:, i, 3]) for i in range(3)], axis=-1)
    np.testing.assert_allclose(ours[:, :3, 3], lin, atol=1e-6)


def test_fold_layout_is_channel_major():
    rays = np.arange(2 * 16 * 16 * 6, dtype=np.float64).reshape(2, 16, 16, 6)
    folded = cam.fold_pixels(rays)
    assert folded.shape == (2, 2, 2, 384)
    c, dy, dx = 4, 3, 5  # channel c·64 + dy·8 + dx of latent pixel (1, 0) is pixel (8+dy, 0+dx), channel c
    assert folded[1, 1, 0, c * 64 + dy * 8 + dx] == rays[1, 8 + dy, dx, c]


def test_clip_camera_map_shape_and_identity_first_frame():
    poses, intrinsics = _random_trajectory(17, seed=1)
    m = cam.clip_camera_map(poses, intrinsics, 32, 48, 17)
    assert m.shape == (5, 4, 6, 384) and m.dtype == np.float32
    assert np.all(m[0, ..., :3 * 64] == 0)  # frame 0: identity pose, zero origin


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p[:, :3], "expected \\[N, 4, 4\\]"),
    (lambda p: np.where(np.arange(len(p))[:, None, None] == 3, np.nan, p), "frame 3 contains NaN"),
    (lambda p: p * np.array([1, 1, 1, 1])[None, :, None] * np.where(np.arange(len(p)) == 2, 2.0, 1.0)[:, None, None],
     "frame 2 is not a rigid transform"),
])
def test_bad_trajectories_name_the_frame(mutate, message):
    poses, intrinsics = _random_trajectory(9, seed=2)
    with pytest.raises(ValueError, match=message):
        cam.clip_camera_map(mutate(poses.copy()), intrinsics, 32, 48, 9)


def test_too_few_poses():
    poses, intrinsics = _random_trajectory(9, seed=3)
    with pytest.raises(ValueError, match="fewer than the 13 frames"):
        cam.clip_camera_map(poses, intrinsics, 32, 48, 13)


def test_streaming_chunks_equal_clip_map_with_clip_world_scale():
    """Per-chunk camera (previous chunk's last pose as anchor, fixed scale) == upstream's clip computation."""
    poses, intrinsics = _random_trajectory(4 * 8 + 1, seed=3)
    clip = cam.clip_camera_map(poses, intrinsics, 32, 48, 33, num_latent_frames=9)
    stream = cam.StreamingCamera(intrinsics[0], 32, 48, cam.clip_world_scale(poses, 9))
    chunks = np.concatenate([stream.next_chunk(poses[cam.latent_pose_frames(c)]) for c in range(3)])
    assert cam.latent_pose_frames(1) == [12, 16, 20]
    assert relative_l2(chunks, clip) < 1e-4
