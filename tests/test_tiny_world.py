"""The shipped tiny world is a world, not noise (CPU, the shipped weights, the streaming engine as `run`).

Each rollout starts from a rendered view of the procedural world (seed 0, the shipped example's start) and
follows a camera path; the decoded frames are compared with themselves, with random weights of the same
shapes, and with the renderer's own frames of the same path. The figures go to the "measurements" section
of the test report (README quotes them).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.io.examples import SHIPPED_EXAMPLE, load_example
from wm_jax.models import camera as cam
from wm_jax.streaming.engine import WorldRollout
from wm_jax.streaming.run import RunOptions, load_parts, resolve
from wm_jax.worlds import render, scripted_trajectory

WORLD_SEED = 0
SECONDS = 3.5  # 57 frames at 16 fps: the recipe's 5 chunks


class Roller:
    """Rolls the recipe's engine along a camera path from the view the path starts at."""

    def __init__(self, random_weights: bool):
        options = RunOptions(slug="tiny", num_devices=1, random_weights=random_weights)
        self.recipe, self.plan, _ = resolve(options)
        _, parts = load_parts(self.recipe, self.plan, options, jnp.float32)
        self.rollout = WorldRollout(self.recipe, self.plan, parts.dit, parts.decoder, seed=self.recipe.seed,
                                    vae_encoder=parts.vae_encoder)
        self.text = parts.encode_prompt(self.recipe.prompt)
        self.intrinsics = load_example(SHIPPED_EXAMPLE).intrinsics[0]

    def reference(self, poses: np.ndarray) -> np.ndarray:
        """The renderer's frames of `poses`: uint8 [N, H, W, 3]."""
        k = jnp.asarray(cam.scale_intrinsics(self.intrinsics, self.plan.pixel_height, self.plan.pixel_width),
                        jnp.float32)
        frames = render(WORLD_SEED, jnp.asarray(poses), k, self.plan.pixel_height, self.plan.pixel_width)
        return np.round(np.asarray(frames) * 255).astype(np.uint8)

    def __call__(self, poses: np.ndarray, blocks: int) -> np.ndarray:
        """Decoded frames uint8 [T, H, W, 3] of `blocks` chunks along `poses`, from the rendered first view."""
        plan = self.plan
        camera = cam.StreamingCamera(self.intrinsics, plan.pixel_height, plan.pixel_width, self.recipe.world_scale)
        self.rollout.start(self.text, image=self.reference(poses[:1])[0], camera=camera)
        chunks = [self.rollout.next_chunk(poses[cam.latent_pose_frames(i, plan.chunk_frames)])[0]
                  for i in range(blocks)]
        return np.concatenate(chunks)


@pytest.fixture(scope="module")
def world():
    return Roller(random_weights=False)


def _path(*actions) -> np.ndarray:
    return scripted_trajectory(list(actions), start=load_example(SHIPPED_EXAMPLE).poses[0])


def _gray(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64).mean(axis=-1)


def horizontal_shift(a: np.ndarray, b: np.ndarray) -> float:
    """Phase correlation of two grey images [H, W]: the x shift (pixels, + = content moved right) of b vs a."""
    window = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa, fb = np.fft.fft2((a - a.mean()) * window), np.fft.fft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    surface = np.real(np.fft.ifft2(cross / np.maximum(np.abs(cross), 1e-9)))
    _, dx = np.unravel_index(np.argmax(surface), surface.shape)
    return float(dx - a.shape[1] if dx > a.shape[1] // 2 else dx)


def mean_shift(frames: np.ndarray, gap: int = 4) -> float:
    gray = _gray(frames)
    return float(np.mean([horizontal_shift(gray[i], gray[i + gap]) for i in range(0, len(gray) - gap, gap)]))


def zoom(a: np.ndarray, b: np.ndarray) -> float:
    """The magnification s in [1, 1.5] about the image centre that best maps grey image a onto b."""
    from PIL import Image

    h, w = a.shape
    ch, cw = h // 2, w // 2
    target = b[h // 4: h // 4 + ch, w // 4: w // 4 + cw]
    best, best_error = 1.0, np.inf
    for s in np.linspace(1.0, 1.5, 26):
        sh, sw = ch / s, cw / s
        box = (w / 2 - sw / 2, h / 2 - sh / 2, w / 2 + sw / 2, h / 2 + sh / 2)
        crop = np.asarray(Image.fromarray(a.astype(np.float32)).resize((cw, ch), Image.BILINEAR, box=box))
        error = np.mean((crop - target) ** 2)
        if error < best_error:
            best, best_error = float(s), error
    return best


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def test_frames_are_smooth_unlike_random_weights(world, record_measurement):
    path = load_example(SHIPPED_EXAMPLE).poses
    blocks = world.plan.total_blocks
    ours = world(path, blocks)
    noise = Roller(random_weights=True)(path, blocks)
    step = lambda v: float(np.mean(np.abs(np.diff(v.astype(np.float64), axis=0))))
    ours_diff, noise_diff, render_diff = step(ours), step(noise), step(world.reference(path[:len(ours)]))
    record_measurement(f"tiny world: mean |frame difference| {ours_diff:.2f} (renderer {render_diff:.2f}, random "
                       f"weights {noise_diff:.2f}) over {len(ours)} frames, uint8 levels")
    assert ours_diff < 0.35 * noise_diff
    assert ours_diff < 3 * render_diff + 2


def test_yaw_right_and_left_shift_the_view_opposite_ways(world, record_measurement):
    right = world(_path((SECONDS, 0, 0, 1, 0)), 3)
    left = world(_path((SECONDS, 0, 0, -1, 0)), 3)
    expected = mean_shift(world.reference(_path((SECONDS, 0, 0, 1, 0))[:len(right)]))
    shift_right, shift_left = mean_shift(right), mean_shift(left)
    record_measurement(f"tiny world: yaw right moves the view {shift_right:+.1f} px per 4 frames, yaw left "
                       f"{shift_left:+.1f} px (renderer, right: {expected:+.1f} px)")
    assert shift_right < -2 and shift_left > 2  # turning right moves the content left, and the reverse
    assert abs(shift_right - expected) < 0.5 * abs(expected)


def test_walking_forward_enlarges_the_centre(world, record_measurement):
    path = _path((SECONDS, 1, 0, 0, 0))
    frames = _gray(world(path, 3))
    rendered = _gray(world.reference(path[:len(frames)]))
    ours, expected = zoom(frames[4], frames[-1]), zoom(rendered[4], rendered[-1])
    still = zoom(frames[-9], frames[-1])
    record_measurement(f"tiny world: walking forward {len(frames) - 5} frames enlarges the centre x{ours:.2f} "
                       f"(renderer x{expected:.2f})")
    assert ours > 1.04 and expected > 1.04  # the centre grows, as it does in the renderer's frames
    assert still < ours


def test_decoded_frames_stay_close_to_the_renderer(world, record_measurement):
    path = load_example(SHIPPED_EXAMPLE).poses
    frames = world(path, 2)
    rendered = world.reference(path[:len(frames)])
    first, per_chunk = psnr(frames[:1], rendered[:1]), [psnr(frames[a:b], rendered[a:b]) for a, b in ((0, 9), (9, 21))]
    record_measurement(f"tiny world: PSNR against the renderer, first frame {first:.1f} dB, chunks 1-2 "
                       f"{per_chunk[0]:.1f} / {per_chunk[1]:.1f} dB")
    assert first > 22 and min(per_chunk) > 18


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_damaged_shipped_weights_are_named_with_the_restoring_command(damage, tmp_path, monkeypatch):
    import shutil

    from wm_jax.io import shipped
    from wm_jax.io.safetensors_io import CheckpointError
    from wm_jax.streaming.run import run

    assets = tmp_path / "assets"
    shutil.copytree(shipped.shipped_dir("tiny_world"), assets / "tiny_world")
    weights = assets / "tiny_world" / "vae.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    monkeypatch.setattr(shipped, "ASSETS", assets)
    with pytest.raises(CheckpointError, match=f"{weights}: {damage} shipped weights.*git checkout HEAD"):
        run(RunOptions(slug="tiny", num_devices=1, output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
