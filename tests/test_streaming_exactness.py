"""Exactness of the streamed rollout: the KV cache (sink + ring) against full-sequence forwards.

The streamed rollout (`StreamingStep`: denoise against the frozen cache, commit the clean chunk into
the ring) must equal a reference that keeps no cache at all: every pass re-runs the model over the
whole clean history plus the noisy chunk, with per-frame timesteps (0 for the history) and the
block-causal sink + window mask. The mask itself is checked against a plain simulation of upstream's
shifting buffer (first `sink` frames pinned, oldest others evicted), so the ring arithmetic is never
the reference of itself. float32 throughout; tolerance 1e-5 relative L2 per chunk.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wm_jax.models.config import WanConfig
from wm_jax.models.wan import WanModel
from wm_jax.parallel.mesh import make_mesh, to_host
from wm_jax.streaming.kv_cache import CacheLayout, upstream_cache_frames
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.schedules import lingbot_fast_schedule, self_forcing_schedule
from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise

CONFIG = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, camera_channels=24)
LATENT_H, LATENT_W, CHUNK = 4, 6, 3
TOKENS_PER_FRAME = (LATENT_H // 2) * (LATENT_W // 2)
NUM_CHUNKS = 8
TOLERANCE = 1e-5


def _relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def upstream_visible_frames(num_frames: int, sink: int, local_attn_size: int | None) -> np.ndarray:
    """Frame visibility of upstream's shifting buffer, simulated with a list (None = global cache).

    The buffer holds at most local_attn_size frames including the sink and the current chunk; when the
    chunk does not fit, the oldest frames after the sink are shifted out.
    """
    visible = np.zeros((num_frames, num_frames), bool)
    buffer: list[int] = []
    for start in range(0, num_frames, CHUNK):
        chunk = list(range(start, start + CHUNK))
        if local_attn_size is not None:
            while len(buffer) + CHUNK > local_attn_size:
                del buffer[sink]
        for q in chunk:
            visible[q, buffer + chunk] = True
        buffer += chunk
    return visible


LAYOUTS = {
    # name: (layout, upstream (sink, local_attn_size), schedule)
    "global": (CacheLayout(TOKENS_PER_FRAME, sink_frames=NUM_CHUNKS * CHUNK, ring_frames=0), (0, None),
               self_forcing_schedule(shift=8.0)),
    # ring of 4 frames, not a multiple of the chunk: chunk writes split across the wrap; 23 frames through
    # a 4-frame ring = the ring wraps 5 times
    "sink1_ring4": (CacheLayout(TOKENS_PER_FRAME, sink_frames=1, ring_frames=4), (1, 8),
                    lingbot_fast_schedule()),
    # FlashDreams' window15-sink3 shape, scaled down: sink 3 + window 9 (2 previous chunks + current)
    "sink3_window9": (CacheLayout(TOKENS_PER_FRAME, *upstream_cache_frames(12, 3, CHUNK)), (3, 12),
                      lingbot_fast_schedule()),
}


def plan_for(layout: CacheLayout, num_chunks: int = NUM_CHUNKS) -> RolloutPlan:
    """The plan of these tests' latent grid (LATENT_H x LATENT_W) with `layout`'s sink and ring, one device."""
    plan = RolloutPlan.create(CONFIG, make_mesh(1), pixel_height=8 * LATENT_H, pixel_width=8 * LATENT_W,
                              chunk_frames=CHUNK, total_blocks=num_chunks, sink_frames=layout.sink_frames,
                              ring_frames=layout.ring_frames)
    assert plan.cache == layout
    return plan


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_block_causal_mask_matches_upstream_shifting_buffer(name):
    layout, (sink, local_attn_size), _ = LAYOUTS[name]
    frames = NUM_CHUNKS * CHUNK
    np.testing.assert_array_equal(layout.visible_frames(frames),
                                  upstream_visible_frames(frames, sink, local_attn_size))


@pytest.fixture(scope="module")
def model() -> WanModel:
    model = WanModel(CONFIG, rngs=nnx.Rngs(3), compute_dtype=jnp.float32, attention_impl="xla")
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(11), len(leaves))
    # modulation tables and norm scales start at 0 / 1: perturb everything so no path is an identity
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


def _token_mask(layout: CacheLayout, num_frames: int) -> jax.Array:
    frames = layout.visible_frames(num_frames)
    ones = np.ones((TOKENS_PER_FRAME, TOKENS_PER_FRAME), bool)
    return jnp.asarray(np.kron(frames, ones).astype(bool))


@pytest.fixture(scope="module")
def full_forward(model):
    """jitted (params, x, t [B, F], cross_kv, camera, mask) -> (flow, (k, v)): one forward, no cache."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def forward(params, x, t, cross_kv, camera, mask):
        return nnx.merge(graphdef, params).forward_with_cross_kv(x, t, cross_kv, camera=camera,
                                                                 attention_mask=mask)

    return forward


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_streamed_rollout_equals_full_sequence_forwards(name, model, full_forward):
    layout, _, schedule = LAYOUTS[name]
    step = StreamingStep(model, schedule, plan_for(layout))
    key = jax.random.key(5)
    text = jax.random.normal(jax.random.key(6), (1, 7, CONFIG.text_dim))
    cross_kv = step.cross_kv(text)
    frames = NUM_CHUNKS * CHUNK
    cameras = jax.random.normal(jax.random.key(7), (1, frames, LATENT_H, LATENT_W, CONFIG.camera_channels))
    shape = (1, CHUNK, LATENT_H, LATENT_W, CONFIG.out_dim)
    noises = [chunk_noise(key, c, schedule.num_steps, shape) for c in range(NUM_CHUNKS)]

    # streamed: one denoise program and one commit program, the cache carried between chunks
    cache = step.init_cache(jnp.float32)
    streamed = []
    for c in range(NUM_CHUNKS):
        inputs = ChunkInputs(camera=cameras[:, c * CHUNK:(c + 1) * CHUNK])
        x0 = step.denoise(step.params, cache, cross_kv, noises[c], inputs)
        cache = step.commit(step.params, cache, cross_kv, x0, inputs)
        streamed.append(to_host(x0))

    # reference: no cache; each pass runs the model over [clean history ; noisy chunk] with the mask
    params = nnx.state(model)
    history = jnp.zeros((1, 0, LATENT_H, LATENT_W, CONFIG.out_dim))
    for c in range(NUM_CHUNKS):
        length = (c + 1) * CHUNK
        mask, camera = _token_mask(layout, length), cameras[:, :length]
        x = noises[c][0]
        for p in range(schedule.num_steps):
            t = jnp.concatenate([jnp.zeros((c * CHUNK,)), jnp.full((CHUNK,), schedule.t[p])])[None]
            flow, _ = full_forward(params, jnp.concatenate([history, x], axis=1), t, cross_kv, camera, mask)
            x0 = x - schedule.flow_scale[p] * flow[:, -CHUNK:]
            if p + 1 < schedule.num_steps:
                x = schedule.signal_scale[p] * x0 + schedule.noise_scale[p] * noises[c][p + 1]
        error = _relative_l2(streamed[c], x0)
        assert error <= TOLERANCE, f"chunk {c}: streamed vs full-sequence relative L2 {error:.2e}"
        history = jnp.concatenate([history, x0], axis=1)

    # one full-sequence forward of the clean video at t = 0: the K/V of every frame still held must sit
    # in the cache slot the layout gives it (sink pinned, ring wrapped), equal to the full forward's
    _, (full_k, full_v) = full_forward(params, history, jnp.zeros((1, frames)), cross_kv, cameras,
                                       _token_mask(layout, frames))
    held = [g for g in range(frames) if g < layout.sink_frames or g >= frames - layout.ring_frames]
    assert int(cache.committed_frames) == frames
    assert len(held) == min(frames, layout.capacity_frames)
    tpf = TOKENS_PER_FRAME
    for g in held:
        slot = int(layout.slot(g))
        for cached, full in ((cache.k, full_k), (cache.v, full_v)):
            error = _relative_l2(cached[:, :, slot * tpf:(slot + 1) * tpf], full[:, :, g * tpf:(g + 1) * tpf])
            assert error <= TOLERANCE, f"frame {g} in slot {slot}: relative L2 {error:.2e}"
    if layout.ring_frames:
        assert (frames - layout.sink_frames) // layout.ring_frames >= 2, "the ring must wrap at least twice"


def test_attention_mask_of_the_wrong_shape_or_with_a_cache_is_refused():
    model = WanModel(CONFIG.replace(camera_channels=None), compute_dtype=jnp.float32, attention_impl="xla")
    x = jnp.zeros((1, CHUNK, LATENT_H, LATENT_W, CONFIG.in_dim))
    kv = model.cross_kv(model.embed_text(jnp.zeros((1, 4, CONFIG.text_dim))))
    with pytest.raises(ValueError, match="attention_mask must be"):
        model.forward_with_cross_kv(x, jnp.zeros((1,)), kv, attention_mask=jnp.ones((5, 5), bool))
    tokens = CHUNK * TOKENS_PER_FRAME
    layout = CacheLayout(TOKENS_PER_FRAME, sink_frames=CHUNK, ring_frames=0)
    cache = StreamingStep(model, self_forcing_schedule(), plan_for(layout, 1)).init_cache(jnp.float32)
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model.forward_with_cross_kv(x, jnp.zeros((1,)), kv, attention_mask=jnp.ones((tokens, tokens), bool),
                                    cache=cache.attention_view(layout))
