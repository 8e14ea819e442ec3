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
from wm_jax.streaming.recipes import load_recipe
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
    out = tmp_path / "outputs"  # created by the run, when the first file is written
    proc = subprocess.run([sys.executable, "-m", "wm_jax.cli", "run", "tiny", "--output_dir", str(out),
                           "--total_blocks", "2", "--save_latents", "--random_weights", "--attention", "auto"],
                          capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stats = json.loads((out / "stats_tiny.json").read_text())
    recipe = load_recipe("tiny")
    frames = 9 + 12  # the first chunk decodes 1 + 2x4 frames, the next 3x4
    assert proc.stdout.splitlines()[-1].startswith(
        f"wrote {out / 'tiny.mp4'} ({frames} frames, {frames / recipe.fps:.1f} s of video) and {out / 'stats_tiny.json'}")
    stages = ("loading tiny: random weights", "compiling ", "chunk 1/2: ", "chunk 2/2: ")  # and no log lines
    assert len(proc.stderr.splitlines()) == 4, proc.stderr
    assert all(line.startswith(stage) for line, stage in zip(proc.stderr.splitlines(), stages)), proc.stderr
    assert [c["index"] for c in stats["chunks"]] == [0, 1] and stats["chunks_done"] == stats["chunks_planned"] == 2
    assert stats["num_frames"] == frames and stats["video_seconds"] == frames / recipe.fps
    assert not stats["interrupted"] and stats["video"] == str(out / "tiny.mp4")
    for chunk in stats["chunks"]:
        phases = [chunk[f"{name}_ms"] for name in ("encode", "denoise", "commit", "decode")]
        assert all(ms > 0 for ms in phases) and chunk["total_ms"] == pytest.approx(sum(phases))
    assert stats["chunks"][0]["compile_ms"] > 0
    # every program compiles once, outside the phase timings
    assert all(stats["compile_seconds"][p] > 0 for p in ("denoise", "commit", "encode", "decode"))
    assert stats["compile_seconds"]["total"] == pytest.approx(sum(stats["compile_seconds"][p] for p in
                                                                  ("denoise", "commit", "encode", "decode")))
    steady = stats["steady_state"]
    assert steady["from_chunk"] == 1 and steady["num_chunks"] == 1 and steady["frames_per_chunk"] == 12
    assert steady["total_ms"] == stats["chunks"][1]["total_ms"]
    assert steady["generated_fps"] == pytest.approx(12 / steady["total_ms"] * 1e3)
    config = stats["config"]  # one meaning per key: no "steps" anywhere
    assert "steps" not in stats and "steps" not in config and config["denoising_passes"] == 4
    assert config["denoising_timesteps"] == [float(t) for t in recipe.step_schedule().t]
    assert set(stats["keys"]) and "encode_ms" in stats["keys"]
    # the attention backend: the option as given, and what it resolved to on this CPU (quietly: no log line)
    assert config["attention"] == "auto" and stats["attention"] == "xla" and "attention" in stats["keys"]
    assert (out / "tiny.mp4").stat().st_size > 1000
    assert np.load(out / "latents_tiny.npy").shape == (6, recipe.pixel_height // 8, recipe.pixel_width // 8, 16)


@pytest.mark.parametrize("changes, message", [
    (dict(pixel_height=70), "pixel_height 70: .* multiple of 16 .*use 64 or 80"),
    (dict(pixel_width=0), "pixel_width 0: expected a positive multiple of 16"),
    (dict(fps=0), "fps 0: expected a positive frame rate"),
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
    assert proc.returncode == 1 and proc.stderr == f"wm-jax: error: --output_dir {blocker / 'out'}: not writable " \
                                                   f"({blocker} is a file)\n"
