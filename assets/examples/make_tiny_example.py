"""Generates `assets/examples/tiny/`, the small example scene wm_jax ships for offline use.

Everything comes from this project's procedural world (`wm_jax.worlds`, seed 0): the first view of a
57-frame walk (forward, a turn to the right, forward again) at 64x112 (H x W), the walk's camera poses,
constant LingBot-style intrinsics for a 480x832 frame, and a prompt describing the world. The image is
rendered with those intrinsics scaled to 64x112 (`wm_jax.models.camera.scale_intrinsics`), as the engine
scales them to its video size. Same layout as LingBot's example folders:

  image.jpg        RGB, 112 wide x 64 high
  poses.npy        [57, 4, 4] float32 camera-to-world, OpenCV axes (x right, y down, z forward)
  intrinsics.npy   [57, 4] float32 (fx, fy, cx, cy) in pixels of a 480x832 frame
  prompt.txt

Run `python assets/examples/make_tiny_example.py` to regenerate (deterministic).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wm_jax.models.camera import scale_intrinsics
from wm_jax.worlds import CLEARANCE, body_clearance, clear_start, render, scripted_trajectory

OUT_DIR = Path(__file__).resolve().parent / "tiny"
HEIGHT, WIDTH = 64, 112
SEED = 0
FPS = 16
WALK = [  # (seconds, forward, strafe, yaw, pitch) at the live controls' speeds times these factors
    (1.25, 1.5, 0.0, 0.0, 0.0),  # walk forward 1.5 units
    (1.0, 0.0, 0.0, 1.5, 0.0),  # turn right 48 degrees
    (1.25, 1.5, 0.0, 0.0, 0.0),  # walk forward 1.5 units
]
NUM_FRAMES = 1 + sum(round(seconds * FPS) for seconds, *_ in WALK)  # the start, then one pose per frame
INTRINSICS = (503.0, 503.0, 416.0, 240.0)  # fx, fy, cx, cy for 480x832

PROMPT = (
    "A first-person walk through a bright toy-like world: a green checkerboard meadow stretching to a "
    "hazy horizon, scattered with glossy coloured spheres, boxes, tall rounded pillars and round trees "
    "that cast soft shadows under a clear blue sky. The camera walks forward, turns to the right, and "
    "walks on."
)


def make_trajectory() -> np.ndarray:
    """[NUM_FRAMES, 4, 4] float32 c2w poses of the walk, from the first clear start of world SEED whose
    walk keeps the body at least CLEARANCE from every object and ends with 6 free units ahead."""
    attempt = 0
    while True:
        poses = scripted_trajectory(WALK, fps=FPS, start=clear_start(SEED, attempt=attempt))
        ahead = poses[-1, :3, 3] + np.arange(1, 7)[:, None] * poses[-1, :3, 2]
        if body_clearance(SEED, np.concatenate([poses[:, :3, 3], ahead])).min() >= CLEARANCE:
            return poses
        attempt += 1


def main() -> None:
    poses = make_trajectory()
    k = scale_intrinsics(np.array(INTRINSICS), HEIGHT, WIDTH)
    image = np.asarray(render(SEED, poses[:1], k, HEIGHT, WIDTH, supersample=4))[0]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(OUT_DIR / "image.jpg", quality=95)
    np.save(OUT_DIR / "poses.npy", poses)
    np.save(OUT_DIR / "intrinsics.npy", np.tile(np.array(INTRINSICS, np.float32), (NUM_FRAMES, 1)))
    (OUT_DIR / "prompt.txt").write_text(PROMPT + "\n")
    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    print(f"wrote {OUT_DIR} ({total} bytes)")


if __name__ == "__main__":
    main()
