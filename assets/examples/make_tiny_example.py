"""Generates `assets/examples/tiny/`, the small example scene wm_jax ships for offline use.

Everything here is drawn and computed by this script (no upstream data): a 60x104 picture (1/8 of
the 480x832 frame LingBot's intrinsics refer to) of a road running to the horizon between fields,
a 33-frame camera trajectory walking forward with a slow right turn, constant intrinsics for a
480x832 frame, and a matching prompt. Same layout as LingBot's example folders:

  image.jpg        RGB, 104x60
  poses.npy        [33, 4, 4] float32 camera-to-world, OpenCV axes (x right, y down, z forward)
  intrinsics.npy   [33, 4] float32 (fx, fy, cx, cy) in pixels of a 480x832 frame
  prompt.txt

Run `python assets/examples/make_tiny_example.py` to regenerate (deterministic).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT_DIR = Path(__file__).resolve().parent / "tiny"
WIDTH, HEIGHT = 104, 60
NUM_FRAMES = 33
STEP = 0.1  # world units walked per frame
TOTAL_YAW_DEG = 12.0  # turn accumulated over the clip
START_YAW_DEG = 5.0
START_POSITION = (0.4, -0.2, -1.0)  # y is down: the camera starts slightly above the origin
INTRINSICS = (503.0, 503.0, 416.0, 240.0)  # fx, fy, cx, cy for 480x832

PROMPT = (
    "A first-person walk along a straight country road at midday. The road runs toward the horizon "
    "between green fields, a few round trees and a small red-roofed house stand to the sides, and "
    "the sky is clear and pale blue with a bright sun. The camera moves forward steadily and turns "
    "slowly to the right."
)


def draw_image() -> Image.Image:
    horizon = int(HEIGHT * 0.42)
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.float64)
    # Sky: deeper blue at the top, paler near the horizon.
    t = np.linspace(0.0, 1.0, horizon)[:, None]
    pixels[:horizon] = ((1 - t) * np.array([70, 130, 210]) + t * np.array([190, 215, 240]))[:, None]
    # Ground: fields darkening toward the viewer.
    t = np.linspace(0.0, 1.0, HEIGHT - horizon)[:, None]
    pixels[horizon:] = ((1 - t) * np.array([120, 170, 80]) + t * np.array([60, 120, 40]))[:, None]
    image = Image.fromarray(np.round(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    vx = WIDTH // 2  # vanishing point of the road
    draw.polygon([(vx - 1, horizon), (vx + 1, horizon), (WIDTH * 0.78, HEIGHT), (WIDTH * 0.22, HEIGHT)],
                 fill=(128, 118, 104))
    for k in range(5):  # dashed centre line, dashes growing toward the viewer
        y0 = horizon + (HEIGHT - horizon) * (k / 5) ** 1.6
        y1 = horizon + (HEIGHT - horizon) * ((k + 0.5) / 5) ** 1.6
        draw.line([(vx, y0), (vx, y1)], fill=(235, 225, 170), width=1)
    for side in (-1, 1):  # field furrows converging on the vanishing point
        for k in range(1, 4):
            draw.line([(vx, horizon), (vx + side * WIDTH * (0.3 + 0.35 * k), HEIGHT)], fill=(95, 150, 60))

    draw.ellipse([78, 5, 88, 15], fill=(255, 245, 200))  # sun
    house_x, house_y = 14, horizon + 3  # small house on the left
    draw.rectangle([house_x, house_y, house_x + 12, house_y + 8], fill=(225, 215, 190))
    draw.polygon([(house_x - 2, house_y), (house_x + 6, house_y - 6), (house_x + 14, house_y)], fill=(175, 50, 40))
    draw.rectangle([house_x + 5, house_y + 4, house_x + 7, house_y + 8], fill=(90, 60, 40))
    for tx, ty, r in ((36, horizon + 1, 3), (70, horizon + 2, 4), (90, horizon + 6, 6)):  # trees
        draw.rectangle([tx - 1, ty, tx, ty + r + 2], fill=(90, 65, 40))
        draw.ellipse([tx - r, ty - 2 * r, tx + r, ty], fill=(40, 100, 45))
    return image


def yaw_matrix(angle: float) -> np.ndarray:
    """Rotation about the world y axis (down); positive angles turn the forward axis toward +x."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def make_trajectory() -> np.ndarray:
    """[NUM_FRAMES, 4, 4] float32 c2w poses: forward walk, yaw easing in and out (smoothstep)."""
    u = np.linspace(0.0, 1.0, NUM_FRAMES)
    yaw = math.radians(START_YAW_DEG) + math.radians(TOTAL_YAW_DEG) * (3 * u**2 - 2 * u**3)
    poses = np.zeros((NUM_FRAMES, 4, 4))
    position = np.array(START_POSITION, np.float64)
    for i in range(NUM_FRAMES):
        if i > 0:  # step along the heading halfway between the two frames
            mid = yaw_matrix(0.5 * (yaw[i - 1] + yaw[i]))
            position = position + STEP * mid[:, 2]
        poses[i, :3, :3] = yaw_matrix(yaw[i])
        poses[i, :3, 3] = position
        poses[i, 3, 3] = 1.0
    return poses.astype(np.float32)


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    draw_image().save(OUT_DIR / "image.jpg", quality=90)
    np.save(OUT_DIR / "poses.npy", make_trajectory())
    np.save(OUT_DIR / "intrinsics.npy", np.tile(np.array(INTRINSICS, np.float32), (NUM_FRAMES, 1)))
    (OUT_DIR / "prompt.txt").write_text(PROMPT + "\n")
    total = sum(p.stat().st_size for p in OUT_DIR.iterdir())
    print(f"wrote {OUT_DIR} ({total} bytes)")


if __name__ == "__main__":
    main()
