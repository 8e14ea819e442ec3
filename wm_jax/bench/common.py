"""Shared helpers of the benchmarks (`wm-jax bench` and benchmarks/*.py): run metadata, timing, random device
weights, tables, JSON.

Import this AFTER setting XLA_* environment variables (the scripts do it on their first lines).
"""

from __future__ import annotations

import collections
import functools
import glob
import gzip
import importlib.metadata
import json
import re
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ENV_KEYS = ("JAX_PLATFORMS", "JAX_DEFAULT_MATMUL_PRECISION", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
            "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR", "CUDA_VISIBLE_DEVICES",
            "TORCHINDUCTOR_CACHE_DIR")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata() -> dict[str, Any]:
    """Date, device, library versions and the exact command line (with the XLA/JAX env vars set)."""
    device = jax.devices()[0]
    env = {k: os.environ[k] for k in ENV_KEYS if k in os.environ}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "env": env,
        "command": f"{prefix} {command}".strip(),
    }


def summarize(times_ms: Sequence[float]) -> dict[str, Any]:
    t = sorted(times_ms)
    n = len(t)
    pick = lambda q: t[min(n - 1, max(0, int(round(q * (n - 1)))))]
    return {"median_ms": statistics.median(t), "min_ms": t[0], "p10_ms": pick(0.1), "p90_ms": pick(0.9),
            "iters": n, "times_ms": [round(x, 4) for x in times_ms]}


def time_calls(call: Callable[[int], Any], sync: Callable[[Any], None], *, warmup: int, iters: int,
               min_iters: int = 5, budget_s: float | None = None) -> dict[str, Any]:
    """Median wall time of `call(i)` with the device synchronised before and after each call.

    `call(i)` runs iteration i (it may rotate inputs / carry state) and returns what to wait for;
    `sync(out)` blocks until the device finished it. After `warmup` untimed calls, up to `iters` timed
    ones; with `budget_s`, stops early (after at least `min_iters`) once the timed calls took that long.
    """
    for i in range(warmup):
        sync(call(i))
    times = []
    spent = 0.0
    for i in range(iters):
        start = time.perf_counter()
        sync(call(warmup + i))
        dt = time.perf_counter() - start
        times.append(dt * 1e3)
        spent += dt
        if budget_s is not None and spent > budget_s and len(times) >= min_iters:
            break
    return summarize(times)


def matmul_ceiling(dtype, size: int | None = None, calls: int = 10, repeats: int = 5) -> dict[str, Any]:
    """The dense matmul rate this device reaches in `dtype` now: a size³ GEMM (8192 on GPUs, 512 on the CPU),
    `calls` back to back between two host syncs, the best of `repeats` (TFLOP/s)."""
    size = size or (8192 if jax.default_backend() == "gpu" else 512)
    key = jax.random.key(0)
    a = jax.random.normal(key, (size, size), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (size, size), dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(dtype))
    block(matmul(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = matmul(a, b)
        block(out)
        best = min(best, (time.perf_counter() - start) / calls)
    del a, b, out
    return {"size": size, "dtype": jnp.dtype(dtype).name, "ms": best * 1e3,
            "tflops": 2 * size ** 3 / best / 1e12}


def torch_cudnn_sdpa_ms(q_tokens: int, kv_tokens: int, heads: int, head_dim: int, calls: int, iters: int,
                        warmup: int = 2) -> float | None:
    """Median ms of `calls` back-to-back PyTorch `scaled_dot_product_attention` calls (cuDNN backend, bf16,
    BNTH, random inputs) between two CUDA events; None without torch + CUDA. The peers' attention kernel."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    make = lambda t: torch.randn(1, heads, t, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = make(q_tokens), make(kv_tokens), make(kv_tokens)
    times = []
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        for i in range(iters + warmup):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
            end.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    del q, k, v
    torch.cuda.empty_cache()
    return statistics.median(times)


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def single_chunk_plan(cfg, height: int, width: int, *, chunk_frames: int = 3, total_blocks: int = 1):
    """The rollout plan (one device, global cache of `total_blocks` chunks) that sizes a benchmark's
    chunk, cache buffer and tokens: benchmarks read shapes from it and never derive them."""
    from wm_jax.parallel.mesh import make_mesh
    from wm_jax.streaming.plan import RolloutPlan

    return RolloutPlan.create(cfg, make_mesh(1), pixel_height=height, pixel_width=width, chunk_frames=chunk_frames,
                              total_blocks=total_blocks, sink_frames=None, ring_frames=0)


# ---------------------------------------------------------------------------------------------------
# Random weights made on the device, one parameter at a time, in each parameter's own dtype.
# ---------------------------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _draw(key, shape: tuple[int, ...], dtype: str, kind: str, scale: float):
    x = jax.random.normal(key, shape, jnp.dtype(dtype))
    if kind == "scale":
        return (1.0 + 0.05 * x).astype(dtype)
    return (x * scale).astype(dtype)


_draw_jit = jax.jit(_draw, static_argnums=(1, 2, 3, 4))


@functools.cache
def _draw_sharded(sharding):
    return jax.jit(_draw, static_argnums=(1, 2, 3, 4), out_shardings=sharding)


def fill_random_params(module, seed: int = 0, stacked_prefixes: Sequence[str] = ("blocks",),
                       shardings: dict[str, Any] | None = None) -> int:
    """Replaces every `nnx.Param` of `module` (concrete or from `nnx.eval_shape`) with random values
    drawn directly on the devices in the parameter's own dtype (a bf16 model never has an fp32 copy),
    one parameter at a time: on the default device, or in `shardings[path]` (flat path -> sharding, e.g.
    `wm_jax.parallel.sharding.flat_param_shardings`; a replicated parameter is drawn on every device of
    its mesh, never copied from one). Kernels ~ N(0, 1/fan_in) (fan_in = product of all but the output axis, leaving out a
    leading layer axis for paths under `stacked_prefixes`); norm scales/gammas ~ 1 + 0.05·N; biases,
    modulation tables and other vectors ~ 0.02·N (never zeros). Returns the number of parameters.
    """
    from flax import nnx

    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    key = jax.random.key(seed)
    new, count = [], 0
    for i, (path, var) in enumerate(flat):
        value = var.get_value()
        shape, dtype = tuple(value.shape), jnp.dtype(value.dtype).name
        name = _path_str(path)
        leaf = str(path[-1])
        if leaf == "kernel" and len(shape) >= 2:
            dims = shape[1:] if name.split("/")[0] in stacked_prefixes else shape
            fan_in = max(1, math.prod(dims[:-1]))
            kind, scale = "kernel", fan_in ** -0.5
        elif leaf in ("scale", "gamma"):
            kind, scale = "scale", 1.0
        else:
            kind, scale = "small", 0.02
        draw = _draw_jit if shardings is None else _draw_sharded(shardings[name])
        new.append((path, var.replace(draw(jax.random.fold_in(key, i), shape, dtype, kind, scale))))
        count += math.prod(shape)
    nnx.update(module, nnx.from_flat_state(new))
    return count


def param_bytes(module) -> int:
    from flax import nnx

    leaves = jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves))


def tree_bytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def device_memory(device=None) -> dict[str, float] | None:
    """bytes_in_use / peak_bytes_in_use / bytes_limit of a device (default: the first) in GiB (None where
    unsupported, e.g. CPU)."""
    stats = (device or jax.devices()[0]).memory_stats()
    if not stats:
        return None
    return {k + "_gib": stats[k] / 2**30 for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


# ---------------------------------------------------------------------------------------------------
# GPU kernel time from a jax.profiler trace.
# ---------------------------------------------------------------------------------------------------

KERNEL_CATEGORIES = (  # first match wins
    ("collective", re.compile(r"nccl|all[-_]?to[-_]?all|all[-_]?gather|all[-_]?reduce|send|recv", re.I)),
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|mosaic|chunk_attention", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|sm90_|cublas|nvjet|triton_gemm|dot", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy|concatenate|dynamic[-_]slice|dynamic[-_]update", re.I)),
    ("fusion", re.compile(r"fusion|reduce|loop_|input_|elementwise|transpose|convert", re.I)),
)


def kernel_category(name: str) -> str:
    return next((label for label, pattern in KERNEL_CATEGORIES if pattern.search(name)), "other")


def gpu_kernel_events(trace_dir: str, device: int | None = None) -> list[dict]:
    """X events on the GPU stream lines of the Perfetto trace written by jax.profiler (only GPU `device`'s
    when given: its process line is named '/device:GPU:<device>')."""
    path = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)[0]
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    wanted = (lambda name: "GPU" in name) if device is None else \
        (lambda name: re.search(rf"GPU:{device}(\D|$)", name) is not None)
    kernels = [e for e in events if e.get("ph") == "X" and wanted(processes.get(e["pid"], ""))
               and "stream" in threads.get((e["pid"], e["tid"]), "").lower()]
    if not kernels:
        lines = sorted({(processes.get(pid, "?"), name) for (pid, _), name in threads.items()})
        raise RuntimeError(f"no GPU kernel events in the trace; its lines: {lines}")
    return kernels


def kernel_time_by_category(events: list[dict], repeats: int = 1) -> dict[str, float]:
    """Milliseconds of kernel time per category, divided by `repeats`."""
    per_category = collections.Counter()
    for e in events:
        per_category[kernel_category(e["name"])] += e["dur"] / 1e3 / repeats
    return dict(per_category)


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered (unoptimised) program, or None."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - backend without cost analysis
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ---------------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "nan"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_json(path: str | None, report: dict) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    tmp.rename(out)
    print(f"wrote {out}")


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)
