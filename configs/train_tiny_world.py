"""Trains the `tiny` recipe's shipped world: a Wan-VAE-shaped autoencoder, then the camera-conditioned DiT.

    wm-jax train configs/train_tiny_world.py --workdir runs/tiny_world --export wm_jax/assets/tiny_world

Every shape (resolution, model, VAE, chunk, cache window, schedule) comes from the `tiny` recipe.
"""

from wm_jax.train.config import AutoencoderTraining, TrainConfig, WorldModelTraining


def get_config() -> TrainConfig:
    return TrainConfig(
        name="tiny_world",
        recipe="tiny",
        seed=0,
        autoencoder=AutoencoderTraining(steps=2600, batch=8, clip_latents=4, learning_rate=1e-3),
        world_model=WorldModelTraining(steps=8000, batch=32, pool_clips=4096, clip_chunks=5, learning_rate=3e-4),
    )
