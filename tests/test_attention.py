"""The attention entry point: reference semantics, valid-length masking, argument checks."""

import jax
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




def _chunk_and_cache(seed, dtype=np.float32, layers=3, cache_tokens=32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((2, 6, 3, 16)).astype(dtype) for _ in range(3))
    ck, cv = (rng.standard_normal((layers, 2, cache_tokens, 3, 16)).astype(dtype) for _ in range(2))
    return q, k, v, ck, cv


@pytest.mark.parametrize("valid", [0, 5, 32])
def test_chunk_attends_to_itself_and_the_valid_prefix_of_its_layer(valid):
    from wm_jax.kernels.attention import attention_with_cache

    q, k, v, ck, cv = _chunk_and_cache(valid)
    out = attention_with_cache(*(jnp.asarray(a) for a in (q, k, v, ck, cv)), jnp.int32(1), jnp.int32(valid),
                               implementation="xla")
    expected = _naive(q, np.concatenate([k, ck[1, :, :valid]], 1), np.concatenate([v, cv[1, :, :valid]], 1))
    np.testing.assert_allclose(np.asarray(out), expected, atol=2e-6)


@pytest.mark.parametrize("valid", [0, 7])
def test_log_sum_exp_merge_of_chunk_and_cache_equals_one_attention(valid):
    """The cuDNN path attends to the chunk and to the cache separately and merges by log-sum-exp; the
    merge itself (float64 partials here) must give attention over the union, and drop an empty cache
    whatever its partial output holds."""
    from wm_jax.kernels.attention import _merge_by_log_sum_exp

    q, k, v, ck, cv = _chunk_and_cache(valid)
    ck, cv = ck[0, :, :max(valid, 1)], cv[0, :, :max(valid, 1)]

    def partial(keys, values):
        logits = np.einsum("bqnd,bknd->bqnk", q.astype(np.float64), keys) / np.sqrt(q.shape[-1])
        lse = np.log(np.exp(logits).sum(-1))
        return np.einsum("bqnk,bknd->bqnd", np.exp(logits - lse[..., None]), values), lse

    own, cached = partial(k, v), partial(ck, cv)
    if valid == 0:
        cached = (np.full_like(cached[0], np.nan), cached[1])  # what cuDNN's 1-key stand-in may hold
    merged = _merge_by_log_sum_exp(tuple(map(jnp.asarray, own)), tuple(map(jnp.asarray, cached)),
                                   jnp.asarray(valid > 0))
    keys = np.concatenate([k, ck[:, :valid]], 1)
    values = np.concatenate([v, cv[:, :valid]], 1)
    np.testing.assert_allclose(np.asarray(merged), _naive(q, keys, values), atol=2e-6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN paged attention needs a CUDA GPU")
@pytest.mark.parametrize("valid", [0, 1, 200, 384])
def test_cudnn_paged_cache_attention_matches_the_reference(valid):
    """bf16 on the GPU: the paged + merged cuDNN path against the XLA reference (layer 2 of 3, batch 2)."""
    from wm_jax.kernels.attention import attention_with_cache

    q, k, v, ck, cv = (jnp.asarray(a, jnp.bfloat16) for a in _chunk_and_cache(valid, layers=3, cache_tokens=384))
    args = (q, k, v, ck, cv, jnp.int32(2), jnp.int32(valid))
    fast = attention_with_cache(*args, implementation="cudnn").astype(jnp.float32)
    ref = attention_with_cache(*args, implementation="xla").astype(jnp.float32)
    assert float(jnp.linalg.norm(fast - ref) / jnp.linalg.norm(ref)) < 1e-2


# ---------------------------------------------------------------------------------------------------
# Backend choice: auto per device kind, fallback with one logged reason, missing packages named.
# ---------------------------------------------------------------------------------------------------


class _FakeDevice:
    def __init__(self, platform, device_kind, compute_capability=None):
        self.platform, self.device_kind = platform, device_kind
        if compute_capability:
            self.compute_capability = compute_capability


def test_auto_is_the_measured_fastest_per_gpu_kind(monkeypatch):
    from wm_jax.kernels import attention as attn

    assert attn.default_backend() == "xla"  # this CPU
    for kind, expected in [("NVIDIA H200", "pallas"), ("Some Future GPU", "cudnn")]:
        monkeypatch.setattr(attn.jax, "devices", lambda kind=kind: [_FakeDevice("gpu", kind, "9.0")])
        assert attn.default_backend() == expected


def test_named_backend_without_its_package_is_an_error(monkeypatch):
    import importlib.util

    from wm_jax.kernels import attention as attn

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokamax" else real(name, *a))
    q = jnp.ones((1, 8, 2, 64), jnp.bfloat16)
    with pytest.raises(attn.BackendUnavailable, match="needs the package 'tokamax'.*pip install tokamax"):
        attn.resolve(q, "tokamax")
    with pytest.raises(ValueError, match="expected one of"):
        attn.resolve(q, "flash")


def test_fallback_names_every_skipped_backend_once(caplog):
    from wm_jax.kernels import attention as attn

    attn._logged.clear()
    q = jax.ShapeDtypeStruct((1, 9, 2, 64), jnp.float32)
    cache = jax.ShapeDtypeStruct((2, 1, 16, 2, 64), jnp.float32)
    with caplog.at_level("INFO", logger=attn.__name__):
        for _ in range(3):
            assert attn.resolve(q, "pallas", cache_k=cache) == "xla"
    lines = [r for r in caplog.records if "runs on 'xla'" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "WARNING"
    assert all(f"{name}:" in lines[0].getMessage() for name in ("pallas", "cudnn", "tokamax"))


def test_run_option_checks_the_attention_backend(monkeypatch):
    import importlib.util

    from wm_jax.errors import OptionError
    from wm_jax.streaming import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokamax" else real(name, *a))
    with pytest.raises(OptionError, match=r"tokamax: needs the package 'tokamax'"):
        run.check_options(run.RunOptions(slug="tiny", attention="tokamax"), output=False)
    with pytest.raises(OptionError, match="one of auto, pallas"):
        run.check_options(run.RunOptions(slug="tiny", attention="flash"), output=False)
    run.check_options(run.RunOptions(slug="tiny", attention="pallas"), output=False)
