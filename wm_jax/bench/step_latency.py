"""Per-AR-step latency of a causal rollout, measured the way FlashDreams does, with peers in the same call.

Ours: the recipe's DiT with random weights drawn on the devices in bf16 (abstract module from
`nnx.eval_shape`, then one parameter at a time, in its sharding: no float32 copy of the model), the two
streaming programs of `wm_jax.streaming.step.StreamingStep` compiled ahead of time, then `total_blocks`
chunks of

    denoise (all k passes, cache read-only) -> commit (t = 0 pass, cache donated) -> decode (each decoder)

each phase timed on the host with the device synchronised on both sides. As FlashDreams, the first
`warmup_chunks` (2) chunks are left out and the median is taken over the rest; the 6th chunk's denoise
is reported too (FlashDreams' model pages: 4 denoise passes at chunk index 5). End to end per step is
encode + denoise + commit + decode with the recipe's decoder; frames per second end to end are the video
frames of a steady chunk over that time.

Utilisation counts the matmul FLOPs (2 per multiply-add) of one forward of a chunk of L tokens against V
valid cached tokens, D = dim, F = ffn_dim, Lc = text_len (512):

    per layer   2·L·4D²        self-attention q, k, v, o projections
              + 2·L·2D²        cross-attention q, o (cross K/V are computed once per prompt)
              + 2·L·2DF        feed-forward
              + 2·L·4D²        LingBot camera injector (fc1, fc2, scale, shift), camera models only
              + 4·L·(L+V)·D    self-attention scores and values over [chunk ; valid cache]
              + 4·L·Lc·D       cross-attention over the text tokens
    once        2·L·(4·C_in)·D + 2·L·D·(4·C_out)   patch embedding and head
              + 2·L·(4·C_cam·D + 2D²)              camera embedding (camera models)

(denoise = k forwards, commit = 1) against the bf16 matmul ceiling measured in the same call (a large
square GEMM on one device, `matmul_ceiling`), never a datasheet figure.

Peers (`wm_jax.bench.peers`) run first, each in a child process on the same GPUs with our shapes and
random weights of the same sizes, cuDNN SDPA forced; a forward peer (diffusers-wan) is compared with our
bidirectional forward of the same token count, on the same weights as our rollout.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wm_jax.bench.common import (block, device_memory, fill_random_params, gpu_kernel_events, kernel_category,
                                 kernel_time_by_category, matmul_ceiling, run_metadata, time_calls, tree_bytes,
                                 write_json)
from wm_jax.bench.peers import PEERS, Checkout, check_checkout, check_fits, run_peer
from wm_jax.bench.peers.job import PeerJob
from wm_jax.errors import OptionError
from wm_jax.io.video import frames_to_uint8
from wm_jax.kernels import ATTENTION_IMPLEMENTATIONS
from wm_jax.models.config import WanConfig, preset
from wm_jax.models.wan import ExpertPair, WanModel
from wm_jax.parallel.mesh import SEQUENCE_AXIS, local_replica, make_mesh, put_replicated
from wm_jax.parallel.sharding import ShardingRules, flat_param_shardings
from wm_jax.streaming.decoders import on_mesh
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.recipes import Recipe, load_recipe
from wm_jax.streaming.run import attention_backend
from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise

PUBLISHED = {  # FlashDreams' model pages (SPEC section 9): DiT ms, 4 denoise passes, 6th chunk; other hardware
    "self-forcing-wan2.1-t2v-1.3b": {"hardware": "H100, 1 GPU", "denoise_ms": 344.0, "commit_ms": 74.0},
    "lingbot-world-fast": {"hardware": "H100, 4 GPUs Ulysses", "denoise_ms": 629.0},
}
VALUE_RANGES = {"taehv": (0.0, 1.0), "wan_vae": (-1.0, 1.0)}  # wm_jax.streaming.decoders.Decoder.value_range
SMALL_MODEL = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What `wm-jax bench` and benchmarks/step_latency.py measure (None: the recipe's value, or small's); the
    field names are the flags of both front ends.

    warmup_rollouts: untimed whole rollouts every runtime runs first, ours and each peer's (first-use costs:
    cuDNN plans per key length in eager torch, buffer allocation). peers: (name, checkout folder or None)
    pairs, run before ours (`rollouts` repeats ours only). attention: our backends, each timed in its own
    rollout and reported as its own column (default: the GPU's fastest, plus cuDNN, the peers' attention,
    when a peer runs). forward_frames: latent frames of the
    bidirectional forward compared with forward peers (default: the whole rollout, total_blocks · chunk).
    """

    slug: str = "self-forcing-wan2.1-t2v-1.3b"
    pixel_height: int | None = None
    pixel_width: int | None = None
    total_blocks: int | None = None
    rollouts: int = 1
    warmup_chunks: int = 2
    decoders: tuple[str, ...] | None = None
    encode: bool = False
    attention: tuple[str, ...] | None = None
    dtype: str | None = None
    text_tokens: int = 32
    vae_dim: int | None = None
    seed: int = 0
    num_devices: int = 1
    context_heads: str = "replicated"
    profile_chunk: int | None = None
    small: bool = False
    peers: tuple[tuple[str, str | None], ...] = ()
    peer_timeout: float = 1200.0
    forward_frames: int | None = None
    forward_iters: int = 5
    peer_compile: bool = True
    warmup_rollouts: int = 1
    json: str | None = None
    plot: str | None = None


def resolve(opts: BenchOptions) -> tuple[BenchOptions, Recipe]:
    """Checks the options (an `OptionError` names the first bad one) and fills those left None from the recipe
    (full size, bf16, 7 blocks, both decoders) or `small`; cheap, before anything is built."""
    recipe = load_recipe(opts.slug)
    small = opts.small
    defaults = dict(pixel_height=64 if small else recipe.pixel_height,
                    pixel_width=96 if small else recipe.pixel_width, total_blocks=4 if small else 7,
                    dtype="float32" if small else "bfloat16", vae_dim=8 if small else recipe.vae_config.get("dim", 96),
                    decoders=("taehv", "wan_vae"), attention=("auto", "cudnn") if opts.peers else ("auto",))
    opts = dataclasses.replace(opts, **{k: v for k, v in defaults.items() if getattr(opts, k) is None})
    if opts.forward_frames is None:
        opts = dataclasses.replace(opts, forward_frames=opts.total_blocks * recipe.chunk_frames)
    for name in ("total_blocks", "rollouts", "num_devices", "forward_frames", "forward_iters"):
        if getattr(opts, name) < 1:
            raise OptionError(name, f"{{{name}}} {getattr(opts, name)}: expected a positive integer")
    if opts.warmup_rollouts < 0:
        raise OptionError("warmup_rollouts", f"{{warmup_rollouts}} {opts.warmup_rollouts}: expected 0 or more")
    if not 0 <= opts.warmup_chunks < opts.total_blocks:
        raise OptionError("warmup_chunks", f"{{warmup_chunks}} {opts.warmup_chunks}: expected 0 .. {{total_blocks}} "
                                           f"- 1 ({opts.total_blocks - 1})")
    if opts.peer_timeout <= 0:
        raise OptionError("peer_timeout", f"{{peer_timeout}} {opts.peer_timeout}: expected seconds > 0")
    if bad := sorted(set(opts.decoders) - set(VALUE_RANGES)):
        raise OptionError("decoders", f"{{decoders}} {','.join(opts.decoders)}: {', '.join(bad)} unknown; expected "
                                      f"a comma list of {', '.join(VALUE_RANGES)}")
    if bad := sorted(set(opts.attention) - set(ATTENTION_IMPLEMENTATIONS)):
        raise OptionError("attention", f"{{attention}} {','.join(opts.attention)}: expected a comma list of "
                                       f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    return opts, recipe


def model_config(recipe: Recipe, opts: BenchOptions) -> WanConfig:
    base = preset(recipe.model) if isinstance(recipe.model, str) else WanConfig(**recipe.model)
    if opts.small:
        base = WanConfig(**SMALL_MODEL, in_dim=base.in_dim, out_dim=base.out_dim,
                         camera_channels=base.camera_channels, fp32_modulation=base.fp32_modulation)
    return base.replace(param_dtype=opts.dtype)


def forward_flops(cfg: WanConfig, chunk_tokens: int, valid_cache_tokens: int) -> float:
    """Matmul FLOPs of one forward of `chunk_tokens` queries over themselves and `valid_cache_tokens` cached
    tokens; see the module docstring for the formula."""
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


@dataclasses.dataclass
class TimedDecoder:
    name: str
    init_state: Callable
    step: Callable


def make_taehv(small: bool, dtype, seed: int, mesh) -> TimedDecoder:
    """The engine's TAEHV decoder (`wm_jax.streaming.decoders.taehv_decoder`) with random weights drawn on the
    device, replicated on the mesh."""
    from wm_jax.models import taehv as T
    from wm_jax.streaming.decoders import taehv_decoder

    cfg = T.TAEHVConfig(param_dtype=jnp.dtype(dtype).name, decoder_n_f=(32, 16, 8, 8) if small else (256, 128, 64, 64))
    module = nnx.eval_shape(lambda: T.TAEHVDecoder(cfg, compute_dtype=dtype))
    fill_random_params(module, seed=seed, stacked_prefixes=())
    dec = taehv_decoder(on_mesh(module, mesh))
    return TimedDecoder("taehv", lambda b, h, w: put_replicated(dec.init_state(b, h, w), mesh), dec.step)


def make_wan_vae(vae_dim: int, dtype, seed: int, mesh, config: dict | None = None):
    """The engine's Wan VAE decoder (cache donated) with random weights, `config` (the recipe's `vae_config`)
    at width `vae_dim`; also returns the VAE (its encoder)."""
    from wm_jax.models import wan_vae as W
    from wm_jax.streaming.decoders import wan_vae_decoder

    name = jnp.dtype(dtype).name
    fields = {**(config or {}), "dim": vae_dim, "param_dtype": name, "compute_dtype": name}
    vae = nnx.eval_shape(lambda: W.WanVAE(W.WanVAEConfig(**fields),
                                          rngs=nnx.Rngs(0)))
    fill_random_params(vae, seed=seed, stacked_prefixes=())
    vae = on_mesh(vae, mesh)
    vae.compute_dtype = dtype
    dec = wan_vae_decoder(vae)
    return TimedDecoder("wan_vae", lambda b, h, w: put_replicated(dec.init_state(b, h, w), mesh), dec.step), vae


# ---------------------------------------------------------------------------------------------------
# Peers.
# ---------------------------------------------------------------------------------------------------


def check_peers(opts: BenchOptions, cfg: WanConfig) -> dict[str, Checkout]:
    """Every requested peer's checkout, and that the peer runs this model; before anything heavy (raises
    PeerSetupError)."""
    checkouts = {name: check_checkout(name, upstream_dir) for name, upstream_dir in opts.peers}
    for name in checkouts:
        check_fits(name, cfg, opts.slug)
    return checkouts


def peer_job(name: str, checkout: Checkout, opts: BenchOptions, recipe: Recipe, cfg: WanConfig,
             plan: RolloutPlan) -> PeerJob:
    """Our shapes for a peer: the rollout plan's geometry and cache window, the recipe's pass count."""
    schedule = recipe.step_schedule()
    layout = plan.cache
    global_cache = layout.sink_frames + layout.ring_frames + plan.chunk_frames >= plan.latent_frames
    return PeerJob(
        peer=name, upstream_dir=checkout.path, model=cfg.to_dict(), pixel_height=plan.pixel_height,
        pixel_width=plan.pixel_width, latent_height=plan.latent_height, latent_width=plan.latent_width,
        latent_channels=plan.latent_channels, chunk_frames=plan.chunk_frames, tokens_per_frame=plan.tokens_per_frame,
        total_blocks=plan.total_blocks, timesteps=[float(t) for t in schedule.t], context_timestep=0.0,
        shift=float(recipe.shift), sink_frames=layout.sink_frames,
        ring_frames=None if global_cache else layout.ring_frames, text_tokens=opts.text_tokens, dtype=opts.dtype,
        seed=opts.seed, device="cuda" if jax.default_backend() == "gpu" else "cpu",
        forward_frames=opts.forward_frames, forward_iters=opts.forward_iters, compile=opts.peer_compile,
        warmup_rollouts=opts.warmup_rollouts)


def summarize_chunks(chunks: list[dict], warmup_chunks: int) -> dict[str, Any]:
    """FlashDreams' figures of a list of per-chunk records: medians over chunks >= warmup_chunks, 6th chunk."""
    steady = [c for c in chunks if c["autoregressive_index"] >= warmup_chunks]
    sixth = [c for c in chunks if c["autoregressive_index"] == 5]
    med = lambda key, rows: statistics.median([c[key] for c in rows]) if rows else None
    return {"chunks_in_median": len(steady), "denoise_ms": med("denoise_ms", steady),
            "commit_ms": med("commit_ms", steady),
            "denoise_plus_commit_ms": statistics.median([c["denoise_ms"] + c["commit_ms"] for c in steady])
            if steady else None,
            "chunk6_denoise_ms": med("denoise_ms", sixth), "chunk6_commit_ms": med("commit_ms", sixth)}


def run_peers(opts: BenchOptions, checkouts: dict[str, Checkout], recipe, cfg, plan, log) -> dict[str, dict]:
    results = {}
    for name, checkout in checkouts.items():
        job = peer_job(name, checkout, opts, recipe, cfg, plan)
        log(f"peer {name}: {PEERS[name].loop} from {checkout.path or 'the installed package'}")
        start = time.perf_counter()
        result = run_peer(job, timeout_s=opts.peer_timeout, log=log)
        result["wall_s"] = time.perf_counter() - start
        result.update(kind=PEERS[name].kind, repo=PEERS[name].repo, loop=PEERS[name].loop,
                      upstream_dir=checkout.path, commit=checkout.commit, expected_commit=PEERS[name].commit,
                      checkout_warnings=list(checkout.warnings), job=dataclasses.asdict(job))
        if result.get("chunks"):
            result["summary"] = summarize_chunks(result["chunks"], opts.warmup_chunks)
        if result.get("forward"):
            result["forward_summary"] = {variant: {"median_ms": statistics.median(v["ms"]) if v["ms"] else None,
                                                   "calls": len(v["ms"]), "compile_s": v.get("compile_s")}
                                         for variant, v in result["forward"].items()}
        if result.get("error"):
            log(f"peer {name} stopped: {result['error']}")
        results[name] = result
    return results


# ---------------------------------------------------------------------------------------------------
# Ours.
# ---------------------------------------------------------------------------------------------------


def our_forward(step: StreamingStep, plan: RolloutPlan, cfg: WanConfig, opts: BenchOptions, text, log) -> dict:
    """Our bidirectional forward (no cache, full attention over `forward_frames` frames) on the rollout's
    weights, timed like the forward peers: 2 untimed calls, then `forward_iters` calls, device synchronised."""
    frames = opts.forward_frames
    shape = (1, frames, plan.latent_height, plan.latent_width, plan.latent_channels)
    key = jax.random.key(opts.seed + 3)
    x = jax.random.normal(key, shape, step.compute_dtype)
    y = (jax.random.normal(jax.random.fold_in(key, 1), shape[:4] + (plan.condition_channels,), step.compute_dtype)
         if plan.condition_channels else None)
    t = jnp.full((1,), 500, jnp.int32)

    @jax.jit
    def forward(params, x, t, text, y):
        return nnx.merge(step.graphdefs[0], step.per_expert(params)[0])(x, t, text, y=y)

    start = time.perf_counter()
    compiled = forward.lower(step.params, x, t, text, y).compile()
    compile_s = time.perf_counter() - start
    timing = time_calls(lambda i: compiled(step.params, x, t, text, y), block, warmup=2, iters=opts.forward_iters)
    tokens = frames * plan.tokens_per_frame
    flops = forward_flops(cfg, tokens, 0)
    median = timing["median_ms"]
    log(f"our bidirectional forward, {frames} frames ({tokens} tokens): {median:.1f} ms (compile {compile_s:.1f} s)")
    return {"frames": frames, "tokens": tokens, "ms": timing["times_ms"], "median_ms": median, "compile_s": compile_s,
            "flops": flops, "tflops_per_s": flops / (median * 1e-3) / 1e12,
            "camera_path": "skipped (no camera input)" if cfg.camera_channels else None}


def run_bench(opts: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the peers, then ours; returns the report (also written to `opts.json`, plotted to `opts.plot`)."""
    from wm_jax.bench import report as R

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX's first device use: peers share it
    opts, recipe = resolve(opts)
    cfg = model_config(recipe, opts)
    checkouts = check_peers(opts, cfg)
    for checkout in checkouts.values():
        for warning in checkout.warnings:
            log(f"warning: {warning}")
    meta = run_metadata()
    dtype = jnp.dtype(opts.dtype)
    mesh = make_mesh(opts.num_devices)
    rules = ShardingRules(context_heads=SEQUENCE_AXIS if opts.context_heads == "sharded" else None)
    plan = RolloutPlan.for_recipe(recipe.replace(pixel_height=opts.pixel_height, pixel_width=opts.pixel_width,
                                                 total_blocks=opts.total_blocks), cfg, mesh, rules)
    backends = list(dict.fromkeys(attention_backend(cfg, a, plan, dtype) for a in opts.attention))
    log(f"{opts.slug}: {cfg.num_layers} layers, dim {cfg.dim}, {opts.pixel_height}x{opts.pixel_width} "
        f"({plan.chunk_tokens} tokens/chunk, {plan.chunk_tokens_per_device} per device), cache sink {plan.cache.sink_frames} + ring "
        f"{plan.cache.ring_frames} frames, {recipe.step_schedule().num_steps} passes, {opts.dtype}, "
        f"{plan.num_devices} x {meta['device_kind']}")

    ceiling = matmul_ceiling(dtype)
    log(f"matmul ceiling ({ceiling['size']}^3 {ceiling['dtype']} GEMM, this call): {ceiling['tflops']:.3g} TFLOP/s")
    peers = run_peers(opts, checkouts, recipe, cfg, plan, log)
    ours = {}
    for i, backend in enumerate(backends):  # one rollout each; the previous model is freed first
        log(f"ours, attention {backend}")
        ours[backend] = our_rollout(dataclasses.replace(opts, attention=(backend,)), recipe, cfg, plan, ceiling, log,
                                    forward=i == 0 and any(PEERS[name].kind == "forward" for name in checkouts))
        gc.collect()
    report = {**meta, "benchmark": "bench", "slug": opts.slug, "options": dataclasses.asdict(opts),
              "matmul_ceiling": ceiling, "ours": ours, "peers": peers,
              "published": None if opts.small else PUBLISHED.get(opts.slug), "plan": plan.describe()}
    if opts.json:
        write_json(opts.json, report)
    if opts.plot:
        R.plot(report, opts.plot)
        log(f"wrote {opts.plot}")
    return report


def our_rollout(opts: BenchOptions, recipe: Recipe, cfg: WanConfig, plan: RolloutPlan, ceiling: dict, log,
                forward: bool) -> dict[str, Any]:
    """Ours with the one attention backend `opts.attention[0]`: build, compile, warm-up and timed rollouts."""
    dtype = jnp.dtype(opts.dtype)
    mesh = plan.mesh
    lat_h, lat_w, tpf = plan.latent_height, plan.latent_width, plan.tokens_per_frame
    layout = plan.cache
    schedule = recipe.step_schedule()
    k = schedule.num_steps
    i2v = plan.condition_channels > 0
    profile_chunk = opts.profile_chunk
    if profile_chunk is None and jax.default_backend() == "gpu":
        profile_chunk = min(5, plan.total_blocks - 1)
    profile_run = max(opts.warmup_rollouts - 1, 0)  # the last warm-up rollout: never right before a timed chunk

    # ---- build: weights on the devices in their sharding, one parameter at a time -----------------
    start = time.perf_counter()
    experts, n_params = [], 0
    for e in range(1 if recipe.boundary is None else 2):  # a two-expert recipe: both experts, other weights
        expert = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0), compute_dtype=dtype,
                                                 attention_impl=opts.attention[0]))
        n_params += fill_random_params(expert, seed=opts.seed + 100 * e,
                                       shardings=flat_param_shardings(nnx.state(expert), plan.rules, mesh))
        experts.append(expert)
    model = experts[0] if recipe.boundary is None else ExpertPair(*experts, boundary=recipe.boundary)
    forwards_per_commit = len(experts)  # every expert commits the clean chunk to its own cache
    step = StreamingStep(model, schedule, plan)
    weight_bytes = tree_bytes(step.params)
    build_s = time.perf_counter() - start
    mem_after_weights = device_memory()

    key = jax.random.key(opts.seed + 1)
    text = jax.random.normal(jax.random.fold_in(key, 0), (1, opts.text_tokens, cfg.text_dim), jnp.float32)
    start = time.perf_counter()
    cross = block(step.cross_kv(text))
    cross_kv_s = time.perf_counter() - start
    cache_spec = jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                              jax.eval_shape(step.init_cache), step.cache_sharding)  # a real one per rollout only
    cache_bytes = tree_bytes(cache_spec)

    noise_fn = jax.jit(lambda key, i, shape: chunk_noise(key, i, k, shape, jnp.float32), static_argnums=2,
                       out_shardings=step.replicated)
    cond_sets = {}  # chunk 0 may be shorter (causal Wan2.2): programs and conditioning per chunk length
    for chunk in plan.distinct_chunks:
        frames, grid = plan.frames_of(chunk), plan.chunk_shape_of(chunk)[:4]
        cond_sets[frames] = []
        for s in range(2):  # random conditioning, rotated between chunks
            ks = jax.random.split(jax.random.fold_in(key, 100 + s), 2)
            y = jax.random.normal(ks[0], (*grid, plan.condition_channels), jnp.float32) if i2v else None
            cam = (jax.random.normal(ks[1], (*grid, cfg.camera_channels), jnp.float32)
                   if cfg.camera_channels else None)
            cond_sets[frames].append(step.whole(ChunkInputs(y=y, camera=cam)))

    decoders, encoder_vae = [], None
    for i, name in enumerate(opts.decoders):
        if name == "taehv":
            decoders.append(make_taehv(opts.small, dtype, seed=opts.seed + 10 + i, mesh=mesh))
        else:
            dec, encoder_vae = make_wan_vae(opts.vae_dim, dtype, seed=opts.seed + 10 + i, mesh=mesh,
                                            config=recipe.vae_config)
            decoders.append(dec)
    if opts.encode and i2v and encoder_vae is None:
        _, encoder_vae = make_wan_vae(opts.vae_dim, dtype, seed=opts.seed + 20, mesh=mesh, config=recipe.vae_config)
    end_to_end_decoder = recipe.decoder if recipe.decoder in opts.decoders else (opts.decoders[0] if decoders else None)

    # ---- compile ahead of time, like the engine: one denoise and one commit per chunk length ------
    denoise, commit, denoise_compile_s, commit_compile_s = {}, {}, 0.0, 0.0
    for chunk in plan.distinct_chunks:
        frames, shape = plan.frames_of(chunk), plan.chunk_shape_of(chunk)
        noise0 = block(noise_fn(key, 0, shape))
        start = time.perf_counter()
        denoise[frames] = step.denoise.lower(step.params, cache_spec, cross, noise0, cond_sets[frames][0]).compile()
        denoise_compile_s += time.perf_counter() - start
        start = time.perf_counter()
        x0_spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=step.replicated)
        commit[frames] = step.commit.lower(step.params, cache_spec, cross, x0_spec, cond_sets[frames][0]).compile()
        commit_compile_s += time.perf_counter() - start
    log(f"built {n_params / 1e9:.3f} B params in {build_s:.1f} s; compile denoise {denoise_compile_s:.1f} s, "
        f"commit {commit_compile_s:.1f} s")

    # ---- rollouts --------------------------------------------------------------------------------
    image = step.whole(jax.random.uniform(jax.random.fold_in(key, 7), (1, opts.pixel_height, opts.pixel_width, 3),
                                          jnp.float32,
                                          -1.0, 1.0))
    ceiling_flops = ceiling["tflops"] * 1e12 * plan.num_devices
    chunks, profile = [], None
    decoder_first_call_s = {d.name: [] for d in decoders}
    finite = True
    for run_index in range(opts.warmup_rollouts + opts.rollouts):
        r = run_index - opts.warmup_rollouts  # < 0: an untimed warm-up rollout
        if r < 0:
            log(f"warm-up rollout {run_index + 1}/{opts.warmup_rollouts} ({plan.total_blocks} chunks, untimed)")
        cache = states = None  # the previous rollout's, freed before the new ones are made
        cache = step.init_cache()
        states = {d.name: d.init_state(1, lat_h, lat_w) for d in decoders}
        enc_cache = (put_replicated(encoder_vae.init_encoder_cache(1, opts.pixel_height, opts.pixel_width), mesh)
                     if (opts.encode and i2v) else None)
        for i in range(plan.total_blocks):
            valid_tokens = int(layout.valid_tokens(plan.first_frame_of(i)))  # the cache the chunk attends to
            frames_i = plan.frames_of(i)
            noise = block(noise_fn(key, i, plan.chunk_shape_of(i)))
            inputs = cond_sets[frames_i][i % 2]
            encode_ms = 0.0
            if enc_cache is not None:
                from wm_jax.models.wan_vae import i2v_condition_chunk

                t = time.perf_counter()
                y, enc_cache = block(i2v_condition_chunk(encoder_vae, enc_cache, frames_i,
                                                         image=image if i == 0 else None))
                encode_ms = (time.perf_counter() - t) * 1e3
                inputs = ChunkInputs(y=y, camera=inputs.camera)
            if run_index == profile_run and i == profile_chunk:  # an extra, untimed denoise under the profiler
                profile = profile_denoise(lambda: denoise[frames_i](step.params, cache, cross, noise, inputs), k)
            t0 = time.perf_counter()
            x0 = block(denoise[frames_i](step.params, cache, cross, noise, inputs))
            t1 = time.perf_counter()
            cache = block(commit[frames_i](step.params, cache, cross, x0, inputs))
            t2 = time.perf_counter()
            decode_ms, d2h_ms = {}, None
            z = x0.astype(dtype)
            for d in decoders:
                t = time.perf_counter()
                frames, states[d.name] = d.step(z, states[d.name])
                block(frames)
                decode_ms[d.name] = (time.perf_counter() - t) * 1e3
                if run_index == 0 and i < 2:
                    decoder_first_call_s[d.name].append(decode_ms[d.name] / 1e3)
                if d2h_ms is None:  # the engine's uint8 conversion on the device + host copy, outside decode here
                    t = time.perf_counter()
                    frames_to_uint8(local_replica(frames), VALUE_RANGES[d.name])  # raises on NaN/inf
                    d2h_ms = (time.perf_counter() - t) * 1e3
            finite &= bool(jnp.isfinite(x0).all())
            if r < 0:
                continue
            den_flops = k * forward_flops(cfg, frames_i * tpf, valid_tokens)
            com_flops = forwards_per_commit * forward_flops(cfg, frames_i * tpf, valid_tokens)
            den_ms, com_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3
            e2e_ms = encode_ms + den_ms + com_ms + (decode_ms[end_to_end_decoder] if end_to_end_decoder else 0.0)
            rec = {"rollout": r, "autoregressive_index": i, "valid_cache_frames": valid_tokens // tpf,
                   "encode_ms": encode_ms, "denoise_ms": den_ms, "commit_ms": com_ms, "decode_ms": decode_ms,
                   "d2h_uint8_frames_ms": d2h_ms, "end_to_end_ms": e2e_ms,
                   "video_frames": plan.chunk_pixel_frames(i), "denoise_flops": den_flops, "commit_flops": com_flops,
                   "denoise_tflops_per_s": den_flops / (den_ms * 1e-3) / 1e12,
                   "commit_tflops_per_s": com_flops / (com_ms * 1e-3) / 1e12,
                   "denoise_utilisation": den_flops / (den_ms * 1e-3) / ceiling_flops,
                   "commit_utilisation": com_flops / (com_ms * 1e-3) / ceiling_flops}
            chunks.append(rec)
            log(f"  rollout {r} chunk {i}: cache {rec['valid_cache_frames']:2d} fr, denoise {den_ms:8.2f} ms "
                f"({rec['denoise_utilisation'] * 100:4.1f} % of the ceiling), commit {com_ms:7.2f} ms, decode "
                + ", ".join(f"{n} {v:.2f}" for n, v in decode_ms.items())
                + (f", encode {encode_ms:.2f}" if enc_cache is not None else ""))

    # ---- summary ---------------------------------------------------------------------------------
    steady = [c for c in chunks if c["autoregressive_index"] >= opts.warmup_chunks]
    med = lambda xs: statistics.median(xs) if xs else None
    summary = summarize_chunks(chunks, opts.warmup_chunks)
    summary.update({
        "encode_ms": med([c["encode_ms"] for c in steady]),
        "decode_ms": {d.name: med([c["decode_ms"][d.name] for c in steady]) for d in decoders},
        "end_to_end_decoder": end_to_end_decoder,
        "end_to_end_ms": med([c["end_to_end_ms"] for c in steady]),
        "denoise_utilisation": med([c["denoise_utilisation"] for c in steady]),
        "commit_utilisation": med([c["commit_utilisation"] for c in steady]),
        "d2h_uint8_frames_ms": med([c["d2h_uint8_frames_ms"] for c in steady if c["d2h_uint8_frames_ms"] is not None]),
    })
    summary["generated_fps"] = (plan.chunk_pixel_frames(1) / (summary["end_to_end_ms"] * 1e-3)
                                if summary["end_to_end_ms"] else None)
    ref_chunk = next((c for c in chunks if c["autoregressive_index"] == 5), chunks[-1] if chunks else None)
    if ref_chunk:
        summary["floor_denoise_ms_at_ceiling"] = ref_chunk["denoise_flops"] / ceiling_flops * 1e3
        summary["floor_commit_ms_at_ceiling"] = ref_chunk["commit_flops"] / ceiling_flops * 1e3
        summary["floor_chunk_index"] = ref_chunk["autoregressive_index"]
    compile_s = {"denoise": denoise_compile_s, "commit": commit_compile_s,
                 "decoder_first_two_calls_s": decoder_first_call_s}
    forward_result = None
    if forward and plan.num_devices == 1:
        forward_result = our_forward(step, plan, cfg, opts, text, log)
    elif forward:
        forward_result = {"skipped": "the bidirectional forward is compared on one device only"}
    memory = device_memory()
    return {"model_config": cfg.to_dict(), "num_params": n_params, "weight_bytes": weight_bytes,
            "kv_cache_bytes": cache_bytes, "attention": opts.attention[0], "decoders": list(opts.decoders),
            "num_devices": plan.num_devices, "context_heads": opts.context_heads,
            "cache_layout": {"tokens_per_frame": tpf, "sink_frames": layout.sink_frames,
                             "ring_frames": layout.ring_frames, "buffer_frames": layout.buffer_frames},
            "schedule": {"t": schedule.t.tolist(), "flow_scale": schedule.flow_scale.tolist(),
                         "signal_scale": schedule.signal_scale.tolist(),
                         "noise_scale": schedule.noise_scale.tolist(), "expert_passes": schedule.expert_passes},
            "build_s": build_s, "cross_kv_compile_plus_run_s": cross_kv_s, "compile_s": compile_s,
            "device_memory_after_weights": mem_after_weights, "device_memory_end": memory,
            "peak_memory_gib": memory.get("peak_bytes_in_use_gib") if memory else None,
            "memory_per_device": [device_memory(d) for d in mesh.devices.flat],
            "profile_chunk": profile_chunk, "profile_rollout": profile_run - opts.warmup_rollouts, "profile": profile,
            "all_finite": finite, "summary": summary, "chunks": chunks, "forward": forward_result}


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
            "top_kernels_ms_per_pass": [[name[:120], kernel_category(name), ms]
                                        for name, ms in per_kernel.most_common(25)]}


def results_path(folder: str | Path, slug: str, device_kind: str, num_devices: int) -> Path:
    """<folder>/bench_<slug>_<gpu kind>[x<n>]_<date>.json: results named by date, GPU kind and preset."""
    kind = device_kind.lower().replace("nvidia", "").strip().replace(" ", "-") or "device"
    suffix = f"x{num_devices}" if num_devices > 1 else ""
    return Path(folder) / f"bench_{slug}_{kind}{suffix}_{date.today().isoformat()}.json"
