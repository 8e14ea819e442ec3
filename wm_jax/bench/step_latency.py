"""Per-AR-step latency of a causal rollout (FlashDreams' method): denoise / commit / decode per chunk.

Builds the recipe's DiT with random weights drawn on the device in bf16 (abstract module from
`nnx.eval_shape`, then one parameter at a time: no fp32 copy of the model), compiles the two streaming
programs of `wm_jax.streaming.step.StreamingStep` ahead of time, and runs `--total_blocks` chunks:

    denoise (all k passes, cache read-only) -> commit (t = 0 pass, cache donated) -> decode (each decoder)

each phase timed on the host with the device synchronised on both sides (`jax.block_until_ready`).
Like FlashDreams, the first `--warmup_chunks` (2) chunks are dropped and the median is taken over the
rest; the 6th chunk's denoise time is reported separately (FlashDreams' model-page number: 4 denoise
passes at chunk index 5). FlashDreams' `total_ms_wo_finalize` = encode + diffuse + decode; their
H100 Self-Forcing breakdown splits it as DiT 344 + commit 74 + TAEHV 7 = 425 ms, so compare
`denoise` with their DiT figure and `denoise + commit` with their total minus decode.

Model FLOP utilisation counts the matmul FLOPs (2 per multiply-add) of one forward of a chunk of
L = 3·(H/16)·(W/16) tokens against V valid cached tokens, D = dim, F = ffn_dim, Lc = text_len (512):

    per layer   2·L·4D²        self-attention q, k, v, o projections
              + 2·L·2D²        cross-attention q, o (cross K/V are computed once per prompt)
              + 2·L·2DF        feed-forward
              + 2·L·4D²        LingBot camera injector (fc1, fc2, scale, shift), camera models only
              + 4·L·(L+V)·D    self-attention scores and values over [chunk ; valid cache]
              + 4·L·Lc·D       cross-attention over the text tokens
    once        2·L·(4·C_in)·D + 2·L·D·(4·C_out)   patch embedding and head
              + 2·L·(4·C_cam·D + 2D²)              camera embedding (camera models)

denoise FLOPs = k forwards, commit = 1 forward (both at the chunk's V); utilisation = FLOPs / time /
`--peak_tflops` (bf16 dense; 989 = H100 SXM datasheet; the H100 here measured ~800 on a large GEMM).

With `--num_devices N` the step runs Ulysses over N devices (the engine's `RolloutPlan` and sharding
table); the weights are drawn directly in their sharding, memory is reported per device, and on GPUs
the 6th chunk's denoise is also traced once (`jax.profiler`, untimed) for the kernel time per category
on GPU 0, the all_to_all collectives included. Utilisation is against N x `--peak_tflops`.

GPU runs (exact commands; nothing to carry besides the repo):

    # Self-Forcing 1.3B, 480x832, 7 blocks, TAEHV and Wan VAE decoders (H100)
    python benchmarks/step_latency.py --json $OUT/step_sf.json
    # LingBot-World Fast (14B + camera, 464x832, 1 GPU: 37 GB weights + 27 GB cache: use nvidia-h200)
    python benchmarks/step_latency.py --slug lingbot-world-fast --json $OUT/step_lingbot.json
    # 1 and 2 GPUs (nvidia-h200-x2), as in README
    python benchmarks/step_latency.py --total_blocks 7 --decoder taehv --slug lingbot-world-fast --num_devices 2 \
        --json $OUT/step_lingbot_2gpu.json

CPU smoke test: `JAX_PLATFORMS=cpu python benchmarks/step_latency.py --small [--slug lingbot-world-fast]`
(add `XLA_FLAGS=--xla_force_host_platform_device_count=2` and `--num_devices 2` for the mesh)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # grow on demand: 14B + cache needs > 75 %

import argparse  # noqa: E402
import collections  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from _common import (block, device_memory, fill_random_params, format_table, gpu_kernel_events,  # noqa: E402
                     kernel_category, kernel_time_by_category, run_metadata, tree_bytes, write_json)
from wm_jax.io.video import frames_to_uint8  # noqa: E402
from wm_jax.kernels import ATTENTION_IMPLEMENTATIONS  # noqa: E402
from wm_jax.models.config import WanConfig, preset  # noqa: E402
from wm_jax.models.wan import WanModel  # noqa: E402
from wm_jax.parallel.mesh import SEQUENCE_AXIS, local_replica, make_mesh, put_replicated  # noqa: E402
from wm_jax.parallel.sharding import ShardingRules, flat_param_shardings  # noqa: E402
from wm_jax.streaming.decoders import on_mesh  # noqa: E402
from wm_jax.streaming.plan import RolloutPlan  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402
from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise  # noqa: E402

REFERENCE = {
    "self-forcing-wan2.1-t2v-1.3b": "FlashDreams H100: 344 ms denoise (4 passes, 6th chunk), 74 ms commit; "
                                    "floor from FLOPs ~ 190 ms",
    "lingbot-world-fast": "FlashDreams H100, 4 GPUs Ulysses: 629 ms DiT (4 steps, 6th chunk), 783 ms total; "
                          "--num_devices sets this run's GPUs",
}
VALUE_RANGES = {"taehv": (0.0, 1.0), "wan_vae": (-1.0, 1.0)}  # wm_jax.streaming.decoders.Decoder.value_range
SMALL_MODEL = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)


def forward_flops(cfg: WanConfig, chunk_tokens: int, valid_cache_tokens: int) -> float:
    """Matmul FLOPs of one forward; see the module docstring for the formula."""
    d, f, L, V = cfg.dim, cfg.ffn_dim, chunk_tokens, valid_cache_tokens
    per_layer = 2 * L * 4 * d * d + 2 * L * 2 * d * d + 2 * L * 2 * d * f
    if cfg.camera_channels:
        per_layer += 2 * L * 4 * d * d
    per_layer += 4 * L * (L + V) * d + 4 * L * cfg.text_len * d
    if cfg.image_dim:
        per_layer += 4 * L * 257 * d
    top = 2 * L * cfg.patch_features * d + 2 * L * d * 4 * cfg.out_dim
    if cfg.camera_channels:
        top += 2 * L * (cfg.camera_channels * 4 * d + 2 * d * d)
    return float(cfg.num_layers * per_layer + top)


# ---------------------------------------------------------------------------------------------------
# Decoders (random weights on the device).
# ---------------------------------------------------------------------------------------------------


class TimedDecoder:
    def __init__(self, name, init_state, step):
        self.name, self.init_state, self.step = name, init_state, step


def make_taehv(small: bool, dtype, seed: int, mesh) -> TimedDecoder:
    """The engine's TAEHV decoder (`wm_jax.streaming.decoders.taehv_decoder`: `decode_chunk` under one jax.jit,
    parameters as arguments, state donated) with random weights drawn on the device, replicated on the mesh."""
    from wm_jax.models import taehv as T
    from wm_jax.streaming.decoders import taehv_decoder

    cfg = T.TAEHVConfig(param_dtype=jnp.dtype(dtype).name, decoder_n_f=(32, 16, 8, 8) if small else (256, 128, 64, 64))
    module = nnx.eval_shape(lambda: T.TAEHVDecoder(cfg, compute_dtype=dtype))
    fill_random_params(module, seed=seed, stacked_prefixes=())
    dec = taehv_decoder(on_mesh(module, mesh))
    return TimedDecoder("taehv", lambda b, h, w: put_replicated(dec.init_state(b, h, w), mesh), dec.step)


def make_wan_vae(vae_dim: int, dtype, seed: int, mesh):
    from wm_jax.models import wan_vae as W
    from wm_jax.streaming.decoders import wan_vae_decoder

    name = jnp.dtype(dtype).name
    vae = nnx.eval_shape(lambda: W.WanVAE(W.WanVAEConfig(dim=vae_dim, param_dtype=name, compute_dtype=name),
                                          rngs=nnx.Rngs(0)))
    fill_random_params(vae, seed=seed, stacked_prefixes=())
    vae = on_mesh(vae, mesh)
    vae.compute_dtype = dtype
    dec = wan_vae_decoder(vae)  # engine's: jit_decode_chunk(vae, donate_cache=True)
    return TimedDecoder("wan_vae", lambda b, h, w: put_replicated(dec.init_state(b, h, w), mesh), dec.step), vae


# ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slug", default="self-forcing-wan2.1-t2v-1.3b")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the recipe's; --small 64)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the recipe's; --small 96)")
    p.add_argument("--total_blocks", type=int, default=None, help="chunks per rollout (default 7; --small 4)")
    p.add_argument("--rollouts", type=int, default=1, help="repeat the whole rollout (fresh cache) for more samples")
    p.add_argument("--warmup_chunks", type=int, default=2, help="leading chunks of each rollout left out")
    p.add_argument("--decoder", default="taehv,wan_vae", help="comma list of taehv | wan_vae | none")
    p.add_argument("--encode", action="store_true",
                   help="I2V recipes: make y with the Wan VAE encoder every chunk (timed as encode) instead of random")
    p.add_argument("--attention", default="auto", choices=ATTENTION_IMPLEMENTATIONS,
                   help="attention backend (wm_jax.kernels.attention; auto = the fastest measured on this GPU kind)")
    p.add_argument("--dtype", default=None, help="weights/compute dtype (default bfloat16; --small float32)")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak for utilisation (H100 SXM 989)")
    p.add_argument("--text_tokens", type=int, default=32, help="real prompt tokens (padded to text_len)")
    p.add_argument("--vae_dim", type=int, default=None, help="Wan VAE width (default 96; --small 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_devices", type=int, default=1,
                   help="devices of the Ulysses mesh (tokens and heads split over them); weights replicated")
    p.add_argument("--context_heads", choices=["replicated", "sharded"], default="replicated",
                   help="cross-attention K/V: whole on every device (no exchange) or head-sharded (two more "
                        "all_to_alls per layer, 1/P of their memory); the sharding table's context_heads")
    p.add_argument("--profile_chunk", type=int, default=None,
                   help="trace this chunk's denoise (all passes) with jax.profiler: GPU kernel ms per category on "
                        "device 0, incl. the all_to_all collectives (default: the 6th chunk on GPUs, none on CPU)")
    p.add_argument("--small", action="store_true",
                   help="tiny model (dim 256, 2 heads, 2 layers), 64x96, fp32 (CPU smoke test)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    recipe = load_recipe(args.slug)
    small = args.small
    defaults = dict(height=64 if small else recipe.pixel_height, width=96 if small else recipe.pixel_width,
                    total_blocks=4 if small else 7, dtype="float32" if small else "bfloat16",
                    vae_dim=8 if small else 96)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.decoders = [d for d in args.decoder.split(",") if d and d != "none"]
    bad = set(args.decoders) - {"taehv", "wan_vae"}
    if bad:
        p.error(f"unknown decoders {sorted(bad)}")
    return args, recipe


def model_config(recipe, args) -> WanConfig:
    if args.small:
        base = preset(recipe.model) if isinstance(recipe.model, str) else WanConfig(**recipe.model)
        cfg = WanConfig(**SMALL_MODEL, in_dim=base.in_dim, out_dim=base.out_dim,
                        camera_channels=base.camera_channels, fp32_modulation=base.fp32_modulation)
    else:
        cfg = preset(recipe.model) if isinstance(recipe.model, str) else WanConfig(**recipe.model)
    return cfg.replace(param_dtype=args.dtype)


def main(argv=None):
    args, recipe = parse_args(argv)
    meta = run_metadata()
    dtype = jnp.dtype(args.dtype)
    cfg = model_config(recipe, args)
    mesh = make_mesh(args.num_devices)
    rules = ShardingRules(context_heads=SEQUENCE_AXIS if args.context_heads == "sharded" else None)
    plan = RolloutPlan.for_recipe(recipe.replace(pixel_height=args.height, pixel_width=args.width,
                                                 total_blocks=args.total_blocks), cfg, mesh, rules)
    lat_h, lat_w, chunk, tpf, chunk_tokens = (plan.latent_height, plan.latent_width, plan.chunk_frames,
                                              plan.tokens_per_frame, plan.chunk_tokens)
    layout = plan.cache
    schedule = recipe.step_schedule()
    k = schedule.num_steps
    i2v = plan.condition_channels > 0
    if args.profile_chunk is None and jax.default_backend() == "gpu":
        args.profile_chunk = min(5, args.total_blocks - 1)
    print(f"{args.slug}: {cfg.num_layers} layers, dim {cfg.dim}, {args.height}x{args.width} "
          f"({chunk_tokens} tokens/chunk, {plan.chunk_tokens_per_device} per device), cache sink "
          f"{layout.sink_frames} + ring {layout.ring_frames} frames, {k} passes, {args.dtype}, "
          f"{plan.num_devices} x {meta['device_kind']}", flush=True)

    # ---- build: weights on the devices in their sharding, one parameter at a time -----------------
    start = time.perf_counter()
    model = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0), compute_dtype=dtype,
                                            attention_impl=args.attention))
    n_params = fill_random_params(model, seed=args.seed,
                                  shardings=flat_param_shardings(nnx.state(model), plan.rules, mesh))
    step = StreamingStep(model, schedule, plan)
    weight_bytes = tree_bytes(step.params)
    build_s = time.perf_counter() - start
    mem_after_weights = device_memory()

    key = jax.random.key(args.seed + 1)
    text = jax.random.normal(jax.random.fold_in(key, 0), (1, args.text_tokens, cfg.text_dim), jnp.float32)
    start = time.perf_counter()
    cross = block(step.cross_kv(text))
    cross_kv_s = time.perf_counter() - start
    cache = step.init_cache()
    cache_bytes = tree_bytes(cache)

    noise_fn = jax.jit(lambda key, i: chunk_noise(key, i, k, plan.chunk_shape, jnp.float32),
                       out_shardings=step.replicated)
    cond_sets = []
    for s in range(2):  # random conditioning, rotated between chunks
        ks = jax.random.split(jax.random.fold_in(key, 100 + s), 2)
        y = jax.random.normal(ks[0], plan.condition_shape, jnp.float32) if i2v else None
        cam = (jax.random.normal(ks[1], (*plan.chunk_shape[:4], cfg.camera_channels), jnp.float32)
               if cfg.camera_channels else None)
        cond_sets.append(step.whole(ChunkInputs(y=y, camera=cam)))

    decoders = []
    encoder_vae = None
    for i, name in enumerate(args.decoders):
        if name == "taehv":
            decoders.append(make_taehv(args.small, dtype, seed=args.seed + 10 + i, mesh=mesh))
        else:
            dec, encoder_vae = make_wan_vae(args.vae_dim, dtype, seed=args.seed + 10 + i, mesh=mesh)
            decoders.append(dec)
    if args.encode and i2v and encoder_vae is None:
        _, encoder_vae = make_wan_vae(args.vae_dim, dtype, seed=args.seed + 20, mesh=mesh)

    # ---- compile ahead of time, like the engine -------------------------------------------------
    noise0 = block(noise_fn(key, 0))
    start = time.perf_counter()
    denoise = step.denoise.lower(step.params, cache, cross, noise0, cond_sets[0]).compile()
    denoise_compile_s = time.perf_counter() - start
    start = time.perf_counter()
    x0_spec = jax.ShapeDtypeStruct(noise0.shape[1:], jnp.float32, sharding=step.replicated)
    commit = step.commit.lower(step.params, cache, cross, x0_spec, cond_sets[0]).compile()
    commit_compile_s = time.perf_counter() - start
    print(f"built {n_params / 1e9:.3f} B params in {build_s:.1f} s; compile denoise {denoise_compile_s:.1f} s, "
          f"commit {commit_compile_s:.1f} s", flush=True)

    # ---- rollouts --------------------------------------------------------------------------------
    image = step.whole(jax.random.uniform(jax.random.fold_in(key, 7), (1, args.height, args.width, 3), jnp.float32,
                                          -1.0, 1.0))
    chunks = []
    profile = None
    decoder_first_call_s = {d.name: [] for d in decoders}
    finite = True
    for r in range(args.rollouts):
        cache = step.init_cache()
        states = {d.name: d.init_state(1, lat_h, lat_w) for d in decoders}
        enc_cache = (put_replicated(encoder_vae.init_encoder_cache(1, args.height, args.width), mesh)
                     if (args.encode and i2v) else None)
        for i in range(args.total_blocks):
            valid_tokens = int(plan.cache.valid_tokens(i * chunk))  # the cache the chunk attends to
            valid = valid_tokens // tpf
            noise = block(noise_fn(key, i))
            inputs = cond_sets[i % len(cond_sets)]
            encode_ms = 0.0
            if enc_cache is not None:
                from wm_jax.models.wan_vae import i2v_condition_chunk

                t = time.perf_counter()
                y, enc_cache = block(i2v_condition_chunk(encoder_vae, enc_cache, chunk,
                                                         image=image if i == 0 else None))
                encode_ms = (time.perf_counter() - t) * 1e3
                inputs = ChunkInputs(y=y, camera=inputs.camera)
            if r == 0 and i == args.profile_chunk:  # an extra, untimed denoise of this chunk under the profiler
                profile = profile_denoise(lambda: denoise(step.params, cache, cross, noise, inputs), k)
            t0 = time.perf_counter()
            x0 = block(denoise(step.params, cache, cross, noise, inputs))
            t1 = time.perf_counter()
            cache = block(commit(step.params, cache, cross, x0, inputs))
            t2 = time.perf_counter()
            decode_ms, d2h_ms = {}, None
            z = x0.astype(dtype)
            for d in decoders:
                t = time.perf_counter()
                frames, states[d.name] = d.step(z, states[d.name])
                block(frames)
                decode_ms[d.name] = (time.perf_counter() - t) * 1e3
                if r == 0 and i < 2:
                    decoder_first_call_s[d.name].append(decode_ms[d.name] / 1e3)
                if d2h_ms is None:  # the engine's uint8 conversion on the device + host copy, outside decode here
                    t = time.perf_counter()
                    frames_to_uint8(local_replica(frames), VALUE_RANGES[d.name])  # raises on NaN/inf
                    d2h_ms = (time.perf_counter() - t) * 1e3
            finite &= bool(jnp.isfinite(x0).all())
            den_flops = k * forward_flops(cfg, chunk_tokens, valid_tokens)
            com_flops = forward_flops(cfg, chunk_tokens, valid_tokens)
            den_ms, com_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            rec = {"rollout": r, "autoregressive_index": i, "valid_cache_frames": valid, "encode_ms": encode_ms,
                   "denoise_ms": den_ms, "commit_ms": com_ms, "decode_ms": decode_ms, "d2h_uint8_frames_ms": d2h_ms,
                   "denoise_flops": den_flops, "commit_flops": com_flops,
                   "denoise_tflops_per_s": den_flops / (den_ms * 1e-3) / 1e12,
                   "commit_tflops_per_s": com_flops / (com_ms * 1e-3) / 1e12}
            rec["denoise_mfu"] = rec["denoise_tflops_per_s"] / (args.peak_tflops * plan.num_devices)
            rec["commit_mfu"] = rec["commit_tflops_per_s"] / (args.peak_tflops * plan.num_devices)
            rec["total_ms"] = {n: encode_ms + den_ms + com_ms + v for n, v in decode_ms.items()} or \
                {"no_decoder": encode_ms + den_ms + com_ms}
            chunks.append(rec)
            print(f"  rollout {r} chunk {i}: cache {valid:2d} fr, denoise {den_ms:8.2f} ms "
                  f"({rec['denoise_mfu'] * 100:4.1f} % MFU), commit {com_ms:7.2f} ms, decode "
                  + ", ".join(f"{n} {v:.2f}" for n, v in decode_ms.items())
                  + (f", encode {encode_ms:.2f}" if enc_cache is not None else ""), flush=True)

    # ---- summary ---------------------------------------------------------------------------------
    steady = [c for c in chunks if c["autoregressive_index"] >= args.warmup_chunks]
    med = lambda xs: statistics.median(xs) if xs else None
    summary = {
        "chunks_in_median": len(steady),
        "denoise_ms": med([c["denoise_ms"] for c in steady]),
        "commit_ms": med([c["commit_ms"] for c in steady]),
        "encode_ms": med([c["encode_ms"] for c in steady]),
        "decode_ms": {d.name: med([c["decode_ms"][d.name] for c in steady]) for d in decoders},
        "total_ms": {n: med([c["total_ms"][n] for c in steady]) for n in (steady[0]["total_ms"] if steady else {})},
        "denoise_plus_commit_ms": med([c["denoise_ms"] + c["commit_ms"] for c in steady]),
        "denoise_mfu": med([c["denoise_mfu"] for c in steady]),
        "commit_mfu": med([c["commit_mfu"] for c in steady]),
        "d2h_uint8_frames_ms": med([c["d2h_uint8_frames_ms"] for c in steady if c["d2h_uint8_frames_ms"] is not None]),
    }
    sixth = [c for c in chunks if c["autoregressive_index"] == 5]
    summary["chunk6_denoise_ms"] = med([c["denoise_ms"] for c in sixth])
    summary["chunk6_commit_ms"] = med([c["commit_ms"] for c in sixth])
    ref_chunk = sixth[0] if sixth else (chunks[-1] if chunks else None)
    if ref_chunk:
        peak_flops_per_s = args.peak_tflops * 1e12 * plan.num_devices
        summary["floor_denoise_ms_at_peak"] = ref_chunk["denoise_flops"] / peak_flops_per_s * 1e3
        summary["floor_commit_ms_at_peak"] = ref_chunk["commit_flops"] / peak_flops_per_s * 1e3
        summary["floor_chunk_index"] = ref_chunk["autoregressive_index"]
    memory = device_memory()
    memory_per_device = [device_memory(d) for d in mesh.devices.flat]
    report = {**meta, "benchmark": "step_latency", "slug": args.slug, "height": args.height, "width": args.width,
              "total_blocks": args.total_blocks, "rollouts": args.rollouts, "warmup_chunks": args.warmup_chunks,
              "dtype": args.dtype, "attention": args.attention, "decoders": args.decoders, "small": args.small,
              "num_devices": plan.num_devices, "context_heads": args.context_heads, "plan": plan.describe(),
              "profile": profile,
              "memory_per_device": memory_per_device,
              "model_config": cfg.to_dict(), "num_params": n_params, "weight_bytes": weight_bytes,
              "kv_cache_bytes": cache_bytes,
              "cache_layout": {"tokens_per_frame": tpf, "sink_frames": layout.sink_frames,
                               "ring_frames": layout.ring_frames, "buffer_frames": layout.buffer_frames},
              "schedule": {"t": schedule.t.tolist(), "sigma_x0": schedule.sigma_x0.tolist(),
                           "sigma_next": schedule.sigma_next.tolist()},
              "build_s": build_s, "cross_kv_compile_plus_run_s": cross_kv_s,
              "compile_s": {"denoise": denoise_compile_s, "commit": commit_compile_s,
                            "decoder_first_two_calls_s": decoder_first_call_s},
              "device_memory_after_weights": mem_after_weights, "device_memory_end": memory,
              "peak_tflops": args.peak_tflops, "all_finite": finite, "summary": summary, "chunks": chunks,
              "reference": REFERENCE.get(args.slug), "args": {k: v for k, v in vars(args).items()}}
    write_json(args.json, report)

    print()
    rows = [[c["rollout"], c["autoregressive_index"], c["valid_cache_frames"], c["denoise_ms"], c["commit_ms"],
             *[c["decode_ms"][d.name] for d in decoders], c["denoise_tflops_per_s"], c["denoise_mfu"] * 100]
            for c in chunks]
    print(format_table(["roll", "chunk", "cache fr", "denoise ms", "commit ms", *[f"{d.name} ms" for d in decoders],
                        "den TFLOP/s", "den MFU %"], rows))
    print()
    pk = memory.get("peak_bytes_in_use_gib") if memory else None
    s = summary
    lines = [["denoise ms (all passes)", s["denoise_ms"], s["chunk6_denoise_ms"]],
             ["commit ms", s["commit_ms"], s["chunk6_commit_ms"]],
             ["denoise + commit ms", s["denoise_plus_commit_ms"], None]]
    for d in decoders:
        lines.append([f"decode {d.name} ms", s["decode_ms"][d.name], None])
    for n, v in s["total_ms"].items():
        lines.append([f"total ({n}) ms", v, None])
    if args.encode and i2v:
        lines.append(["encode ms", s["encode_ms"], None])
    lines += [["denoise MFU %", s["denoise_mfu"] * 100 if s["denoise_mfu"] else None, None],
              ["floor denoise ms (FLOPs/peak)", s.get("floor_denoise_ms_at_peak"), None],
              ["frames to host as uint8 ms", s["d2h_uint8_frames_ms"], None]]
    print(f"{args.slug} {args.height}x{args.width}, {args.dtype}, {meta['device_kind']}: median of chunks "
          f">= {args.warmup_chunks} ({s['chunks_in_median']} chunks); compile denoise {denoise_compile_s:.1f} s + "
          f"commit {commit_compile_s:.1f} s; peak device memory "
          + (f"{pk:.2f} GiB" if pk is not None else "n/a") + ("" if finite else "; NON-FINITE OUTPUT"))
    print(format_table(["phase", "median", "6th chunk"], lines))
    if profile:
        print(f"profile of chunk {args.profile_chunk}'s denoise on GPU 0 ({k} passes; kernel ms per pass): "
              + ", ".join(f"{c} {ms:.1f}" for c, ms in sorted(profile["ms_per_pass"].items(), key=lambda kv: -kv[1]))
              + f"; all_to_all share {100 * profile['collective_share']:.1f} %")
    if memory_per_device and all(memory_per_device):
        print("peak memory per device GiB: " + ", ".join(f"{m['peak_bytes_in_use_gib']:.2f}" for m in memory_per_device))
    if REFERENCE.get(args.slug):
        print(f"reference: {REFERENCE[args.slug]}")


def profile_denoise(call, passes: int) -> dict:
    """GPU kernel time of one `call()` (a whole denoise) on device 0 under jax.profiler, per category and pass;
    `collective_share`: the collectives' (Ulysses all_to_alls, output all_gather) share of the kernel time."""
    import tempfile

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            block(call())
        events = gpu_kernel_events(trace_dir, device=0)
    per_pass = kernel_time_by_category(events, repeats=passes)
    per_kernel = collections.Counter()
    for e in events:
        per_kernel[e["name"]] += e["dur"] / 1e3 / passes
    total = sum(per_pass.values())
    return {"ms_per_pass": per_pass, "kernel_ms_per_pass": total,
            "collective_share": per_pass.get("collective", 0.0) / total if total else 0.0,
            "top_kernels_ms_per_pass": [[name[:120], kernel_category(name), ms] for name, ms in per_kernel.most_common(25)]}


if __name__ == "__main__":
    main()
