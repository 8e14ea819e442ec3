"""`wm-jax train <config>`: the whole job — trajectories, autoencoder, latent pool, world model, export.

    stage 0  draw `pool_clips` player trajectories (host) and a world seed per clip
    stage 1  autoencoder (`wm_jax.train.autoencoder`), then its latent statistics
    stage 2  encode the pool once; world model (`wm_jax.train.world_model`)
    export   the recipe's shipped world (`wm_jax.io.shipped`): dit + vae safetensors and world.json

Every stage resumes from its checkpoints under `workdir`; a finished stage is restored, not retrained.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.io.checkpoint import flat_params
from wm_jax.io.shipped import write_shipped
from wm_jax.models.wan import WanModel
from wm_jax.parallel.mesh import make_mesh
from wm_jax.streaming.components import model_config
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.recipes import Recipe, load_recipe
from wm_jax.train import autoencoder, world_model
from wm_jax.train.config import TrainConfig
from wm_jax.train.data import ClipGeometry, latent_relative_poses, trajectory_pool
from wm_jax.train.loop import fit


def _check_recipe(recipe: Recipe) -> None:
    if recipe.task != "i2v_camera" or recipe.decoder != "wan_vae":
        raise ValueError(f"recipe {recipe.slug}: this trainer makes camera-conditioned image-to-video worlds with a "
                         f"Wan VAE (task i2v_camera, decoder wan_vae); the recipe has {recipe.task} / {recipe.decoder}")


def _intrinsics(config: TrainConfig) -> tuple[float, ...]:
    if config.intrinsics is not None:
        return tuple(config.intrinsics)
    from wm_jax.io.examples import SHIPPED_EXAMPLE, load_example

    return tuple(float(v) for v in load_example(SHIPPED_EXAMPLE).intrinsics[0])


def train(config: TrainConfig, workdir: str | Path, *, export: str | Path | None = None,
          print_fn: Callable[[str], None] = print) -> dict:
    """Runs (or resumes) every stage; returns the training summary (also in the export's world.json)."""
    recipe = load_recipe(config.recipe)
    _check_recipe(recipe)
    workdir = Path(workdir)
    hp_ae, hp_wm = config.autoencoder, config.world_model
    dit_config = model_config(recipe)
    plan = RolloutPlan.for_recipe(recipe.replace(total_blocks=hp_wm.clip_chunks), dit_config, make_mesh(1))
    geometry = ClipGeometry(plan.pixel_height, plan.pixel_width, plan.chunk_frames, recipe.world_scale,
                            _intrinsics(config), recipe.fps, config.supersample)
    num_latents = plan.latent_frames
    device = jax.devices()[0].device_kind
    summary = {"config": config.to_dict(), "recipe": recipe.slug, "device_kind": device, "jax": jax.__version__,
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}

    start = time.perf_counter()
    print_fn(f"drawing {hp_wm.pool_clips} player trajectories of {plan.pixel_frames} frames")
    world_seeds, poses = _trajectories(workdir, config.seed, hp_wm.pool_clips, plan.pixel_frames, geometry.fps)
    pool_seeds, pool_poses = jnp.asarray(world_seeds), jnp.asarray(poses)
    summary["trajectory_seconds"] = round(time.perf_counter() - start, 1)

    vae = autoencoder.untrained_vae(recipe.vae_config, config.seed)
    common = dict(workdir=workdir, checkpoint_every=config.checkpoint_every, log_every=config.log_every,
                  print_fn=print_fn)
    start = time.perf_counter()
    summary["autoencoder"] = fit("autoencoder", vae, autoencoder.loss_fn(hp_ae, geometry, pool_seeds, pool_poses),
                                 steps=hp_ae.steps, learning_rate=hp_ae.learning_rate,
                                 warmup_steps=hp_ae.warmup_steps, seed=config.seed,
                                 describe=f"batch {hp_ae.batch} clips of {hp_ae.clip_latents} latents", **common)
    autoencoder.normalise_latents(vae, geometry, pool_seeds, pool_poses, jax.random.key(config.seed + 2),
                                  batches=hp_ae.stats_batches, batch=hp_ae.batch,
                                  clip_latents=hp_ae.clip_latents)
    summary["autoencoder_seconds"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    print_fn(f"encoding {hp_wm.pool_clips} clips of {num_latents} latent frames")
    pool = world_model.encode_pool(vae, poses, world_seeds, geometry)
    pool["rel_poses"] = jnp.asarray(np.stack([latent_relative_poses(p, num_latents, geometry.chunk_frames,
                                                                    geometry.world_scale) for p in poses]))
    dit = WanModel(dit_config, rngs=nnx.Rngs(config.seed + 3))
    loss = world_model.loss_fn(hp_wm, geometry, plan.cache, recipe.step_schedule(), pool)
    summary["world_model"] = fit("world_model", dit, loss, steps=hp_wm.steps, learning_rate=hp_wm.learning_rate,
                                 warmup_steps=hp_wm.warmup_steps, seed=config.seed + 4,
                                 describe=f"batch {hp_wm.batch} clips of {hp_wm.clip_chunks} chunks", **common)
    summary["world_model_seconds"] = round(time.perf_counter() - start, 1)
    summary["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    if export:
        folder = write_shipped(export, {
            "dit": ("wan_dit", dit_config.to_dict(), _host(flat_params(dit))),
            "vae": ("wan_vae", vae.config.to_dict(), _host(flat_params(vae))),
        }, training=summary)
        print_fn(f"exported {folder}")
    return summary


def _trajectories(workdir: Path, seed: int, count: int, num_frames: int, fps: int) -> tuple[np.ndarray, np.ndarray]:
    """`trajectory_pool`, kept in `workdir/trajectories.npz` (drawn on the host once, reused on resume)."""
    path = workdir / "trajectories.npz"
    key = np.array([seed, count, num_frames, fps])
    if path.is_file():
        with np.load(path) as saved:
            if np.array_equal(saved["key"], key):
                return saved["world_seeds"], saved["poses"]
    world_seeds, poses = trajectory_pool(seed, count, num_frames, fps)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".trajectories.partial.npz")
    np.savez(tmp, key=key, world_seeds=world_seeds, poses=poses)
    tmp.rename(path)
    return world_seeds, poses


def _host(flat: dict) -> dict[str, np.ndarray]:
    return {name: np.asarray(jax.device_get(value)) for name, value in flat.items()}
