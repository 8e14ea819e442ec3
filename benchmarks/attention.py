"""Chunk-vs-cache self-attention: every backend at the recipes' shapes, as TFLOP/s, in one call.

The shapes are what one GPU runs in one layer of a denoising pass (B = 1, head_dim 128, bf16), read from
the recipes' `RolloutPlan` and its Ulysses split:

    self-forcing  4680 queries (3 frames x 1560) vs [own chunk ; 0, 3, ..., 18 cached frames], 12 heads
    lingbot-fast  4524 queries (3 frames x 1508) vs [own chunk ; 15 cached frames], 40 heads
    ulysses-P     both recipes at the 6th chunk with P = 2/4/8 devices: each GPU's padded heads and
                  padded tokens (timed on this one GPU)

The cache is a stacked [layers, 1, T, N, d] buffer (T = the recipe's buffer, 4 layers, layer 2 read) and
its valid length a run-time value, as the model calls it. Backends, each through
`wm_jax.kernels.attention.attention_with_cache` unless noted. A timed sample is 10 calls dispatched back
to back and one device sync (host dispatch hides under device time, as in the model's program and in
torch's CUDA-event timing); the figure is the median sample / 10:

    pallas                 ours (wm_jax.kernels.chunk_attention), one kernel, cache read in place;
    pallas[tiles major]    the same kernel launched with a head's query tiles side by side
    cudnn                  jax cuDNN: chunk attention + paged attention over the stacked cache + LSE merge
    tokamax                tokamax mosaic on [own ; cache slice] (when tokamax is installed)
    xla                    the float32-softmax XLA reference (slice + concatenate)
    torch-cudnn            PyTorch `scaled_dot_product_attention` (cuDNN backend) on contiguous exact-length
                           K/V, 10 calls between two CUDA events: the peers' kernel (needs torch with CUDA)

FLOPs = 4·N·L·(L + valid)·d. Every JAX backend is checked against a float32 reference on two heads
(relative L2 < 2e-2, every query row finite). A backend that fails at a shape is recorded with its
error and the run goes on.

    python benchmarks/attention.py --json $OUT/attention.json --plot $OUT/attention.png
    python benchmarks/attention.py --plot_from benchmarks/results/attention_h200_2026-11-30.json --plot docs/attention_h200.png
    JAX_PLATFORMS=cpu python benchmarks/attention.py --small        # smoke test (xla only)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from wm_jax.bench.common import format_table, rel_l2, run_metadata, time_calls, torch_cudnn_sdpa_ms, write_json  # noqa: E402
from wm_jax.kernels import chunk_attention  # noqa: E402
from wm_jax.kernels.attention import attention_reference, attention_with_cache, resolve  # noqa: E402
from wm_jax.parallel.mesh import make_mesh  # noqa: E402
from wm_jax.streaming.components import model_config  # noqa: E402
from wm_jax.streaming.plan import RolloutPlan  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402

RECIPES = {"self-forcing": "self-forcing-wan2.1-t2v-1.3b", "lingbot-fast": "lingbot-world-fast"}
CACHE_LAYERS, READ_LAYER = 4, 2
STEADY_CHUNK = 5  # the 6th chunk: FlashDreams' figure
REPEATS = 10  # calls dispatched back to back per timed sample: device time, not host dispatch (as torch's events)
PALLAS_CONFIGS = {"pallas": chunk_attention.KernelConfig(),
                  "pallas[tiles major]": chunk_attention.KernelConfig(heads_major=False)}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    recipe: str
    devices: int
    heads: int  # per GPU, padded
    queries: int  # per GPU: chunk frames x padded tokens per frame
    cached: int  # valid cache tokens
    buffer: int  # cache buffer tokens per layer
    head_dim: int

    @property
    def flops(self) -> float:
        return 4.0 * self.heads * self.queries * (self.queries + self.cached) * self.head_dim


def recipe_shapes(short: str, devices: int, chunks: list[int]) -> list[Shape]:
    recipe = load_recipe(RECIPES[short]).replace(total_blocks=7)
    cfg = model_config(recipe)
    plan = RolloutPlan.for_recipe(recipe, cfg, make_mesh(1))
    # the plan's Ulysses split taken for `devices` (one GPU here times one device's share)
    plan = dataclasses.replace(plan, shards=dataclasses.replace(plan.shards, num_shards=devices))
    out = []
    for chunk in chunks:
        cached = int(plan.cache.valid_tokens(chunk * plan.chunk_frames))
        frames = (plan.chunk_tokens + cached) // plan.tokens_per_frame
        out.append(Shape(f"{short} {frames}f" + (f" /{devices}" if devices > 1 else ""), short, devices,
                         plan.shards.heads_per_shard, plan.attention_tokens_per_device, cached,
                         plan.cache.buffer_tokens, cfg.head_dim))
    return out


def all_shapes(small: bool) -> list[Shape]:
    if small:
        return [Shape("small", "small", 1, 2, 150, 200, 256, 64)]
    shapes = recipe_shapes("self-forcing", 1, list(range(7)))
    shapes += recipe_shapes("lingbot-fast", 1, [STEADY_CHUNK])
    for devices in (2, 4, 8):
        for short in RECIPES:
            shapes += recipe_shapes(short, devices, [STEADY_CHUNK])
    return shapes


def jax_backends() -> dict:
    """name -> fn(q, k, v, cache_k, cache_v, layer, valid) for every backend this machine can run."""
    out = {}
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:
        for name, config in PALLAS_CONFIGS.items():
            out[name] = lambda *a, config=config: chunk_attention.chunk_cache_attention(*a, config=config)
        out["cudnn"] = lambda *a: attention_with_cache(*a, implementation="cudnn")
        try:
            import tokamax  # noqa: F401
            out["tokamax"] = lambda *a: attention_with_cache(*a, implementation="tokamax")
        except ImportError as e:
            print(f"tokamax not importable ({e}); its column stays empty")
    out["xla"] = lambda *a: attention_with_cache(*a, implementation="xla")
    return out


def measure(shape: Shape, backends: dict, iters: int, budget_s: float) -> dict:
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    keys = iter(jax.random.split(jax.random.key(hash(shape.name) % 2**31), 8))
    own = (1, shape.queries, shape.heads, shape.head_dim)
    cache = (CACHE_LAYERS, 1, shape.buffer, shape.heads, shape.head_dim)
    q, k, v = (jax.random.normal(next(keys), own, dtype) for _ in range(3))
    cache_k, cache_v = (jax.random.normal(next(keys), cache, dtype) for _ in range(2))
    layer, valid = jnp.int32(READ_LAYER), jnp.int32(shape.cached)
    # float32 reference on two heads: [own ; valid cache] of the read layer
    f32 = lambda x: x[..., :2, :].astype(jnp.float32)
    keys_all = jnp.concatenate([f32(k), f32(cache_k[READ_LAYER, :, :shape.cached])], axis=1)
    values_all = jnp.concatenate([f32(v), f32(cache_v[READ_LAYER, :, :shape.cached])], axis=1)
    reference = jax.jit(attention_reference)(f32(q), keys_all, values_all)
    row = {**dataclasses.asdict(shape), "flops": shape.flops, "backends": {}}
    for name, fn in backends.items():
        try:
            call = jax.jit(fn)
            out = jax.block_until_ready(call(q, k, v, cache_k, cache_v, layer, valid))
            error = rel_l2(out[..., :2, :].astype(jnp.float32), reference)
            finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
            stats = time_calls(lambda i: [call(q, k, v, cache_k, cache_v, layer, valid) for _ in range(REPEATS)],
                               jax.block_until_ready, warmup=1, iters=iters, budget_s=budget_s)
            ms = stats["median_ms"] / REPEATS
            row["backends"][name] = {"ms": ms, "tflops": shape.flops / (ms * 1e-3) / 1e12, "rel_l2": error,
                                     "finite": finite, "ok": finite and error < 2e-2}
        except Exception as e:  # noqa: BLE001  (record and go on: one backend failing must not end the run)
            row["backends"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
        jax.clear_caches()
    ms = torch_cudnn_sdpa_ms(shape.queries, shape.queries + shape.cached, shape.heads, shape.head_dim, REPEATS,
                             iters, warmup=3)
    if ms is not None:
        ms /= REPEATS
        row["backends"]["torch-cudnn"] = {"ms": ms, "tflops": shape.flops / (ms * 1e-3) / 1e12}
    return row


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    labels = {"pallas": "ours (pallas)", "torch-cudnn": "torch cuDNN SDPA", "cudnn": "JAX cuDNN (paged + merge)",
              "tokamax": "tokamax mosaic", "xla": "XLA reference"}
    names = [n for n in labels if any(n in r["backends"] and "tflops" in r["backends"][n] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(rows)), 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [r["backends"].get(name, {}).get("tflops", 0.0) for r in rows]
        ax.bar([x + (i - (len(names) - 1) / 2) * width for x in range(len(rows))], values, width,
               label=labels[name])
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s (bf16)")
    ax.set_title(f"chunk-vs-cache attention, {report['device_kind']}, {report['date'][:10]}")
    top = max(b.get("tflops", 0.0) for r in rows for b in r["backends"].values())
    ax.set_ylim(0, top * 1.18)  # room for the legend above the bars
    ax.legend(fontsize=8, ncol=len(names), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="one tiny shape (CPU smoke test)")
    p.add_argument("--only", default=None, help="comma-separated backend names to run (default: all)")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--budget_s", type=float, default=1.5, help="timing budget per backend and shape")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write the TFLOP/s bar chart here (PNG, needs matplotlib)")
    p.add_argument("--plot_from", default=None, help="plot this JSON instead of measuring")
    args = p.parse_args(argv)
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), args.plot)
        return
    backends = jax_backends()
    if args.only:
        backends = {k: v for k, v in backends.items() if k in args.only.split(",")}
    print("auto resolves to", resolve(jnp.zeros((1, 8, 1, 128), jnp.bfloat16), cache_k=jnp.zeros((1, 1, 8, 1, 128),
                                                                                               jnp.bfloat16)))
    rows = []
    for shape in all_shapes(args.small):
        rows.append(measure(shape, backends, args.iters, args.budget_s))
        write_json(args.json, {**run_metadata(), "benchmark": "attention", "partial": True, "rows": rows})
        print(shape.name, {k: round(v.get("tflops", -1), 1) for k, v in rows[-1]["backends"].items()}, flush=True)
    names = list(backends) + (["torch-cudnn"] if any("torch-cudnn" in r["backends"] for r in rows) else [])
    cell = lambda b: (f"{b['tflops']:.0f}" + ("" if b.get("ok", True) else " BAD")) if "tflops" in b else "err"
    table = [[r["name"], f"{r['heads']}", f"{r['queries']}x{r['queries'] + r['cached']}"]
             + [cell(r["backends"][n]) if n in r["backends"] else "-" for n in names] for r in rows]
    print(format_table(["shape", "heads", "q x keys", *[f"{n} TF/s" for n in names]], table))
    report = {**run_metadata(), "benchmark": "attention", "cache_layers": CACHE_LAYERS, "read_layer": READ_LAYER,
              "pallas_configs": {k: dataclasses.asdict(v) for k, v in PALLAS_CONFIGS.items()}, "rows": rows}
    write_json(args.json, report)
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    main()
