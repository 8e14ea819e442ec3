"""CausVid (tianweiy/CausVid) autoregressive 3-step: Wan2.1 T2V 1.3B, 3-frame chunks, Wan VAE.

Upstream `configs/wan_causal_dmd.yaml` with the released `autoregressive_checkpoint/model.pt` (`generator`):
steps [1000, 757, 522] fed unwarped (`warp_denoising_step: false`), σ looked up in the shift-8 table
(the wrapper hard-codes shift 8), a t = 0 commit pass per chunk, all 21 latent frames kept.
"""

from configs.self_forcing_wan21_t2v_1_3b import get_config as self_forcing
from wm_jax.streaming.recipes import HubFiles, Recipe

REPO = "tianweiy/CausVid"


def dit_file(path: str) -> HubFiles:
    return HubFiles(REPO, (path,), path, allow_pickle=True)


def get_config() -> Recipe:
    """Self-Forcing's recipe (same model, size, cache, text encoder and VAE) with CausVid's schedule and DiT."""
    recipe = self_forcing()
    return recipe.replace(slug="causvid-wan2.1-t2v-1.3b", shift=8.0, steps=(1000, 757, 522), warp=False,
                          weights={**recipe.weights, "dit": dit_file("autoregressive_checkpoint/model.pt")})
