"""`wm-jax run <slug>`: resolve a recipe and flags, stream the world, write the mp4 and the stats.

Outputs (FlashDreams' file names): `<output_dir>/<slug>.mp4` (H.264, yuv420p, crf 18, at the recipe's
fps) written chunk by chunk, and `<output_dir>/stats_<slug>.json` (its keys are explained by
`STATS_KEYS`, which the file carries as its "keys" entry). The `save_latents` option adds
`<output_dir>/latents_<slug>.npy` ([F, h, w, C] clean latents). The folder is created when the first
file is about to be written, and removed again if the run fails before anything was written in it.

Every option is checked before any model work (`check_options`). The run reports its stages through
`say` (loading, downloading, compiling, then one line per chunk, or a tqdm bar when stderr is a
terminal). Ctrl-C keeps what was made: the video of the chunks already generated is finished and their
stats are written (`"interrupted": true`), then `RunInterrupted` (a KeyboardInterrupt) is raised.

The run spans `num_devices` devices (default: all; every process's after `jax.distributed` is
initialised): every process runs the same rollout and only process 0 writes files.

Module-level imports are light (no JAX, no recipes): the options are checked within a fraction of a
second; JAX, the recipes, the engine and the models are imported where they are used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from absl import logging

from wm_jax.errors import OptionError

if TYPE_CHECKING:
    from wm_jax.streaming.plan import RolloutPlan
    from wm_jax.streaming.recipes import Recipe

SHIPPED_EXAMPLE = -1  # example_idx value of the small example scene shipped in the repo
VIDEO_SIZE_MULTIPLE = 16  # pixels per token side (VAE stride 8 x patch 2): plan.SPATIAL_MULTIPLE
MAX_SEED = 2**32 - 1


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
    random_weights: bool = False  # seeded random weights instead of the recipe's shipped / checkpoint weights
    attention: str | None = None  # attention backend (wm_jax.kernels.ATTENTION_IMPLEMENTATIONS); None = the recipe's


def load_recipe(slug: str) -> Recipe:
    """`wm_jax.streaming.recipes.load_recipe`, imported on first use (the recipes bring JAX with them)."""
    from wm_jax.streaming import recipes

    return recipes.load_recipe(slug)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run`, after the outputs of the chunks made so far were finished and written.

    report: the stats of those chunks (also in the stats file); None when no chunk was finished, in
    which case nothing was written. chunks_planned: the chunks the run was for."""

    def __init__(self, report: dict | None, chunks_planned: int):
        super().__init__()
        self.report = report
        self.chunks_planned = chunks_planned


# ---------------------------------------------------------------------------------------------------
# Options, checked before any model work.
# ---------------------------------------------------------------------------------------------------


def check_options(options: RunOptions, *, output: bool = True) -> None:
    """Raises OptionError for an option no run could use, before anything is loaded or compiled: sizes,
    counts, frame rate and seed out of range, files that are not there, an unknown example, and (with
    `output`) an output folder that cannot be written. Cheap (no JAX, no file contents); `run` calls it
    first, `resolve` (which serving uses too) without `output`."""
    from wm_jax.io.examples import UPSTREAM_EXAMPLE_INDICES

    def bad(name: str, expected: str):
        return OptionError(name, f"{{{name}}} {getattr(options, name)}: expected {expected}")

    if options.total_blocks is not None and options.total_blocks <= 0:
        raise bad("total_blocks", "a positive number of chunks")
    for name in ("pixel_height", "pixel_width"):
        value, m = getattr(options, name), VIDEO_SIZE_MULTIPLE
        if value is not None and value <= 0:
            raise bad(name, f"a positive multiple of {m} (the video size in pixels)")
        if value is not None and value % m:
            lower = value // m * m
            raise bad(name, f"a multiple of {m} (VAE stride 8 x patch 2): use {lower} or {lower + m}")
    if options.fps is not None and options.fps <= 0:
        raise bad("fps", "a positive frame rate")
    if options.seed is not None and not 0 <= options.seed <= MAX_SEED:
        raise bad("seed", f"a seed from 0 to {MAX_SEED}")
    if options.num_devices is not None and options.num_devices <= 0:
        raise bad("num_devices", "at least 1 device")
    if options.shift is not None and options.shift <= 0:
        raise bad("shift", "a positive schedule shift")
    if options.world_scale is not None and options.world_scale <= 0:
        raise bad("world_scale", "a positive camera translation scale")
    if options.example_idx != SHIPPED_EXAMPLE and options.example_idx not in UPSTREAM_EXAMPLE_INDICES:
        raise bad("example_idx", f"{', '.join(map(str, UPSTREAM_EXAMPLE_INDICES))} (upstream's scenes, downloaded "
                                 f"once) or {SHIPPED_EXAMPLE} (the small scene shipped with wm_jax)")
    for name in ("image", "poses", "intrinsics"):
        path = getattr(options, name)
        if path is not None and not Path(path).is_file():
            raise OptionError(name, f"{{{name}}} {path}: expected a file "
                                    f"({'a folder' if Path(path).is_dir() else 'no such file'})")
    if bool(options.poses) != bool(options.intrinsics):
        raise OptionError("poses", "{poses} and {intrinsics} go together")
    if options.attention is not None:
        check_attention(options.attention, "{attention}")
    if options.checkpoint is not None and Path(options.checkpoint).exists() and not Path(options.checkpoint).is_dir():
        raise OptionError("checkpoint", f"{{checkpoint}} {options.checkpoint}: expected a folder (it is a file)")
    if output:
        OutputFolder(options.output_dir)


def check_attention(name: str, where: str) -> None:
    """OptionError (attention) for an attention backend that is unknown or whose package is missing;
    `where` names the setting in the message ("{attention}" for the option, or the recipe's field)."""
    from wm_jax.kernels import ATTENTION_IMPLEMENTATIONS, missing_package

    if name not in ATTENTION_IMPLEMENTATIONS:
        raise OptionError("attention", f"{where} {name}: expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if package := missing_package(name):
        raise OptionError("attention", f"{where} {name}: needs the package {package!r}, which is not installed "
                                       f"(pip install {package}; or {{attention}} auto)")


def check_weights(recipe: Recipe, options: RunOptions) -> None:
    """Raises OptionError when the recipe has no weights to run with: no checkpoint folder given and
    neither random nor shipped weights."""
    if recipe.random_weights or getattr(options, "random_weights", False) or options.checkpoint:
        return
    if getattr(recipe, "shipped_weights", ""):
        return
    raise OptionError("checkpoint", f"recipe {recipe.slug} needs weights: {{checkpoint}} DIR (converted "
                      "components, downloaded and converted there if missing)")


def weights_source(recipe: Recipe, options: RunOptions) -> str:
    """Where the run's weights come from, in a few words (the loading line)."""
    if recipe.random_weights or getattr(options, "random_weights", False):
        return f"random weights (seed {recipe.seed if options.seed is None else options.seed})"
    if options.checkpoint:
        return f"weights in {options.checkpoint}"
    if getattr(recipe, "shipped_weights", ""):
        return f"shipped weights ({recipe.shipped_weights})"
    return "no weights"


def missing_components(recipe: Recipe, options: RunOptions) -> list[str]:
    """The components of `options.checkpoint` that the run will download and convert (no converted
    folder there yet); empty without a checkpoint folder or with random weights."""
    if not options.checkpoint or recipe.random_weights or getattr(options, "random_weights", False):
        return []
    names = list(recipe.weights) + (["dit"] if options.hub_repo and "dit" not in recipe.weights else [])
    root = Path(options.checkpoint)
    return [name for name in names if not (root / name / "wm_jax.json").is_file()]


def recipe_settings(recipe: Recipe) -> dict:
    """The recipe as plain data for the stats file, one meaning per key: the schedule's parameter under
    its own name (`schedule_steps` for Self-Forcing, `schedule_indices` for LingBot's table), plus
    `denoising_passes` and the `denoising_timesteps` the network sees; hub files left out."""
    settings = {k: v for k, v in dataclasses.asdict(recipe).items() if k != "weights"}
    steps, indices = settings.pop("steps", None), settings.pop("step_indices", None)
    schedule = recipe.step_schedule()
    settings["schedule_steps" if recipe.schedule == "self_forcing" else "schedule_indices"] = list(
        steps if recipe.schedule == "self_forcing" else indices)
    settings["denoising_passes"] = schedule.num_steps
    settings["denoising_timesteps"] = [round(float(t), 3) for t in schedule.t]
    return settings


def resolve(options: RunOptions, adapt: Callable[[Recipe], Recipe] | None = None
            ) -> tuple[Recipe, RolloutPlan, dict]:
    """The recipe with the options applied (then `adapt`ed, e.g. for serving), its validated rollout plan
    on the run's mesh (before any weight is loaded), and the resolved settings (for the stats file)."""
    from wm_jax.parallel.mesh import make_mesh
    from wm_jax.streaming.components import dit_config
    from wm_jax.streaming.plan import RolloutPlan

    check_options(options, output=False)
    recipe = load_recipe(options.slug)
    overrides = {k: v for k, v in dict(pixel_height=options.pixel_height, pixel_width=options.pixel_width,
                                       total_blocks=options.total_blocks, fps=options.fps, seed=options.seed,
                                       prompt=options.prompt, shift=options.shift,
                                       world_scale=options.world_scale, attention=options.attention).items()
                 if v is not None}
    recipe = recipe.replace(**overrides, **({"random_weights": True} if options.random_weights else {}))
    if recipe.fps <= 0:
        raise OptionError("fps", f"{{fps}} {recipe.fps}: expected a positive frame rate")
    check_attention(recipe.attention, f"recipe {recipe.slug}'s attention")
    if adapt is not None:
        recipe = adapt(recipe)
    model = dit_config(recipe, None if recipe.random_weights else options.checkpoint)
    plan = RolloutPlan.for_recipe(recipe, model, make_mesh(options.num_devices))
    return recipe, plan, {**recipe_settings(recipe), "plan": plan.describe()}


class OutputFolder:
    """The output folder, checked at once but created only when the first file is about to be written.

    Raises OptionError (output_dir) at construction when it could not be created or written: it (or the
    nearest existing folder above it) is a file or not writable. `remove_if_empty()` takes back the
    folders `create()` made, if nothing was written in them."""

    def __init__(self, path: str):
        self.path = Path(path)
        existing = self.path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        where = "it" if existing == self.path else str(existing)
        if not existing.is_dir():
            raise OptionError("output_dir", f"{{output_dir}} {path}: not writable ({where} is a file)")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OptionError("output_dir", f"{{output_dir}} {path}: not writable (no permission to write in "
                              f"{existing})")
        self._created: list[Path] = []

    def create(self) -> Path:
        missing = []
        folder = self.path
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OptionError("output_dir", f"{{output_dir}} {self.path}: not writable "
                              f"({err.strerror or err})") from None
        self._created.extend(missing)
        return self.path

    def remove_if_empty(self) -> None:
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                return
        self._created = []


def compute_dtype_of(name: str):
    """The compute dtype option: auto = bfloat16 on GPUs, float32 elsewhere."""
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def load_scene(options: RunOptions, recipe: Recipe, say: Callable[[str], None] | None = None):
    """(image uint8 [H, W, 3] or None, poses, intrinsics, prompt) from flags / example data; `say` hears
    about an example scene about to be downloaded."""
    from wm_jax.io import examples, trajectory

    image = poses = intrinsics = None
    prompt = recipe.prompt
    if options.example_data or (recipe.task == "i2v_camera" and not (options.image or options.poses)):
        offline = recipe.random_weights or recipe.shipped_weights  # these recipes bring their own scene
        index = options.example_idx if options.example_data or not offline else SHIPPED_EXAMPLE
        folder = examples.SHIPPED_EXAMPLE if index == SHIPPED_EXAMPLE else _upstream_example(index, say)
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
    return image, poses, intrinsics, prompt


def sizes_from_image(recipe: Recipe, options: RunOptions) -> bool:
    """Whether the video size follows the input image (the recipe has a `max_area`, no size option given)."""
    return bool(recipe.max_area) and options.pixel_height is None and options.pixel_width is None


def resolve_with_scene(options: RunOptions, adapt: Callable[[Recipe], Recipe] | None = None,
                       say: Callable[[str], None] | None = None):
    """`resolve`, then the scene (`load_scene`) with its image resized to the plan's video size. When the size
    follows the image (`sizes_from_image`) and the image's aspect gives another size than the recipe's, the
    plan is resolved again at that size (`wm_jax.streaming.plan.aspect_resolution`; nothing is loaded by
    either). Returns (recipe, plan, resolved settings, (image, poses, intrinsics, prompt))."""
    from wm_jax.streaming.plan import aspect_resolution

    recipe, plan, resolved = resolve(options, adapt)
    image, poses, intrinsics, prompt = load_scene(options, recipe, say)
    if image is not None and sizes_from_image(recipe, options):
        height, width = aspect_resolution(*image.shape[:2], recipe.max_area)
        if (height, width) != (plan.pixel_height, plan.pixel_width):
            sized = lambda r: (adapt(r) if adapt else r).replace(pixel_height=height, pixel_width=width)
            recipe, plan, resolved = resolve(options, sized)
        resolved["video_size_from"] = (f"the input image's aspect ({image.shape[0]}x{image.shape[1]}) at "
                                       f"max_area {recipe.max_area}")
    if image is not None and image.shape[:2] != (plan.pixel_height, plan.pixel_width):
        image = _resize(image, plan.pixel_height, plan.pixel_width)
    return recipe, plan, resolved, (image, poses, intrinsics, prompt)


def _upstream_example(index: int, say: Callable[[str], None] | None) -> Path:
    """The folder of upstream LingBot example `index`, downloaded (announced through `say`) on first use;
    a failed download points at the shipped scene."""
    from wm_jax.io import examples
    from wm_jax.io.hub import HubError

    target = Path(examples.DEFAULT_CACHE_ROOT) / f"{index:02d}"
    if say is not None and not target.exists():
        say(f"downloading LingBot example {index} into {target} (does not exist yet)")
    try:
        return examples.example_dir(index)
    except HubError as err:
        why = str(err.args[0]).split("\nTo run without the network", 1)[0]  # replaced by the option to use
        raise HubError(f"{why}\nTo run without the network: {{example_idx}} {SHIPPED_EXAMPLE} (the small "
                       "scene shipped with wm_jax).") from None


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
    """The recipe's components on the plan's mesh: seeded random weights, `options.checkpoint`'s (downloaded
    and converted there where missing), or else the trained world shipped with the package; and the recipe
    with the checkpoint's own settings applied (the shift its scheduler config states, unless the shift
    option is given). Returns (recipe, components)."""
    from wm_jax.streaming.components import build_random, load_components, load_shipped

    if recipe.random_weights:
        parts = build_random(recipe, plan, recipe.seed, compute_dtype)
    elif not options.checkpoint and recipe.shipped_weights:
        parts = load_shipped(recipe, plan, compute_dtype)
    elif not options.checkpoint:
        raise OptionError("checkpoint", f"recipe {recipe.slug} needs weights: {{checkpoint}} DIR (converted "
                          "components, downloaded and converted there if missing)")
    else:
        parts = load_components(recipe, plan, options.checkpoint, compute_dtype=compute_dtype,
                                dit_hub_repo=options.hub_repo, allow_pickle=options.allow_pickle)
    parts.dit.attention_impl = recipe.attention  # `resolve` applied the attention option to the recipe
    if parts.shift is not None and options.shift is None:
        recipe = recipe.replace(shift=parts.shift)
    return recipe, parts


def attention_backend(cfg, implementation: str, plan: RolloutPlan, compute_dtype) -> str:
    """The backend a DiT of config `cfg` runs its chunk-vs-cache attention on: its setting `implementation`
    resolved for this plan's per-device shapes."""
    import jax

    from wm_jax.kernels.attention import resolve

    heads = plan.shards.heads_per_shard
    q = jax.ShapeDtypeStruct((plan.batch, plan.attention_tokens_per_device, heads, cfg.head_dim), compute_dtype)
    cache = jax.ShapeDtypeStruct((cfg.num_layers, plan.batch, plan.cache.buffer_tokens, heads, cfg.head_dim),
                                 compute_dtype)
    return resolve(q, implementation, cache_k=cache)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _terminal_width(stream) -> int:
    """Columns of the terminal `stream` writes to; 0 when it is not a terminal (or has no size)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns if stream.isatty() else 0
    except (AttributeError, OSError, ValueError):
        return 0


def run(options: RunOptions, say: Callable[[str], None] | None = _stderr) -> dict:
    """Streams the world; returns the stats report (also written, by process 0, next to the video).

    say: receives the stage lines (loading, downloading, compiling, a line per chunk); None = silent. With
      the default (stderr) and stderr a terminal, the chunks show as a tqdm bar instead of lines.
    Raises OptionError for a bad option before any model work; on Ctrl-C, RunInterrupted once the video
    and stats of the chunks made so far are finished (nothing is written when no chunk was finished).
    """
    bar = say is _stderr and _terminal_width(sys.stderr) >= 40
    say = say or (lambda line: None)
    check_options(options)
    recipe = load_recipe(options.slug)
    check_weights(recipe, options)
    size = (f"{options.pixel_height or recipe.pixel_height}x{options.pixel_width or recipe.pixel_width}"
            if not sizes_from_image(recipe, options) else f"video size from the image's aspect at {recipe.max_area} px")
    blocks = options.total_blocks or recipe.total_blocks
    say(f"loading {recipe.slug}: {weights_source(recipe, options)}, {size}, "
        f"{blocks} chunk{'s' if blocks != 1 else ''}")
    folder = OutputFolder(options.output_dir)
    try:
        return _run(options, say, folder, bar)
    except BaseException:
        folder.remove_if_empty()
        raise


def _run(options: RunOptions, say: Callable[[str], None], folder: OutputFolder, bar: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from wm_jax.io import trajectory
    from wm_jax.io.video import Mp4Writer, deferred_interrupts
    from wm_jax.models import camera as cam
    from wm_jax.streaming.engine import WorldRollout

    recipe, plan, resolved, (image, poses, intrinsics, prompt) = resolve_with_scene(options, say=say)
    writer_process = jax.process_index() == 0
    compute_dtype = compute_dtype_of(options.compute_dtype)
    camera = None
    if recipe.task == "i2v_camera":
        poses = trajectory.poses_for_frames(poses, plan.pixel_frames, options.pose_mode)
        scale = (cam.clip_world_scale(poses, plan.latent_frames) if options.camera_mode == "clip"
                 else recipe.world_scale)
        camera = cam.StreamingCamera(intrinsics[0], plan.pixel_height, plan.pixel_width, scale)
        resolved["world_scale_used"] = scale

    missing = missing_components(recipe, options)
    if missing:
        where = "does not exist yet" if not Path(options.checkpoint).exists() else "not converted there yet"
        say(f"downloading {', '.join(missing)} into {options.checkpoint} ({where})")
    start = time.perf_counter()
    recipe, parts = load_parts(recipe, plan, options, compute_dtype)
    resolved.update(recipe_settings(recipe))  # the checkpoint's schedule shift, where it states one
    text_features = parts.encode_prompt(prompt)
    parts.encode_prompt = None  # frees the text encoder (umT5-XXL: ~11 GB in bf16) before the rollout allocates
    rollout = WorldRollout(recipe, plan, parts.dit, parts.decoder, seed=recipe.seed, vae_encoder=parts.vae_encoder)
    rollout.start(text_features, image=image, camera=camera)
    load_s = time.perf_counter() - start
    devices = plan.mesh.devices.flat
    local = [d for d in devices if d.process_index == jax.process_index()]
    say(f"compiling the denoise, commit, encode and decode programs on {plan.num_devices} {local[0].platform} "
        f"device{'s' if plan.num_devices > 1 else ''} (loaded in {load_s:.1f} s)")

    video_path = folder.path / f"{recipe.slug}.mp4"
    writer = None
    chunks: list[dict] = []  # the chunks in the video, in order
    latents = []
    progress = _ChunkProgress(say, recipe.slug, plan.total_blocks, bar=bar, enabled=writer_process)
    clock = CompileClock()
    interrupted = False
    loop_start = time.perf_counter()
    try:
        with clock:
            for index in range(plan.total_blocks):
                latent_poses = poses[cam.latent_pose_frames(index, plan.chunk_frames)] if camera is not None else None
                call_start = time.time()
                frames, stats = rollout.next_chunk(latent_poses)
                record = clock.chunk_record(stats, call_start, time.time())
                with deferred_interrupts():  # the chunk is in the video and in the stats, or in neither
                    if writer_process:
                        if writer is None:
                            folder.create()
                            writer = Mp4Writer(video_path, fps=recipe.fps)
                        writer.append(frames)
                    if options.save_latents:
                        latents.append(rollout.last_latents)
                    chunks.append(record)
                logging.info("chunk %d: encode %.1f ms, denoise %.1f ms, commit %.1f ms, decode %.1f ms, compile %.1f "
                             "ms, %d frames", index, record["encode_ms"], record["denoise_ms"], record["commit_ms"],
                             record["decode_ms"], record["compile_ms"], record["num_frames"])
                progress.chunk(record)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        progress.close()
    rollout_s = time.perf_counter() - loop_start

    with _interrupts_ignored():  # finishing what was made: a second Ctrl-C must not cut it short
        if interrupted and not chunks:
            if writer is not None:
                writer.abort()
            raise RunInterrupted(None, plan.total_blocks)
        peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in local]
        num_frames = int(sum(c["num_frames"] for c in chunks))
        report = {
            "slug": recipe.slug,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "interrupted": interrupted,
            "video": str(video_path),
            "num_frames": num_frames,
            "fps": recipe.fps,
            "video_seconds": num_frames / recipe.fps,
            "chunks_planned": plan.total_blocks,
            "chunks_done": len(chunks),
            "load_seconds": load_s,
            "compile_seconds": clock.seconds(),
            "rollout_seconds": rollout_s,
            "steady_state": steady_state(chunks, recipe.fps),
            "chunks": chunks,
            "device_kind": local[0].device_kind,
            "platform": local[0].platform,
            "num_devices": plan.num_devices,
            "num_processes": jax.process_count(),
            "jax": jax.__version__,
            "compute_dtype": jnp.dtype(compute_dtype).name,
            "attention": attention_backend(parts.dit.config, parts.dit.attention_impl, plan, compute_dtype),
            "peak_device_memory_gib": max(peaks) / 2**30 if all(p is not None for p in peaks) else None,
            "config": {**resolved, "components": parts.description, "prompt": prompt,
                       "camera_mode": options.camera_mode if camera is not None else None},
            "keys": STATS_KEYS,
        }
        if writer_process:
            writer.close()
            if options.save_latents:
                _write_atomic(folder.path / f"latents_{recipe.slug}.npy",
                              lambda f: np.save(f, np.concatenate(latents, axis=0)))
            _write_atomic(stats_path(options.output_dir, recipe.slug),
                          lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))
    if interrupted:
        raise RunInterrupted(report, plan.total_blocks)
    return report


def stats_path(output_dir: str | os.PathLike, slug: str) -> Path:
    return Path(output_dir) / f"stats_{slug}.json"


STATS_KEYS = {
    "interrupted": "true when Ctrl-C stopped the run; the video and these stats hold the chunks finished before",
    "video / num_frames / fps / video_seconds": "the mp4, its frames, its frame rate, its length (frames / fps)",
    "chunks_planned / chunks_done": "the AR steps (chunks) asked for, and those in the video",
    "load_seconds": "weights built or loaded, prompt encoded, world started (KV cache, decoder/encoder state)",
    "compile_seconds": "first-call compilation (tracing, lowering, XLA) per program: denoise, commit, encode, "
                       "decode, and their total; included in no *_ms",
    "rollout_seconds": "wall time of the chunk loop: compilation, every chunk, writing the video",
    "steady_state": "medians over the chunks from from_chunk on (2; 1 or 0 when there are fewer) of the chunk "
                    "timings; generated_fps = frames_per_chunk / total_ms, the frames made per wall-clock second; "
                    "realtime_factor = generated_fps / fps (above 1: generated faster than it plays)",
    "chunks[]": "one entry per chunk in the video: index, num_frames, and the milliseconds of each phase without "
                "compilation; total_ms = encode + denoise + commit + decode; compile_ms = compilation during it",
    "encode_ms": "the I2V conditioning encode of the chunk (Wan VAE encoder): chunk 0 encodes the first image + "
                 "black frames, later chunks black frames with the encoder's causal state; with the camera map; "
                 "near 0 for text-only recipes",
    "denoise_ms / commit_ms / decode_ms": "all denoising passes of the chunk / writing the clean chunk into the KV "
                                          "cache / latents to uint8 frames on the device, copied to the host",
    "config": "the recipe as run: denoising_passes and the denoising_timesteps the network sees, schedule_steps "
              "or schedule_indices (the schedule's parameter), plan (shapes, cache layout, devices)",
    "attention": "the backend the DiT's chunk-vs-cache attention ran on (wm_jax.kernels.attention; the attention "
                 "option, or the recipe's, resolved on this device)",
    "peak_device_memory_gib": "largest peak over this process's devices; null where the backend does not report it",
}


def steady_state(chunks: list[dict], fps: float) -> dict | None:
    """Medians of the chunk timings past the first-call effects: chunks from 2 on (FlashDreams), from 1
    when there are 2, chunk 0 alone when there is 1; None without chunks."""
    if not chunks:
        return None
    first = 2 if len(chunks) >= 3 else len(chunks) - 1
    chosen = chunks[first:]
    med = {key: statistics.median(c[key] for c in chosen)
           for key in ("encode_ms", "denoise_ms", "commit_ms", "decode_ms", "total_ms", "num_frames")}
    generated = med["num_frames"] / med["total_ms"] * 1e3 if med["total_ms"] > 0 else None
    return {"from_chunk": first, "num_chunks": len(chosen),
            **{key: med[key] for key in ("encode_ms", "denoise_ms", "commit_ms", "decode_ms", "total_ms")},
            "frames_per_chunk": med["num_frames"], "generated_fps": generated,
            "realtime_factor": None if generated is None else generated / fps}


class CompileClock:
    """Compilation per program of a rollout, from JAX's compile events (tracing, lowering to MLIR, XLA
    compilation), which the engine's phase timings include on a program's first call.

    Inside `with clock:`, `chunk_record(stats, call_start, call_end)` turns one `next_chunk` call (started
    at `call_start`, time.time()) into the stats entry of its chunk: each compilation that ran during the
    call is taken out of the milliseconds of the phase it started in (the phases run back to back from
    the call's start: encode, denoise, commit, decode; anything after them counts as decode), and is
    counted for the program it compiled: denoise or commit by the compiled function's name (the engine
    compiles both ahead of time, inside its first encode phase), else the phase's program. Overlapping
    events (a trace inside a trace) are counted once."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")
    PROGRAMS = ("denoise", "commit", "encode", "decode")
    PHASES = ("encode", "denoise", "commit", "decode")  # the order of a chunk's phases

    def __init__(self):
        self._spans: list[tuple[float, float, str]] = []
        self._seconds = dict.fromkeys(self.PROGRAMS, 0.0)
        self._lock = threading.Lock()

    def _listen(self, event: str, start: float, end: float, **kwargs) -> None:
        if event in self.EVENTS:
            with self._lock:
                self._spans.append((start, end, str(kwargs.get("fun_name", ""))))

    def __enter__(self) -> CompileClock:
        import jax

        jax.monitoring.register_event_time_span_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_time_span_listener(self._listen)

    def seconds(self) -> dict[str, float]:
        return {**self._seconds, "total": sum(self._seconds.values())}

    def chunk_record(self, stats, call_start: float, call_end: float) -> dict:
        with self._lock:
            spans, self._spans = [s for s in self._spans if s[0] >= call_start], []
        # The phases of the call, back to back from its start, in the clock of the events.
        ends = np.cumsum([call_start] + [getattr(stats, f"{name}_ms") / 1e3 for name in self.PHASES])[1:]
        in_phase: dict[str, list] = {name: [] for name in self.PHASES}  # taken out of that phase's ms
        of_program: dict[str, list] = {name: [] for name in self.PROGRAMS}  # counted for that program
        for start, end, fun in spans:
            phase = self.PHASES[min(int(np.searchsorted(ends, start, side="right")), len(self.PHASES) - 1)]
            program = next((name for name in ("denoise", "commit") if name in fun), phase)
            in_phase[phase].append((start, end))
            of_program[program].append((start, end))
        for name, intervals in of_program.items():
            self._seconds[name] += _covered(intervals)
        record = {"index": stats.autoregressive_index, "num_frames": stats.num_frames}
        for name in self.PHASES:
            record[f"{name}_ms"] = max(0.0, getattr(stats, f"{name}_ms") - _covered(in_phase[name]) * 1e3)
        record["total_ms"] = sum(record[f"{name}_ms"] for name in self.PHASES)
        record["compile_ms"] = _covered([(start, end) for start, end, _ in spans]) * 1e3
        return record


def _covered(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


class _ChunkProgress:
    """One line per chunk (`chunk i/N: ms`), or a tqdm bar on a terminal (chunk i/N with the last ms)."""

    def __init__(self, say: Callable[[str], None], slug: str, total: int, *, bar: bool, enabled: bool):
        self.say, self.total, self.done, self.enabled = say, total, 0, enabled
        self.bar = None
        if enabled and bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=slug, unit="chunk", file=sys.stderr, dynamic_ncols=True)

    def chunk(self, record: dict) -> None:
        self.done += 1
        if not self.enabled:
            return
        text = f"{record['total_ms']:.0f} ms"
        if record["compile_ms"] >= 100:
            text += f" + compile {record['compile_ms'] / 1e3:.1f} s"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            self.say(f"chunk {self.done}/{self.total}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _interrupts_ignored():
    """Ctrl-C does nothing inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _write_atomic(path: Path, write) -> None:
    """`write(binary file)` into a temporary name beside `path`, renamed into place when complete."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as f:
        write(f)
    tmp.rename(path)
