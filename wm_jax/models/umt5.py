"""umT5 text encoder (Wan-Video/Wan2.1 `wan/modules/t5.py` `T5Encoder`, = HF `UMT5EncoderModel`) in Flax NNX.

Shapes: token ids `[B, L]` int, padding mask `[B, L]` (1 = real token, 0 = padding) -> hidden states
`[B, L, dim]`. umT5-XXL: vocab 256384, dim 4096, 64 heads x 64, FFN 10240, 24 layers.

Per block (pre-norm): x += Attn(RMS(x)); x += FFN(RMS(x)); then a final RMS norm.
  * RMS(x) = x · rsqrt(mean(x²) + 1e-6) with float32 statistics, cast to the compute dtype, times a weight
    (no bias, no mean subtraction).
  * Attn: logits = q·kᵀ + bias (NO 1/√d scaling), bias = the layer's OWN relative-position table
    `[num_buckets, heads]` gathered by T5 bidirectional buckets (32 buckets, max distance 128); keys where
    the mask is 0 are excluded; softmax in float32.
  * FFN: fc2(fc1(x) ⊙ GELU_tanh(gate(x))), no biases (HF names: wi_1 = fc1, wi_0 = gate, wo = fc2).
The layers' weights are stacked on a leading axis and run with `jax.lax.scan`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.models.precision import precision_from_name

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    """Architecture of a umT5 encoder.

    Attributes:
      vocab_size, dim: token table `[vocab_size, dim]`.
      dim_attn: q/k/v width (num_heads · head_dim); dim_ffn: FFN hidden width.
      num_heads, num_layers: attention heads, encoder blocks.
      num_buckets, max_distance: relative-position bucketing (bidirectional).
      eps: RMS-norm epsilon.
      param_dtype: storage dtype of the weights (bfloat16 in `models_t5_umt5-xxl-enc-bf16.pth`).
    """

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        if self.dim_attn % self.num_heads:
            raise ValueError(f"dim_attn {self.dim_attn} is not divisible by num_heads {self.num_heads}")
        if self.num_buckets % 4:
            raise ValueError(f"num_buckets {self.num_buckets} must be a multiple of 4 (bidirectional buckets)")

    @property
    def head_dim(self) -> int:
        return self.dim_attn // self.num_heads

    def replace(self, **changes) -> UMT5Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UMT5Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown UMT5Config fields {unknown}; known: {sorted(names)}")
        return cls(**data)


UMT5_XXL = UMT5Config()


@lru_cache(maxsize=16)
def relative_position_buckets(q_len: int, k_len: int, num_buckets: int = 32, max_distance: int = 128) -> np.ndarray:
    """T5 bidirectional bucket of (key index − query index), `[q_len, k_len]` int32.

    Half the buckets per sign (the upper half when the key is after the query); within a half, distances
    below a quarter of num_buckets are exact, larger ones logarithmic up to `max_distance`, then capped.
    Computed in float32 like upstream (the floor sits exactly on integers at distances 16, 32, 64).
    """
    rel = np.arange(k_len, dtype=np.int64)[None, :] - np.arange(q_len, dtype=np.int64)[:, None]
    half = num_buckets // 2
    max_exact = half // 2
    out = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    safe = np.maximum(dist, max_exact).astype(np.float32)  # small distances are exact (below)
    ratio = np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
    large = np.minimum(max_exact + (ratio * np.float32(half - max_exact)).astype(np.int64), half - 1)
    out += np.where(dist < max_exact, dist, large)
    out = out.astype(np.int32)
    out.setflags(write=False)
    return out


class Linear(nnx.Module):
    """y = x W (no bias), W `[in, out]`, float32 accumulation, result in the compute dtype."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, param_dtype, dtype, precision):
        init = nnx.initializers.normal(stddev=in_features**-0.5)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: Array) -> Array:
        y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype), precision=self.precision,
                       preferred_element_type=jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """x · rsqrt(mean(x²) + eps) in float32, cast to the compute dtype, times the weight."""

    def __init__(self, dim: int, eps: float, *, param_dtype, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, param_dtype, stddev: float = 1.0):
        self.embedding = nnx.Param(nnx.initializers.normal(stddev)(rngs.params(), (num, dim), param_dtype))

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class Attention(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs, **kw):
        self.q = Linear(cfg.dim, cfg.dim_attn, rngs=rngs, **kw)
        self.k = Linear(cfg.dim, cfg.dim_attn, rngs=rngs, **kw)
        self.v = Linear(cfg.dim, cfg.dim_attn, rngs=rngs, **kw)
        self.o = Linear(cfg.dim_attn, cfg.dim, rngs=rngs, **kw)
        self.num_heads = cfg.num_heads
        self.precision = kw["precision"]

    def __call__(self, x: Array, bias: Array, mask: Array) -> Array:
        """x `[B, L, dim]`, bias `[heads, L, L]` float32, mask `[B, L]` bool (True = real key)."""
        b, length, _ = x.shape
        heads = lambda t: t.reshape(b, length, self.num_heads, -1)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, precision=self.precision, preferred_element_type=jnp.float32)
        logits = logits + bias[None]
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bnqk,bknd->bqnd", probs, v, precision=self.precision, preferred_element_type=jnp.float32)
        return self.o(out.astype(x.dtype).reshape(b, length, -1))


class FeedForward(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs, **kw):
        self.gate = Linear(cfg.dim, cfg.dim_ffn, rngs=rngs, **kw)
        self.fc1 = Linear(cfg.dim, cfg.dim_ffn, rngs=rngs, **kw)
        self.fc2 = Linear(cfg.dim_ffn, cfg.dim, rngs=rngs, **kw)

    def __call__(self, x: Array) -> Array:
        gate = jax.nn.gelu(self.gate(x).astype(jnp.float32), approximate=True).astype(x.dtype)
        return self.fc2(self.fc1(x) * gate)


class UMT5Block(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs, param_dtype, dtype, precision):
        kw = {"param_dtype": param_dtype, "dtype": dtype, "precision": precision}
        self.norm1 = RMSNorm(cfg.dim, cfg.eps, param_dtype=param_dtype, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, **kw)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps, param_dtype=param_dtype, dtype=dtype)
        self.ffn = FeedForward(cfg, rngs=rngs, **kw)
        self.pos_bias = Embed(cfg.num_buckets, cfg.num_heads, rngs=rngs, param_dtype=param_dtype,
                              stddev=(2 * cfg.num_buckets * cfg.num_heads) ** -0.5)

    def __call__(self, x: Array, buckets: Array, mask: Array) -> Array:
        """x `[B, L, dim]`; buckets `[L, L]` int32; mask `[B, L]` bool."""
        bias = self.pos_bias(buckets).astype(jnp.float32).transpose(2, 0, 1)  # [heads, L, L]
        x = x + self.attn(self.norm1(x), bias, mask)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nnx.Module):
    """The umT5 encoder; see the module docstring."""

    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs | None = None, compute_dtype=jnp.float32,
                 precision=None):
        """
        Args:
          cfg: architecture.
          compute_dtype: activation dtype (matmuls accumulate in float32; norms and softmax in float32).
          precision: matmul precision (`jax.lax.Precision` or its name); None is the backend default
            (TF32 for float32 on recent NVIDIA GPUs); "highest" for float32 parity.
        """
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        param_dtype = jnp.dtype(cfg.param_dtype)
        dtype = jnp.dtype(compute_dtype)
        precision = precision_from_name(precision)
        self.config = cfg
        self.compute_dtype = dtype
        self.token_embedding = Embed(cfg.vocab_size, cfg.dim, rngs=rngs, param_dtype=param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return UMT5Block(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, precision=precision)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(cfg.dim, cfg.eps, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, ids: Array, mask: Array | None = None) -> Array:
        """ids `[B, L]` int, mask `[B, L]` (nonzero = real token; None = all real) -> `[B, L, dim]` in the
        compute dtype. Rows at padded positions are computed too (they attend the real tokens only)."""
        ids = jnp.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"token ids must be [B, L], got shape {ids.shape}")
        mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask) != 0
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} differs from ids shape {ids.shape}")
        cfg = self.config
        length = ids.shape[1]
        buckets = jnp.asarray(relative_position_buckets(length, length, cfg.num_buckets, cfg.max_distance))
        x = self.token_embedding(ids).astype(self.compute_dtype)
        graphdef, state = nnx.split(self.blocks)

        def layer(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, buckets, mask), None

        x, _ = jax.lax.scan(layer, x, state)
        return self.norm(x)
