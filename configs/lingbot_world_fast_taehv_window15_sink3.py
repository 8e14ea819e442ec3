"""LingBot-World Fast with TAEHV and a bounded cache: 3 sink frames (chunk 0, the image frame) plus a
15-frame window that includes the current chunk (18 visible latent frames, steady from chunk 6)."""

from configs.lingbot_world_fast import get_config as base
from wm_jax.streaming.recipes import HubFiles


def get_config():
    recipe = base()
    weights = dict(recipe.weights)
    weights["decoder"] = HubFiles("madebyollin/taehv", ("taew2_1.pth",), "taew2_1.pth", allow_pickle=True)
    return recipe.replace(slug="lingbot-world-fast-taehv-window15-sink3", decoder="taehv", sink_frames=3,
                          window_frames=15, weights=weights)
