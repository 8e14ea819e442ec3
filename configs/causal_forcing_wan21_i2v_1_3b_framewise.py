"""Causal-Forcing frame-wise image-to-video (`inference.py --i2v`): the frame-wise T2V checkpoint; the start
image's Wan VAE latent is committed at t = 0 as latent frame 0 and shown as the first video frame, then 20
frames are generated from frame 1 (21 AR steps in all: the image, then the 4-step blocks). The run needs a
start image (its own, or the example data's)."""

from configs.causal_forcing_wan21_t2v_1_3b_framewise import get_config as framewise


def get_config():
    return framewise().replace(slug="causal-forcing-wan2.1-i2v-1.3b-framewise", task="i2v_first_latent")
