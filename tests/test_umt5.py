"""umT5 encoder vs transformers UMT5EncoderModel, converters (Wan .pth / HF safetensors), tokenizer, cache."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from converters import umt5 as umt5_converter
from wm_jax.io import checkpoint as ckpt
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import ArraySource, open_source
from wm_jax.models import text_encoding
from wm_jax.models.text_encoding import TextEncoder, TokenizerNotFoundError, UMT5Tokenizer, clean_prompt
from wm_jax.models.umt5 import relative_position_buckets
from tests.wan_testlib import make_tokenizer_folder

TOL = 1e-5
TINY = {"vocab_size": 512, "d_model": 64, "num_layers": 2, "num_heads": 2, "d_kv": 32, "d_ff": 128,
        "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_model(seed: int = 0, round_bf16: bool = False):
    """Tiny UMT5EncoderModel with all weights redrawn at O(1) scale (so the position bias matters)."""
    torch.manual_seed(seed)
    cfg = transformers.UMT5Config(**TINY)
    cfg._attn_implementation = "eager"
    model = transformers.UMT5EncoderModel(cfg).eval()
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "relative_attention_bias" in name or "shared" in name or "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            if round_bf16:
                p.copy_(p.to(torch.bfloat16).float())
    return model


def hf_state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_forward(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


# The test's own map from HF names to Wan's original `models_t5_umt5-xxl-enc-bf16.pth` names.
def to_wan_layout(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for k, v in sd.items():
        if k in ("shared.weight",):
            out["token_embedding.weight"] = v
        elif k == "encoder.final_layer_norm.weight":
            out["norm.weight"] = v
        elif k.startswith("encoder.block."):
            parts = k.split(".")
            i, sub = parts[2], ".".join(parts[4:])
            name = {
                "0.layer_norm.weight": "norm1.weight",
                "0.SelfAttention.q.weight": "attn.q.weight", "0.SelfAttention.k.weight": "attn.k.weight",
                "0.SelfAttention.v.weight": "attn.v.weight", "0.SelfAttention.o.weight": "attn.o.weight",
                "0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
                "1.layer_norm.weight": "norm2.weight",
                "1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
                "1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
                "1.DenseReluDense.wo.weight": "ffn.fc2.weight",
            }[sub]
            out[f"blocks.{i}.{name}"] = v
    return out


def batch(length: int, real: list[int], seed: int = 1, vocab: int = 512):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, size=(len(real), length)).astype(np.int32)
    mask = np.zeros((len(real), length), np.int32)
    for b, n in enumerate(real):
        mask[b, :n] = 1
        ids[b, n:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------
# Encoder.
# ---------------------------------------------------------------------------------------------------


def test_relative_position_buckets_match_transformers():
    attn = transformers.UMT5EncoderModel(transformers.UMT5Config(**TINY)).encoder.block[0].layer[0].SelfAttention
    length = 1100
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    ref = attn._relative_position_bucket(rel).numpy()
    ours = relative_position_buckets(length, length, 32, 128)
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() == 0 and ours.max() == 31


def test_matches_hf_umt5_with_padding():
    model = hf_model(0)
    enc = umt5_converter.load_source(ArraySource(hf_state(model)), precision="highest")
    cfg = enc.config
    assert (cfg.vocab_size, cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_layers, cfg.num_buckets) == (
        512, 64, 64, 128, 2, 2, 32)
    ids, mask = batch(160, [160, 97, 5])  # longer than max distance 128; two padded rows
    ref = hf_forward(model, ids, mask)
    ours = np.asarray(enc(jnp.asarray(ids), jnp.asarray(mask)))
    assert ours.shape == ref.shape == (3, 160, 64)
    assert rel_l2(ours, ref) < TOL
    for b, n in enumerate([160, 97, 5]):
        assert rel_l2(ours[b, :n], ref[b, :n]) < TOL
    # The mask matters: ignoring it changes the real tokens' features.
    unmasked = np.asarray(enc(jnp.asarray(ids), jnp.ones_like(jnp.asarray(mask))))
    assert rel_l2(unmasked[1, :97], ref[1, :97]) > 1e-2
    # Layers run under one lax.scan, not a Python loop.
    jaxpr = str(jax.make_jaxpr(lambda i, m: enc(i, m))(jnp.asarray(ids), jnp.asarray(mask)))
    assert jaxpr.count("scan[") == 1


def test_wan_pth_and_hf_safetensors_round_trip(tmp_path):
    model = hf_model(1, round_bf16=True)
    sd = hf_state(model)
    ids, mask = batch(40, [40, 23], seed=3)
    ref = hf_forward(model, ids, mask)

    # HF safetensors folder (save_pretrained) -> in-memory load and converted folder.
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    assert umt5_converter.matches(set(open_source(hf_dir).keys()))
    from_hf = umt5_converter.load_source(hf_dir, precision="highest")
    assert from_hf.config.max_distance == 128 and from_hf.config.param_dtype == "float32"
    assert rel_l2(np.asarray(from_hf(ids, mask)), ref) < TOL

    # Wan's original layout, stored bf16 like models_t5_umt5-xxl-enc-bf16.pth.
    pth = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in to_wan_layout(sd).items()}, pth)
    with pytest.raises(CheckpointError, match="pickle"):
        open_source(pth)
    source = open_source(pth, allow_pickle=True)
    assert umt5_converter.layout_of(set(source.keys())) == "original"
    assert umt5_converter.config_for(source).param_dtype == "bfloat16"
    from_pth = umt5_converter.load_source(source, dtype="float32", precision="highest")
    assert rel_l2(np.asarray(from_pth(ids, mask)), ref) < TOL

    dst = tmp_path / "converted"
    manifest = umt5_converter.convert(source, dst, dtype="float32")
    assert manifest["kind"] == "umt5" and ckpt.read_manifest(dst)["kind"] == "umt5"
    loaded = umt5_converter.load(dst, compute_dtype=jnp.float32, precision="highest")
    np.testing.assert_array_equal(np.asarray(loaded(ids, mask)), np.asarray(from_pth(ids, mask)))
    assert manifest["params_sha256"] == text_encoding.module_digest(loaded)

    # Missing and mis-shaped tensors are reported up front.
    broken = to_wan_layout(sd)
    del broken["blocks.1.ffn.fc2.weight"]
    broken["blocks.0.attn.o.weight"] = broken["blocks.0.attn.o.weight"][:, :10]
    with pytest.raises(CheckpointError, match=r"(?s)blocks\.1\.ffn\.fc2\.weight.*blocks\.0\.attn\.o\.weight"):
        umt5_converter.load_source(ArraySource(broken))
    # A T5-style shared position table (only block 0 has one) is refused.
    shared = to_wan_layout(sd)
    del shared["blocks.1.pos_embedding.embedding.weight"]
    with pytest.raises(CheckpointError, match="per layer"):
        umt5_converter.load_source(ArraySource(shared))


# ---------------------------------------------------------------------------------------------------
# Tokenizer and prompt cache.
# ---------------------------------------------------------------------------------------------------


def test_prompt_cleaning():
    assert clean_prompt("  a   red\n\tfox &amp;amp; dog  ") == "a red fox & dog"
    assert clean_prompt("x\u3000y") == "x y"


def test_tokenizer_local_fallback_and_errors(tmp_path, monkeypatch):
    folder = make_tokenizer_folder(tmp_path / "ckpt" / "google" / "umt5-xxl")
    tok = UMT5Tokenizer(tmp_path / "ckpt", text_len=512)  # finds google/umt5-xxl inside a model folder
    assert tok.folder == folder
    prompts = ["a red fox", "  the   camera pans\nleft ", "the cat " * 400]
    ids, mask = tok(prompts)
    assert ids.shape == mask.shape == (3, 512) and ids.dtype == np.int32
    eos, pad = 1, 0
    lengths = mask.sum(1)
    assert lengths[2] == 512 and ids[2, -1] == eos  # truncated, EOS kept
    for b in range(2):
        assert ids[b, lengths[b] - 1] == eos and (ids[b, lengths[b]:] == pad).all()
    np.testing.assert_array_equal(tok(["the camera pans left"])[0][0], ids[1])  # cleaned like upstream

    # Without transformers, the `tokenizers` fallback gives the same ids and mask.
    import builtins
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("blocked")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    fallback = UMT5Tokenizer(folder, text_len=512)
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert fallback._hf is None
    f_ids, f_mask = fallback(prompts)
    np.testing.assert_array_equal(f_ids, ids)
    np.testing.assert_array_equal(f_mask, mask)

    with pytest.raises(TokenizerNotFoundError, match=r"google/umt5-xxl.*tokenizer\.json"):
        UMT5Tokenizer(tmp_path / "empty")

    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(TokenizerNotFoundError, match=r"hub download failed.*google/umt5-xxl.*spiece\.model"):
        UMT5Tokenizer(None)


def test_prompt_cache_and_converted_folder(tmp_path):
    model = hf_model(2)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    make_tokenizer_folder(hf_dir / "google" / "umt5-xxl")
    dst = tmp_path / "umt5_converted"
    manifest = umt5_converter.convert(hf_dir, dst)
    assert sorted(manifest["tokenizer_files"]) == ["special_tokens_map.json", "tokenizer.json",
                                                   "tokenizer_config.json"]

    cache = tmp_path / "cache"
    te = umt5_converter.load_text_encoder(dst, cache_dir=cache, compute_dtype=jnp.float32, precision="highest")
    prompts = ["a red fox jumps", "the camera pans left", "a red fox jumps"]
    feats = te.encode(prompts)
    assert te.encoder_calls == 1
    ids, mask = te.tokenizer(prompts)
    ref = hf_forward(model, ids, mask)
    for b, f in enumerate(feats):
        n = int(mask[b].sum())
        assert f.shape == (n, 64) and f.dtype == np.float32
        assert rel_l2(f, ref[b, :n]) < TOL
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and all(name.endswith(".npy") for name in files)  # no temp files left

    again = te.encode(["the camera pans left", "a red fox jumps"])
    assert te.encoder_calls == 1
    np.testing.assert_array_equal(again[0], feats[1])

    # A fresh encoder on the same cache and weights does not run the model; after free() it still serves.
    te2 = umt5_converter.load_text_encoder(dst, cache_dir=cache, compute_dtype=jnp.float32, precision="highest")
    assert te2.identity == te.identity
    te2.free()
    np.testing.assert_array_equal(te2.encode("a red fox jumps")[0], feats[0])
    assert te2.encoder_calls == 0
    with pytest.raises(RuntimeError, match="freed"):
        te2.encode("a new prompt")

    # Other weights or another compute dtype -> another identity -> a miss.
    other = umt5_converter.load_source(ArraySource(hf_state(hf_model(3))))
    te3 = TextEncoder(other, te.tokenizer, cache_dir=cache)
    assert te3.identity != te.identity
    te3.encode("a red fox jumps")
    assert te3.encoder_calls == 1
    te4 = TextEncoder(umt5_converter.load(dst, compute_dtype=jnp.bfloat16), te.tokenizer, cache_dir=cache,
                      params_sha256=manifest["params_sha256"])
    assert te4.identity != te.identity
    assert len(list(cache.iterdir())) == 3
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
    assert os.path.getsize(cache / files[0]) > 0
