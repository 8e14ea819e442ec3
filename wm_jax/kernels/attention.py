"""The one attention entry point of the model.

Every attention in wm_jax (self, cross, chunk-vs-cache) calls `attention`; kernels are swapped here,
never in the model. Layout is BTNH: q `[B, Tq, N, d]`, k/v `[B, Tk, N, d]` -> `[B, Tq, N, d]`.
Semantics: softmax(q kᵀ / √d) v over all keys, except that keys at positions `>= kv_valid_length[b]`
are ignored (the unfilled tail of a fixed-size KV cache) and, where a dense boolean `mask [Tq, Tk]` is
given (True = attend), masked-out keys are ignored. The streaming hot path never builds a dense mask;
it exists for full-sequence references (block-causal with sink + window).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid_length: jax.Array | None = None,
                        mask: jax.Array | None = None) -> jax.Array:
    """Plain XLA attention: logits and softmax in float32, output in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_valid_length is not None:
        key_pos = jnp.arange(k.shape[1])
        valid = key_pos[None, :] < kv_valid_length[:, None]  # [B, Tk]
        logits = jnp.where(valid[:, None, None, :], logits, -jnp.inf)
    if mask is not None:
        logits = jnp.where(mask[None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bnqk,bknd->bqnd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _cudnn_usable(q: jax.Array) -> bool:
    return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


def _resolve(q: jax.Array, implementation: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "auto":
        return "cudnn" if _cudnn_usable(q) else "xla"
    return implementation


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_valid_length: jax.Array | None = None,
              mask: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
    """Multi-head attention, BTNH layout, optional per-batch valid key length `[B]` (int32) and optional
    dense boolean mask `[Tq, Tk]` shared by the batch and the heads (True = attend; every query needs
    at least one visible key).

    implementation: "xla" (reference, any dtype/backend), "cudnn" (`jax.nn.dot_product_attention` fused
    kernel; GPU, bf16/fp16 only; the valid length goes through `key_value_seq_lengths`, never a dense
    mask), or "auto" (cuDNN where usable, else XLA).
    """
    implementation = _resolve(q, implementation)
    if implementation == "xla":
        return attention_reference(q, k, v, kv_valid_length, mask)
    if kv_valid_length is not None:
        kv_valid_length = kv_valid_length.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[None, None], key_value_seq_lengths=kv_valid_length,
        implementation="cudnn")


def attention_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                         cache_valid_length: jax.Array, *, implementation: str = "auto") -> jax.Array:
    """A chunk's attention over [its own keys ; the valid prefix of a KV cache], unmasked.

    q, k, v: [B, L, N, d] (the chunk); cache_k, cache_v: [B, T, N, d], keys already rotated at their
    absolute positions; cache_valid_length: int32 scalar, the number of valid cached tokens (a prefix).
    The chunk's keys go first, so the valid keys stay a prefix and one call with a valid length covers
    them. This concatenation copies the layer's cache slice once per call (measured on an H100 at
    480x832: ~3.8 ms of a ~84 ms pass); attending to the chunk and to the cache separately and merging
    by log-sum-exp measured the same, because the scanned layer slice is copied for cuDNN either way.
    A kernel that reads the stacked cache in place belongs here.
    """
    b, length = q.shape[:2]
    keys = jnp.concatenate([k, cache_k.astype(k.dtype)], axis=1)
    values = jnp.concatenate([v, cache_v.astype(v.dtype)], axis=1)
    valid = jnp.full((b,), length, jnp.int32) + cache_valid_length
    return attention(q, keys, values, kv_valid_length=valid, implementation=implementation)
