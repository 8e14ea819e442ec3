"""TAEHV tiny video decoder (madebyollin/taehv, base decoder) in Flax NNX, channels-last.

Supported checkpoints: `taew2_1` (Wan 2.1 / Wan 2.2-A14B latents: 16 channels, patch 1, 8x spatial) and
`taew2_2` (Wan 2.2 TI2V-5B latents: 48 channels, patch 2 — the last conv emits 3·2·2 channels that a
2x2 pixel shuffle turns into RGB, 16x spatial in total). The "super" decoder variant is not supported.

Layout: latents `[B, T, H, W, C_z]`, frames `[B, T_out, H·s, W·s, 3]` (channels-last, values in [0, 1]),
s = 8·patch_size with all spatial upscales on.

Latent scaling: the decoder applies NONE. Feed it the latents exactly as the diffusion model produces
them (the Wan DiT's normalised latent space, i.e. what Wan's VAE would first map with z·std + mean).
That is what madebyollin's `taew2_1` / `taew2_2` checkpoints expect. lightx2v's `lighttaew2_1` was trained
on de-normalised latents instead: for that file the caller must apply z·std + mean (Wan 2.1 VAE
constants) before calling this decoder.

Architecture (upstream `nn.Sequential` index in brackets): [0] Clamp 3·tanh(x/3), [1] conv3x3 z→n0 + [2]
ReLU, then three stages s = 0, 1, 2, each: three MemBlock(n_s) [3-5 | 9-11 | 15-17], nearest Upsample
x2 [6 | 12 | 18] (x1 if that stage's space upscale is off), TGrow(n_s, stride) [7 | 13 | 19], conv3x3
n_s→n_{s+1} without bias [8 | 14 | 20]; then [21] ReLU, [22] conv3x3 n3→3·p², pixel shuffle p, clamp to
[0, 1]. MemBlock(n)(x, past) = ReLU(conv(ReLU(conv(ReLU(conv([x ‖ past]))))) + x), where `past` is the
block's input at the previous frame (zeros before the first frame). TGrow(n, s): 1x1 conv n→s·n without
bias; output frame t·s + j takes channels [j·n, (j+1)·n).

Time: T latents give t_up·T raw frames, t_up = 2^(number of time-upscaling TGrows) (4 for the default
(False, True, True)); the first t_up − 1 raw frames are dropped, so a whole video of T latents decodes to
4T − 3 frames. Streaming (`decode_chunk`) carries one frame of memory per MemBlock (9 arrays) between
chunks: chunk 0 emits 4T − 3 frames, every later chunk 4T, and the concatenation equals decoding the
whole sequence at once up to float summation order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from wm_jax.models.precision import precision_from_name

Array = jax.Array

NUM_STAGES = 3
MEMBLOCKS_PER_STAGE = 3
IMAGE_CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class TAEHVConfig:
    """Architecture of a TAEHV base decoder (field names follow upstream's `TAEHV.__init__` arguments).

    Attributes:
      latent_channels: z channels (16 taew2_1, 48 taew2_2).
      patch_size: output pixel-shuffle factor (1 taew2_1, 2 taew2_2).
      decoder_n_f: stage widths (n0, n1, n2, n3); (256, 128, 64, 64) in every released base decoder.
      decoder_time_upscale: per stage, whether its TGrow doubles the frame count (upstream default
        (False, True, True); a 2-tuple is read as (False, a, b) like upstream).
      decoder_space_upscale: per stage, whether its Upsample doubles H and W.
      param_dtype: storage dtype of the conv weights.
    """

    latent_channels: int = 16
    patch_size: int = 1
    decoder_n_f: tuple[int, int, int, int] = (256, 128, 64, 64)
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)
    decoder_space_upscale: tuple[bool, bool, bool] = (True, True, True)
    param_dtype: str = "float32"

    def __post_init__(self):
        time_up = tuple(bool(v) for v in self.decoder_time_upscale)
        if len(time_up) == 2:
            time_up = (False, *time_up)
        object.__setattr__(self, "decoder_time_upscale", time_up)
        object.__setattr__(self, "decoder_space_upscale", tuple(bool(v) for v in self.decoder_space_upscale))
        object.__setattr__(self, "decoder_n_f", tuple(int(v) for v in self.decoder_n_f))
        if len(self.decoder_time_upscale) != NUM_STAGES or len(self.decoder_space_upscale) != NUM_STAGES:
            raise ValueError("decoder_time_upscale / decoder_space_upscale need one flag per stage (3)")
        if len(self.decoder_n_f) != NUM_STAGES + 1:
            raise ValueError(f"decoder_n_f needs 4 widths, got {self.decoder_n_f}")
        if self.patch_size < 1 or self.latent_channels < 1:
            raise ValueError(f"bad patch_size {self.patch_size} / latent_channels {self.latent_channels}")

    @property
    def time_strides(self) -> tuple[int, ...]:
        return tuple(2 if up else 1 for up in self.decoder_time_upscale)

    @property
    def space_factors(self) -> tuple[int, ...]:
        return tuple(2 if up else 1 for up in self.decoder_space_upscale)

    @property
    def t_upscale(self) -> int:
        """Raw output frames per latent frame."""
        out = 1
        for s in self.time_strides:
            out *= s
        return out

    @property
    def frames_to_trim(self) -> int:
        """Raw frames dropped at the start of a video (first chunk only)."""
        return self.t_upscale - 1

    @property
    def spatial_upscale(self) -> int:
        out = self.patch_size
        for f in self.space_factors:
            out *= f
        return out

    def num_output_frames(self, latent_frames: int, first_chunk: bool = True) -> int:
        return self.t_upscale * latent_frames - (self.frames_to_trim if first_chunk else 0)

    def memory_shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Shapes `[B, H_s, W_s, n_s]` of the 9 MemBlock memories for latents of size height x width."""
        shapes = []
        h, w = height, width
        for stage in range(NUM_STAGES):
            shapes += [(batch, h, w, self.decoder_n_f[stage])] * MEMBLOCKS_PER_STAGE
            h, w = h * self.space_factors[stage], w * self.space_factors[stage]
        return shapes

    def replace(self, **changes) -> TAEHVConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TAEHVConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TAEHVConfig fields {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ---------------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------------


class Conv2d(nnx.Module):
    """Per-frame 2D convolution, 'same' padding, stride 1. kernel HWIO `[k, k, in, out]`, x `[..., H, W, in]`
    (any leading axes)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int, *, use_bias: bool,
                 rngs: nnx.Rngs, param_dtype, dtype, precision):
        fan_in = in_features * kernel_size * kernel_size
        init = nnx.initializers.normal(stddev=fan_in**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, in_features, out_features),
                                     param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: Array) -> Array:
        lead = x.shape[:-3]
        x = x.reshape((-1, *x.shape[-3:])).astype(self.dtype)
        k = self.kernel.shape[0]
        # Output in the compute dtype (the GPU conv kernels accumulate in float32 internally; asking XLA for
        # a float32 result from bf16 inputs made the H100 decode ~1.8x slower).
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...].astype(self.dtype), window_strides=(1, 1),
            padding=((k // 2, k // 2), (k // 2, k // 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.reshape((*lead, *y.shape[1:]))


class MemBlock(nnx.Module):
    """ReLU(conv2(ReLU(conv1(ReLU(conv0([x ‖ past]))))) + x); x, past `[B, T, H, W, n]`."""

    def __init__(self, n: int, *, rngs: nnx.Rngs, **kw):
        self.conv0 = Conv2d(2 * n, n, 3, use_bias=True, rngs=rngs, **kw)
        self.conv1 = Conv2d(n, n, 3, use_bias=True, rngs=rngs, **kw)
        self.conv2 = Conv2d(n, n, 3, use_bias=True, rngs=rngs, **kw)

    def __call__(self, x: Array, past: Array) -> Array:
        h = jax.nn.relu(self.conv0(jnp.concatenate([x, past], axis=-1)))
        h = jax.nn.relu(self.conv1(h))
        return jax.nn.relu(self.conv2(h) + x)


class Stage(nnx.Module):
    """3 MemBlocks at width n_in, nearest upsample, TGrow, conv3x3 n_in -> n_out (no bias)."""

    def __init__(self, n_in: int, n_out: int, time_stride: int, space_factor: int, *, rngs: nnx.Rngs, **kw):
        self.mem = nnx.List([MemBlock(n_in, rngs=rngs, **kw) for _ in range(MEMBLOCKS_PER_STAGE)])
        self.tgrow = Conv2d(n_in, n_in * time_stride, 1, use_bias=False, rngs=rngs, **kw)
        self.conv = Conv2d(n_in, n_out, 3, use_bias=False, rngs=rngs, **kw)
        self.time_stride = time_stride
        self.space_factor = space_factor

    def __call__(self, x: Array, memory: Sequence[Array]) -> tuple[Array, list[Array]]:
        """x `[B, T, H, W, n_in]`, memory 3 x `[B, H, W, n_in]` -> (`[B, T·stride, H·f, W·f, n_out]`, new memory)."""
        new_memory = []
        for block, mem in zip(self.mem, memory):
            past = jnp.concatenate([mem[:, None].astype(x.dtype), x[:, :-1]], axis=1)
            new_memory.append(x[:, -1])
            x = block(x, past)
        f = self.space_factor
        if f > 1:
            x = jnp.repeat(jnp.repeat(x, f, axis=2), f, axis=3)
        b, t, h, w, c = x.shape
        s = self.time_stride
        x = self.tgrow(x)  # [B, T, H, W, s·C]; frame t·s + j takes channels [j·C, (j+1)·C)
        if s > 1:
            x = x.reshape(b, t, h, w, s, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, t * s, h, w, c)
        return self.conv(x), new_memory


class TAEHVDecoder(nnx.Module):
    """TAEHV base decoder; see the module docstring. Use `decode_video` / `decode_chunk` to run it."""

    def __init__(self, cfg: TAEHVConfig, *, rngs: nnx.Rngs | None = None, compute_dtype=jnp.float32,
                 precision=None):
        """
        Args:
          cfg: architecture.
          compute_dtype: activation dtype (bfloat16 is ~1.7x faster than float32 on an H100).
          precision: `jax.lax.Precision` (or its name) for the convs; None is the backend default (TF32 on
            recent NVIDIA GPUs for float32 inputs); use "highest" for float32 parity.
        """
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = {"param_dtype": jnp.dtype(cfg.param_dtype), "dtype": jnp.dtype(compute_dtype),
              "precision": precision_from_name(precision)}
        n = cfg.decoder_n_f
        self.config = cfg
        self.compute_dtype = jnp.dtype(compute_dtype)
        self.conv_in = Conv2d(cfg.latent_channels, n[0], 3, use_bias=True, rngs=rngs, **kw)
        self.stages = nnx.List([
            Stage(n[s], n[s + 1], cfg.time_strides[s], cfg.space_factors[s], rngs=rngs, **kw)
            for s in range(NUM_STAGES)])
        self.conv_out = Conv2d(n[3], IMAGE_CHANNELS * cfg.patch_size**2, 3, use_bias=True, rngs=rngs, **kw)

    def __call__(self, z: Array, memory: Sequence[Array]) -> tuple[Array, tuple[Array, ...]]:
        """Raw (untrimmed) decode of one chunk.

        Args:
          z: latents `[B, T, H, W, C_z]` (no scaling applied; see module docstring).
          memory: 9 MemBlock memories, shapes `config.memory_shapes(B, H, W)`.
        Returns:
          frames `[B, t_up·T, H·s, W·s, 3]` float32 in [0, 1], and the 9 new memories.
        """
        cfg = self.config
        x = z.astype(jnp.float32)
        x = (jnp.tanh(x / 3.0) * 3.0).astype(self.compute_dtype)
        x = jax.nn.relu(self.conv_in(x))
        new_memory: list[Array] = []
        for s, stage in enumerate(self.stages):
            x, mem = stage(x, memory[s * MEMBLOCKS_PER_STAGE:(s + 1) * MEMBLOCKS_PER_STAGE])
            new_memory += mem
        x = self.conv_out(jax.nn.relu(x)).astype(jnp.float32)
        p = cfg.patch_size
        if p > 1:  # pixel shuffle: channel c·p² + i·p + j -> pixel (h·p + i, w·p + j) of channel c
            b, t, h, w, _ = x.shape
            x = x.reshape(b, t, h, w, IMAGE_CHANNELS, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
            x = x.reshape(b, t, h * p, w * p, IMAGE_CHANNELS)
        return jnp.clip(x, 0.0, 1.0), tuple(new_memory)


# ---------------------------------------------------------------------------------------------------
# Decoding API.
# ---------------------------------------------------------------------------------------------------


@struct.dataclass
class DecoderState:
    """Streaming state: the 9 MemBlock memories (`[B, H_s, W_s, n_s]`, the last input frame each block saw)
    and whether the start-up frames were already dropped (static)."""

    memory: tuple[Array, ...]
    started: bool = struct.field(pytree_node=False, default=False)


def init_decoder_state(module: TAEHVDecoder, batch: int, height: int, width: int) -> DecoderState:
    """Empty (zero) memories for latents `[batch, *, height, width, C_z]`."""
    shapes = module.config.memory_shapes(batch, height, width)
    return DecoderState(memory=tuple(jnp.zeros(s, module.compute_dtype) for s in shapes), started=False)


@nnx.jit
def _decode_raw(module: TAEHVDecoder, z: Array, memory: tuple[Array, ...]):
    return module(z, memory)


def _check_latents(module: TAEHVDecoder, z) -> None:
    cfg = module.config
    c = cfg.latent_channels
    if getattr(z, "ndim", None) != 5 or z.shape[-1] != c:
        hint = ""
        if getattr(z, "ndim", None) == 5 and z.shape[2] == c:
            hint = " (this looks like NTCHW; transpose to channels-last)"
        raise ValueError(f"TAEHV latents must be [B, T, H, W, {c}] (channels-last, {c} latent channels), "
                         f"got shape {tuple(getattr(z, 'shape', ()))}{hint}")
    if z.shape[1] < 1:
        raise ValueError("TAEHV latents have no frames (T = 0)")


def _check_state(module: TAEHVDecoder, z, state: DecoderState) -> None:
    b, _, h, w, _ = z.shape
    want = module.config.memory_shapes(b, h, w)
    got = [tuple(m.shape) for m in state.memory]
    if got != want:
        if len(got) == len(want) and got:
            got_bhw = (got[0][0], got[0][1], got[0][2])
            msg = (f"decoder state was made for batch {got_bhw[0]} and latent size {got_bhw[1]}x{got_bhw[2]}, "
                   f"but this chunk has batch {b} and latent size {h}x{w}")
        else:
            msg = f"decoder state memories {got} do not match this decoder (expected {want})"
        raise ValueError(msg + "; start a new stream with init_decoder_state(...)")


def decode_chunk(module: TAEHVDecoder, z_chunk: Array, state: DecoderState) -> tuple[Array, DecoderState]:
    """Decodes T latents in parallel, continuing a stream.

    Args:
      module: the decoder.
      z_chunk: latents `[B, T, H, W, C_z]` channels-last, no scaling applied (see module docstring).
      state: from `init_decoder_state` (first chunk) or the previous `decode_chunk`.
    Returns:
      frames `[B, T_out, 8·p·H, 8·p·W, 3]` float32 in [0, 1] (T_out = 4T − 3 on the first chunk, 4T after,
      with the default time upscaling), and the new state.
    Raises:
      ValueError: wrong latent shape, or a state for another batch size / resolution.
    """
    _check_latents(module, z_chunk)
    _check_state(module, z_chunk, state)
    frames, memory = _decode_raw(module, jnp.asarray(z_chunk), tuple(state.memory))
    if not state.started:
        frames = frames[:, module.config.frames_to_trim:]
    return frames, DecoderState(memory=memory, started=True)


def decode_video(module: TAEHVDecoder, z: Array) -> Array:
    """Decodes a whole latent video in parallel over time (upstream `decode_video(parallel=True)`).

    Args:
      z: `[B, T, H, W, C_z]` channels-last, no scaling applied.
    Returns:
      `[B, 4T − 3, 8·p·H, 8·p·W, 3]` float32 in [0, 1] (default time upscaling).
    """
    _check_latents(module, z)
    b, _, h, w, _ = z.shape
    frames, _ = decode_chunk(module, z, init_decoder_state(module, b, h, w))
    return frames


def decode_stream(module: TAEHVDecoder, z: Array, chunk: int) -> Array:
    """Decodes `z` `[B, T, H, W, C_z]` in chunks of `chunk` latents (last one may be shorter), carrying the
    memories between chunks; returns the concatenated frames (same count as `decode_video`)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_latents(module, z)
    b, t, h, w, _ = z.shape
    state = init_decoder_state(module, b, h, w)
    out = []
    for start in range(0, t, chunk):
        frames, state = decode_chunk(module, z[:, start:start + chunk], state)
        out.append(frames)
    return jnp.concatenate(out, axis=1)
