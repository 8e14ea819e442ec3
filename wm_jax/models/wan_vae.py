"""Wan 2.1 video VAE (z=16, stride 4×8×8) in Flax NNX, channels-last, with explicit streaming caches.

Layouts (everything channels-last):

* video  `[B, T_px, H_px, W_px, 3]`, values in [-1, 1];
* latents `[B, T, H, W, z_dim]` **normalised** the way the DiT sees them: `z = (mu - mean) / std`
  (`mean`/`std` are constants of the code, not of the checkpoint: `LATENT_MEAN`, `LATENT_STD`).

Time: `T` latents <-> `1 + 4·(T - 1)` pixel frames. Latent 0 stands for pixel frame 0 alone.

Causality. Every 3-tap causal conv is a causal convolution over its *whole* input sequence with two zero
frames in front. Its streaming state is the last two frames of its input, `[B, 2, H, W, C]`. The
temporal resamplers add one rule each for the start of the sequence:

* decoder `upsample3d`: frame 0 bypasses `time_conv` (it stays one frame); `time_conv` runs over frames
  1, 2, ... with zero front padding, so frame 0 is never inside its window;
* encoder `downsample3d`: output 0 is input frame 0; then a stride-2 temporal conv (no padding) over the
  sequence; its streaming state is the last input frame `[B, 1, H, W, C]`.

So decoding any split of the latent sequence into chunks, carrying the cache, equals decoding it in one
call; encoding accepts a first chunk of `1 + 4k` frames and later chunks of `4k` frames.

The cache (`CausalCache`) is a pytree: a tuple of arrays (one per causal conv, in execution order) plus
static metadata (`started`, the batch and spatial size it was built for). `started` is static because it
changes output shapes (the first chunk of `T` latents yields `1 + 4(T-1)` frames, later ones `4T`): a
jitted `decode_chunk` compiles once for the first chunk and once for the steady state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from wm_jax.kernels.attention import attention

# Per-channel statistics of the raw latents (Wan-Video/Wan2.1 `wan/modules/vae.py`, `WanVAE.__init__`).
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

CACHE_FRAMES = 2  # a 3-tap causal conv remembers its last two input frames

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return jnp.dtype(name).type


def dtype_name(dtype: Any) -> str:
    return jnp.dtype(dtype).name


# ---------------------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WanVAEConfigBase:
    """Hyper-parameters shared by the Wan 2.1 and Wan 2.2 VAE configs (each adds its width and defaults).

    z_dim: latent channels; latent_mean / latent_std: per-channel statistics of the raw latents (z_dim
    entries each); dim_mult: width multipliers per resolution level; num_res_blocks: residual blocks per
    encoder level (decoder levels have one more); temporal_downsample: which encoder downsamplers also
    halve time (the decoder mirrors it); param_dtype / compute_dtype: "float32" | "bfloat16" | "float16".
    """

    z_dim: int
    latent_mean: tuple[float, ...]
    latent_std: tuple[float, ...]
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(int(m) for m in self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        object.__setattr__(self, "latent_mean", tuple(float(v) for v in self.latent_mean))
        object.__setattr__(self, "latent_std", tuple(float(v) for v in self.latent_std))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_downsample needs {len(self.dim_mult) - 1} entries (one per downsampler), "
                             f"got {self.temporal_downsample}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ValueError(f"latent_mean/latent_std need {self.z_dim} entries (z_dim), got "
                             f"{len(self.latent_mean)}/{len(self.latent_std)}")
        dtype_from_name(self.param_dtype)
        dtype_from_name(self.compute_dtype)

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WanVAEConfigBase":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class WanVAEConfig(WanVAEConfigBase):
    """Wan 2.1 VAE hyper-parameters (defaults: the released `Wan2.1_VAE.pth`); see `WanVAEConfigBase`.

    dim: encoder/decoder base width (96); z_dim: latent channels (16).
    """

    z_dim: int = 16
    latent_mean: tuple[float, ...] = LATENT_MEAN
    latent_std: tuple[float, ...] = LATENT_STD
    dim: int = 96


VAE_STRIDE = (4, 8, 8)  # (time, height, width): latents per pixel frames, pixels per latent


def num_pixel_frames(num_latents: int, temporal_stride: int = 4) -> int:
    """T latents -> 1 + stride·(T-1) frames."""
    return 1 + temporal_stride * (num_latents - 1)


def num_latent_frames(num_frames: int, temporal_stride: int = 4) -> int:
    """F = 1 + stride·k frames -> k + 1 latents (ValueError otherwise)."""
    if num_frames < 1 or (num_frames - 1) % temporal_stride:
        raise ValueError(f"{num_frames} frames: need 1 + {temporal_stride}·k frames")
    return (num_frames - 1) // temporal_stride + 1


# ---------------------------------------------------------------------------------------------------
# Streaming cache.
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CausalCache:
    """Streaming state of an encoder or decoder: a pytree (arrays in `entries`, the rest static).

    entries: one array per causal temporal conv, in execution order; `[B, 2, H, W, C]` for 3-tap convs,
      `[B, 1, H, W, C]` for the encoder's stride-2 temporal downsamplers (H, W at that layer's resolution).
    started: False until the first chunk went through (the first-frame rules apply to that chunk only).
    kind: "decoder" or "encoder"; batch, height, width: the input size the cache belongs to (latent
      H×W for a decoder, pixel H×W for an encoder).
    """

    entries: tuple[jax.Array, ...]
    started: bool
    kind: str
    batch: int
    height: int
    width: int

    def describe(self) -> str:
        what = "latent" if self.kind == "decoder" else "pixel"
        return f"{self.kind} cache for batch {self.batch}, {what} size {self.height}x{self.width}"


jax.tree_util.register_dataclass(CausalCache, data_fields=["entries"],
                                 meta_fields=["started", "kind", "batch", "height", "width"])


class _CacheCursor:
    """Hands cache entries to the causal convs in execution order and collects the new ones.

    With `entries=None` every request gets zeros (a fresh cache); used to build caches via eval_shape.
    """

    def __init__(self, entries: Sequence[jax.Array] | None, kind: str):
        self.entries = entries
        self.kind = kind
        self.index = 0
        self.new: list[jax.Array] = []

    def take(self, shape: tuple[int, ...], dtype) -> jax.Array:
        i = self.index
        self.index += 1
        if self.entries is None:
            return jnp.zeros(shape, dtype)
        if i >= len(self.entries):
            raise ValueError(f"{self.kind} cache has {len(self.entries)} entries, but the model needs more: "
                             "it was built for a different model")
        entry = self.entries[i]
        if tuple(entry.shape) != tuple(shape):
            raise ValueError(f"{self.kind} cache entry {i} has shape {list(entry.shape)}, this chunk needs "
                             f"{list(shape)}: the cache was built for a different batch, resolution or model")
        return entry.astype(dtype)

    def put(self, value: jax.Array) -> None:
        self.new.append(value)

    def finish(self) -> tuple[jax.Array, ...]:
        if self.entries is not None and self.index != len(self.entries):
            raise ValueError(f"{self.kind} cache has {len(self.entries)} entries, the model used {self.index}: "
                             "it was built for a different model")
        return tuple(self.new)


# ---------------------------------------------------------------------------------------------------
# Building blocks (shared with the Wan 2.2 VAE).
# ---------------------------------------------------------------------------------------------------


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _init_kernel(rngs: nnx.Rngs, shape: tuple[int, ...], fan_in: int, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) / math.sqrt(max(fan_in, 1)))


class CausalConv3d(nnx.Module):
    """Conv3d, kernel (kt, kh, kw), causal in time, spatial 'same' padding; kernel DHWIO.

    `kt == 1`: a pointwise-in-time conv, no state. `kt > 1` with stride 1: a causal conv whose previous
    `kt - 1` input frames come from the cache (zeros at the start). `time_stride > 1` (the encoder's
    temporal downsampler) has no padding; its caller supplies the context frame.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int | tuple[int, int, int] = 3, *,
                 time_stride: int = 1, rngs: nnx.Rngs, param_dtype=jnp.float32):
        k = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        self.kernel_size = k
        self.in_dim, self.out_dim, self.time_stride = in_dim, out_dim, time_stride
        self.kernel = _init_kernel(rngs, (*k, in_dim, out_dim), in_dim * k[0] * k[1] * k[2], param_dtype)
        self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype))

    def conv(self, x: jax.Array) -> jax.Array:
        """Valid in time (no temporal padding), same spatially. x `[B, T, H, W, Cin]`."""
        kt, kh, kw = self.kernel_size
        if kt == kh == kw == 1 and self.time_stride == 1:
            y = jnp.einsum("bthwc,cd->bthwd", x, self.kernel[0, 0, 0].astype(x.dtype),
                           precision=_precision(x.dtype))
        else:
            y = jax.lax.conv_general_dilated(
                x, self.kernel[...].astype(x.dtype), window_strides=(self.time_stride, 1, 1),
                padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)),
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=_precision(x.dtype))
        return y + self.bias[...].astype(x.dtype)

    def __call__(self, x: jax.Array, cursor: _CacheCursor | None = None) -> jax.Array:
        kt = self.kernel_size[0]
        if kt == 1:
            return self.conv(x)
        b, _, h, w, c = x.shape
        if cursor is None:
            prev = jnp.zeros((b, kt - 1, h, w, c), x.dtype)
        else:
            prev = cursor.take((b, kt - 1, h, w, c), x.dtype)
        seq = jnp.concatenate([prev, x], axis=1)
        if cursor is not None:
            cursor.put(seq[:, -(kt - 1):])
        return self.conv(seq)


class Conv2d(nnx.Module):
    """Per-frame Conv2d on `[B, T, H, W, C]` (kernel HWIO); `padding` as lax pairs ((top, bottom), (left, right))."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, *, stride: int = 1,
                 padding: tuple[tuple[int, int], tuple[int, int]] | None = None, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.kernel_size, self.stride = kernel_size, stride
        self.padding = padding if padding is not None else ((kernel_size // 2,) * 2,) * 2
        self.kernel = _init_kernel(rngs, (kernel_size, kernel_size, in_dim, out_dim),
                                   in_dim * kernel_size * kernel_size, param_dtype)
        self.bias = nnx.Param(jnp.zeros((out_dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kernel_size == 1 and self.stride == 1:
            y = jnp.einsum("...c,cd->...d", x, self.kernel[0, 0].astype(x.dtype), precision=_precision(x.dtype))
            return y + self.bias[...].astype(x.dtype)
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(
            x.reshape(b * t, *x.shape[2:]), self.kernel[...].astype(x.dtype), (self.stride, self.stride),
            self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_precision(x.dtype))
        y = y + self.bias[...].astype(x.dtype)
        return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
    """x / max(‖x‖₂ over channels, 1e-12) · √C · γ, statistics in float32."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32):
        self.dim = dim
        self.gamma = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * (self.dim ** 0.5) * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResidualBlock(nnx.Module):
    """SiLU(RMS) -> causal 3³ conv -> SiLU(RMS) -> causal 3³ conv, plus a 1³ shortcut when in != out."""

    def __init__(self, in_dim: int, out_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.norm1 = RMSNorm(in_dim, param_dtype=param_dtype)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, rngs=rngs, param_dtype=param_dtype)
        self.norm2 = RMSNorm(out_dim, param_dtype=param_dtype)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, rngs=rngs, param_dtype=param_dtype)
        self.shortcut = (CausalConv3d(in_dim, out_dim, 1, rngs=rngs, param_dtype=param_dtype)
                         if in_dim != out_dim else None)

    def __call__(self, x: jax.Array, cursor: _CacheCursor | None = None) -> jax.Array:
        h = self.shortcut(x) if self.shortcut is not None else x
        x = self.conv1(jax.nn.silu(self.norm1(x)), cursor)
        x = self.conv2(jax.nn.silu(self.norm2(x)), cursor)  # dropout is 0 at inference
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H·W positions of each frame, residual."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.dim = dim
        self.norm = RMSNorm(dim, param_dtype=param_dtype)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, rngs=rngs, param_dtype=param_dtype)
        self.proj = Conv2d(dim, dim, 1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
        y = attention(q, k, v).reshape(b, t, h, w, c)
        return self.proj(y) + x


class Resample(nnx.Module):
    """Spatial ×2 up/down sampling, optionally with a temporal ×2 (the first-frame rules live here).

    modes: "upsample2d" | "upsample3d" (nearest ×2 then 3×3 conv dim -> out_dim; 3d first runs
    `time_conv` dim -> 2·dim, whose halves become frames 2τ and 2τ+1) | "downsample2d" |
    "downsample3d" (pad right/bottom 1, 3×3 conv stride 2; 3d then a stride-2 temporal conv).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, *, out_dim: int | None = None, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        if mode not in self.MODES:
            raise ValueError(f"resample mode {mode!r}; expected one of {self.MODES}")
        self.dim, self.mode = dim, mode
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        if mode.startswith("up"):
            self.resample = Conv2d(dim, out_dim if out_dim is not None else dim // 2, 3, **kw)
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), **kw) if mode == "upsample3d" else None
        else:
            self.resample = Conv2d(dim, dim, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
            self.time_conv = (CausalConv3d(dim, dim, (3, 1, 1), time_stride=2, **kw)
                              if mode == "downsample3d" else None)

    def __call__(self, x: jax.Array, cursor: _CacheCursor | None = None, started: bool = False) -> jax.Array:
        if self.mode == "upsample3d":
            x = self._time_upsample(x, cursor, started)
        if self.mode.startswith("up"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest(-exact) ×2
        x = self.resample(x)
        if self.mode == "downsample3d":
            x = self._time_downsample(x, cursor, started)
        return x

    def _time_upsample(self, x, cursor, started):
        b, t, h, w, c = x.shape
        head, rest = (x[:, :0], x) if started else (x[:, :1], x[:, 1:])
        if rest.shape[1] == 0:  # first chunk of one frame: time_conv not applied, its state stays zero
            if cursor is not None:
                cursor.put(cursor.take((b, CACHE_FRAMES, h, w, c), x.dtype))
            return head
        y = self.time_conv(rest, cursor)  # [B, T', H, W, 2C]
        tr = rest.shape[1]
        y = y.reshape(b, tr, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * tr, h, w, c)
        return jnp.concatenate([head, y], axis=1)

    def _time_downsample(self, x, cursor, started):
        b, t, h, w, c = x.shape
        prev = (cursor.take((b, 1, h, w, c), x.dtype) if cursor is not None
                else jnp.zeros((b, 1, h, w, c), x.dtype))
        if cursor is not None:
            cursor.put(x[:, -1:])
        if started:
            head, seq = x[:, :0], jnp.concatenate([prev, x], axis=1)
        else:  # output 0 is frame 0; the stride-2 conv then starts at frame 0
            head, seq = x[:, :1], x
        if seq.shape[1] < 3:
            return head
        return jnp.concatenate([head, self.time_conv.conv(seq)], axis=1)


def level_layers(in_dim: int, out_dim: int, num_blocks: int, resample_mode: str | None, *,
                 resample_out_dim: int | None = None, rngs: nnx.Rngs, param_dtype=jnp.float32) -> list[nnx.Module]:
    """One resolution level: `num_blocks` residual blocks in_dim -> out_dim, then a `Resample(out_dim,
    resample_mode, out_dim=resample_out_dim)` unless `resample_mode` is None (the last level)."""
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    layers: list[nnx.Module] = []
    for _ in range(num_blocks):
        layers.append(ResidualBlock(in_dim, out_dim, **kw))
        in_dim = out_dim
    if resample_mode is not None:
        layers.append(Resample(out_dim, resample_mode, out_dim=resample_out_dim, **kw))
    return layers


def _silu_head(norm: RMSNorm, conv: CausalConv3d, x: jax.Array, cursor) -> jax.Array:
    return conv(jax.nn.silu(norm(x)), cursor)


class Encoder3d(nnx.Module):
    """Wan 2.1 encoder: `[B, T, H, W, 3]` -> `[B, T', H/8, W/8, out_dim]` (out_dim = 2·z_dim: μ ‖ log σ²)."""

    def __init__(self, dim: int, out_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_downsample: Sequence[bool], *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        dims = [dim * u for u in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, **kw)
        layers: list[nnx.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == len(dim_mult) - 1
            mode = None if last else ("downsample3d" if temporal_downsample[i] else "downsample2d")
            layers += level_layers(din, dout, num_res_blocks, mode, **kw)
        self.downsamples = nnx.List(layers)
        top = dims[-1]
        self.middle = _middle_blocks(top, **kw)
        self.head_norm = RMSNorm(top, param_dtype=param_dtype)
        self.head_conv = CausalConv3d(top, out_dim, 3, **kw)

    def __call__(self, x: jax.Array, cursor: _CacheCursor | None, started: bool) -> jax.Array:
        x = self.conv1(x, cursor)
        x = _run_layers(self.downsamples, x, cursor, started)
        x = _run_middle(self.middle, x, cursor)
        return _silu_head(self.head_norm, self.head_conv, x, cursor)


def _middle_blocks(dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> nnx.List:
    """`middle` of an encoder or decoder at width `dim`: residual block, attention block, residual block."""
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    return nnx.List([ResidualBlock(dim, dim, **kw), AttentionBlock(dim, **kw), ResidualBlock(dim, dim, **kw)])


def _run_middle(middle, x, cursor):
    for layer in middle:
        x = layer(x) if isinstance(layer, AttentionBlock) else layer(x, cursor)
    return x


def _run_layers(layers, x, cursor, started):
    """Runs `layers` in order: residual blocks as `(x, cursor)`, the others (resamplers) as `(x, cursor, started)`."""
    for layer in layers:
        x = layer(x, cursor) if isinstance(layer, ResidualBlock) else layer(x, cursor, started)
    return x


class Decoder3d(nnx.Module):
    """Wan 2.1 decoder: `[B, T, h, w, z_dim]` (raw latents after conv2) -> `[B, T_px, 8h, 8w, 3]`, unclamped.

    `conv1`, `middle`, the per-level `upsamples` (`_levels`), then `head_norm` + `head_conv` (dims[-1] ->
    `head_channels`); level widths dim·[dim_mult[-1], *dim_mult reversed].
    """

    head_channels = 3

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 temporal_upsample: Sequence[bool], *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        dims = [dim * u for u in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, **kw)
        self.middle = _middle_blocks(dims[0], **kw)
        self.upsamples = nnx.List(self._levels(dims, num_res_blocks, temporal_upsample, **kw))
        self.head_norm = RMSNorm(dims[-1], param_dtype=param_dtype)
        self.head_conv = CausalConv3d(dims[-1], self.head_channels, 3, **kw)

    def _levels(self, dims: Sequence[int], num_res_blocks: int, temporal_upsample: Sequence[bool],
                **kw) -> list[nnx.Module]:
        """Level i (dims[i] -> dims[i+1]): num_res_blocks + 1 residual blocks, then an upsampler that halves
        the channels (not on the last level)."""
        layers: list[nnx.Module] = []
        for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                din //= 2  # the previous level's upsampler halved the channels
            last = i == len(dims) - 2
            mode = None if last else ("upsample3d" if temporal_upsample[i] else "upsample2d")
            layers += level_layers(din, dout, num_res_blocks + 1, mode, **kw)
        return layers

    def __call__(self, x: jax.Array, cursor: _CacheCursor | None, started: bool) -> jax.Array:
        x = self.conv1(x, cursor)
        x = _run_middle(self.middle, x, cursor)
        x = _run_layers(self.upsamples, x, cursor, started)
        return _silu_head(self.head_norm, self.head_conv, x, cursor)


# ---------------------------------------------------------------------------------------------------
# Streaming decode / encode, shared by the Wan 2.1 and Wan 2.2 VAEs.
#
# A VAE object provides: z_dim, latent_mean, latent_std (tuples), spatial_stride, temporal_stride,
# compute_dtype, `conv2` (1³ post-quant conv) and `_decode_body(x, cursor, started) -> [B, T, H, W, 3]`.
# ---------------------------------------------------------------------------------------------------


def _check_latents(vae, z: jax.Array) -> None:
    if z.ndim != 5 or z.shape[-1] != vae.z_dim or min(z.shape[:4]) < 1:
        raise ValueError(f"latents must be [B, T, H, W, {vae.z_dim}] (channels-last, T, H, W >= 1); "
                         f"got shape {list(z.shape)}")


def init_decoder_cache(vae, batch: int, latent_h: int, latent_w: int, dtype=None) -> CausalCache:
    """Zero decoder cache for latents `[batch, T, latent_h, latent_w, z_dim]` (dtype: the compute dtype)."""
    dtype = vae.compute_dtype if dtype is None else dtype_from_name(dtype)
    probe = jax.ShapeDtypeStruct((batch, 1, latent_h, latent_w, vae.z_dim), jnp.float32)
    _check_latents(vae, probe)

    def trace(z):
        cursor = _CacheCursor(None, "decoder")
        vae._decode_body(vae.conv2(z.astype(dtype)), cursor, False)
        return cursor.finish()

    shapes = jax.eval_shape(trace, probe)
    entries = tuple(jnp.zeros(s.shape, dtype) for s in shapes)
    return CausalCache(entries, False, "decoder", batch, latent_h, latent_w)


def decode_chunk(vae, z: jax.Array, cache: CausalCache, *, clamp: bool = True) -> tuple[jax.Array, CausalCache]:
    """Decodes a chunk of normalised latents, carrying the causal state.

    Args:
      vae: a `WanVAE` (or `Wan22VAE`).
      z: `[B, T, H, W, z_dim]` normalised latents (as the DiT produces them), any float dtype.
      cache: from `init_decoder_cache(vae, B, H, W)` for the first chunk, then the returned one.
      clamp: clip the frames to [-1, 1] (upstream does).

    Returns:
      frames `[B, T_px, H·s, W·s, 3]` float32 (s = spatial stride; T_px = 1 + 4(T-1) for the first chunk,
      4T after), and the new cache. Pure: `vae` is not modified.
    """
    _check_latents(vae, z)
    if not isinstance(cache, CausalCache) or cache.kind != "decoder":
        raise ValueError(f"expected a decoder CausalCache (init_decoder_cache), got {type(cache).__name__}"
                         + (f" of kind {cache.kind!r}" if isinstance(cache, CausalCache) else ""))
    b, _, h, w, _ = z.shape
    if (cache.batch, cache.height, cache.width) != (b, h, w):
        raise ValueError(f"{cache.describe()} cannot decode latents of shape {list(z.shape)}; expected "
                         f"[{cache.batch}, T, {cache.height}, {cache.width}, {vae.z_dim}] "
                         "(build a new cache with init_decoder_cache)")
    dtype = vae.compute_dtype
    mean = jnp.asarray(vae.latent_mean, jnp.float32)
    std = jnp.asarray(vae.latent_std, jnp.float32)
    x = (z.astype(jnp.float32) * std + mean).astype(dtype)
    cursor = _CacheCursor(cache.entries, "decoder")
    frames = vae._decode_body(vae.conv2(x), cursor, cache.started).astype(jnp.float32)
    if clamp:
        frames = jnp.clip(frames, -1.0, 1.0)
    return frames, CausalCache(cursor.finish(), True, "decoder", b, h, w)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("clamp",))
def _decode_chunk_jit(graphdef, state, z, cache, clamp=True):
    return decode_chunk(nnx.merge(graphdef, state), z, cache, clamp=clamp)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("clamp",), donate_argnums=(3,))
def _decode_chunk_jit_donated(graphdef, state, z, cache, clamp=True):
    return decode_chunk(nnx.merge(graphdef, state), z, cache, clamp=clamp)


def jit_decode_chunk(vae, *, donate_cache: bool = False):
    """Compiled `decode_chunk`: returns `step(z, cache, clamp=True) -> (frames, cache)`.

    One executable per (module structure, chunk shape, `cache.started`), shared by all modules of the same
    structure; the parameters are arguments of the executable (not constants). The parameters are
    captured now: build a new step after replacing them. `donate_cache=True` lets XLA write the new cache
    into the old one's buffers (GPU; the passed cache is invalid afterwards).
    """
    graphdef, state = nnx.split(vae)
    fn = _decode_chunk_jit_donated if donate_cache else _decode_chunk_jit
    return lambda z, cache, clamp=True: fn(graphdef, state, z, cache, clamp=clamp)


def decode(vae, z: jax.Array, *, chunk_latents: int | None = None, clamp: bool = True,
           jit: bool = True) -> jax.Array:
    """Decodes a whole latent sequence `[B, T, H, W, z_dim]` -> `[B, 1 + 4(T-1), H·s, W·s, 3]` float32.

    chunk_latents: None decodes all latents in one call; n decodes n latents at a time (less memory,
    same result). jit: run each chunk through `jit_decode_chunk` (else op by op).
    """
    _check_latents(vae, z)
    cache = init_decoder_cache(vae, z.shape[0], z.shape[2], z.shape[3])
    step = jit_decode_chunk(vae) if jit else functools.partial(decode_chunk, vae)
    size = chunk_latents or z.shape[1]
    out = []
    for s in range(0, z.shape[1], size):
        frames, cache = step(z[:, s:s + size], cache, clamp=clamp)
        out.append(frames)
    return jnp.concatenate(out, axis=1) if len(out) > 1 else out[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _encode_chunk_jit(graphdef, state, video, cache):
    return nnx.merge(graphdef, state).encode_chunk(video, cache)


class LatentDecoderVAE(nnx.Module):
    """What `WanVAE` and `Wan22VAE` share: the latent constants of their config and the decoding methods.

    A subclass calls `super().__init__(config)` first, then builds `conv2` (1³ post-quant conv, z -> z) and
    defines `_decode_body(x, cursor, started) -> [B, T_px, H·s, W·s, 3]`.
    """

    def __init__(self, config: WanVAEConfigBase):
        self.config = config
        self.compute_dtype = dtype_from_name(config.compute_dtype)
        self.z_dim = config.z_dim
        self.latent_mean, self.latent_std = config.latent_mean, config.latent_std
        self.spatial_stride, self.temporal_stride = config.spatial_stride, config.temporal_stride

    def init_decoder_cache(self, batch: int, latent_h: int, latent_w: int, dtype=None) -> CausalCache:
        """Zero cache for latents `[batch, T, latent_h, latent_w, z_dim]`."""
        return init_decoder_cache(self, batch, latent_h, latent_w, dtype)

    def decode_chunk(self, z: jax.Array, cache: CausalCache, *, clamp: bool = True):
        """`[B, T, H, W, z_dim]` normalised latents -> (frames `[B, T_px, H·s, W·s, 3]` float32, new cache)."""
        return decode_chunk(self, z, cache, clamp=clamp)

    def decode(self, z: jax.Array, *, chunk_latents: int | None = None, clamp: bool = True,
               jit: bool = True) -> jax.Array:
        """`[B, T, H, W, z_dim]` -> `[B, 1 + 4(T-1), H·s, W·s, 3]` float32 (s = spatial_stride)."""
        return decode(self, z, chunk_latents=chunk_latents, clamp=clamp, jit=jit)


# ---------------------------------------------------------------------------------------------------
# The Wan 2.1 VAE.
# ---------------------------------------------------------------------------------------------------


class WanVAE(LatentDecoderVAE):
    """Wan 2.1 VAE: `encoder` + `conv1` (1³, 2z -> 2z) | `conv2` (1³, z -> z) + `decoder`.

    Attribute names follow the upstream module tree (converter rules map the rest). The compute dtype is
    `config.compute_dtype`; assign `vae.compute_dtype = jnp.bfloat16` to change it after loading.
    """

    def __init__(self, config: WanVAEConfig = WanVAEConfig(), *, rngs: nnx.Rngs | None = None):
        super().__init__(config)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(rngs=rngs, param_dtype=dtype_from_name(config.param_dtype))
        self.encoder = Encoder3d(config.dim, 2 * config.z_dim, config.dim_mult, config.num_res_blocks,
                                 config.temporal_downsample, **kw)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1, **kw)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1, **kw)
        self.decoder = Decoder3d(config.dim, config.z_dim, config.dim_mult, config.num_res_blocks,
                                 config.temporal_downsample[::-1], **kw)

    # -- decoding -----------------------------------------------------------------------------------

    def _decode_body(self, x, cursor, started):
        return self.decoder(x, cursor, started)

    # -- encoding -----------------------------------------------------------------------------------

    def _check_video(self, video: jax.Array, started: bool) -> None:
        s, ts = self.spatial_stride, self.temporal_stride
        ok = (video.ndim == 5 and video.shape[-1] == 3 and min(video.shape[:4]) >= 1
              and video.shape[2] % s == 0 and video.shape[3] % s == 0
              and (video.shape[1] % ts == 0 if started else (video.shape[1] - 1) % ts == 0))
        if not ok:
            rule = f"T = {ts}k, k >= 1 (a later chunk)" if started else f"T = 1 + {ts}k (a first chunk)"
            raise ValueError(f"video must be [B, T, H, W, 3] (channels-last) with H and W multiples of {s} "
                             f"and {rule}; got shape {list(video.shape)}")

    def init_encoder_cache(self, batch: int, height: int, width: int, dtype=None) -> CausalCache:
        """Zero encoder cache for video `[batch, T, height, width, 3]` (pixel size)."""
        dtype = self.compute_dtype if dtype is None else dtype_from_name(dtype)
        probe = jax.ShapeDtypeStruct((batch, 1, height, width, 3), jnp.float32)
        self._check_video(probe, False)

        def trace(x):
            cursor = _CacheCursor(None, "encoder")
            self.encoder(x.astype(dtype), cursor, False)
            return cursor.finish()

        shapes = jax.eval_shape(trace, probe)
        return CausalCache(tuple(jnp.zeros(s.shape, dtype) for s in shapes), False, "encoder",
                           batch, height, width)

    def encode_chunk(self, video: jax.Array, cache: CausalCache) -> tuple[jax.Array, CausalCache]:
        """Encodes pixel frames `[B, T, H, W, 3]` in [-1, 1] (first chunk T = 1 + 4k, later T = 4k).

        Returns normalised μ `[B, T_lat, H/8, W/8, z_dim]` float32 ((μ - mean)/std; T_lat = 1 + k first,
        then k) and the new cache.
        """
        if not isinstance(cache, CausalCache) or cache.kind != "encoder":
            raise ValueError("expected an encoder CausalCache (init_encoder_cache)")
        self._check_video(video, cache.started)
        b, _, h, w, _ = video.shape
        if (cache.batch, cache.height, cache.width) != (b, h, w):
            raise ValueError(f"{cache.describe()} cannot encode video of shape {list(video.shape)}; expected "
                             f"[{cache.batch}, T, {cache.height}, {cache.width}, 3]")
        cursor = _CacheCursor(cache.entries, "encoder")
        out = self.conv1(self.encoder(video.astype(self.compute_dtype), cursor, cache.started))
        mu = out[..., :self.z_dim].astype(jnp.float32)
        mean = jnp.asarray(self.latent_mean, jnp.float32)
        inv_std = 1.0 / jnp.asarray(self.latent_std, jnp.float32)
        return (mu - mean) * inv_std, CausalCache(cursor.finish(), True, "encoder", b, h, w)

    def jit_encode_chunk(self):
        """Compiled `encode_chunk`: `step(video, cache) -> (mu, cache)` (see `jit_decode_chunk`)."""
        graphdef, state = nnx.split(self)
        return lambda video, cache: _encode_chunk_jit(graphdef, state, video, cache)

    def encode(self, video: jax.Array, *, chunk_latents: int | None = None, jit: bool = True) -> jax.Array:
        """Video `[B, 1 + 4k, H, W, 3]` in [-1, 1] -> normalised μ `[B, 1 + k, H/8, W/8, z_dim]` float32.

        chunk_latents: None encodes everything in one call; n encodes frame 0, then 4n frames at a time
        (upstream's 1, 4, 4, ... is n = 1). jit: compile each chunk (else op by op).
        """
        self._check_video(video, False)
        cache = self.init_encoder_cache(video.shape[0], video.shape[2], video.shape[3])
        step = self.jit_encode_chunk() if jit else self.encode_chunk
        if chunk_latents is None:
            return step(video, cache)[0]
        bounds = [0, *range(1, video.shape[1], self.temporal_stride * chunk_latents), video.shape[1]]
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            mu, cache = step(video[:, a:b], cache)
            out.append(mu)
        return jnp.concatenate(out, axis=1)


# ---------------------------------------------------------------------------------------------------
# I2V conditioning (Wan 2.1 I2V, LingBot): y = [mask4 | image-latent16] per latent frame.
# ---------------------------------------------------------------------------------------------------


def _i2v_mask(batch: int, num_latents: int, h: int, w: int, first: bool) -> jax.Array:
    mask = jnp.zeros((batch, num_latents, h, w, 4), jnp.float32)
    return mask.at[:, 0].set(1.0) if first else mask


def i2v_condition(vae: WanVAE, image: jax.Array, num_frames: int, *, jit: bool = True) -> jax.Array:
    """Conditioning channels for image-to-video: image + (num_frames - 1) black frames through the VAE.

    Args:
      image: `[B, H, W, 3]` in [-1, 1], H and W multiples of 8.
      num_frames: pixel frames F = 1 + 4k of the clip.

    Returns:
      `[B, T, H/8, W/8, 20]` float32, T = 1 + k, channels [mask4 | latent16]: the 4 mask channels are the
      4 pixel frames of each latent (latent 0: ones, the image frame; later: zeros); the latent channels
      are the normalised VAE latents of [image, black, ...] (not zero after latent 0). The DiT input is
      [noise16 | mask4 | latent16].
    """
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must be [B, H, W, 3] (channels-last), got shape {list(image.shape)}")
    t = num_latent_frames(num_frames, vae.temporal_stride)
    video = jnp.concatenate([image[:, None].astype(jnp.float32),
                             jnp.zeros((image.shape[0], num_frames - 1, *image.shape[1:]), jnp.float32)], axis=1)
    latents = vae.encode(video, jit=jit)
    b, _, h, w, _ = latents.shape
    return jnp.concatenate([_i2v_mask(b, t, h, w, True), latents], axis=-1)


def i2v_condition_chunk(vae: WanVAE, cache: CausalCache, num_latents: int, image: jax.Array | None = None,
                        *, jit: bool = True) -> tuple[jax.Array, CausalCache]:
    """Streaming `i2v_condition`: the conditioning of the next `num_latents` latent frames.

    First chunk (`cache` fresh from `vae.init_encoder_cache(B, H, W)`): `image` `[B, H, W, 3]` required;
    encodes [image, 4(n-1) black frames], mask ones on latent 0. Later chunks: 4n black frames with the
    carried encoder state, mask zeros. Concatenating the chunks equals `i2v_condition` of the whole clip.

    Returns (`[B, num_latents, H/8, W/8, 20]` [mask4 | latent16], new cache).
    """
    b, hp, wp = cache.batch, cache.height, cache.width
    ts = vae.temporal_stride
    if not cache.started:
        if image is None or tuple(image.shape) != (b, hp, wp, 3):
            raise ValueError(f"the first I2V chunk needs the image [{b}, {hp}, {wp}, 3] (matching the cache); "
                             f"got {None if image is None else list(image.shape)}")
        video = jnp.concatenate([image[:, None].astype(jnp.float32),
                                 jnp.zeros((b, ts * (num_latents - 1), hp, wp, 3), jnp.float32)], axis=1)
    else:
        video = jnp.zeros((b, ts * num_latents, hp, wp, 3), jnp.float32)
    latents, cache_out = (vae.jit_encode_chunk() if jit else vae.encode_chunk)(video, cache)
    _, t, h, w, _ = latents.shape
    return jnp.concatenate([_i2v_mask(b, t, h, w, not cache.started), latents], axis=-1), cache_out
