"""Uniform read-only views over checkpoint tensors: `keys()`, `shape(name)`, `read(name)`.

`TensorSource` (safetensors, streamed from disk) is the main one; the views here adapt in-memory dicts,
torch pickles (only behind an explicit opt-in) and renamed key spaces to the same three methods, so a
converter never cares where tensors come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from wm_jax.io.safetensors_io import CheckpointError, open_safetensors


class Source(Protocol):
    description: str

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray: ...


class ArraySource:
    """Tensors already in memory (numpy arrays, torch axis order)."""

    def __init__(self, arrays: Mapping[str, np.ndarray], description: str = "in-memory state dict"):
        self._arrays = dict(arrays)
        self.description = description

    def keys(self) -> list[str]:
        return list(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._arrays[name])


class RenamedSource:
    """`base` seen through a key renaming; `rename(old) -> new or None` (None drops the key)."""

    def __init__(self, base: Source, rename: Callable[[str], str | None], description: str | None = None):
        self.base = base
        self.description = description or base.description
        self._new_to_old: dict[str, str] = {}
        for old in base.keys():
            new = rename(old)
            if new is None:
                continue
            if new in self._new_to_old:
                raise CheckpointError(
                    f"{self.description}: keys {self._new_to_old[new]!r} and {old!r} both map to {new!r}")
            self._new_to_old[new] = old

    def keys(self) -> list[str]:
        return list(self._new_to_old)

    def original_key(self, name: str) -> str:
        return self._new_to_old[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(self._new_to_old[name])

    def read(self, name: str) -> np.ndarray:
        return self.base.read(self._new_to_old[name])


PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_pickle_state_dict(path: str | os.PathLike, *, allow_pickle: bool,
                           prefer_entries: tuple[str, ...] = ()) -> ArraySource:
    """Reads a torch pickle checkpoint into numpy arrays.

    Refuses unless `allow_pickle`: unpickling can run arbitrary code from the file. If the top-level dict
    holds sub-dicts (e.g. Self-Forcing's {'generator', 'generator_ema', 'critic'}), the first of
    `prefer_entries` that exists is used.
    """
    path = Path(path)
    if not allow_pickle:
        raise CheckpointError(
            f"{path}: refusing to read a pickle checkpoint: loading a .pt/.pth file can execute code stored "
            "in it. Pass {allow_pickle} if you trust this file (or convert it from a safetensors copy).")
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pickle checkpoints needs PyTorch: pip install torch") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises many types for corrupt zips/pickles
        raise CheckpointError(f"{path}: cannot read this torch checkpoint: {type(err).__name__}: {err}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors at the top level, got {type(obj).__name__}")
    for entry in prefer_entries:
        if isinstance(obj.get(entry), Mapping):
            obj = obj[entry]
            break
    else:
        if prefer_entries and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(
                f"{path}: none of the entries {list(prefer_entries)} found; top-level keys: {sorted(obj)[:20]}")
    arrays = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if value.dtype == torch.bfloat16:
            import ml_dtypes
            arrays[name] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            arrays[name] = value.numpy()
    return ArraySource(arrays, str(path))


def open_source(path: str | os.PathLike, *, allow_pickle: bool = False,
                prefer_entries: tuple[str, ...] = ()) -> Source:
    """Any supported checkpoint path -> Source (safetensors file/index/folder, or a pickle if allowed)."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return load_pickle_state_dict(path, allow_pickle=allow_pickle, prefer_entries=prefer_entries)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return open_safetensors(path)
