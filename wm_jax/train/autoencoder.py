"""Stage 1: the recipe's Wan-VAE-shaped encoder/decoder pair, trained as an autoencoder on rendered clips.

Each step renders `batch` clips of `clip_latents` latent frames (1 + 4(n-1) pixel frames, random windows of
the trajectory pool, each clip in its own world), encodes them whole with the causal encoder (μ only, no
sampling) and decodes them whole with the causal decoder — the same causal convolutions the streaming
engine runs chunk by chunk, which give the same frames. Loss: L1 + L2 on pixels + `latent_penalty`·mean(μ²).
After training, the latent statistics are measured and stored as the VAE's `latent_mean` / `latent_std`, so
the world model sees unit-variance latents.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.models import wan_vae
from wm_jax.models.wan_vae import WanVAE, WanVAEConfig
from wm_jax.train.config import AutoencoderTraining
from wm_jax.train.data import ClipGeometry, render_clips


def untrained_vae(vae_config: dict, seed: int) -> WanVAE:
    """The recipe's VAE with zero latent statistics (mean 0, std 1) until `normalise_latents`."""
    config = WanVAEConfig(**vae_config)
    config = dataclasses.replace(config, latent_mean=(0.0,) * config.z_dim, latent_std=(1.0,) * config.z_dim)
    return WanVAE(config, rngs=nnx.Rngs(seed))


def sample_clips(key: jax.Array, seeds: jax.Array, pool: jax.Array, batch: int, num_frames: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Random windows of `num_frames` poses from the pool (world seeds [P], poses [P, F, 4, 4]) ->
    (world seeds [B], poses [B, T, 4, 4])."""
    k_clip, k_start = jax.random.split(key)
    clip = jax.random.randint(k_clip, (batch,), 0, pool.shape[0])
    start = jax.random.randint(k_start, (batch,), 0, pool.shape[1] - num_frames + 1)
    poses = jax.vmap(lambda c, s: jax.lax.dynamic_slice_in_dim(pool[c], s, num_frames))(clip, start)
    return seeds[clip], poses


def loss_fn(hparams: AutoencoderTraining, geometry: ClipGeometry, seeds: jax.Array, pool: jax.Array):
    """(vae, key) -> (loss, metrics): one batch rendered, encoded and decoded whole."""
    num_frames = geometry.pixel_frames(hparams.clip_latents)

    def loss(vae: WanVAE, key: jax.Array):
        clip_seeds, poses = sample_clips(key, seeds, pool, hparams.batch, num_frames)
        video = render_clips(clip_seeds, poses, geometry)
        mu = vae.encode(video, jit=False)
        cache = vae.init_decoder_cache(video.shape[0], mu.shape[2], mu.shape[3])
        frames, _ = wan_vae.decode_chunk(vae, mu, cache, clamp=False)
        error = frames - video
        l1, l2 = jnp.mean(jnp.abs(error)), jnp.mean(error**2)
        latent = jnp.mean(mu**2)
        return l1 + l2 + hparams.latent_penalty * latent, {"l1": l1, "psnr": _psnr(frames, video),
                                                          "latent_rms": jnp.sqrt(latent)}

    return loss


def _psnr(frames: jax.Array, target: jax.Array) -> jax.Array:
    """PSNR in dB of frames in [-1, 1] (peak-to-peak 2)."""
    mse = jnp.mean((jnp.clip(frames, -1.0, 1.0) - target) ** 2)
    return 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-12))


def normalise_latents(vae: WanVAE, geometry: ClipGeometry, seeds: jax.Array, pool: jax.Array, key: jax.Array,
                      *, batches: int = 8, batch: int = 16, clip_latents: int = 4) -> WanVAE:
    """Measures the per-channel mean / std of μ on rendered clips and stores them in the VAE's config (its
    encoder then returns (μ − mean) / std, its decoder undoes it); returns the same module."""
    num_frames = geometry.pixel_frames(clip_latents)

    @jax.jit
    def moments(key):
        clip_seeds, poses = sample_clips(key, seeds, pool, batch, num_frames)
        mu = vae.encode(render_clips(clip_seeds, poses, geometry), jit=False)
        return jnp.mean(mu, axis=(0, 1, 2, 3)), jnp.mean(mu**2, axis=(0, 1, 2, 3))

    firsts, seconds = zip(*(moments(k) for k in jax.random.split(key, batches)))
    mean = np.mean(np.stack(firsts), axis=0)
    std = np.sqrt(np.maximum(np.mean(np.stack(seconds), axis=0) - mean**2, 1e-8))
    config = dataclasses.replace(vae.config, latent_mean=tuple(float(v) for v in mean),
                                 latent_std=tuple(float(v) for v in std))
    vae.config, vae.latent_mean, vae.latent_std = config, config.latent_mean, config.latent_std
    return vae
