"""One Wan DiT forward on the GPU: random bf16 weights made on the device, median latency.

Checks the cuDNN attention path against the XLA reference on the same weights (bf16), then times
a full forward of one 3-latent chunk (no KV cache) per attention implementation. A first data point
for the streaming work; the per-step benchmark with the cache comes with the streaming engine.

    python benchmarks/dit_forward.py --preset self-forcing-1.3b --height 480 --width 832 --frames 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wm_jax.bench.common import single_chunk_plan  # noqa: E402
from wm_jax.models.config import preset  # noqa: E402
from wm_jax.models.wan import WanModel  # noqa: E402


def forward_flops(cfg, tokens: int, text_len: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add): projections, FFN, attention."""
    d, f = cfg.dim, cfg.ffn_dim
    per_layer = 2 * tokens * (4 * d * d + 2 * d * d + 2 * d * f)  # self qkvo, cross q/o, ffn
    per_layer += 2 * text_len * 2 * d * d  # cross k/v
    per_layer += 4 * tokens * tokens * d + 4 * tokens * text_len * d  # self + cross attention
    if cfg.camera_channels:
        per_layer += 2 * tokens * 4 * d * d
    return cfg.num_layers * per_layer


def median_ms(fn, *args, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="self-forcing-1.3b")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=3, help="latent frames per forward")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    cfg = preset(args.preset).replace(param_dtype="bfloat16")
    plan = single_chunk_plan(cfg, args.height, args.width, chunk_frames=args.frames)
    tokens = plan.chunk_tokens
    key = jax.random.key(0)
    x = jax.random.normal(key, plan.chunk_shape, jnp.bfloat16)
    y = jax.random.normal(key, plan.condition_shape, jnp.bfloat16) if plan.condition_channels else None
    context = jax.random.normal(key, (1, 64, cfg.text_dim), jnp.bfloat16) * 0.1
    t = jnp.array([750.0])

    results = {}
    outputs = {}
    for impl in ("cudnn", "xla"):
        model = WanModel(cfg, rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16, attention_impl=impl)
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, x, t, context, y):
            return nnx.merge(graphdef, state)(x, t, context, y=y)

        start = time.perf_counter()
        outputs[impl] = np.asarray(jax.block_until_ready(forward(state, x, t, context, y)))
        compile_s = time.perf_counter() - start
        ms = median_ms(forward, state, x, t, context, y)
        tflops = forward_flops(cfg, tokens, cfg.text_len) / (ms * 1e-3) / 1e12
        results[impl] = {"median_ms": ms, "compile_plus_first_s": compile_s, "tflops_per_s": tflops}
        del model, state
    diff = np.linalg.norm(outputs["cudnn"] - outputs["xla"]) / np.linalg.norm(outputs["xla"])

    device = jax.devices()[0].device_kind
    print(f"{args.preset} {args.height}x{args.width}, {args.frames} latent frames = {tokens} tokens, bf16, {device}")
    print(f"{'attention':<8} {'median ms':>10} {'TFLOP/s':>9} {'compile+1st s':>14}")
    for impl, r in results.items():
        print(f"{impl:<8} {r['median_ms']:>10.2f} {r['tflops_per_s']:>9.1f} {r['compile_plus_first_s']:>14.1f}")
    print(f"cudnn vs xla output relative L2: {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": date.today().isoformat(), "device": device, "jax": jax.__version__, "preset": args.preset,
            "height": args.height, "width": args.width, "frames": args.frames, "tokens": tokens,
            "results": results, "cudnn_vs_xla_rel_l2": float(diff), "command": " ".join(sys.argv)}, indent=2))


if __name__ == "__main__":
    main()
