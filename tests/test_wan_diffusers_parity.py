"""Our WanModel vs diffusers WanTransformer3DModel on the same ORIGINAL-layout random weights.

CPU, float32, tiny configs with head_dim 128 (so RoPE's real 44/42/42 split is exercised).
Tolerance: 1e-5 relative L2.
"""

import numpy as np
import pytest
import torch

from converters import wan_dit
from wm_jax.io.tensor_sources import ArraySource
from wm_jax.models.config import CLIP_DIM, WanConfig
from wm_jax.parity import relative_l2
from tests.wan_testlib import TINY, diffusers_model, random_original_state

TOLERANCE = 1e-5
CASES = {
    "t2v": WanConfig(**TINY),
    "i2v_clip": WanConfig(**TINY, in_dim=36, image_dim=CLIP_DIM),
    "ti2v_5b_shaped": WanConfig(**TINY, in_dim=48, out_dim=48),
}


def _inputs(cfg: WanConfig, seed: int, frames=3, height=4, width=6, text_tokens=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, frames, height, width, cfg.in_dim)).astype(np.float32)
    context = rng.standard_normal((1, text_tokens, cfg.text_dim)).astype(np.float32)
    clip = rng.standard_normal((1, 257, CLIP_DIM)).astype(np.float32) if cfg.image_dim else None
    return x, context, clip


def _diffusers_forward(model, cfg, x, t, context, clip):
    padded = np.zeros((1, cfg.text_len, cfg.text_dim), np.float32)
    padded[:, : context.shape[1]] = context
    with torch.no_grad():
        out = model(hidden_states=torch.from_numpy(np.moveaxis(x, -1, 1).copy()), timestep=torch.as_tensor(t),
                    encoder_hidden_states=torch.from_numpy(padded),
                    encoder_hidden_states_image=None if clip is None else torch.from_numpy(clip),
                    return_dict=False)[0]
    return np.moveaxis(out.numpy(), 1, -1)  # [B, C, F, H, W] -> [B, F, H, W, C]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_diffusers(name):
    cfg = CASES[name]
    state = random_original_state(cfg, seed=1)
    reference = diffusers_model(cfg, state)
    ours = wan_dit.load_source(ArraySource(state), attention_impl="xla")
    x, context, clip = _inputs(cfg, seed=2)
    for t in (999, 500, 0):
        ref = _diffusers_forward(reference, cfg, x, np.array([t]), context, clip)
        out = np.asarray(ours(x, np.array([t]), context, image_tokens=clip))
        err = relative_l2(out, ref)
        assert err <= TOLERANCE, f"{name} t={t}: relative L2 {err:.2e}"


def test_per_frame_timesteps_match_diffusers_per_token():
    """Wan2.2 TI2V-style timesteps (first latent frame clean, t=0): ours per frame, diffusers per token."""
    cfg = CASES["ti2v_5b_shaped"]
    state = random_original_state(cfg, seed=3)
    reference = diffusers_model(cfg, state)
    ours = wan_dit.load_source(ArraySource(state), attention_impl="xla")
    x, context, _ = _inputs(cfg, seed=4)
    frames, tokens_per_frame = x.shape[1], (x.shape[2] // 2) * (x.shape[3] // 2)
    t_frames = np.array([[0, 750, 750]])
    ref = _diffusers_forward(reference, cfg, x, np.repeat(t_frames, tokens_per_frame, axis=1), context, None)
    out = np.asarray(ours(x, t_frames, context))
    assert relative_l2(out, ref) <= TOLERANCE
    # and the frames really are conditioned differently
    uniform = np.asarray(ours(x, np.array([750]), context))
    assert relative_l2(out, uniform) > 1e-3
