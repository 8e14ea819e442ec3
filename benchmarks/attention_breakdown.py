"""Where a denoise pass spends its time: chunk-vs-cache self-attention variants against the whole forward.

One pass of the Self-Forcing 1.3B DiT at 480x832 (L = 4680 chunk tokens) against a fixed cache buffer of
the global cache buffer of `--total_blocks` chunks, `--context_frames` of them valid. Times, each the median of repeated calls
with the device synchronised:

    forward            one full model forward of the chunk against the cache (what each denoise pass runs)
    attn_layers        the self-attention of all layers as the model runs it: lax.scan over the layers,
                       `attention_with_cache` (cuDNN: the chunk + paged attention over the stacked cache,
                       merged by log-sum-exp), checked against the XLA reference (bf16, rel. L2 < 1e-2)
    attn_layers_concat the previous path: each layer's cache slice concatenated after the chunk's keys
    attn_resident      30 cuDNN calls on one pre-built [chunk ; cache] array (no per-layer copy at all)
    attn_exact         30 cuDNN calls on exactly the valid keys (no padding)
    torch_sdpa_cudnn   the same 30 calls in PyTorch (`scaled_dot_product_attention`, cuDNN backend), same
                       run, CUDA-event timed: the comparison for the kernel (needs torch with CUDA)
    gemm               an 8192^3 bf16 matmul (the device's matmul ceiling)

    python benchmarks/attention_breakdown.py --json $OUT/attention_breakdown.json
    JAX_PLATFORMS=cpu python benchmarks/attention_breakdown.py --small    # smoke test
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from wm_jax.bench.common import (fill_random_params, format_table, matmul_ceiling, run_metadata,  # noqa: E402
                                 single_chunk_plan, time_calls, torch_cudnn_sdpa_ms, write_json)
from wm_jax.kernels.attention import attention, attention_with_cache  # noqa: E402
from wm_jax.models.config import preset  # noqa: E402
from wm_jax.models.wan import WanModel  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context_frames", default="6,12,15,18", help="comma list of valid cached latent frames")
    p.add_argument("--total_blocks", type=int, default=7, help="cache buffer of a global cache over this many chunks")
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke test")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cfg = preset("self-forcing-1.3b").replace(param_dtype="bfloat16")
    height, width = 480, 832
    if args.small:
        cfg = cfg.replace(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)
        height, width = 64, 96
    plan = single_chunk_plan(cfg, height, width, total_blocks=args.total_blocks)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    tpf = plan.tokens_per_frame
    L, layers, heads, hd = plan.chunk_tokens, cfg.num_layers, cfg.num_heads, cfg.head_dim
    buffer_tokens = plan.cache.buffer_tokens
    keys = iter(jax.random.split(jax.random.key(0), 16))
    rand = lambda shape: jax.random.normal(next(keys), shape, dtype)
    q, k, v = rand((1, L, heads, hd)), rand((1, L, heads, hd)), rand((1, L, heads, hd))
    cache_k, cache_v = rand((layers, 1, buffer_tokens, heads, hd)), rand((layers, 1, buffer_tokens, heads, hd))

    model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0), compute_dtype=dtype))
    fill_random_params(model, seed=0)
    graphdef, params = nnx.split(model)
    cross_kv = jax.jit(lambda p, c: nnx.merge(graphdef, p).cross_kv(nnx.merge(graphdef, p).embed_text(c)))(
        params, rand((1, 32, cfg.text_dim)))
    x = rand(plan.chunk_shape)

    def model_forward(params, x, cache_k, cache_v, valid):
        model = nnx.merge(graphdef, params)
        return model.forward_with_cross_kv(x, jnp.full(plan.chunk_shape[:2], 500.0), cross_kv, frame_offset=valid // tpf,
                                           cache=(cache_k, cache_v, valid))[0]

    forward = jax.jit(model_forward)

    def scanned(per_layer):
        """jitted: sum over layers of per_layer(q, k, v, cache_k, cache_v, layer, valid), under lax.scan."""
        @jax.jit
        def run(q, k, v, cache_k, cache_v, valid):
            def body(acc, layer):
                return acc + per_layer(q, k, v, cache_k, cache_v, layer, valid).astype(jnp.float32), None
            return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(layers, dtype=jnp.int32))[0]
        return run

    def concat_layer(q, k, v, cache_k, cache_v, layer, valid):
        keys_ = jnp.concatenate([k, cache_k[layer]], axis=1)
        values = jnp.concatenate([v, cache_v[layer]], axis=1)
        return attention(q, keys_, values, kv_valid_length=jnp.full((1,), q.shape[1], jnp.int32) + valid)

    @jax.jit
    def resident(q, kv_k, kv_v, valid):
        def body(i, acc):
            return acc + attention(q, kv_k, kv_v, kv_valid_length=jnp.full((1,), valid, jnp.int32)).astype(jnp.float32)
        return jax.lax.fori_loop(0, layers, body, jnp.zeros(q.shape, jnp.float32))

    @jax.jit
    def exact(q, kv_k, kv_v):
        def body(i, acc):
            return acc + attention(q, kv_k, kv_v).astype(jnp.float32)
        return jax.lax.fori_loop(0, layers, body, jnp.zeros(q.shape, jnp.float32))

    variants = {"attn_layers": scanned(attention_with_cache), "attn_layers_concat": scanned(concat_layer)}
    sync = jax.block_until_ready
    rows, results = [], {"context": {}}
    for context in [int(c) for c in args.context_frames.split(",")]:
        valid = jnp.asarray(context * tpf, jnp.int32)
        kv_tokens = L + context * tpf
        attn_flops = layers * 4 * L * kv_tokens * cfg.dim
        timings = {"forward": time_calls(lambda i: forward(params, x, cache_k, cache_v, valid), sync,
                                         warmup=2, iters=args.iters)["median_ms"]}
        outputs = {name: fn(q, k, v, cache_k, cache_v, valid) for name, fn in variants.items()}
        a, b = outputs["attn_layers"], outputs["attn_layers_concat"]
        error = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert error < 1e-2, f"attn_layers vs attn_layers_concat: relative L2 {error:.2e}"
        for name, fn in variants.items():
            timings[name] = time_calls(lambda i: fn(q, k, v, cache_k, cache_v, valid), sync, warmup=2,
                                       iters=args.iters)["median_ms"]
        joined_k = jnp.concatenate([k, cache_k[0]], axis=1)
        joined_v = jnp.concatenate([v, cache_v[0]], axis=1)
        timings["attn_resident"] = time_calls(lambda i: resident(q, joined_k, joined_v, kv_tokens), sync, warmup=2,
                                              iters=args.iters)["median_ms"]
        timings["attn_exact"] = time_calls(lambda i: exact(q, joined_k[:, :kv_tokens], joined_v[:, :kv_tokens]),
                                           sync, warmup=2, iters=args.iters)["median_ms"]
        torch_ms = torch_cudnn_sdpa_ms(L, kv_tokens, heads, hd, layers, args.iters)
        if torch_ms is not None:
            timings["torch_sdpa_cudnn"] = torch_ms
        results["context"][context] = {"ms": timings, "attention_tflop": attn_flops / 1e12,
                                       "attn_layers_vs_concat_rel_l2": error}
        for name, ms in timings.items():
            tflops = f"{attn_flops / ms / 1e9:.0f}" if name.startswith("attn") else ""
            rows.append([context, name, f"{ms:.2f}", tflops])

    ceiling = matmul_ceiling(jnp.bfloat16, size=512 if args.small else 8192)  # as wm-jax bench measures it
    results["gemm"] = ceiling
    rows.append(["-", "gemm", f"{ceiling['ms']:.2f}", f"{ceiling['tflops']:.0f}"])
    print(format_table(["context frames", "what", "ms", "attn TF/s"], rows))
    if args.json:
        write_json(args.json, {**run_metadata(), "benchmark": "attention_breakdown", "chunk_tokens": L,
                               "total_blocks": args.total_blocks, **results})


if __name__ == "__main__":
    main()
