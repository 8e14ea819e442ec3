"""Stage 2: the camera-conditioned DiT, trained for the recipe's streaming rollout by teacher forcing.

Method (what one training sequence is). A clip of C chunks (chunk = the recipe's `chunk_frames` latent
frames) is laid out twice along the frame axis: the CLEAN copy (t = 0, what the commit pass writes to the
KV cache) and the NOISY copy (each chunk at one of the recipe's few-step noise levels, drawn per chunk).
One forward with a block-causal attention mask reproduces every streaming step of the clip at once:

    clean chunk c  attends  the clean frames the cache holds when c is committed (sink + ring) and itself
    noisy chunk c  attends  the clean frames the cache holds while c is denoised, and itself (noisy)

which is `CacheLayout.visible_frames` of the recipe's sink / window — so the trained model runs in the
streaming engine unchanged. The loss is the flow-matching error (v ≈ ε − x0, Wan's parameterisation) on
the noisy copy, only at the schedule's own timesteps (the few-step sampler is trained for, not distilled).
Both copies carry the I2V conditioning (image latent on frame 0) and the camera map of their frames.
Robustness: the clean context gets a little noise (the rollout's context is the model's own imperfect
output), and the non-sink chunks are placed at a random RoPE offset (long rollouts put the sink far back).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wm_jax.models.wan import WanModel
from wm_jax.models.wan_vae import i2v_condition
from wm_jax.streaming.kv_cache import CacheLayout
from wm_jax.streaming.schedules import StepSchedule
from wm_jax.train.config import WorldModelTraining
from wm_jax.train.data import ClipGeometry, camera_maps, random_text, render_clips

TEXT_TOKENS = 64  # stand-in prompt rows per sample (at most)


def teacher_forcing_mask(layout: CacheLayout, num_frames: int) -> np.ndarray:
    """[2F, 2F] bool frame mask of the doubled sequence [clean frames ; noisy frames] (True = attend)."""
    clean = layout.visible_frames(num_frames)
    chunk = np.arange(num_frames) // layout.chunk_frames
    own_chunk = chunk[:, None] == chunk[None, :]
    committed = clean & ~own_chunk
    top = np.concatenate([clean, np.zeros_like(clean)], axis=1)
    bottom = np.concatenate([committed, own_chunk], axis=1)
    return np.concatenate([top, bottom], axis=0)


def token_mask(frame_mask: np.ndarray, tokens_per_frame: int) -> np.ndarray:
    """Frame mask [F', F'] -> token mask [F'·S, F'·S] (tokens in (frame, row, column) order)."""
    return np.kron(frame_mask, np.ones((tokens_per_frame, tokens_per_frame), bool))


def encode_pool(vae, pool_poses: np.ndarray, world_seeds: np.ndarray, geometry: ClipGeometry,
                batch: int = 32) -> dict[str, jax.Array]:
    """Renders and encodes every clip of the pool once: {"x0": [P, L, h, w, z], "y": [P, L, h, w, 20]}
    on the device (float32). The camera poses stay with the caller."""

    @jax.jit
    def encode(seeds, poses):
        video = render_clips(seeds, poses, geometry)
        return vae.encode(video, jit=False), i2v_condition(vae, video[:, 0], video.shape[1], jit=False)

    parts = [encode(jnp.asarray(world_seeds[s:s + batch]), jnp.asarray(pool_poses[s:s + batch]))
             for s in range(0, len(pool_poses), batch)]
    return {"x0": jnp.concatenate([p[0] for p in parts]), "y": jnp.concatenate([p[1] for p in parts])}


def loss_fn(hparams: WorldModelTraining, geometry: ClipGeometry, layout: CacheLayout, schedule: StepSchedule,
            pool: dict[str, jax.Array]):
    """(model, key) -> (loss, metrics) on one batch drawn from the encoded pool.

    pool: {"x0": [P, L, h, w, z], "y": [P, L, h, w, 20], "rel_poses": [P, L, 4, 4]} on the device.
    """
    num_frames = pool["x0"].shape[1]
    cf = layout.chunk_frames
    mask = jnp.asarray(token_mask(teacher_forcing_mask(layout, num_frames), layout.tokens_per_frame))
    t_table = jnp.asarray(schedule.t, jnp.float32)
    if schedule.expert_passes != (schedule.num_steps,):
        raise ValueError("training takes a one-network schedule (its flow scales are the σ of each step)")
    sigma_table = jnp.asarray(schedule.flow_scale, jnp.float32)

    def loss(model: WanModel, key: jax.Array):
        keys = jax.random.split(key, 7)
        b = hparams.batch
        clip = jax.random.randint(keys[0], (b,), 0, pool["x0"].shape[0])
        x0, y, rel = pool["x0"][clip], pool["y"][clip], pool["rel_poses"][clip]
        camera = camera_maps(rel, geometry)
        # one few-step pass per chunk: its timestep and sigma on every frame of the chunk
        passes = jax.random.randint(keys[1], (b, num_frames // cf), 0, schedule.num_steps)
        passes = jnp.repeat(passes, cf, axis=1)
        t, sigma = t_table[passes], sigma_table[passes][..., None, None, None]
        noise = jax.random.normal(keys[2], x0.shape)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        context_std = jax.random.uniform(keys[3], (b, 1, 1, 1, 1), maxval=hparams.context_noise)
        clean = x0 + context_std * jax.random.normal(keys[4], x0.shape)
        # chunk 0 (the sink) at frames 0..cf-1, the others shifted by a whole number of chunks
        shift = jax.random.randint(keys[5], (), 0, hparams.max_position_offset + 1) * cf
        offsets = jnp.where(jnp.arange(num_frames) < cf, 0, shift)
        # frame f of the doubled sequence sits at position f - F·copy + offset
        offsets = jnp.concatenate([offsets, offsets - num_frames])
        inputs = jnp.concatenate([jnp.concatenate([clean, y], -1), jnp.concatenate([noisy, y], -1)], axis=1)
        timesteps = jnp.concatenate([jnp.zeros_like(t), t], axis=1)
        text = random_text(keys[6], b, TEXT_TOKENS, model.config.text_dim)
        cross = model.cross_kv(model.embed_text(text))
        flow, _ = model.forward_with_cross_kv(inputs, timesteps, cross, camera=jnp.concatenate([camera, camera], 1),
                                              frame_offset=offsets, attention_mask=mask)
        error = flow[:, num_frames:] - (noise - x0)
        per_pass = jnp.mean(error**2, axis=(2, 3, 4))  # [B, F]
        loss_value = jnp.mean(per_pass)
        last = passes == schedule.num_steps - 1
        return loss_value, {"last_pass_mse": jnp.sum(per_pass * last) / jnp.maximum(jnp.sum(last), 1)}

    return loss
