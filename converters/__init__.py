"""Converters from upstream PyTorch checkpoints to wm_jax modules.

Each converter module (`converters.<kind>`) provides:

    matches(keys: set[str]) -> bool            # does this key set look like this kind of checkpoint?
    convert(source, dst, *, overwrite, dtype, config_overrides, on_tensor) -> dict   # write a converted folder
    load(folder) -> nnx.Module                 # load a converted folder
    load_source(source, **config_overrides) -> nnx.Module   # in-memory load (small models)

`detect_kind` tries them in order; `convert_path` opens a checkpoint path and converts it with its kind.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from wm_jax.io.safetensors_io import CheckpointError

KINDS = ("wan_dit", "wan_vae", "wan2_2_vae", "taehv", "umt5")
# Kinds whose converter also reads files beside the weights (`source_path`): the DiT's config.json
# (head count, eps), the umT5 tokenizer folder (copied into the converted folder).
READS_SOURCE_PATH = ("wan_dit", "umt5")
# Training checkpoints (Self-Forcing `.pt`): the state dicts to use, in order of preference.
PREFERRED_ENTRIES = ("generator_ema", "generator")


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
                          f"pass {{kind}}, one of {', '.join(KINDS)}")


def convert_path(src: str | os.PathLike, dst: str | os.PathLike, *, kind: str = "auto", allow_pickle: bool = False,
                 boundary: float | None = None, **options) -> dict:
    """Converts the checkpoint at `src` (file, index or folder; a torch pickle only with `allow_pickle`)
    into the folder `dst` and returns its manifest. kind "auto" detects it from the keys; `options` go
    to the converter's `convert` (overwrite, dtype, config_overrides, on_tensor). A two-expert folder
    (`converters.wan_dit.expert_sources`) converts both experts (`boundary`: where they switch; None = the
    architecture's)."""
    from converters import wan_dit
    from wm_jax.io.tensor_sources import open_source

    src = Path(src)
    open_fn = lambda path: open_source(path, allow_pickle=allow_pickle, prefer_entries=PREFERRED_ENTRIES)
    if kind in ("auto", wan_dit.KIND) and wan_dit.is_expert_folder(src):
        return wan_dit.convert_experts(src, dst, open_fn=open_fn, boundary=boundary, **options)
    if boundary is not None:
        raise CheckpointError(f"{src}: a boundary applies to two-expert folders only (expected "
                              f"{'/ + '.join(wan_dit.EXPERT_DIRS)}/ or {'/ + '.join(wan_dit.DIFFUSERS_EXPERT_DIRS)}/)")
    source = open_fn(src)
    kind = detect_kind(set(source.keys())) if kind == "auto" else kind
    if kind in READS_SOURCE_PATH:
        options["source_path"] = src
    return converter(kind).convert(source, dst, **options)

