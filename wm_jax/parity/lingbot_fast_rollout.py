"""Golden case `lingbot_fast_rollout`: LingBot-World Fast causal I2V rollout with camera control.

Camera for the whole (trimmed) clip up front, as upstream: latent poses at linspace(0, N−1, lat_f)
(off the stride-4 grid after trimming to a multiple of the chunk), clip-wide translation scale.
Upstream latents are (C, F, H, W) without batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wm_jax.models import camera as cam
from wm_jax.models.wan_vae import VAE_STRIDE
from wm_jax.parity.rollout import replay
from wm_jax.streaming.schedules import lingbot_fast_schedule


def lingbot_causal_rollout(case_dir: Path, config: dict, inputs: dict[str, np.ndarray],
                           camera_name: str) -> dict[str, np.ndarray]:
    """The LingBot causal-fast loop (v1 Fast and v2 causal-fast share it): clip camera map from the raw
    poses, then every cache setting of config['runs'] replayed with the recorded noise. Every shape and
    setting comes from the case; the camera tensor is returned under `camera_name`."""
    sched = config["schedule"]
    schedule = lingbot_fast_schedule(shift=float(sched["shift"]), indices=tuple(sched["timesteps_index"]),
                                     num_train_timesteps=int(sched.get("num_train_timesteps", 1000)))
    chunk = int(config["generate_call"]["chunk_size"])
    to_cl = lambda a: np.moveaxis(a, 0, -1)[None]  # (C, F, H, W) -> [1, F, H, W, C]
    noise_init = to_cl(inputs["noise_init"])
    _, lat_f, lat_h, lat_w, _ = noise_init.shape
    frame_num = int(config["generate_call"]["frame_num"])
    pixel_frames = cam.usable_pixel_frames(len(inputs["poses"]), frame_num)
    camera = cam.clip_camera_map(inputs["poses"], inputs["intrinsics"], lat_h * VAE_STRIDE[1], lat_w * VAE_STRIDE[2],
                                 pixel_frames, num_latent_frames=lat_f)[None]  # [1, F, h, w, 384]
    names = sorted(k for k in inputs if k.startswith("noise_renoise_"))
    runs = replay(case_dir, config, schedule, inputs["context"][None], noise_init,
                  [to_cl(inputs[n]) for n in names], chunk, y=to_cl(inputs["y"]), camera=camera)
    outputs = {camera_name: np.moveaxis(camera[0], -1, 0)[None]}
    outputs.update({f"{prefix}{c}": np.moveaxis(x0[0], -1, 0) for prefix, chunks in runs.items()
                    for c, x0 in enumerate(chunks)})
    return outputs


def run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return lingbot_causal_rollout(case_dir, config, inputs, camera_name="cam_plucker")
