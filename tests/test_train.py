"""Training: the teacher-forcing sequence is the streaming rollout, the data is the engine's, one step runs.

- The doubled [clean ; noisy] sequence under the teacher-forcing mask gives, for every noisy chunk, the
  flow of that chunk evaluated after the clean chunks before it under the cache's own mask (which
  `CacheLayout.visible_frames` states equals the streamed rollout): what is trained is what streams.
- Camera maps built on the device for training equal the engine's `StreamingCamera` maps.
- `wm-jax train` smoke: one step of each stage on the CPU, export, the export loads as the recipe's shipped
  weights; a second run resumes from the checkpoints; bad overrides are refused by name.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wm_jax.models import camera as cam
from wm_jax.models.config import WanConfig
from wm_jax.models.wan import WanModel
from wm_jax.streaming.kv_cache import CacheLayout
from wm_jax.train import data, world_model
from wm_jax.train.config import TrainConfig, apply_overrides, load_config
from wm_jax.worlds import player_trajectory

CONFIG = "configs/train_tiny_world.py"


def _small_model(camera_channels=0):
    cfg = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=20, out_dim=16, text_dim=32, text_len=16,
                    camera_channels=camera_channels)
    return WanModel(cfg, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("sink, ring, shift", [(3, 3, 0), (3, 6, 5), (0, 3, 0)])
def test_teacher_forcing_equals_chunk_after_its_context(sink, ring, shift):
    rng = np.random.default_rng(0)
    model = _small_model()
    cf, chunks, h, w = 3, 4, 4, 6
    frames = cf * chunks
    layout = CacheLayout(tokens_per_frame=(h // 2) * (w // 2), sink_frames=sink, ring_frames=ring, chunk_frames=cf)
    clean = jnp.asarray(rng.standard_normal((1, frames, h, w, 20)), jnp.float32)
    noisy = jnp.asarray(rng.standard_normal((1, frames, h, w, 20)), jnp.float32)
    t_noisy = jnp.asarray(np.repeat(rng.choice([999.0, 947.0, 825.0], chunks), cf)[None], jnp.float32)
    cross = model.cross_kv(model.embed_text(jnp.asarray(rng.standard_normal((1, 5, 32)), jnp.float32)))
    offsets = np.where(np.arange(frames) < cf, 0, shift * cf)

    mask = world_model.token_mask(world_model.teacher_forcing_mask(layout, frames), layout.tokens_per_frame)
    doubled, _ = model.forward_with_cross_kv(
        jnp.concatenate([clean, noisy], 1), jnp.concatenate([jnp.zeros_like(t_noisy), t_noisy], 1), cross,
        frame_offset=jnp.asarray(np.concatenate([offsets, offsets - frames])), attention_mask=jnp.asarray(mask))

    visible = layout.visible_frames(frames)
    for c in range(chunks):
        end = (c + 1) * cf
        x = jnp.concatenate([clean[:, :c * cf], noisy[:, c * cf:end]], 1)
        t = jnp.concatenate([jnp.zeros((1, c * cf)), t_noisy[:, c * cf:end]], 1)
        reference, _ = model.forward_with_cross_kv(
            x, t, cross, frame_offset=jnp.asarray(offsets[:end]),
            attention_mask=jnp.asarray(world_model.token_mask(visible[:end, :end], layout.tokens_per_frame)))
        got = doubled[:, frames + c * cf: frames + end]
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference[:, c * cf:]), rtol=2e-5, atol=2e-5)


def test_training_camera_maps_equal_the_engines():
    poses = player_trajectory(5, 1 + 4 * 8, 16)
    intrinsics = (503.0, 503.0, 416.0, 240.0)
    geometry = data.ClipGeometry(64, 112, 3, 1.2712, intrinsics, 16, 1)
    rel = data.latent_relative_poses(poses, 9, 3, geometry.world_scale)
    ours = np.asarray(data.camera_maps(jnp.asarray(rel)[None], geometry))[0]
    stream = cam.StreamingCamera(np.asarray(intrinsics), 64, 112, geometry.world_scale)
    engine = np.concatenate([stream.next_chunk(poses[cam.latent_pose_frames(i, 3)]) for i in range(3)])
    assert ours.shape == engine.shape == (9, 8, 14, 384)
    np.testing.assert_allclose(ours, engine, atol=2e-5)


def test_overrides_name_the_field():
    config = load_config(CONFIG)
    changed = apply_overrides(config, ["world_model.steps=7", "autoencoder.learning_rate=0.01", "seed=3"])
    assert (changed.world_model.steps, changed.autoencoder.learning_rate, changed.seed) == (7, 0.01, 3)
    for bad, words in [("world_model.stepz=1", "no field 'stepz'"), ("world_model=3", "name a field inside"),
                       ("world_model.steps=0", "positive"), ("world_model.steps=abc", "expected a number"),
                       ("steps", "KEY=VALUE")]:
        with pytest.raises(Exception, match=words):
            apply_overrides(config, [bad])
    assert isinstance(config, TrainConfig)


SMOKE = ["autoencoder.steps={ae}", "autoencoder.batch=1", "autoencoder.clip_latents=2", "autoencoder.stats_batches=1",
         "world_model.steps={wm}", "world_model.batch=1", "world_model.pool_clips=2", "world_model.clip_chunks=2",
         "checkpoint_every=1", "log_every=1"]


def _train(workdir, export, ae, wm):
    args = [a.format(ae=ae, wm=wm) for a in SMOKE]
    command = [sys.executable, "-m", "wm_jax.cli", "train", CONFIG, "--workdir", str(workdir), "--export", str(export),
               *[x for a in args for x in ("--override", a)]]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_train_smoke_exports_resumes_and_loads(tmp_path):
    workdir, export = tmp_path / "run", tmp_path / "world"
    first = _train(workdir, export, 1, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained tiny_world" in first.stdout and "exported" in first.stdout
    manifest = json.loads((export / "world.json").read_text())
    assert set(manifest["components"]) == {"dit", "vae"}
    log = [json.loads(line) for line in (workdir / "world_model" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 1 and np.isfinite(log[-1]["loss"])

    second = _train(workdir, export, 1, 2)  # the finished autoencoder restored, one more world-model step
    assert second.returncode == 0, second.stderr[-3000:]
    assert "autoencoder: resumed from step 1" in second.stdout and "world_model: resumed from step 1" in second.stdout
    log = [json.loads(line) for line in (workdir / "world_model" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2]

    # the export is a shipped world the engine loads for the recipe
    from wm_jax.io.shipped import read_shipped
    world = read_shipped(export)
    params = world.params("dit")
    assert all(np.isfinite(v.astype(np.float32)).all() for v in params.values())
