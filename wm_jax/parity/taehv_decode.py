"""Parity runner for the golden case `taehv_decode` (madebyollin/taehv `decode_video` + `StreamingTAEHV`).

Produces, from the case folder alone:
  frames_parallel   [N, 4T-3, 3, H_px, W_px]  whole-video parallel decode (NTCHW like upstream)
  frames_streaming  same shape                decoding `shapes.streaming_chunk_latents` latents at a
                                              time with the MemBlock memories carried between chunks
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters import taehv as taehv_converter
from wm_jax.io.tensor_sources import open_source
from wm_jax.models import taehv

# Settings in config.json["model_config"] that are TAEHVConfig fields.
_ARCH_FIELDS = ("latent_channels", "patch_size", "decoder_n_f", "decoder_time_upscale", "decoder_space_upscale")


class TAEHVParityError(ValueError):
    pass


def run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model_config = config.get("model_config", {})
    if model_config.get("arch_variant") not in (None, "base"):
        raise TAEHVParityError(f"arch_variant {model_config['arch_variant']!r} is not supported")
    overrides = {k: model_config[k] for k in _ARCH_FIELDS if model_config.get(k) is not None}
    source = open_source(Path(case_dir) / "weights.safetensors")
    module = taehv_converter.load_source(source, dtype="float32", precision="highest", **overrides)
    cfg = module.config
    for name, ours in (("t_upscale", cfg.t_upscale), ("frames_to_trim", cfg.frames_to_trim)):
        if name in model_config and int(model_config[name]) != ours:
            raise TAEHVParityError(f"config.json says {name}={model_config[name]}, the decoder has {ours}")

    latent = np.asarray(inputs["latent"], np.float32)  # NTCHW
    z = latent.transpose(0, 1, 3, 4, 2)  # -> [N, T, H, W, C]
    shapes = config.get("shapes", {})
    chunk = int(shapes.get("streaming_chunk_latents", z.shape[1]))

    parallel = np.asarray(taehv.decode_video(module, z))

    b, t, h, w, _ = z.shape
    state = taehv.init_decoder_state(module, b, h, w)
    pieces, counts = [], []
    for start in range(0, t, chunk):
        frames, state = taehv.decode_chunk(module, z[:, start:start + chunk], state)
        pieces.append(np.asarray(frames))
        counts.append(frames.shape[1])
    expected_counts = shapes.get("streaming_frames_per_chunk")
    if expected_counts is not None:
        if len(expected_counts) == len(counts):
            want = [int(c) for c in expected_counts]
        else:  # a short list: the first chunk's count, then the later (full) chunks'
            want = [int(expected_counts[0])] + [int(expected_counts[-1])] * (len(counts) - 1)
            last = t - chunk * (len(counts) - 1)
            if len(counts) > 1 and last != chunk:
                want[-1] = cfg.num_output_frames(last, first_chunk=False)
        if counts != want:
            raise TAEHVParityError(f"streaming emitted {counts} frames per chunk; config.json implies {want}")
    streaming = np.concatenate(pieces, axis=1)

    to_ntchw = lambda x: np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3), dtype=np.float32)
    return {"frames_parallel": to_ntchw(parallel), "frames_streaming": to_ntchw(streaming)}
