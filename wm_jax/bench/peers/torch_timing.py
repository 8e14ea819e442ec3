"""Torch-side helpers every peer adapter uses: the job's dtype, cuDNN SDPA forced, random weights made on the
device, model calls timed with the device synchronised, grouping of a rollout's timed calls into AR chunks.

Imported only in the peer's child process (it imports torch); nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name}: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def cudnn_sdpa(device: torch.device) -> Iterator[None]:
    """Restricts `torch.nn.functional.scaled_dot_product_attention` to the cuDNN backend on CUDA (what
    FlashDreams' parity harness forces on every runtime); on the CPU the default backends stay."""
    if device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        yield


@contextlib.contextmanager
def default_device_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are allocated on `device` in `dtype` from the start (a 14B model never exists in
    float32 on the host); floating tensors an upstream constructor makes with an explicit dtype keep it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def random_weights_(module: torch.nn.Module, seed: int) -> int:
    """Fills every parameter of `module` in place, on its device, in its dtype (same scheme as our JAX
    benchmark's `fill_random_params`): weights with >= 2 axes ~ N(0, 1/fan_in) (fan_in = all axes but the
    first, torch's [out, in, ...] layout), 1-D parameters named like norms (`norm`, `weight` of a norm
    layer) ~ 1 + 0.05 N, every other 1-D parameter ~ 0.02 N. Returns the number of parameters."""
    generator_device = next(module.parameters()).device
    gen = torch.Generator(device=generator_device).manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm) + ((torch.nn.RMSNorm,) if hasattr(torch.nn, "RMSNorm") else ())
    norm_params = {id(p) for m in module.modules() if isinstance(m, norm_types) or "norm" in type(m).__name__.lower()
                   for name, p in m.named_parameters(recurse=False) if name == "weight"}
    count = 0
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
        if p.ndim >= 2:
            value = noise * math.prod(p.shape[1:]) ** -0.5
        elif id(p) in norm_params:
            value = 1.0 + 0.05 * noise
        else:
            value = 0.02 * noise
        p.copy_(value.to(p.dtype))
        count += p.numel()
    return count


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(milliseconds, result) of one call of `fn`, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3, out


@contextlib.contextmanager
def timed_calls(owner: Any, attr: str, device: torch.device,
                record: Callable[[float, tuple, dict], None]) -> Iterator[None]:
    """Inside, `owner.<attr>` (a bound method or module) is timed (`timed`) at every call and
    `record(ms, args, kwargs)` runs after each; the original is put back on the way out."""
    original = getattr(owner, attr)

    def timed_call(*args, **kwargs):
        ms, out = timed(lambda: original(*args, **kwargs), device)
        record(ms, args, kwargs)
        return out

    setattr(owner, attr, timed_call)
    try:
        yield
    finally:
        setattr(owner, attr, original)


class ChunkGrouper:
    """Groups a rollout's timed model calls, labelled by their timestep, into AR chunks as they come: `passes`
    denoise calls (at `steps`, when given), then the commit call at the context timestep (within 0.5); each
    chunk is written to `writer` as soon as its commit call closes it. Any other structure raises.
    `outside_ms`: per chunk, its wall time minus its model calls (chunk 0 also holds what came before its
    first call, from the grouper's creation)."""

    def __init__(self, writer: Any, passes: int, context: float, total: int, steps: list[float] | None = None):
        self.writer, self.passes, self.context, self.total, self.steps = writer, passes, context, total, steps
        self.pending: list[tuple[float, float | None]] = []
        self.index = 0
        self.outside_ms: list[float] = []
        self.chunk_end = time.perf_counter()

    def add(self, ms: float, t: float | None) -> None:
        self.pending.append((ms, t))
        commit = t is not None and abs(t - self.context) < 0.5
        if not commit and len(self.pending) <= self.passes:
            return
        labels = [t for _, t in self.pending]
        if not commit or len(self.pending) != self.passes + 1 or (self.steps is not None and any(
                a is None or abs(a - b) >= 0.5 for a, b in zip(labels, self.steps))):
            raise RuntimeError(f"chunk {self.index} made model calls at t = {labels}; the adapter expects "
                               f"{self.passes} denoise calls{f' at t = {self.steps}' if self.steps else ''} then one "
                               f"commit call at t = {self.context} (upstream's loop differs from the adapter's commit)")
        self._write(commit=True)

    def _write(self, commit: bool) -> None:
        times = [ms for ms, _ in self.pending]
        self.writer.chunk(self.index, sum(times[:-1] if commit else times), times[-1] if commit else 0.0, times)
        now = time.perf_counter()
        self.outside_ms.append((now - self.chunk_end) * 1e3 - sum(times))
        self.pending, self.index, self.chunk_end = [], self.index + 1, now

    def finish(self, last_commit_optional: bool = False) -> None:
        """After the loop returned: every chunk of the job must be closed. With `last_commit_optional`, a last
        chunk of `passes` calls without its commit call is written with commit_ms 0 (and noted)."""
        if last_commit_optional and len(self.pending) == self.passes and self.index == self.total - 1:
            self._write(commit=False)
            self.writer.note(f"upstream skipped the commit pass after the last chunk ({self.index - 1}): its "
                             f"commit_ms is recorded as 0")
        if self.pending or self.index != self.total:
            raise RuntimeError(f"upstream's loop ran {self.index} full chunks (+{len(self.pending)} calls); the job "
                               f"has {self.total}")


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
