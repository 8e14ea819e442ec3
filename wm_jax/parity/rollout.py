"""Shared replay of the causal rollout golden cases through `StreamingStep`."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters import wan_dit
from wm_jax.io.tensor_sources import open_source
from wm_jax.models.wan import WanModel
from wm_jax.models.wan_vae import VAE_STRIDE
from wm_jax.parallel.mesh import make_mesh, to_host
from wm_jax.parity.common import model_overrides
from wm_jax.streaming.kv_cache import upstream_cache_frames
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.schedules import BlockSchedules, StepSchedule
from wm_jax.streaming.step import ChunkInputs, StreamingStep


def replay(case_dir: Path, config: dict, schedule: StepSchedule, context: np.ndarray, noise_init: np.ndarray,
           renoise: list[np.ndarray], chunk_frames: int, y: np.ndarray | None = None,
           camera: np.ndarray | None = None, num_devices: int | None = None) -> dict[str, list[np.ndarray]]:
    """Runs every entry of config['runs'] (cache settings) with the recorded noise, on `num_devices`
    devices (default: all present; Ulysses gives the same numbers on any count).

    Args (channels-last, batch first): noise_init [B, F, H, W, C]; renoise: one [B, chunk, H, W, C] per
    (chunk, pass ≥ 1), chunk-major; y [B, F, H, W, 20] or None; camera [B, F, H, W, C_cam] or None.
    Returns: run's outputs prefix -> list of x0 chunks [B, chunk, H, W, C].
    """
    model = wan_dit.load_source(open_source(case_dir / "weights.safetensors"), compute_dtype=jnp.float32,
                                attention_impl="xla", **model_overrides(config))
    b, frames, h, w, _ = noise_init.shape
    n_chunks = frames // chunk_frames
    k = schedule.num_steps
    if len(renoise) != n_chunks * (k - 1):
        raise ValueError(f"{case_dir}: {len(renoise)} re-noise draws, expected {n_chunks} chunks x {k - 1}")
    mesh = make_mesh(num_devices)
    results = {}
    for run in config["runs"].values():
        sink, ring = upstream_cache_frames(run["local_attn_size"], run["sink_size"], chunk_frames)
        plan = RolloutPlan.create(model.config, mesh, pixel_height=h * VAE_STRIDE[1], pixel_width=w * VAE_STRIDE[2],
                                  chunk_frames=chunk_frames, total_blocks=n_chunks, sink_frames=sink,
                                  ring_frames=ring, batch=b)
        step = StreamingStep(model, schedule, plan)
        cache = step.init_cache(jnp.float32)
        cross_kv = step.cross_kv(context)
        chunks = []
        for c in range(n_chunks):
            window = slice(c * chunk_frames, (c + 1) * chunk_frames)
            noise = np.stack([noise_init[:, window]] + renoise[c * (k - 1):(c + 1) * (k - 1)])
            inputs = step.whole(ChunkInputs(y=None if y is None else y[:, window],
                                            camera=None if camera is None else camera[:, window]))
            x0 = step.denoise(step.params, cache, cross_kv, step.whole(noise), inputs)
            cache = step.commit(step.params, cache, cross_kv, x0, inputs)
            chunks.append(to_host(x0))
        results[run["outputs_prefix"]] = chunks
    return results


def replay_blocks(model: WanModel, schedules: BlockSchedules, context: np.ndarray, block_noise: list[np.ndarray],
                  *, chunk_frames: int, sink_frames: int | None, ring_frames: int, given: np.ndarray | None = None,
                  num_devices: int | None = None, steps: dict | None = None) -> list[np.ndarray]:
    """Streams a rollout with recorded noise and per-block schedules, as `WorldRollout` does: the given
    latents (one chunk of their own, e.g. an I2V image latent) are committed first without denoising, then
    generated block b runs `schedules.for_block(b)` against the cache and is committed.

    Args (channels-last, batch first): block_noise: one [k_b, B, chunk, H, W, C] per generated block (its
    initial noise, then one draw per later pass); given: [B, chunk, H, W, C] or None.
    steps: a dict the calls for one `model` share: their `StreamingStep`s by cache layout and chunk shape, so
    rollouts that differ only in schedules, noise or given latents reuse the compiled programs.
    Returns the x0 of every generated block, [B, chunk, H, W, C].
    """
    _, b, _, h, w, _ = block_noise[0].shape
    prefix = 0 if given is None else given.shape[1]
    plan = RolloutPlan.create(model.config, make_mesh(num_devices), pixel_height=h * VAE_STRIDE[1],
                              pixel_width=w * VAE_STRIDE[2], chunk_frames=chunk_frames,
                              total_blocks=(1 if prefix else 0) + len(block_noise), sink_frames=sink_frames,
                              ring_frames=ring_frames, batch=b, prefix_frames=prefix)
    steps = {} if steps is None else steps
    key = (plan.cache, plan.chunk_shape, plan.num_devices)
    step = steps[key] = steps.get(key) or StreamingStep(model, schedules.rest, plan)
    cache = step.init_cache(jnp.float32)
    cross_kv = step.cross_kv(context)
    inputs = ChunkInputs()
    outputs = []
    for c in range(plan.total_blocks):
        block = plan.block_index(c)
        if block < 0:
            x0 = step.whole(given)
        else:
            schedule = schedules.for_block(block)
            x0 = step.denoise(step.params, cache, cross_kv, step.whole(block_noise[block]), inputs,
                              step.whole(schedule))
        cache = step.commit(step.params, cache, cross_kv, x0, inputs)
        if block >= 0:
            outputs.append(to_host(x0))
    return outputs
