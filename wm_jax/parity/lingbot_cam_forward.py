"""Golden case `lingbot_cam_forward`: raw trajectory -> camera map -> LingBot DiT forward.

Produces `cam_plucker` [1, 384, F, h, w] (upstream's channels-first camera tensor), `flow_t{k}`
for every entry of `timesteps` (with camera) and `flow_nocam_t0` (camera path skipped), each
[C_out, F, h, w] like upstream's per-sample output.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from converters import wan_dit
from wm_jax.io.tensor_sources import open_source
from wm_jax.models import camera as cam
from wm_jax.models.wan_vae import VAE_STRIDE
from wm_jax.parity.common import model_overrides


def run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = np.moveaxis(inputs["x"], 0, -1)[None]  # (C, F, h, w) -> [1, F, h, w, C]
    y = np.moveaxis(inputs["y"], 0, -1)[None]
    _, lat_f, lat_h, lat_w, _ = x.shape
    frame_num = int(config.get("generate_call", {}).get("frame_num", len(inputs["poses"])))
    pixel_frames = cam.usable_pixel_frames(len(inputs["poses"]), frame_num)
    if (pixel_frames - 1) // VAE_STRIDE[0] + 1 != lat_f:
        raise ValueError(f"{case_dir}: {pixel_frames} pixel frames do not give the {lat_f} latent frames of x")
    camera = cam.clip_camera_map(inputs["poses"], inputs["intrinsics"], lat_h * VAE_STRIDE[1],
                                 lat_w * VAE_STRIDE[2], pixel_frames)  # [F, h, w, 384]

    model = wan_dit.load_source(open_source(case_dir / "weights.safetensors"), compute_dtype=jnp.float32,
                                attention_impl="xla", **model_overrides(config))
    context = jnp.asarray(inputs["context"])[None]
    outputs = {"cam_plucker": np.moveaxis(camera, -1, 0)[None]}

    def flow(t, with_camera: bool) -> np.ndarray:
        out = model(jnp.asarray(x), jnp.asarray([t]), context, y=jnp.asarray(y),
                    camera=jnp.asarray(camera)[None] if with_camera else None)
        return np.moveaxis(np.asarray(out[0]), -1, 0)  # [F, h, w, C] -> (C, F, h, w)

    for i, t in enumerate(inputs["timesteps"]):
        outputs[f"flow_t{i}"] = flow(int(t), True)
    outputs["flow_nocam_t0"] = flow(int(inputs["timesteps"][0]), False)
    return outputs
