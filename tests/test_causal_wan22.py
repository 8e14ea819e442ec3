"""FastVideo's causal Wan2.2 A14B sampler (two experts): recipes, the schedule, and the streamed rollout
against a reference loop written from ../shared/FAMILIES.md §3 on tiny random weights.

What upstream numbers pin, and what they do not. No golden case runs FastVideo code, and nothing here does
either. The reference loop below is written from a reading of FastVideo's `CausalDMDDenosingStage`
(`fastvideo/pipelines/stages/causal_denoising.py`), `pred_noise_to_x_bound` / `pred_noise_to_pred_video`
(`fastvideo/models/utils.py`), `SelfForcingFlowMatchScheduler.add_noise{,_high}` and its table, and of
FAMILIES.md §3. It has its own float32 scheduler table (built as FV's, with torch), argmin σ lookups and
full-sequence forwards of each expert over [clean history at t = 0 ; this block at t] with a block-causal
mask; it uses no wm_jax schedule, cache or streaming code. So it checks our implementation of that
reading, not the reading itself:
  - pinned only by the reading: the 8-step list [1000, 850, 700, 550, 350, 275, 200, 125] warped through the
    table; boundary 875 (t >= 875 runs the high-noise expert); the high-noise update x_b = x − (σ_t − σ_b)·v
    and its re-noise α·x_b + β·ε; the hand-off that feeds x_b to the first low-noise pass without
    re-noising (its noise draw consumed, unused); low-noise x0 = x − σ_t·v and (1 − σ)·x0 + σ·ε; a 1-frame
    first block then 3-frame blocks; both experts committing each clean block at t = 0 into their own
    caches; the text K/V of BOTH experts projected by the high-noise expert (FV's one cross-attention cache,
    filled by the first call, always the high-noise expert); the I2V image latent as frame 0 committed at
    t = 0 into both caches, generation from frame 1 in 3-frame blocks.
  - not pinned at all: shift 5. FV's pipeline config says flow_shift 12, which the scheduler loader stores
    without rebuilding the table, so the effective shift is the HF `scheduler_config.json`'s, which nobody
    has read (FAMILIES.md §3.2); 5 is FlashDreams' value. The checkpoints' numbers, the VAE latent
    normalisation and bf16 autocast are not exercised (tiny float32 experts, a stand-in image encoder).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import plan_of
from tests.test_causal_forcing import (ENGINE_SHAPE, SMALL, ImageLatent, _relative_l2,
                                       latent_decoder)

torch = pytest.importorskip("torch")

from converters import wan_dit  # noqa: E402
from tests.wan_testlib import random_original_state  # noqa: E402
from wm_jax.io.tensor_sources import ArraySource  # noqa: E402
from wm_jax.models.config import WanConfig  # noqa: E402

T2V, I2V = "causal-wan2.2-t2v-a14b", "causal-wan2.2-i2v-a14b"
SHIFT, BOUNDARY = 5.0, 0.875
STEPS = [1000, 850, 700, 550, 350, 275, 200, 125]  # FV `SelfForcingWan2_2_T2V480PConfig.dmd_denoising_steps`
WARPED = [1000.0, 965.909, 921.053, 859.375, 729.167, 654.762, 555.556, 416.667]  # FAMILIES.md §3.2, computed
LATENT = (ENGINE_SHAPE["pixel_height"] // 8, ENGINE_SHAPE["pixel_width"] // 8, WanConfig(**SMALL).out_dim)


# ---------------------------------------------------------------------------------------------------
# The reference, from FAMILIES.md §3 and FastVideo's code as read there.
# ---------------------------------------------------------------------------------------------------


def scheduler_table(shift: float = SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of SelfForcingFlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) with
    1000 steps: σ = shift-warp of linspace(1, 0, 1001) without its last entry, t = 1000σ; float32 in torch."""
    sigmas = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return (sigmas * 1000).numpy(), sigmas.numpy()


def warped_steps(steps=STEPS, shift: float = SHIFT) -> np.ndarray:
    """The t each pass feeds the network: `cat(timesteps, [0])[1000 - step]`."""
    timesteps, _ = scheduler_table(shift)
    return np.concatenate([timesteps, np.zeros(1, np.float32)])[1000 - np.asarray(steps)]


def sigma_of(t: float, shift: float = SHIFT) -> np.float32:
    """σ of the table entry whose t is nearest `t` (every conversion and re-noise looks σ up this way)."""
    timesteps, sigmas = scheduler_table(shift)
    return sigmas[np.argmin(np.abs(timesteps.astype(np.float64) - float(t)))]


_FORWARDS: list = []  # (model, jitted forward): one compiled program per expert and sequence length


def _forward(model):
    for known, run in _FORWARDS:
        if known is model:
            return run
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, x, t, cross_kv, mask):
        return nnx.merge(graphdef, params).forward_with_cross_kv(x, t, cross_kv, attention_mask=mask)[0]

    def run(x, t, cross_kv, mask):
        return np.asarray(forward(params, jnp.asarray(x), jnp.asarray(t), cross_kv, jnp.asarray(mask)))

    _FORWARDS.append((model, run))
    return run


def reference_rollout(high, low, text: np.ndarray, noise: list[np.ndarray], *, given: np.ndarray | None = None,
                      steps=STEPS, shift: float = SHIFT, boundary: float = BOUNDARY,
                      renoise_at_handoff: bool = False, low_own_text_kv: bool = False) -> list[np.ndarray]:
    """The x0 [1, F, h, w, C] of each block; noise[c] is block c's draws [passes, 1, F, h, w, C] (draw 0 its
    initial latent, draw i + 1 the re-noise after pass i); `given` [1, 1, h, w, C] an I2V image latent.

    No cache: each pass runs its expert over [clean history at t = 0 ; this block at t] with the mask where a
    frame sees its own block and every earlier one (the image frame is a block of its own), so each expert
    sees the history through its own weights, as its own cache would hold it. The two flags switch on the
    wrong variants: re-noising the hand-off latent like a low-noise pass, and the low-noise expert attending
    to text K/V of its own instead of the high-noise expert's."""
    ts = warped_steps(steps, shift)
    boundary_t = boundary * 1000
    high_passes = int(np.sum(ts >= boundary_t))
    sigma_b = sigma_of(boundary_t, shift)
    shared = high.cross_kv(high.embed_text(jnp.asarray(text)))
    low_kv = low.cross_kv(low.embed_text(jnp.asarray(text))) if low_own_text_kv else shared
    h, w, c = noise[0].shape[-3:]
    tokens = (h // 2) * (w // 2)
    history = np.zeros((1, 0, h, w, c), np.float32) if given is None else np.asarray(given, np.float32)
    sizes = [] if given is None else [history.shape[1]]
    out = []
    for draws in noise:
        frames, past = draws.shape[2], history.shape[1]
        sizes = sizes + [frames]
        block = np.repeat(np.arange(len(sizes)), sizes)
        mask = np.kron(block[None, :] <= block[:, None], np.ones((tokens, tokens), bool))
        x = draws[0].astype(np.float32)
        for i, t in enumerate(ts):
            is_high = t >= boundary_t
            run, cross_kv = (_forward(high), shared) if is_high else (_forward(low), low_kv)
            t_frames = np.concatenate([np.zeros(past), np.full(frames, t)])[None].astype(np.float32)
            v = run(np.concatenate([history, x], axis=1), t_frames, cross_kv, mask)[:, past:]
            sigma_t = sigma_of(t, shift)
            scale = (np.float64(sigma_t) - np.float64(sigma_b)) if is_high else np.float64(sigma_t)
            pred = (x.astype(np.float64) - scale * v.astype(np.float64)).astype(np.float32)  # x_b or x0
            if i + 1 == len(ts):
                break
            s, eps = sigma_of(ts[i + 1], shift), draws[i + 1]
            if is_high and i + 1 < high_passes:  # high -> high: `add_noise_high`
                alpha = (np.float32(1) - s) / (np.float32(1) - sigma_b)
                beta = np.sqrt(s * s - (alpha * sigma_b) ** 2)
                x = alpha * pred + beta * eps
            elif is_high and not renoise_at_handoff:  # the hand-off: x_b as it is, eps unused
                x = pred
            else:
                x = (np.float32(1) - s) * pred + s * eps
        out.append(pred)
        history = np.concatenate([history, pred], axis=1)
    return out


# ---------------------------------------------------------------------------------------------------
# Fixtures: two tiny experts, block noise.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def experts():
    """Two small random experts (`SMALL`, upstream-like magnitudes, different seeds) and prompt features."""
    cfg = WanConfig(**SMALL)
    high, low = (wan_dit.load_source(ArraySource(random_original_state(cfg, seed=seed))) for seed in (31, 32))
    text = np.random.default_rng(3).standard_normal((1, 5, SMALL["text_dim"])).astype(np.float32)
    return high, low, text


def block_noise(seed: int, frames: list[int]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((len(STEPS), 1, f, *LATENT)).astype(np.float32) for f in frames]


@pytest.fixture(scope="module")
def t2v_case(experts):
    """Three T2V blocks (1 + 3 + 3 frames): their noise and the reference's x0."""
    high, low, text = experts
    noise = block_noise(5, [1, 3, 3])
    return noise, reference_rollout(high, low, text, noise)


@pytest.fixture(scope="module")
def t2v_streamed(experts, t2v_case):
    """The same three blocks streamed by the engine: `last_latents` of each chunk."""
    from wm_jax.models.wan import ExpertPair
    from wm_jax.streaming.engine import WorldRollout
    from wm_jax.streaming.recipes import load_recipe

    high, low, text = experts
    noise, _ = t2v_case
    recipe = load_recipe(T2V).replace(total_blocks=3, **ENGINE_SHAPE)
    pair = ExpertPair(high_noise=high, low_noise=low, boundary=BOUNDARY)
    rollout = WorldRollout(recipe, plan_of(recipe), pair, latent_decoder(32, 32), seed=0)
    rollout.start(text)
    streamed = []
    for draws in noise:
        rollout.next_chunk(noise=draws)
        streamed.append(np.asarray(rollout.last_latents))
    return streamed


# ---------------------------------------------------------------------------------------------------
# The schedule and the recipes.
# ---------------------------------------------------------------------------------------------------


def test_schedule_numbers():
    ts = warped_steps()
    np.testing.assert_allclose(ts, WARPED, atol=1e-3)
    assert ts.dtype == np.float32 and list(ts >= BOUNDARY * 1000) == [True] * 3 + [False] * 5  # 3 high / 5 low
    sigma_b = sigma_of(BOUNDARY * 1000)
    assert abs(float(sigma_b) - 0.875) < 2e-4  # the table entry nearest t = 875 (t 874.85)
    for t in ts:  # the steps are table entries: σ_t = t / 1000
        assert abs(float(sigma_of(t)) - float(t) / 1000) < 1e-6
    for t_next in ts[1:3]:  # high -> high re-noise is a real Gaussian mix (β² > 0) ...
        s = sigma_of(t_next)
        assert s * s - ((1 - s) / (1 - sigma_b) * sigma_b) ** 2 > 0
    s = sigma_of(ts[3])  # ... which it could not be at the hand-off: the first low pass has σ < σ_b
    assert s < sigma_b and s * s - ((1 - s) / (1 - sigma_b) * sigma_b) ** 2 < 0


@pytest.mark.parametrize("slug, task", [(T2V, "t2v"), (I2V, "i2v_first_latent")])
def test_recipes_follow_fastvideo(slug, task):
    from wm_jax.streaming.recipes import load_recipe

    recipe = load_recipe(slug)
    assert (recipe.task, recipe.shift, list(recipe.steps), recipe.boundary) == (task, SHIFT, STEPS, BOUNDARY)
    assert (recipe.first_chunk_frames, recipe.chunk_frames, recipe.total_blocks) == (1, 3, 7)  # 19 latents


# ---------------------------------------------------------------------------------------------------
# The rollout against the reference.
# ---------------------------------------------------------------------------------------------------


def test_t2v_rollout_equals_the_reference_loop(t2v_case, t2v_streamed):
    _, reference = t2v_case
    assert [ours.shape for ours in t2v_streamed] == [(f, *LATENT) for f in (1, 3, 3)]
    for c, (ours, ref) in enumerate(zip(t2v_streamed, reference)):
        error = _relative_l2(ours, ref[0])
        assert error <= 1e-5, f"chunk {c}: relative L2 {error:.2e}"


def test_i2v_rollout_equals_the_reference_loop(experts):
    from wm_jax.models.wan import ExpertPair
    from wm_jax.streaming.engine import WorldRollout
    from wm_jax.streaming.recipes import load_recipe

    high, low, text = experts
    recipe = load_recipe(I2V).replace(total_blocks=3, **ENGINE_SHAPE)
    encoder = ImageLatent(LATENT[-1])
    pair = ExpertPair(high_noise=high, low_noise=low, boundary=BOUNDARY)
    rollout = WorldRollout(recipe, plan_of(recipe), pair, latent_decoder(32, 32), seed=0, vae_encoder=encoder)
    image = np.random.default_rng(6).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rollout.start(text, image=image)
    given = np.asarray(encoder.encode(jnp.asarray(image, jnp.float32)[None, None] / 127.5 - 1.0))
    rollout.next_chunk()
    np.testing.assert_allclose(rollout.last_latents, given[0], atol=1e-6)  # frame 0 is the image's latent
    noise = block_noise(7, [3, 3])
    streamed = []
    for draws in noise:
        rollout.next_chunk(noise=draws)
        streamed.append(np.asarray(rollout.last_latents))
    reference = reference_rollout(high, low, text, noise, given=given)
    for c, (ours, ref) in enumerate(zip(streamed, reference)):
        assert ours.shape == (3, *LATENT)
        error = _relative_l2(ours, ref[0])
        assert error <= 1e-5, f"block {c + 1}: relative L2 {error:.2e}"


WRONG_VARIANTS = {"re-noised hand-off": dict(renoise_at_handoff=True),
                  "low expert's own text K/V": dict(low_own_text_kv=True)}


@pytest.fixture(scope="module")
def wrong_references(experts, t2v_case):
    high, low, text = experts
    noise, _ = t2v_case
    return {name: reference_rollout(high, low, text, noise, **flags) for name, flags in WRONG_VARIANTS.items()}


def test_handoff_and_shared_text_kv_change_the_reference(t2v_case, wrong_references):
    """Either wrong variant moves every block by far more than the 1e-5 the rollout is held to: the
    comparisons above do tell the hand-off and the shared text K/V apart."""
    _, reference = t2v_case
    for name, wrong in wrong_references.items():
        for c, (bad, ref) in enumerate(zip(wrong, reference)):
            assert _relative_l2(bad, ref) > 1e-3, f"{name}, block {c}"


def test_rollout_matches_fastvideo_not_the_wrong_variants(t2v_case, t2v_streamed, wrong_references):
    _, reference = t2v_case
    for c, ours in enumerate(t2v_streamed):
        assert _relative_l2(ours, reference[c][0]) <= 1e-5, f"chunk {c}"
        for name, wrong in wrong_references.items():
            assert _relative_l2(ours, wrong[c][0]) > 1e-3, f"chunk {c} matches the {name}"


# ---------------------------------------------------------------------------------------------------
# `boundary_schedule` itself, against FastVideo's formulas on its float32 table.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift, split", [(5.0, (3, 5)), (8.0, (4, 4)), (12.0, (4, 4))])
def test_boundary_schedule_matches_fastvideos_updates(shift, split):
    from wm_jax.streaming.schedules import boundary_schedule

    schedule = boundary_schedule(shift, STEPS, BOUNDARY)
    ts = warped_steps(STEPS, shift)
    assert schedule.expert_passes == split
    np.testing.assert_allclose(schedule.t, ts, rtol=1e-6)
    sigma_b = np.float64(sigma_of(BOUNDARY * 1000, shift))
    high = split[0]
    for i, t in enumerate(ts):
        sigma = np.float64(sigma_of(t, shift))
        nxt = np.float64(sigma_of(ts[i + 1], shift)) if i + 1 < len(ts) else 0.0
        flow = sigma - sigma_b if i < high else sigma  # `pred_noise_to_x_bound` / `pred_noise_to_pred_video`
        if i + 1 < high:  # `add_noise_high`
            signal = (1 - nxt) / (1 - sigma_b)
            noise = np.sqrt(nxt ** 2 - (signal * sigma_b) ** 2)
        elif i + 1 == high:  # the hand-off row: the boundary latent as it is
            signal, noise = 1.0, 0.0
        else:  # `add_noise`
            signal, noise = 1 - nxt, nxt
        got = (schedule.flow_scale[i], schedule.signal_scale[i], schedule.noise_scale[i])
        np.testing.assert_allclose(got[:1], [flow], atol=1e-6, err_msg=f"pass {i} flow")
        if i + 1 < len(ts):
            np.testing.assert_allclose(got[1:], [signal, noise], atol=1e-6, err_msg=f"pass {i}")
    assert (schedule.signal_scale[high - 1], schedule.noise_scale[high - 1]) == (1.0, 0.0)


def test_boundary_schedule_refuses_lists_it_cannot_split():
    from wm_jax.streaming.schedules import boundary_schedule

    with pytest.raises(ValueError, match="the last pass must run the low-noise expert"):
        boundary_schedule(5.0, (1000, 950), BOUNDARY)
    with pytest.raises(ValueError, match="needs decreasing timesteps"):
        boundary_schedule(5.0, (500, 1000), BOUNDARY)
    low_only = boundary_schedule(5.0, (500, 250), BOUNDARY)  # no high-noise pass: the low expert runs both
    assert low_only.expert_passes == (0, 2)


def test_a_two_expert_recipe_takes_only_the_warped_self_forcing_schedule():
    from wm_jax.streaming.recipes import load_recipe

    with pytest.raises(ValueError, match="two experts .* run FastVideo's warped Self-Forcing schedule"):
        load_recipe(T2V).replace(warp=False)
    with pytest.raises(ValueError, match="schedule 'lingbot_fast'"):
        load_recipe(T2V).replace(schedule="lingbot_fast")


# ---------------------------------------------------------------------------------------------------
# `wm-jax serve`'s world: a 1-frame first chunk, two experts, save and restore.
# ---------------------------------------------------------------------------------------------------


def test_the_live_world_streams_saves_and_restores_a_two_expert_model(experts, tmp_path):
    from wm_jax.models.wan import ExpertPair
    from wm_jax.serve.world import LiveWorld
    from wm_jax.streaming.components import Components
    from wm_jax.streaming.recipes import load_recipe

    from wm_jax.models.wan_vae import WanVAE, WanVAEConfig
    from wm_jax.streaming.decoders import wan_vae_decoder

    high, low, text = experts
    recipe = load_recipe(T2V).replace(total_blocks=6, **ENGINE_SHAPE)
    vae = WanVAE(WanVAEConfig(dim=8, num_res_blocks=1), rngs=nnx.Rngs(0))  # a real streaming decoder state
    parts = Components(dit=ExpertPair(high, low, BOUNDARY), decoder=wan_vae_decoder(vae), vae_encoder=None,
                       encode_prompt=lambda prompt: text, description={})
    world = LiveWorld(recipe, plan_of(recipe), parts, prompt="a road", image=None, intrinsics=None, seed=0)
    world.reset()
    frames = [world.next_chunk()[0].shape[0] for _ in range(2)]
    assert frames == [1, 12]  # the 1-frame first chunk, then 3 latent frames
    world.save(tmp_path / "world")
    after_save = [np.asarray(world.next_chunk()[0]) for _ in range(2)]
    world.restore(tmp_path / "world")
    assert all(int(c.committed_frames) == 4 for c in world.rollout.step.per_expert(world.rollout.state.cache))
    again = [np.asarray(world.next_chunk()[0]) for _ in range(2)]
    for ours, ref in zip(again, after_save):
        np.testing.assert_array_equal(ours, ref)
