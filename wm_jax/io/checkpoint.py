"""Converted-checkpoint folders: orbax parameter tree + `wm_jax.json` (what the model is).

Layout of a converted folder:

    DST/wm_jax.json   {"format": 1, "kind": "wan_dit" | ..., "config": {...}, "source": ..., ...}
    DST/params/       orbax StandardCheckpointer trees (nested dicts keyed like the module's attributes),
                      one per group of parameters (group_0000, ...), and groups.json: path -> group

A folder is written under a temporary name beside DST and renamed into place only when complete, so an
interrupted conversion never leaves a partial DST.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from wm_jax.io.safetensors_io import CheckpointError

FORMAT_VERSION = 1
MANIFEST = "wm_jax.json"


# ---------------------------------------------------------------------------------------------------
# Module <-> flat parameter dict.
# ---------------------------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flat_params(module: nnx.Module) -> dict[str, Any]:
    """Flat path ('blocks/self_attn/q/kernel') -> value of every nnx.Param of `module`."""
    return {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def param_spec(module: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, dtype) of every nnx.Param of `module`.

    Works on abstract modules from `nnx.eval_shape`, so nothing is allocated.
    """
    return {name: (tuple(v.shape), np.dtype(v.dtype)) for name, v in flat_params(module).items()}


def params_digest(flat: Mapping[str, Any]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every parameter, in name order.

    Converters record it in the manifest (`params_sha256`); the prompt cache keys on it.
    """
    h = hashlib.sha256()
    for name in sorted(flat):
        value = np.asarray(flat[name])
        h.update(f"{name}|{value.dtype.name}|{list(value.shape)}\n".encode())
        h.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def assign_params(module: nnx.Module, arrays: Mapping[str, Any],
                  put: Callable[[str, Any], jax.Array] | None = None) -> None:
    """Replaces every nnx.Param of `module` by `arrays[path]` (placed with `put`, default device_put)."""
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    spec = param_spec(module)
    missing = sorted(set(spec) - set(arrays))
    extra = sorted(set(arrays) - set(spec))
    if missing or extra:
        raise CheckpointError(f"parameter set does not match the module: missing {missing[:10]}, extra {extra[:10]}")
    new = []
    for p, v in flat:
        name = _path_str(p)
        value = arrays[name]
        if tuple(value.shape) != spec[name][0]:
            raise CheckpointError(f"parameter {name}: shape {tuple(value.shape)}, module expects {spec[name][0]}")
        new.append((p, v.replace(put(name, value) if put else jax.device_put(value))))
    nnx.update(module, nnx.from_flat_state(new))


def nest(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


# ---------------------------------------------------------------------------------------------------
# Atomic destination folders.
# ---------------------------------------------------------------------------------------------------


def check_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
    """Refuses an existing destination unless `overwrite`; checks the parent is writable."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: destination exists; pass {{overwrite}} to replace it")
    parent = dst.parent if str(dst.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{parent}: not writable")
    return dst


@contextmanager
def atomic_folder(dst: str | os.PathLike, overwrite: bool = False):
    """Yields a temporary folder beside `dst`; on success it replaces `dst`, on any error it is deleted."""
    dst = check_destination(dst, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------------
# Orbax save / restore.
# ---------------------------------------------------------------------------------------------------


GROUP_INDEX = "groups.json"
DEFAULT_GROUP_BYTES = 1 << 30


def write_params(folder: Path, params: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
                 group_bytes: int = DEFAULT_GROUP_BYTES) -> None:
    """Saves flat arrays under `folder/params` as orbax trees of at most ~`group_bytes` each.

    `params` may be a dict or an iterator of (path, array) (e.g. `converters.core.iter_converted`):
    arrays are saved and released group by group. Orbax holds about two extra copies of what it is
    saving, so bounded groups keep host memory near one group (or one parameter) instead of ~3x the
    model. `params/groups.json` maps every parameter path to its group folder.
    """
    import orbax.checkpoint as ocp

    root = folder.absolute() / "params"
    root.mkdir(parents=True)
    items = params.items() if isinstance(params, Mapping) else params
    index: dict[str, str] = {}
    group: dict[str, np.ndarray] = {}
    size = 0

    def flush():
        nonlocal group, size
        if group:
            name = f"group_{len(set(index.values())):04d}"
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(root / name, nest(group))
                ckptr.wait_until_finished()
            index.update({k: name for k in group})
            group, size = {}, 0

    for name, value in items:
        if size and size + value.nbytes > group_bytes:
            flush()
        group[name] = value
        size += value.nbytes
        del value
    flush()
    (root / GROUP_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def write_manifest(folder: Path, manifest: Mapping[str, Any]) -> None:
    data = {"format": FORMAT_VERSION, **manifest}
    (folder / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The folder's manifest; with `kind`, refuses a folder that holds another kind of checkpoint."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a converted wm_jax checkpoint (no {MANIFEST}); "
                              "run `wm-jax convert {src} ... {dst} ...` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {manifest.get('format')}, this wm_jax reads {FORMAT_VERSION}")
    if kind is not None and manifest.get("kind") != kind:
        raise CheckpointError(f"{folder}: holds a {manifest.get('kind')!r} checkpoint, not {kind!r}")
    return manifest


def restore_params(folder: str | os.PathLike, spec: Mapping[str, tuple[tuple[int, ...], np.dtype]],
                   shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> dict[str, jax.Array]:
    """Restores `folder/params` into arrays shaped/typed as `spec` (sharded per path, else on this process's
    first device)."""
    import orbax.checkpoint as ocp

    root = Path(folder).absolute() / "params"
    index_file = root / GROUP_INDEX
    if not index_file.is_file():
        raise CheckpointError(f"{folder}: no {index_file.relative_to(Path(folder).absolute())}; incomplete checkpoint")
    index: dict[str, str] = json.loads(index_file.read_text())
    missing = sorted(set(spec) - set(index))
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks parameters {missing[:10]} that the model needs")
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(name):
        shape, dtype = spec[name]
        sharding = (shardings or {}).get(name, default)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    out: dict[str, jax.Array] = {}
    with ocp.StandardCheckpointer() as ckptr:
        for group in sorted(set(index[n] for n in spec)):
            names = [n for n in spec if index[n] == group]
            out.update(flatten(ckptr.restore(root / group, nest({n: target(n) for n in names}))))
    return out
