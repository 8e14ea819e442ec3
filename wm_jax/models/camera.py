"""LingBot-World camera conditioning: raw trajectory -> per-latent-pixel camera map (pure functions).

Inputs are upstream's files: `poses` [N, 4, 4] camera-to-world in OpenCV axes (x right, y down,
z forward) and `intrinsics` [N, 4] = (fx, fy, cx, cy) in pixels of a 480x832 frame. Output is the
channels-last map `[F, H_lat, W_lat, 384]` that `WanModel(camera=...)` takes (batch axis added by the
caller): channel c·64 + dy·8 + dx, c in (o_x, o_y, o_z, d_x, d_y, d_z), (dy, dx) the pixel inside the
8x8 block. The model itself patchifies 2x2 and embeds.

Everything is numpy float64 on the host (a few KB of poses); the result is float32.
"""

from __future__ import annotations

import numpy as np

from wm_jax.io.trajectory import validate_trajectory

INTRINSICS_REFERENCE_HW = (480, 832)  # upstream intrinsics are defined for this frame size
FOLD = 8  # pixels per latent pixel along each axis


# ---------------------------------------------------------------------------------------------------
# Rotations.
# ---------------------------------------------------------------------------------------------------


def _skew(v: np.ndarray) -> np.ndarray:
    x, y, z = v
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def _log_so3(r: np.ndarray) -> np.ndarray:
    """Rotation matrix -> rotation vector (axis·angle, angle in [0, π])."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    if angle < 1e-8:
        return np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]]) / 2.0
    if np.pi - angle < 1e-6:
        # Near π: axis from the symmetric part, R ≈ 2aaᵀ − I.
        a = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        k = int(np.argmax(a))
        a[(k + 1) % 3] = np.copysign(a[(k + 1) % 3], r[k, (k + 1) % 3] + r[(k + 1) % 3, k])
        a[(k + 2) % 3] = np.copysign(a[(k + 2) % 3], r[k, (k + 2) % 3] + r[(k + 2) % 3, k])
        return a / np.linalg.norm(a) * angle
    w = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    return w * (angle / (2.0 * np.sin(angle)))


def _exp_so3(w: np.ndarray) -> np.ndarray:
    angle = np.linalg.norm(w)
    if angle < 1e-12:
        return np.eye(3) + _skew(w)
    k = _skew(w / angle)
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


def _orthonormalize(r: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(r)
    if np.linalg.det(u @ vt) < 0:
        u[:, -1] *= -1
    return u @ vt


def interpolate_poses(poses: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Samples a trajectory at fractional frame positions.

    Translation is linear; rotation follows the shortest geodesic (slerp) between the two neighbouring
    frames. Args: poses [N, 4, 4]; positions [n] in [0, N−1]. Returns [n, 4, 4] float64.
    """
    poses = np.asarray(poses, np.float64)
    n_src = poses.shape[0]
    out = np.zeros((len(positions), 4, 4))
    out[:, 3, 3] = 1.0
    for row, pos in enumerate(np.asarray(positions, np.float64)):
        i = int(np.clip(np.floor(pos), 0, max(n_src - 2, 0)))
        j = min(i + 1, n_src - 1)
        frac = pos - i
        r0 = _orthonormalize(poses[i, :3, :3])
        r1 = _orthonormalize(poses[j, :3, :3])
        out[row, :3, :3] = r0 @ _exp_so3(frac * _log_so3(r0.T @ r1))
        out[row, :3, 3] = (1.0 - frac) * poses[i, :3, 3] + frac * poses[j, :3, 3]
    return out


# ---------------------------------------------------------------------------------------------------
# Relative poses and rays.
# ---------------------------------------------------------------------------------------------------


def _inverse_rigid(p: np.ndarray) -> np.ndarray:
    inv = np.eye(4)
    inv[:3, :3] = p[:3, :3].T
    inv[:3, 3] = -p[:3, :3].T @ p[:3, 3]
    return inv


def framewise_relative_poses(c2w: np.ndarray, translation_scale: float | None = None) -> np.ndarray:
    """c2w [n, 4, 4] -> each frame's pose in the previous frame's camera (frame 0: identity).

    Translations are then divided by `translation_scale`; None uses upstream's clip-wide rule, the
    largest relative translation norm of these n frames (no division when that is 0).
    """
    anchored = np.stack([_inverse_rigid(c2w[0]) @ p for p in c2w])
    anchored[0] = np.eye(4)
    rel = anchored.copy()
    for i in range(1, len(c2w)):
        rel[i] = _inverse_rigid(anchored[i - 1]) @ anchored[i]
    if translation_scale is None:
        translation_scale = float(np.max(np.linalg.norm(rel[:, :3, 3], axis=-1)))
    if translation_scale > 0:
        rel[:, :3, 3] /= translation_scale
    return rel


def scale_intrinsics(k: np.ndarray, height: int, width: int) -> np.ndarray:
    """(fx, fy, cx, cy) at 480x832 -> at height x width (plain rescale, no crop)."""
    ref_h, ref_w = INTRINSICS_REFERENCE_HW
    fx, fy, cx, cy = np.asarray(k, np.float64)
    return np.array([fx * width / ref_w, fy * height / ref_h, cx * width / ref_w, cy * height / ref_h])


def ray_maps(rel_poses, k, height: int, width: int, xp=np):
    """Per-pixel [origin ‖ direction] rays [n, height, width, 6] through pixel centres (u+½, v+½).

    xp: the array module, numpy (float64, the engine) or jax.numpy (float32, on the device for training).
    """
    fx, fy, cx, cy = k
    dtype = xp.float64 if xp is np else xp.float32
    u = xp.arange(width, dtype=dtype) + 0.5
    v = xp.arange(height, dtype=dtype) + 0.5
    uu, vv = xp.meshgrid(u, v, indexing="xy")
    dirs = xp.stack([(uu - cx) / fx, (vv - cy) / fy, xp.ones_like(uu)], axis=-1)
    dirs = dirs / xp.linalg.norm(dirs, axis=-1, keepdims=True)
    rays_d = xp.einsum("nij,hwj->nhwi", rel_poses[:, :3, :3], dirs)
    rays_o = xp.broadcast_to(rel_poses[:, None, None, :3, 3], rays_d.shape)
    return xp.concatenate([rays_o, rays_d], axis=-1)


def fold_pixels(rays, fold: int = FOLD):
    """[n, H, W, C] -> [n, H/fold, W/fold, C·fold²], channel c·fold² + dy·fold + dx (numpy or jax arrays)."""
    n, h, w, c = rays.shape
    x = rays.reshape(n, h // fold, fold, w // fold, fold, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, h // fold, w // fold, c * fold * fold)


# ---------------------------------------------------------------------------------------------------
# Whole-clip (upstream) pipeline.
# ---------------------------------------------------------------------------------------------------


def usable_pixel_frames(num_poses: int, requested_frames: int) -> int:
    """Pixel frames upstream keeps: min(requested, 4⌊(N−1)/4⌋+1) (both of the form 4k+1)."""
    return min(requested_frames, 4 * ((num_poses - 1) // 4) + 1)


def clip_camera_map(poses: np.ndarray, intrinsics: np.ndarray, pixel_height: int, pixel_width: int,
                    num_pixel_frames: int, num_latent_frames: int | None = None,
                    translation_scale: float | None = None) -> np.ndarray:
    """Upstream LingBot camera pipeline for a whole clip.

    Args:
      poses, intrinsics: the trajectory files ([N, 4, 4], [N, 4]); only intrinsics row 0 is used.
      pixel_height, pixel_width: video size (multiples of 8).
      num_pixel_frames: F pixel frames used (4k+1; see `usable_pixel_frames`); poses[:F] are kept.
      num_latent_frames: latent frames n to sample at linspace(0, F−1, n); default (F−1)/4+1, i.e.
        exactly every 4th pose. LingBot-Fast passes its trimmed count (off-grid samples).
      translation_scale: None for upstream's clip-wide max norm; a fixed world scale for streaming.
    Returns:
      [n, pixel_height/8, pixel_width/8, 384] float32 camera map (channels-last).
    """
    validate_trajectory(poses, intrinsics)
    if pixel_height % FOLD or pixel_width % FOLD:
        raise ValueError(f"pixel size {pixel_height}x{pixel_width} must be a multiple of {FOLD}")
    if num_pixel_frames > len(poses):
        raise ValueError(f"poses: {len(poses)} poses, fewer than the {num_pixel_frames} frames requested")
    f = num_pixel_frames
    n = num_latent_frames if num_latent_frames is not None else (f - 1) // 4 + 1
    k = scale_intrinsics(np.asarray(intrinsics)[0], pixel_height, pixel_width)
    latent_poses = interpolate_poses(np.asarray(poses)[:f], np.linspace(0, f - 1, n))
    rel = framewise_relative_poses(latent_poses, translation_scale)
    return fold_pixels(ray_maps(rel, k, pixel_height, pixel_width)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Streaming (chunk by chunk, no knowledge of the rest of the clip).
# ---------------------------------------------------------------------------------------------------

# FlashDreams' interactive world scale (max framewise translation of LingBot's example trajectory).
DEFAULT_WORLD_SCALE = 1.2712


def latent_pose_frames(chunk_index: int, chunk_frames: int = 3, temporal_stride: int = 4) -> list[int]:
    """Absolute pixel-frame indices whose poses the latent frames of a chunk take.

    A latent frame stands for the last pixel frame of its group of 4 (the first latent for frame 0
    alone), so latent g takes pixel frame 4g: chunk 0 -> [0, 4, 8], chunk 1 -> [12, 16, 20], ...
    """
    first = chunk_index * chunk_frames
    return [temporal_stride * g for g in range(first, first + chunk_frames)]


def chunk_relative_poses(latent_poses: np.ndarray, previous_pose: np.ndarray | None,
                         world_scale: float) -> np.ndarray:
    """Framewise relative poses of one chunk: each latent pose in the previous latent's camera frame.

    Args:
      latent_poses: [n, 4, 4] c2w poses of the chunk's latent frames.
      previous_pose: the previous chunk's last latent pose, or None for the first chunk (whose first
        frame is then the identity, as upstream's clip-anchored computation gives).
      world_scale: translations are divided by this fixed scale (upstream: the clip-wide max norm).
    Returns:
      [n, 4, 4] float64.
    """
    poses = np.asarray(latent_poses, np.float64)
    chain = poses if previous_pose is None else np.concatenate([np.asarray(previous_pose, np.float64)[None], poses])
    rel = np.stack([_inverse_rigid(chain[i - 1]) @ chain[i] for i in range(1, len(chain))])
    if previous_pose is None:
        rel = np.concatenate([np.eye(4)[None], rel])
    rel[:, :3, 3] /= world_scale
    return rel


class StreamingCamera:
    """Per-chunk camera maps for an interactive or streamed trajectory.

    Keeps only the previous chunk's last latent pose; the translation scale is fixed up front
    (`world_scale`) since the clip-wide maximum upstream divides by is unknowable while streaming.
    With `world_scale` = the clip's max framewise translation (see `clip_world_scale`), the chunks
    concatenate to upstream's whole-clip `clip_camera_map` on the stride-4 grid.
    """

    def __init__(self, intrinsics_row: np.ndarray, pixel_height: int, pixel_width: int,
                 world_scale: float = DEFAULT_WORLD_SCALE):
        if pixel_height % FOLD or pixel_width % FOLD:
            raise ValueError(f"pixel size {pixel_height}x{pixel_width} must be a multiple of {FOLD}")
        if not world_scale > 0:
            raise ValueError(f"world_scale must be positive, got {world_scale}")
        self.k = scale_intrinsics(intrinsics_row, pixel_height, pixel_width)
        self.height, self.width = pixel_height, pixel_width
        self.world_scale = float(world_scale)
        self.previous_pose: np.ndarray | None = None

    def next_chunk(self, latent_poses: np.ndarray) -> np.ndarray:
        """[n, 4, 4] c2w poses of the next chunk's latent frames -> [n, H/8, W/8, 384] float32."""
        rel = chunk_relative_poses(latent_poses, self.previous_pose, self.world_scale)
        self.previous_pose = np.asarray(latent_poses, np.float64)[-1]
        return fold_pixels(ray_maps(rel, self.k, self.height, self.width)).astype(np.float32)


def clip_world_scale(poses: np.ndarray, num_latent_frames: int) -> float:
    """Upstream's clip-wide translation scale for the stride-4 latent poses (offline parity mode)."""
    latent = np.asarray(poses, np.float64)[: 4 * (num_latent_frames - 1) + 1 : 4]
    rel = framewise_relative_poses(latent, translation_scale=1.0)
    scale = float(np.max(np.linalg.norm(rel[:, :3, 3], axis=-1)))
    return scale if scale > 0 else 1.0
