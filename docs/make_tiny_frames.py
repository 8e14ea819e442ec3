"""Draws docs/tiny_world_frames.png: three frames of `wm-jax run tiny` above the renderer's frames of the same poses.

    wm-jax run tiny && python docs/make_tiny_frames.py [outputs/tiny.mp4]
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from wm_jax.io.examples import SHIPPED_EXAMPLE, load_example
from wm_jax.models.camera import scale_intrinsics
from wm_jax.worlds import render

FRAMES = (0, 28, 56)  # the start, mid-turn, the end of the walk
SCALE = 3  # nearest-neighbour enlargement of the 64x112 frames
GAP = 4


def main(video: str = "outputs/tiny.mp4") -> None:
    import av

    with av.open(video) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    height, width = decoded[0].shape[:2]
    example = load_example(SHIPPED_EXAMPLE)
    k = jnp.asarray(scale_intrinsics(example.intrinsics[0], height, width), jnp.float32)
    rendered = np.asarray(render(0, jnp.asarray(example.poses[list(FRAMES)]), k, height, width))
    rendered = np.round(rendered * 255).astype(np.uint8)
    canvas = np.full((2 * height + GAP, len(FRAMES) * (width + GAP) - GAP, 3), 255, np.uint8)
    for column, index in enumerate(FRAMES):
        x = column * (width + GAP)
        canvas[:height, x:x + width] = decoded[index]
        canvas[height + GAP:, x:x + width] = rendered[column]
    out = Path(__file__).resolve().parent / "tiny_world_frames.png"
    Image.fromarray(canvas).resize((canvas.shape[1] * SCALE, canvas.shape[0] * SCALE), Image.NEAREST).save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
