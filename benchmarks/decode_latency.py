"""Streaming decode latency of ONE 3-latent chunk: wm_jax TAEHV and Wan 2.1 VAE vs PyTorch references.

Steady state: every variant first decodes a priming chunk (the stream's first), then the timed calls
decode later chunks with the state carried from the previous call (TAEHV: 9 MemBlock memories; Wan
VAE: 32 causal-conv caches), rotating among a few random latent sets. Each timed call is synchronised
on both sides (`jax.block_until_ready` / `torch.cuda.synchronize`); median over the timed calls.
Random weights everywhere (JAX weights drawn on the device in the compute dtype).

Variants (`--variants`, comma list; default all):

  taehv_jax            wm_jax TAEHV, `taehv.decode_chunk` under one `jax.jit` with the parameters as
                       arguments and the decoder state donated (the fastest way to call it)
  taehv_jax_api        `taehv.decode_chunk(module, z, state)` called as is (its internal `nnx.jit`, no donation)
  taehv_jax_engine     `wm_jax.streaming.decoders.taehv_decoder(module).step` (what `wm-jax run` calls:
                       `jax.jit` over a closure, parameters baked in as constants, state donated)
  wan_vae_jax          wm_jax Wan 2.1 VAE, `wan_vae.jit_decode_chunk(vae, donate_cache=True)`
  taehv_torch          upstream TAEHV (`--torch_taehv_py`): its `decoder` nn.Sequential run chunk-parallel
                       with MemBlock memories carried between chunks (a driver in this file), eager
  taehv_torch_compiled the same driver under `torch.compile`
  taehv_torch_stateless upstream `TAEHV.decode_video(chunk, parallel=True)`: same work, zero memories
  wan_vae_diffusers_framewise  diffusers `AutoencoderKLWan`, decoder run one latent at a time over the
                       carried `feat_cache` list, the way diffusers' `_decode` loops (eager)
  wan_vae_diffusers    the same decoder given all 3 latents in one call with the carried cache (eager)
  wan_vae_diffusers_compiled   that one-call chunk decode with `vae.decoder` under `torch.compile`

`--check` (default on) first runs each torch reference and a wm_jax twin built from the SAME torch
weights (through the project's converters) on two chunks and prints relative L2 errors; it also checks
the torch chunk drivers against upstream's own whole-sequence decode (TAEHV) / per-frame decode (Wan).

FLOPs: TAEHV analytically (matmul/conv multiply-adds ×2); Wan VAE from XLA's cost analysis of the
steady-state program (all ops). TFLOP/s for the torch rows uses the same counts.

GPU (bf16, 480x832). Carry the upstream madebyollin/taehv `taehv.py` (any ignored path, e.g.
`.upstream/taehv.py`) and a diffusers wheel (`.whl/diffusers-0.42.1-py3-none-any.whl`, installed with
`pip install --no-deps --target /tmp/site` + `PYTHONPATH=/tmp/site`). Two calls keep each under 10 min:

    python benchmarks/decode_latency.py --torch_taehv_py .upstream/taehv.py \
        --variants taehv_jax,taehv_jax_api,taehv_jax_engine,taehv_torch,taehv_torch_compiled,taehv_torch_stateless \
        --json $OUT/decode_taehv.json
    python benchmarks/decode_latency.py \
        --variants wan_vae_jax,wan_vae_diffusers_framewise,wan_vae_diffusers,wan_vae_diffusers_compiled \
        --json $OUT/decode_wan_vae.json

CPU smoke test (tiny sizes, float32, small Wan VAE width):

    JAX_PLATFORMS=cpu python benchmarks/decode_latency.py --small
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in this process

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from wm_jax.bench.common import (block, device_memory, fill_random_params, format_table, lowered_flops, rel_l2,  # noqa: E402
                     run_metadata, time_calls, write_json)
from wm_jax.models import taehv as T  # noqa: E402
from wm_jax.models import wan_vae as W  # noqa: E402

ALL_VARIANTS = ("taehv_jax", "taehv_jax_api", "taehv_jax_engine", "wan_vae_jax",
                "taehv_torch", "taehv_torch_compiled", "taehv_torch_stateless",
                "wan_vae_diffusers_framewise", "wan_vae_diffusers", "wan_vae_diffusers_compiled")
TARGET_TAEHV_MS = 7.0


class Skip(Exception):
    """A variant that cannot run here (missing package / file); the message says why."""


@dataclass
class Ctx:
    args: argparse.Namespace
    dtype: str
    batch: int
    latents: int
    lat_h: int
    lat_w: int
    z_sets: list[np.ndarray]  # normalised latents [B, T, h, w, 16] float32, channels-last
    z_prime: np.ndarray
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def steady_frames(self) -> int:
        return 4 * self.latents


# ---------------------------------------------------------------------------------------------------
# FLOP counts.
# ---------------------------------------------------------------------------------------------------


def taehv_flops(cfg: T.TAEHVConfig, latents: int, h: int, w: int, batch: int = 1) -> float:
    """Multiply-adds ×2 of the TAEHV decoder convs for one chunk of `latents` latents at h×w
    (steady state: every raw frame kept). conv k×k Cin→Cout over P pixels and F frames: 2·k²·Cin·Cout·P·F."""
    conv = lambda cin, cout, k, pixels, frames: 2.0 * k * k * cin * cout * pixels * frames
    n = cfg.decoder_n_f
    flops = conv(cfg.latent_channels, n[0], 3, h * w, latents)
    frames, hh, ww = latents, h, w
    for s in range(3):
        flops += 3 * (conv(2 * n[s], n[s], 3, hh * ww, frames) + 2 * conv(n[s], n[s], 3, hh * ww, frames))
        hh, ww = hh * cfg.space_factors[s], ww * cfg.space_factors[s]
        flops += conv(n[s], n[s] * cfg.time_strides[s], 1, hh * ww, frames)  # TGrow
        frames *= cfg.time_strides[s]
        flops += conv(n[s], n[s + 1], 3, hh * ww, frames)
    flops += conv(n[3], 3 * cfg.patch_size**2, 3, hh * ww, frames)
    return batch * flops


# ---------------------------------------------------------------------------------------------------
# wm_jax variants.
# ---------------------------------------------------------------------------------------------------


def jax_dtype(name: str):
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}[name]


def taehv_config(ctx: Ctx) -> T.TAEHVConfig:
    return T.TAEHVConfig(param_dtype=ctx.dtype)


def build_taehv_jax(ctx: Ctx) -> T.TAEHVDecoder:
    if "taehv_module" not in ctx.cache:
        cfg = taehv_config(ctx)
        module = nnx.eval_shape(lambda: T.TAEHVDecoder(cfg, compute_dtype=jax_dtype(ctx.dtype)))
        fill_random_params(module, seed=1, stacked_prefixes=())
        ctx.cache["taehv_module"] = module
    return ctx.cache["taehv_module"]


def _jax_inputs(ctx: Ctx):
    dt = jax_dtype(ctx.dtype)  # the engine feeds x0.astype(compute_dtype)
    return [jnp.asarray(z, dt) for z in ctx.z_sets], jnp.asarray(ctx.z_prime, dt)


def _run_jax_stream(ctx: Ctx, step, state, frames_per_chunk: int) -> dict:
    """Primes with one chunk, then times steady chunks. `step(z, state) -> (frames, state)`."""
    zs, z0 = _jax_inputs(ctx)
    start = time.perf_counter()
    frames, state = block(step(z0, state))
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    frames, state = block(step(zs[0], state))
    steady_first_s = time.perf_counter() - start
    if frames.shape[1] != frames_per_chunk:
        raise AssertionError(f"steady chunk gave {frames.shape[1]} frames, expected {frames_per_chunk}")
    holder = {"state": state, "out": frames}

    def call(i):
        holder["out"], holder["state"] = step(zs[i % len(zs)], holder["state"])
        return holder["out"], holder["state"]

    res = time_calls(call, block, warmup=ctx.args.warmup, iters=ctx.args.iters, budget_s=ctx.args.budget_s)
    res.update(first_call_s=first_s, first_steady_call_s=steady_first_s,
               finite=bool(np.isfinite(np.asarray(holder["out"], np.float32)).all()))
    return res


def run_taehv_jax(ctx: Ctx) -> dict:
    module = build_taehv_jax(ctx)
    graphdef, params = nnx.split(module)

    def fn(params, z, state):
        return T.decode_chunk(nnx.merge(graphdef, params), z, state)

    jitted = jax.jit(fn, donate_argnums=(2,))
    state = T.init_decoder_state(module, ctx.batch, ctx.lat_h, ctx.lat_w)
    res = _run_jax_stream(ctx, lambda z, s: jitted(params, z, s), state, ctx.steady_frames)
    res["flops"] = taehv_flops(module.config, ctx.latents, ctx.lat_h, ctx.lat_w, ctx.batch)
    abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  T.init_decoder_state(module, ctx.batch, ctx.lat_h, ctx.lat_w))
    abstract_state = T.DecoderState(memory=abstract_state.memory, started=True)
    z_spec = jax.ShapeDtypeStruct((ctx.batch, ctx.latents, ctx.lat_h, ctx.lat_w, 16), jax_dtype(ctx.dtype))
    res["xla_flops"] = lowered_flops(jax.jit(fn).lower(params, z_spec, abstract_state))
    return res


def run_taehv_jax_api(ctx: Ctx) -> dict:
    module = build_taehv_jax(ctx)
    state = T.init_decoder_state(module, ctx.batch, ctx.lat_h, ctx.lat_w)
    res = _run_jax_stream(ctx, lambda z, s: T.decode_chunk(module, z, s), state, ctx.steady_frames)
    res["flops"] = taehv_flops(module.config, ctx.latents, ctx.lat_h, ctx.lat_w, ctx.batch)
    return res


def run_taehv_jax_engine(ctx: Ctx) -> dict:
    from wm_jax.streaming.decoders import taehv_decoder

    module = build_taehv_jax(ctx)
    decoder = taehv_decoder(module)
    state = decoder.init_state(ctx.batch, ctx.lat_h, ctx.lat_w)
    res = _run_jax_stream(ctx, decoder.step, state, ctx.steady_frames)
    res["flops"] = taehv_flops(module.config, ctx.latents, ctx.lat_h, ctx.lat_w, ctx.batch)
    return res


def build_wan_vae_jax(ctx: Ctx) -> W.WanVAE:
    if "wan_vae_module" not in ctx.cache:
        cfg = W.WanVAEConfig(dim=ctx.args.vae_dim, param_dtype=ctx.dtype, compute_dtype=ctx.dtype)
        vae = nnx.eval_shape(lambda: W.WanVAE(cfg, rngs=nnx.Rngs(0)))
        fill_random_params(vae, seed=2, stacked_prefixes=())
        vae.compute_dtype = jax_dtype(ctx.dtype)
        ctx.cache["wan_vae_module"] = vae
    return ctx.cache["wan_vae_module"]


def run_wan_vae_jax(ctx: Ctx) -> dict:
    vae = build_wan_vae_jax(ctx)
    step = W.jit_decode_chunk(vae, donate_cache=True)
    cache = vae.init_decoder_cache(ctx.batch, ctx.lat_h, ctx.lat_w)
    cache_bytes = int(sum(x.size * x.dtype.itemsize for x in cache.entries))
    res = _run_jax_stream(ctx, lambda z, c: step(z, c), cache, ctx.steady_frames)
    graphdef, params = nnx.split(vae)
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    abstract = W.CausalCache(tuple(spec(e) for e in cache.entries), True, "decoder", ctx.batch, ctx.lat_h,
                             ctx.lat_w)
    z_spec = jax.ShapeDtypeStruct((ctx.batch, ctx.latents, ctx.lat_h, ctx.lat_w, 16), jax_dtype(ctx.dtype))
    flops = lowered_flops(jax.jit(lambda p, z, c: W.decode_chunk(nnx.merge(graphdef, p), z, c)).lower(
        params, z_spec, abstract))
    ctx.cache["wan_vae_flops"] = flops
    res.update(xla_flops=flops, flops=flops, cache_bytes=cache_bytes)
    return res


# ---------------------------------------------------------------------------------------------------
# PyTorch references.
# ---------------------------------------------------------------------------------------------------


def torch_env(ctx: Ctx):
    try:
        import torch
    except Exception as err:  # noqa: BLE001
        raise Skip(f"torch import failed: {err}") from None
    if "torch_env" not in ctx.cache:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[ctx.dtype]
        torch.backends.cudnn.benchmark = ctx.args.cudnn_benchmark
        if device == "cpu" and ctx.dtype == "float32":
            torch.set_float32_matmul_precision("highest")
        ctx.cache["torch_env"] = (torch, device, dtype)
    return ctx.cache["torch_env"]


def torch_sync(torch, device):
    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()
    return sync


def _torch_compile(torch, fn, ctx: Ctx):
    mode = ctx.args.torch_compile_mode
    return torch.compile(fn, mode=None if mode == "default" else mode)


def _time_torch_stream(ctx: Ctx, torch, device, step, state, inputs, z0) -> dict:
    """step(z, state) -> (frames, state); primes with z0 then times steady chunks."""
    sync = torch_sync(torch, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        start = time.perf_counter()
        frames, state = step(z0, state)
        sync(None)
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        frames, state = step(inputs[0], state)
        sync(None)
        steady_first_s = time.perf_counter() - start
        if frames.shape[1] != ctx.steady_frames:
            raise AssertionError(f"steady chunk gave {frames.shape[1]} frames, expected {ctx.steady_frames}")
        holder = {"state": state, "out": frames}

        def call(i):
            holder["out"], holder["state"] = step(inputs[i % len(inputs)], holder["state"])
            return None

        res = time_calls(call, sync, warmup=ctx.args.warmup, iters=ctx.args.iters, budget_s=ctx.args.budget_s)
        res["finite"] = bool(torch.isfinite(holder["out"].float()).all().item())
    res.update(first_call_s=first_s, first_steady_call_s=steady_first_s)
    if device == "cuda":
        res["torch_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


# --- TAEHV (upstream module, loaded from a file given on the command line) --------------------------


def load_upstream_taehv(ctx: Ctx):
    if "taehv_torch" in ctx.cache:
        return ctx.cache["taehv_torch"]
    torch, device, dtype = torch_env(ctx)
    path = ctx.args.torch_taehv_py
    if not path:
        raise Skip("no --torch_taehv_py PATH (the upstream madebyollin/taehv taehv.py)")
    if not Path(path).is_file():
        raise Skip(f"--torch_taehv_py {path}: no such file")
    spec = importlib.util.spec_from_file_location("upstream_taehv", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # torch.compile (dynamo) looks the module up by name
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    model = mod.TAEHV(checkpoint_path=None)  # random init, base decoder, taew2_1 shapes (16 latent channels)
    model = model.to(device=device, dtype=dtype).eval()
    mem_classes = tuple(getattr(mod, n) for n in ("MemBlock", "SuperMemBlock") if hasattr(mod, n))
    ctx.cache["taehv_torch"] = (mod, model, mem_classes)
    return ctx.cache["taehv_torch"]


def taehv_torch_chunk(decoder, mem_classes, z, memory):
    """Chunk-parallel decode of z [N, T, C, h, w] continuing a stream: each MemBlock sees, for frame t,
    its own input at frame t−1 (the carried `memory` for t = 0). Returns (raw frames [N, T', 3, H, W]
    clamped to [0, 1], new memories). Written for this benchmark (SPEC §7 semantics)."""
    import torch

    n = z.shape[0]
    x = z.reshape(n * z.shape[1], *z.shape[2:])
    new_memory = []
    j = 0
    for layer in decoder:
        if isinstance(layer, mem_classes):
            t = x.shape[0] // n
            x5 = x.reshape(n, t, *x.shape[1:])
            past = torch.cat([memory[j].unsqueeze(1), x5[:, :-1]], dim=1).reshape(x.shape)
            new_memory.append(x5[:, -1].clone())
            x = layer(x, past)
            j += 1
        else:
            x = layer(x)
    return x.reshape(n, -1, *x.shape[1:]).clamp(0.0, 1.0), new_memory


def _taehv_torch_memory(torch, model, mem_classes, batch, h, w, device, dtype):
    shapes, hh, ww = [], h, w
    for layer in model.decoder:
        if isinstance(layer, mem_classes):
            c = next(p for p in layer.parameters()).shape[1] // 2
            shapes.append((batch, c, hh, ww))
        elif isinstance(layer, torch.nn.Upsample):
            f = int(layer.scale_factor if not isinstance(layer.scale_factor, tuple) else layer.scale_factor[0])
            hh, ww = hh * f, ww * f
    return [torch.zeros(s, device=device, dtype=dtype) for s in shapes]


def _torch_taehv_inputs(ctx, torch, device, dtype):
    to = lambda z: torch.from_numpy(np.ascontiguousarray(z.transpose(0, 1, 4, 2, 3))).to(device, dtype)
    return [to(z) for z in ctx.z_sets], to(ctx.z_prime)


def _run_taehv_torch(ctx: Ctx, compiled: bool) -> dict:
    torch, device, dtype = torch_env(ctx)
    mod, model, mem_classes = load_upstream_taehv(ctx)
    inputs, z0 = _torch_taehv_inputs(ctx, torch, device, dtype)
    fn = lambda z, memory: taehv_torch_chunk(model.decoder, mem_classes, z, memory)
    if compiled:
        fn = _torch_compile(torch, fn, ctx)
    memory = _taehv_torch_memory(torch, model, mem_classes, ctx.batch, ctx.lat_h, ctx.lat_w, device, dtype)
    res = _time_torch_stream(ctx, torch, device, fn, memory, inputs, z0)
    res["flops"] = taehv_flops(taehv_config(ctx), ctx.latents, ctx.lat_h, ctx.lat_w, ctx.batch)
    return res


def run_taehv_torch(ctx: Ctx) -> dict:
    return _run_taehv_torch(ctx, compiled=False)


def run_taehv_torch_compiled(ctx: Ctx) -> dict:
    return _run_taehv_torch(ctx, compiled=True)


def run_taehv_torch_stateless(ctx: Ctx) -> dict:
    torch, device, dtype = torch_env(ctx)
    mod, model, _ = load_upstream_taehv(ctx)
    inputs, z0 = _torch_taehv_inputs(ctx, torch, device, dtype)
    trim = getattr(model, "frames_to_trim", 3)

    def step(z, state):  # zero memories every call; output untrimmed count restored for the frame check
        frames = model.decode_video(z, parallel=True, show_progress_bar=False)
        return frames, state

    res = _time_torch_stream(ctx, torch, device, lambda z, s: _pad_frames(step(z, s), trim, ctx), None, inputs, z0)
    res["flops"] = taehv_flops(taehv_config(ctx), ctx.latents, ctx.lat_h, ctx.lat_w, ctx.batch)
    res["note"] = f"stateless: drops the first {trim} frames of each chunk"
    return res


def _pad_frames(out, trim, ctx):
    frames, state = out
    return _Frames(frames, trim), state


class _Frames:
    """Frames of a stateless decode, reporting the untrimmed frame count (same work was done)."""

    def __init__(self, t, trim):
        self.t, self.shape = t, (t.shape[0], t.shape[1] + trim, *t.shape[2:])

    def float(self):
        return self.t.float()


# --- Wan 2.1 VAE (diffusers AutoencoderKLWan) -------------------------------------------------------


def load_diffusers_vae(ctx: Ctx):
    if "diffusers_vae" in ctx.cache:
        return ctx.cache["diffusers_vae"]
    torch, device, dtype = torch_env(ctx)
    try:
        from diffusers import AutoencoderKLWan
    except Exception as err:  # noqa: BLE001
        raise Skip(f"diffusers AutoencoderKLWan import failed: {err}") from None
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=ctx.args.vae_dim).to(device=device, dtype=dtype).eval()
    n_convs = sum(type(m).__name__ == "WanCausalConv3d" for m in vae.decoder.modules())
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    ctx.cache["diffusers_vae"] = (vae, n_convs, mean, std)
    return ctx.cache["diffusers_vae"]


def diffusers_chunk(vae, decoder, z_norm, feat_cache, mean, std, *, framewise: bool, first: bool = False):
    """Decodes normalised latents z [B, 16, T, h, w] (NCTHW) continuing the stream held in `feat_cache`
    (diffusers' per-conv cache list, mutated in place). The stream's first chunk always goes one latent at
    a time (diffusers' first-frame path); later chunks one call per latent (`framewise`) or one call for
    all T latents. Returns frames [B, 3, T', H, W] clamped to [-1, 1]."""
    import torch

    x = vae.post_quant_conv((z_norm.float() * std + mean).to(z_norm.dtype))
    if framewise or first:
        outs = []
        for i in range(x.shape[2]):
            kwargs = {"first_chunk": True} if (first and i == 0) else {}
            outs.append(decoder(x[:, :, i:i + 1], feat_cache=feat_cache, feat_idx=[0], **kwargs))
        out = torch.cat(outs, dim=2)
    else:
        out = decoder(x, feat_cache=feat_cache, feat_idx=[0])
    return out.clamp(-1.0, 1.0)


def _diffusers_inputs(ctx, torch, device, dtype):
    to = lambda z: torch.from_numpy(np.ascontiguousarray(z.transpose(0, 4, 1, 2, 3))).to(device, dtype)
    return [to(z) for z in ctx.z_sets], to(ctx.z_prime)


def _run_diffusers(ctx: Ctx, framewise: bool, compiled: bool) -> dict:
    torch, device, dtype = torch_env(ctx)
    vae, n_convs, mean, std = load_diffusers_vae(ctx)
    inputs, z0 = _diffusers_inputs(ctx, torch, device, dtype)
    decoder = _torch_compile(torch, vae.decoder, ctx) if compiled else vae.decoder
    primed = {"done": False}

    def step(z, feat_cache):
        if not primed["done"]:  # the priming chunk runs eager (first-frame path with None/"Rep" entries)
            primed["done"] = True
            out = diffusers_chunk(vae, vae.decoder, z, feat_cache, mean, std, framewise=True, first=True)
        else:
            out = diffusers_chunk(vae, decoder, z, feat_cache, mean, std, framewise=framewise)
        return out.transpose(1, 2), feat_cache  # -> [B, T', 3, H, W] so shape[1] counts frames

    res = _time_torch_stream(ctx, torch, device, step, [None] * n_convs, inputs, z0)
    res["flops"] = ctx.cache.get("wan_vae_flops")
    return res


def run_wan_vae_diffusers_framewise(ctx: Ctx) -> dict:
    return _run_diffusers(ctx, framewise=True, compiled=False)


def run_wan_vae_diffusers(ctx: Ctx) -> dict:
    return _run_diffusers(ctx, framewise=False, compiled=False)


def run_wan_vae_diffusers_compiled(ctx: Ctx) -> dict:
    return _run_diffusers(ctx, framewise=False, compiled=True)


# ---------------------------------------------------------------------------------------------------
# Correctness checks on shared weights (torch reference vs a wm_jax twin from the same tensors).
# ---------------------------------------------------------------------------------------------------


def _state_dict_numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}


def check_taehv(ctx: Ctx) -> dict:
    from converters import taehv as taehv_conv
    from wm_jax.io.tensor_sources import ArraySource

    torch, device, dtype = torch_env(ctx)
    mod, model, mem_classes = load_upstream_taehv(ctx)
    twin = taehv_conv.load_source(ArraySource(_state_dict_numpy(model)), compute_dtype=jax_dtype(ctx.dtype),
                                  dtype=ctx.dtype)
    z = np.concatenate([ctx.z_prime, ctx.z_sets[0]], axis=1)  # two chunks
    zt = torch.from_numpy(np.ascontiguousarray(z.transpose(0, 1, 4, 2, 3))).to(device, dtype)
    with torch.inference_mode():
        memory = _taehv_torch_memory(torch, model, mem_classes, ctx.batch, ctx.lat_h, ctx.lat_w, device, dtype)
        c0, memory = taehv_torch_chunk(model.decoder, mem_classes, zt[:, :ctx.latents], memory)
        c1, memory = taehv_torch_chunk(model.decoder, mem_classes, zt[:, ctx.latents:], memory)
        driver = torch.cat([c0[:, 3:], c1], dim=1).float().cpu().numpy()
        whole = model.decode_video(zt, parallel=True, show_progress_bar=False).float().cpu().numpy()
    state = T.init_decoder_state(twin, ctx.batch, ctx.lat_h, ctx.lat_w)
    outs = []
    for k in range(2):
        frames, state = T.decode_chunk(twin, jnp.asarray(z[:, k * ctx.latents:(k + 1) * ctx.latents],
                                                         jax_dtype(ctx.dtype)), state)
        outs.append(np.asarray(frames.astype(jnp.float32)))
    ours = np.concatenate(outs, axis=1).transpose(0, 1, 4, 2, 3)
    return {"torch_driver_vs_upstream_decode_video": rel_l2(driver, whole),
            "wm_jax_vs_upstream_decode_video": rel_l2(ours, whole),
            "wm_jax_vs_torch_driver_chunk1": rel_l2(outs[1].transpose(0, 1, 4, 2, 3), driver[:, -ctx.steady_frames:])}


def check_wan_vae(ctx: Ctx) -> dict:
    from converters import wan_vae as wan_vae_conv
    from wm_jax.io.tensor_sources import ArraySource

    torch, device, dtype = torch_env(ctx)
    vae, n_convs, mean, std = load_diffusers_vae(ctx)
    twin = wan_vae_conv.load_source(ArraySource(_state_dict_numpy(vae)), param_dtype=ctx.dtype,
                                    compute_dtype=ctx.dtype)
    to = lambda z: torch.from_numpy(np.ascontiguousarray(z.transpose(0, 4, 1, 2, 3))).to(device, dtype)
    results = {}
    with torch.inference_mode():
        ref = {}
        for mode in ("framewise", "chunk"):
            cache = [None] * n_convs
            a = diffusers_chunk(vae, vae.decoder, to(ctx.z_prime), cache, mean, std, framewise=True, first=True)
            b = diffusers_chunk(vae, vae.decoder, to(ctx.z_sets[0]), cache, mean, std,
                                framewise=(mode == "framewise"))
            ref[mode] = [a.float().cpu().numpy(), b.float().cpu().numpy()]
    results["diffusers_chunk_vs_framewise_chunk1"] = rel_l2(ref["chunk"][1], ref["framewise"][1])
    cache = twin.init_decoder_cache(ctx.batch, ctx.lat_h, ctx.lat_w)
    step = W.jit_decode_chunk(twin, donate_cache=True)  # same executable as the timed variant
    ours = []
    for z in (ctx.z_prime, ctx.z_sets[0]):
        frames, cache = step(jnp.asarray(z, jax_dtype(ctx.dtype)), cache)
        ours.append(np.asarray(frames.astype(jnp.float32)).transpose(0, 4, 1, 2, 3))
    results["wm_jax_vs_diffusers_chunk0"] = rel_l2(ours[0], ref["framewise"][0])
    results["wm_jax_vs_diffusers_chunk1"] = rel_l2(ours[1], ref["framewise"][1])
    return results


# ---------------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------------


RUNNERS = {name: globals()[f"run_{name}"] for name in ALL_VARIANTS}
FAMILY = {name: ("TAEHV" if name.startswith("taehv") else "Wan VAE") for name in ALL_VARIANTS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--height", type=int, default=None, help="pixels (default 480; --small 32)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 832; --small 48)")
    p.add_argument("--latents", type=int, default=3, help="latent frames per chunk")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="weights and activations (default bfloat16; --small float32)")
    p.add_argument("--iters", type=int, default=None, help="timed chunks per variant (default 50; --small 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steady chunks first (default 5; --small 1)")
    p.add_argument("--budget_s", type=float, default=20.0, help="stop timing a variant after this many seconds "
                   "(at least 5 timed chunks)")
    p.add_argument("--input_sets", type=int, default=4, help="random latent sets to rotate among")
    p.add_argument("--vae_dim", type=int, default=None, help="Wan VAE base width (default 96; --small 16)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma list; see the module docstring")
    p.add_argument("--torch_taehv_py", default=None, help="path of upstream madebyollin/taehv taehv.py")
    p.add_argument("--torch_compile_mode", default="default",
                   help="torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs")
    p.add_argument("--no_cudnn_benchmark", dest="cudnn_benchmark", action="store_false",
                   help="leave torch.backends.cudnn.benchmark off (default on)")
    p.add_argument("--no_check", dest="check", action="store_false", help="skip the shared-weight checks")
    p.add_argument("--small", action="store_true", help="tiny CPU smoke test: 32x48 px, float32, Wan VAE dim 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all figures here")
    args = p.parse_args(argv)
    small = args.small
    defaults = dict(height=32 if small else 480, width=48 if small else 832, dtype="float32" if small else "bfloat16",
                    iters=5 if small else 50, warmup=1 if small else 5, vae_dim=16 if small else 96)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.height % 8 or args.width % 8:
        p.error("--height/--width must be multiples of 8")
    unknown = set(args.variants.split(",")) - set(ALL_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {', '.join(ALL_VARIANTS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    meta = run_metadata()
    rng = np.random.default_rng(args.seed)
    lat_h, lat_w = args.height // 8, args.width // 8
    shape = (args.batch, args.latents, lat_h, lat_w, 16)
    ctx = Ctx(args=args, dtype=args.dtype, batch=args.batch, latents=args.latents, lat_h=lat_h, lat_w=lat_w,
              z_sets=[rng.standard_normal(shape).astype(np.float32) for _ in range(args.input_sets)],
              z_prime=rng.standard_normal(shape).astype(np.float32))
    variants = [v for v in ALL_VARIANTS if v in args.variants.split(",")]
    print(f"decode latency: {args.batch}x{args.latents} latents {lat_h}x{lat_w} -> {args.height}x{args.width} px, "
          f"{args.dtype}, device {meta['device_kind']} ({meta['platform']}), jax {meta['jax']}, "
          f"torch {meta['torch']}", flush=True)

    results: dict[str, dict] = {}
    # Wan VAE JAX first: its XLA FLOP count is reused for the torch Wan rows.
    order = sorted(variants, key=lambda v: (v != "wan_vae_jax", ALL_VARIANTS.index(v)))
    for name in order:
        print(f"-- {name}", flush=True)
        try:
            results[name] = {"status": "ok", **RUNNERS[name](ctx)}
            r = results[name]
            print(f"   median {r['median_ms']:.3f} ms over {r['iters']} chunks "
                  f"(first call {r['first_call_s']:.2f} s, first steady {r['first_steady_call_s']:.2f} s)", flush=True)
        except Skip as why:
            results[name] = {"status": "skipped", "reason": str(why)}
            print(f"   skipped: {why}", flush=True)
        except Exception as err:  # noqa: BLE001 - one failing reference must not lose the others
            results[name] = {"status": "error", "reason": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
            print(f"   ERROR: {type(err).__name__}: {err}", flush=True)

    checks: dict[str, Any] = {}
    if args.check:
        for fam, fn, needed in (("taehv", check_taehv, "taehv_torch"), ("wan_vae", check_wan_vae, "wan_vae_diffusers")):
            if not any(v.startswith(needed) for v in variants):
                continue
            try:
                checks[fam] = fn(ctx)
            except Skip as why:
                checks[fam] = {"skipped": str(why)}
            except Exception as err:  # noqa: BLE001
                checks[fam] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        for fam, vals in checks.items():
            shown = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in vals.items() if k != "traceback"}
            print(f"check {fam} (relative L2, {args.dtype}): {shown}")

    memory = device_memory()
    rows = []
    for name in variants:
        r = results[name]
        if r["status"] != "ok":
            rows.append([name, FAMILY[name], None, None, None, None, None, r["status"] + ": " + r["reason"][:60]])
            continue
        ms = r["median_ms"]
        r["frames_per_s"] = ctx.steady_frames * args.batch / (ms * 1e-3)
        r["tflops_per_s"] = r["flops"] / (ms * 1e-3) / 1e12 if r.get("flops") else None
        rows.append([name, FAMILY[name], ms, r["p90_ms"], r["frames_per_s"], r["tflops_per_s"],
                     r["first_call_s"], r.get("note", "") + ("" if r.get("finite", True) else " NON-FINITE")])
    best = min((results[v]["median_ms"] for v in variants
                if v.startswith("taehv_jax") and results[v]["status"] == "ok"), default=None)
    report = {**meta, "benchmark": "decode_latency", "height": args.height, "width": args.width,
              "latents": args.latents, "batch": args.batch, "dtype": args.dtype, "vae_dim": args.vae_dim,
              "steady_frames_per_chunk": ctx.steady_frames, "variants": results, "checks": checks,
              "jax_device_memory": memory, "target_taehv_ms": TARGET_TAEHV_MS, "best_taehv_jax_ms": best,
              "args": vars(args)}
    write_json(args.json, report)

    print()
    print(f"decode one {args.latents}-latent chunk (steady state, carried state), {args.batch}x{args.height}x"
          f"{args.width}, {args.dtype}, {meta['device_kind']}; median of timed chunks")
    print(format_table(["variant", "family", "ms/chunk", "p90 ms", "frames/s", "TFLOP/s", "1st call s", "note"], rows))
    if best is not None:
        verdict = "met" if best <= TARGET_TAEHV_MS else "NOT met"
        print(f"target: TAEHV <= {TARGET_TAEHV_MS:.0f} ms per chunk on H100 -- best wm_jax TAEHV {best:.2f} ms on "
              f"{meta['device_kind']}: {verdict}" + ("" if "H100" in meta["device_kind"] else " (not an H100)"))


if __name__ == "__main__":
    main()
