"""Wan diffusion transformer (Wan 2.1 / 2.2, LingBot-World camera models, Self-Forcing) in Flax NNX.

Layout: latents channels-last `[B, F, H, W, C]`; inside the model the residual stream is
`[B, F, S, D]` (S = (H/2)·(W/2) tokens per latent frame) so per-frame modulation broadcasts without
materialising per-token copies. The blocks' weights are stacked on a leading layer axis and run with
`jax.lax.scan`.

Precision (upstream's autocast regions): Linear layers and attention run in `compute_dtype`; with
`config.fp32_modulation` the time MLP, modulation arithmetic, residual stream and head run in float32
(Wan / LingBot); without it they run in the compute dtype too (Self-Forcing). Norm statistics are
always float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from wm_jax.kernels.attention import attention, attention_with_cache
from wm_jax.models.config import PATCH_SIZE, WanConfig
from wm_jax.models.embeddings import (apply_rope, patchify, rope_for_grid, timestep_sinusoid, unpatchify)
from wm_jax.parallel import ulysses
from wm_jax.parallel.ulysses import SequenceShards

Array = jax.Array


def _dtype(name_or_dtype) -> jnp.dtype:
    return jnp.dtype(name_or_dtype)


class Dense(nnx.Module):
    """y = x W + b, W `[in, out]`, computed in `dtype` with float32 accumulation."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, param_dtype, dtype,
                 use_bias: bool = True):
        init = nnx.initializers.normal(stddev=in_features**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                       preferred_element_type=jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) over the last axis in float32, cast back, times weight (float32 param)."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return normed * self.scale[...].astype(x.dtype)


def layer_norm(x: Array, eps: float) -> Array:
    """Parameter-free LayerNorm with float32 statistics; returns float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class LayerNorm(nnx.Module):
    """Affine LayerNorm in float32 (norm3, image-embedding norms)."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


def _dense(cfg: WanConfig, rngs, dtype, n_in, n_out, **kw) -> Dense:
    return Dense(n_in, n_out, rngs=rngs, param_dtype=_dtype(cfg.param_dtype), dtype=dtype, **kw)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.dim
        self.q, self.k, self.v, self.o = (_dense(cfg, rngs, dtype, d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)
        self.num_heads = cfg.num_heads

    def project_qkv(self, x: Array, rope: tuple[Array, Array]) -> tuple[Array, Array, Array]:
        """x [B, L, D] -> q, k (RMS-normed over D, then RoPE), v, each [B, L, N, d]."""
        b, length, _ = x.shape
        heads = lambda t: t.reshape(b, length, self.num_heads, -1)
        q = apply_rope(heads(self.norm_q(self.q(x))), *rope)
        k = apply_rope(heads(self.norm_k(self.k(x))), *rope)
        return q, k, heads(self.v(x))

    def __call__(self, x: Array, rope: tuple[Array, Array], attention_impl: str,
                 past: PastKV | None = None, mask: Array | None = None,
                 shards: SequenceShards | None = None, frames: int = 1) -> tuple[Array, tuple[Array, Array]]:
        """x [B, L, D] -> (output [B, L, D], this call's (k, v) [B, L, N, d] for a KV cache).

        With `past`, the queries also attend to the cached keys/values (already rotated at their
        absolute positions); only its first `past.valid_length` tokens count. `mask` [L, L] (True =
        attend) restricts attention among the L tokens themselves (full-sequence references only).
        With `shards` (inside shard_map), x holds this device's tokens of `frames` latent frames and
        attention runs Ulysses-style: the returned (k, v) are [B, F·S, N_pad/P, d] (N heads padded to a
        multiple of the P devices), every real token of this device's heads (the layout of the
        head-sharded cache).
        """
        b, length, _ = x.shape
        q, k, v = self.project_qkv(x, rope)
        if shards is not None:
            if mask is not None:
                raise ValueError("a dense attention mask is for single-device references only")
            cache = None if past is None else (past.k, past.v, past.layer, past.valid_length)
            out, new_kv = ulysses.self_attention(q, k, v, shards, frames, cache=cache, implementation=attention_impl)
            return self.o(out.reshape(b, length, -1)), new_kv
        if past is None:
            out = attention(q, k, v, mask=mask, implementation=attention_impl)
        else:
            out = attention_with_cache(q, k, v, past.k, past.v, past.layer, past.valid_length,
                                       implementation=attention_impl)
        return self.o(out.reshape(b, length, -1)), (k, v)


class CrossAttention(nnx.Module):
    """Attention from video tokens to the 512 text tokens (and, Wan2.1 I2V, to 257 CLIP tokens)."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.dim
        self.q, self.k, self.v, self.o = (_dense(cfg, rngs, dtype, d, d) for _ in range(4))
        self.norm_q = RMSNorm(d, cfg.eps)
        self.norm_k = RMSNorm(d, cfg.eps)
        if cfg.image_dim:
            self.k_img = _dense(cfg, rngs, dtype, d, d)
            self.v_img = _dense(cfg, rngs, dtype, d, d)
            self.norm_k_img = RMSNorm(d, cfg.eps)
        self.has_image = bool(cfg.image_dim)
        self.num_heads = cfg.num_heads

    def context_kv(self, context: Array, image_context: Array | None) -> dict[str, Array]:
        """Keys/values of the conditioning, [B, Lc, N, d] each; computable once per prompt."""
        b = context.shape[0]
        heads = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1)
        kv = {"k": heads(self.norm_k(self.k(context))), "v": heads(self.v(context))}
        if self.has_image:
            kv["k_img"] = heads(self.norm_k_img(self.k_img(image_context)))
            kv["v_img"] = heads(self.v_img(image_context))
        return kv

    def __call__(self, x: Array, kv: dict[str, Array], attention_impl: str,
                 shards: SequenceShards | None = None, frames: int = 1) -> Array:
        """x [B, L, D] (with `shards`: this device's tokens of `frames` frames) -> [B, L, D]."""
        b, length, _ = x.shape
        q = self.norm_q(self.q(x)).reshape(b, length, self.num_heads, -1)
        if shards is None:
            attend = lambda k, v: attention(q, k, v, implementation=attention_impl)
        else:
            attend = lambda k, v: ulysses.cross_attention(q, k, v, shards, frames,
                                                          heads_sharded=shards.context_heads_sharded,
                                                          implementation=attention_impl)
        out = attend(kv["k"], kv["v"])
        if self.has_image:
            out = out + attend(kv["k_img"], kv["v_img"])
        return self.o(out.reshape(b, length, -1))


class FeedForward(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype):
        self.fc1 = _dense(cfg, rngs, dtype, cfg.dim, cfg.ffn_dim)
        self.fc2 = _dense(cfg, rngs, dtype, cfg.ffn_dim, cfg.dim)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class CameraInjector(nnx.Module):
    """LingBot per-block camera modulation: x ← (1 + Scale(g)) ⊙ x + Shift(g), g = cam + MLP(cam)."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.dim
        self.fc1, self.fc2, self.scale, self.shift = (_dense(cfg, rngs, dtype, d, d) for _ in range(4))

    def __call__(self, x: Array, camera: Array) -> Array:
        g = self.fc2(jax.nn.silu(self.fc1(camera))) + camera
        return (1.0 + self.scale(g).astype(x.dtype)) * x + self.shift(g).astype(x.dtype)


@dataclass(frozen=True)
class PastKV:
    """The KV cache as one layer's attention sees it: every layer's k, v [layers, B, T_cache, N, d], this
    layer's index (int32 scalar) and the number of valid cached tokens (int32 scalar)."""

    k: Array
    v: Array
    layer: Array
    valid_length: Array


@dataclass(frozen=True)
class BlockInputs:
    """Per-forward values shared by every block (closed over by the layer scan).

    Shapes: e0 [B, F, 6, D] (modulation offsets per latent frame); rope (cos, sin) each [L, d/2];
    camera [B, L, D] or None; attention_mask [L, L] bool or None (self-attention, True = attend).
    With `shards`, L counts this device's tokens only (F·S_dev).
    """

    e0: Array
    rope: tuple[Array, Array]
    camera: Array | None
    attention_mask: Array | None = None
    shards: SequenceShards | None = None


class WanBlock(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype, mod_dtype):
        self.modulation = nnx.Param(jnp.zeros((6, cfg.dim), jnp.float32))
        self.self_attn = SelfAttention(cfg, rngs=rngs, dtype=dtype)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps)
        self.cross_attn = CrossAttention(cfg, rngs=rngs, dtype=dtype)
        self.ffn = FeedForward(cfg, rngs=rngs, dtype=dtype)
        self.camera = CameraInjector(cfg, rngs=rngs, dtype=dtype) if cfg.camera_channels else None
        self.eps = cfg.eps
        self.mod_dtype = mod_dtype

    def __call__(self, x: Array, ctx_kv: dict[str, Array], inputs: BlockInputs, attention_impl: str,
                 past: PastKV | None = None) -> tuple[Array, tuple[Array, Array]]:
        """x [B, F, S, D] residual stream (mod dtype) -> (same, self-attention (k, v) [B, F·S, N, d]).

        ctx_kv: this layer's cross-attention K/V from `CrossAttention.context_kv`; past: this layer's cache.
        With `inputs.shards`, S is this device's share of each frame and (k, v) are head-sharded (see
        `SelfAttention`).
        """
        b, f, s, d = x.shape
        m = self.modulation[...].astype(self.mod_dtype) + inputs.e0.astype(self.mod_dtype)  # [B, F, 6, D]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (m[:, :, i, None, :] for i in range(6))
        flat = lambda t: t.reshape(b, f * s, -1)
        frames = lambda t: t.reshape(b, f, s, -1)

        h = layer_norm(x, self.eps).astype(self.mod_dtype) * (1 + scale_sa) + shift_sa
        y, new_kv = self.self_attn(flat(h), inputs.rope, attention_impl, past, inputs.attention_mask,
                                   inputs.shards, f)
        x = x + frames(y).astype(self.mod_dtype) * gate_sa
        if self.camera is not None and inputs.camera is not None:
            x = frames(self.camera(flat(x), inputs.camera))
        y = self.cross_attn(flat(self.norm3(x).astype(x.dtype)), ctx_kv, attention_impl, inputs.shards, f)
        x = x + frames(y).astype(self.mod_dtype)
        h = layer_norm(x, self.eps).astype(self.mod_dtype) * (1 + scale_ff) + shift_ff
        y = frames(self.ffn(flat(h)))
        return x + y.astype(self.mod_dtype) * gate_ff, new_kv


class ImageEmbedding(nnx.Module):
    """Wan2.1 I2V CLIP tokens [B, 257, 1280] -> [B, 257, D]: LN, Linear, GELU(erf), Linear, LN."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype):
        c = cfg.image_dim
        self.norm_in = LayerNorm(c, 1e-5)
        self.fc1 = _dense(cfg, rngs, dtype, c, c)
        self.fc2 = _dense(cfg, rngs, dtype, c, cfg.dim)
        self.norm_out = LayerNorm(cfg.dim, 1e-5)
        self.pos = (nnx.Param(jnp.zeros((cfg.image_pos_tokens, c), jnp.float32))
                    if cfg.image_pos_tokens else None)

    def __call__(self, tokens: Array) -> Array:
        if self.pos is not None:
            tokens = tokens + self.pos[...][None, : tokens.shape[1]]
        h = self.fc2(jax.nn.gelu(self.fc1(self.norm_in(tokens)), approximate=False))
        return self.norm_out(h)


class CameraEmbedding(nnx.Module):
    """LingBot camera map, patchified [B, F, S, 4·C_cam] -> per-token features [B, F·S, D]: p + MLP(p)."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.dim
        self.patch = _dense(cfg, rngs, dtype, cfg.camera_channels * PATCH_SIZE[1] * PATCH_SIZE[2], d)
        self.fc1 = _dense(cfg, rngs, dtype, d, d)
        self.fc2 = _dense(cfg, rngs, dtype, d, d)

    def __call__(self, camera_tokens: Array) -> Array:
        b = camera_tokens.shape[0]
        p = self.patch(camera_tokens.reshape(b, -1, camera_tokens.shape[-1]))
        return p + self.fc2(jax.nn.silu(self.fc1(p)))


class Head(nnx.Module):
    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs, mod_dtype):
        self.modulation = nnx.Param(jnp.zeros((2, cfg.dim), jnp.float32))
        self.linear = _dense(cfg, rngs, mod_dtype, cfg.dim, 4 * cfg.out_dim)
        self.eps = cfg.eps
        self.mod_dtype = mod_dtype

    def __call__(self, x: Array, e: Array) -> Array:
        """x [B, F, S, D], e [B, F, D] -> [B, F, S, 4·C_out] (features (dy, dx, c))."""
        m = self.modulation[...].astype(self.mod_dtype)[None, None] + e[:, :, None, :].astype(self.mod_dtype)
        shift, scale = m[:, :, 0, None, :], m[:, :, 1, None, :]
        return self.linear(layer_norm(x, self.eps).astype(self.mod_dtype) * (1 + scale) + shift)


def _make_blocks(cfg: WanConfig, rngs: nnx.Rngs, dtype, mod_dtype) -> WanBlock:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return WanBlock(cfg, rngs=rngs, dtype=dtype, mod_dtype=mod_dtype)

    return make(rngs)


class WanModel(nnx.Module):
    """The Wan DiT. See module docstring for layout and precision."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs | None = None, compute_dtype=jnp.float32,
                 attention_impl: str = "auto"):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = _dtype(compute_dtype)
        mod_dtype = jnp.float32 if cfg.fp32_modulation else dtype
        d = cfg.dim
        self.config = cfg
        self.compute_dtype = dtype
        self.mod_dtype = mod_dtype
        self.attention_impl = attention_impl
        self.patch_embed = _dense(cfg, rngs, dtype, cfg.patch_features, d)
        self.text_fc1 = _dense(cfg, rngs, dtype, cfg.text_dim, d)
        self.text_fc2 = _dense(cfg, rngs, dtype, d, d)
        self.time_fc1 = _dense(cfg, rngs, mod_dtype, cfg.freq_dim, d)
        self.time_fc2 = _dense(cfg, rngs, mod_dtype, d, d)
        self.time_proj = _dense(cfg, rngs, mod_dtype, d, 6 * d)
        self.image_embed = ImageEmbedding(cfg, rngs=rngs, dtype=dtype) if cfg.image_dim else None
        self.camera_embed = CameraEmbedding(cfg, rngs=rngs, dtype=dtype) if cfg.camera_channels else None
        self.blocks = _make_blocks(cfg, rngs, dtype, mod_dtype)
        self.head = Head(cfg, rngs=rngs, mod_dtype=mod_dtype)

    # --- conditioning, computable once per prompt / per chunk -------------------------------------

    def embed_text(self, context: Array) -> Array:
        """T5 features [B, Lc, text_dim] (real tokens only, Lc <= text_len) -> [B, text_len, D].

        Zero rows are appended up to text_len; the padding rows are embedded and attended like upstream.
        """
        b, length, width = context.shape
        cfg = self.config
        if width != cfg.text_dim:
            raise ValueError(f"context has {width} features per token, the model expects text_dim {cfg.text_dim}")
        if length > cfg.text_len:
            raise ValueError(f"context has {length} tokens, more than text_len {cfg.text_len}")
        context = jnp.pad(context, ((0, 0), (0, cfg.text_len - length), (0, 0)))
        return self.text_fc2(jax.nn.gelu(self.text_fc1(context), approximate=True))

    def embed_time(self, t: Array, batch: int, frames: int) -> tuple[Array, Array]:
        """t [B] or [B, F] (scheduler timesteps) -> e [B, F, D], e0 [B, F, 6, D] in the mod dtype."""
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (batch,))
        if t.ndim == 1:
            t = jnp.broadcast_to(t[:, None], (batch, frames))
        if t.shape != (batch, frames):
            raise ValueError(f"t has shape {t.shape}; expected [B]={batch} or [B, F]=[{batch}, {frames}]")
        s = timestep_sinusoid(t, self.config.freq_dim).astype(self.mod_dtype)
        e = self.time_fc2(jax.nn.silu(self.time_fc1(s)))
        e0 = self.time_proj(jax.nn.silu(e)).reshape(batch, frames, 6, self.config.dim)
        return e, e0

    def cross_kv(self, text: Array, image_tokens: Array | None = None) -> dict[str, Array]:
        """Per-layer cross-attention K/V, stacked [layers, B, Lc, N, d]; computable once per prompt.

        Args:
          text: embedded text [B, text_len, D] from `embed_text`.
          image_tokens: Wan2.1 I2V CLIP features [B, 257, image_dim] (required iff config.image_dim).
        """
        if bool(self.config.image_dim) != (image_tokens is not None):
            raise ValueError("image_tokens (CLIP features) are required by, and only by, Wan2.1 I2V models")
        image_context = self.image_embed(image_tokens) if image_tokens is not None else None
        graphdef, state = nnx.split(self.blocks)

        def one_layer(layer_state):
            return nnx.merge(graphdef, layer_state).cross_attn.context_kv(text, image_context)

        return jax.lax.map(one_layer, state)

    # --- forward ----------------------------------------------------------------------------------

    def _check_latents(self, x: Array, y: Array | None):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"latents must be [B, F, H, W, C], got shape {x.shape}")
        channels = x.shape[-1] + (y.shape[-1] if y is not None else 0)
        if channels != cfg.in_dim:
            raise ValueError(f"latents (+ y) have {channels} channels; the model expects in_dim {cfg.in_dim}"
                             + (" (noise 16 + y 20 for I2V)" if cfg.in_dim == 36 else ""))
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"latent height/width {x.shape[2:4]} must be even (patch 2x2)")

    def __call__(self, x: Array, t: Array, context: Array, *, y: Array | None = None,
                 image_tokens: Array | None = None, camera: Array | None = None,
                 frame_offset: Array | int = 0) -> Array:
        """Flow prediction v ≈ ε − x0.

        Args:
          x: noisy latents [B, F, H, W, C_noise] channels-last.
          t: scheduler timesteps, [B] or [B, F] (per latent frame); integer t for Wan/LingBot, warped
             float t for Self-Forcing; never σ.
          context: T5 features [B, Lc, text_dim], real tokens only (zero-padded to text_len here).
          y: I2V conditioning [B, F, H, W, 20] = [mask 4 | image latent 16], concatenated after x.
          image_tokens: Wan2.1 I2V CLIP features [B, 257, 1280].
          camera: LingBot camera map [B, F, H, W, camera_channels] (see wm_jax.models.camera); None
             skips the camera path.
          frame_offset: absolute latent index of frame 0 (RoPE temporal position); or [F] per-frame
            offsets, frame f then sits at f + frame_offset[f] (training places chunks freely).
        Returns:
          [B, F, H, W, out_dim] float32.
        """
        self._check_latents(x, y)
        if y is not None:
            x = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
        kv = self.cross_kv(self.embed_text(context), image_tokens)
        flow, _ = self.forward_with_cross_kv(x, t, kv, camera=camera, frame_offset=frame_offset)
        return flow

    def forward_with_cross_kv(self, x: Array, t: Array, cross_kv: dict[str, Array], *,
                              camera: Array | None = None, frame_offset: Array | int = 0,
                              cache: tuple[Array, Array, Array] | None = None,
                              attention_mask: Array | None = None,
                              shards: SequenceShards | None = None) -> tuple[Array, tuple[Array, Array]]:
        """The forward with the conditioning precomputed (x already holds all in_dim channels).

        Args:
          x, t, camera, frame_offset: as in `__call__`.
          cross_kv: from `cross_kv`, leaves [layers, B, Lc, N, d].
          cache: optional (k, v, valid_length): per-layer cached keys/values [layers, B, T_cache, N, d]
            (keys rotated at their absolute positions) and the number of valid cached tokens (int32
            scalar). The chunk attends to itself and to the valid cache, unmasked.
          attention_mask: optional self-attention mask [F·S, F·S] bool (True = attend), tokens in
            (f, i, j) order; for full-sequence references such as the block-causal mask of a rollout
            (`CacheLayout.visible_frames`). Not combinable with `cache`.
          shards: run as one device of a Ulysses group (inside `shard_map` over `shards.axis_name`): x,
            t, camera are whole (the same on every device); each device embeds and runs its share of
            every frame's tokens, the cache and the returned (k, v) hold this device's N_pad/P heads (N
            padded to a multiple of the P devices), and the output is gathered whole on every device.
        Returns:
          (flow [B, F, H, W, out_dim] float32, this chunk's self-attention (k, v), each
          [layers, B, F·S, N, d] (N_pad/P heads with `shards`), k rotated at absolute positions frame_offset + f).
        """
        cfg = self.config
        b, f, h, w, _ = x.shape
        local = (lambda a, axis=2: a) if shards is None else shards.local_tokens
        tokens = self.patch_embed(local(patchify(x.astype(self.compute_dtype))))  # [B, F, S(_dev), D]
        s = tokens.shape[2]
        stream = tokens.astype(self.mod_dtype)
        e, e0 = self.embed_time(t, b, f)
        if camera is not None:
            if self.camera_embed is None:
                raise ValueError("camera given, but this model has no camera layers")
            if camera.shape[:4] != x.shape[:4] or camera.shape[-1] != cfg.camera_channels:
                raise ValueError(f"camera map has shape {camera.shape}; expected "
                                 f"{(*x.shape[:4], cfg.camera_channels)}")
            camera = self.camera_embed(local(patchify(camera.astype(self.compute_dtype))))
        if attention_mask is not None and cache is not None:
            raise ValueError("attention_mask covers the tokens of x only; it cannot be combined with a cache")
        if attention_mask is not None and attention_mask.shape != (f * s, f * s):
            raise ValueError(f"attention_mask must be [{f * s}, {f * s}] (tokens of x), got {attention_mask.shape}")
        rope = rope_for_grid(cfg.head_dim, f, h // 2, w // 2, frame_offset)
        rope = tuple(local(r.reshape(f, -1, r.shape[-1]), 1).reshape(f * s, -1) for r in rope)
        inputs = BlockInputs(e0=e0, rope=rope, camera=camera, attention_mask=attention_mask, shards=shards)
        graphdef, state = nnx.split(self.blocks)
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)

        def layer(stream, scanned):
            layer_state, layer_cross_kv, layer_index = scanned
            block = nnx.merge(graphdef, layer_state)
            # the whole stacked cache is read by index, never sliced per layer (no copy per layer)
            past = None if cache is None else PastKV(cache[0], cache[1], layer_index, cache[2])
            return block(stream, layer_cross_kv, inputs, self.attention_impl, past)

        stream, new_kv = jax.lax.scan(layer, stream, (state, cross_kv, layers))
        out = self.head(stream, e).astype(jnp.float32)  # [B, F, S(_dev), 4·C]
        if shards is not None:
            out = shards.gather_tokens(out)
        return unpatchify(out, h // 2, w // 2), new_kv


@dataclass
class ExpertPair:
    """Two Wan DiTs of one architecture switched by timestep (Wan2.2 A14B, LingBot base, FastVideo's causal
    Wan2.2): the high-noise expert while t >= boundary·1000, else the low-noise one. (Not frozen: setting
    `attention_impl` sets both experts'.)"""

    high_noise: WanModel
    low_noise: WanModel
    boundary: float

    def __post_init__(self):
        if self.high_noise.config != self.low_noise.config:
            raise ValueError(f"the experts differ: {self.high_noise.config} and {self.low_noise.config}")

    def select(self, t: int | float) -> WanModel:
        return self.high_noise if t >= self.boundary * 1000 else self.low_noise

    @property
    def experts(self) -> tuple[WanModel, WanModel]:
        """(high-noise, low-noise): the order their passes run in."""
        return self.high_noise, self.low_noise

    @property
    def config(self) -> WanConfig:
        return self.high_noise.config

    @property
    def compute_dtype(self):
        return self.high_noise.compute_dtype

    @property
    def attention_impl(self) -> str:
        return self.high_noise.attention_impl

    @attention_impl.setter
    def attention_impl(self, value: str) -> None:
        for expert in self.experts:
            expert.attention_impl = value
