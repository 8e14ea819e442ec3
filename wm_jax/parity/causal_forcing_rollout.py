"""Golden case `causal_forcing_rollout`: Causal-Forcing rollouts (thu-ml/Causal-Forcing `CausalInferencePipeline`).

Every entry of `config.json["runs"]` is one rollout from the same weights and prompt, with its own
recorded noise and settings, all read from the case: frames per block, shift, warp, the step list and
the optional first-block list (Causal-Forcing++), the cache (`local_attn_size`, `sink_size`) and the
initial latent frames committed up front (I2V). Upstream latents are (B, F, C, H, W); re-noise draws
(B·block, C, H, W), block-major then step-minor, each block drawing (its pass count − 1). Outputs
`<outputs_prefix><b>` are the x0 of generated block b, (B, block, C, H, W).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters import wan_dit
from wm_jax.io.tensor_sources import open_source
from wm_jax.parity import ParityError
from wm_jax.parity.common import model_overrides
from wm_jax.parity.rollout import replay_blocks
from wm_jax.streaming.kv_cache import upstream_cache_frames
from wm_jax.streaming.schedules import BlockSchedules, StepSchedule, self_forcing_schedule


def _channels_last(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 2, -1)  # (B, F, C, H, W) -> [B, F, H, W, C]


def _schedule(name: str, run: dict, steps, recorded) -> StepSchedule:
    """The schedule of a step list; checked against the run's recorded (warped) timesteps when present."""
    schedule = self_forcing_schedule(float(run["timestep_shift"]), tuple(steps), warp=bool(run["warp_denoising_step"]))
    if recorded is not None and not np.allclose(schedule.t, np.asarray(recorded, np.float64), rtol=0, atol=1e-3):
        raise ParityError(f"run {name}: our timesteps {schedule.t.tolist()} differ from the recorded {recorded}")
    return schedule


def _block_noise(name: str, run: dict, inputs: dict[str, np.ndarray], schedules: BlockSchedules,
                 block: int) -> list[np.ndarray]:
    """[k_b, B, block, H, W, C] per generated block: its slice of the initial noise, then its re-noise draws."""
    prefix = run["noise_prefix"]
    noise_init = _channels_last(inputs[f"{prefix}init"])
    batch, frames = noise_init.shape[:2]
    if frames % block:
        raise ParityError(f"run {name}: {frames} noise frames are not whole blocks of {block}")
    draws = [inputs[k] for k in sorted(k for k in inputs if k.startswith(f"{prefix}renoise_"))]
    passes = [schedules.for_block(b).num_steps for b in range(frames // block)]
    if len(draws) != sum(k - 1 for k in passes):
        raise ParityError(f"run {name}: {len(draws)} re-noise draws; blocks of {passes} passes need "
                          f"{sum(k - 1 for k in passes)}")
    out, used = [], 0
    for b, k in enumerate(passes):
        later = [_channels_last(d.reshape(batch, block, *d.shape[1:])) for d in draws[used:used + k - 1]]
        used += k - 1
        out.append(np.stack([noise_init[:, b * block:(b + 1) * block], *later]))
    return out


def run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = wan_dit.load_source(open_source(case_dir / "weights.safetensors"), compute_dtype=jnp.float32,
                                attention_impl="xla", **model_overrides(config))
    context = inputs["context"][None]
    outputs, steps = {}, {}  # runs with the same cache layout share their compiled programs
    for name, run_config in config["runs"].items():
        if run_config.get("independent_first_frame"):
            raise ParityError(f"run {name}: independent_first_frame is not supported")
        if float(run_config.get("context_noise", 0)) != 0:
            raise ParityError(f"run {name}: only a t = 0 commit pass is supported (context_noise "
                              f"{run_config['context_noise']})")
        block = int(run_config["num_frame_per_block"])
        first = run_config.get("denoising_step_list_first_chunk_config")
        schedules = BlockSchedules(
            rest=_schedule(name, run_config, run_config["denoising_step_list_config"],
                           run_config.get("denoising_step_list_warped")),
            first=None if first is None else _schedule(name, run_config, first,
                                                       run_config.get("denoising_step_list_first_chunk_warped")))
        given = None
        if int(run_config.get("initial_latent_frames", 0)):
            given = _channels_last(inputs["initial_latent"])
            if given.shape[1] != int(run_config["initial_latent_frames"]):
                raise ParityError(f"run {name}: initial_latent has {given.shape[1]} frames, the run says "
                                  f"{run_config['initial_latent_frames']}")
        sink, ring = upstream_cache_frames(int(run_config["local_attn_size"]), int(run_config["sink_size"]), block)
        blocks = replay_blocks(model, schedules, context, _block_noise(name, run_config, inputs, schedules, block),
                               chunk_frames=block, sink_frames=sink, ring_frames=ring, given=given, steps=steps)
        outputs.update({f"{run_config['outputs_prefix']}{b}": np.moveaxis(x0, -1, 2) for b, x0 in enumerate(blocks)})
    return outputs
