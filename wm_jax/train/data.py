"""Training clips from the procedural world: trajectories on the host, pixels and latents on the device.

A clip is a player trajectory (`wm_jax.worlds.player_trajectory`, the live controls' motion) through a
world drawn from its own seed. The camera conditioning is built exactly as the streaming engine builds
it: latent frame g takes the pose of pixel frame 4g, each latent pose is expressed in the previous
latent's camera (`wm_jax.models.camera.chunk_relative_poses`, chained over chunks like
`StreamingCamera`), translations divided by the recipe's world scale; the ray maps are then formed on
the device from those relative poses (`camera.ray_maps` with jax.numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models import camera as cam
from wm_jax.models.wan_vae import VAE_STRIDE, num_pixel_frames
from wm_jax.worlds import player_trajectory, render


@dataclass(frozen=True)
class ClipGeometry:
    """Sizes shared by every stage: pixels, latent grid, chunk, camera scale and intrinsics.

    intrinsics: (fx, fy, cx, cy) for a 480x832 frame; `pixel_intrinsics` is it scaled to the clip size.
    """

    pixel_height: int
    pixel_width: int
    chunk_frames: int
    world_scale: float
    intrinsics: tuple[float, float, float, float]
    fps: int
    supersample: int

    @property
    def pixel_intrinsics(self) -> np.ndarray:
        return cam.scale_intrinsics(np.asarray(self.intrinsics), self.pixel_height, self.pixel_width)

    def pixel_frames(self, num_latents: int) -> int:
        return num_pixel_frames(num_latents, VAE_STRIDE[0])


def trajectory_pool(seed: int, count: int, num_frames: int, fps: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` clips: (world seeds [count] int32, player trajectories [count, num_frames, 4, 4] float32 c2w).

    Each trajectory walks through the world of its own seed (the walker keeps clear of that world's
    objects), so a clip's frames must be rendered with that seed."""
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=count).astype(np.int32)
    return seeds, np.stack([player_trajectory(int(s), num_frames, fps) for s in seeds]).astype(np.float32)


def latent_relative_poses(poses: np.ndarray, num_latents: int, chunk_frames: int, world_scale: float) -> np.ndarray:
    """[F_px, 4, 4] c2w -> [num_latents, 4, 4] float32: the relative poses `StreamingCamera` forms chunk by
    chunk (first latent: identity; then each in the previous latent's camera; translation / world_scale)."""
    chunks, previous = [], None
    for index in range(num_latents // chunk_frames):
        latent = poses[cam.latent_pose_frames(index, chunk_frames)]
        chunks.append(cam.chunk_relative_poses(latent, previous, world_scale))
        previous = latent[-1]
    return np.concatenate(chunks).astype(np.float32)


def camera_maps(rel_poses: jax.Array, geometry: ClipGeometry) -> jax.Array:
    """[..., L, 4, 4] relative poses -> [..., L, H/8, W/8, 384] camera maps (the engine's, in float32)."""
    lead = rel_poses.shape[:-2]
    flat = rel_poses.reshape(-1, 4, 4)
    k = jnp.asarray(geometry.pixel_intrinsics, jnp.float32)
    rays = cam.ray_maps(flat, k, geometry.pixel_height, geometry.pixel_width, xp=jnp)
    maps = cam.fold_pixels(rays)
    return maps.reshape(*lead, *maps.shape[1:])


def render_clips(world_seeds: jax.Array, poses: jax.Array, geometry: ClipGeometry) -> jax.Array:
    """[B] world seeds, [B, F, 4, 4] poses -> video [B, F, H, W, 3] in [-1, 1] (the VAE's range)."""
    k = jnp.asarray(geometry.pixel_intrinsics, jnp.float32)
    draw = lambda seed, clip: render(seed, clip, k, geometry.pixel_height, geometry.pixel_width,
                                     supersample=geometry.supersample)
    return jax.vmap(draw)(world_seeds, poses) * 2.0 - 1.0


def random_text(key: jax.Array, batch: int, max_tokens: int, width: int) -> jax.Array:
    """Stand-in prompt features like `hashed_text_features`: [B, max_tokens, width] standard normal rows,
    a random count of them real and the rest zero. The tiny world has no text encoder, so the model is
    trained to ignore the prompt (any prompt keeps the same world)."""
    k_len, k_val = jax.random.split(key)
    lengths = jax.random.randint(k_len, (batch, 1, 1), 1, max_tokens + 1)
    rows = jnp.arange(max_tokens)[None, :, None] < lengths
    return jax.random.normal(k_val, (batch, max_tokens, width)) * rows
