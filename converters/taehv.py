"""TAEHV checkpoints (madebyollin/taehv `taew2_1`, `taew2_2`, ...) -> `wm_jax.models.taehv.TAEHVDecoder`.

Accepted layouts: upstream `TAEHV.state_dict()` keys `decoder.{i}...` (`.pth` behind allow_pickle, or the
repo's `safetensors/*.safetensors`), with or without the `encoder.*` keys (dropped: only the decoder is
converted), and FlashDreams' `decoder.blocks.{i}...` naming. Upstream index -> parameter path:

    decoder.1.{weight,bias}                 conv_in                       (conv3x3 z -> n0)
    decoder.{3+6s+k}.conv.{0,2,4}.*         stages/s/mem/k/conv{0,1,2}    (MemBlock k of stage s)
    decoder.{7+6s}.conv.weight              stages/s/tgrow                (TGrow 1x1, no bias)
    decoder.{8+6s}.weight                   stages/s/conv                 (conv3x3, no bias)
    decoder.22.{weight,bias}                conv_out

TGrow weights: released checkpoints store stride-2 TGrows everywhere ([2n, n, 1, 1]); a stage whose time
upscaling is off (stage 0 by default) keeps the LAST n rows, as upstream's `patch_tgrow_layers` does.
The config (latent channels, widths, patch size) is inferred from the shapes; the time/space upscaling
flags cannot be (upstream defaults, overridable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.core import (CONV2D, Rule, Transform, as_source, convert_tensors, load_converted, make_config,
                             with_params)
from wm_jax.io import checkpoint as ckpt
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import RenamedSource, Source
from wm_jax.models.taehv import MEMBLOCKS_PER_STAGE, NUM_STAGES, TAEHVConfig, TAEHVDecoder

KIND = "taehv"

CONV_IN, CONV_OUT = 1, 22
IGNORED = (r"encoder\.",)


def stage_index(stage: int) -> int:
    """Upstream decoder index of the first MemBlock of `stage`."""
    return 3 + 6 * stage


def tgrow_transform(key: str, n: int, stride: int) -> Transform:
    """TGrow weight [R, n, 1, 1] (R a multiple of n, >= stride·n) -> HWIO [1, 1, n, stride·n], keeping the
    last stride·n rows. The source shape is not derivable (R varies), so it is checked here."""
    rows = n * stride

    def apply(a: np.ndarray) -> np.ndarray:
        if a.ndim != 4 or tuple(a.shape[1:]) != (n, 1, 1) or a.shape[0] < rows or a.shape[0] % n:
            raise CheckpointError(f"{key}: TGrow weight has shape {list(a.shape)}; expected [k*{n}, {n}, 1, 1] "
                                  f"with k*{n} >= {rows} (the last {rows} rows are used)")
        return CONV2D.apply(a[a.shape[0] - rows:])

    return Transform(f"tgrow_last_{rows}_rows", apply, lambda shape: None)


def rules_for(cfg: TAEHVConfig) -> list[Rule]:
    rules = [Rule(f"decoder.{CONV_IN}.weight", "conv_in/kernel", CONV2D),
             Rule(f"decoder.{CONV_IN}.bias", "conv_in/bias")]
    for s in range(NUM_STAGES):
        base = stage_index(s)
        for k in range(MEMBLOCKS_PER_STAGE):
            for j, torch_idx in enumerate((0, 2, 4)):
                src = f"decoder.{base + k}.conv.{torch_idx}"
                dst = f"stages/{s}/mem/{k}/conv{j}"
                rules += [Rule(f"{src}.weight", f"{dst}/kernel", CONV2D), Rule(f"{src}.bias", f"{dst}/bias")]
        key = f"decoder.{base + 4}.conv.weight"
        rules.append(Rule(key, f"stages/{s}/tgrow/kernel", tgrow_transform(key, cfg.decoder_n_f[s],
                                                                           cfg.time_strides[s])))
        rules.append(Rule(f"decoder.{base + 5}.weight", f"stages/{s}/conv/kernel", CONV2D))
    rules += [Rule(f"decoder.{CONV_OUT}.weight", "conv_out/kernel", CONV2D),
              Rule(f"decoder.{CONV_OUT}.bias", "conv_out/bias")]
    return rules


# ---------------------------------------------------------------------------------------------------
# Layouts and config.
# ---------------------------------------------------------------------------------------------------


def _flashdreams_to_upstream(key: str) -> str:
    return "decoder." + key[len("decoder.blocks."):] if key.startswith("decoder.blocks.") else key


def normalize_source(source: Source) -> Source:
    keys = set(source.keys())
    if any(k.startswith("decoder.blocks.") for k in keys):
        return RenamedSource(source, _flashdreams_to_upstream, f"{source.description} (decoder.blocks layout)")
    return source


def matches(keys: set[str]) -> bool:
    keys = {_flashdreams_to_upstream(k) for k in keys}
    return (f"decoder.{CONV_OUT}.weight" in keys and f"decoder.{stage_index(0)}.conv.0.weight" in keys) or (
        "decoder.0.weight" in keys and "decoder.1.conv.0.weight" in keys)  # super variant (refused later)


def storage_dtype(source: Source) -> str:
    dtype = np.dtype(source.read(f"decoder.{CONV_IN}.bias").dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.name


def config_for(source: Source, overrides: Mapping[str, Any] | None = None, dtype: str | None = None) -> TAEHVConfig:
    """Infers latent channels, widths and patch size from a normalised source; `overrides` win."""
    keys = set(source.keys())
    if "decoder.0.weight" in keys and "decoder.1.conv.0.weight" in keys:
        raise CheckpointError(f"{source.description}: this is a TAEHV 'super' decoder (e.g. taew2_2_super); "
                              "only the base decoder (taew2_1, taew2_2, taehv, taehv1_5) is supported")
    needed = [f"decoder.{CONV_IN}.weight", f"decoder.{CONV_OUT}.weight"] + [
        f"decoder.{stage_index(s) + 5}.weight" for s in range(NUM_STAGES)]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise CheckpointError(f"{source.description}: not a TAEHV decoder checkpoint (missing {missing}; "
                              f"first keys {sorted(keys)[:6]})")
    conv_in = source.shape(f"decoder.{CONV_IN}.weight")
    widths = [conv_in[0]] + [source.shape(f"decoder.{stage_index(s) + 5}.weight")[0] for s in range(NUM_STAGES)]
    out_channels = source.shape(f"decoder.{CONV_OUT}.weight")[0]
    patch = math.isqrt(out_channels // 3)
    if out_channels % 3 or patch * patch * 3 != out_channels:
        raise CheckpointError(f"{source.description}: decoder.{CONV_OUT}.weight has {out_channels} output "
                              "channels; expected 3·p² (RGB after a p x p pixel shuffle)")
    fields: dict[str, Any] = {"latent_channels": int(conv_in[1]), "patch_size": int(patch),
                              "decoder_n_f": tuple(int(w) for w in widths)}
    fields.update(overrides or {})
    fields.setdefault("param_dtype", dtype or storage_dtype(source))
    return make_config(source, TAEHVConfig, fields, "TAEHV")


def expected_params(cfg: TAEHVConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    abstract = nnx.eval_shape(lambda: TAEHVDecoder(cfg, rngs=nnx.Rngs(0)))
    return ckpt.param_spec(abstract)


def convert_arrays(source: Source, cfg: TAEHVConfig, on_tensor=None):
    """Normalised source + config -> (flat numpy params, report)."""
    return convert_tensors(source, rules_for(cfg), expected_params(cfg), ignore=IGNORED, on_tensor=on_tensor)


# ---------------------------------------------------------------------------------------------------
# Converter interface.
# ---------------------------------------------------------------------------------------------------


def convert(source: Source | str | Path, dst: str | Path, *, overwrite: bool = False, dtype: str | None = None,
            config_overrides: Mapping[str, Any] | None = None, allow_pickle: bool = False,
            on_tensor=None) -> dict[str, Any]:
    """Writes a converted folder (orbax params + wm_jax.json, kind "taehv"); returns the manifest.

    `dtype` sets the stored parameter dtype (default: the checkpoint's); `allow_pickle` is needed only
    when `source` is a `.pth` path.
    """
    ckpt.check_destination(dst, overwrite)
    source = normalize_source(as_source(source, allow_pickle))
    cfg = config_for(source, config_overrides, dtype)
    with ckpt.atomic_folder(dst, overwrite) as tmp:
        flat, report = convert_arrays(source, cfg, on_tensor)
        ckpt.write_params(tmp, flat)
        manifest = {"kind": KIND, "config": cfg.to_dict(), "source": report.source,
                    "num_tensors": report.num_tensors, "ignored_keys": report.ignored}
        ckpt.write_manifest(tmp, manifest)
    return manifest


def load(folder: str | Path, *, compute_dtype=jnp.float32, precision=None) -> TAEHVDecoder:
    """Loads a converted folder."""
    return load_converted(folder, KIND, TAEHVConfig,
                          lambda cfg: TAEHVDecoder(cfg, compute_dtype=compute_dtype, precision=precision),
                          expected_params)


def load_source(source: Source | str | Path, *, compute_dtype=jnp.float32, precision=None,
                dtype: str | None = None, allow_pickle: bool = False, **config_overrides) -> TAEHVDecoder:
    """In-memory load straight from upstream tensors (no converted folder)."""
    source = normalize_source(as_source(source, allow_pickle))
    cfg = config_for(source, config_overrides, dtype)
    flat, _ = convert_arrays(source, cfg)
    return with_params(lambda: TAEHVDecoder(cfg, compute_dtype=compute_dtype, precision=precision), flat)
