"""The whole engine on 1 and N devices: the same world, compared latent by latent.

Streams a random-weight recipe (default `tiny`: I2V encode, camera stream, 4 denoise passes, commit,
Wan VAE decode) through `WorldRollout` once per device count, from the same seed, image and camera
trajectory (the shipped example scene), and prints each count's relative L2 distance to the first
count's clean latents and decoded frames, with the per-step milliseconds. Unlike
`benchmarks/step_latency.py` (the DiT step alone) this runs every component on the mesh, as
`wm-jax run` does, without writing a video.

    python benchmarks/engine_devices.py --devices 1,2 --compute_dtype float32        # 2 GPUs
    python benchmarks/engine_devices.py --devices 1,2 --attention xla,pallas --compute_dtype bfloat16
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python benchmarks/engine_devices.py --devices 1,4
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from wm_jax.bench.common import format_table, rel_l2, run_metadata, write_json  # noqa: E402
from wm_jax.io import examples  # noqa: E402
from wm_jax.models import camera as cam  # noqa: E402
from wm_jax.parallel.mesh import make_mesh  # noqa: E402
from wm_jax.streaming.components import build_random, model_config  # noqa: E402
from wm_jax.streaming.engine import WorldRollout  # noqa: E402
from wm_jax.streaming.plan import RolloutPlan  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402


def stream(recipe, num_devices: int, compute_dtype, attention: str) -> dict:
    plan = RolloutPlan.for_recipe(recipe, model_config(recipe), make_mesh(num_devices))
    parts = build_random(recipe, plan, recipe.seed, compute_dtype)
    parts.dit.attention_impl = attention
    rollout = WorldRollout(recipe, plan, parts.dit, parts.decoder, seed=recipe.seed, vae_encoder=parts.vae_encoder)
    scene = examples.load_example(examples.SHIPPED_EXAMPLE)
    from PIL import Image

    image = np.asarray(Image.fromarray(scene.image).resize((plan.pixel_width, plan.pixel_height), Image.BICUBIC))
    poses = np.concatenate([scene.poses, np.repeat(scene.poses[-1:], plan.pixel_frames, axis=0)])
    camera = cam.StreamingCamera(scene.intrinsics[0], plan.pixel_height, plan.pixel_width, recipe.world_scale)
    rollout.start(parts.encode_prompt(recipe.prompt), image=image, camera=camera)
    latents, frames, steps = [], [], []
    for index in range(plan.total_blocks):
        chunk_frames, stats = rollout.next_chunk(poses[cam.latent_pose_frames(index, plan.chunk_frames)],
                                                 float_frames=True)
        latents.append(rollout.last_latents)
        frames.append(chunk_frames)
        steps.append(stats.to_dict())
    return {"latents": np.concatenate(latents), "frames": np.concatenate(frames), "steps": steps,
            "compile_s": rollout.compile_seconds}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slug", default="tiny", help="a recipe with the Wan VAE decoder (run on seeded random weights)")
    p.add_argument("--devices", default="1,2", help="comma list of device counts; the first is the reference")
    p.add_argument("--total_blocks", type=int, default=3)
    p.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--attention", default="auto",
                   help="comma list of attention backends (wm_jax.kernels.ATTENTION_IMPLEMENTATIONS); every "
                        "(devices, backend) pair runs, the first pair is the reference")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    recipe = load_recipe(args.slug).replace(total_blocks=args.total_blocks, random_weights=True)
    counts = [int(n) for n in args.devices.split(",")]
    pairs = [(n, a) for a in args.attention.split(",") for n in counts]
    runs = {(n, a): stream(recipe, n, jnp.dtype(args.compute_dtype), a) for n, a in pairs}
    ref = runs[pairs[0]]
    rows, report = [], []
    for (n, attention), run in runs.items():
        steady = [s for s in run["steps"] if s["autoregressive_index"] >= 2] or run["steps"]  # past compiles
        entry = {"devices": n, "attention": attention, "latents_rel_l2": rel_l2(run["latents"], ref["latents"]),
                 "frames_rel_l2": rel_l2(run["frames"], ref["frames"]), "compile_s": run["compile_s"],
                 "denoise_ms": statistics.median(s["denoise_ms"] for s in steady),
                 "commit_ms": statistics.median(s["commit_ms"] for s in steady),
                 "decode_ms": statistics.median(s["decode_ms"] for s in steady), "steps": run["steps"]}
        report.append(entry)
        rows.append([n, attention, entry["latents_rel_l2"], entry["frames_rel_l2"], entry["denoise_ms"], entry["commit_ms"],
                     entry["decode_ms"]])
    print(f"{args.slug}, {args.total_blocks} chunks, {args.compute_dtype}, {jax.devices()[0].device_kind}; "
          f"reference: {pairs[0][0]} device(s), {pairs[0][1]} attention")
    print(format_table(["devices", "attention", "latents rel L2", "frames rel L2", "denoise ms", "commit ms", "decode ms"], rows))
    write_json(args.json, {**run_metadata(), "benchmark": "engine_devices", "slug": args.slug,
                           "compute_dtype": args.compute_dtype, "total_blocks": args.total_blocks, "runs": report})


if __name__ == "__main__":
    main()
