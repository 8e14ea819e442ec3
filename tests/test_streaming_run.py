"""The streaming engine end to end on the tiny recipe: no recompiles, uint8 frames, the CLI run, bad input."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from wm_jax.io import examples
from wm_jax.io.video import to_uint8
from wm_jax.models import camera as cam
from tests.conftest import plan_of
from wm_jax.streaming.engine import WorldRollout
from wm_jax.streaming.run import RunOptions, resolve


def test_rollout_compiles_once_including_ring_wraparound(tiny_parts):
    recipe, parts = tiny_parts
    recipe = recipe.replace(total_blocks=6)  # sink 3 + ring 3: the ring wraps 4 times
    rollout = WorldRollout(recipe, plan_of(recipe), parts.dit, parts.decoder, seed=0, vae_encoder=parts.vae_encoder)
    scene = examples.load_example(examples.SHIPPED_EXAMPLE)
    camera = cam.StreamingCamera(scene.intrinsics[0], recipe.pixel_height, recipe.pixel_width)
    image = np.asarray(__import__("PIL.Image").Image.fromarray(scene.image).resize((recipe.pixel_width,
                                                                                 recipe.pixel_height)))
    rollout.start(parts.encode_prompt("a road"), image=image, camera=camera)
    decoded = []  # the decoder's float frames, recorded on their way to the on-device uint8 conversion

    def recording_step(z, state, step=rollout.decoder.step):
        frames, state = step(z, state)
        decoded.append(np.asarray(frames, np.float32)[0])
        return frames, state

    rollout.decoder = dataclasses.replace(rollout.decoder, step=recording_step)
    poses = np.concatenate([scene.poses, np.repeat(scene.poses[-1:], 80, axis=0)])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    for index in range(recipe.total_blocks):
        if index == 2:
            compiles.clear()  # chunks 0 and 1 compile the first-chunk and steady decoder/encoder variants
        last = index == recipe.total_blocks - 1
        frames, stats = rollout.next_chunk(poses[cam.latent_pose_frames(index)], float_frames=last)
        assert frames.shape == (9 if index == 0 else 12, recipe.pixel_height, recipe.pixel_width, 3)
        if last:
            np.testing.assert_array_equal(frames, decoded[-1])
        else:  # uint8 on the device == the host conversion of the float frames, bit for bit
            assert frames.dtype == np.uint8 and np.all(np.isfinite(decoded[-1]))
            np.testing.assert_array_equal(frames, to_uint8(decoded[-1], rollout.decoder.value_range))
    assert compiles == [], f"recompiled during the steady rollout: {len(compiles)} compilations"
    assert int(rollout.state.cache.committed_frames) == 18


def test_cli_run_tiny_writes_video_and_stats(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wm_jax.cli", "run", "tiny", "--output_dir", str(tmp_path),
                           "--total_blocks", "2", "--save_latents"], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((tmp_path / "stats_tiny.json").read_text())
    assert [s["autoregressive_index"] for s in stats["steps"]] == [0, 1]
    assert stats["num_frames"] == 21 and stats["compile_seconds"] > 0
    assert all(s["denoise_ms"] > 0 and s["decode_ms"] > 0 for s in stats["steps"])
    assert (tmp_path / "tiny.mp4").stat().st_size > 1000
    assert np.load(tmp_path / "latents_tiny.npy").shape == (6, 8, 12, 16)


@pytest.mark.parametrize("changes, message", [
    (dict(pixel_height=70), "pixel_height 70: .* multiple of 16 .*use 64 or 80"),
    (dict(total_blocks=2_000_000), "past the 4194304 RoPE positions.*total_blocks 1398101"),
])
def test_bad_run_options(changes, message):
    with pytest.raises(ValueError, match=message):
        resolve(RunOptions(slug="tiny", **changes))


def test_unwritable_output_dir_fails_before_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-m", "wm_jax.cli", "run", "tiny", "--output_dir", str(blocker / "out")],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1 and "not writable" in proc.stderr
