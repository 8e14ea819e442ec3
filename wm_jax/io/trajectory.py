"""Camera trajectory files (LingBot-World `poses.npy` / `intrinsics.npy`): loading and validation.

`poses.npy` holds [N, 4, 4] camera-to-world matrices in OpenCV axes and `intrinsics.npy` [N, 4] rows
(fx, fy, cx, cy) in pixels of a 480x832 frame (SPEC §4). Every error raised by `load_trajectory` names
the file it is about, so a user who passes the wrong file sees which one is wrong. Pure numpy: the camera
pipeline (wm_jax.models.camera) validates in-memory trajectories with the same `validate_trajectory`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wm_jax.errors import OptionError

POSE_MODES = ("strict", "hold")


def validate_trajectory(poses: np.ndarray, intrinsics: np.ndarray, name: str = "poses") -> None:
    """Raises ValueError naming the frame when poses are not [N,4,4] rigid transforms or contain NaN."""
    poses = np.asarray(poses)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"{name}: expected [N, 4, 4] camera-to-world matrices, got shape {poses.shape}")
    intrinsics = np.asarray(intrinsics)
    if intrinsics.ndim != 2 or intrinsics.shape[1] != 4:
        raise ValueError(f"intrinsics: expected [N, 4] rows (fx, fy, cx, cy), got shape {intrinsics.shape}")
    for i, p in enumerate(poses):
        if not np.all(np.isfinite(p)):
            raise ValueError(f"{name}: frame {i} contains NaN or inf")
        r = p[:3, :3].astype(np.float64)
        if np.abs(r @ r.T - np.eye(3)).max() > 1e-3 or np.linalg.det(r) < 0:
            raise ValueError(f"{name}: frame {i} is not a rigid transform (rotation block not orthonormal)")
        if np.abs(p[3] - np.array([0, 0, 0, 1])).max() > 1e-6:
            raise ValueError(f"{name}: frame {i} bottom row is {p[3].tolist()}, expected [0, 0, 0, 1]")
    if not np.all(np.isfinite(intrinsics[0])) or intrinsics[0, 0] <= 0 or intrinsics[0, 1] <= 0:
        raise ValueError(f"intrinsics: row 0 must hold positive finite fx, fy; got {intrinsics[0].tolist()}")


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} file not found")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: expected a .npy file holding {what}, found a directory")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as err:  # not an .npy (or a pickled/object array, or truncated)
        raise ValueError(f"{path}: cannot read {what} as a .npy array ({type(err).__name__}: {err})") from None
    if isinstance(array, np.lib.npyio.NpzFile):  # np.load also opens .npz archives
        array.close()
        raise ValueError(f"{path}: is an .npz archive; expected a single .npy array of {what}")
    if array.dtype.kind == "f":
        return array
    if array.dtype.kind in "iu":
        return array.astype(np.float64)
    raise ValueError(f"{path}: {what} must be a numeric array, found dtype {array.dtype}")


def load_trajectory(poses_path: str | os.PathLike, intrinsics_path: str | os.PathLike
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Loads and validates a trajectory.

    Args:
      poses_path: .npy file of [N, 4, 4] camera-to-world matrices (OpenCV axes, rigid).
      intrinsics_path: .npy file of [M, 4] rows (fx, fy, cx, cy) for a 480x832 frame; a single [4]
        row is accepted and returned as [1, 4]. Only row 0 is used by the camera pipeline, so M need
        not equal N.
    Returns:
      (poses, intrinsics) as floating numpy arrays (float dtype of the file kept; integers -> float64).
    Raises:
      FileNotFoundError naming a missing file; ValueError naming the file for unreadable files, wrong
      shapes (found and expected), NaN/inf, non-rigid poses or non-positive focal lengths.
    """
    poses_path, intrinsics_path = Path(poses_path), Path(intrinsics_path)
    poses = _load_npy(poses_path, "camera poses")
    intrinsics = _load_npy(intrinsics_path, "camera intrinsics")

    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"{poses_path}: poses have shape {poses.shape}, expected (N, 4, 4) "
                         f"camera-to-world matrices")
    if poses.shape[0] == 0:
        raise ValueError(f"{poses_path}: holds no poses (shape {poses.shape}), expected (N, 4, 4) with N >= 1")
    if intrinsics.shape == (4,):
        intrinsics = intrinsics[None]
    if intrinsics.ndim != 2 or intrinsics.shape[1] != 4 or intrinsics.shape[0] == 0:
        raise ValueError(f"{intrinsics_path}: intrinsics have shape {intrinsics.shape}, expected (N, 4) "
                         f"rows of (fx, fy, cx, cy)")
    if not np.all(np.isfinite(intrinsics[0])):
        # validate_trajectory only looks at fx, fy; cx, cy must be finite too.
        raise ValueError(f"{intrinsics_path}: row 0 contains NaN or inf: {intrinsics[0].tolist()}")

    try:
        validate_trajectory(poses, intrinsics, name=str(poses_path))
    except ValueError as err:
        message = str(err)
        if message.startswith("intrinsics:"):
            message = f"{intrinsics_path}:" + message[len("intrinsics:"):]
        elif not message.startswith(str(poses_path)):
            message = f"{poses_path}: {message}"
        raise ValueError(message) from None
    return poses, intrinsics


def poses_for_frames(poses: np.ndarray, num_pixel_frames: int, mode: str = "strict") -> np.ndarray:
    """The poses of the first `num_pixel_frames` pixel frames.

    Args:
      poses: [N, 4, 4] trajectory.
      num_pixel_frames: pixel frames the run will generate (one pose each).
      mode: "strict" raises when the trajectory is too short; "hold" repeats the last pose for the
        missing frames (the camera stands still once the trajectory ends).
    Returns:
      [num_pixel_frames, 4, 4] array (a copy when padded, a slice of `poses` otherwise).
    """
    if mode not in POSE_MODES:
        raise OptionError("pose_mode", f"unknown {{pose_mode}} {mode!r}; expected one of {', '.join(POSE_MODES)}")
    poses = np.asarray(poses)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4) or poses.shape[0] == 0:
        raise ValueError(f"poses: expected (N, 4, 4) with N >= 1, got shape {poses.shape}")
    if num_pixel_frames < 1:
        raise ValueError(f"num_pixel_frames must be >= 1, got {num_pixel_frames}")
    given = poses.shape[0]
    if given >= num_pixel_frames:
        return poses[:num_pixel_frames]
    if mode == "strict":
        raise OptionError(
            "pose_mode", f"the trajectory has {given} poses but {num_pixel_frames} pixel frames need one pose "
            "each; pass a longer trajectory, generate fewer frames, or use {pose_mode} hold to keep the camera "
            "still on the last pose")
    pad = np.repeat(poses[-1:], num_pixel_frames - given, axis=0)
    return np.concatenate([poses, pad], axis=0)
