"""Random test checkpoints in the ORIGINAL upstream key layouts, and the diffusers reference model.

Wan DiT (`random_original_state`): the key list comes from converters.wan_dit.RULES, but diffusers' own
converter (`convert_wan_transformer_to_diffusers`) then has to accept every key and shape with strict
loading, which checks the layout independently of our rules. Any rule-table converter
(`random_rule_state`: Wan VAE, umT5), TAEHV (`random_taehv_state`, written from the upstream layout)
and a small umT5-style tokenizer folder (`make_tokenizer_folder`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from converters import wan_dit
from converters.core import Rule
from wm_jax.models.config import WanConfig

TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=256)  # head_dim 128


def rule_key_shapes(rules: Sequence[Rule], expected: Mapping[str, tuple]) -> dict[str, tuple[int, ...]]:
    """Every upstream key the `rules` map onto the parameters `expected` (path -> (shape, dtype)), with
    its torch shape (stacked rules: one key per layer)."""
    shapes = {}
    for rule in rules:
        if rule.target not in expected:
            continue
        shape = expected[rule.target][0]
        if rule.stacked:
            for layer in range(shape[0]):
                shapes[rule.key(layer)] = rule.transform.source_shape(shape[1:])
        else:
            shapes[rule.key()] = rule.transform.source_shape(shape)
    return shapes


def original_key_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every original-layout key of a checkpoint for `cfg`, with its torch shape."""
    return rule_key_shapes(wan_dit.RULES, wan_dit.expected_params(cfg))


def random_rule_state(rules: Sequence[Rule], expected: Mapping[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights for every key of `rule_key_shapes`: norm scales (`gamma`, `norm*.weight`) near 1,
    small biases, other tensors ~ N(0, 1/fan_in) with fan_in = the product of the torch shape after axis 0."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in rule_key_shapes(rules, expected).items():
        parts = key.split(".")
        if parts[-1] == "gamma" or (parts[-1] == "weight" and len(parts) > 1 and "norm" in parts[-2]
                                    and len(shape) == 1):
            value = 1.0 + rng.normal(0, 0.1, shape)
        elif key.endswith("bias"):
            value = rng.normal(0, 0.03, shape)
        else:
            value = rng.normal(0, 1.0 / np.sqrt(max(1, int(np.prod(shape[1:])))), shape)
        state[key] = value.astype(np.float32)
    return state


def random_original_state(cfg: WanConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights with upstream-like magnitudes (norm weights near 1, small modulation)."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in original_key_shapes(cfg).items():
        if key.endswith("modulation"):
            value = rng.normal(0, 0.06, shape)
        elif ".norm_q." in key or ".norm_k" in key:
            value = 1.25 + rng.normal(0, 0.15, shape)
        elif ("norm3" in key or "img_emb.proj.0" in key or "img_emb.proj.4" in key) and key.endswith("weight"):
            value = 1.0 + rng.normal(0, 0.1, shape)
        elif key.endswith("bias"):
            value = rng.normal(0, 0.03, shape)
        else:
            value = rng.normal(0, 0.05, shape)
        state[key] = value.astype(np.float32)
    return state


def diffusers_model(cfg: WanConfig, original_state: dict[str, np.ndarray]):
    """diffusers WanTransformer3DModel loaded (strictly) from original-layout weights via its converter."""
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.image_dim, added_kv_proj_dim=cfg.dim if cfg.image_dim else None,
        pos_embed_seq_len=cfg.image_pos_tokens)
    converted = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v.copy()) for k, v in original_state.items()})
    model.load_state_dict(converted, strict=True)
    return model.eval()


def random_taehv_state(seed: int, z: int, widths=(32, 16, 8, 8), patch: int = 1, tgrow_rows_factor: int = 2,
                       with_encoder: bool = False) -> dict[str, np.ndarray]:
    """Upstream `TAEHV.state_dict()`-style decoder keys; every TGrow stored with `tgrow_rows_factor`·n rows,
    as the released checkpoints do (stride 2 everywhere)."""
    rng = np.random.default_rng(seed)

    def conv(o, i, k, scale=1.0):
        return (rng.standard_normal((o, i, k, k)) * scale / np.sqrt(i * k * k)).astype(np.float32)

    def bias(o, offset=0.0):
        return (offset + 0.02 * rng.standard_normal(o)).astype(np.float32)

    sd = {"decoder.1.weight": conv(widths[0], z, 3), "decoder.1.bias": bias(widths[0])}
    for s in range(3):
        n, base = widths[s], 3 + 6 * s
        for k in range(3):
            sd[f"decoder.{base + k}.conv.0.weight"] = conv(n, 2 * n, 3)
            sd[f"decoder.{base + k}.conv.0.bias"] = bias(n)
            for j in (2, 4):
                sd[f"decoder.{base + k}.conv.{j}.weight"] = conv(n, n, 3)
                sd[f"decoder.{base + k}.conv.{j}.bias"] = bias(n)
        sd[f"decoder.{base + 4}.conv.weight"] = conv(tgrow_rows_factor * n, n, 1)
        sd[f"decoder.{base + 5}.weight"] = conv(widths[s + 1], n, 3)
    sd["decoder.22.weight"] = conv(3 * patch * patch, widths[3], 3, scale=0.3)
    sd["decoder.22.bias"] = bias(3 * patch * patch, offset=0.5)
    if with_encoder:
        sd["encoder.0.weight"] = conv(64, 3 * patch * patch, 3)
        sd["encoder.0.bias"] = bias(64)
    return sd


def make_tokenizer_folder(folder: Path) -> Path:
    """A small SentencePiece-style (Unigram + Metaspace) tokenizer laid out like google/umt5-xxl's files."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    corpus = ["a red fox jumps over the lazy dog", "the camera pans left across a snowy mountain",
              "a cat sleeps on a sunny windowsill", "waves crash on the rocky shore at sunset"] * 20
    tok.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "model_max_length": 512, **special}))
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder
