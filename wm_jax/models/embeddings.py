"""Position and time encodings of the Wan DiT, and the (1, 2, 2) patchify / unpatchify.

Upstream evaluates the sinusoid and RoPE angles in float64. JAX runs in float32 here, and a float32
product t·ω at t ≈ 1000 is only good to ~3e-5 rad. We keep float64 accuracy without float64 arithmetic:
RoPE tables are precomputed on the host in float64, and the timestep sinusoid splits t and ω into
exactly-multipliable halves and reduces the angle modulo 2π before calling cos/sin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

ROPE_MAX_POSITIONS = 1024  # upstream's table rows per axis: the trained positions (latent frames 0..1023)
ROPE_COARSE_ROWS = 4096  # temporal positions past the table: f = 1024·a + b for a < 4096 (4.2M latent frames)
ROPE_POSITION_LIMIT = ROPE_MAX_POSITIONS * ROPE_COARSE_ROWS
ROPE_THETA = 10000.0
TIME_THETA = 10000.0

# ---------------------------------------------------------------------------------------------------
# Timestep sinusoid.
# ---------------------------------------------------------------------------------------------------

_KEEP_BITS = 12  # significant bits kept in the high halves: 12 x 12 bit products are exact in fp32
_TWO_PI = 2.0 * np.pi


def _truncate_mantissa_np(x: np.ndarray, bits: int) -> np.ndarray:
    as_int = np.asarray(x, np.float32).view(np.int32)
    return (as_int & np.int32(~((1 << (24 - bits)) - 1))).view(np.float32)


def _truncate_mantissa(x: jax.Array, bits: int) -> jax.Array:
    as_int = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jax.lax.bitcast_convert_type(as_int & jnp.int32(~((1 << (24 - bits)) - 1)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _sinusoid_constants(half: int):
    omega = TIME_THETA ** (-np.arange(half, dtype=np.float64) / half)
    omega_hi = _truncate_mantissa_np(omega, _KEEP_BITS)
    omega_lo = (omega - omega_hi.astype(np.float64)).astype(np.float32)
    # 2π = c1 + c2 + c3; c1 has 12 significant bits, so n·c1 is exact for n < 2^12.
    c1 = _truncate_mantissa_np(np.array(_TWO_PI), _KEEP_BITS)
    c2 = np.float32(_TWO_PI - float(c1))
    c3 = np.float32(_TWO_PI - float(c1) - float(c2))
    return omega_hi, omega_lo, float(c1), float(c2), float(c3)


def timestep_sinusoid(t: jax.Array, dim: int = 256) -> jax.Array:
    """[cos(t·ω) ‖ sin(t·ω)], ω_k = 10000^(−k/(dim/2)), to float64 accuracy in float32.

    Args:
      t: timesteps, any shape, the scheduler's t (integer 0..1000 or warped float), never σ.
    Returns:
      `t.shape + (dim,)` float32, cos first.
    """
    half = dim // 2
    omega_hi, omega_lo, c1, c2, c3 = _sinusoid_constants(half)
    t = jnp.asarray(t, jnp.float32)[..., None]
    t_hi = _truncate_mantissa(t, _KEEP_BITS)
    t_lo = t - t_hi  # exact
    main = t_hi * omega_hi  # exact: 12 x 12 significant bits
    small = t_hi * omega_lo + t_lo * omega_hi + t_lo * omega_lo
    turns = jnp.round(main / _TWO_PI)
    angle = ((main - turns * c1) - turns * c2) - turns * c3 + small  # main - turns*c1 is exact (Sterbenz)
    return jnp.concatenate([jnp.cos(angle), jnp.sin(angle)], axis=-1)


# ---------------------------------------------------------------------------------------------------
# 3D RoPE.
# ---------------------------------------------------------------------------------------------------


def rope_axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs per axis (t, h, w): 128 -> (22, 21, 21), i.e. 44/42/42 dimensions."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _rope_inv_freq(pairs: int) -> np.ndarray:
    """θ_k = 10000^(−2k/2m), k < m, float64: an axis with 2m rotated dims has its own base."""
    return 1.0 / ROPE_THETA ** (np.arange(pairs, dtype=np.float64) * 2 / (2 * pairs))


def _cos_sin(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin of float64 angles (libm reduces any argument in float64), cast to float32."""
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@functools.lru_cache(maxsize=None)
def rope_tables(head_dim: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Per axis (t, h, w): (cos, sin) tables [1024, pairs_axis] float32, computed in float64 (upstream's)."""
    return tuple(_cos_sin(np.outer(np.arange(ROPE_MAX_POSITIONS, dtype=np.float64), _rope_inv_freq(pairs)))
                 for pairs in rope_axis_pairs(head_dim))


@functools.lru_cache(maxsize=None)
def rope_coarse_table(head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Temporal (cos, sin) of the angles a·1024·θ_k, a < ROPE_COARSE_ROWS: [4096, pairs_t] float32 (float64
    angles). Row 0 is exactly (1, 0)."""
    pairs = rope_axis_pairs(head_dim)[0]
    rows = np.arange(ROPE_COARSE_ROWS, dtype=np.float64) * ROPE_MAX_POSITIONS
    return _cos_sin(np.outer(rows, _rope_inv_freq(pairs)))


def temporal_rope(head_dim: int, frame_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of the temporal RoPE angles f·θ_k for absolute latent frames `frame_index` (int, traced ok).

    Upstream's table covers f < 1024. Past it the positions continue with upstream's formula: f = 1024·a + b,
    and the angle sum a·1024·θ + b·θ is formed from two float64-computed tables by the angle-addition
    formulas in float32 (a few float32 ulps from the float64 value). For f < 1024 (a = 0: cos 1, sin 0)
    the result is upstream's table entry, bit for bit.
    Returns: cos, sin each `frame_index.shape + (pairs_t,)` float32.
    """
    (ct, st), _, _ = rope_tables(head_dim)
    coarse_cos, coarse_sin = rope_coarse_table(head_dim)
    a, b = jnp.divmod(jnp.asarray(frame_index, jnp.int32), ROPE_MAX_POSITIONS)
    fine_cos, fine_sin = jnp.asarray(ct)[b], jnp.asarray(st)[b]
    big_cos, big_sin = jnp.asarray(coarse_cos)[a], jnp.asarray(coarse_sin)[a]
    return big_cos * fine_cos - big_sin * fine_sin, big_sin * fine_cos + big_cos * fine_sin


def rope_for_grid(head_dim: int, frames: int, height: int, width: int,
                  frame_offset: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """cos, sin for every token of an (F, h, w) patch grid, tokens in (f, i, j) row-major order.

    Args:
      frame_offset: absolute latent index of the grid's first frame (causal chunks), or [frames] per-frame
        offsets (frame f at f + frame_offset[f]); may be traced; positions below ROPE_POSITION_LIMIT (see
        `temporal_rope` for positions past upstream's 1024).
    Returns:
      (cos, sin), each [F·h·w, head_dim/2] float32; pair k of a token uses column k.
    """
    _, (ch, sh), (cw, sw) = rope_tables(head_dim)
    cos_t, sin_t = temporal_rope(head_dim, jnp.arange(frames) + frame_offset)
    pt, ph, pw = rope_axis_pairs(head_dim)

    def grid(t_part, h_part, w_part):
        t_part = jnp.broadcast_to(t_part[:, None, None, :], (frames, height, width, pt))
        h_part = jnp.broadcast_to(h_part[None, :, None, :], (frames, height, width, ph))
        w_part = jnp.broadcast_to(w_part[None, None, :, :], (frames, height, width, pw))
        return jnp.concatenate([t_part, h_part, w_part], axis=-1).reshape(frames * height * width, -1)

    cos = grid(cos_t, jnp.asarray(ch)[:height], jnp.asarray(cw)[:width])
    sin = grid(sin_t, jnp.asarray(sh)[:height], jnp.asarray(sw)[:width])
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs (x[2k], x[2k+1]) of every head by the token's angles.

    Args:
      x: [B, L, N, d]; cos, sin: [L, d/2].
    Returns:
      [B, L, N, d] in x's dtype (rotation computed in float32).
    """
    b, length, n, d = x.shape
    pairs = x.astype(jnp.float32).reshape(b, length, n, d // 2, 2)
    a, c = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = jnp.stack([a * cos - c * sin, a * sin + c * cos], axis=-1)
    return rotated.reshape(b, length, n, d).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Patchify.
# ---------------------------------------------------------------------------------------------------


def patchify(x: jax.Array) -> jax.Array:
    """[B, F, H, W, C] -> [B, F, (H/2)·(W/2), C·4], features ordered (c, dy, dx), c slowest."""
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 2, 4, 6, 3, 5)
    return x.reshape(b, f, (h // 2) * (w // 2), c * 4)


def unpatchify(y: jax.Array, height: int, width: int) -> jax.Array:
    """[B, F, h·w, 4·C] with features ordered (dy, dx, c), c fastest -> [B, F, 2h, 2w, C]."""
    b, f, _, features = y.shape
    c = features // 4
    y = y.reshape(b, f, height, width, 2, 2, c)
    y = y.transpose(0, 1, 2, 4, 3, 5, 6)
    return y.reshape(b, f, 2 * height, 2 * width, c)
