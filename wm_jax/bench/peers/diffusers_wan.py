"""diffusers-wan peer: one bidirectional DiT evaluation of diffusers' `WanTransformer3DModel` (one denoising
step of Wan 2.1 T2V, the whole clip's tokens at once), eager and torch.compile'd.

The model is built from our WanConfig (`job.model`) directly on the device in `job.dtype`, with the modules
diffusers' `from_pretrained` keeps in float32 (`_keep_in_fp32_modules`: time embedder, modulation tables,
cross-attention norm) in float32 as a real bf16 checkpoint load leaves them, and filled with random weights.
Inputs follow `WanPipeline`: latents [1, in_dim, forward_frames, latent_height, latent_width] in the model
dtype, an integer timestep [1], text features [1, text_len, text_dim] (`text_tokens` random rows, zero pad),
all under `torch.no_grad()`. Attention goes through diffusers' "native" backend (torch SDPA), which the
runner restricts to cuDNN on CUDA; the aten SDPA op that actually ran is recorded.

`job.upstream_dir`: a diffusers checkout, imported from `<dir>/src` ahead of any installed diffusers;
None: the installed package.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from wm_jax.bench.peers.job import PeerJob, ResultWriter
from wm_jax.bench.peers.torch_timing import default_device_dtype, random_weights_, timed, torch_dtype
from wm_jax.models.config import PATCH_SIZE, WanConfig

MODULE = "diffusers.models.transformers.transformer_wan"
CLIP_TOKENS = 257  # CLIP ViT-H/14 tokens per image (Wan2.1 I2V)
TIMESTEP = 999  # the first step of a Wan denoising schedule; the cost does not depend on it


def import_diffusers_wan(upstream_dir: str | None, writer: ResultWriter):
    """diffusers' `transformer_wan` module: from `<upstream_dir>/src` when given (ahead of any installed
    diffusers; an error if another diffusers was imported instead), else the installed package."""
    src = None
    if upstream_dir:
        src = Path(upstream_dir).expanduser().resolve() / "src"
        if not (src / "diffusers").is_dir():
            raise FileNotFoundError(f"{upstream_dir}: no src/diffusers (expected a diffusers checkout)")
        if "diffusers" in sys.modules:
            raise RuntimeError(f"diffusers was imported before the checkout {src} could be put first on sys.path")
        sys.path.insert(0, str(src))
    module = importlib.import_module(MODULE)
    import diffusers

    version = getattr(diffusers, "__version__", "unknown")
    path = Path(module.__file__).resolve()
    if src is not None and not path.is_relative_to(src):
        raise ImportError(f"imported {MODULE} from {path}, not from the checkout {src}")
    writer.note(f"diffusers {version} ({'checkout' if src else 'installed'}): {path}")
    return module, version, path


def diffusers_kwargs(cfg: WanConfig) -> dict[str, Any]:
    """Our WanConfig as `WanTransformer3DModel(**kwargs)` (the same mapping as tests/wan_testlib.py)."""
    if cfg.camera_channels:
        raise ValueError(f"diffusers' WanTransformer3DModel has no camera layers (camera_channels "
                         f"{cfg.camera_channels}); it cannot stand for this model")
    kwargs = dict(patch_size=tuple(PATCH_SIZE), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                  in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                  ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=cfg.image_dim,
                  added_kv_proj_dim=cfg.dim if cfg.image_dim else None)
    if cfg.image_pos_tokens:  # FLF2V only; older diffusers lack the argument
        kwargs["pos_embed_seq_len"] = cfg.image_pos_tokens
    return kwargs


def keep_fp32_(model: torch.nn.Module) -> list[str]:
    """Casts the parameters diffusers' loader keeps in float32 (a name part in `_keep_in_fp32_modules`, the
    rule of `from_pretrained(torch_dtype=...)`) to float32, in place on their device; returns their names."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    names = []
    for name, p in model.named_parameters():
        if keep.intersection(name.split(".")) and p.dtype != torch.float32:
            p.data = p.data.float()
            names.append(name)
    return names


def use_sdpa(model: torch.nn.Module) -> str:
    """Routes diffusers' attention through torch SDPA (backend "native", whatever DIFFUSERS_ATTN_BACKEND says)
    where the model has attention backends; returns a line naming the processors and backends in use."""
    how = "diffusers default (this version has no set_attention_backend)"
    if hasattr(model, "set_attention_backend"):
        model.set_attention_backend("native")
        how = "set_attention_backend('native')"
    processors: dict[str, set[str]] = {}
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and not isinstance(processor, torch.nn.Module):
            backend = getattr(processor, "_attention_backend", None)
            processors.setdefault(type(processor).__name__, set()).add(str(getattr(backend, "value", backend)))
    listed = ", ".join(f"{name} (backend {'/'.join(sorted(b))})" for name, b in sorted(processors.items()))
    return f"attention: {how}; processors: {listed or 'none found'}"


def sdpa_ops(call: Callable[[], Any]) -> list[str]:
    """Runs `call` once under the profiler (CPU activity: op names only) and returns the aten attention ops
    that ran, e.g. aten::_scaled_dot_product_cudnn_attention."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "attention" in e.key})


def inductor_cache_note() -> str:
    """Where inductor caches compiled kernels and whether that cache already held anything: a warm cache makes
    `compile_s` a cache load (about 4 s instead of 24 s for the tiny CPU model), not a cold compile."""
    import os

    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        path = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    except Exception:  # noqa: BLE001 - a private helper; the note is informational
        return "inductor cache: location unknown"
    warm = path.is_dir() and any(path.iterdir())
    return (f"inductor cache {path}: {'already populated, compile_s may be a warm-cache figure' if warm else 'empty'}"
            " (TORCHINDUCTOR_CACHE_DIR=<new dir> for a cold compile)")


def make_inputs(job: PeerJob, cfg: WanConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(job.seed + 1)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    text = torch.zeros(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    text[:, :min(job.text_tokens, cfg.text_len)] = randn(1, min(job.text_tokens, cfg.text_len), cfg.text_dim)
    inputs = dict(hidden_states=randn(1, cfg.in_dim, job.forward_frames, job.latent_height, job.latent_width),
                  timestep=torch.full((1,), TIMESTEP, device=device, dtype=torch.long),
                  encoder_hidden_states=text, return_dict=False)
    if cfg.image_dim:  # I2V: one image's CLIP tokens; FLF2V: two images (first, last), which the model folds
        images = 2 if cfg.image_pos_tokens else 1  # into one sequence of image_pos_tokens for its position table
        tokens = cfg.image_pos_tokens // 2 if cfg.image_pos_tokens else CLIP_TOKENS
        inputs["encoder_hidden_states_image"] = randn(images, tokens, cfg.image_dim)
    return inputs


def run(job: PeerJob, writer: ResultWriter, device: torch.device) -> None:
    dtype = torch_dtype(job.dtype)
    cfg = WanConfig.from_dict(job.model)
    module, version, path = import_diffusers_wan(job.upstream_dir, writer)
    kwargs = diffusers_kwargs(cfg)
    if job.latent_channels != cfg.in_dim:
        writer.note(f"latents have the model's in_dim {cfg.in_dim} channels (job latent_channels "
                    f"{job.latent_channels})")
    if not cfg.fp32_modulation:
        writer.note("our config runs modulation in the compute dtype; diffusers keeps it in float32")

    with default_device_dtype(device, dtype):
        model = module.WanTransformer3DModel(**kwargs)
    fp32 = keep_fp32_(model)
    if fp32:
        writer.note(f"{len(fp32)} parameters kept in float32 as diffusers' from_pretrained does "
                    f"(_keep_in_fp32_modules {list(model._keep_in_fp32_modules)})")
    num_params = random_weights_(model, job.seed)
    model.eval().requires_grad_(False)
    writer.note(use_sdpa(model))

    p_t, p_h, p_w = PATCH_SIZE
    tokens = (job.forward_frames // p_t) * (job.latent_height // p_h) * (job.latent_width // p_w)
    writer.set(config={"diffusers_version": version, "diffusers_file": str(path),
                       "class": f"{type(model).__module__}.{type(model).__name__}",
                       "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                       "num_params": num_params, "tokens": tokens, "text_len": cfg.text_len,
                       "text_tokens": job.text_tokens, "frames": job.forward_frames,
                       "latent_hw": [job.latent_height, job.latent_width], "dtype": job.dtype,
                       "fp32_params": len(fp32), "timestep": TIMESTEP, "grad": "torch.no_grad"})
    inputs = make_inputs(job, cfg, device, dtype)

    def measure(variant: str, call: Callable[[], Any]) -> None:
        """`job.forward_warmup` untimed calls (the first under the profiler, noting the SDPA ops that ran),
        then `job.forward_iters` timed ones, each written at once."""
        for i in range(job.forward_warmup):
            if i == 0:
                writer.note(f"{variant} SDPA ops: {', '.join(sdpa_ops(call)) or 'none seen'}")
            else:
                call()
        for _ in range(job.forward_iters):
            writer.forward(variant, timed(call, device)[0])

    with torch.no_grad():
        measure("eager", lambda: model(**inputs))
        if not job.compile:
            return
        writer.note("compiled: torch.compile(model) (default mode, inductor)")
        writer.note(inductor_cache_note())
        try:
            compiled = torch.compile(model)
            compile_s = timed(lambda: compiled(**inputs), device)[0] / 1e3
            entry = writer.data["forward"].setdefault("compiled", {"ms": [], "compile_s": None})
            entry["compile_s"] = compile_s
            writer.flush()
            measure("compiled", lambda: compiled(**inputs))
        except Exception as err:  # noqa: BLE001 - keep the eager figures; the row says compile failed
            lines = [line for line in str(err).strip().splitlines() if line.strip()]
            last = lines[-1].strip() if lines else type(err).__name__
            writer.note(f"torch.compile failed: {type(err).__name__}: {last}")
            writer.set(compile_error=f"{type(err).__name__}: {last}")
