"""Random Wan DiT weights in the ORIGINAL upstream key layout, and the diffusers reference model.

The key list comes from converters.wan_dit.RULES, but diffusers' own converter
(`convert_wan_transformer_to_diffusers`) then has to accept every key and shape with strict loading,
which checks the layout independently of our rules.
"""

from __future__ import annotations

import numpy as np
import torch

from converters import wan_dit
from wm_jax.models.config import WanConfig

TINY = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=256)  # head_dim 128


def original_key_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Every original-layout key of a checkpoint for `cfg`, with its torch shape."""
    expected = wan_dit.expected_params(cfg)
    shapes = {}
    for rule in wan_dit.RULES:
        if rule.target not in expected:
            continue
        shape = expected[rule.target][0]
        if rule.stacked:
            for layer in range(shape[0]):
                shapes[rule.key(layer)] = rule.transform.source_shape(shape[1:])
        else:
            shapes[rule.key()] = rule.transform.source_shape(shape)
    return shapes


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
