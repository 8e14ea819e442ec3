"""Wan DiT architecture configs: the SPEC table as presets, plus inference from checkpoint shapes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

HEAD_DIM = 128
PATCH_SIZE = (1, 2, 2)
CAMERA_FOLD = 8  # pixels folded into channels per axis (8x8) before the DiT patchify
CLIP_DIM = 1280  # CLIP ViT-H/14 feature width (Wan2.1 I2V image tokens)


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Architecture of one Wan-family diffusion transformer.

    Attributes:
      dim, ffn_dim, num_heads, num_layers: transformer sizes (head_dim = dim / num_heads = 128).
      in_dim, out_dim: latent channels in/out (I2V: in 36 = [noise 16 | mask 4 | image latent 16]).
      text_dim, text_len, freq_dim, eps: text feature width, padded text length, sinusoid width, norm eps.
      image_dim: CLIP token width for Wan2.1 I2V (img_emb + k_img/v_img cross-attention), else None.
      image_pos_tokens: FLF2V's learned position table length for the image tokens (img_emb.emb_pos).
      camera_channels: LingBot camera input channels per latent pixel (6*64 = 384 base-cam,
        7*64 = 448 act); None for models without camera layers.
      fp32_modulation: time MLP, modulation, residual stream and head in float32 (Wan/LingBot). False
        runs them in the compute dtype (Self-Forcing).
      param_dtype: storage dtype of the Linear/conv weights (norm and modulation weights stay float32).
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    eps: float = 1e-6
    image_dim: int | None = None
    image_pos_tokens: int | None = None
    camera_channels: int | None = None
    fp32_modulation: bool = True
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head_dim {self.dim // self.num_heads} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_features(self) -> int:
        return self.in_dim * PATCH_SIZE[1] * PATCH_SIZE[2]

    def replace(self, **changes) -> WanConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WanConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown WanConfig fields {unknown}; known: {sorted(names)}")
        return cls(**data)

    def num_params(self) -> int:
        d, f, n = self.dim, self.ffn_dim, self.num_layers
        block = 4 * (d * d + d) + 2 * d  # self-attn + qk norms
        block += 4 * (d * d + d) + 2 * d + 2 * d  # cross-attn + qk norms + norm3
        block += d * f + f + f * d + d + 6 * d  # ffn + modulation
        if self.image_dim:
            block += 2 * (d * d + d) + d
        if self.camera_channels:
            block += 4 * (d * d + d)
        top = self.patch_features * d + d + self.text_dim * d + d + d * d + d
        top += self.freq_dim * d + d + d * d + d + d * 6 * d + 6 * d
        top += d * 4 * self.out_dim + 4 * self.out_dim + 2 * d
        if self.image_dim:
            c = self.image_dim
            top += 2 * c + c * c + c + c * d + d + 2 * d + (self.image_pos_tokens or 0) * c
        if self.camera_channels:
            top += self.camera_channels * 4 * d + d + 2 * (d * d + d)
        return n * block + top


_WAN_1_3B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_WAN_14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

PRESETS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig(**_WAN_1_3B),
    "wan2.1-t2v-14b": WanConfig(**_WAN_14B),
    "wan2.1-i2v-14b": WanConfig(**_WAN_14B, in_dim=36, image_dim=CLIP_DIM),
    "wan2.2-t2v-a14b": WanConfig(**_WAN_14B),
    "wan2.2-i2v-a14b": WanConfig(**_WAN_14B, in_dim=36),
    "wan2.2-ti2v-5b": WanConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_dim=48, out_dim=48),
    "lingbot-world-base-cam": WanConfig(**_WAN_14B, in_dim=36, camera_channels=6 * CAMERA_FOLD**2),
    "lingbot-world-base-act": WanConfig(**_WAN_14B, in_dim=36, camera_channels=7 * CAMERA_FOLD**2),
    "lingbot-world-fast": WanConfig(**_WAN_14B, in_dim=36, camera_channels=6 * CAMERA_FOLD**2),
    "self-forcing-1.3b": WanConfig(**_WAN_1_3B, fp32_modulation=False),
}

# Two-expert models: the high-noise expert runs while integer t >= boundary * 1000.
EXPERT_BOUNDARIES: dict[str, float] = {
    "wan2.2-t2v-a14b": 0.875,
    "wan2.2-i2v-a14b": 0.900,
    "lingbot-world-base-cam": 0.947,
    "lingbot-world-base-act": 0.947,
}


def preset(name: str) -> WanConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def infer_config(shapes: Mapping[str, tuple[int, ...]], **overrides) -> WanConfig:
    """Derives a WanConfig from ORIGINAL-layout key shapes (torch axis order); `overrides` win.

    heads = dim / 128 unless overridden (`num_heads=`).
    """
    def need(key):
        if key not in shapes:
            raise ValueError(f"cannot infer the model config: checkpoint has no {key!r}")
        return shapes[key]

    dim, in_dim = need("patch_embedding.weight")[:2]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    if not layers:
        raise ValueError("cannot infer the model config: checkpoint has no 'blocks.{i}.*' keys")
    fields: dict[str, Any] = dict(
        dim=dim,
        in_dim=in_dim,
        ffn_dim=need("blocks.0.ffn.0.weight")[0],
        num_layers=max(layers) + 1,
        num_heads=dim // HEAD_DIM,
        out_dim=need("head.head.weight")[0] // (PATCH_SIZE[0] * PATCH_SIZE[1] * PATCH_SIZE[2]),
        text_dim=need("text_embedding.0.weight")[1],
        freq_dim=need("time_embedding.0.weight")[1],
    )
    if "img_emb.proj.1.weight" in shapes:
        fields["image_dim"] = shapes["img_emb.proj.1.weight"][1]
        if "img_emb.emb_pos" in shapes:
            fields["image_pos_tokens"] = shapes["img_emb.emb_pos"][1]
    if "patch_embedding_wancamctrl.weight" in shapes:
        fields["camera_channels"] = shapes["patch_embedding_wancamctrl.weight"][1] // (PATCH_SIZE[1] * PATCH_SIZE[2])
    fields.update(overrides)
    return WanConfig.from_dict(fields)
