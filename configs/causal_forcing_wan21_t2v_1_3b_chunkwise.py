"""Causal-Forcing (thu-ml/Causal-Forcing) chunk-wise 4-step: Wan2.1 T2V 1.3B, 3-frame chunks, Wan VAE.

Upstream `configs/causal_forcing_dmd_chunkwise.yaml`: steps [1000, 750, 500, 250] warped at shift 5
(t = 1000, 937.5, 833.33, 625), a t = 0 commit pass per chunk, every one of the 21 latent frames kept
(upstream's 32760-token cache). Upstream's README loads this checkpoint's `generator` entry.
"""

from configs.self_forcing_wan21_t2v_1_3b import get_config as self_forcing
from wm_jax.streaming.recipes import HubFiles, Recipe

REPO = "zhuhz22/Causal-Forcing"


def dit_file(path: str) -> HubFiles:
    return HubFiles(REPO, (path,), path, allow_pickle=True)


def get_config() -> Recipe:
    """Self-Forcing's recipe (same model, schedule, size, cache, text encoder and VAE) with this DiT."""
    recipe = self_forcing()
    return recipe.replace(slug="causal-forcing-wan2.1-t2v-1.3b-chunkwise",
                          weights={**recipe.weights, "dit": dit_file("chunkwise/causal_forcing.pt")})
