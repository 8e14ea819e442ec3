"""`wm-jax run <slug>`: resolve a recipe and flags, stream the world, write the mp4 and the stats.

Outputs (FlashDreams' names): `<output_dir>/<slug>.mp4` (H.264, yuv420p, crf 18, at --fps) written
chunk by chunk, and `<output_dir>/stats_<slug>.json` with one entry per AR step plus compile seconds,
peak device memory, device kind and the resolved configuration. `--save_latents` adds
`<output_dir>/latents_<slug>.npy` ([F, h, w, C] clean latents).

The run spans `num_devices` devices (default: all; every process's after `jax.distributed` is
initialised): every process runs the same rollout and only process 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from wm_jax.errors import OptionError
from wm_jax.models import camera as cam
from wm_jax.parallel.mesh import make_mesh
from wm_jax.streaming.engine import WorldRollout
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.recipes import Recipe, load_recipe

SHIPPED_EXAMPLE = -1  # --example_idx value of the small example scene shipped in the repo


@dataclass
class RunOptions:
    slug: str
    total_blocks: int | None = None
    pixel_height: int | None = None
    pixel_width: int | None = None
    fps: int | None = None
    seed: int | None = None
    prompt: str | None = None
    image: str | None = None
    poses: str | None = None
    intrinsics: str | None = None
    example_data: bool = False
    example_idx: int = 0
    checkpoint: str | None = None
    hub_repo: str | None = None
    allow_pickle: bool = False
    output_dir: str = "outputs"
    save_latents: bool = False
    shift: float | None = None
    world_scale: float | None = None
    camera_mode: str = "stream"  # "stream": fixed world scale; "clip": upstream's clip-wide max norm
    pose_mode: str = "strict"  # "strict": too few poses is an error; "hold": repeat the last pose
    compute_dtype: str = "auto"
    num_devices: int | None = None


def resolve(options: RunOptions, adapt: Callable[[Recipe], Recipe] | None = None
            ) -> tuple[Recipe, RolloutPlan, dict]:
    """The recipe with the options applied (then `adapt`ed, e.g. for serving), its validated rollout plan
    on the run's mesh (before any weight is loaded), and the resolved settings (for the stats file)."""
    from wm_jax.streaming.components import dit_config

    recipe = load_recipe(options.slug)
    overrides = {k: v for k, v in dict(pixel_height=options.pixel_height, pixel_width=options.pixel_width,
                                       total_blocks=options.total_blocks, fps=options.fps, seed=options.seed,
                                       prompt=options.prompt, shift=options.shift,
                                       world_scale=options.world_scale).items() if v is not None}
    recipe = recipe.replace(**overrides)
    if recipe.fps <= 0:
        raise OptionError("fps", f"{{fps}} {recipe.fps}: expected a positive frame rate")
    if adapt is not None:
        recipe = adapt(recipe)
    model = dit_config(recipe, None if recipe.random_weights else options.checkpoint)
    plan = RolloutPlan.for_recipe(recipe, model, make_mesh(options.num_devices))
    resolved = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "weights"}
    return recipe, plan, {**resolved, "plan": plan.describe()}


def prepare_output_dir(path: str) -> Path:
    """Creates the folder and proves it writable before any compute."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OptionError("output_dir", f"{{output_dir}} {path}: not writable ({err.strerror or err})") from None
    return out


def compute_dtype_of(name: str):
    """The compute dtype option: auto = bfloat16 on GPUs, float32 elsewhere."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def load_scene(options: RunOptions, recipe: Recipe):
    """(image uint8 [H, W, 3] or None, poses, intrinsics, prompt) from flags / example data."""
    from wm_jax.io import examples, trajectory

    image = poses = intrinsics = None
    prompt = recipe.prompt
    if options.example_data or (recipe.task == "i2v_camera" and not (options.image or options.poses)):
        index = options.example_idx if options.example_data or not recipe.random_weights else SHIPPED_EXAMPLE
        folder = examples.SHIPPED_EXAMPLE if index == SHIPPED_EXAMPLE else examples.example_dir(index)
        example = examples.load_example(folder)
        image, poses, intrinsics, prompt = example.image, example.poses, example.intrinsics, example.prompt
    if options.image:
        image = _load_image(options.image)
    if options.poses or options.intrinsics:
        if not (options.poses and options.intrinsics):
            raise OptionError("poses", "{poses} and {intrinsics} go together")
        poses, intrinsics = trajectory.load_trajectory(options.poses, options.intrinsics)
    if options.prompt is not None:
        prompt = options.prompt
    if image is not None and image.shape[:2] != (recipe.pixel_height, recipe.pixel_width):
        image = _resize(image, recipe.pixel_height, recipe.pixel_width)
    return image, poses, intrinsics, prompt


def _load_image(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as err:
        raise OptionError("image", f"{{image}} {path}: cannot read it as an image ({err})") from None


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of a uint8 [H, W, 3] image to the video size (upstream resizes, no crop)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def load_parts(recipe: Recipe, plan: RolloutPlan, options: RunOptions, compute_dtype):
    """The recipe's components on the plan's mesh: seeded random weights, or `options.checkpoint`'s
    (downloaded and converted there where missing)."""
    from wm_jax.streaming.components import build_random, load_components

    if recipe.random_weights:
        return build_random(recipe, plan, recipe.seed, compute_dtype)
    if not options.checkpoint:
        raise OptionError("checkpoint", f"recipe {recipe.slug} needs weights: {{checkpoint}} DIR (converted "
                          "components, downloaded and converted there if missing)")
    return load_components(recipe, plan, options.checkpoint, compute_dtype=compute_dtype,
                           dit_hub_repo=options.hub_repo, allow_pickle=options.allow_pickle)


def run(options: RunOptions) -> dict:
    """Streams the world; returns the stats report (also written, by process 0, next to the video)."""
    from wm_jax.io import trajectory
    from wm_jax.io.video import Mp4Writer

    recipe, plan, resolved = resolve(options)
    writer_process = jax.process_index() == 0
    out_dir = prepare_output_dir(options.output_dir) if writer_process else Path(options.output_dir)
    compute_dtype = compute_dtype_of(options.compute_dtype)
    image, poses, intrinsics, prompt = load_scene(options, recipe)
    camera = None
    if recipe.task == "i2v_camera":
        poses = trajectory.poses_for_frames(poses, plan.pixel_frames, options.pose_mode)
        scale = (cam.clip_world_scale(poses, plan.latent_frames) if options.camera_mode == "clip"
                 else recipe.world_scale)
        camera = cam.StreamingCamera(intrinsics[0], plan.pixel_height, plan.pixel_width, scale)
        resolved["world_scale_used"] = scale

    start = time.perf_counter()
    parts = load_parts(recipe, plan, options, compute_dtype)
    load_s = time.perf_counter() - start
    text_features = parts.encode_prompt(prompt)
    parts.encode_prompt = None  # frees the text encoder (umT5-XXL: ~11 GB in bf16) before the rollout allocates
    rollout = WorldRollout(recipe, plan, parts.dit, parts.decoder, seed=recipe.seed, vae_encoder=parts.vae_encoder)
    rollout.start(text_features, image=image, camera=camera)

    video_path = out_dir / f"{recipe.slug}.mp4"
    latents = []
    from tqdm import tqdm

    writer = Mp4Writer(video_path, fps=recipe.fps) if writer_process else contextlib.nullcontext()
    with writer:
        for index in tqdm(range(plan.total_blocks), desc=recipe.slug, unit="chunk", disable=None if writer_process else True):
            latent_poses = poses[cam.latent_pose_frames(index, plan.chunk_frames)] if camera is not None else None
            frames, stats = rollout.next_chunk(latent_poses)
            if writer_process:
                writer.append(frames)
            if options.save_latents:
                latents.append(rollout.last_latents)
            logging.info("step %d: denoise %.1f ms, commit %.1f ms, decode %.1f ms, encode %.1f ms, %d frames",
                         index, stats.denoise_ms, stats.commit_ms, stats.decode_ms, stats.encode_ms,
                         stats.num_frames)
    devices = plan.mesh.devices.flat
    local = [d for d in devices if d.process_index == jax.process_index()]
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in local]
    report = {
        "slug": recipe.slug,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_kind": local[0].device_kind,
        "platform": local[0].platform,
        "num_devices": plan.num_devices,
        "num_processes": jax.process_count(),
        "jax": jax.__version__,
        "compute_dtype": jnp.dtype(compute_dtype).name,
        "load_seconds": load_s,
        "compile_seconds": rollout.compile_seconds,
        "peak_device_memory_gib": max(peaks) / 2**30 if all(p is not None for p in peaks) else None,
        "video": str(video_path),
        "num_frames": int(sum(s.num_frames for s in rollout.state.history)),
        "steps": [s.to_dict() for s in rollout.state.history],
        "config": {**resolved, "components": parts.description, "prompt": prompt,
                   "camera_mode": options.camera_mode if camera is not None else None},
    }
    if writer_process:
        if options.save_latents:
            _write_atomic(out_dir / f"latents_{recipe.slug}.npy", lambda f: np.save(f, np.concatenate(latents, axis=0)))
        _write_atomic(out_dir / f"stats_{recipe.slug}.json", lambda f: f.write((json.dumps(report, indent=2) + "\n")
                                                                              .encode()))
    return report


def _write_atomic(path: Path, write) -> None:
    """`write(binary file)` into a temporary name beside `path`, renamed into place when complete."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        write(f)
    tmp.rename(path)
