"""Wan 2.2 VAE decoder (TI2V-5B: z=48, stride 4×16×16) in Flax NNX, channels-last, streaming.

Differences from the Wan 2.1 decoder (`wm_jax.models.wan_vae`, whose blocks and streaming machinery are
reused here):

* the decoder emits 12 channels, a 2×2 space-to-depth of RGB, unfolded at the end ("unpatchify":
  channel c·4 + r·2 + q -> pixel (2i + q, 2j + r), colour c);
* every resolution level is a residual up-block: `upsamples.{i}.upsamples.{0..2}` residual blocks plus
  `upsamples.{i}.upsamples.3` resampler (which keeps the channel count), and a parameter-free shortcut
  `DupUp3D` (channels repeated, then unfolded into time/space) added to the block output. On the very
  first chunk the temporal DupUp3D drops its first `factor_t - 1` frames, matching the resampler's
  first-frame bypass.

Latents `[B, T, H, W, 48]` (normalised as the DiT sees them) -> video `[B, 1 + 4(T-1), 16H, 16W, 3]` in
[-1, 1]. Only the decoder is implemented (the encoder weights in `Wan2.2_VAE.pth` are ignored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from wm_jax.models.wan_vae import (
    CausalConv3d,
    Decoder3d,
    LatentDecoderVAE,
    WanVAEConfigBase,
    _CacheCursor,
    _run_layers,
    dtype_from_name,
    level_layers,
)

# Wan-Video/Wan2.2 `wan/modules/vae2_2.py`, `Wan2_2_VAE.__init__`.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)

PATCH = 2  # 2×2 space-to-depth around the network: 12 = 3 colours × 2 × 2


@dataclasses.dataclass(frozen=True)
class Wan22VAEConfig(WanVAEConfigBase):
    """Wan 2.2 VAE decoder hyper-parameters (defaults: the released `Wan2.2_VAE.pth`); see `WanVAEConfigBase`.

    dec_dim: decoder base width (256; level widths dec_dim·[4, 4, 4, 2, 1]); z_dim 48;
    temporal_downsample: the encoder's flags (the decoder uses them reversed: levels 0, 1 double time).
    """

    z_dim: int = 48
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD
    dec_dim: int = 256

    @property
    def spatial_stride(self) -> int:
        return PATCH * super().spatial_stride


def dup_up_3d(x: jax.Array, out_dim: int, factor_t: int, factor_s: int, first_chunk: bool) -> jax.Array:
    """Parameter-free upsampling shortcut: `[B, T, H, W, C]` -> `[B, T·ft, H·fs, W·fs, out_dim]`.

    Each input channel is repeated `out_dim·ft·fs² / C` times; repeated channel j = o·ft·fs² + t·fs² + a·fs + b
    lands at output (frame τ·ft + t, row i·fs + a, column j·fs + b, channel o). `first_chunk` drops the
    first ft - 1 frames.
    """
    b, t, h, w, c = x.shape
    factor = factor_t * factor_s * factor_s
    repeats = out_dim * factor // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, out_dim, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, out_dim)
    return x[:, factor_t - 1:] if first_chunk else x


def unpatchify(x: jax.Array, patch: int = PATCH) -> jax.Array:
    """`[B, T, h, w, 3·p·p]` (channel c·p² + r·p + q) -> `[B, T, h·p, w·p, 3]`, pixel (i·p + q, j·p + r)."""
    b, t, h, w, cpp = x.shape
    c = cpp // (patch * patch)
    x = x.reshape(b, t, h, w, c, patch, patch)  # (..., c, r, q)
    return x.transpose(0, 1, 2, 6, 3, 5, 4).reshape(b, t, h * patch, w * patch, c)


class UpResidualBlock(nnx.Module):
    """`upsamples`: (num_res_blocks + 1) residual blocks [+ resampler keeping channels]; + DupUp3D shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int, temporal_upsample: bool, up_flag: bool, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.in_dim, self.out_dim, self.up_flag = in_dim, out_dim, up_flag
        self.factor_t = 2 if (up_flag and temporal_upsample) else 1
        mode = ("upsample3d" if temporal_upsample else "upsample2d") if up_flag else None
        self.upsamples = nnx.List(level_layers(in_dim, out_dim, num_blocks, mode, resample_out_dim=out_dim,
                                               rngs=rngs, param_dtype=param_dtype))

    def __call__(self, x: jax.Array, cursor: _CacheCursor | None, started: bool) -> jax.Array:
        y = _run_layers(self.upsamples, x, cursor, started)
        if not self.up_flag:
            return y
        return y + dup_up_3d(x, self.out_dim, self.factor_t, 2, first_chunk=not started)


class Decoder3d22(Decoder3d):
    """Wan 2.2 decoder: `[B, T, h, w, z]` (after conv2) -> `[B, T_px, 8h, 8w, 12]` (space-to-depth RGB).

    The Wan 2.1 decoder with one `UpResidualBlock` per level.
    """

    head_channels = 3 * PATCH * PATCH

    def _levels(self, dims: Sequence[int], num_res_blocks: int, temporal_upsample: Sequence[bool],
                **kw) -> list[nnx.Module]:
        blocks: list[nnx.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            t_up = bool(temporal_upsample[i]) if i < len(temporal_upsample) else False
            blocks.append(UpResidualBlock(din, dout, num_res_blocks + 1, t_up, i != len(dims) - 2, **kw))
        return blocks


class Wan22VAE(LatentDecoderVAE):
    """Wan 2.2 VAE, decoder side: `conv2` (1³ post-quant, z -> z) + `decoder` + unpatchify.

    Decoding (`init_decoder_cache`, `decode_chunk`, `decode`): latents `[B, T, H, W, 48]` -> frames
    `[B, 1 + 4(T-1), 16H, 16W, 3]` float32 in [-1, 1].
    """

    def __init__(self, config: Wan22VAEConfig = Wan22VAEConfig(), *, rngs: nnx.Rngs | None = None):
        super().__init__(config)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        pdt = dtype_from_name(config.param_dtype)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1, rngs=rngs, param_dtype=pdt)
        self.decoder = Decoder3d22(config.dec_dim, config.z_dim, config.dim_mult, config.num_res_blocks,
                                   config.temporal_downsample[::-1], rngs=rngs, param_dtype=pdt)

    def _decode_body(self, x, cursor, started):
        return unpatchify(self.decoder(x, cursor, started))
