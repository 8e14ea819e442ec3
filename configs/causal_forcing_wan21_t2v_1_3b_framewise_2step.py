"""Causal-Forcing++ frame-wise 2-step: block 0 runs the 4-step list, every later block [1000, 500]
(warped at shift 5: t = 1000, 833.33). Upstream `configs/causal_forcing_dmd_framewise_2step.yaml`
(`denoising_step_list_first_chunk`); two denoise programs (4 and 2 passes)."""

from configs.causal_forcing_wan21_t2v_1_3b_chunkwise import dit_file
from configs.causal_forcing_wan21_t2v_1_3b_framewise import get_config as framewise


def get_config():
    recipe = framewise()
    return recipe.replace(slug="causal-forcing-wan2.1-t2v-1.3b-framewise-2step", steps=(1000, 500),
                          first_block_steps=(1000, 750, 500, 250),
                          weights={**recipe.weights, "dit": dit_file("causal-forcing++/framewise-2step.pt")})
