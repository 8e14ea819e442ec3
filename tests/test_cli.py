"""The command line a newcomer meets: help, version, usage mistakes, bad flag values caught before any
model work, quiet logs with stage lines, hints that work, and Ctrl-C keeping what a run had made."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from wm_jax import cli
from wm_jax.streaming.recipes import SLUGS, load_recipe

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
NOISE = re.compile(r"xla_bridge|libtpu|Unable to initialize backend|^[IWE]\d{4} |orbax", re.M)  # absl / JAX / orbax
# Runs the CLI, then says on stderr whether JAX was imported by the time it exited.
PROBE = ("import atexit, sys; atexit.register(lambda: print('JAX' if 'jax' in sys.modules else 'NOJAX', "
         "file=sys.stderr)); from wm_jax.cli import run; sys.argv = ['wm-jax', *sys.argv[1:]]; run()")


def wm_jax(*args, env=None, probe=False, **kwargs) -> subprocess.CompletedProcess:
    head = ["-c", PROBE] if probe else ["-m", "wm_jax.cli"]
    return subprocess.run([sys.executable, *head, *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Help, version, usage
# ---------------------------------------------------------------------------------------------------


def test_version_unknown_command_and_usage():
    assert wm_jax("--version").stdout.strip() == f"wm-jax {version('wm_jax')}"
    unknown = wm_jax("xyz")
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("wm-jax: unknown command 'xyz'\n") and "usage: wm-jax <command>" in unknown.stderr
    flag = wm_jax("run", "tiny", "--bogus", "1", probe=True)
    assert flag.returncode == 2 and "wm-jax run: error: unknown flag --bogus" in flag.stderr
    assert "NOJAX" in flag.stderr and "Traceback" not in flag.stderr


def test_run_help_lists_every_recipe_and_the_flags_by_topic():
    out = wm_jax("run", "--help").stdout
    for slug in SLUGS:  # whatever recipes exist now, one line each
        assert re.search(rf"^  {re.escape(slug)}  +\S", out, re.M), slug
    for title in ("world / scene:", "video:", "weights:", "devices:", "output:"):
        assert f"\n{title}\n" in out
    assert out.index("--prompt") < out.index("--checkpoint") < out.index("--num_devices") < out.index("--output_dir")


@pytest.mark.parametrize("command", ["run", "serve"])
def test_slug_help_shows_the_recipes_defaults(command):
    tiny = load_recipe("tiny")
    out = wm_jax(command, "tiny", "--help").stdout
    defaults = out[out.index("recipe defaults"):out.index("flags by topic")]
    assert f"{tiny.pixel_height}x{tiny.pixel_width} pixels at {tiny.fps} fps" in defaults
    assert (f"{tiny.total_blocks} chunks" in defaults) == (command == "run")
    assert f"sink {tiny.sink_frames} + window {tiny.window_frames}" in defaults
    schedule = tiny.step_schedule()
    assert f"{schedule.num_steps} passes at t = {', '.join(f'{t:g}' for t in schedule.t)}" in defaults
    assert re.search(rf"seed +{tiny.seed}\n", defaults) and "weights" in defaults
    assert ("--port" in out) == (command == "serve") and ("--output_dir" in out) == (command == "run")

    hub = wm_jax(command, "lingbot-world-fast", "--help").stdout
    for name, files in load_recipe("lingbot-world-fast").weights.items():
        assert f"{name}: {files.repo}" in hub


def test_every_flag_of_every_command_is_in_one_help_group():
    for command, (define, _) in cli.COMMANDS.items():
        before = set(cli.FLAGS)
        define()
        defined = set(cli.FLAGS) - before
        try:
            grouped = [n for _, names in cli.FLAG_GROUPS[command] for n in names if n in defined]
            assert sorted(grouped) == sorted(defined), command
        finally:
            for name in defined:
                delattr(cli.FLAGS, name)


# ---------------------------------------------------------------------------------------------------
# Every flag checked before any model work
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    (["--total_blocks", "0"], "--total_blocks 0: expected a positive number of chunks"),
    (["--pixel_height", "0"], "--pixel_height 0: expected a positive multiple of 16"),
    (["--pixel_width", "-16"], "--pixel_width -16: expected a positive multiple of 16"),
    (["--pixel_height", "70"], "--pixel_height 70: expected a multiple of 16 (VAE stride 8 x patch 2): use 64 or 80"),
    (["--fps", "0"], "--fps 0: expected a positive frame rate"),
    (["--fps", "-5"], "--fps -5: expected a positive frame rate"),
    (["--seed", "-1"], "--seed -1: expected a seed from 0 to 4294967295"),
    (["--num_devices", "0"], "--num_devices 0: expected at least 1 device"),
    (["--example_idx", "3"], "--example_idx 3: expected 0, 1, 2, 5"),
    (["--image", "{tmp}/missing.png"], "--image {tmp}/missing.png: expected a file (no such file)"),
    (["--poses", "{tmp}", "--intrinsics", "{tmp}/i.npy"], "--poses {tmp}: expected a file (a folder)"),
    (["--output_dir", "{tmp}/file/out"], "--output_dir {tmp}/file/out: not writable ({tmp}/file is a file)"),
])
def test_bad_run_flag_is_one_line_before_anything_loads(tmp_path, args, expected):
    (tmp_path / "file").write_text("")
    args = [a.format(tmp=tmp_path) for a in args]
    out = tmp_path / "new_outputs"
    start = time.perf_counter()
    proc = wm_jax("run", "tiny", "--output_dir", out, *args, probe=True)
    elapsed = time.perf_counter() - start
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 2 and lines[1] == "NOJAX", proc.stderr  # one line, no JAX
    assert lines[0].startswith(f"wm-jax: error: {expected.format(tmp=tmp_path)}")
    assert not out.exists()  # no empty output folder left behind
    assert elapsed < 10, elapsed  # no JAX import (NOJAX); typically well under a second


@pytest.mark.parametrize("args, expected", [
    (["--port", "70000"], "--port 70000: expected a port from 1 to 65535"),
    (["--fps", "0"], "--fps 0: expected a positive frame rate"),
    (["--state_dir", "{tmp}/file"], "--state_dir {tmp}/file: expected a folder (it is a file)"),
])
def test_bad_serve_flag_is_one_line_before_anything_loads(tmp_path, args, expected):
    (tmp_path / "file").write_text("")
    proc = wm_jax("serve", "tiny", *[a.format(tmp=tmp_path) for a in args], probe=True)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].startswith(f"wm-jax: error: {expected.format(tmp=tmp_path)}")
    assert proc.stderr.splitlines()[1:] == ["NOJAX"]


def test_run_failing_after_the_checks_leaves_no_output_folder_and_logs_stay_quiet(tmp_path):
    """A bad image is found once JAX is up: no folder was created for it; no backend probe line unless -v."""
    (tmp_path / "image.png").write_text("not an image")
    out = tmp_path / "a" / "b"
    args = ("run", "tiny", "--image", tmp_path / "image.png", "--output_dir", out, "--random_weights")
    probing = {"JAX_PLATFORMS": ""}  # JAX probes its backends (the libtpu INFO line) as a newcomer's JAX does
    quiet, verbose = wm_jax(*args, env=probing), wm_jax(*args, "-v", "0", env=probing)
    for proc in (quiet, verbose):
        assert proc.returncode == 1 and "cannot read it as an image" in proc.stderr
        assert not (tmp_path / "a").exists()
    assert quiet.stderr.startswith("loading tiny: random weights") and not NOISE.search(quiet.stderr), quiet.stderr
    assert "Unable to initialize backend" in verbose.stderr or re.search(r"^I\d{4} ", verbose.stderr, re.M)


def test_convert_is_quiet_unless_asked(tmp_path):
    from safetensors.numpy import save_file

    from tests.wan_testlib import TINY, random_original_state
    from wm_jax.models.config import WanConfig

    save_file(random_original_state(WanConfig(**TINY), seed=1), str(tmp_path / "m.safetensors"))
    quiet = wm_jax("convert", "--src", tmp_path / "m.safetensors", "--dst", tmp_path / "out")
    assert quiet.returncode == 0 and "converted" in quiet.stdout
    assert quiet.stderr.splitlines() == [f"converting {tmp_path / 'm.safetensors'} into {tmp_path / 'out'}"]
    verbose = wm_jax("convert", "--src", tmp_path / "m.safetensors", "--dst", tmp_path / "out2", "--verbosity", "1")
    assert verbose.returncode == 0 and re.search(r"^I\d{4} .*orbax", verbose.stderr, re.M)


# ---------------------------------------------------------------------------------------------------
# Hints
# ---------------------------------------------------------------------------------------------------


def test_hints_use_hf_download_and_only_the_commands_own_flags(tmp_path, monkeypatch):
    from wm_jax.io import examples
    from wm_jax.io.hub import HubError, download, hub_cli_command
    from wm_jax.streaming import run as run_module

    assert hub_cli_command("a/b", include=["*.json"]).startswith("hf download a/b --include")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as offline:
        download("robbyant/lingbot-world-fast", ["*.json"], cache_dir=str(tmp_path / "hf"))
    message = offline.value.render(cli.flag_style)
    assert "hf download robbyant/lingbot-world-fast" in message and "--" + "src" not in message  # run reaches it too

    def unreachable(index, *args, **kwargs):
        raise HubError("cannot download robbyant/lingbot-world-v2\nTo run without the network, use ...")

    monkeypatch.setattr(examples, "example_dir", unreachable)
    with pytest.raises(HubError) as example:
        run_module._upstream_example(0, None)
    assert "--example_idx -1" in example.value.render(cli.flag_style)


def test_checkpoint_folder_to_download_is_announced(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = wm_jax("run", "lingbot-world-fast", "--checkpoint", ckpt, "--example_data", "--example_idx", "-1",
                  "--total_blocks", "1", "--output_dir", tmp_path / "out",
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    names = ", ".join(load_recipe("lingbot-world-fast").weights)
    assert f"downloading {names} into {ckpt} (does not exist yet)\n" in proc.stderr
    assert proc.returncode == 1 and "hf download robbyant/lingbot-world-fast" in proc.stderr
    assert "--" + "src" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------


def test_deferred_interrupt_keeps_a_chunk_whole_and_close_finishes_the_file(tmp_path):
    import av

    from wm_jax.io.video import Mp4Writer, deferred_interrupts

    writer = Mp4Writer(tmp_path / "v.mp4", fps=8)
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            writer.append(np.zeros((3, 16, 16, 3), np.uint8))  # still runs: the interrupt waits
    writer.close()
    with av.open(str(tmp_path / "v.mp4")) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 3


def test_ctrl_c_keeps_the_chunks_made_so_far(tmp_path):
    """`wm-jax run tiny --total_blocks 50`, SIGINT once the first chunk line appears: one line, exit 130,
    a playable mp4 of the finished chunks and their stats (interrupted)."""
    import av

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "wm_jax.cli", "run", "tiny", "--total_blocks", "50",
                             "--random_weights", "--pose_mode", "hold", "--pixel_height", "32", "--pixel_width", "48",
                             "--output_dir", out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("chunk 1/50:"):
                proc.send_signal(signal.SIGINT)
                break
        _, rest = proc.communicate(timeout=300)
        lines += rest.splitlines()
    finally:
        proc.kill()
    assert proc.returncode == 130, "\n".join(lines)
    assert lines[0].startswith("loading tiny: random weights") and lines[1].startswith("compiling ")
    assert not NOISE.search("\n".join(lines)) and "Traceback" not in "\n".join(lines), "\n".join(lines)
    stats = json.loads((out / "stats_tiny.json").read_text())
    done = stats["chunks_done"]
    assert stats["interrupted"] is True and done >= 1 and len(stats["chunks"]) == done
    assert lines[-1] == (f"interrupted after {done}/50 chunks: kept {out / 'tiny.mp4'} ({stats['num_frames']} frames) "
                         f"and {out / 'stats_tiny.json'}")
    with av.open(str(out / "tiny.mp4")) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == stats["num_frames"]
    assert sorted(p.name for p in out.iterdir()) == ["stats_tiny.json", "tiny.mp4"]  # no temporary file left
