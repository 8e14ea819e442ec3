"""Trained worlds shipped inside the package: `wm_jax/assets/<name>/`.

Layout of a shipped world (a few MB, written by `wm-jax train ... --export`):

    <name>/world.json             {"format": 1, "components": {component: {"kind", "config", "file", "sha256",
                                   "num_params"}}, "training": {...how it was made...}}
    <name>/<component>.safetensors flat parameter paths ('blocks/self_attn/q/kernel') -> arrays (float16)

Files are checked against the sha256 in `world.json` before use, so a truncated or altered file is an
error naming it, never a silently wrong world.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wm_jax.io.checkpoint import atomic_folder
from wm_jax.io.safetensors_io import CheckpointError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MANIFEST = "world.json"
FORMAT_VERSION = 1


def shipped_dir(name: str) -> Path:
    return ASSETS / name


def _restore_hint(folder: Path) -> str:
    return (f"restore it with `git checkout HEAD {folder}` (a git clone) or by reinstalling wm_jax with pip (an "
            "installed package), or retrain it with `wm-jax train configs/train_tiny_world.py {workdir} DIR "
            f"{{export}} {folder}`")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShippedWorld:
    """A shipped world's manifest and folder; `params(component)` reads and checks one component."""

    folder: Path
    manifest: dict[str, Any]

    def component(self, name: str) -> dict[str, Any]:
        components = self.manifest["components"]
        if name not in components:
            raise CheckpointError(f"{self.folder / MANIFEST}: no component {name!r} (has {sorted(components)}); "
                                  + _restore_hint(self.folder))
        return components[name]

    def params(self, name: str) -> dict[str, np.ndarray]:
        """Flat path -> array of `name`'s parameters, after checking the file's sha256."""
        from safetensors.numpy import load_file

        entry = self.component(name)
        path = self.folder / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shipped weights; " + _restore_hint(self.folder))
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: corrupt shipped weights (sha256 differs from {MANIFEST}); "
                                  + _restore_hint(self.folder))
        return load_file(str(path))


def read_shipped(name_or_folder: str | os.PathLike) -> ShippedWorld:
    """The shipped world `name` (under `wm_jax/assets/`) or at a folder path."""
    folder = Path(name_or_folder)
    if not folder.is_absolute() and not folder.exists():
        folder = shipped_dir(str(name_or_folder))
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing shipped world manifest; " + _restore_hint(folder)) from None
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable shipped world manifest ({err}); " + _restore_hint(folder)) from None
    if manifest.get("format") != FORMAT_VERSION or "components" not in manifest:
        raise CheckpointError(f"{path}: not a shipped world manifest of format {FORMAT_VERSION}; "
                              + _restore_hint(folder))
    return ShippedWorld(folder, manifest)


def write_shipped(folder: str | os.PathLike, components: Mapping[str, tuple[str, dict, Mapping[str, np.ndarray]]],
                  training: Mapping[str, Any], dtype=np.float16) -> Path:
    """Writes a shipped world atomically (temporary folder beside `folder`, renamed into place).

    components: name -> (kind, config dict, flat params); parameters are stored as `dtype`.
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    with atomic_folder(folder, overwrite=True) as tmp:
        entries = {}
        for name, (kind, config, params) in components.items():
            file = f"{name}.safetensors"
            arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32).astype(dtype)) for k, v in params.items()}
            save_file(arrays, str(tmp / file))
            entries[name] = {"kind": kind, "config": config, "file": file, "sha256": _sha256(tmp / file),
                             "num_params": int(sum(a.size for a in arrays.values())), "dtype": np.dtype(dtype).name}
        manifest = {"format": FORMAT_VERSION, "components": entries, "training": dict(training)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return folder
