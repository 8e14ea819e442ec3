"""Functional self-attention KV cache for chunked causal rollouts: sink slots + a ring window.

Keys are stored AFTER RoPE at their absolute latent-frame positions, so attention does not depend on
where in the buffer a frame sits: eviction is a ring overwrite, never a copy-shift. Only committed
(clean, t=0) frames are stored; the chunk being denoised attends to [itself ; valid cache].

Slots, in latent frames: the first `sink_frames` frames ever committed live in slots [0, sink) and
are never evicted; every later frame g goes to slot sink + (g − sink) mod ring_frames. With
ring_frames = 0 later frames are not kept at all (the chunk sees the sink and itself). The valid
slots are always a prefix of the buffer: min(committed, sink + ring) frames.

Upstream's `local_attn_size` / FlashDreams' window count the current chunk (and upstream the sink
too): `upstream_cache_frames(local_attn_size, sink_size, chunk_frames)` converts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PAGE_TOKENS = 128  # the per-layer buffer is a whole number of these (cuDNN paged attention: a power of 2)


@dataclass(frozen=True)
class CacheLayout:
    """Static geometry of a cache (fixes the compiled shapes).

    Attributes:
      tokens_per_frame: patch tokens per latent frame ((H/2)·(W/2)).
      sink_frames: frames kept forever (the first ones committed).
      ring_frames: most recent committed frames kept besides the sink.
      chunk_frames: latent frames per chunk (3).
    """

    tokens_per_frame: int
    sink_frames: int
    ring_frames: int
    chunk_frames: int = 3

    @property
    def capacity_frames(self) -> int:
        return self.sink_frames + self.ring_frames

    @property
    def buffer_frames(self) -> int:
        """Buffer length: capacity plus one never-valid slot that absorbs writes of dropped frames."""
        return self.capacity_frames + 1

    @property
    def buffer_tokens(self) -> int:
        """Tokens per layer in the buffer: the frame slots, rounded up to a whole number of
        `PAGE_TOKENS` pages (the tail is never valid) so attention kernels can page through it."""
        return -(-self.buffer_frames * self.tokens_per_frame // PAGE_TOKENS) * PAGE_TOKENS

    def slot(self, frame: Array) -> Array:
        """Buffer slot (in frames) of absolute latent frame `frame` (int32, traced ok)."""
        frame = jnp.asarray(frame, jnp.int32)
        if self.ring_frames == 0:
            return jnp.where(frame < self.sink_frames, frame, self.capacity_frames)
        ring_slot = self.sink_frames + (frame - self.sink_frames) % self.ring_frames
        return jnp.where(frame < self.sink_frames, frame, ring_slot)

    def visible_frames(self, num_frames: int) -> np.ndarray:
        """The block-causal attention pattern this cache implements, as a dense frame mask.

        Returns [num_frames, num_frames] bool, True where query frame q may attend to key frame g: g is
        in q's own chunk, or g was committed before q's chunk and is still held (a sink frame, or one of
        the `ring_frames` most recent committed frames). A full-sequence forward with this mask equals
        the streamed rollout.
        """
        frame = np.arange(num_frames)
        chunk_start = frame // self.chunk_frames * self.chunk_frames  # first frame of each frame's chunk
        q_start, g = chunk_start[:, None], frame[None, :]
        own_chunk = chunk_start[None, :] == q_start
        in_sink = g < self.sink_frames
        in_ring = (g >= q_start - self.ring_frames) & (g >= self.sink_frames)
        return own_chunk | ((g < q_start) & (in_sink | in_ring))

    def valid_tokens(self, committed_frames: Array) -> Array:
        return jnp.minimum(committed_frames, self.capacity_frames).astype(jnp.int32) * self.tokens_per_frame


def upstream_cache_frames(local_attn_size: int, sink_size: int, chunk_frames: int) -> tuple[int | None, int]:
    """(sink frames, ring frames) of upstream's cache settings; sink None = keep every frame.

    Upstream semantics: local_attn_size −1 attends to everything; else a buffer of local_attn_size
    frames that includes the sink and the current chunk."""
    if local_attn_size == -1:
        return None, 0
    ring = local_attn_size - sink_size - chunk_frames
    if ring < 0:
        raise ValueError(f"local_attn_size {local_attn_size} cannot hold sink {sink_size} + a chunk of "
                         f"{chunk_frames} frames")
    return sink_size, ring


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Per-layer stacked keys/values and how many frames were committed.

    k, v: [layers, B, buffer_tokens, N, d] (N = heads: the axis Ulysses shards); frame slot s holds
      tokens [s·tokens_per_frame, (s+1)·tokens_per_frame).
    committed_frames: int32 scalar, absolute count of committed latent frames.
    """

    k: Array
    v: Array
    committed_frames: Array

    @classmethod
    def zeros(cls, layout: CacheLayout, num_layers: int, batch: int, num_heads: int, head_dim: int,
              dtype=jnp.bfloat16) -> KVCache:
        shape = (num_layers, batch, layout.buffer_tokens, num_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def attention_view(self, layout: CacheLayout) -> tuple[Array, Array, Array]:
        """(k, v, valid_tokens) as `WanModel.forward_with_cross_kv(cache=...)` takes them."""
        return self.k, self.v, layout.valid_tokens(self.committed_frames)


def commit(cache: KVCache, layout: CacheLayout, chunk_k: Array, chunk_v: Array) -> KVCache:
    """Writes a clean chunk's K/V (frames committed_frames ...) into their slots.

    chunk_k, chunk_v: [layers, B, chunk_frames·tokens_per_frame, N, d]. Each frame is written with its
    own dynamic_update_slice, so a chunk that wraps around the ring is handled. Donate `cache` to the
    jitted caller to update in place.
    """
    tpf = layout.tokens_per_frame
    k, v = cache.k, cache.v
    for f in range(chunk_k.shape[2] // tpf):
        start = layout.slot(cache.committed_frames + f) * tpf
        index = (0, 0, start, 0, 0)
        k = jax.lax.dynamic_update_slice(k, chunk_k[:, :, f * tpf:(f + 1) * tpf].astype(k.dtype), index)
        v = jax.lax.dynamic_update_slice(v, chunk_v[:, :, f * tpf:(f + 1) * tpf].astype(v.dtype), index)
    frames = chunk_k.shape[2] // tpf
    return dataclasses.replace(cache, k=k, v=v, committed_frames=cache.committed_frames + frames)
