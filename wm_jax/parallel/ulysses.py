"""Ulysses sequence parallelism inside `shard_map`: tokens are split across devices for everything but
self-attention, which gathers the chunk's tokens and splits the heads instead.

Per layer and device (P devices, chunk of F latent frames, S tokens per frame padded to S_pad = P·S_dev,
N heads padded to N_pad, a multiple of P):

    [q; k; v] [3B, F·S_dev, N, d] --all_to_all-->  [3B, F·S, N_pad/P, d]  (one exchange; token padding dropped)
    attention over [own chunk ; this device's N_pad/P heads of the KV cache]  (kernels.attention)
    out [B, F·S, N_pad/P, d]      --all_to_all-->  [B, F·S_dev, N, d]      (head padding dropped)

Only the chunk crosses devices, never the cache: the cache is sharded by heads and every device holds
the whole window of its heads, so the head-sharded k, v returned here are what commit writes. Tokens
are split per latent frame (device p holds tokens [p·S_dev, (p+1)·S_dev) of every frame), so per-frame
modulation still broadcasts over a `[B, F, S_dev, D]` residual stream; S is padded per frame when P
does not divide it (e.g. 1508 tokens over 8 devices -> 1512), and the padded tokens are never attended
to and never written to the cache. Likewise the heads are padded with zero heads to a multiple of P
when P does not divide them (12 heads over 8 devices -> 16, two per device): a zero head attends to
nothing useful and is dropped before the output projection, so any device count gives the same
numbers, at the price of the padded heads' attention work.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from wm_jax.kernels.attention import attention, attention_with_cache

Array = jax.Array


@dataclass(frozen=True)
class SequenceShards:
    """How a chunk's tokens are split over the mesh axis `axis_name` (static: part of the compiled shapes).

    Attributes:
      axis_name: the mesh axis (ShardingRules.tokens).
      num_shards: devices along it (P).
      tokens_per_frame: real patch tokens per latent frame (S).
      num_heads: the model's attention heads (N).
      context_heads_sharded: the cross-attention K/V hold N/P heads per device (ShardingRules.context_heads)
        rather than all N (needs P to divide N).
    """

    axis_name: str
    num_shards: int
    tokens_per_frame: int
    num_heads: int
    context_heads_sharded: bool = False

    def __post_init__(self):
        if self.context_heads_sharded and self.num_heads % self.num_shards:
            raise ValueError(f"head-sharded cross-attention K/V need the device count ({self.num_shards}) to divide "
                             f"the {self.num_heads} heads")

    @property
    def padded_heads(self) -> int:
        """N rounded up to a multiple of P: the heads of the KV cache and of the exchange."""
        return -(-self.num_heads // self.num_shards) * self.num_shards

    @property
    def heads_per_shard(self) -> int:
        return self.padded_heads // self.num_shards

    @property
    def padded_tokens_per_frame(self) -> int:
        """S rounded up to a multiple of P."""
        return -(-self.tokens_per_frame // self.num_shards) * self.num_shards

    @property
    def tokens_per_shard(self) -> int:
        """Tokens per frame on each device (S_dev)."""
        return self.padded_tokens_per_frame // self.num_shards

    @property
    def padding(self) -> int:
        return self.padded_tokens_per_frame - self.tokens_per_frame

    # -- tokens: full frames <-> this device's share (inside shard_map) --------------------------------

    def local_tokens(self, x: Array, axis: int = 2) -> Array:
        """x with S tokens per frame on `axis` (full, the same on every device) -> this device's S_dev."""
        if self.num_shards == 1:
            return x
        if self.padding:
            pad = [(0, 0)] * x.ndim
            pad[axis] = (0, self.padding)
            x = jnp.pad(x, pad)
        start = jax.lax.axis_index(self.axis_name) * self.tokens_per_shard
        return jax.lax.dynamic_slice_in_dim(x, start, self.tokens_per_shard, axis)

    def gather_tokens(self, x: Array, axis: int = 2) -> Array:
        """This device's S_dev tokens per frame on `axis` -> all S (padding dropped), on every device."""
        if self.num_shards == 1:
            return x
        full = jax.lax.all_gather(x, self.axis_name, axis=axis, tiled=True)
        return jax.lax.slice_in_dim(full, 0, self.tokens_per_frame, axis=axis)

    # -- the exchange ----------------------------------------------------------------------------------

    def tokens_to_heads(self, x: Array, frames: int) -> Array:
        """[B, F·S_dev, N, d] (all heads of this device's tokens) -> [B, F·S, N_pad/P, d] (this device's
        heads of every real token). On one device: x itself (no exchange in the program)."""
        if self.num_shards == 1:
            return x
        b, _, n, d = x.shape
        x = x.reshape(b, frames, self.tokens_per_shard, n, d)
        if self.padded_heads != n:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.padded_heads - n), (0, 0)))
        x = jax.lax.all_to_all(x, self.axis_name, split_axis=3, concat_axis=2, tiled=True)
        x = x[:, :, : self.tokens_per_frame]
        return x.reshape(b, frames * self.tokens_per_frame, self.heads_per_shard, d)

    def heads_to_tokens(self, x: Array, frames: int) -> Array:
        """Inverse of `tokens_to_heads`: [B, F·S, N_pad/P, d] -> [B, F·S_dev, N, d]."""
        if self.num_shards == 1:
            return x
        b, _, n_local, d = x.shape
        x = x.reshape(b, frames, self.tokens_per_frame, n_local, d)
        if self.padding:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, self.padding), (0, 0), (0, 0)))
        x = jax.lax.all_to_all(x, self.axis_name, split_axis=2, concat_axis=3, tiled=True)
        x = x[:, :, :, : self.num_heads]
        return x.reshape(b, frames * self.tokens_per_shard, self.num_heads, d)


def self_attention(q: Array, k: Array, v: Array, shards: SequenceShards, frames: int, *, cache=None,
                   implementation: str = "auto") -> tuple[Array, tuple[Array, Array]]:
    """Ulysses self-attention of a chunk, optionally against the (head-sharded) KV cache.

    Args:
      q, k, v: [B, F·S_dev, N, d], this device's tokens (keys rotated at their absolute positions).
      cache: None, or (cache_k, cache_v, layer, valid_length) as `kernels.attention.attention_with_cache`
        takes them, holding this device's heads: [layers, B, T, N_pad/P, d].
    Returns:
      (out [B, F·S_dev, N, d], (k, v) [B, F·S, N_pad/P, d]: this device's heads of the chunk, for commit).
    """
    # one exchange for q, k and v (stacked on the batch axis): half the collective launches of three
    # (2 x H200, LingBot 14B: 15 instead of 23 ms of all_to_all kernels per pass)
    q, k, v = jnp.split(shards.tokens_to_heads(jnp.concatenate([q, k, v]), frames), 3)
    if cache is None:
        out = attention(q, k, v, implementation=implementation)
    else:
        cache_k, cache_v, layer, valid = cache
        out = attention_with_cache(q, k, v, cache_k, cache_v, layer, valid, implementation=implementation)
    return shards.heads_to_tokens(out, frames), (k, v)


def cross_attention(q: Array, k: Array, v: Array, shards: SequenceShards, frames: int, *,
                    heads_sharded: bool, implementation: str = "auto") -> Array:
    """Attention of this device's tokens q [B, F·S_dev, N, d] to the conditioning k, v [B, Lc, N or N/P, d].

    Replicated conditioning (all N heads on every device) needs no exchange; head-sharded conditioning
    moves the queries to heads and the output back (two all_to_alls).
    """
    if not heads_sharded:
        return attention(q, k, v, implementation=implementation)
    out = attention(shards.tokens_to_heads(q, frames), k, v, implementation=implementation)
    return shards.heads_to_tokens(out, frames)
