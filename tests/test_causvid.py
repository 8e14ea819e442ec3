"""CausVid (tianweiy/CausVid, issue 13): recipes, the streamed rollout against a reference loop written from
../shared/FAMILIES.md §2 on tiny random weights, and `wm-jax run` from a stand-in hub.

What upstream numbers pin, and what they do not. No golden case runs CausVid's code. Its network is the
Self-Forcing / Causal-Forcing `CausalWanModel` (FAMILIES.md §2: same module names and maths, a `[B, F]`
timestep, absolute cache addressing = a cache that keeps every frame), which the `self_forcing_rollout` and
`causal_forcing_rollout` golden cases pin, warped step lists included. CausVid's own pieces -- shift 8
hard-coded in its wrapper, the released 3-step list [1000, 757, 522] fed to the network unwarped with σ from
the nearest entry of the shift-8 table (argmin), the warp 4-step list (FAMILIES.md's computed 1000, 960,
888.889, 727.273), the `generator` entry with `model.` keys and the hub file names -- come from reading
upstream's code and FAMILIES.md. The reference loop below is written from that reading (its own float32
scheduler table, argmin lookups and full-sequence forwards with a block-causal mask; no wm_jax schedule,
cache or streaming code), so it checks our implementation of the reading, not the reading itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import plan_of
from tests.test_causal_forcing import (CFG, ENGINE_SHAPE, _relative_l2, latent_decoder, run_from_hub,  # noqa: F401
                                       stand_in_hub, t2v_dit, tiny, video_frames)
from wm_jax.io import checkpoint as ckpt
from wm_jax.streaming.engine import WorldRollout
from wm_jax.streaming.recipes import load_recipe

THREE_STEP, WARP_4STEP = "causvid-wan2.1-t2v-1.3b", "causvid-wan2.1-t2v-1.3b-warp-4step"
REPO = "tianweiy/CausVid"


# ---------------------------------------------------------------------------------------------------
# The reference, from FAMILIES.md §2 (and CausVid's `FlowMatchScheduler`, `causal_inference.py` as read there).
# ---------------------------------------------------------------------------------------------------


def scheduler_table(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True) after
    set_timesteps(1000, training=True), in float32 as torch computes them."""
    sigmas = np.linspace(1.0, 0.0, 1001, dtype=np.float32)[:-1]
    sigmas = (np.float32(shift) * sigmas / (np.float32(1) + np.float32(shift - 1) * sigmas)).astype(np.float32)
    return (sigmas * np.float32(1000)).astype(np.float32), sigmas


def step_list(raw, shift: float, warp: bool) -> np.ndarray:
    """The timesteps the network sees: raw, or `cat(timesteps, [0])[1000 - raw]` with warp."""
    timesteps, _ = scheduler_table(shift)
    raw = np.asarray(raw)
    return np.concatenate([timesteps, [0]])[1000 - raw].astype(np.float32) if warp else raw.astype(np.float32)


def sigma_of(t: float, shift: float) -> float:
    """σ of the table entry nearest t (the wrapper's and `add_noise`'s argmin lookup)."""
    timesteps, sigmas = scheduler_table(shift)
    return float(sigmas[np.argmin(np.abs(timesteps.astype(np.float64) - t))])


def reference_rollout(model, text: np.ndarray, noise: list[np.ndarray], raw_steps, shift: float, warp: bool,
                      chunk: int) -> list[np.ndarray]:
    """No cache: every call runs the model over [clean history ; this chunk] with per-frame t (0 for the
    history, the commit pass's t) and the mask where a frame sees its own chunk and every earlier one."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, x, t, cross_kv, mask):
        return nnx.merge(graphdef, params).forward_with_cross_kv(x, t, cross_kv, attention_mask=mask)[0]

    cross_kv = model.cross_kv(model.embed_text(jnp.asarray(text)))
    steps = step_list(raw_steps, shift, warp)
    _, _, h, w, _ = noise[0].shape[1:]
    tokens = (h // 2) * (w // 2)
    history = np.zeros((1, 0, h, w, noise[0].shape[-1]), np.float32)
    out = []
    for c, draws in enumerate(noise):
        frames = (c + 1) * chunk
        block = np.arange(frames) // chunk
        mask = jnp.asarray(np.kron(block[None, :] <= block[:, None], np.ones((tokens, tokens), bool)))
        x = draws[0]
        for i, t in enumerate(steps):
            t_frames = jnp.asarray(np.concatenate([np.zeros(c * chunk), np.full(chunk, t)])[None], jnp.float32)
            flow = np.asarray(forward(params, jnp.asarray(np.concatenate([history, x], axis=1)), t_frames, cross_kv,
                                      mask))[:, -chunk:]
            x0 = (x.astype(np.float64) - sigma_of(t, shift) * flow.astype(np.float64)).astype(np.float32)
            if i + 1 < len(steps):
                s = np.float32(sigma_of(steps[i + 1], shift))
                x = (np.float32(1) - s) * x0 + s * draws[i + 1]
        out.append(x0)
        history = np.concatenate([history, x0], axis=1)
    return out


# ---------------------------------------------------------------------------------------------------
# Recipes and the rollout.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slug, t, dit", [
    (THREE_STEP, [1000.0, 757.0, 522.0], "autoregressive_checkpoint/model.pt"),
    (WARP_4STEP, [1000.0, 960.0, 888.889, 727.273], "autoregressive_checkpoint_warp_4step_cfg2/model.pt"),
])
def test_recipes_follow_upstream_configs(slug, t, dit):
    recipe = load_recipe(slug)
    schedule = recipe.block_schedules().rest
    assert (recipe.shift, recipe.chunk_frames, recipe.task, recipe.first_block_steps) == (8.0, 3, "t2v", None)
    np.testing.assert_allclose(schedule.t, t, atol=1e-3)
    np.testing.assert_allclose(schedule.t, step_list(recipe.steps, 8.0, recipe.warp), rtol=1e-6)
    sigmas = [sigma_of(v, 8.0) for v in schedule.t]
    np.testing.assert_allclose(schedule.flow_scale, sigmas, rtol=1e-6)
    np.testing.assert_allclose(schedule.noise_scale, sigmas[1:] + [0.0], rtol=1e-6)
    assert recipe.weights["dit"].repo == REPO and recipe.weights["dit"].path == dit
    assert plan_of(recipe).cache.capacity_frames + 3 == 21 == recipe.total_blocks * 3  # every latent frame kept


@pytest.mark.parametrize("slug", [THREE_STEP, WARP_4STEP])
def test_rollout_equals_the_reference_loop(slug, t2v_dit):
    dit, text = t2v_dit
    recipe = load_recipe(slug).replace(total_blocks=3, **ENGINE_SHAPE)
    plan = plan_of(recipe)
    passes = len(recipe.steps)
    rng = np.random.default_rng(4)
    noise = [rng.standard_normal((passes, *plan.chunk_shape)).astype(np.float32) for _ in range(recipe.total_blocks)]
    rollout = WorldRollout(recipe, plan, dit, latent_decoder(32, 32), seed=0)
    rollout.start(text)
    streamed = []
    for c in range(recipe.total_blocks):
        rollout.next_chunk(noise=noise[c])
        streamed.append(rollout.last_latents)
    reference = reference_rollout(dit, text, noise, recipe.steps, 8.0, recipe.warp, 3)
    for c, (ours, ref) in enumerate(zip(streamed, reference)):
        error = _relative_l2(ours, ref[0])
        assert error <= 1e-5, f"chunk {c}: relative L2 {error:.2e}"


@pytest.mark.parametrize("slug, stream", [(THREE_STEP, True), (WARP_4STEP, False)])
def test_causvid_recipe_from_the_hub(slug, stream, stand_in_hub, tmp_path, monkeypatch):
    """The 3-step recipe streams through `wm-jax run`; the warp 4-step one (the same code with another step
    list, streamed against the reference above) is downloaded, converted and loaded."""
    recipe = tiny(slug)
    hub, result = run_from_hub(recipe, stand_in_hub, tmp_path, monkeypatch, stream=stream)
    assert hub.calls == [(REPO, (recipe.weights["dit"].path,))] and hub.unmatched == []
    manifest = ckpt.read_manifest(tmp_path / "ckpt" / "dit", kind="wan_dit")
    assert "frames_per_block" not in manifest  # CausVid's file names do not tell; any recipe may load it
    if stream:
        report, compiled = result
        assert compiled == [[(3, 3)]]
        assert report["num_frames"] == 21 == video_frames(tmp_path / "out" / f"{slug}.mp4")
    else:
        assert result.dit.config.num_layers == CFG.num_layers
