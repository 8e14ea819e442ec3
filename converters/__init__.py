"""Converters from upstream PyTorch checkpoints to wm_jax modules.

Each converter module (`converters.<kind>`) provides:

    matches(keys: set[str]) -> bool            # does this key set look like this kind of checkpoint?
    convert(source, dst, *, overwrite, dtype, config_overrides) -> dict   # write a converted folder
    load(folder) -> nnx.Module                 # load a converted folder
    load_source(source, **config_overrides) -> nnx.Module   # in-memory load (small models)

`detect_kind` tries them in order.
"""

from __future__ import annotations

import importlib

from wm_jax.io.safetensors_io import CheckpointError

KINDS = ("wan_dit", "wan_vae", "wan2_2_vae", "taehv", "umt5")


def converter(kind: str):
    if kind not in KINDS:
        raise CheckpointError(f"unknown checkpoint kind {kind!r}; known: {', '.join(KINDS)}")
    return importlib.import_module(f"converters.{kind}")


def detect_kind(keys: set[str]) -> str:
    for kind in KINDS:
        try:
            module = converter(kind)
        except ModuleNotFoundError:
            continue
        if module.matches(keys):
            return kind
    sample = sorted(keys)[:8]
    raise CheckpointError(f"cannot tell what kind of checkpoint this is (first keys: {sample}); "
                          f"pass --kind, one of {', '.join(KINDS)}")
