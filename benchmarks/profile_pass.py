"""Kernel-level profile of one denoise pass: where the GPU time of a chunk-vs-cache forward goes.

Traces `--passes` forwards of the Self-Forcing 1.3B DiT (480x832 chunk, `--context_frames` valid cached
frames in the global cache buffer of `--total_blocks` chunks) with `jax.profiler` (Perfetto trace, no TensorBoard needed) and
sums the device time of every GPU kernel per category:

    attention   cuDNN fused attention (self and cross)
    matmul      cuBLAS / CUTLASS / Triton GEMMs (projections, FFN)
    fusion      XLA's elementwise / reduction fusions (norms, modulation, RoPE, GELU, residuals)
    copy        memcpy / copy kernels, dynamic-slice and concatenate materialisations

Prints the categories and the most expensive kernels per pass; `--json` keeps them.

    python benchmarks/profile_pass.py --json $OUT/profile_pass.json
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from wm_jax.bench.common import (fill_random_params, format_table, gpu_kernel_events, kernel_category,  # noqa: E402
                     run_metadata, single_chunk_plan, write_json)
from wm_jax.models.config import preset  # noqa: E402
from wm_jax.models.wan import WanModel  # noqa: E402

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context_frames", type=int, default=15, help="valid cached latent frames (6th chunk: 15)")
    p.add_argument("--total_blocks", type=int, default=7, help="cache buffer of a global cache over this many chunks")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cfg = preset("self-forcing-1.3b").replace(param_dtype="bfloat16")
    plan, dtype = single_chunk_plan(cfg, 480, 832, total_blocks=args.total_blocks), jnp.bfloat16
    tpf, buffer_tokens = plan.tokens_per_frame, plan.cache.buffer_tokens
    shape = (cfg.num_layers, 1, buffer_tokens, cfg.num_heads, cfg.head_dim)
    keys = iter(jax.random.split(jax.random.key(0), 8))
    cache_k, cache_v = (jax.random.normal(next(keys), shape, dtype) for _ in range(2))
    model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0), compute_dtype=dtype))
    fill_random_params(model, seed=0)
    graphdef, params = nnx.split(model)
    text = jax.random.normal(next(keys), (1, 32, cfg.text_dim), dtype)
    cross_kv = jax.jit(lambda p, c: (lambda m: m.cross_kv(m.embed_text(c)))(nnx.merge(graphdef, p)))(params, text)
    x = jax.random.normal(next(keys), plan.chunk_shape, dtype)
    valid = jnp.asarray(args.context_frames * tpf, jnp.int32)

    @jax.jit
    def forward(params, x, cache_k, cache_v, valid):
        model = nnx.merge(graphdef, params)
        return model.forward_with_cross_kv(x, jnp.full(plan.chunk_shape[:2], 500.0), cross_kv, frame_offset=valid // tpf,
                                           cache=(cache_k, cache_v, valid))[0]

    run = lambda: forward(params, x, cache_k, cache_v, valid)
    for _ in range(3):
        jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.passes):
                jax.block_until_ready(run())
        events = gpu_kernel_events(trace_dir)

    per_name, per_category = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for e in events:
        per_name[e["name"]] += e["dur"] / 1e3 / args.passes
        calls[e["name"]] += 1
        per_category[kernel_category(e["name"])] += e["dur"] / 1e3 / args.passes
    total = sum(per_category.values())
    print(format_table(["category", "ms per pass", "share %"],
                       [[c, f"{ms:.2f}", f"{100 * ms / total:.1f}"] for c, ms in per_category.most_common()]
                       + [["total (kernels)", f"{total:.2f}", "100.0"]]))
    print()
    print(format_table(["kernel", "category", "calls/pass", "ms per pass"],
                       [[n[:90], kernel_category(n), f"{calls[n] / args.passes:.0f}", f"{ms:.3f}"]
                        for n, ms in per_name.most_common(args.top)]))
    if args.json:
        write_json(args.json, {**run_metadata(), "benchmark": "profile_pass", "context_frames": args.context_frames,
                               "total_blocks": args.total_blocks, "ms_per_pass_by_category": dict(per_category),
                               "kernels": [{"name": n, "category": kernel_category(n), "calls_per_pass": calls[n] / args.passes,
                                            "ms_per_pass": ms} for n, ms in per_name.most_common()]})


if __name__ == "__main__":
    main()
