"""FastVideo's causal Wan2.2 A14B image-to-video (`CausalWan2.2-I2V-A14B-Preview`): the T2V sampler of
`causal_wan22_t2v_a14b` on the I2V-trained experts (16 input channels: no image channels). The start
image's Wan VAE latent is committed at t = 0 into both experts' caches as latent frame 0 and shown as
the first video frame; generation continues from frame 1 in 3-frame blocks (FastVideo drops the 1-frame
block). The run needs a start image (its own, or the example data's)."""

from configs.causal_wan22_t2v_a14b import EXPERT_FILES, get_config as t2v
from wm_jax.streaming.recipes import HubFiles


def get_config():
    recipe = t2v()
    return recipe.replace(slug="causal-wan2.2-i2v-a14b", task="i2v_first_latent",
                          prompt="The camera slowly pushes in as the scene comes to life.",
                          weights={**recipe.weights,
                                   "dit": HubFiles("FastVideo/CausalWan2.2-I2V-A14B-Preview-Diffusers", EXPERT_FILES)})
