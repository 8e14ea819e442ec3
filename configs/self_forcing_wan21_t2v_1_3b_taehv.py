"""Self-Forcing 1.3B with the TAEHV decoder (madebyollin `taew2_1`, takes the DiT's latents as is)."""

from configs.self_forcing_wan21_t2v_1_3b import get_config as base
from wm_jax.streaming.recipes import HubFiles


def get_config():
    recipe = base()
    weights = dict(recipe.weights)
    weights.pop("vae")
    weights["decoder"] = HubFiles("madebyollin/taehv", ("taew2_1.pth",), "taew2_1.pth", allow_pickle=True)
    return recipe.replace(slug="self-forcing-wan2.1-t2v-1.3b-taehv", decoder="taehv", weights=weights)
