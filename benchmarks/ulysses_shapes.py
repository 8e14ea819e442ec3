"""Ulysses at 1, 2, 4 and 8 devices: each device's attention shape and the all_to_all bytes of one AR step.

Everything comes from the recipes' `RolloutPlan` (cache layout, tokens per frame) and its Ulysses split
(`SequenceShards`: padded tokens per frame, padded heads) taken for N devices: arithmetic only, so the
table holds for device counts no lent machine has. Per layer and forward, every device sends (N-1)/N of its share of two exchanges:
[q; k; v] (3 tensors) tokens -> heads, and the attention output heads -> tokens, each tensor being
B·F·S_pad·N_pad·d bf16 values over all devices. One AR step = k denoise passes + 1 commit.

    per device per step = (k + 1) · layers · 4 · (B·F·S_pad·N_pad·d·2 / N) · (N − 1) / N   bytes

With `--time` (GPU), each device's self-attention of one pass at the 6th chunk (its N_pad/N heads,
all chunk queries, [own chunk ; 15 cached frames] keys) is timed on ONE GPU through
`wm_jax.kernels.attention.attention_with_cache` (cuDNN paged), times the model's layers: what each
device spends in attention per pass, measured on one GPU for device counts that are not lent.

    JAX_PLATFORMS=cpu python benchmarks/ulysses_shapes.py
    python benchmarks/ulysses_shapes.py --time --json $OUT/ulysses_shapes.json     # one GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from wm_jax.bench.common import format_table, run_metadata, time_calls, write_json  # noqa: E402
from wm_jax.kernels.attention import attention_with_cache  # noqa: E402
from wm_jax.parallel.mesh import make_mesh  # noqa: E402
from wm_jax.streaming.components import model_config  # noqa: E402
from wm_jax.streaming.plan import RolloutPlan  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402

SLUGS = ("lingbot-world-fast", "lingbot-world-fast-taehv-window15-sink3", "self-forcing-wan2.1-t2v-1.3b")
CHUNK_INDEX = 5  # the 6th chunk, FlashDreams' figure
BYTES = 2  # bf16


def shapes(slug: str, num_devices: int, total_blocks: int) -> dict:
    """One device's share of an AR step of `slug` on `num_devices` devices: the recipe's plan (built on
    this machine's first device) with its token/head split taken for `num_devices`."""
    recipe = load_recipe(slug).replace(total_blocks=total_blocks)
    cfg = model_config(recipe)
    plan = RolloutPlan.for_recipe(recipe, cfg, make_mesh(1))
    shards, cache = dataclasses.replace(plan.shards, num_shards=num_devices), plan.cache
    valid = int(cache.valid_tokens(CHUNK_INDEX * plan.chunk_frames))
    tensor = plan.batch * plan.chunk_frames * shards.padded_tokens_per_frame * shards.padded_heads * cfg.head_dim
    per_forward = cfg.num_layers * 4 * tensor * BYTES / num_devices * (num_devices - 1) / num_devices
    passes = recipe.step_schedule().num_steps
    return {"slug": slug, "devices": num_devices, "pixels": f"{plan.pixel_height}x{plan.pixel_width}",
            "chunk_tokens": plan.chunk_tokens, "tokens_per_device": plan.chunk_frames * shards.tokens_per_shard,
            "heads": cfg.num_heads, "heads_per_device": shards.heads_per_shard,
            "padded_heads": shards.padded_heads - cfg.num_heads, "padded_tokens_per_frame": shards.padding,
            "queries": plan.chunk_tokens, "keys": plan.chunk_tokens + valid, "cached_frames": valid // plan.tokens_per_frame,
            "layers": cfg.num_layers, "head_dim": cfg.head_dim, "passes": passes,
            "all_to_all_gb_per_forward": per_forward / 1e9,
            "all_to_all_gb_per_step": (passes + 1) * per_forward / 1e9,
            "kv_cache_gib_per_device": 2 * cfg.num_layers * cache.buffer_tokens * shards.heads_per_shard * cfg.head_dim
            * BYTES / 2**30}


def time_attention(row: dict, iters: int) -> dict:
    """One device's self-attention of one pass (all layers) timed on this GPU: ms and TFLOP/s."""
    h, d, layers = row["heads_per_device"], row["head_dim"], row["layers"]
    q_len, cached = row["queries"], row["keys"] - row["queries"]
    page = 128
    buffer = -(-cached // page) * page
    keys = iter(jax.random.split(jax.random.key(0), 8))
    q, k, v = (jax.random.normal(next(keys), (1, q_len, h, d), jnp.bfloat16) for _ in range(3))
    cache_k, cache_v = (jax.random.normal(next(keys), (1, 1, buffer, h, d), jnp.bfloat16) for _ in range(2))
    fn = jax.jit(lambda q, k, v, ck, cv: attention_with_cache(q, k, v, ck, cv, jnp.int32(0), jnp.int32(cached)))
    stats = time_calls(lambda i: fn(q, k, v, cache_k, cache_v), jax.block_until_ready, warmup=3, iters=iters)
    flops = 4.0 * q_len * row["keys"] * h * d
    return {"attention_ms_per_pass": stats["median_ms"] * layers,
            "attention_tflops_per_s": flops / (stats["median_ms"] * 1e-3) / 1e12}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="1,2,4,8")
    p.add_argument("--total_blocks", type=int, default=7)
    p.add_argument("--time", action="store_true", help="time each device's attention on this (one) GPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    counts = [int(n) for n in args.devices.split(",")]
    rows = []
    for slug in SLUGS:
        for n in counts:
            row = shapes(slug, n, args.total_blocks)
            if args.time:
                row.update(time_attention(row, args.iters))
            rows.append(row)
    headers = ["recipe", "GPUs", "tokens/GPU", "heads/GPU (pad)", "q x k per GPU", "a2a GB/step/GPU", "KV GiB/GPU"]
    table = [[r["slug"], r["devices"], r["tokens_per_device"], f"{r['heads_per_device']} ({r['padded_heads']})",
              f"{r['queries']} x {r['keys']}", r["all_to_all_gb_per_step"], r["kv_cache_gib_per_device"]]
             for r in rows]
    if args.time:
        headers += ["attn ms/pass", "TFLOP/s"]
        for line, r in zip(table, rows):
            line += [r["attention_ms_per_pass"], r["attention_tflops_per_s"]]
    print(format_table(headers, table))
    write_json(args.json, {**run_metadata(), "benchmark": "ulysses_shapes", "chunk_index": CHUNK_INDEX,
                           "total_blocks": args.total_blocks, "rows": rows})


if __name__ == "__main__":
    main()
