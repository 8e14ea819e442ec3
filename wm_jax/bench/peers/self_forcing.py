"""Self-Forcing peer: the official causal loop of guandeh17/Self-Forcing
(`pipeline.causal_inference.CausalInferencePipeline.inference`, eager), run from the user's checkout with the
job's shapes and random weights of the job's sizes, every model call timed with the device synchronised.

Nothing of upstream is copied here: its modules are imported from the checkout at run time and upstream's loop
runs as it is. Around it (each written to the result's notes, as FlashDreams' parity harness does it):

* imports (`peers.upstream`): the package `__init__`s of `pipeline`, `wan` and `wan.modules` (which import every
  pipeline, the T2V/I2V apps, configs, distributed helpers) are not run: the submodules the loop needs are
  imported directly. A third-party package a needed module imports that fails to import here is replaced by a
  stub module (diffusers' `ModelMixin` / `ConfigMixin` / `register_to_config` get working stand-ins, as they
  are `CausalWanModel`'s bases), and `demo_utils.memory` (it calls `torch.cuda.current_device()` when
  imported, used only with `low_memory=True`) and the T5 / VAE modules are stubbed when their import fails.
* attention (`upstream.route_attention`): flash-attn is not used; `flash_attention` and `attention` in every
  upstream module that holds them (wan.modules.attention, .model, .causal_model) go to upstream's own SDPA
  fallback (`wan.modules.attention.attention` with the flash flags off) with flash-attn's dtype rule, i.e.
  torch SDPA, which the runner restricts to cuDNN on CUDA; in a float32 job (CPU checks) to torch SDPA in
  float32 (the fallback would cast to bfloat16).
* weights: `CausalWanModel.from_pretrained` is replaced, while `WanDiffusionWrapper` is built, by a stand-in
  that builds the model with the job's config on the device in the job's dtype and fills it with random
  weights (`random_weights_`); the wrapper itself (its scheduler, x0 conversion) is upstream's.
* text encoder and VAE: stubs (random prompt embeddings [1, text_len, text_dim]; a zero video of the pixel
  shape, an expanded CPU view), neither is timed.
* settings: `configs/default_config.yaml` + `configs/self_forcing_dmd.yaml` (read with PyYAML when installed,
  else the values of 33593df), with `num_frame_per_block` = the job's chunk frames and the cache window from
  the job (`local_attn_size` = sink + window frames, `sink_size` = sink frames; global cache otherwise).
* 480x832 / 1.3B facts upstream hard-codes (`frame_seq_length` 1560, 30 transformer blocks, KV caches of
  32760 tokens x 12 heads x 128, `max_attention_size`) are set from the job where they differ.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import traceback
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from wm_jax.bench.peers import upstream
from wm_jax.bench.peers.job import PeerJob, ResultWriter
from wm_jax.bench.peers.torch_timing import (ChunkGrouper, default_device_dtype, random_weights_, timed_calls,
                                             torch_dtype)

# What the adapter imports from the checkout (the markers in PEERS, plus the modules whose attention it routes).
NEEDED = ("wan.modules.attention", "wan.modules.model", "wan.modules.causal_model", "utils.wan_wrapper",
          "pipeline.causal_inference")
# Packages whose __init__ imports far more than the loop needs; their submodules are imported directly.
BYPASSED_PACKAGES = ("pipeline", "wan", "wan.modules")
# Upstream modules the needed ones import but the timed path does not use: imported when they import here,
# else stubbed (each raises on a CPU-only torch: torch.cuda.current_device() at import time).
OFF_PATH = {
    "demo_utils.memory": "the loop uses it only with low_memory=True, which the adapter does not pass",
    "wan.modules.tokenizers": "the T5 tokenizer; the text encoder is stubbed",
    "wan.modules.t5": "the T5 text encoder; stubbed",
    "wan.modules.vae": "the Wan VAE; stubbed",
}
# configs/default_config.yaml merged with configs/self_forcing_dmd.yaml at 33593df: the keys the loop reads.
DMD_SETTINGS = {"denoising_step_list": [1000, 750, 500, 250], "warp_denoising_step": True,
                "num_frame_per_block": 3, "independent_first_frame": False, "context_noise": 0,
                "model_kwargs": {"timestep_shift": 5.0}}
PATCH_SIZE = (1, 2, 2)
PROMPT = "A quiet forest path at dawn, mist between the trees, the camera slowly moving forward."


def run(job: PeerJob, writer: ResultWriter, device: torch.device) -> None:
    if not job.upstream_dir:
        raise ValueError("self-forcing needs upstream_dir: a checkout of guandeh17/Self-Forcing")
    root = Path(job.upstream_dir).expanduser().resolve()
    dtype = torch_dtype(job.dtype)
    cfg = dict(job.model)
    _check_job(job, cfg)
    total_frames = job.total_blocks * job.chunk_frames

    mods = _import_upstream(root, writer)
    upstream.route_attention(root, mods["wan.modules.attention"], dtype, writer)
    settings = _settings(root, writer)

    # Upstream's own step list, when it has the job's number of denoise passes.
    steps = list(settings["denoising_step_list"])
    if len(steps) != len(job.timesteps):
        raise ValueError(f"self-forcing: upstream's denoising_step_list {steps} has {len(steps)} steps, the job runs "
                         f"{len(job.timesteps)} denoise passes per chunk ({list(job.timesteps)})")
    if settings["num_frame_per_block"] != job.chunk_frames:
        writer.note(f"num_frame_per_block {job.chunk_frames} (the job's chunk frames; self_forcing_dmd.yaml: "
                    f"{settings['num_frame_per_block']})")
    if settings["independent_first_frame"]:
        raise ValueError("self-forcing: the config asks for independent_first_frame; the adapter runs equal "
                         f"blocks of {job.chunk_frames} frames")
    model_kwargs = dict(settings["model_kwargs"])
    wrapper_cls = mods["utils.wan_wrapper"].WanDiffusionWrapper
    local_attn_size, sink_size = job.upstream_cache()
    if local_attn_size != -1:
        model_kwargs["local_attn_size"] = local_attn_size
        if "sink_size" in inspect.signature(wrapper_cls.__init__).parameters:
            model_kwargs["sink_size"] = sink_size
        elif sink_size:
            writer.note(f"upstream's WanDiffusionWrapper has no sink_size: the window of {local_attn_size} frames "
                        f"keeps no sink (the job asks for {sink_size} sink frames)")
            sink_size = 0
        writer.note(f"cache window: local_attn_size {local_attn_size} frames (sink {job.sink_frames} + ring "
                    f"{job.ring_frames} + the chunk being denoised), sink_size {sink_size}")
    args = SimpleNamespace(**{**settings, "num_frame_per_block": job.chunk_frames, "model_kwargs": model_kwargs})
    shift = model_kwargs.get("timestep_shift")
    if shift is not None and float(shift) != float(job.shift):
        writer.note(f"timestep_shift {shift} (upstream's config; the job's shift {job.shift} changes no work)")
    if float(settings["context_noise"]) != float(job.context_timestep):
        writer.note(f"context_noise {settings['context_noise']} (upstream's config; the job's context timestep "
                    f"{job.context_timestep} changes no work)")

    # The generator: upstream's wrapper around a CausalWanModel built here (no checkpoint files).
    model_cls = mods["wan.modules.causal_model"].CausalWanModel
    built: list[tuple[torch.nn.Module, int]] = []

    def from_pretrained(cls, *_, local_attn_size=-1, sink_size=0, **__):
        with default_device_dtype(device, dtype):
            model = cls(model_type="t2v", patch_size=PATCH_SIZE, text_len=cfg["text_len"], in_dim=cfg["in_dim"],
                        dim=cfg["dim"], ffn_dim=cfg["ffn_dim"], freq_dim=cfg["freq_dim"], text_dim=cfg["text_dim"],
                        out_dim=cfg["out_dim"], num_heads=cfg["num_heads"], num_layers=cfg["num_layers"],
                        local_attn_size=local_attn_size, sink_size=sink_size, qk_norm=True, cross_attn_norm=True,
                        eps=cfg["eps"])
        built.append((model, random_weights_(model, job.seed)))
        return model

    had_own = "from_pretrained" in model_cls.__dict__
    original = model_cls.__dict__.get("from_pretrained")
    model_cls.from_pretrained = classmethod(from_pretrained)
    try:
        generator = wrapper_cls(**model_kwargs, is_causal=True)
    finally:
        if had_own:
            model_cls.from_pretrained = original
        else:
            del model_cls.from_pretrained
    if len(built) != 1 or generator.model is not built[0][0]:
        raise RuntimeError("self-forcing: WanDiffusionWrapper did not build its model through "
                           "CausalWanModel.from_pretrained; upstream differs from 33593df")
    model, num_params = built[0]
    writer.note(f"weights: CausalWanModel.from_pretrained replaced while WanDiffusionWrapper(**{model_kwargs}, "
                f"is_causal=True) was built: the model is built from the job's config on {device} in {job.dtype} "
                f"with random weights ({num_params:,} parameters, seed {job.seed}); no checkpoint is read")

    text_encoder = _TextEncoderStub(cfg["text_len"], cfg["text_dim"], job.text_tokens, dtype, device, job.seed + 1)
    vae = _VAEStub(job.pixel_height, job.pixel_width)
    writer.note(f"text encoder stubbed: prompt_embeds = random [1, {cfg['text_len']}, {cfg['text_dim']}] in "
                f"{job.dtype} on {device} ({job.text_tokens} tokens, zero padding), outside the timed calls")
    writer.note("VAE stubbed: decode_to_pixel returns zeros of the pixel shape [1, 1 + 4 (F - 1), 3, "
                f"{job.pixel_height}, {job.pixel_width}] (an expanded CPU view: no decode, no device memory)")

    pipeline = mods["pipeline.causal_inference"].CausalInferencePipeline(
        args, device=device, generator=generator, text_encoder=text_encoder, vae=vae)
    kv_tokens = _size_caches(pipeline, model, job, cfg, dtype, local_attn_size, total_frames, writer)

    step_list = [float(t) for t in pipeline.denoising_step_list.reshape(-1).tolist()]
    context = float(args.context_noise)
    if any(abs(t - context) < 0.5 for t in step_list):
        raise ValueError(f"self-forcing: a denoise step {step_list} equals the context timestep {context}; the "
                         "adapter tells denoise and commit calls apart by their timestep")
    writer.set(config={
        "model": {key: _plain(getattr(model, key, None)) for key in (
            "model_type", "patch_size", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim",
            "text_dim", "text_len", "freq_dim", "eps", "qk_norm", "cross_attn_norm", "local_attn_size")}
        | {"sink_size": sink_size, "head_dim": cfg["dim"] // cfg["num_heads"]},
        "num_params": num_params,
        "dtype": job.dtype,
        "device": str(device),
        "denoising_step_list": steps,
        "warp_denoising_step": bool(args.warp_denoising_step),
        "timesteps": step_list,
        "job_timesteps": list(job.timesteps),
        "timestep_shift": shift,
        "context_noise": args.context_noise,
        "num_frame_per_block": pipeline.num_frame_per_block,
        "total_blocks": job.total_blocks,
        "total_frames": total_frames,
        "noise_shape": [1, total_frames, job.latent_channels, job.latent_height, job.latent_width],
        "frame_seq_length": pipeline.frame_seq_length,
        "kv_cache_tokens": kv_tokens,
        "kv_cache_layers": pipeline.num_transformer_blocks,
        "local_attn_size": local_attn_size,
        "calls_per_block": len(step_list) + 1,
        "loop": "pipeline.causal_inference.CausalInferencePipeline.inference (eager)",
        "attention": "upstream's SDPA fallback (torch scaled_dot_product_attention)",
    })

    # Noise in upstream's layout [B, F, C, H, W]; the global seed drives the loop's re-noising (randn_like).
    torch.manual_seed(job.seed)
    gen = torch.Generator(device=device).manual_seed(job.seed)
    noise = torch.randn([1, total_frames, job.latent_channels, job.latent_height, job.latent_width],
                        generator=gen, device=device, dtype=dtype)

    with torch.no_grad():
        for _ in range(job.warmup_rollouts):  # untimed: cuDNN builds a graph per new key length on first use
            start = time.perf_counter()
            pipeline.inference(noise=noise, text_prompts=[PROMPT], return_latents=False)
            writer.note(f"warm-up: one whole inference with the same inputs, untimed, before the timed one "
                        f"({time.perf_counter() - start:.1f} s)")
        chunks = ChunkGrouper(writer, len(step_list), context, job.total_blocks, steps=step_list)
        with timed_calls(generator, "forward", device, lambda ms, a, kw: chunks.add(ms, _timestep_of(a, kw))):
            pipeline.inference(noise=noise, text_prompts=[PROMPT], return_latents=False)
    chunks.finish()


def _check_job(job: PeerJob, cfg: dict) -> None:
    for key in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "text_len",
                "freq_dim", "eps"):
        if key not in cfg:
            raise ValueError(f"self-forcing: the job's model config has no {key!r}")
    if cfg.get("image_dim") or cfg.get("camera_channels"):
        raise ValueError("self-forcing is text-to-video: the job's model has image or camera inputs")
    if job.latent_channels != cfg["in_dim"]:
        raise ValueError(f"self-forcing: latent_channels {job.latent_channels} != the model's in_dim {cfg['in_dim']}")
    if job.latent_height % PATCH_SIZE[1] or job.latent_width % PATCH_SIZE[2]:
        raise ValueError(f"self-forcing: latent {job.latent_height}x{job.latent_width} is not a multiple of the "
                         f"patch {PATCH_SIZE[1:]}")
    tokens = (job.latent_height // PATCH_SIZE[1]) * (job.latent_width // PATCH_SIZE[2])
    if tokens != job.tokens_per_frame:
        raise ValueError(f"self-forcing: tokens_per_frame {job.tokens_per_frame} != {tokens} (latent "
                         f"{job.latent_height}x{job.latent_width}, patch 2x2)")
    if job.text_tokens > cfg["text_len"]:
        raise ValueError(f"self-forcing: text_tokens {job.text_tokens} > text_len {cfg['text_len']}")


# ----------------------------------------------------------------------------------------------------- imports

def _import_upstream(root: Path, writer: ResultWriter) -> dict[str, types.ModuleType]:
    """The modules in NEEDED, imported from `root` (first on sys.path), with the bypasses and stubs above."""
    tops = upstream.checkout_first(root)
    before = set(sys.modules)
    upstream.register_packages(root, BYPASSED_PACKAGES, "import every pipeline / the T2V, I2V apps", writer)
    for name, use in OFF_PATH.items():
        if not root.joinpath(*name.split(".")).with_suffix(".py").is_file():
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - e.g. torch.cuda.current_device() at import on a CPU machine
            upstream.stub(name, f"its import fails here: {type(err).__name__}: {err}", writer, use)

    for _ in range(64):
        try:
            return {name: importlib.import_module(name) for name in NEEDED}
        except ImportError as err:
            _stub_missing(err, root, tops, before, writer)
    raise RuntimeError("self-forcing: more than 64 missing modules while importing upstream")


def _stub_missing(err: ImportError, root: Path, tops: set[str], before: set[str], writer: ResultWriter) -> None:
    """Stubs the third-party module whose import failed at the deepest upstream import statement in `err`'s
    traceback; re-raises `err` when the failure is upstream's own or in a module imported before."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if upstream.under(f.filename, root)]
    line = (frames[-1].line or "") if frames else ""
    match = re.match(r"\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", line)
    target = (match.group(1) or match.group(2)) if match else (err.name or "")
    top = target.split(".")[0]
    if not target or top in tops or (err.name or "").split(".")[0] in tops:
        raise err
    where = f"{Path(frames[-1].filename).relative_to(root)}:{frames[-1].lineno}" if frames else "upstream"
    if top in sys.modules and upstream.is_stub(sys.modules[top]):
        name = target  # a submodule of a package stubbed already
        if name in sys.modules and upstream.is_stub(sys.modules[name]):
            raise err
    elif top in before:
        raise ImportError(f"self-forcing: {where} imports {target}, which fails here ({err}); {top} was imported "
                          "before upstream, so it is not stubbed") from err
    else:
        name = top
    why = "not installed" if isinstance(err, ModuleNotFoundError) and err.name and \
        err.name.split(".")[0] == top else f"fails to import: {err}"
    upstream.stub(name, f"{why}; imported by {where}", writer)


# ---------------------------------------------------------------------------------------------------- config

def _settings(root: Path, writer: ResultWriter) -> dict[str, Any]:
    settings = {key: (dict(value) if isinstance(value, dict) else value) for key, value in DMD_SETTINGS.items()}
    paths = [root / "configs" / "default_config.yaml", root / "configs" / "self_forcing_dmd.yaml"]
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None and all(p.is_file() for p in paths):
        merged: dict[str, Any] = {}
        for path in paths:  # OmegaConf.merge(default, dmd) as inference.py does, for the top-level keys read here
            merged.update(yaml.safe_load(path.read_text()) or {})
        for key in settings:
            if key in merged:
                settings[key] = merged[key]
        source = "configs/default_config.yaml + configs/self_forcing_dmd.yaml (read with PyYAML)"
    else:
        source = "the values of configs/self_forcing_dmd.yaml at 33593df (PyYAML or the files are missing)"
    writer.note(f"settings from {source}: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    return settings


# -------------------------------------------------------------------------------------------------- caches

def _size_caches(pipeline, model, job: PeerJob, cfg: dict, dtype: torch.dtype, local_attn_size: int,
                 total_frames: int, writer: ResultWriter) -> int:
    """Sets upstream's 480x832 / 1.3B facts from the job where they differ; returns the KV cache tokens."""
    heads, head_dim, layers = cfg["num_heads"], cfg["dim"] // cfg["num_heads"], cfg["num_layers"]
    for attr, value in (("frame_seq_length", job.tokens_per_frame), ("num_transformer_blocks", layers)):
        if getattr(pipeline, attr) != value:
            writer.note(f"override: pipeline.{attr} {getattr(pipeline, attr)} -> {value} (the job's "
                        f"{'tokens per latent frame' if attr == 'frame_seq_length' else 'transformer blocks'})")
            setattr(pipeline, attr, value)
    needed = (local_attn_size if local_attn_size != -1 else total_frames) * job.tokens_per_frame

    # Upstream's cache builders, probed on the meta device: kept when they build what the job needs.
    probe = torch.device("meta")
    pipeline._initialize_kv_cache(batch_size=1, dtype=dtype, device=probe)
    pipeline._initialize_crossattn_cache(batch_size=1, dtype=dtype, device=probe)
    kv, cross = pipeline.kv_cache1, pipeline.crossattn_cache
    pipeline.kv_cache1, pipeline.crossattn_cache = None, None  # inference() builds them when kv_cache1 is None
    kv_shape = tuple(kv[0]["k"].shape) if kv else None
    ok_kv = kv_shape is not None and len(kv) == layers and kv_shape[2:] == (heads, head_dim) and kv_shape[1] >= needed and (
        local_attn_size == -1 or kv_shape[1] == needed)
    kv_tokens = kv_shape[1] if ok_kv else needed
    if not ok_kv:
        def init_kv(batch_size, dtype, device):
            pipeline.kv_cache1 = [{"k": torch.zeros([batch_size, needed, heads, head_dim], dtype=dtype, device=device),
                                   "v": torch.zeros([batch_size, needed, heads, head_dim], dtype=dtype, device=device),
                                   "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                                   "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}
                                  for _ in range(layers)]

        pipeline._initialize_kv_cache = init_kv
        writer.note(f"override: KV cache {len(kv)} x {list(kv_shape or ())} (upstream's "
                    f"_initialize_kv_cache) -> {layers} x [1, {needed}, {heads}, {head_dim}] (k, v, global/local end "
                    f"index: upstream's layout, sized for {needed // job.tokens_per_frame} frames of "
                    f"{job.tokens_per_frame} tokens)")
    cross_shape = tuple(cross[0]["k"].shape) if cross else None
    if not (cross_shape is not None and len(cross) >= layers and cross_shape[1:] == (cfg["text_len"], heads, head_dim)):
        def init_cross(batch_size, dtype, device):
            pipeline.crossattn_cache = [
                {"k": torch.zeros([batch_size, cfg["text_len"], heads, head_dim], dtype=dtype, device=device),
                 "v": torch.zeros([batch_size, cfg["text_len"], heads, head_dim], dtype=dtype, device=device),
                 "is_init": False} for _ in range(layers)]

        pipeline._initialize_crossattn_cache = init_cross
        writer.note(f"override: cross-attention cache {len(cross)} x {list(cross_shape or ())} -> "
                    f"{layers} x [1, {cfg['text_len']}, {heads}, {head_dim}] (upstream's layout; filled on the "
                    "first call)")

    # Each self-attention's window (upstream: 32760 tokens, or local_attn_size x 1560).
    want = needed if local_attn_size != -1 else None
    changed = set()
    for module in model.modules():
        if hasattr(module, "max_attention_size"):
            have = module.max_attention_size
            value = want if want is not None else max(have, needed)
            if have != value:
                changed.add((have, value))
                module.max_attention_size = value
    for have, value in sorted(changed):
        writer.note(f"override: self-attention max_attention_size {have} -> {value} tokens "
                    f"({value // job.tokens_per_frame} frames of {job.tokens_per_frame} tokens)")
    chunk_tokens = job.chunk_frames * job.tokens_per_frame
    if getattr(pipeline.generator, "seq_len", chunk_tokens) < chunk_tokens:
        writer.note(f"override: WanDiffusionWrapper.seq_len {pipeline.generator.seq_len} -> {chunk_tokens}")
        pipeline.generator.seq_len = chunk_tokens
    return kv_tokens


# ------------------------------------------------------------------------------------------------- stubs, timing

class _TextEncoderStub(torch.nn.Module):
    def __init__(self, text_len, text_dim, tokens, dtype, device, seed):
        super().__init__()
        gen = torch.Generator(device=device).manual_seed(seed)
        embeds = torch.zeros([1, text_len, text_dim], dtype=dtype, device=device)
        embeds[:, :tokens] = torch.randn([1, tokens, text_dim], generator=gen, device=device, dtype=dtype)
        self.embeds = embeds

    def forward(self, text_prompts):
        return {"prompt_embeds": self.embeds.expand(len(text_prompts), -1, -1)}


class _VAEStub(torch.nn.Module):
    def __init__(self, height, width):
        super().__init__()
        self.height, self.width = height, width

    def decode_to_pixel(self, latent, use_cache=False):
        b, f = latent.shape[:2]
        return torch.zeros((), dtype=torch.float32).expand(b, 1 + 4 * (f - 1), 3, self.height, self.width)


def _timestep_of(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
    return float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
