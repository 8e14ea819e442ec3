"""Golden case `self_forcing_rollout`: Self-Forcing causal T2V rollout, global and sink+window caches.

Upstream latents are (B, F, C, H, W); re-noise draws (B·F, C, H, W). Outputs `<prefix><c>` are the
x0 of chunk c, (B, chunk, C, H, W).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wm_jax.parity.rollout import replay
from wm_jax.streaming.schedules import self_forcing_schedule


def run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sched = config["schedule"]
    schedule = self_forcing_schedule(shift=float(sched["timestep_shift"]),
                                     steps=tuple(sched["denoising_step_list_config"]))
    chunk = int(config["shapes"]["num_frame_per_block"])
    noise_init = np.moveaxis(inputs["noise_init"], 2, -1)  # (B, F, C, H, W) -> [B, F, H, W, C]
    batch = noise_init.shape[0]
    names = sorted(k for k in inputs if k.startswith("noise_renoise_"))
    renoise = [np.moveaxis(inputs[n].reshape(batch, chunk, *inputs[n].shape[1:]), 2, -1) for n in names]
    runs = replay(case_dir, config, schedule, inputs["context"][None], noise_init, renoise, chunk)
    return {f"{prefix}{c}": np.moveaxis(x0, -1, 2) for prefix, chunks in runs.items() for c, x0 in enumerate(chunks)}
