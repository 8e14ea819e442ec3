"""RoPE positions past upstream's 1024-row table: upstream's formula continued, the table itself unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.models import embeddings as E
from wm_jax.models.config import WanConfig
from wm_jax.models.wan import WanModel
from wm_jax.parallel.mesh import make_mesh, to_host
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.schedules import self_forcing_schedule
from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise


def upstream_angles(frames: np.ndarray, head_dim: int = 128) -> np.ndarray:
    """Upstream's float64 temporal angles f·θ_k (its table formula, for any f)."""
    pairs = E.rope_axis_pairs(head_dim)[0]
    return np.outer(frames.astype(np.float64), 1.0 / 10000.0 ** (np.arange(pairs, dtype=np.float64) * 2 / (2 * pairs)))


def test_within_the_table_positions_are_upstreams_table_bit_for_bit():
    (table_cos, table_sin), _, _ = E.rope_tables(128)
    cos, sin = E.temporal_rope(128, jnp.arange(E.ROPE_MAX_POSITIONS))
    np.testing.assert_array_equal(np.asarray(cos), table_cos)
    np.testing.assert_array_equal(np.asarray(sin), table_sin)
    angles = upstream_angles(np.arange(E.ROPE_MAX_POSITIONS))
    assert np.abs(table_cos - np.cos(angles)).max() <= 1e-7  # the table is upstream's float64 values, rounded


def test_past_the_table_positions_follow_upstreams_formula():
    frames = np.concatenate([np.arange(1020, 1100), [2047, 2048, 99_991, 1_000_003, E.ROPE_POSITION_LIMIT - 1]])
    cos, sin = E.temporal_rope(128, jnp.asarray(frames))
    angles = upstream_angles(frames)
    assert np.abs(np.asarray(cos) - np.cos(angles)).max() <= 1e-6
    assert np.abs(np.asarray(sin) - np.sin(angles)).max() <= 1e-6
    assert np.abs(np.asarray(cos) ** 2 + np.asarray(sin) ** 2 - 1).max() <= 1e-6


def test_streaming_past_frame_1024_compiles_once_and_keeps_positions():
    """A tiny model streams 345 chunks (frames 0..1034) through one denoise and one commit program; the
    keys it caches past frame 1024 are rotated exactly as a forward placed there rotates them."""
    cfg = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, text_dim=32)
    model = WanModel(cfg, rngs=nnx.Rngs(0), compute_dtype=jnp.float32, attention_impl="xla")
    chunks, chunk = 345, 3
    plan = RolloutPlan.create(cfg, make_mesh(1), pixel_height=32, pixel_width=32, chunk_frames=chunk,
                              total_blocks=chunks, sink_frames=1, ring_frames=5)
    schedule = self_forcing_schedule(steps=(1000, 500))
    step = StreamingStep(model, schedule, plan)
    cache = step.init_cache(jnp.float32)
    cross_kv = step.cross_kv(np.ones((1, 3, cfg.text_dim), np.float32))
    noise = jax.jit(lambda c: chunk_noise(jax.random.key(0), c, schedule.num_steps, plan.chunk_shape))
    inputs = ChunkInputs()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    for c in range(chunks):
        if c == 1:
            compiles.clear()
        x0 = step.denoise(step.params, cache, cross_kv, noise(c), inputs)
        cache = step.commit(step.params, cache, cross_kv, x0, inputs)
    assert compiles == [], f"recompiled while streaming: {len(compiles)} compilations"
    last = to_host(x0)
    assert int(cache.committed_frames) == chunks * chunk == 1035 and np.isfinite(last).all()

    # the last chunk (frames 1032..1034) sits in ring slots; its cached keys equal a forward at offset 1032
    _, (k, _) = jax.jit(lambda x: model.forward_with_cross_kv(x, jnp.zeros((1, chunk)), cross_kv,
                                                              frame_offset=1032))(jnp.asarray(last))
    tpf = plan.tokens_per_frame
    for f in range(chunk):
        slot = int(plan.cache.slot(1032 + f))
        np.testing.assert_allclose(np.asarray(cache.k[:, :, slot * tpf:(slot + 1) * tpf]),
                                   np.asarray(k[:, :, f * tpf:(f + 1) * tpf]), rtol=1e-5, atol=1e-5)
