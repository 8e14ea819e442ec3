"""The one home of attention in wm_jax.

Every attention of the model calls `attention` (self, cross, full-sequence references) or
`attention_with_cache` (a chunk against the KV cache); kernels are swapped here, never in the model.
Layout is BTNH: q `[B, Tq, N, d]`, k/v `[B, Tk, N, d]` -> `[B, Tq, N, d]`.
Semantics: softmax(q kᵀ / √d) v over all keys, except that keys at positions `>= kv_valid_length[b]`
are ignored (the unfilled tail of a fixed-size KV cache) and, where a dense boolean `mask [Tq, Tk]` is
given (True = attend), masked-out keys are ignored. The streaming hot path never builds a dense mask;
it exists for full-sequence references (block-causal with sink + window).

Backends (`implementation=`):
  xla      plain XLA, float32 logits and softmax: the reference, any device and dtype.
  cudnn    cuDNN fused attention through jax; chunk-vs-cache via cuDNN's paged attention over the
           stacked cache plus a log-sum-exp merge with the chunk's own attention (two kernels).
  tokamax  tokamax's `dot_product_attention` (the package is optional); the cache is concatenated.
  pallas   wm_jax's own Mosaic GPU kernel (`chunk_attention`): chunk-vs-cache in one kernel, cache read
           in place (Hopper, bf16/fp16, head_dim 64/128); plain attention goes to the next backend.
  auto     the fastest measured backend on the running GPU kind (`FASTEST_BY_DEVICE_KIND`), XLA on
           the CPU.
A backend that cannot serve a call (device, dtype, head_dim, no cache) hands it to the next one in
`ATTENTION_BACKENDS` (the fallback order), logged once with the reason; a backend whose package is
missing is an error.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from wm_jax.kernels import ATTENTION_BACKENDS, ATTENTION_IMPLEMENTATIONS, chunk_attention, missing_package

# The fastest chunk-vs-cache backend per GPU kind, from benchmarks/attention.py (JSON under
# benchmarks/results/): "auto" picks this; GPU kinds not listed get cuDNN.
FASTEST_BY_DEVICE_KIND = {
    "NVIDIA H200": "pallas",  # attention_h200_2026-11-30.json
}

_logged: set[str] = set()


class BackendUnavailable(ImportError):
    """An attention backend was asked for by name and its package is not installed."""


def _log_once(message: str, level: int = logging.WARNING) -> None:
    if message not in _logged:
        _logged.add(message)
        logging.getLogger(__name__).log(level, message)


def default_backend() -> str:
    """What "auto" means on this process's first device."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return "xla"
    return FASTEST_BY_DEVICE_KIND.get(device.device_kind, "cudnn")


def _check_installed(implementation: str) -> None:
    if package := missing_package(implementation):
        raise BackendUnavailable(f"attention backend {implementation!r} needs the package {package!r}, which is "
                                 f"not installed (pip install {package})")


def _unserved_reason(backend: str, q: jax.Array, *, cache_k: jax.Array | None) -> str | None:
    """Why `backend` cannot serve this call (None when it can)."""
    if backend == "xla":
        return None
    if jax.default_backend() != "gpu":
        return f"it needs a GPU (running on {jax.default_backend()})"
    device = jax.devices()[0]
    low_precision = q.dtype in (jnp.bfloat16, jnp.float16)
    if backend == "cudnn":
        if not low_precision:
            return f"cuDNN takes bfloat16/float16, not {q.dtype}"
        if q.shape[-1] > 256 or q.shape[-1] % 8:
            return f"cuDNN takes head_dim ≤ 256 and a multiple of 8, not {q.shape[-1]}"
        return None
    if backend == "tokamax":
        if missing_package("tokamax"):
            return "the package tokamax is not installed"
        if not chunk_attention.is_hopper(device):
            return f"tokamax's mosaic kernel is used here only on Hopper GPUs, not {device.device_kind}"
        return None if low_precision else f"tokamax's GPU kernels take bfloat16/float16, not {q.dtype}"
    # pallas
    if cache_k is None:
        return "the pallas kernel serves chunk-vs-cache attention only"
    if not chunk_attention.is_hopper(device):
        return f"the pallas kernel is written for Hopper GPUs (compute capability 9.x), not {device.device_kind}"
    return chunk_attention.unsupported_reason(q, cache_k)


def resolve(q: jax.Array, implementation: str = "auto", *, cache_k: jax.Array | None = None) -> str:
    """The backend that serves this call (q and cache_k may be arrays or ShapeDtypeStructs; cache_k None =
    plain attention): `implementation` ("auto" = `default_backend()`), or the first backend after it in
    `ATTENTION_BACKENDS` that can serve it (logged once with the reason). A backend named explicitly whose
    package is missing raises `BackendUnavailable`."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
    requested = implementation
    if implementation == "auto":
        implementation = default_backend()
    else:
        _check_installed(implementation)
    skipped = []
    for backend in ATTENTION_BACKENDS[ATTENTION_BACKENDS.index(implementation):]:
        reason = _unserved_reason(backend, q, cache_k=cache_k)
        if reason is None:
            if skipped:
                # "auto" taking what serves, and pallas handing plain attention (cross, full-sequence) to
                # cuDNN, are the design, not news: a warning only where a named backend was passed over
                routine = requested == "auto" or (skipped[0][0] == "pallas" and cache_k is None and backend == "cudnn")
                why = "; ".join(f"{name}: {text}" for name, text in skipped)
                _log_once(f"attention for q {tuple(q.shape)} {jnp.dtype(q.dtype).name} runs on {backend!r} "
                          f"({why})", level=logging.INFO if routine else logging.WARNING)
            return backend
        skipped.append((backend, reason))
    raise AssertionError("xla serves every call")


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


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, kv_valid_length: jax.Array | None = None,
              mask: jax.Array | None = None, implementation: str = "auto") -> jax.Array:
    """Multi-head attention, BTNH layout, optional per-batch valid key length `[B]` (int32) and optional
    dense boolean mask `[Tq, Tk]` shared by the batch and the heads (True = attend; every query needs
    at least one visible key).

    implementation: one of `ATTENTION_IMPLEMENTATIONS` (module doc). cuDNN takes the valid length through
    `key_value_seq_lengths`, never as a dense mask.
    """
    implementation = resolve(q, implementation)
    if implementation == "xla":
        return attention_reference(q, k, v, kv_valid_length, mask)
    if implementation == "tokamax":
        import tokamax  # noqa: PLC0415  (optional package)

        return tokamax.dot_product_attention(
            q, k, v, mask=None if mask is None else mask[None, None],
            key_value_seq_lengths=None if kv_valid_length is None else kv_valid_length.astype(jnp.int32),
            implementation="mosaic").astype(q.dtype)
    if kv_valid_length is not None:
        kv_valid_length = kv_valid_length.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else mask[None, None], key_value_seq_lengths=kv_valid_length,
        implementation="cudnn")


def attention_with_cache(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                         layer: jax.Array, cache_valid_length: jax.Array, *,
                         implementation: str = "auto") -> jax.Array:
    """A chunk's attention over [its own keys ; the valid prefix of one layer of a stacked KV cache].

    Args:
      q, k, v: [B, L, N, d], the chunk's queries, keys (rotated) and values.
      cache_k, cache_v: [layers, B, T, N, d], every layer's cache (keys rotated at their absolute
        positions); passed whole, so no layer slice has to be materialised.
      layer: int32 scalar, the layer to read; cache_valid_length: int32 scalar, valid cached tokens (a
        prefix of the layer's T).
    Returns:
      [B, L, N, d] in q's dtype: unmasked softmax attention over the L own keys and the valid cache.

    pallas: one kernel reads the chunk and the layer's valid cache in place (`chunk_attention`). XLA
    (reference) and tokamax: slice the layer, concatenate [own ; cache], run one attention. cuDNN: attends
    to the chunk, and to the cache through cuDNN's paged attention over the stacked buffer viewed as a
    pool of `page` token blocks (a reshape, no copy), then merges the two by their log-sum-exps. On an
    H100 at 480x832 this saves the ~3.6 ms per pass that copying every layer's slice cost.
    """
    implementation = resolve(q, implementation, cache_k=cache_k)
    if implementation == "pallas":
        return chunk_attention.chunk_cache_attention(q, k, v, cache_k, cache_v, layer, cache_valid_length)
    if implementation in ("xla", "tokamax") or _cudnn_internals() is None:
        b, length = q.shape[:2]
        keys = jnp.concatenate([k, cache_k[layer].astype(k.dtype)], axis=1)
        values = jnp.concatenate([v, cache_v[layer].astype(v.dtype)], axis=1)
        valid = jnp.full((b,), length, jnp.int32) + cache_valid_length
        return attention(q, keys, values, kv_valid_length=valid, implementation=implementation)
    own = _cudnn_attention_with_lse(q, k, v)
    cached = _cudnn_paged_cache_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype), layer,
                                          cache_valid_length)
    return _merge_by_log_sum_exp(own, cached, cache_valid_length > 0).astype(q.dtype)


def _cudnn_internals():
    """jax's cuDNN attention primitives that return float32 log-sum-exps and read paged K/V (private:
    the public `jax.nn.dot_product_attention` rounds the log-sum-exp to bf16 and has no paging)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn
    except ImportError:
        return None
    return cudnn if hasattr(cudnn, "paged_attention") and hasattr(cudnn, "MaskType") else None


def _cudnn_attention_with_lse(q, k, v) -> tuple[jax.Array, jax.Array]:
    """(out [B, L, N, d], log-sum-exp [B, L, N] float32) of unmasked attention of q over k, v."""
    cudnn = _cudnn_internals()
    out, stats = cudnn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), return_residual=True)
    return out, jnp.transpose(stats, (0, 2, 1)).astype(jnp.float32)


def _cudnn_paged_cache_attention(q, cache_k, cache_v, layer, valid) -> tuple[jax.Array, jax.Array]:
    """(out, log-sum-exp) of q over the first `valid` tokens of layer `layer`, read in place.

    The pool is cache [layers, B, T, N, d] reshaped to [layers·B·T/page, page, N, d]; cuDNN wants each
    batch row's table to hold pool/B pages, so batch b's table lists layer `layer`'s pages of b first and
    then whatever follows in the pool (never reached: only the first `valid` tokens count). cuDNN needs
    ≥ 1 valid key: an empty cache attends to one key and the caller drops that part.
    """
    cudnn = _cudnn_internals()
    layers, b, t, n, d = cache_k.shape
    page = _page_size(t)
    pages_per_layer = t // page
    pool_pages = layers * b * pages_per_layer
    first = (layer * b + jnp.arange(b)) * pages_per_layer  # [B] first page of (layer, b)
    per_row = pool_pages // b  # = layers · pages_per_layer ≥ the layer's own pages
    table = ((first[:, None] + jnp.arange(per_row)[None, :]) % pool_pages).astype(jnp.int32)
    table = table.reshape(b, 1, per_row, 1)
    pool = lambda x: x.reshape(pool_pages, page, n, d)
    out, stats = cudnn.paged_attention(
        q, pool(cache_k), pool(cache_v), jnp.full((b,), q.shape[1], jnp.int32),
        jnp.full((b,), jnp.maximum(valid, 1), jnp.int32), table, table, scale=1.0 / math.sqrt(d),
        mask_type=cudnn.MaskType.PADDING, return_residual=True)
    return out, jnp.transpose(stats, (0, 2, 1)).astype(jnp.float32)


def _page_size(tokens: int) -> int:
    """The largest power-of-two page (≤ 256) that divides the per-layer buffer (see `PAGE_TOKENS`)."""
    page = 256
    while tokens % page:
        page //= 2
    if page < 16:
        raise ValueError(f"cache buffer of {tokens} tokens per layer is not a multiple of 16; size it with "
                         "wm_jax.streaming.kv_cache.CacheLayout.buffer_tokens")
    return page


def _merge_by_log_sum_exp(own: tuple[jax.Array, jax.Array], cached: tuple[jax.Array, jax.Array],
                          use_cached: jax.Array) -> jax.Array:
    """Attention over the union of two key sets from each set's (out [B, L, N, d], lse [B, L, N]):
    Σ_i exp(lse_i − max) · out_i / Σ_i exp(lse_i − max), in float32; `use_cached` False drops the cache."""
    (own_out, own_lse), (cache_out, cache_lse) = own, cached
    cache_lse = jnp.where(use_cached, cache_lse, -jnp.inf)
    top = jnp.maximum(own_lse, cache_lse)
    w_own, w_cache = jnp.exp(own_lse - top)[..., None], jnp.exp(cache_lse - top)[..., None]
    cache_out = jnp.where(use_cached, cache_out.astype(jnp.float32), 0.0)
    return (w_own * own_out.astype(jnp.float32) + w_cache * cache_out) / (w_own + w_cache)
