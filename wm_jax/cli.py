"""`wm-jax` command line: one absl app per command.

    wm-jax convert --src PATH --dst DIR       upstream checkpoint -> converted wm_jax folder
    wm-jax parity CASE_DIR [--out OUT.npz]    run a golden parity case through our implementation

Each command defines its own flags only when it is chosen, so `wm-jax <command> --help` lists just
that command's flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
USAGE = """usage: wm-jax <command> [flags]

commands:
  run       stream a world from a recipe: wm-jax run tiny (random weights, seconds on a CPU)
  serve     a live world in the browser, steered with the keyboard and mouse: wm-jax serve tiny
  convert   convert an upstream PyTorch checkpoint (safetensors, sharded, diffusers, Self-Forcing .pt)
  parity    run a golden parity case folder through wm_jax and compare with upstream outputs

`wm-jax <command> --help` lists the command's flags.
"""


class UsageError(app.UsageError):
    pass


# ---------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------


def _define_convert_flags():
    flags.DEFINE_string("src", None, "Checkpoint to convert: a .safetensors file, a *.safetensors.index.json, "
                        "a folder of shards, a folder with high_noise_model/ + low_noise_model/, or a .pt/.pth "
                        "(needs --allow_pickle). With --hub_repo: a path inside the downloaded repo.")
    flags.DEFINE_string("dst", None, "Output folder (created atomically; must not exist unless --overwrite).")
    flags.DEFINE_string("hub_repo", None, "Download the checkpoint from this Hugging Face repo first "
                        "(e.g. robbyant/lingbot-world-fast); cached locally.")
    flags.DEFINE_list("allow_patterns", None, "With --hub_repo: only download files matching these globs "
                      "(default: *.safetensors, *.json, and --src's folder if given).")
    flags.DEFINE_string("cache_dir", None, "With --hub_repo: hub cache folder (default: HF_HOME).")
    flags.DEFINE_enum("kind", "auto", ["auto", "wan_dit", "wan_vae", "wan2_2_vae", "taehv", "umt5"],
                      "What the checkpoint holds; auto detects it from the key names.")
    flags.DEFINE_bool("allow_pickle", False, "Allow reading .pt/.pth torch pickles (they can run code when "
                      "loaded: only for files you trust).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --dst.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"], "Storage dtype of the weights "
                      "(default: as stored in the checkpoint; norm and modulation weights stay float32).")
    flags.DEFINE_integer("num_heads", None, "Override the inferred attention head count (default dim/128).")
    flags.DEFINE_multi_string("override", [], "Override an inferred config field, KEY=VALUE (repeatable), "
                              "e.g. --override eps=1e-6.")
    flags.DEFINE_float("boundary", None, "Expert pairs: switch to the high-noise expert while t >= "
                       "boundary*1000 (default from the architecture: 0.875 T2V, 0.900 I2V, 0.947 LingBot).")


def _parse_overrides(items: list[str]) -> dict:
    import json

    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--override {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _convert_main(argv):
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments {argv[1:]}")
    import converters
    from converters import wan_dit
    from wm_jax.io.hub import download
    from wm_jax.io.tensor_sources import open_source

    if not FLAGS.dst:
        raise UsageError("--dst is required")
    if not FLAGS.src and not FLAGS.hub_repo:
        raise UsageError("--src (a local checkpoint) or --hub_repo is required")
    overrides = _parse_overrides(FLAGS.override)
    if FLAGS.num_heads:
        overrides["num_heads"] = FLAGS.num_heads
    src = Path(FLAGS.src) if FLAGS.src else None
    if FLAGS.hub_repo:
        patterns = FLAGS.allow_patterns or (
            [f"{src}/*"] if src and not src.suffix else [str(src)] if src else ["*.safetensors", "*.json"])
        root = download(FLAGS.hub_repo, patterns, cache_dir=FLAGS.cache_dir)
        src = root / src if src else root
    progress = _Progress()
    options = dict(overwrite=FLAGS.overwrite, dtype=FLAGS.dtype, config_overrides=overrides, on_tensor=progress)
    if wan_dit.is_expert_folder(src):
        open_fn = lambda p: open_source(p, allow_pickle=FLAGS.allow_pickle,
                                        prefer_entries=converters.PREFERRED_ENTRIES)
        manifest = wan_dit.convert_experts(src, FLAGS.dst, open_fn=open_fn, boundary=FLAGS.boundary, **options)
    else:
        manifest = converters.convert_path(src, FLAGS.dst, kind=FLAGS.kind, allow_pickle=FLAGS.allow_pickle,
                                           **options)
    print(f"converted {src} -> {FLAGS.dst} ({manifest['kind']}, {progress.count} tensors)")
    print("config: " + ", ".join(f"{k}={v}" for k, v in manifest["config"].items() if v is not None))


class _Progress:
    def __init__(self):
        self.count = 0

    def __call__(self, key: str):
        self.count += 1
        if self.count % 200 == 0:
            logging.info("converted %d tensors (last: %s)", self.count, key)


# ---------------------------------------------------------------------------------------------------
# parity
# ---------------------------------------------------------------------------------------------------


def _define_parity_flags():
    flags.DEFINE_string("out", None, "Write our outputs here (.npz, the golden array names).")
    flags.DEFINE_float("tolerance", None, "Maximum relative L2 error per array (default 1e-5).")


def _parity_main(argv):
    import numpy as np

    from wm_jax import parity

    if len(argv) != 2:
        raise UsageError("usage: wm-jax parity CASE_DIR [--out OUT.npz] [--tolerance T]")
    case_dir = Path(argv[1])
    tolerance = FLAGS.tolerance if FLAGS.tolerance is not None else parity.DEFAULT_TOLERANCE
    outputs = parity.run_case(case_dir)
    if FLAGS.out:
        out = Path(FLAGS.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial.npz")
        np.savez(tmp, **outputs)
        tmp.rename(out)
        print(f"wrote {out} ({len(outputs)} arrays)")
    golden_file = case_dir / "outputs.npz"
    if not golden_file.is_file():
        print(f"{case_dir}: no outputs.npz, nothing to compare")
        return 0
    with np.load(golden_file) as npz:
        golden = {k: npz[k] for k in npz.files}
    errors = parity.compare(outputs, golden)
    width = max(len(k) for k in errors)
    print(f"{'array':<{width}}  {'shape':<22} rel L2    status")
    for name, err in errors.items():
        status = "ok" if err <= tolerance else "FAIL"
        print(f"{name:<{width}}  {str(list(golden[name].shape)):<22} {err:.2e}  {status}")
    worst = max(errors.values())
    print(f"max relative L2 {worst:.2e} (tolerance {tolerance:.0e}): {'PASS' if worst <= tolerance else 'FAIL'}")
    return 0 if worst <= tolerance else 1


def _define_device_flags():
    """Devices of the run: a mesh over --num_devices devices; several hosts join through jax.distributed."""
    flags.DEFINE_integer("num_devices", None, "Devices to run on (default: every device present; with several "
                         "processes: every device of every process). Tokens and attention heads are split over "
                         "them (Ulysses sequence parallelism); the result is the same on any count.")
    flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0's coordinator "
                        "(jax.distributed); with --num_processes and --process_id. Only process 0 writes outputs.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: how many processes (one per host) join the run.")
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0 .. num_processes-1.")
    flags.DEFINE_integer("coordinator_timeout", 120, "Multi-host: seconds to wait for every process to join "
                         "before giving up with an error.")


def _join_processes():
    """Initialises jax.distributed when the multi-host flags are given (before any other JAX work)."""
    names = ("coordinator_address", "num_processes", "process_id")
    missing = [f"--{name}" for name in names if getattr(FLAGS, name) is None]
    if len(missing) == len(names):
        return
    if missing:
        raise UsageError("--coordinator_address, --num_processes and --process_id go together (multi-host): "
                         f"missing {', '.join(missing)}")
    host, _, port = FLAGS.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--coordinator_address {FLAGS.coordinator_address}: expected HOST:PORT (process 0's host)")
    if FLAGS.coordinator_timeout <= 0:
        raise UsageError(f"--coordinator_timeout {FLAGS.coordinator_timeout}: expected a positive number of seconds")
    from wm_jax.parallel.mesh import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           timeout_s=FLAGS.coordinator_timeout)


WORLD_FLAGS = ("pixel_height", "pixel_width", "fps", "seed", "prompt", "image", "example_data", "example_idx",
               "checkpoint", "hub_repo", "allow_pickle", "world_scale", "compute_dtype", "num_devices")


def _define_world_flags():
    """The flags `run` and `serve` share: devices, the recipe's sizes and seed, the scene, the weights."""
    _define_device_flags()
    flags.DEFINE_integer("pixel_height", None, "Video height, multiple of 16 (default: the recipe's).")
    flags.DEFINE_integer("pixel_width", None, "Video width, multiple of 16 (default: the recipe's).")
    flags.DEFINE_integer("fps", None, "Frame rate of the video (default 16).")
    flags.DEFINE_integer("seed", None, "Noise seed (default: the recipe's, 42).")
    flags.DEFINE_string("prompt", None, "Text prompt (default: the example's or the recipe's).")
    flags.DEFINE_string("image", None, "I2V conditioning image (resized to the video size).")
    flags.DEFINE_bool("example_data", False, "Use a LingBot example scene (image, poses, intrinsics, prompt).")
    flags.DEFINE_integer("example_idx", 0, "Example scene: 0, 1, 2, 5 (upstream, downloaded once into "
                         "assets/example_data/lingbot_world/NN/) or -1 (the small scene shipped in the repo).")
    flags.DEFINE_string("checkpoint", None, "Folder of converted components (dit/, text_encoder/, vae/, decoder/); "
                        "missing ones are downloaded from the recipe's hub repos and converted there.")
    flags.DEFINE_string("hub_repo", None, "Override the DiT's hub repo.")
    flags.DEFINE_bool("allow_pickle", False, "Allow converting upstream .pth/.pt pickles (T5, VAE, Self-Forcing).")
    flags.DEFINE_float("world_scale", None, "Camera translation scale for streaming (default 1.2712).")
    flags.DEFINE_enum("compute_dtype", "auto", ["auto", "float32", "bfloat16"], "auto: bfloat16 on GPU, float32 on CPU.")


def _define_run_flags():
    _define_world_flags()
    flags.DEFINE_integer("total_blocks", None, "Chunks (AR steps) of 3 latent frames (default: the recipe's).")
    flags.DEFINE_string("poses", None, "Camera trajectory poses.npy [N,4,4] camera-to-world, OpenCV axes.")
    flags.DEFINE_string("intrinsics", None, "intrinsics.npy [N,4] (fx, fy, cx, cy) for a 480x832 frame.")
    flags.DEFINE_string("output_dir", "outputs", "Where <slug>.mp4 and stats_<slug>.json are written.")
    flags.DEFINE_bool("save_latents", False, "Also write latents_<slug>.npy (clean latents, [F, h, w, C]).")
    flags.DEFINE_float("shift", None, "Override the schedule shift (Self-Forcing: 5 official CLI, 8 FlashDreams).")
    flags.DEFINE_enum("camera_mode", "stream", ["stream", "clip"], "stream: fixed world scale, per chunk; clip: "
                      "upstream's clip-wide max translation (parity with whole-clip runs).")
    flags.DEFINE_enum("pose_mode", "strict", ["strict", "hold"], "Too few poses: error (strict) or repeat the last.")


def _run_main(argv):
    from wm_jax.streaming.recipes import SLUGS
    from wm_jax.streaming.run import RunOptions, run

    if len(argv) != 2:
        raise UsageError(f"usage: wm-jax run <slug> [flags]; slugs: {', '.join(SLUGS)}")
    _join_processes()
    names = [f.name for f in __import__("dataclasses").fields(RunOptions) if f.name != "slug"]
    report = run(RunOptions(slug=argv[1], **{n: getattr(FLAGS, n) for n in names}))
    steps = report["steps"]
    import jax

    if jax.process_index() != 0:
        return
    print(f"wrote {report['video']} ({report['num_frames']} frames) and stats_{report['slug']}.json; "
          f"compile {report['compile_seconds']:.1f} s; last step denoise {steps[-1]['denoise_ms']:.1f} ms, "
          f"commit {steps[-1]['commit_ms']:.1f} ms, decode {steps[-1]['decode_ms']:.1f} ms")


def _define_serve_flags():
    _define_world_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only; reach a remote "
                        "server through ssh -L).")
    flags.DEFINE_integer("port", 8089, "Port of the page, the health check and the video WebSocket.")
    flags.DEFINE_string("state_dir", None, "Save the world here when a visitor leaves and when the server stops; "
                        "a world saved here is continued at the next start.")


def _serve_main(argv):
    import asyncio

    from absl import logging as absl_logging

    from wm_jax.serve.launch import build_world, serve_forever
    from wm_jax.serve.server import WorldServer
    from wm_jax.streaming.recipes import SLUGS
    from wm_jax.streaming.run import RunOptions

    if len(argv) > 2:
        raise UsageError(f"usage: wm-jax serve [slug] [flags]; slugs: {', '.join(SLUGS)}")
    _join_processes()
    import jax

    if jax.process_count() > 1:
        raise UsageError("wm-jax serve runs in one process (its devices may be several GPUs); drop the multi-host flags")
    slug = argv[1] if len(argv) == 2 else "tiny"
    options = RunOptions(slug=slug, **{n: getattr(FLAGS, n) for n in WORLD_FLAGS})

    def log(line: str) -> None:
        print(f"[{__import__('time').strftime('%H:%M:%S')}] {line}", flush=True)

    absl_logging.set_verbosity(absl_logging.WARNING)
    world, resumed = build_world(options, log, FLAGS.state_dir)
    server = WorldServer(world, log=log, state_dir=FLAGS.state_dir, resumed=resumed)
    asyncio.run(serve_forever(server, FLAGS.host, FLAGS.port, log))


COMMAND_ARGS = {"run": "<slug> [flags]  (slugs: tiny, self-forcing-wan2.1-t2v-1.3b[-taehv], lingbot-world-fast, "
                       "lingbot-world-fast-taehv-window15-sink3)", "serve": "[slug] [flags]  (default slug: tiny)",
                "convert": "--src PATH --dst DIR [flags]", "parity": "CASE_DIR [--out OUT.npz] [--tolerance T]"}
COMMANDS = {
    "run": (_define_run_flags, _run_main),
    "serve": (_define_serve_flags, _serve_main),
    "convert": (_define_convert_flags, _convert_main),
    "parity": (_define_parity_flags, _parity_main),
}


def run():
    """Console-script entry point."""
    argv = sys.argv
    if len(argv) < 2 or argv[1] not in COMMANDS:
        sys.stderr.write(USAGE)
        sys.exit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help", "help") else 2)
    command = argv[1]
    define, main = COMMANDS[command]
    define()
    if any(a in ("-h", "--help", "-help", "--helpshort") for a in argv[2:]):
        print(f"usage: wm-jax {command} {COMMAND_ARGS[command]}\n")
        print(FLAGS.module_help(__name__))
        sys.exit(0)
    app.run(_friendly_errors(main), argv=[f"wm-jax {command}", *argv[2:]])


def flag_style(name: str) -> str:
    """How the CLI writes an option named in an error message (see wm_jax.errors)."""
    return f"--{name}"


def _friendly_errors(main):
    """Known error types end the program with their message (no traceback) and exit code 1; options
    named in a message are written as flags."""

    def wrapped(argv):
        from wm_jax.errors import TemplatedError
        from wm_jax.io.hub import HubError
        from wm_jax.io.safetensors_io import CheckpointError
        from wm_jax.models.text_encoding import TokenizerNotFoundError
        from wm_jax.parity import ParityError
        from wm_jax.streaming.memory import DeviceMemoryError

        try:
            return main(argv)
        except (CheckpointError, DeviceMemoryError, HubError, ParityError, TemplatedError, TokenizerNotFoundError,
                ValueError) as err:
            message = err.render(flag_style) if isinstance(err, TemplatedError) else str(err)
            sys.stderr.write(f"wm-jax: error: {message}\n")
            sys.exit(1)

    return wrapped


if __name__ == "__main__":
    run()
