"""umT5 encoder checkpoints -> `wm_jax.models.umt5.UMT5Encoder`.

Accepted layouts, both normalised to Wan's ORIGINAL names first:
  * Wan `models_t5_umt5-xxl-enc-bf16.pth` (torch pickle: only with allow_pickle): `token_embedding.weight`,
    `blocks.{i}.{norm1,attn.{q,k,v,o},pos_embedding.embedding,norm2,ffn.{gate.0,fc1,fc2}}.weight`, `norm.weight`;
  * HF `UMT5EncoderModel` / `UMT5Model` safetensors: `shared.weight` (or `encoder.embed_tokens.weight`),
    `encoder.block.{i}.layer.0.{layer_norm,SelfAttention.{q,k,v,o,relative_attention_bias}}`,
    `encoder.block.{i}.layer.1.{layer_norm,DenseReluDense.{wi_0,wi_1,wo}}`, `encoder.final_layer_norm`;
    decoder / lm_head keys of a full model are dropped.
The config is inferred from shapes (max distance and eps from an HF `config.json` beside the weights when
there is one). The manifest records `params_sha256`, a digest of the converted parameters, which the prompt
cache uses as the encoder's identity; `load_text_encoder` builds that prompt encoder from a converted folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.core import LINEAR, Rule, as_source, convert_tensors, load_converted, make_config, with_params
from wm_jax.io import checkpoint as ckpt
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import RenamedSource, Source
from wm_jax.models.text_encoding import TEXT_LEN, TOKENIZER_FILES, TextEncoder, UMT5Tokenizer, find_tokenizer_folder
from wm_jax.models.umt5 import UMT5Config, UMT5Encoder

KIND = "umt5"

RULES: list[Rule] = [
    Rule("token_embedding.weight", "token_embedding/embedding"),
    Rule("blocks.{i}.norm1.weight", "blocks/norm1/scale"),
    *(Rule(f"blocks.{{i}}.attn.{n}.weight", f"blocks/attn/{n}/kernel", LINEAR) for n in "qkvo"),
    Rule("blocks.{i}.pos_embedding.embedding.weight", "blocks/pos_bias/embedding"),
    Rule("blocks.{i}.norm2.weight", "blocks/norm2/scale"),
    Rule("blocks.{i}.ffn.gate.0.weight", "blocks/ffn/gate/kernel", LINEAR),
    Rule("blocks.{i}.ffn.fc1.weight", "blocks/ffn/fc1/kernel", LINEAR),
    Rule("blocks.{i}.ffn.fc2.weight", "blocks/ffn/fc2/kernel", LINEAR),
    Rule("norm.weight", "norm/scale"),
]

_HF_TO_ORIGINAL = [
    (r"^shared\.weight$", "token_embedding.weight"),
    (r"^encoder\.embed_tokens\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.", "norm."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.", r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
]
_HF_DROPPED = re.compile(r"^(decoder\.|lm_head\.)")


def hf_to_original(key: str) -> str:
    for pattern, repl in _HF_TO_ORIGINAL:
        new = re.sub(pattern, repl, key)
        if new != key:
            return new
    return key


def layout_of(keys: set[str]) -> str:
    if "token_embedding.weight" in keys and "blocks.0.attn.q.weight" in keys:
        return "original"
    if any(k.startswith("encoder.block.") and ".SelfAttention." in k for k in keys) and (
            "shared.weight" in keys or "encoder.embed_tokens.weight" in keys):
        return "hf"
    return "unknown"


def matches(keys: set[str]) -> bool:
    return layout_of(keys) != "unknown"


def normalize_source(source: Source) -> Source:
    keys = set(source.keys())
    layout = layout_of(keys)
    if layout == "original":
        return source
    if layout == "hf":
        tied = "shared.weight" in keys

        def rename(key: str) -> str | None:
            if _HF_DROPPED.match(key) or (tied and key == "encoder.embed_tokens.weight"):
                return None
            return hf_to_original(key)

        return RenamedSource(source, rename, f"{source.description} (HF UMT5 layout)")
    raise CheckpointError(f"{source.description}: not a umT5 encoder checkpoint (first keys {sorted(keys)[:6]})")


def _read_hf_config(path: Path | None) -> dict[str, Any]:
    """max_distance / eps from an HF `config.json` beside the weights; refuses non-gated-GELU FFNs."""
    if path is None:
        return {}
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return {}
    data = json.loads(cfg_file.read_text())
    if data.get("model_type") not in ("umt5", "t5", "mt5"):
        return {}
    proj = data.get("feed_forward_proj", "gated-gelu")
    if proj != "gated-gelu":
        raise CheckpointError(f"{cfg_file}: feed_forward_proj {proj!r}; only umT5's 'gated-gelu' is supported")
    out = {}
    if "relative_attention_max_distance" in data:
        out["max_distance"] = int(data["relative_attention_max_distance"])
    if "layer_norm_epsilon" in data:
        out["eps"] = float(data["layer_norm_epsilon"])
    return out


def storage_dtype(source: Source) -> str:
    dtype = np.dtype(source.read("norm.weight").dtype)
    return "bfloat16" if dtype.name == "bfloat16" else dtype.name


def config_for(source: Source, overrides: Mapping[str, Any] | None = None, dtype: str | None = None) -> UMT5Config:
    """Infers the config from a normalised source's shapes; `overrides` win."""
    keys = set(source.keys())
    layers = sorted({int(k.split(".")[1]) for k in keys if re.match(r"blocks\.\d+\.", k)})
    if "token_embedding.weight" not in keys or not layers:
        raise CheckpointError(f"{source.description}: not a umT5 encoder checkpoint")
    with_bias = [i for i in layers if f"blocks.{i}.pos_embedding.embedding.weight" in keys]
    if with_bias != layers:
        raise CheckpointError(
            f"{source.description}: relative-position tables in blocks {with_bias} only; umT5 has one per "
            "layer (a T5/mT5 checkpoint with a shared table is not supported)")
    vocab, dim = source.shape("token_embedding.weight")
    buckets, heads = source.shape("blocks.0.pos_embedding.embedding.weight")
    fields: dict[str, Any] = {
        "vocab_size": vocab, "dim": dim, "dim_attn": source.shape("blocks.0.attn.q.weight")[0],
        "dim_ffn": source.shape("blocks.0.ffn.fc1.weight")[0], "num_heads": heads,
        "num_layers": layers[-1] + 1, "num_buckets": buckets}
    fields.update(overrides or {})
    fields.setdefault("param_dtype", dtype or storage_dtype(source))
    return make_config(source, UMT5Config, fields, "umT5")


def expected_params(cfg: UMT5Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))
    return ckpt.param_spec(abstract)


def convert_arrays(source: Source, cfg: UMT5Config, on_tensor=None):
    return convert_tensors(source, RULES, expected_params(cfg), on_tensor=on_tensor)


def _as_source(source, allow_pickle: bool) -> tuple[Source, Path | None]:
    """(`as_source(source)`, the path it was opened from or None)."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    return as_source(source, allow_pickle), path


# ---------------------------------------------------------------------------------------------------
# Converter interface.
# ---------------------------------------------------------------------------------------------------


def convert(source: Source | str | Path, dst: str | Path, *, overwrite: bool = False, dtype: str | None = None,
            config_overrides: Mapping[str, Any] | None = None, source_path: str | Path | None = None,
            tokenizer_path: str | Path | None = None, allow_pickle: bool = False, on_tensor=None) -> dict[str, Any]:
    """Writes a converted folder (orbax params + wm_jax.json, kind "umt5"); returns the manifest.

    If a umT5 tokenizer folder is found (`tokenizer_path`, or beside `source_path`: the folder itself or
    its `google/umt5-xxl/`), its files are copied to `dst/tokenizer/` so the folder is self-contained.
    """
    ckpt.check_destination(dst, overwrite)
    source, opened_path = _as_source(source, allow_pickle)
    source_path = Path(source_path) if source_path is not None else opened_path
    source = normalize_source(source)
    overrides = {**_read_hf_config(source_path), **(config_overrides or {})}
    cfg = config_for(source, overrides, dtype)
    tok_folder = None
    if tokenizer_path is not None:
        tok_folder = find_tokenizer_folder(Path(tokenizer_path))
        if tok_folder is None:
            raise CheckpointError(f"{tokenizer_path}: no umT5 tokenizer files ({', '.join(TOKENIZER_FILES)})")
    elif source_path is not None:
        folder = source_path if source_path.is_dir() else source_path.parent
        tok_folder = find_tokenizer_folder(folder)
    with ckpt.atomic_folder(dst, overwrite) as tmp:
        flat, report = convert_arrays(source, cfg, on_tensor)
        digest = ckpt.params_digest(flat)
        ckpt.write_params(tmp, flat)
        del flat
        copied = []
        if tok_folder is not None:
            (tmp / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (tok_folder / name).is_file():
                    shutil.copy2(tok_folder / name, tmp / "tokenizer" / name)
                    copied.append(name)
        manifest = {"kind": KIND, "config": cfg.to_dict(), "source": report.source,
                    "num_tensors": report.num_tensors, "ignored_keys": report.ignored,
                    "params_sha256": digest, "tokenizer_files": copied}
        ckpt.write_manifest(tmp, manifest)
    return manifest


def load(folder: str | Path, *, compute_dtype=jnp.bfloat16, precision=None) -> UMT5Encoder:
    """Loads a converted folder (compute dtype bfloat16 by default, as upstream runs it)."""
    return load_converted(folder, KIND, UMT5Config,
                          lambda cfg: UMT5Encoder(cfg, compute_dtype=compute_dtype, precision=precision),
                          expected_params)


def load_text_encoder(folder: str | Path, *, tokenizer: str | os.PathLike | None = None,
                      cache_dir: str | os.PathLike | None = None, compute_dtype=jnp.bfloat16, precision=None,
                      text_len: int = TEXT_LEN) -> TextEncoder:
    """The prompt encoder of a converted folder; the tokenizer comes from `tokenizer`, else the folder's
    `tokenizer/` copy, else the hub. The manifest's `params_sha256` is the encoder's cache identity."""
    manifest = ckpt.read_manifest(folder, KIND)
    if tokenizer is None and find_tokenizer_folder(Path(folder)) is not None:
        tokenizer = folder
    model = load(folder, compute_dtype=compute_dtype, precision=precision)
    return TextEncoder(model, UMT5Tokenizer(tokenizer, text_len=text_len), cache_dir=cache_dir,
                       params_sha256=manifest.get("params_sha256"))


def load_source(source: Source | str | Path, *, compute_dtype=jnp.float32, precision=None,
                dtype: str | None = None, allow_pickle: bool = False, **config_overrides) -> UMT5Encoder:
    """In-memory load straight from upstream tensors (small models; no converted folder)."""
    source, path = _as_source(source, allow_pickle)
    source = normalize_source(source)
    cfg = config_for(source, {**_read_hf_config(path), **config_overrides}, dtype)
    flat, _ = convert_arrays(source, cfg)
    return with_params(lambda: UMT5Encoder(cfg, compute_dtype=compute_dtype, precision=precision), flat)
