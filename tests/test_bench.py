"""wm-jax bench: checkouts checked before any heavy work, bad input named by flag, a peer that fails keeps our
figures, and the table / JSON / plot / README markdown of a report with peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wm_jax.bench import report as R
from wm_jax.bench.peers import PEERS, PeerSetupError, check_checkout

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
PROBE = ("import atexit, sys; atexit.register(lambda: print('JAX' if 'jax' in sys.modules else 'NOJAX', "
         "file=sys.stderr)); from wm_jax.cli import run; sys.argv = ['wm-jax', *sys.argv[1:]]; run()")


def wm_jax(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


def marker_tree(root: Path, peer: str, broken_import: str | None = None) -> Path:
    """A folder holding the files peer `peer`'s adapter needs (empty modules; with `broken_import`, the first
    marker raises that message when imported)."""
    for i, marker in enumerate(PEERS[peer].markers):
        path = root / marker
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"raise RuntimeError({broken_import!r})\n" if broken_import and i == 0 else "")
    return root


def test_check_checkout_names_what_is_missing(tmp_path):
    with pytest.raises(PeerSetupError, match="peer self-forcing needs upstream_dir: a checkout of guandeh17/Self-Forcing"):
        check_checkout("self-forcing", None)
    with pytest.raises(PeerSetupError, match="no such folder"):
        check_checkout("lingbot-fast", str(tmp_path / "absent"))
    (tmp_path / "wan").mkdir()
    with pytest.raises(PeerSetupError, match="missing wan/image2video_fast.py, wan/modules/model_fast.py"):
        check_checkout("lingbot-fast", str(tmp_path))
    with pytest.raises(PeerSetupError, match="expected one of self-forcing, lingbot-fast, diffusers-wan"):
        check_checkout("flashdreams", str(tmp_path))


def test_check_checkout_warns_on_another_commit(tmp_path):
    tree = marker_tree(tmp_path / "sf", "self-forcing")
    unversioned = check_checkout("self-forcing", str(tree))
    assert unversioned.commit is None and "cannot read the commit" in unversioned.warnings[0]
    git = lambda *a: subprocess.run(["git", "-C", str(tree), *a], check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "stand-in")
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    other = check_checkout("self-forcing", str(tree))
    assert other.commit == head
    assert f"is at {head[:7]}" in other.warnings[0] and "guandeh17/Self-Forcing@33593df" in other.warnings[0]


@pytest.mark.parametrize("args, code, expected", [
    (["--peer", "self-forcing"], 1, "--peer self-forcing needs --upstream_dir: a checkout of guandeh17/Self-Forcing"),
    (["--upstream_dir", "x"], 1, "--upstream_dir is given without --peer"),
    (["--peer", "nope"], 1, "--peer nope: expected one of self-forcing, lingbot-fast, diffusers-wan"),
    (["--peer", "self-forcing", "--upstream_dir", "/nonexistent/sf"], 1, "--upstream_dir /nonexistent/sf: no such folder"),
    (["--peer", "self-forcing", "--peer", "lingbot-fast", "--upstream_dir", "d"], 1,
     "--upstream_dir d: expected NAME=DIR with NAME one of the --peer values (self-forcing, lingbot-fast)"),
    (["--warmup_chunks", "7"], 1, "--warmup_chunks 7: expected 0 .. --total_blocks - 1 (6)"),
    (["--decoders", "taehv,vq"], 1, "--decoders taehv,vq: vq unknown; expected a comma list of taehv, wan_vae"),
    (["--forward_frames", "0"], 1, "--forward_frames 0: expected a positive integer"),
])
def test_bench_bad_input_is_named_before_any_work(args, code, expected):
    proc = wm_jax("bench", "tiny", *args)
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stderr
    assert "matmul ceiling" not in proc.stderr and not proc.stdout  # nothing measured


def test_bench_refuses_a_peer_that_cannot_run_the_recipe(tmp_path):
    tree = marker_tree(tmp_path / "sf", "self-forcing")
    proc = wm_jax("bench", "tiny", "--peer", "self-forcing", "--upstream_dir", tree)
    assert proc.returncode == 1
    assert ("--peer self-forcing runs text-to-video models (no image or camera input); recipe tiny is a camera "
            "model") in proc.stderr
    assert "matmul ceiling" not in proc.stderr


def test_bench_keeps_our_figures_when_a_peer_fails(tmp_path):
    tree = marker_tree(tmp_path / "lingbot", "lingbot-fast", broken_import="stand-in upstream broke at import")
    out = tmp_path / "results" / "bench.json"
    proc = wm_jax("bench", "tiny", "--total_blocks", "3", "--warmup_chunks", "1", "--decoders", "taehv",
                  "--warmup_rollouts", "0", "--attention", "xla", "--peer", "lingbot-fast", "--upstream_dir", tree,
                  "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    peer = report["peers"]["lingbot-fast"]
    assert "stand-in upstream broke at import" in peer["error"]
    assert peer["returncode"] == 1 and peer["chunks"] == [] and peer["output_tail"]
    assert "lingbot-fast (stopped)" in proc.stdout
    assert f"lingbot-fast stopped after 0 chunks: {peer['error']}" in proc.stdout
    assert "warning: lingbot-fast: cannot read the commit" in proc.stdout
    assert out.with_suffix(".png").is_file() and not list(out.parent.glob(".*partial*"))
    assert list(report["ours"]) == ["xla"]
    ours = report["ours"]["xla"]
    assert [c["autoregressive_index"] for c in ours["chunks"]] == [0, 1, 2]
    s = ours["summary"]
    assert s["chunks_in_median"] == 2 and s["chunk6_denoise_ms"] is None
    for key in ("denoise_ms", "commit_ms", "end_to_end_ms", "generated_fps", "denoise_utilisation"):
        assert s[key] > 0, key
    assert s["end_to_end_decoder"] == "taehv"
    assert report["matmul_ceiling"]["tflops"] > 0 and ours["compile_s"]["denoise"] > 0
    assert "peak_memory_gib" in ours and report["device_kind"] == "cpu"


def _synthetic_report() -> dict:
    chunks = lambda scale: [{"rollout": 0, "autoregressive_index": i, "denoise_ms": scale * (120 - i),
                             "commit_ms": scale * 30.0} for i in range(7)]
    ours_chunks = chunks(1.0)
    summary = {"chunks_in_median": 5, "denoise_ms": 100.0, "chunk6_denoise_ms": 105.0, "commit_ms": 30.0,
               "denoise_plus_commit_ms": 130.0, "end_to_end_ms": 140.0, "end_to_end_decoder": "taehv",
               "generated_fps": 85.7, "decode_ms": {"taehv": 10.0}, "denoise_utilisation": 0.5}
    peer_summary = dict(summary, denoise_ms=150.0, chunk6_denoise_ms=160.0, commit_ms=45.0,
                        denoise_plus_commit_ms=195.0)
    report = {"slug": "self-forcing-wan2.1-t2v-1.3b", "device_kind": "NVIDIA H200", "date": "2026-11-30T12:00:00",
              "options": {"pixel_height": 480, "pixel_width": 832, "dtype": "bfloat16", "warmup_chunks": 2},
              "matmul_ceiling": {"tflops": 650.0},
              "ours": {"pallas": {"summary": summary, "chunks": ours_chunks, "num_devices": 1, "peak_memory_gib": 16.0,
                                  "compile_s": {"denoise": 5.0, "commit": 2.0},
                                  "forward": {"tokens": 32760, "median_ms": 500.0}},
                       "cudnn": {"summary": dict(summary, denoise_ms=120.0), "chunks": ours_chunks, "num_devices": 1,
                                 "peak_memory_gib": 16.0, "compile_s": {"denoise": 5.0, "commit": 2.0},
                                 "forward": None}},
              "peers": {"self-forcing": {"kind": "rollout", "summary": peer_summary, "chunks": chunks(1.5),
                                         "error": None, "peak_memory_gib": 9.0},
                        "diffusers-wan": {"kind": "forward", "error": None, "job": {"compile": True},
                                          "forward_summary": {"eager": {"median_ms": 700.0},
                                                              "compiled": {"median_ms": 600.0}}}},
              "published": {"hardware": "H100, 1 GPU", "denoise_ms": 344.0, "commit_ms": 74.0}}
    return report


def test_report_table_markdown_and_plot(tmp_path):
    report = _synthetic_report()
    rows = {row["figure"]: row for row in R.comparison_rows(report)}
    median = rows["denoise ms (all passes), median of chunks >= 2"]
    assert median["ours"] == {"wm_jax (pallas)": 100.0, "wm_jax (cudnn)": 120.0}
    assert median["peers"]["self-forcing"] == 150.0 and median["comparable"]["self-forcing"]
    assert rows["denoise ms, 6th chunk"]["published"] == 344.0
    compiled = rows["DiT forward ms, 32760 tokens, bidirectional (diffusers-wan compiled)"]
    assert compiled["ours"] == {"wm_jax (pallas)": 500.0, "wm_jax (cudnn)": None}
    assert compiled["peers"]["diffusers-wan"] == 600.0 and compiled["published"] is None
    text = R.format_report(report)
    assert "self-forcing / (pallas)" in text and "1.50x" in text and "1.25x" in text and "1.20x" in text
    assert "FlashDreams H100, 1 GPU (published)" in text
    md = R.markdown(report)
    assert md.splitlines()[0].startswith("| figure | wm_jax (pallas) | wm_jax (cudnn) | self-forcing (same call) | "
                                         "ratio to wm_jax (pallas) | ratio to wm_jax (cudnn) |")
    assert "| denoise ms (all passes), median of chunks >= 2 | 100.0 | 120.0 | 150.0 | 1.50x | 1.25x |" in md
    R.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_a_stopped_peer_gets_no_ratio():
    report = _synthetic_report()
    peer = report["peers"]["self-forcing"]
    peer["error"], peer["summary"] = "timed out after 300 s", dict(peer["summary"], chunks_in_median=2)
    md = R.markdown(report)
    assert "| denoise ms (all passes), median of chunks >= 2 | 100.0 | 120.0 | 150.0 | - | - |" in md


@pytest.mark.parametrize("body, timeout_s, expected", [
    ("import time\ntime.sleep(300)\n", 20, "timed out after 20 s"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", 120, "killed by signal 9 (SIGKILL)"),
])
def test_run_peer_says_why_a_child_stopped(tmp_path, body, timeout_s, expected):
    """A peer that hangs is stopped at the timeout (its whole process group), one killed by a signal says
    which; either way the parent gets a result document back."""
    pytest.importorskip("torch")
    from tests.test_peer_lingbot_fast import tiny_job
    from wm_jax.bench.peers import run_peer

    tree = marker_tree(tmp_path / "lingbot", "lingbot-fast")
    (tree / PEERS["lingbot-fast"].markers[0]).write_text(body)
    result = run_peer(tiny_job(str(tree)), timeout_s=timeout_s)
    assert result["error"] == expected
    assert result["chunks"] == [] and result["returncode"] != 0
