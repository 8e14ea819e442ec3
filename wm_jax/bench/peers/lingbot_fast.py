"""lingbot-fast peer: LingBot-World Fast's own causal loop, `wan.image2video_fast.WanI2VFast.generate`
(Robbyant/lingbot-world Fast merge 65d29dd), run eagerly on one device with our shapes and a random
`WanModelFast` (the 14B camera model, control_type 'cam') in `job.dtype`.

Everything upstream is imported from the user's checkout (`job.upstream_dir`, put first on sys.path); the
adapter only replaces what needs files or hardware we do not have, and writes each change as a note:
- `WanI2VFast.__init__` (it loads T5, the VAE and the DiT from a checkpoint folder) is bypassed: the object
  is made with `__new__` and given every attribute `__init__` sets, from upstream's `i2v-A14B` config
  (`wan.configs.WAN_CONFIGS`) as `generate_fast.py` passes it, on one device (sp_size 1, rank 0, no FSDP);
  `param_dtype` (the autocast dtype) and `pipe_dtype` (the KV-cache dtype) are `job.dtype` (upstream bf16).
- the DiT is `WanModelFast` built directly on the device in `job.dtype` (never a float32 copy on the host),
  configured by upstream's own `_configure_model`, filled with `random_weights_`.
- T5 and the VAE are stand-ins: the encoder returns random [text_tokens, text_dim] features; the VAE encode
  returns a random latent of the clip's shape (and checks the clip upstream asked for has our geometry);
  decode returns a zero tensor of the video's shape (an expanded view, no memory).
- flash-attn is not used (`upstream.route_attention`): every `flash_attention` / `attention` name in the
  checkout's modules goes to the repo's own SDPA fallback `attention` (torch `scaled_dot_product_attention`,
  which the runner restricts to cuDNN on CUDA) with flash-attn's dtype rule, and the fallback is forced
  (FLASH_ATTN_*_AVAILABLE False). For a float32 job (CPU checks) both names go to a dtype-keeping SDPA
  instead, since upstream's fallback casts to bfloat16.
- the package `__init__` files of `wan`, `wan.modules` and `wan.utils` are not run (they import the
  text-to-video, animate and s2v stacks, cv2, ...): those packages are registered empty with their real
  `__path__` (`upstream.register_packages`), so only the modules the fast loop imports are loaded;
  third-party modules those import that the loop does not need (or, for torchvision, needs only for
  `to_tensor`) are replaced by `upstream`'s stand-ins when they do not import (`upstream.stub_if_broken`).

The call follows `generate_fast.py` on one GPU: `chunk_size=job.chunk_frames`, `max_area` and `frame_num`
chosen so that upstream's own arithmetic gives our latent grid and `total_blocks * chunk_frames` latent
frames, `shift=job.shift`, `seed=job.seed`, `max_attention_size=None`, `local_attn_size`/`sink_size` from the
job's cache window (`PeerJob.upstream_cache`: upstream's buffer = sink + ring + the current chunk),
upstream's default `timesteps_index` (4 passes), `offload_model=False` (the CLI's single-GPU default is True:
it only adds `torch.cuda.empty_cache()` between calls and moves the model to the host at the end), no
`prewarm` (the CLI does not call it). Inputs: a random image, a slow forward walk
(`poses.npy`, `intrinsics.npy` in a temp folder), a fixed prompt.

Timing: a warm run, as SPEC section 12's hand measurement: one full untimed `generate` with the same
arguments first (`job.warmup_rollouts`; cold, torch's cuDNN SDPA builds a graph for every new key length, which
cost the first pass of each chunk ~30 ms for the 14B model at 464x832 on an H200), then the timed one.
`WanModelFast.forward` is wrapped (`timed_calls`: the device synchronised before and after each call);
calls are labelled by their timestep (t = 0: the commit pass that rewrites the chunk's cache slots with
clean K/V) and checked for the shape and cache offset they received, and each finished AR chunk is written
at once (`ChunkGrouper`: `len(timesteps)` denoise passes then one t = 0 pass; upstream commits after every
chunk, the last one included). `config.outside_model_ms`: each chunk's wall time minus its model calls
(upstream's own work between calls; chunk 0 also holds generate's set-up).

Third-party packages the loop needs: torch, numpy, einops (the model's forward), scipy (camera poses);
Pillow is used for the input image when present. transformers, diffusers, torchvision, tqdm, easydict,
ftfy and regex are used when they import, else replaced by `upstream`'s stand-ins (noted).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import statistics
import tempfile
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wm_jax.bench.peers import upstream
from wm_jax.bench.peers.job import PeerJob, ResultWriter
from wm_jax.bench.peers.torch_timing import (ChunkGrouper, default_device_dtype, random_weights_, timed_calls,
                                             torch_dtype)

TASK = "i2v-A14B"  # generate_fast.py's only task
LATENT_CHANNELS = 16  # generate draws 16-channel noise (the Wan 2.1 VAE's z_dim)
MASK_CHANNELS = 4  # I2V mask channels in `y` (one per pixel frame of a latent frame)
PROMPT = "A slow walk forward along a quiet street, the camera gliding steadily ahead."
INTRINSICS = (502.9, 503.1, 415.8, 239.8)  # fx, fy, cx, cy of a 480x832 frame (upstream's convention)
STEP_UNITS, YAW_PER_FRAME = 0.02, math.radians(0.2)  # the walk: forward step and turn per pixel frame
EMPTY_PACKAGES = ("wan", "wan.modules", "wan.utils")  # packages whose __init__ is not run


# ---------------------------------------------------------------------------------------------------
# Third-party modules the upstream imports need but the fast loop does not use: stand-ins when missing.
# ---------------------------------------------------------------------------------------------------

# top-level packages the loop's modules import, tried in this order (`upstream.stub_if_broken`; transformers and
# diffusers come first, so that they see the real set of installed packages, both probe for torchvision at
# import, before any stand-in exists)
OPTIONAL_MODULES = ("transformers", "diffusers", "torchvision", "tqdm", "easydict", "ftfy", "regex")
# needed by the loop itself, no stand-in: a clear error when missing
REQUIRED_MODULES = {"einops": "rearrange in WanModelFast.forward and generate's camera path",
                    "scipy": "camera pose interpolation (wan/utils/cam_utils.py: interp1d, Slerp)"}


def prepare_modules(writer: ResultWriter) -> None:
    for name, why in REQUIRED_MODULES.items():
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"lingbot-fast needs the package {name!r} ({why}): pip install {name}")
    for top in OPTIONAL_MODULES:
        upstream.stub_if_broken(top, writer)


# ---------------------------------------------------------------------------------------------------
# The checkout.
# ---------------------------------------------------------------------------------------------------


@contextmanager
def _cuda_current_device_on_cpu() -> Iterator[bool]:
    """wan/modules/t5.py evaluates `torch.cuda.current_device()` in a default argument at import; on a
    machine without CUDA that raises, so it answers 0 during the import only."""
    if torch.cuda.is_available():
        yield False
        return
    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    try:
        yield True
    finally:
        torch.cuda.current_device = original


def import_upstream(upstream_dir: str | None, writer: ResultWriter) -> tuple[Path, dict[str, types.ModuleType]]:
    """The checkout and the upstream modules the adapter uses, imported from it without running the `__init__`
    of `wan`, `wan.modules`, `wan.utils`."""
    if not upstream_dir:
        raise ValueError("lingbot-fast needs upstream_dir: a checkout of Robbyant/lingbot-world with the Fast loop")
    root = Path(upstream_dir).expanduser().resolve()
    if not (root / "wan" / "image2video_fast.py").is_file():
        raise FileNotFoundError(f"{root}: no wan/image2video_fast.py (expected a lingbot-world Fast checkout)")
    upstream.checkout_first(root)
    upstream.register_packages(root, EMPTY_PACKAGES, "import the non-fast pipelines", writer)
    with _cuda_current_device_on_cpu() as patched:
        modules = {name: importlib.import_module(f"wan.{name}")
                   for name in ("image2video_fast", "modules.attention", "configs")}
    if patched:
        writer.note("import: torch.cuda.current_device answered 0 while importing (wan/modules/t5.py evaluates it "
                    "in a default argument; no CUDA here)")
    for name, module in modules.items():
        path = Path(module.__file__).resolve()
        if not path.is_relative_to(root):
            raise ImportError(f"imported wan.{name} from {path}, not from the checkout {root}")
    writer.note(f"upstream: {root} (wan.image2video_fast.WanI2VFast.generate, wan.modules.model_fast.WanModelFast)")
    return root, modules


# ---------------------------------------------------------------------------------------------------
# Stand-ins for T5 and the VAE.
# ---------------------------------------------------------------------------------------------------


class TextEncoderStub:
    """In place of upstream's T5EncoderModel: `model` (moved around by generate) and
    `__call__(texts, device)` -> one [text_tokens, text_dim] feature tensor per text."""

    def __init__(self, tokens: int, text_dim: int, dtype: torch.dtype, seed: int):
        self.model = torch.nn.Module()
        self.tokens, self.text_dim, self.dtype, self.seed = tokens, text_dim, dtype, seed

    def __call__(self, texts: list[str], device: torch.device) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed + 1)
        return [torch.randn(self.tokens, self.text_dim, generator=gen).to(device=device, dtype=self.dtype)
                for _ in texts]


class VAEStub:
    """In place of upstream's Wan2_1_VAE: `encode` checks each clip has our geometry (upstream's frame and
    area arithmetic landed where we meant) and returns a random float32 latent [16, lat_f, lat_h, lat_w];
    `decode` returns zeros of the video's shape as an expanded view."""

    def __init__(self, stride: tuple[int, int, int], expected: tuple[int, int, int], device: torch.device, seed: int):
        self.stride, self.expected, self.device, self.seed = stride, expected, device, seed
        self.encoded: list[tuple[int, ...]] = []

    def encode(self, videos: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for video in videos:
            _, frames, height, width = video.shape
            latent = ((frames - 1) // self.stride[0] + 1, height // self.stride[1], width // self.stride[2])
            if latent != self.expected:
                raise ValueError(f"upstream built a clip of {frames} frames at {height}x{width} pixels = latent "
                                 f"{latent[0]}x{latent[1]}x{latent[2]} (frames x h x w); the job needs "
                                 f"{self.expected[0]}x{self.expected[1]}x{self.expected[2]}")
            self.encoded.append(tuple(video.shape))
            gen = torch.Generator().manual_seed(self.seed + 2)
            out.append(torch.randn(LATENT_CHANNELS, *latent, generator=gen).to(self.device))
        return out

    def decode(self, zs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.zeros(3, 1, 1, 1, device=z.device).expand(
            3, (z.shape[1] - 1) * self.stride[0] + 1, z.shape[2] * self.stride[1], z.shape[3] * self.stride[2])
            for z in zs]


# ---------------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------------


def max_area_for(latent_hw: tuple[int, int], pixel_hw: tuple[int, int], stride: tuple[int, ...],
                 patch: tuple[int, ...]) -> int:
    """An integer `max_area` for which generate's size arithmetic (latent side = floor(sqrt(area * aspect)
    / stride / patch) * patch, aspect = the image's h / w) gives `latent_hw`; the middle of the admissible
    interval, so rounding cannot move it."""
    aspect = pixel_hw[0] / pixel_hw[1]
    lo_h, hi_h = ((latent_hw[0] * stride[1]) ** 2 / aspect, ((latent_hw[0] + patch[1]) * stride[1]) ** 2 / aspect)
    lo_w, hi_w = ((latent_hw[1] * stride[2]) ** 2 * aspect, ((latent_hw[1] + patch[2]) * stride[2]) ** 2 * aspect)
    lo, hi = max(lo_h, lo_w), min(hi_h, hi_w)
    if any(side % p for side, p in zip(latent_hw, patch[1:])) or hi - lo < 2:
        raise ValueError(f"no max_area gives a {latent_hw[0]}x{latent_hw[1]} latent grid from a "
                         f"{pixel_hw[0]}x{pixel_hw[1]} image (stride {stride[1:]}, patch {patch[1:]})")
    area = int((lo + hi) / 2)
    got = tuple(int(math.sqrt(area * a) // s // p * p) for a, s, p in
                ((aspect, stride[1], patch[1]), (1 / aspect, stride[2], patch[2])))
    if got != tuple(latent_hw):
        raise ValueError(f"max_area {area} gives a {got} latent grid, not {tuple(latent_hw)}")
    return area


def walk_poses(frames: int) -> np.ndarray:
    """[frames, 4, 4] camera-to-world (OpenCV axes): a slow walk forward while turning slightly right."""
    poses = np.tile(np.eye(4, dtype=np.float64), (frames, 1, 1))
    position = np.zeros(3)
    for i in range(frames):
        yaw = i * YAW_PER_FRAME
        rotation = np.array([[math.cos(yaw), 0.0, math.sin(yaw)], [0.0, 1.0, 0.0], [-math.sin(yaw), 0.0, math.cos(yaw)]])
        poses[i, :3, :3], poses[i, :3, 3] = rotation, position
        position = position + rotation @ np.array([0.0, 0.0, STEP_UNITS])
    return poses.astype(np.float32)


def write_action_folder(folder: Path, frames: int) -> None:
    np.save(folder / "poses.npy", walk_poses(frames))
    np.save(folder / "intrinsics.npy", np.tile(np.asarray(INTRINSICS, np.float32), (frames, 1)))


def input_image(height: int, width: int, seed: int) -> Any:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    try:
        from PIL import Image
    except ImportError:
        return pixels  # to_tensor takes an HWC uint8 array as well
    return Image.fromarray(pixels)


# ---------------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------------


def call_label(args: tuple, kwargs: dict) -> dict[str, Any]:
    """What one `WanModelFast.forward` call received (read after the call was timed)."""
    t = kwargs["t"] if "t" in kwargs else args[1]
    x = kwargs["x"] if "x" in kwargs else args[0]
    cache = kwargs.get("kv_cache")
    return {"t": float(t.reshape(-1)[0]), "shape": list(x[0].shape), "current_start": int(kwargs.get("current_start", 0)),
            "kv_cache_shape": list(cache[0]["k"].shape) if cache else None}


# ---------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------


def check_job(job: PeerJob) -> tuple[torch.dtype, str]:
    dtype = torch_dtype(job.dtype)
    cfg = job.model
    camera = cfg.get("camera_channels")
    if camera != 6 * 64:
        raise ValueError(f"lingbot-fast runs the camera model (control_type 'cam', 6*64 = 384 camera channels); "
                         f"the job's model has camera_channels {camera}")
    if job.latent_channels != LATENT_CHANNELS or cfg["out_dim"] != LATENT_CHANNELS or \
            cfg["in_dim"] != 2 * LATENT_CHANNELS + MASK_CHANNELS:
        raise ValueError(f"generate is written for 16 latent channels (in_dim 36, out_dim 16); the job has "
                         f"{job.latent_channels} latent channels, in_dim {cfg['in_dim']}, out_dim {cfg['out_dim']}")
    if job.tokens_per_frame * 4 != job.latent_height * job.latent_width:
        raise ValueError(f"tokens_per_frame {job.tokens_per_frame} is not {job.latent_height}x{job.latent_width}/4")
    return dtype, "cam"


def build_model(model_fast_cls: type, upstream_cfg: Any, job: PeerJob, dtype: torch.dtype, device: torch.device,
                local_attn_size: int, sink_size: int, control_type: str) -> tuple[torch.nn.Module, dict, int]:
    cfg = job.model
    kwargs = dict(model_type="i2v", control_type=control_type, patch_size=tuple(upstream_cfg.patch_size),
                  text_len=cfg["text_len"], in_dim=cfg["in_dim"], dim=cfg["dim"], ffn_dim=cfg["ffn_dim"],
                  freq_dim=cfg["freq_dim"], text_dim=cfg["text_dim"], out_dim=cfg["out_dim"],
                  num_heads=cfg["num_heads"], num_layers=cfg["num_layers"], local_attn_size=local_attn_size,
                  sink_size=sink_size, qk_norm=bool(upstream_cfg.qk_norm),
                  cross_attn_norm=bool(upstream_cfg.cross_attn_norm), eps=cfg["eps"])
    with default_device_dtype(device, dtype):
        model = model_fast_cls(**kwargs)
    count = random_weights_(model, job.seed)
    return model, kwargs, count


def make_pipeline(i2v_fast: types.ModuleType, upstream_cfg: Any, model: torch.nn.Module, job: PeerJob,
                  dtype: torch.dtype, device: torch.device, local_attn_size: int, sink_size: int,
                  control_type: str) -> Any:
    """A WanI2VFast without its __init__: every attribute __init__ sets, for one device."""
    pipe = i2v_fast.WanI2VFast.__new__(i2v_fast.WanI2VFast)
    pipe.device = device
    pipe.config = upstream_cfg
    pipe.rank = 0
    pipe.t5_cpu = False
    pipe.init_on_cpu = True
    pipe.num_train_timesteps = upstream_cfg.num_train_timesteps
    pipe.boundary = upstream_cfg.boundary
    pipe.param_dtype = dtype
    pipe.pipe_dtype = dtype
    pipe.local_attn_size = local_attn_size
    pipe.sink_size = sink_size
    pipe.control_type = control_type
    pipe.text_encoder = TextEncoderStub(job.text_tokens, job.model["text_dim"], dtype, job.seed)
    pipe.vae_stride = upstream_cfg.vae_stride
    pipe.patch_size = upstream_cfg.patch_size
    pipe.vae = VAEStub(tuple(upstream_cfg.vae_stride), (job.total_blocks * job.chunk_frames, job.latent_height,
                                                        job.latent_width), device, job.seed)
    pipe.model = pipe._configure_model(model=model, use_sp=False, dit_fsdp=False, shard_fn=None,
                                       convert_model_dtype=False).to(device)
    pipe.scheduler = i2v_fast.FlowUniPCMultistepScheduler(num_train_timesteps=pipe.num_train_timesteps, shift=1,
                                                          use_dynamic_shifting=False)
    pipe.sp_size = 1
    pipe.sample_neg_prompt = upstream_cfg.sample_neg_prompt
    return pipe


@dataclasses.dataclass
class Setup:
    """A WanI2VFast ready to roll out the job, and how `generate` is called."""

    job: PeerJob
    device: torch.device
    pipe: Any
    call_kwargs: dict[str, Any]
    passes: int
    config: dict[str, Any]


def setup(job: PeerJob, writer: ResultWriter, device: torch.device) -> Setup:
    """Imports the checkout, builds the random model and the pipeline, records `config` and the notes."""
    dtype, control_type = check_job(job)
    prepare_modules(writer)
    root, modules = import_upstream(job.upstream_dir, writer)
    i2v_fast = modules["image2video_fast"]
    upstream_cfg = modules["configs"].WAN_CONFIGS[TASK]
    upstream.route_attention(root, modules["modules.attention"], dtype, writer)

    defaults = {name: p.default for name, p in inspect.signature(i2v_fast.WanI2VFast.generate).parameters.items()}
    timesteps_index = list(defaults["timesteps_index"])
    if len(job.timesteps) != len(timesteps_index):
        raise ValueError(f"upstream's fast loop runs {len(timesteps_index)} passes per chunk (timesteps_index "
                         f"{timesteps_index}); the job asks for {len(job.timesteps)}")
    local_attn_size, sink_size = job.upstream_cache()
    latent_frames = job.total_blocks * job.chunk_frames
    frame_num = (latent_frames - 1) * upstream_cfg.vae_stride[0] + 1
    max_area = max_area_for((job.latent_height, job.latent_width), (job.pixel_height, job.pixel_width),
                            tuple(upstream_cfg.vae_stride), tuple(upstream_cfg.patch_size))

    model, model_kwargs, num_params = build_model(i2v_fast.WanModelFast, upstream_cfg, job, dtype, device,
                                                  local_attn_size, sink_size, control_type)
    pipe = make_pipeline(i2v_fast, upstream_cfg, model, job, dtype, device, local_attn_size, sink_size, control_type)
    writer.note(f"WanI2VFast.__init__ bypassed (no checkpoint): __new__ + its attributes from WAN_CONFIGS[{TASK!r}], "
                f"control_type {control_type!r}, param_dtype = pipe_dtype = {job.dtype} (upstream bfloat16), "
                f"sp_size 1, rank 0, t5_cpu False")
    writer.note(f"WanModelFast built on {device} in {job.dtype} from the job's config, random weights "
                f"({num_params:,} parameters), configured by upstream's _configure_model")
    writer.note(f"stub: T5 text encoder -> random [{job.text_tokens}, {job.model['text_dim']}] features per prompt")
    writer.note("stub: Wan VAE -> encode returns a random [16, lat_f, lat_h, lat_w] float32 latent (after checking "
                "the clip's geometry); decode returns zeros of the video's shape (expanded view)")

    call_kwargs = dict(chunk_size=job.chunk_frames, max_area=max_area, frame_num=frame_num, shift=job.shift,
                       seed=job.seed, offload_model=False, max_attention_size=None)
    if job.model["text_len"] != defaults["max_sequence_length"]:
        call_kwargs["max_sequence_length"] = job.model["text_len"]
    if job.chunk_frames != 3:
        writer.note(f"chunk_size {job.chunk_frames} (generate_fast.py passes 3)")
    if job.shift != upstream_cfg.sample_shift:
        writer.note(f"shift {job.shift} (generate_fast.py passes the config's sample_shift {upstream_cfg.sample_shift})")
    writer.note("generate: offload_model False (generate_fast.py's single-GPU default is True: empty_cache between "
                "calls, model to the host at the end); no prewarm (the CLI does not call it); max_attention_size None")
    config = {
        "loop": "wan.image2video_fast.WanI2VFast.generate", "model_class": "wan.modules.model_fast.WanModelFast",
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model_kwargs.items()},
        "num_params": num_params, "dtype": job.dtype, "param_dtype": job.dtype, "pipe_dtype": job.dtype,
        "chunk_size": job.chunk_frames, "chunks": job.total_blocks, "frame_num": frame_num, "max_area": max_area,
        "image_hw": [job.pixel_height, job.pixel_width], "latent_shape": [LATENT_CHANNELS, latent_frames,
                                                                        job.latent_height, job.latent_width],
        "tokens_per_frame": job.tokens_per_frame, "local_attn_size": local_attn_size, "sink_size": sink_size,
        "max_attention_size": None, "timesteps_index": timesteps_index, "shift": job.shift, "seed": job.seed,
        "text_tokens": job.text_tokens, "text_len": job.model["text_len"], "offload_model": False, "sp_size": 1,
        "device": str(device)}
    writer.set(config=config)
    return Setup(job, device, pipe, call_kwargs, len(timesteps_index), config)


class DiscardWriter:
    """A writer for the warm-up rollout: chunks and notes are dropped."""

    def chunk(self, *args: Any) -> None:
        pass

    def note(self, line: str) -> None:
        pass


def rollout(s: Setup, writer: ResultWriter | DiscardWriter) -> tuple[list[dict], list[float]]:
    """One `generate` call (fresh caches, as every call makes its own) with each model call timed and checked,
    and each finished chunk written to `writer`; returns the labels of chunk 0's calls and the `outside_ms`
    of every chunk."""
    job, pipe = s.job, s.pipe
    chunks = ChunkGrouper(writer, s.passes, job.context_timestep, job.total_blocks)
    chunk_shape = [LATENT_CHANNELS, job.chunk_frames, job.latent_height, job.latent_width]
    first: list[dict] = []

    def record(ms: float, args: tuple, kwargs: dict) -> None:
        label = call_label(args, kwargs)
        start = chunks.index * job.chunk_frames * job.tokens_per_frame
        if label["shape"] != chunk_shape or label["current_start"] != start:
            raise ValueError(f"model call {len(chunks.pending) + 1} of chunk {chunks.index}: latent {label['shape']} "
                             f"at token {label['current_start']}, the job needs {chunk_shape} at token {start}")
        if chunks.index == 0:
            first.append(label)
        chunks.add(ms, label["t"])

    with tempfile.TemporaryDirectory(prefix="wm_jax_lingbot_fast_") as folder:
        write_action_folder(Path(folder), s.call_kwargs["frame_num"])
        with timed_calls(pipe.model, "forward", s.device, record):
            pipe.generate(PROMPT, input_image(job.pixel_height, job.pixel_width, job.seed), action_path=folder,
                          **s.call_kwargs)
    chunks.finish(last_commit_optional=True)  # 65d29dd commits after every chunk; this is for other versions
    return first, chunks.outside_ms


def run(job: PeerJob, writer: ResultWriter, device: torch.device) -> None:
    s = setup(job, writer, device)
    # job.warmup_rollouts untimed rollouts first: torch's cuDNN SDPA builds a graph per new key length, so cold,
    # the first pass of every chunk of a growing cache pays for it (~30 ms a chunk, 14B at 464x832 on an H200)
    warmup = job.warmup_rollouts
    for _ in range(warmup):
        start = time.perf_counter()
        try:
            rollout(s, DiscardWriter())
        except Exception as err:
            raise RuntimeError(f"in the warm-up rollout: {type(err).__name__}: {err}") from err
        writer.note(f"warm-up: one full generate with the same arguments, untimed, before the timed one "
                    f"({time.perf_counter() - start:.1f} s; the KV shapes of every chunk seen once)")
    s.config["warmup_rollouts"] = warmup
    first, outside_ms = rollout(s, writer)
    s.config.update(timesteps=[label["t"] for label in first[:-1]], context_timestep=first[-1]["t"],
                    kv_cache_shape=first[0]["kv_cache_shape"], vae_encode_input=list(s.pipe.vae.encoded[0]),
                    outside_model_ms=[round(ms, 3) for ms in outside_ms])
    writer.set(config=s.config)
    if outside_ms[1:]:
        writer.note(f"outside the model: median {statistics.median(outside_ms[1:]):.1f} ms per chunk (chunks >= 1: "
                    f"a chunk's wall time minus its model calls; config.outside_model_ms)")
    if any(abs(a - b) > 1.0 for a, b in zip(s.config["timesteps"], job.timesteps)):
        writer.note(f"timesteps: upstream's default table gave {s.config['timesteps']}, the job's recipe "
                    f"{list(job.timesteps)} (a model call's cost does not depend on t)")
