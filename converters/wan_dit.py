"""Wan DiT checkpoints -> `wm_jax.models.wan.WanModel`.

Accepted layouts (all normalised to the ORIGINAL Wan key names first, then mapped by one rule table):
  * original Wan / LingBot layout: `diffusion_pytorch_model.safetensors`, or shards + `*.index.json`;
  * diffusers layout (`WanTransformer3DModel`, e.g. `Wan-AI/*-Diffusers`);
  * Self-Forcing / CausVid / Causal-Forcing: keys prefixed `model.` (also `net.`, `_fsdp_wrapped_module.`,
    e.g. Causal-Forcing's EMA `model._fsdp_wrapped_module.`), `generator_ema` preferred over `generator`,
    `critic` dropped; `.pt` only with allow_pickle. Every remaining key must match a rule (upstream loads
    with `strict=False`; a key we cannot place is an error here, never a silent miss).
Expert folders (`high_noise_model/` + `low_noise_model/`) are converted by `convert_experts`.

Causal models are trained for one number of latent frames per AR block (Causal-Forcing: frame-wise 1,
chunk-wise 3). Where the checkpoint tells (a training config beside it with `num_frame_per_block`, or
upstream's file naming: `framewise/...`, `chunkwise/...`, `.../framewise-2step.pt`), the manifest records
it as `frames_per_block`, and `check_frames_per_block` refuses a recipe that streams other blocks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.core import (SQUEEZE_LEADING, ConversionReport, Rule, convert_tensors, iter_converted, linear_rules,
                             load_converted, patch_conv_as_dense, with_params)
from wm_jax.io import checkpoint as ckpt
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import RenamedSource, Source
from wm_jax.models.config import PATCH_SIZE, WanConfig, infer_config
from wm_jax.models.wan import WanModel

KIND = "wan_dit"


def _block(src: str, dst: str) -> list[Rule]:
    return linear_rules(f"blocks.{{i}}.{src}", f"blocks/{dst}")


def _attention(src: str, dst: str, extra: tuple[str, ...] = ()) -> list[Rule]:
    rules = []
    for name in ("q", "k", "v", "o", *extra):
        rules += _block(f"{src}.{name}", f"{dst}/{name}")
    for norm in ("norm_q", "norm_k") + (("norm_k_img",) if extra else ()):
        rules.append(Rule(f"blocks.{{i}}.{src}.{norm}.weight", f"blocks/{dst}/{norm}/scale"))
    return rules


# Every key of an original-layout checkpoint and where it goes. Rules whose target the config lacks
# (image, camera) do not apply; their keys then count as unexpected.
RULES: list[Rule] = [
    Rule("patch_embedding.weight", "patch_embed/kernel", patch_conv_as_dense(PATCH_SIZE)),
    Rule("patch_embedding.bias", "patch_embed/bias"),
    *linear_rules("text_embedding.0", "text_fc1"),
    *linear_rules("text_embedding.2", "text_fc2"),
    *linear_rules("time_embedding.0", "time_fc1"),
    *linear_rules("time_embedding.2", "time_fc2"),
    *linear_rules("time_projection.1", "time_proj"),
    # Wan2.1 I2V / FLF2V CLIP image tokens.
    Rule("img_emb.proj.0.weight", "image_embed/norm_in/scale"),
    Rule("img_emb.proj.0.bias", "image_embed/norm_in/bias"),
    *linear_rules("img_emb.proj.1", "image_embed/fc1"),
    *linear_rules("img_emb.proj.3", "image_embed/fc2"),
    Rule("img_emb.proj.4.weight", "image_embed/norm_out/scale"),
    Rule("img_emb.proj.4.bias", "image_embed/norm_out/bias"),
    Rule("img_emb.emb_pos", "image_embed/pos", SQUEEZE_LEADING),
    # LingBot camera embedding.
    *linear_rules("patch_embedding_wancamctrl", "camera_embed/patch"),
    *linear_rules("c2ws_hidden_states_layer1", "camera_embed/fc1"),
    *linear_rules("c2ws_hidden_states_layer2", "camera_embed/fc2"),
    # Blocks (stacked on a leading layer axis).
    Rule("blocks.{i}.modulation", "blocks/modulation", SQUEEZE_LEADING),
    *_attention("self_attn", "self_attn"),
    Rule("blocks.{i}.norm3.weight", "blocks/norm3/scale"),
    Rule("blocks.{i}.norm3.bias", "blocks/norm3/bias"),
    *_attention("cross_attn", "cross_attn"),
    *_block("cross_attn.k_img", "cross_attn/k_img"),
    *_block("cross_attn.v_img", "cross_attn/v_img"),
    Rule("blocks.{i}.cross_attn.norm_k_img.weight", "blocks/cross_attn/norm_k_img/scale"),
    *_block("ffn.0", "ffn/fc1"),
    *_block("ffn.2", "ffn/fc2"),
    *_block("cam_injector_layer1", "camera/fc1"),
    *_block("cam_injector_layer2", "camera/fc2"),
    *_block("cam_scale_layer", "camera/scale"),
    *_block("cam_shift_layer", "camera/shift"),
    Rule("head.modulation", "head/modulation", SQUEEZE_LEADING),
    *linear_rules("head.head", "head/linear"),
]

# Buffers some exporters include; they carry no learned values.
IGNORED = (r"freqs\Z",)

# Parameters kept in float32 whatever the storage dtype: modulation tables and norm weights.
_FP32_PARAM = re.compile(r"(modulation|norm_[a-z_]+/scale|norm3/(scale|bias)|norm_(in|out)/(scale|bias))\Z")

# ---------------------------------------------------------------------------------------------------
# Key-space normalisation: diffusers and Self-Forcing names -> original Wan names.
# ---------------------------------------------------------------------------------------------------

_DIFFUSERS_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^condition_embedder\.image_embedder\.pos_embed$", "img_emb.emb_pos"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # diffusers' block norm2 is the affine cross-attention norm, i.e. original norm3.
    (r"(blocks\.\d+)\.norm2\.", r"\1.norm3."),
]


def diffusers_to_original(key: str) -> str:
    for pattern, repl in _DIFFUSERS_TO_ORIGINAL:
        key = re.sub(pattern, repl, key)
    return key


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "net.", "model.", "diffusion_model.")
_TRAINING_ENTRIES = ("generator_ema.", "generator.", "critic.")


def layout_of(keys: set[str]) -> str:
    """'original', 'diffusers' or 'prefixed' (Self-Forcing style), from the key names."""
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys):
        return "diffusers"
    if "patch_embedding.weight" in keys:
        return "original"
    if any(k.endswith("patch_embedding.weight") for k in keys):
        return "prefixed"
    return "unknown"


def matches(keys: set[str]) -> bool:
    return layout_of(keys) != "unknown"


def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def normalize_source(source: Source) -> Source:
    """A view of `source` under original Wan key names, whatever its layout."""
    keys = set(source.keys())
    layout = layout_of(keys)
    if layout == "original":
        return source
    if layout == "diffusers":
        return RenamedSource(source, diffusers_to_original, f"{source.description} (diffusers layout)")
    if layout == "prefixed":
        entries = [e for e in _TRAINING_ENTRIES[:2] if any(k.startswith(e) for k in keys)]
        keep = entries[0] if entries else None  # generator_ema wins over generator

        def rename(key: str) -> str | None:
            if keep is not None:
                if not key.startswith(keep):
                    return None  # the other generator copy, critic weights
                key = key[len(keep):]
            elif key.startswith("critic."):
                return None
            return _strip_wrappers(key)

        renamed = RenamedSource(source, rename, f"{source.description} ({keep or 'model.'}-prefixed)")
        if "patch_embedding.weight" not in set(renamed.keys()):
            tops = sorted({k.split(".", 1)[0] for k in keys})
            raise CheckpointError(f"{source.description}: no Wan DiT under a generator_ema, generator or model. "
                                  f"prefix (the training entries Self-Forcing, CausVid and Causal-Forcing save); "
                                  f"top-level keys found: {tops[:20]}")
        return renamed
    raise CheckpointError(f"{source.description}: not a Wan DiT checkpoint (no patch_embedding.weight in any "
                          f"known layout; first keys {sorted(keys)[:6]})")


# ---------------------------------------------------------------------------------------------------
# Config + conversion.
# ---------------------------------------------------------------------------------------------------


def storage_dtype(source: Source) -> str:
    """The dtype the checkpoint stores its Linear weights in (read from the first block's FFN)."""
    dtype = np.dtype(source.read("blocks.0.ffn.0.bias").dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.name


def config_for(source: Source, overrides: Mapping[str, Any] | None = None, dtype: str | None = None) -> WanConfig:
    """Infers the config from tensor shapes of a normalised source; `overrides` win."""
    shapes = {k: source.shape(k) for k in source.keys()}
    fields = dict(overrides or {})
    fields.setdefault("param_dtype", dtype or storage_dtype(source))
    return infer_config(shapes, **fields)


def expected_params(cfg: WanConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, storage dtype) of a WanModel for `cfg` (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0)))
    spec = ckpt.param_spec(abstract)
    return {k: (shape, np.dtype(np.float32) if _FP32_PARAM.search(k) else np.dtype(jnp.dtype(cfg.param_dtype)))
            for k, (shape, _) in spec.items()}


def convert_arrays(source: Source, cfg: WanConfig, on_tensor=None):
    """Normalised source + config -> (flat numpy params, report)."""
    return convert_tensors(source, RULES, expected_params(cfg), ignore=IGNORED, on_tensor=on_tensor)


def _read_config_json(path: Path) -> dict[str, Any]:
    """Architecture overrides from a `config.json` beside the weights (original or diffusers style)."""
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return {}
    data = json.loads(cfg_file.read_text())
    out = {}
    if "num_heads" in data:
        out["num_heads"] = int(data["num_heads"])
    elif "num_attention_heads" in data:
        out["num_heads"] = int(data["num_attention_heads"])
    if "eps" in data:
        out["eps"] = float(data["eps"])
    if "text_len" in data:
        out["text_len"] = int(data["text_len"])
    return out


_BLOCK_FRAMES_LINE = re.compile(r"^num_frame_per_block\s*:\s*(\d+)\s*(#.*)?$", re.MULTILINE)
# Causal-Forcing's released layout: chunkwise/causal_forcing.pt, framewise/causal_forcing.pt,
# causal-forcing++/framewise-2step.pt (its configs: num_frame_per_block 3 chunk-wise, 1 frame-wise).
_BLOCK_NAMES = {"framewise": 1, "chunkwise": 3}


def training_frames_per_block(path: str | Path) -> tuple[int, str] | None:
    """(latent frames per AR block the checkpoint at `path` was trained for, where that was read), or None.

    Read from `num_frame_per_block` in a config beside the weights (config.json, or the one *.yaml
    that sets it), else from upstream's naming of the file and its folder (`framewise`, `chunkwise`)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    found = []
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for key in ("num_frame_per_block", "num_frames_per_block"):  # Self-Forcing's / FastVideo's spelling
            if data.get(key) is not None:
                found.append((int(data[key]), f"{key} in {config}"))
    for yaml_file in sorted(folder.glob("*.y*ml")):
        match = _BLOCK_FRAMES_LINE.search(yaml_file.read_text(errors="replace"))
        if match:
            found.append((int(match.group(1)), f"num_frame_per_block in {yaml_file}"))
    if not found:
        words = re.split(r"[^a-z0-9]+", f"{path.parent.name}/{path.stem}".lower())
        found = [(frames, f"file name {path.parent.name}/{path.name}") for name, frames in _BLOCK_NAMES.items()
                 if name in words]
    return found[0] if len({frames for frames, _ in found}) == 1 else None


def _block_words(frames: int) -> str:
    return "frame-wise, 1 latent frame per block" if frames == 1 else f"chunk-wise, {frames} latent frames per block"


def check_frames_per_block(folder: str | Path, chunk_frames: int, recipe: str) -> None:
    """Raises CheckpointError when the converted DiT in `folder` records training for another number of
    latent frames per block than `recipe` streams (`chunk_frames`); nothing when it records none."""
    manifest = ckpt.read_manifest(folder, kind=KIND)
    trained = manifest.get("frames_per_block")
    if trained is not None and int(trained) != chunk_frames:
        raise CheckpointError(
            f"{folder}: {manifest.get('source')} is a {_block_words(int(trained))} model "
            f"({manifest.get('frames_per_block_from')}); recipe {recipe} streams {_block_words(chunk_frames)}. "
            f"Use a {'frame-wise' if int(trained) == 1 else 'chunk-wise'} recipe, or that recipe's checkpoint")


def convert(source: Source, dst: str | Path, *, overwrite: bool = False, dtype: str | None = None,
            config_overrides: Mapping[str, Any] | None = None, source_path: str | Path | None = None,
            on_tensor=None) -> dict[str, Any]:
    """Converts one DiT checkpoint into a wm_jax folder (orbax params + wm_jax.json); returns the manifest."""
    ckpt.check_destination(dst, overwrite)
    source = normalize_source(source)
    overrides = {**(_read_config_json(Path(source_path)) if source_path else {}), **(config_overrides or {})}
    cfg = config_for(source, overrides, dtype)
    block = training_frames_per_block(source_path) if source_path else None
    with ckpt.atomic_folder(dst, overwrite) as tmp:
        report = ConversionReport(source.description)
        ckpt.write_params(tmp, iter_converted(source, RULES, expected_params(cfg), IGNORED, on_tensor, report))
        manifest = {"kind": KIND, "config": cfg.to_dict(), "source": report.source,
                    "num_tensors": report.num_tensors, "ignored_keys": report.ignored}
        if block is not None:
            manifest.update(frames_per_block=block[0], frames_per_block_from=block[1])
        ckpt.write_manifest(tmp, manifest)
    return manifest


def load(folder: str | Path, *, compute_dtype=jnp.float32, attention_impl: str = "auto",
         shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> WanModel:
    """Loads a converted folder into a WanModel (params restored straight into their final placement)."""
    return load_converted(folder, KIND, WanConfig,
                          lambda cfg: WanModel(cfg, compute_dtype=compute_dtype, attention_impl=attention_impl),
                          expected_params, shardings)


def load_source(source: Source, *, compute_dtype=jnp.float32, attention_impl: str = "auto",
                dtype: str | None = None, **config_overrides) -> WanModel:
    """In-memory load straight from upstream tensors (small models; no converted folder)."""
    source = normalize_source(source)
    cfg = config_for(source, config_overrides, dtype)
    flat, _ = convert_arrays(source, cfg)
    return with_params(lambda: WanModel(cfg, compute_dtype=compute_dtype, attention_impl=attention_impl), flat)


# ---------------------------------------------------------------------------------------------------
# Two-expert folders: Wan2.2 A14B / LingBot base (high_noise_model/ + low_noise_model/), or a diffusers
# pipeline folder (transformer/ = high-noise, transformer_2/ = low-noise, FastVideo's causal Wan2.2).
# ---------------------------------------------------------------------------------------------------

EXPERTS_KIND = "wan_dit_experts"
EXPERT_DIRS = ("high_noise_model", "low_noise_model")  # also the converted folder's names
DIFFUSERS_EXPERT_DIRS = ("transformer", "transformer_2")
_EXPERT_WORDS = ("high-noise", "low-noise")

# The flow-matching table wm_jax builds (`wm_jax.streaming.schedules`): FastVideo's
# SelfForcingFlowMatchScheduler with these settings; its constructor defaults where a config omits a key.
SCHEDULER_CLASS = "SelfForcingFlowMatchScheduler"
SCHEDULER_TABLE = {"num_inference_steps": (1000, 100), "num_train_timesteps": (1000, 1000), "sigma_max": (1.0, 1.0),
                   "sigma_min": (0.0, 0.003 / 1.002), "extra_one_step": (True, False),
                   "inverse_timesteps": (False, False), "reverse_sigmas": (False, False)}  # key: (needed, default)
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"


def expert_sources(path: str | Path, *, required: bool = False) -> tuple[Path, Path] | None:
    """(high-noise, low-noise) source folders of a two-expert checkpoint at `path`, or None when it is not one
    (with `required`, an error instead). Raises CheckpointError naming the missing expert when a folder has
    one expert of a pair: transformer_2/ without transformer/, transformer/ without the transformer_2/ its
    model_index.json lists, or one of high_noise_model/ / low_noise_model/."""
    path = Path(path)
    if not path.is_dir():
        if required:
            raise CheckpointError(f"{path}: expected a folder with two experts ({'/ + '.join(EXPERT_DIRS)}/ or "
                                  f"{'/ + '.join(DIFFUSERS_EXPERT_DIRS)}/)")
        return None
    index = path / "model_index.json"
    components = json.loads(index.read_text()) if index.is_file() else {}
    listed = {name for name, value in components.items() if value not in ([None, None], None)}  # [null, null]: unused
    for dirs in (EXPERT_DIRS, DIFFUSERS_EXPERT_DIRS):
        present = [(path / d).is_dir() for d in dirs]
        if all(present):
            return path / dirs[0], path / dirs[1]
        single_diffusers = dirs == DIFFUSERS_EXPERT_DIRS and present[0] and dirs[1] not in listed
        if any(present) and (required or not single_diffusers):
            missing = 1 - present.index(True)
            raise CheckpointError(f"{path}: has {dirs[1 - missing]}/ but no {dirs[missing]}/, the "
                                  f"{_EXPERT_WORDS[missing]} expert; a two-expert model needs both")
    if required:
        raise CheckpointError(f"{path}: no two-expert checkpoint here (expected {'/ + '.join(EXPERT_DIRS)}/ or "
                              f"{'/ + '.join(DIFFUSERS_EXPERT_DIRS)}/)")
    return None


def is_expert_folder(path: str | Path) -> bool:
    return expert_sources(path) is not None


def default_boundary(cfg: WanConfig) -> float:
    """SPEC boundaries: LingBot base 0.947 (camera layers), Wan2.2 I2V 0.900 (in 36), T2V 0.875."""
    if cfg.camera_channels:
        return 0.947
    return 0.900 if cfg.in_dim == 36 else 0.875


def read_scheduler(folder: str | Path) -> dict[str, Any] | None:
    """The schedule shift a checkpoint folder's `scheduler/scheduler_config.json` states ({"shift", "file"}), or
    None without one. Raises CheckpointError naming the file and key when the scheduler is not the
    flow-matching table wm_jax builds (`SCHEDULER_TABLE`), so a shift is never applied to another table."""
    file = Path(folder) / SCHEDULER_FILE
    if not file.is_file():
        return None
    config = json.loads(file.read_text())
    name = config.get("_class_name")
    if name != SCHEDULER_CLASS:
        raise CheckpointError(f"{file}: _class_name {name!r}; wm_jax builds the table of {SCHEDULER_CLASS}")
    for key, (needed, default) in SCHEDULER_TABLE.items():
        value = config.get(key, default)
        if value != needed:
            raise CheckpointError(f"{file}: {key} {value!r}{'' if key in config else ' (the default)'}; wm_jax "
                                  f"builds the table with {key} {needed!r}")
    shift = float(config.get("shift", 3.0))
    if shift <= 0:
        raise CheckpointError(f"{file}: shift {shift}; expected a positive shift")
    return {"shift": shift, "file": str(file)}


def convert_experts(src: str | Path, dst: str | Path, *, open_fn, overwrite: bool = False,
                    dtype: str | None = None, config_overrides: Mapping[str, Any] | None = None,
                    boundary: float | None = None, on_tensor=None) -> dict[str, Any]:
    """Converts both experts under one atomic destination: DST/{high,low}_noise_model + DST/wm_jax.json (with
    the source's scheduler shift, when it has a scheduler config)."""
    src = Path(src)
    sources = expert_sources(src, required=True)
    scheduler = read_scheduler(src)
    ckpt.check_destination(dst, overwrite)
    with ckpt.atomic_folder(dst, overwrite) as tmp:
        configs = {}
        for name, source in zip(EXPERT_DIRS, sources):
            manifest = convert(open_fn(source), tmp / name, dtype=dtype, config_overrides=config_overrides,
                               source_path=source, on_tensor=on_tensor)
            configs[name] = manifest["config"]
        if configs[EXPERT_DIRS[0]] != configs[EXPERT_DIRS[1]]:
            raise CheckpointError(f"{src}: the two experts have different configs: {configs}")
        cfg = WanConfig.from_dict(configs[EXPERT_DIRS[0]])
        manifest = {"kind": EXPERTS_KIND, "config": cfg.to_dict(), "source": str(src),
                    "boundary": boundary if boundary is not None else default_boundary(cfg),
                    "experts": list(EXPERT_DIRS), "expert_sources": [source.name for source in sources],
                    "scheduler": scheduler}
        ckpt.write_manifest(tmp, manifest)
    return manifest


def load_experts(folder: str | Path, *, shardings: Mapping[str, jax.sharding.Sharding] | None = None,
                 boundary: float | None = None, **load_kwargs):
    """Loads a converted expert pair as `ExpertPair` (high-noise expert while t >= boundary·1000; `boundary`
    None = the one recorded at conversion), each expert restored straight into `shardings` (one expert's flat
    shardings, used for both)."""
    from wm_jax.models.wan import ExpertPair

    manifest = ckpt.read_manifest(folder, kind=EXPERTS_KIND)
    folder = Path(folder)
    high, low = (load(folder / name, shardings=shardings, **load_kwargs) for name in EXPERT_DIRS)
    return ExpertPair(high_noise=high, low_noise=low, boundary=manifest["boundary"] if boundary is None else boundary)
