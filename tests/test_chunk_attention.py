"""wm_jax's chunk-vs-cache attention kernel against the float32 XLA reference.

On the CPU the kernel runs in Pallas' GPU interpreter (its warpgroups, TMA ring, barriers, step counts
and masks; the interpreter does the two matmuls as plain dots). On a Hopper GPU the compiled kernel
runs at bf16, at odd and recipe-sized shapes. Inputs are fresh random draws every run (never zeros);
every query row is checked on its own, so a row the kernel failed to write cannot pass.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.kernels import chunk_attention
from wm_jax.kernels.attention import attention_with_cache, resolve

_SEED = int(time.time_ns() % 2**31)


def _operands(batch, length, heads, buffer, layers, head_dim, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 5)
    own = [jax.random.normal(key, (batch, length, heads, head_dim), jnp.float32).astype(dtype) for key in keys[:3]]
    cache = [jax.random.normal(key, (layers, batch, buffer, heads, head_dim), jnp.float32).astype(dtype)
             for key in keys[3:]]
    return (*own, *cache)


def _check_rows(out, reference, tolerance, seed):
    """Relative L2 error of every (batch, query row) over its heads and channels."""
    out, reference = np.asarray(out, np.float32), np.asarray(reference, np.float32)
    assert np.isfinite(out).all(), f"non-finite output (seed {seed})"
    err = np.linalg.norm(out - reference, axis=(2, 3)) / np.linalg.norm(reference, axis=(2, 3))
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() < tolerance, f"row {worst} relative error {err.max():.2e} (tolerance {tolerance}, seed {seed})"
    return float(err.max())


def _check_case(batch, length, heads, buffer, layers, layer, valid, head_dim, dtype, config, interpret, seed,
                tolerance):
    q, k, v, cache_k, cache_v = _operands(batch, length, heads, buffer, layers, head_dim, dtype, seed)
    out = chunk_attention.chunk_cache_attention(q, k, v, cache_k, cache_v, jnp.int32(layer), jnp.int32(valid),
                                                config=config, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    f32 = lambda x: x.astype(jnp.float32)
    reference = attention_with_cache(f32(q), f32(k), f32(v), f32(cache_k), f32(cache_v), jnp.int32(layer),
                                     jnp.int32(valid), implementation="xla")
    return _check_rows(out, reference, tolerance, seed)


# (batch, chunk tokens, heads, cache buffer tokens, layers, layer read, valid cached tokens)
INTERPRET_CASES = {
    "empty cache, odd tokens": (1, 77, 2, 128, 2, 1, 0),
    "partial cache, ragged tails": (1, 130, 3, 192, 2, 1, 100),
    "full buffer (wrapped ring), two batches": (2, 96, 1, 160, 3, 2, 160),
    "sink-sized prefix, several tiles": (1, 300, 1, 256, 2, 0, 65),
}


@pytest.mark.parametrize("case", list(INTERPRET_CASES))
def test_kernel_in_interpreter(case):
    config = chunk_attention.KernelConfig(block_q=64, block_kv=64, stages=2)
    _check_case(*INTERPRET_CASES[case], 64, jnp.float16, config, interpret=True, seed=_SEED + hash(case) % 1000,
                tolerance=2e-3)


@pytest.mark.parametrize("config", [chunk_attention.KernelConfig(),  # the production tiles (64 / 128 / 2)
                                    chunk_attention.KernelConfig(block_kv=64, stages=3, pingpong=False,
                                                                 heads_major=False)],
                         ids=["default", "3stages-no-pingpong-tiles-major"])
def test_kernel_in_interpreter_other_configs(config):
    _check_case(1, 140, 2, 256, 2, 1, 200, 64, jnp.float16, config, interpret=True, seed=_SEED, tolerance=2e-3)


def test_valid_length_past_the_buffer_is_clipped():
    config = chunk_attention.KernelConfig(block_q=64, block_kv=64)
    q, k, v, cache_k, cache_v = _operands(1, 70, 1, 64, 1, 64, jnp.float16, _SEED)
    beyond = chunk_attention.chunk_cache_attention(q, k, v, cache_k, cache_v, jnp.int32(0), jnp.int32(1000),
                                                   config=config, interpret=True)
    full = chunk_attention.chunk_cache_attention(q, k, v, cache_k, cache_v, jnp.int32(0), jnp.int32(64),
                                                 config=config, interpret=True)
    np.testing.assert_array_equal(np.asarray(beyond), np.asarray(full))


def test_entry_point_serves_pallas_requests_on_any_device():
    """`attention_with_cache(implementation="pallas")` gives the reference's numbers wherever it runs (here
    on the CPU it falls back to XLA; on a Hopper GPU it runs the kernel)."""
    q, k, v, cache_k, cache_v = _operands(1, 50, 2, 64, 2, 64, jnp.float32, _SEED)
    args = (q, k, v, cache_k, cache_v, jnp.int32(1), jnp.int32(40))
    np.testing.assert_allclose(np.asarray(attention_with_cache(*args, implementation="pallas")),
                               np.asarray(attention_with_cache(*args, implementation="xla")), rtol=1e-5, atol=1e-5)


def test_unsupported_operands_fall_back_with_reason(caplog):
    q = jnp.ones((1, 8, 2, 96), jnp.bfloat16)
    assert "head_dim 96" in chunk_attention.unsupported_reason(q, jnp.ones((1, 1, 8, 2, 96), jnp.bfloat16))
    assert "dtype float32" in chunk_attention.unsupported_reason(q.astype(jnp.float32),
                                                                 jnp.ones((1, 1, 8, 2, 96), jnp.float32))
    assert chunk_attention.unsupported_reason(jnp.ones((1, 8, 2, 128), jnp.bfloat16),
                                              jnp.ones((1, 1, 8, 2, 128), jnp.bfloat16)) is None
    if jax.default_backend() == "cpu":
        with caplog.at_level("WARNING"):
            assert resolve(q, "pallas", cache_k=jnp.ones((1, 1, 8, 2, 96), jnp.bfloat16)) == "xla"
        assert "pallas" in caplog.text and "needs a GPU" in caplog.text


def _hopper() -> bool:
    return chunk_attention.is_hopper(jax.devices()[0])


GPU_CASES = {
    # odd sizes: tails inside the last query tile and the last key blocks
    "odd, empty cache": (1, 1001, 3, 2048, 2, 1, 0),
    "odd, partial cache": (1, 1001, 3, 2048, 2, 1, 1337),
    "odd, full buffer": (2, 517, 5, 1536, 3, 2, 1536),
    "buffer not a block multiple": (1, 640, 2, 1000, 2, 1, 1000),
    # recipe-sized: Self-Forcing chunk vs 6 cached frames; LingBot chunk vs 15 cached frames (4 heads)
    "self-forcing 6th chunk": (1, 4680, 12, 29696, 2, 1, 4680 * 2),
    "lingbot window": (1, 4524, 4, 33280, 2, 1, 22620),
}


@pytest.mark.skipif(not _hopper(), reason="the compiled kernel needs a Hopper GPU (the interpreter tests run here)")
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("config", [chunk_attention.KernelConfig(), chunk_attention.KernelConfig(stages=3)],
                         ids=["default", "3stages"])
def test_kernel_on_gpu(case, config):
    batch, length, heads, buffer, layers, layer, valid = GPU_CASES[case]
    error = _check_case(batch, length, heads, buffer, layers, layer, valid, 128, jnp.bfloat16, config,
                        interpret=False, seed=_SEED + length + valid, tolerance=2e-2)
    print(f"{case}: worst row relative L2 {error:.2e}")


@pytest.mark.skipif(not _hopper(), reason="the compiled kernel needs a Hopper GPU (the interpreter tests run here)")
@pytest.mark.parametrize("head_dim,dtype", [(64, jnp.float16), (128, jnp.float16), (64, jnp.bfloat16)])
def test_kernel_on_gpu_other_head_dims_and_dtypes(head_dim, dtype):
    for batch, length, heads, buffer, layers, layer, valid in [(1, 5, 2, 96, 2, 1, 1), (1, 333, 3, 520, 2, 0, 519)]:
        _check_case(batch, length, heads, buffer, layers, layer, valid, head_dim, dtype,
                    chunk_attention.KernelConfig(pingpong=False, heads_major=False), interpret=False,
                    seed=_SEED + length, tolerance=2e-2)
