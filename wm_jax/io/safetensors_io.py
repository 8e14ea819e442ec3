"""Streaming reader for safetensors files and sharded checkpoints.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) instead of
memory-mapping, so that

* every tensor is read with one positional read into a fresh buffer: resident memory while converting
  holds one tensor at a time, not the mapped pages of a whole shard;
* a truncated or corrupt file fails up front with a message that names the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from wm_jax.errors import TemplatedError

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(TemplatedError, ValueError):
    """A checkpoint file or its contents are not what the converter expects (options named as `{name}`)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, byte range, dtype and shape (torch axis order)."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in `file`
    end: int


class SafetensorsFile:
    """One `.safetensors` file, validated on open; tensors are read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(
                    f"{self.path}: corrupt or truncated safetensors file: header claims {header_len} bytes "
                    f"but the file has {size} bytes")
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON: {err})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        data_len = size - data_start
        self._tensors: dict[str, TensorInfo] = {}
        max_end = 0
        for name, entry in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name!r}: {entry!r} ({err})") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} {entry['dtype']}{list(shape)} needs {nbytes} bytes but its "
                    f"offsets span {end - begin}")
            if end > data_len:
                raise CheckpointError(
                    f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte {end} of the data "
                    f"section, which has only {data_len} bytes")
            max_end = max(max_end, end)
            self._tensors[name] = TensorInfo(self.path, dtype, shape, data_start + begin, data_start + end)
        if max_end != data_len:
            raise CheckpointError(
                f"{self.path}: corrupt safetensors file: data section has {data_len} bytes, tensors cover {max_end}")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name]


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Reads one tensor into a new array (torch axis order, stored dtype)."""
    out = np.empty(info.shape, dtype=info.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.begin)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{info.file}: file shrank while reading (truncated at byte {info.begin + done})")
            done += n
    return out


class TensorSource:
    """A named collection of tensors spread over one or more safetensors files.

    Build it with `open_safetensors` (one file, an index json, or a folder of shards).
    """

    def __init__(self, files: Iterable[SafetensorsFile], description: str):
        self.description = description
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            for name in f.keys():
                if name in self._infos:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self._infos[name].file} and {f.path}")
                self._infos[name] = f.info(name)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def read(self, name: str) -> np.ndarray:
        return read_tensor(self._infos[name])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (name, array) one tensor at a time, file by file in storage order."""
        for name in sorted(self._infos, key=lambda n: (str(self._infos[n].file), self._infos[n].begin)):
            yield name, self.read(name)

    def total_bytes(self) -> int:
        return sum(i.end - i.begin for i in self._infos.values())


def open_safetensors(path: str | os.PathLike) -> TensorSource:
    """Opens a single `.safetensors` file, a `*.safetensors.index.json`, or a folder.

    A folder must hold exactly one index json, or else its `*.safetensors` files are all read.
    """
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: several index files {[p.name for p in indexes]}; pass one of them")
        if indexes:
            return open_safetensors(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files or *.safetensors.index.json in this folder")
        return TensorSource([SafetensorsFile(p) for p in files], str(path))
    if path.name.endswith(".index.json"):
        try:
            index = json.loads(path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such index file") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a safetensors index (needs a 'weight_map' object): {err}") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (path.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in the index are missing: {missing}")
        source = TensorSource([SafetensorsFile(path.parent / s) for s in shard_names], str(path))
        for key, shard in weight_map.items():
            if key not in source._infos or source._infos[key].file.name != Path(shard).name:
                raise CheckpointError(f"{path}: index maps {key!r} to {shard}, but that shard does not hold it")
        return source
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        raise CheckpointError(f"{path}: a pickle checkpoint; open it with wm_jax.io.tensor_sources.open_source "
                              f"(needs {{allow_pickle}})")
    return TensorSource([SafetensorsFile(path)], str(path))
