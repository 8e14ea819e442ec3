"""Shared replay of the two causal rollout golden cases through `StreamingStep`."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters import wan_dit
from wm_jax.io.tensor_sources import open_source
from wm_jax.models.wan_vae import VAE_STRIDE
from wm_jax.parallel.mesh import make_mesh, to_host
from wm_jax.parity.common import model_overrides
from wm_jax.streaming.kv_cache import upstream_cache_frames
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.schedules import StepSchedule
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
