"""Torch-side helpers every peer adapter uses: cuDNN SDPA forced, random weights made on the device, model
calls timed with the device synchronised, grouping of timed calls into AR steps.

Imported only in the peer's child process (it imports torch); nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


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


class TimedCalls:
    """Replaces `owner.<attr>` (a bound method or module) with a wrapper that synchronises the device before
    and after every call and records (milliseconds, label) where `label(args, kwargs)` names the call
    (e.g. its timestep). `restore()` puts the original back."""

    def __init__(self, owner: Any, attr: str, device: torch.device,
                 label: Callable[[tuple, dict], Any] = lambda args, kwargs: None):
        self.owner, self.attr, self.device, self.label = owner, attr, device, label
        self.original = getattr(owner, attr)
        self.calls: list[tuple[float, Any]] = []
        original = self.original

        def timed(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = original(*args, **kwargs)
            sync(device)
            self.calls.append(((time.perf_counter() - start) * 1e3, label(args, kwargs)))
            return out

        setattr(owner, attr, timed)

    def restore(self) -> None:
        setattr(self.owner, self.attr, self.original)


def group_steps(calls: list[float], passes_per_step: int) -> list[tuple[float, float, list[float]]]:
    """Splits a rollout's model-call times (in call order: per AR step `passes_per_step - 1` denoise passes,
    then the commit pass) into (denoise_ms, commit_ms, pass_ms) per step; a trailing partial step is left out."""
    steps = []
    for start in range(0, len(calls) - passes_per_step + 1, passes_per_step):
        step = calls[start:start + passes_per_step]
        steps.append((sum(step[:-1]), step[-1], list(step)))
    return steps


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
