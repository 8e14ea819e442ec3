"""Causal-Forcing frame-wise 4-step: one latent frame per AR step (21 steps, 81 video frames).

Upstream `configs/causal_forcing_dmd_framewise.yaml`: the chunk-wise schedule with `num_frame_per_block: 1`;
the 21-frame window holds all 21 latent frames (upstream's 32760-token cache); EMA weights.
"""

from configs.causal_forcing_wan21_t2v_1_3b_chunkwise import dit_file
from configs.causal_forcing_wan21_t2v_1_3b_chunkwise import get_config as chunkwise


def get_config():
    recipe = chunkwise()
    return recipe.replace(slug="causal-forcing-wan2.1-t2v-1.3b-framewise", chunk_frames=1, total_blocks=21,
                          weights={**recipe.weights, "dit": dit_file("framewise/causal_forcing.pt")})
