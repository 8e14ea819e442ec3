"""`wm-jax` command line: one command per world task, each with its own absl flags.

    wm-jax run <slug> [flags]                  stream a world from a recipe -> <slug>.mp4 + stats_<slug>.json
    wm-jax serve [slug] [flags]                the same world live in the browser
    wm-jax convert --src PATH --dst DIR        upstream checkpoint -> converted wm_jax folder
    wm-jax parity CASE_DIR [--out OUT.npz]     run a golden parity case through our implementation

Each command defines its own flags only when it is chosen, so `wm-jax <command> --help` lists just that
command's flags, grouped by topic; `wm-jax run <slug> --help` starts with the recipe's defaults.

What a newcomer sees: a few short stage lines and a progress bar, then one result line. Log lines of
JAX, orbax and absl stay hidden unless `--verbosity` (`-v`) asks for them; warnings are one
`wm-jax: warning: ...` line each. Every flag is checked before anything is loaded: a bad value ends with
one `wm-jax: error: --flag VALUE: expected ...` line and exit code 1; a usage mistake (unknown command
or flag, missing argument) with exit code 2; Ctrl-C with exit code 130, keeping what `run` had made.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import textwrap
from pathlib import Path

from absl import app, flags, logging

from wm_jax.kernels import ATTENTION_IMPLEMENTATIONS

FLAGS = flags.FLAGS
USAGE = """usage: wm-jax <command> [flags]

commands:
  run       stream a world from a recipe: wm-jax run tiny (a small trained world, seconds on a CPU)
  serve     a live world in the browser, steered with the keyboard and mouse: wm-jax serve tiny
  convert   convert an upstream PyTorch checkpoint (safetensors, sharded, diffusers, Self-Forcing .pt)
  parity    run a golden parity case folder through wm_jax and compare with upstream outputs
  train     train a world from a config: wm-jax train configs/train_tiny_world.py --workdir runs/tiny_world
  bench     per-step latency of a recipe at full size on random weights, peers' own loops in the same call:
            wm-jax bench self-forcing-wan2.1-t2v-1.3b --peer self-forcing --upstream_dir ~/Self-Forcing

`wm-jax <command> --help` lists the command's flags; `wm-jax run --help` the recipes.
`wm-jax --version` prints the version.
"""
WIDTH = 100  # help text width


class UsageError(app.UsageError):
    """The command line itself is wrong (arguments, not flag values): exit code 2 with the usage."""


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
        raise UsageError(f"unexpected arguments {' '.join(argv[1:])}")
    if not FLAGS.dst:
        raise UsageError("--dst is required")
    if not FLAGS.src and not FLAGS.hub_repo:
        raise UsageError("--src (a local checkpoint) or --hub_repo is required")
    if FLAGS.num_heads is not None and FLAGS.num_heads <= 0:
        _bad_value("num_heads", "a positive number of attention heads")
    if FLAGS.boundary is not None and not 0 < FLAGS.boundary < 1:
        _bad_value("boundary", "a fraction between 0 and 1")
    if FLAGS.src and not FLAGS.hub_repo and not Path(FLAGS.src).exists():
        _bad_value("src", "a checkpoint file or folder (no such path)")
    if Path(FLAGS.dst).is_file():
        _bad_value("dst", "a folder to create (it is a file)")
    overrides = _parse_overrides(FLAGS.override)
    if FLAGS.num_heads:
        overrides["num_heads"] = FLAGS.num_heads

    import converters
    from wm_jax.io.hub import HubError, download

    src = Path(FLAGS.src) if FLAGS.src else None
    if FLAGS.hub_repo:
        patterns = FLAGS.allow_patterns or (
            [f"{src}/*"] if src and not src.suffix else [str(src)] if src else ["*.safetensors", "*.json"])
        _stage(f"downloading {FLAGS.hub_repo} ({', '.join(patterns)}) unless cached")
        try:
            root = download(FLAGS.hub_repo, patterns, cache_dir=FLAGS.cache_dir)
        except HubError as err:
            raise HubError(f"{err.args[0]}\nOr download it anywhere and pass that folder as {{src}} PATH "
                           "(without {hub_repo}).") from None
        src = root / src if src else root
    _stage(f"converting {src} into {FLAGS.dst}")
    progress = _Progress()
    manifest = converters.convert_path(src, FLAGS.dst, kind=FLAGS.kind, allow_pickle=FLAGS.allow_pickle,
                                       boundary=FLAGS.boundary, overwrite=FLAGS.overwrite, dtype=FLAGS.dtype,
                                       config_overrides=overrides, on_tensor=progress)
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

    if len(argv) != 2:
        raise UsageError("expected one golden case folder: wm-jax parity CASE_DIR [--out OUT.npz] [--tolerance T]")
    if FLAGS.tolerance is not None and FLAGS.tolerance <= 0:
        _bad_value("tolerance", "a positive relative L2 error")
    case_dir = Path(argv[1])
    if not case_dir.is_dir():
        raise UsageError(f"{case_dir}: not a folder (a golden parity case folder)")

    from wm_jax import parity

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


# ---------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------


def _define_bench_flags():
    from wm_jax.bench.peers import PEERS

    flags.DEFINE_integer("total_blocks", 7, "AR steps (chunks) per rollout; the first --warmup_chunks are left out "
                         "of the medians.")
    flags.DEFINE_integer("warmup_chunks", 2, "Leading chunks left out of the medians (FlashDreams: 2).")
    flags.DEFINE_integer("rollouts", 1, "Repeat the whole rollout (fresh cache) for more samples.")
    flags.DEFINE_integer("warmup_rollouts", 1, "Untimed whole rollouts every runtime (ours and each peer) runs "
                         "first: eager torch builds cuDNN plans per key length on first use.")
    flags.DEFINE_integer("pixel_height", None, "Video height, multiple of 16 (default: the recipe's).")
    flags.DEFINE_integer("pixel_width", None, "Video width, multiple of 16 (default: the recipe's).")
    flags.DEFINE_list("decoders", ["taehv", "wan_vae"], "Decoders timed after each step (taehv, wan_vae); end to "
                      "end counts the recipe's own.")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and compute dtype.")
    flags.DEFINE_integer("num_devices", 1, "Devices of the Ulysses mesh (tokens and heads split over them).")
    flags.DEFINE_list("attention", None, "Our attention backends, each timed in its own rollout: "
                      + ", ".join(ATTENTION_IMPLEMENTATIONS) + " (default: auto, the fastest measured on this GPU "
                      "kind, plus cudnn, the peers' attention, when a --peer runs).")
    flags.DEFINE_multi_string("peer", [], "Run this peer's own loop in the same call: " + ", ".join(PEERS))
    flags.DEFINE_multi_string("upstream_dir", [], "The peer's checkout: DIR with one --peer; NAME=DIR per peer with "
                              "several (diffusers-wan: optional, default the installed diffusers)")
    flags.DEFINE_integer("peer_timeout", 1200, "Seconds a peer may run before it is stopped (its chunks so far "
                         "are kept).")
    flags.DEFINE_bool("peer_compile", True, "diffusers-wan: also time the torch.compile'd forward.")
    flags.DEFINE_integer("forward_frames", None, "Latent frames of the bidirectional forward compared with "
                         "diffusers-wan (default: the whole rollout, total_blocks x chunk frames).")
    flags.DEFINE_string("output_dir", "benchmarks/results", "Where bench_<slug>_<gpu>_<date>.json and its .png "
                        "are written.")
    flags.DEFINE_string("json", None, "Write the JSON here instead (the plot goes beside it).")


def _bench_main(argv):
    if len(argv) != 2:
        raise UsageError("expected one recipe: wm-jax bench <slug> [flags] (wm-jax run --help lists the recipes)")
    slug = argv[1]
    _check_slug(slug)
    from wm_jax.bench.peers import check_checkout, pair_peers

    peers = pair_peers([n for item in FLAGS.peer for n in item.split(",") if n], FLAGS.upstream_dir)
    for name, folder in peers:  # before anything heavy; warnings print again when the run starts
        check_checkout(name, folder)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # grow on demand: peers share the GPU
    import jax

    from wm_jax.bench import report as R
    from wm_jax.bench import step_latency as S

    if FLAGS.num_devices > jax.device_count():
        _bad_value("num_devices", f"at most the {jax.device_count()} devices present")
    json_path = FLAGS.json or str(S.results_path(FLAGS.output_dir, slug, jax.devices()[0].device_kind,
                                                 FLAGS.num_devices))
    options = S.BenchOptions(
        slug=slug, pixel_height=FLAGS.pixel_height, pixel_width=FLAGS.pixel_width, total_blocks=FLAGS.total_blocks,
        rollouts=FLAGS.rollouts, warmup_rollouts=FLAGS.warmup_rollouts, warmup_chunks=FLAGS.warmup_chunks,
        decoders=tuple(FLAGS.decoders), attention=tuple(FLAGS.attention) if FLAGS.attention else None,
        dtype=FLAGS.dtype, num_devices=FLAGS.num_devices, peers=peers, peer_timeout=float(FLAGS.peer_timeout),
        peer_compile=FLAGS.peer_compile, forward_frames=FLAGS.forward_frames, json=json_path,
        plot=str(Path(json_path).with_suffix(".png")))
    report = S.run_bench(options, log=_stage)
    print(R.format_report(report))
    return 0


# ---------------------------------------------------------------------------------------------------
# run and serve
# ---------------------------------------------------------------------------------------------------


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


def _check_process_flags():
    """The multi-host flags: all three or none, each in range (before any JAX work)."""
    names = ("coordinator_address", "num_processes", "process_id")
    missing = [f"--{name}" for name in names if getattr(FLAGS, name) is None]
    if len(missing) == len(names):
        return False
    if missing:
        raise UsageError("--coordinator_address, --num_processes and --process_id go together (multi-host): "
                         f"missing {', '.join(missing)}")
    host, _, port = FLAGS.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        _bad_value("coordinator_address", "HOST:PORT (process 0's host)")
    if FLAGS.num_processes <= 0:
        _bad_value("num_processes", "at least 1 process")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
        _bad_value("process_id", f"0 .. {FLAGS.num_processes - 1} (--num_processes {FLAGS.num_processes})")
    if FLAGS.coordinator_timeout <= 0:
        _bad_value("coordinator_timeout", "a positive number of seconds")
    return True


def _join_processes():
    """Initialises jax.distributed when the multi-host flags are given (before any other JAX work)."""
    if not _check_process_flags():
        return
    from wm_jax.parallel.mesh import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           timeout_s=FLAGS.coordinator_timeout)


WORLD_FLAGS = ("pixel_height", "pixel_width", "fps", "seed", "prompt", "image", "example_data", "example_idx",
               "checkpoint", "hub_repo", "allow_pickle", "world_scale", "compute_dtype", "num_devices",
               "random_weights", "attention")


def _define_world_flags():
    """The flags `run` and `serve` share: devices, the recipe's sizes and seed, the scene, the weights."""
    _define_device_flags()
    flags.DEFINE_integer("pixel_height", None, "Video height, multiple of 16 (default: the recipe's).")
    flags.DEFINE_integer("pixel_width", None, "Video width, multiple of 16 (default: the recipe's).")
    flags.DEFINE_integer("fps", None, "Frame rate of the video (default: the recipe's, 16).")
    flags.DEFINE_integer("seed", None, "Noise seed, 0 .. 2^32-1 (default: the recipe's, 42).")
    flags.DEFINE_string("prompt", None, "Text prompt (default: the example's or the recipe's).")
    flags.DEFINE_string("image", None, "I2V conditioning image (resized to the video size).")
    flags.DEFINE_bool("example_data", False, "Use a LingBot example scene (image, poses, intrinsics, prompt).")
    flags.DEFINE_integer("example_idx", 0, "Example scene: 0, 1, 2, 5 (upstream, downloaded once into "
                         "assets/example_data/lingbot_world/NN/) or -1 (the small scene shipped in the repo).")
    flags.DEFINE_string("checkpoint", None, "Folder of converted components (dit/, text_encoder/, vae/, decoder/); "
                        "missing ones are downloaded from the recipe's hub repos and converted there.")
    flags.DEFINE_string("hub_repo", None, "Override the DiT's hub repo.")
    flags.DEFINE_bool("allow_pickle", False, "Allow converting upstream .pth/.pt pickles (T5, VAE, Self-Forcing).")
    flags.DEFINE_bool("random_weights", False, "Seeded random weights of the recipe's shapes instead of its shipped "
                      "or checkpoint weights (tests, benchmarks).")
    flags.DEFINE_float("world_scale", None, "Camera translation scale for streaming (default 1.2712).")
    flags.DEFINE_enum("compute_dtype", "auto", ["auto", "float32", "bfloat16"],
                      "auto: bfloat16 on GPU, float32 on CPU.")
    flags.DEFINE_enum("attention", None, list(ATTENTION_IMPLEMENTATIONS),
                      "Attention backend (default: the recipe's, auto = the fastest measured on this GPU kind, "
                      "XLA on the CPU): pallas (ours, Hopper), cudnn, tokamax (needs the package), xla.")


def _define_run_flags():
    _define_world_flags()
    flags.DEFINE_integer("total_blocks", None, "Chunks (AR steps) of 3 latent frames (default: the recipe's).")
    flags.DEFINE_string("poses", None, "Camera trajectory poses.npy [N,4,4] camera-to-world, OpenCV axes.")
    flags.DEFINE_string("intrinsics", None, "intrinsics.npy [N,4] (fx, fy, cx, cy) for a 480x832 frame.")
    flags.DEFINE_string("output_dir", "outputs", "Where <slug>.mp4 and stats_<slug>.json are written (created "
                        "when the first file is).")
    flags.DEFINE_bool("save_latents", False, "Also write latents_<slug>.npy (clean latents, [F, h, w, C]).")
    flags.DEFINE_float("shift", None, "Override the schedule shift (Self-Forcing: 5 official CLI, 8 FlashDreams).")
    flags.DEFINE_enum("camera_mode", "stream", ["stream", "clip"], "stream: fixed world scale, per chunk; clip: "
                      "upstream's clip-wide max translation (parity with whole-clip runs).")
    flags.DEFINE_enum("pose_mode", "strict", ["strict", "hold"], "Too few poses: error (strict) or repeat the last.")


def _options(slug: str, names):
    """RunOptions from the flags among `names` that RunOptions has (a field without a flag keeps its default)."""
    import dataclasses

    from wm_jax.streaming.run import RunOptions

    fields = {f.name for f in dataclasses.fields(RunOptions)}
    return RunOptions(slug=slug, **{n: getattr(FLAGS, n) for n in names if n in fields and n in FLAGS})


def _run_main(argv):
    import dataclasses

    from wm_jax.streaming.run import RunInterrupted, RunOptions, check_options, run, stats_path

    if len(argv) != 2:
        raise UsageError("expected one recipe: wm-jax run <slug> [flags] (wm-jax run --help lists the recipes)")
    slug = argv[1]
    options = _options(slug, [f.name for f in dataclasses.fields(RunOptions)])
    check_options(options)  # every flag, before anything is loaded
    joined = _check_process_flags()
    _check_slug(slug)
    if joined:
        _join_processes()
    try:
        report = run(options)
    except RunInterrupted as stop:
        if _is_process_zero():
            report = stop.report
            if report is None:
                sys.stderr.write("interrupted before the first chunk was finished: nothing written\n")
            else:
                sys.stderr.write(f"interrupted after {report['chunks_done']}/{stop.chunks_planned} chunks: kept "
                                 f"{report['video']} ({report['num_frames']} frames) and "
                                 f"{stats_path(options.output_dir, slug)}\n")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted before the first chunk was finished: nothing written\n")
        sys.exit(130)
    if not _is_process_zero():
        return
    line = (f"wrote {report['video']} ({report['num_frames']} frames, {report['video_seconds']:.1f} s of video) "
            f"and {stats_path(options.output_dir, slug)}")
    steady = report["steady_state"]
    if steady and steady["generated_fps"]:
        line += f"; {steady['total_ms']:.0f} ms per chunk = {steady['generated_fps']:.1f} frames/s"
    print(line)


def _is_process_zero() -> bool:
    import jax

    return jax.process_index() == 0


def _check_slug(slug: str) -> None:
    from wm_jax.streaming.recipes import SLUGS

    if slug not in SLUGS:
        raise UsageError(f"unknown recipe {slug!r}; `wm-jax {_command()} --help` lists them: {', '.join(SLUGS)}")


def _define_train_flags():
    flags.DEFINE_string("workdir", None, "Folder of the run: trajectories, per-stage orbax checkpoints and log.jsonl "
                        "(an interrupted run resumes from here).")
    flags.DEFINE_string("export", None, "Write the trained world here as a shipped-weights folder (world.json + "
                        "safetensors), e.g. wm_jax/assets/tiny_world.")
    flags.DEFINE_multi_string("override", [], "Override a config field by dotted path, KEY=VALUE (repeatable), "
                              "e.g. --override world_model.steps=100.")


def _train_main(argv):
    from wm_jax.train.config import apply_overrides, load_config
    from wm_jax.train.main import train

    if len(argv) != 2:
        raise UsageError("usage: wm-jax train CONFIG.py --workdir DIR [--export DIR] [--override KEY=VALUE ...]")
    if not FLAGS.workdir:
        raise UsageError("--workdir is required (checkpoints and logs; an interrupted run resumes from it)")
    config = apply_overrides(load_config(argv[1]), FLAGS.override)
    try:
        summary = train(config, FLAGS.workdir, export=FLAGS.export, print_fn=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        sys.stderr.write(f"wm-jax: interrupted; run the same command to resume from {FLAGS.workdir}\n")
        sys.exit(130)
    minutes = (summary["autoencoder_seconds"] + summary["world_model_seconds"]) / 60
    print(f"trained {config.name} on {summary['device_kind']} in {minutes:.1f} min (autoencoder "
          f"{summary['autoencoder_seconds']:.0f} s, world model {summary['world_model_seconds']:.0f} s)"
          + (f"; exported {FLAGS.export}" if FLAGS.export else ""))


def _define_serve_flags():
    _define_world_flags()
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (127.0.0.1: this machine only; reach a remote "
                        "server through ssh -L).")
    flags.DEFINE_integer("port", 8089, "Port of the page, the health check and the video WebSocket (0: any free "
                         "port).")
    flags.DEFINE_string("state_dir", None, "Save the world here when a visitor leaves and when the server stops; "
                        "a world saved here is continued at the next start.")


def _serve_main(argv):
    from wm_jax.streaming.run import check_options

    if len(argv) > 2:
        raise UsageError(f"expected at most one recipe: wm-jax serve [slug] [flags], not {' '.join(argv[1:])}")
    slug = argv[1] if len(argv) == 2 else "tiny"
    options = _options(slug, WORLD_FLAGS)
    check_options(options, output=False)
    if not 0 <= FLAGS.port <= 65535:
        _bad_value("port", "a port from 1 to 65535 (0: any free port)")
    if FLAGS.state_dir is not None and Path(FLAGS.state_dir).exists() and not Path(FLAGS.state_dir).is_dir():
        _bad_value("state_dir", "a folder (it is a file)")
    joined = _check_process_flags()
    _check_slug(slug)
    if joined:
        raise UsageError("wm-jax serve runs in one process (its devices may be several GPUs); drop the "
                         "multi-host flags")

    import asyncio
    import time

    from wm_jax.serve.launch import build_world, serve_forever
    from wm_jax.serve.server import WorldServer

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    world, resumed = build_world(options, log, FLAGS.state_dir)
    server = WorldServer(world, log=log, state_dir=FLAGS.state_dir, resumed=resumed)
    asyncio.run(serve_forever(server, FLAGS.host, FLAGS.port, log))


# ---------------------------------------------------------------------------------------------------
# Help: the recipe's defaults, then the flags by topic.
# ---------------------------------------------------------------------------------------------------

COMMAND_ARGS = {"run": "<slug> [flags]", "serve": "[slug] [flags]  (default slug: tiny)",
                "convert": "--src PATH --dst DIR [flags]", "parity": "CASE_DIR [--out OUT.npz] [--tolerance T]",
                "train": "CONFIG.py --workdir DIR [--export DIR] [--override KEY=VALUE ...]",
                "bench": "<slug> [--peer NAME --upstream_dir DIR] [flags]"}
_DEVICES = ("devices", ("num_devices", "compute_dtype", "attention", "coordinator_address", "num_processes", "process_id",
                        "coordinator_timeout"))
_WEIGHTS = ("weights", ("checkpoint", "hub_repo", "allow_pickle", "random_weights"))
_LOGGING = ("logging", ("verbosity",))
FLAG_GROUPS = {  # every flag a command defines is in one group (tests/test_cli.py checks it)
    "run": (("world / scene", ("prompt", "image", "example_data", "example_idx", "poses", "intrinsics", "pose_mode",
                               "camera_mode", "world_scale", "seed", "shift")),
            ("video", ("pixel_height", "pixel_width", "total_blocks", "fps")),
            _WEIGHTS, _DEVICES, ("output", ("output_dir", "save_latents")), _LOGGING),
    "serve": (("world / scene", ("prompt", "image", "example_data", "example_idx", "world_scale", "seed")),
              ("video", ("pixel_height", "pixel_width", "fps")),
              _WEIGHTS, _DEVICES, ("server", ("host", "port", "state_dir")), _LOGGING),
    "convert": (("source", ("src", "hub_repo", "allow_patterns", "cache_dir", "kind", "allow_pickle")),
                ("output", ("dst", "overwrite", "dtype")), ("model config", ("num_heads", "override", "boundary")),
                _LOGGING),
    "parity": (("output", ("out", "tolerance")), _LOGGING),
    "train": (("training", ("workdir", "export", "override")), _LOGGING),
    "bench": (("rollout", ("total_blocks", "warmup_chunks", "rollouts", "warmup_rollouts", "pixel_height",
                           "pixel_width", "decoders", "dtype", "forward_frames")),
              ("devices", ("num_devices", "attention")),
              ("peers", ("peer", "upstream_dir", "peer_timeout", "peer_compile")),
              ("output", ("output_dir", "json")), _LOGGING),
}
METAVARS = {"peer": "NAME", "upstream_dir": "DIR", "json": "FILE", "src": "PATH", "dst": "DIR", "workdir": "DIR",
            "export": "DIR", "image": "PATH", "poses": "PATH", "intrinsics": "PATH", "checkpoint": "DIR", "output_dir": "DIR", "state_dir": "DIR", "cache_dir": "DIR",
            "out": "FILE", "prompt": "TEXT", "hub_repo": "OWNER/NAME", "coordinator_address": "HOST:PORT",
            "override": "KEY=VALUE", "allow_patterns": "GLOB,...", "host": "ADDRESS"}
TASKS = {"t2v": "text -> video", "i2v_camera": "image + camera path -> video",
         "i2v_first_latent": "image (first frame) -> video"}


def _flag_help(name: str) -> str:
    """One flag as `  --name VALUE   help (default ...)`, wrapped."""
    flag = FLAGS[name]
    if name == "verbosity":
        head, text = "-v, --verbosity N", ("Show log lines: 0 = INFO (JAX, orbax, a line per chunk), 1 = DEBUG "
                                            "(default: warnings only, one line each).")
    else:
        kind, choices = flag.flag_type(), getattr(flag.parser, "enum_values", None)
        head = f"--[no]{name}" if flag.boolean else f"--{name} " + (
            "|".join(choices) if choices else
            METAVARS.get(name, {"int": "N", "float": "X", "list": "A,B"}.get(kind, "TEXT")))
        text = " ".join(flag.help.split())
        if choices and text.startswith(f"<{'|'.join(choices)}>: "):  # absl's prefix: the head shows them
            text = text.split(": ", 1)[1]
        if flag.default not in (None, False, [], "") and "default" not in text:
            text += f" (default {flag.default})"
    pad = 30
    lines = textwrap.wrap(text, WIDTH - pad - 2) or [""]
    first = f"  {head:<{pad - 2}}{lines[0]}" if len(head) < pad - 3 else f"  {head}\n{' ' * pad}{lines[0]}"
    return "\n".join([first] + [" " * pad + line for line in lines[1:]])


def _flags_help(command: str, defined: list[str]) -> str:
    sections = []
    for title, names in FLAG_GROUPS[command]:
        names = [n for n in names if n in defined or n == "verbosity"]
        if names:
            sections.append(f"{title}:\n" + "\n".join(_flag_help(n) for n in names))
    return "flags by topic:\n\n" + "\n\n".join(sections)


def _weights_words(recipe) -> str:
    if recipe.random_weights:
        return "random weights"
    if getattr(recipe, "shipped_weights", ""):
        return "shipped weights, offline"
    return "hub weights"


def _recipes_help(command: str) -> str:
    from wm_jax.streaming.recipes import SLUGS, load_recipe

    width = max(map(len, SLUGS))
    lines = []
    for slug in SLUGS:
        try:
            r = load_recipe(slug)
            what = f"{TASKS.get(r.task, r.task)}, {r.pixel_height}x{r.pixel_width}, {_weights_words(r)}"
        except Exception as err:  # a recipe being written: list it anyway
            what = f"(cannot load it: {type(err).__name__}: {err})"
        lines.append(f"  {slug:<{width}}  {what}")
    return (f"recipes (`wm-jax {command} <slug> --help` shows one's defaults):\n" + "\n".join(lines))


def _schedule_words(recipe, steps=None) -> str:
    try:
        t = recipe.step_schedule() if steps is None else recipe.step_schedule(steps)
    except Exception:  # an unknown schedule: say what the recipe names
        return recipe.schedule
    values = ", ".join(f"{v:g}" for v in t.t)
    return f"{len(t.t)} pass{'es' if len(t.t) != 1 else ''} at t = {values}"


def _expert_words(recipe) -> str:
    high, low = recipe.step_schedule().expert_passes
    return (f"; two experts: {high} high-noise passes (t >= {recipe.boundary * 1000:g}), then {low} low-noise; the "
            "checkpoint's scheduler shift replaces this one")


def _recipe_help(slug: str, command: str) -> str:
    """The recipe's defaults by topic (flags override them)."""
    import importlib

    from wm_jax.streaming.recipes import SLUGS, load_recipe

    recipe = load_recipe(slug)
    note = None
    if command == "serve":
        from wm_jax.serve.world import serving_recipe

        recipe, note = serving_recipe(recipe)
    doc = (importlib.import_module(SLUGS[slug]).__doc__ or "").strip().splitlines()
    m = recipe.model
    model = f"preset {m}" if isinstance(m, str) else ", ".join(
        f"{label} {m[key]}" for key, label in (("dim", "width"), ("num_layers", "layers"), ("num_heads", "heads"),
                                                ("ffn_dim", "ffn")) if key in m)
    sink, window = recipe.sink_frames, recipe.window_frames
    cache = "every frame (grows with the video)" if window is None else \
        f"sink {sink} + window {window} latent frames (window includes the current chunk)"
    first = getattr(recipe, "first_block_steps", None)
    rows = [
        ("video", f"{recipe.pixel_height}x{recipe.pixel_width} pixels at {recipe.fps} fps; "
                  + ("endless, chunks" if command == "serve" else f"{recipe.total_blocks} chunks (total_blocks)")
                  + f" of {recipe.chunk_frames} latent frames"
                  + (f" (the first: {recipe.first_frames})" if recipe.first_frames != recipe.chunk_frames else "")),
        ("task", TASKS.get(recipe.task, recipe.task)),
        ("model", f"{model}; decoder {recipe.decoder}"),
        ("denoising", f"{recipe.schedule} schedule, shift {recipe.shift:g}, {_schedule_words(recipe)}"
                      + (f" (first chunk: {_schedule_words(recipe, first)})" if first else "")
                      + (_expert_words(recipe) if recipe.boundary is not None else "")),
        ("cache", cache),
        ("seed", str(recipe.seed)),
        ("prompt", textwrap.shorten(recipe.prompt or "(none)", 80, placeholder=" ...")),
    ]
    if recipe.random_weights:
        rows.append(("weights", "random, from the seed"))
    elif getattr(recipe, "shipped_weights", ""):
        rows.append(("weights", f"shipped with wm_jax ({recipe.shipped_weights}), no download"
                                + ("; --random_weights for seeded random ones" if "random_weights" in FLAGS else "")))
    else:
        rows.append(("weights", "downloaded from the hub and converted into --checkpoint DIR on first use:"))
        for name, hub in recipe.weights.items():
            pickle = " (a torch pickle: --allow_pickle)" if hub.allow_pickle else ""
            rows.append(("", f"  {name}: {hub.repo}  {', '.join(hub.allow_patterns)}{pickle}"))
    lines = [textwrap.shorten(f"{slug}: " + (doc[0].split(":", 1)[-1].strip() if doc else ""), WIDTH,
                              placeholder=" ..."), "", "recipe defaults (flags override them):"]
    lines += [f"  {label:<11}{value}" for label, value in rows]
    if note:
        lines += textwrap.wrap(f"({note})", WIDTH, initial_indent="  ", subsequent_indent="   ")
    return "\n".join(lines)


def _help(command: str, args: list[str], defined: list[str]) -> str:
    parts = [f"usage: wm-jax {command} {COMMAND_ARGS[command]}"]
    if command in ("run", "serve"):
        from wm_jax.streaming.recipes import SLUGS

        words = [a for a in args if not a.startswith("-")]
        slug = next((w for w in words if w in SLUGS), None)
        if slug is not None:
            parts.append(_recipe_help(slug, command))
        else:
            if words:
                parts.append(f"unknown recipe {words[0]!r}")
            parts.append(_recipes_help(command))
    parts.append(_flags_help(command, defined))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# Entry point.
# ---------------------------------------------------------------------------------------------------

COMMANDS = {
    "run": (_define_run_flags, _run_main),
    "serve": (_define_serve_flags, _serve_main),
    "convert": (_define_convert_flags, _convert_main),
    "parity": (_define_parity_flags, _parity_main),
    "train": (_define_train_flags, _train_main),
    "bench": (_define_bench_flags, _bench_main),
}
HELP = ("-h", "--help", "-help", "--helpshort", "--helpfull")
_current = {"command": None}


def _command() -> str:
    return _current["command"] or "<command>"


def run():
    """Console-script entry point."""
    argv = sys.argv
    if len(argv) >= 2 and argv[1] in ("--version", "-V", "version"):
        print(f"wm-jax {_version()}")
        sys.exit(0)
    if len(argv) < 2 or argv[1] in HELP or argv[1] == "help":
        (sys.stdout if len(argv) >= 2 else sys.stderr).write(USAGE)
        sys.exit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        sys.stderr.write(f"wm-jax: unknown command {command!r}\n\n{USAGE}")
        sys.exit(2)
    _current["command"] = command
    define, main = COMMANDS[command]
    before = set(FLAGS)
    define()
    defined = [name for name in FLAGS if name not in before]
    if any(a in HELP for a in argv[2:]):
        sys.stdout.write(_help(command, argv[2:], defined))
        sys.exit(0)
    try:
        args = FLAGS([f"wm-jax {command}", *argv[2:]])
    except flags.Error as err:
        _usage_exit(command, _flag_error(err))
    _setup_logging()
    # JAX may take 95 % of a GPU's memory (its default is 75 %): the causal Wan2.2 recipes' two 14B experts and
    # their caches need ~110 GiB of an H200's 140. An explicit XLA_PYTHON_CLIENT_MEM_FRACTION wins.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    try:
        status = _friendly_errors(main)(args)
    except UsageError as err:
        _usage_exit(command, str(err))
    sys.exit(status or 0)


def _flag_error(err: flags.Error) -> str:
    text = str(err)
    if isinstance(err, flags.UnrecognizedFlagError):
        return f"unknown flag --{err.flagname}"
    return text.replace("flag --", "--", 1) if text.startswith("flag --") else text


def _usage_exit(command: str, message: str):
    sys.stderr.write(f"wm-jax {command}: error: {message}\nusage: wm-jax {command} {COMMAND_ARGS[command]}  "
                     f"(wm-jax {command} --help lists the flags)\n")
    sys.exit(2)


def _bad_value(name: str, expected: str):
    """Ends the command: `--name VALUE: expected ...` (exit code 1)."""
    sys.stderr.write(f"wm-jax: error: --{name} {getattr(FLAGS, name)}: expected {expected}\n")
    sys.exit(1)


def _stage(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _version() -> str:
    from wm_jax import __version__

    return __version__


class _ShortFormatter(std_logging.Formatter):
    def format(self, record: std_logging.LogRecord) -> str:
        return f"wm-jax: {record.levelname.lower()}: {record.getMessage()}"


def _setup_logging() -> None:
    """Without --verbosity: warnings and errors only, one `wm-jax: warning: ...` line each (no INFO line of
    JAX's backend probe, orbax or absl; XLA's C++ INFO lines too). With it: absl's lines at that level."""
    if FLAGS["verbosity"].present:
        logging.use_absl_handler()
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    root = std_logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, std_logging.StreamHandler) and handler.stream in (sys.stderr, sys.stdout):
            root.removeHandler(handler)
    handler = std_logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ShortFormatter())
    root.addHandler(handler)
    root.setLevel(std_logging.WARNING)
    logging.set_verbosity(logging.WARNING)


def flag_style(name: str) -> str:
    """How the CLI writes an option named in an error message (see wm_jax.errors)."""
    return f"--{name}"


def _friendly_errors(main):
    """Known error types end the program with their message (no traceback) and exit code 1; options
    named in a message are written as flags. Ctrl-C ends it with exit code 130."""

    def wrapped(argv):
        from wm_jax.errors import TemplatedError

        try:
            return main(argv)
        except UsageError:
            raise
        except KeyboardInterrupt:
            sys.stderr.write("wm-jax: interrupted\n")
            sys.exit(130)
        except Exception as err:
            if not isinstance(err, (TemplatedError, ValueError)) and not isinstance(err, _known_errors()):
                raise
            message = err.render(flag_style) if isinstance(err, TemplatedError) else str(err)
            sys.stderr.write(f"wm-jax: error: {message}\n")
            sys.exit(1)

    return wrapped


def _known_errors() -> tuple[type, ...]:
    """The library's error types that end a command with their message (imported once one is raised:
    they bring JAX, which a bad flag should not wait for)."""
    from wm_jax.io.hub import HubError
    from wm_jax.io.safetensors_io import CheckpointError
    from wm_jax.models.text_encoding import TokenizerNotFoundError
    from wm_jax.parity import ParityError
    from wm_jax.streaming.memory import DeviceMemoryError

    return CheckpointError, DeviceMemoryError, HubError, ParityError, TokenizerNotFoundError


if __name__ == "__main__":
    run()
