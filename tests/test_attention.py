"""The attention entry point: reference semantics, valid-length masking, argument checks."""

import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.kernels.attention import attention


def _naive(q, k, v, valid=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
    if valid is not None:
        logits = np.where(np.arange(k.shape[1])[None, None, None, :] < np.asarray(valid)[:, None, None, None],
                          logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v)


def test_reference_matches_float64_softmax_with_valid_lengths():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 3, 128)).astype(np.float32)
    k = rng.standard_normal((2, 11, 3, 128)).astype(np.float32)
    v = rng.standard_normal((2, 11, 3, 128)).astype(np.float32)
    valid = np.array([11, 6], np.int32)
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_valid_length=jnp.asarray(valid),
                    implementation="xla")
    np.testing.assert_allclose(np.asarray(out), _naive(q, k, v, valid), atol=2e-6)
    # keys past the valid length do not matter at all
    k2, v2 = k.copy(), v.copy()
    k2[1, 6:], v2[1, 6:] = 1e3, -1e3
    out2 = attention(jnp.asarray(q), jnp.asarray(k2), jnp.asarray(v2), kv_valid_length=jnp.asarray(valid),
                     implementation="xla")
    np.testing.assert_array_equal(np.asarray(out2)[1], np.asarray(out)[1])


def test_unknown_implementation_is_refused():
    x = jnp.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match="expected one of"):
        attention(x, x, x, implementation="flash")



@pytest.mark.parametrize("valid", [0, 5, 13])
def test_chunk_attends_to_itself_and_the_valid_cache_prefix(valid):
    from wm_jax.kernels.attention import attention_with_cache

    rng = np.random.default_rng(valid)
    q, k, v = (rng.standard_normal((2, 6, 3, 16)).astype(np.float32) for _ in range(3))
    ck, cv = (rng.standard_normal((2, 13, 3, 16)).astype(np.float32) for _ in range(2))
    out = attention_with_cache(*(jnp.asarray(a) for a in (q, k, v, ck, cv)), jnp.int32(valid), implementation="xla")
    expected = _naive(q, np.concatenate([k, ck[:, :valid]], 1), np.concatenate([v, cv[:, :valid]], 1))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)
