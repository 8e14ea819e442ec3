"""Peers: other runtimes' own inference loops, run from a user's checkout of their repo in a child process on
the same GPU, with our shapes and random weights of the same sizes, cuDNN SDPA forced.

`PEERS` names each peer's repo, the commit the adapter was written against, the files a checkout must have,
and its adapter module (`wm_jax.bench.peers.<name>`: `run(job, writer, device)`). The parent checks the
checkout (`check_checkout`) before any heavy work and runs the child (`run_peer`); nothing here imports torch,
JAX or the checkout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from wm_jax.bench.peers.job import PeerJob
from wm_jax.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    kind: str  # "rollout": a causal AR loop timed per chunk; "forward": one bidirectional DiT forward
    runs: str  # the models the loop takes: "t2v" (no image, no camera), "camera" (LingBot I2V + camera), "wan" (no camera)
    repo: str  # owner/name on GitHub
    commit: str | None  # the commit the adapter was written against (None: any version with `markers`)
    markers: tuple[str, ...]  # files (relative to the checkout) the adapter imports
    module: str
    loop: str  # what is run, for tables and README
    fetch: str  # how to get the checkout


PEERS = {
    "self-forcing": Peer(
        name="self-forcing", kind="rollout", runs="t2v", repo="guandeh17/Self-Forcing",
        commit="33593df3e81fa3ec10239271dd2c100facac6de1",
        markers=("pipeline/causal_inference.py", "utils/wan_wrapper.py", "wan/modules/causal_model.py"),
        module="wm_jax.bench.peers.self_forcing", loop="CausalInferencePipeline.inference (eager)",
        fetch="git clone https://github.com/guandeh17/Self-Forcing DIR && git -C DIR checkout 33593df"),
    "lingbot-fast": Peer(
        name="lingbot-fast", kind="rollout", runs="camera", repo="Robbyant/lingbot-world",
        commit="65d29dd3630a589d8e93679e0e102d960d7705ff",
        markers=("wan/image2video_fast.py", "wan/modules/model_fast.py"),
        module="wm_jax.bench.peers.lingbot_fast", loop="WanI2VFast.generate (eager)",
        fetch="git clone https://github.com/prashant182/lingbot-world DIR && git -C DIR checkout 65d29dd "
              "(Robbyant/lingbot-world's Fast merge; the upstream repo's main branch does not have it yet)"),
    "diffusers-wan": Peer(
        name="diffusers-wan", kind="forward", runs="wan", repo="huggingface/diffusers", commit=None,
        markers=("src/diffusers/models/transformers/transformer_wan.py",),
        module="wm_jax.bench.peers.diffusers_wan", loop="WanTransformer3DModel.forward (eager, torch.compile)",
        fetch="pip install diffusers (or git clone https://github.com/huggingface/diffusers DIR)"),
}


class PeerSetupError(OptionError):
    """A peer cannot be set up from what the user gave (no checkout, not the expected repo)."""


@dataclasses.dataclass(frozen=True)
class Checkout:
    path: str | None  # None: the installed package (diffusers-wan without a checkout)
    commit: str | None
    warnings: tuple[str, ...]


def _git_head(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_checkout(name: str, upstream_dir: str | None) -> Checkout:
    """The checkout `upstream_dir` for peer `name`, checked before anything heavy: an error names what is
    missing; a checkout at another commit than the adapter's (or whose commit cannot be read) is a warning
    that prints both."""
    if name not in PEERS:
        raise PeerSetupError("peer", f"{{peer}} {name}: expected one of {', '.join(PEERS)}")
    peer = PEERS[name]
    if upstream_dir is None:
        if peer.name == "diffusers-wan" and _installed("diffusers"):
            return Checkout(None, None, ())
        raise PeerSetupError("upstream_dir", f"{{peer}} {name} needs {{upstream_dir}}: a checkout of {peer.repo} "
                                             f"({peer.fetch})")
    path = Path(upstream_dir).expanduser().resolve()
    if not path.is_dir():
        raise PeerSetupError("upstream_dir", f"{{upstream_dir}} {upstream_dir}: no such folder; expected a checkout "
                                             f"of {peer.repo} ({peer.fetch})")
    missing = [m for m in peer.markers if not (path / m).is_file()]
    if missing:
        raise PeerSetupError("upstream_dir", f"{{upstream_dir}} {upstream_dir}: not a checkout of {peer.repo} for "
                                             f"{{peer}} {name}: missing {', '.join(missing)}")
    warnings = []
    head = _git_head(path)
    if peer.commit and head is None:
        warnings.append(f"{name}: cannot read the commit of {path} (not a git checkout?); the adapter was written "
                        f"against {peer.repo}@{peer.commit[:7]}")
    elif peer.commit and head != peer.commit:
        warnings.append(f"{name}: {path} is at {head[:7]}, the adapter was written against "
                        f"{peer.repo}@{peer.commit[:7]}; figures may differ or the run may fail")
    return Checkout(str(path), head, tuple(warnings))


def check_fits(name: str, model, slug: str) -> None:
    """Raises PeerSetupError when peer `name`'s loop cannot run this recipe's model (a WanConfig)."""
    runs = PEERS[name].runs
    camera, t2v = bool(model.camera_channels), model.in_dim == model.out_dim and not model.image_dim
    if (runs == "t2v" and not t2v) or (runs == "camera" and not camera) or (runs == "wan" and camera):
        what = {"t2v": "text-to-video models (no image or camera input)", "camera": "LingBot camera models",
                "wan": "Wan models without camera layers"}[runs]
        raise PeerSetupError("peer", f"{{peer}} {name} runs {what}; recipe {slug} is "
                                     + ("a camera model" if camera else "image-to-video" if not t2v else "text-to-video"))


def pair_peers(names: list[str], dirs: list[str]) -> tuple[tuple[str, str | None], ...]:
    """(peer, checkout) pairs from the peer names and the checkout folders: one plain DIR with one peer, else
    NAME=DIR per peer (NAME= or no entry: none, i.e. the installed package where the peer allows it)."""
    for name in names:
        if name not in PEERS:
            raise PeerSetupError("peer", f"{{peer}} {name}: expected one of {', '.join(PEERS)}")
    if len(set(names)) != len(names):
        raise PeerSetupError("peer", f"{{peer}} {','.join(names)}: each peer once")
    if dirs and not names:
        raise PeerSetupError("upstream_dir", "{upstream_dir} is given without {peer}")
    if len(names) == 1 and len(dirs) == 1 and "=" not in dirs[0]:
        return ((names[0], dirs[0]),)
    by_name = {}
    for item in dirs:
        name, sep, folder = item.partition("=")
        if not sep or name not in names:
            raise PeerSetupError("upstream_dir", f"{{upstream_dir}} {item}: expected NAME=DIR with NAME one of the "
                                                 f"{{peer}} values ({', '.join(names)})")
        by_name[name] = folder or None
    return tuple((name, by_name.get(name)) for name in names)


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def run_peer(job: PeerJob, timeout_s: float | None = None, log=None) -> dict:
    """Runs `job` in a child process (`python -m wm_jax.bench.peers.runner`) and returns its result document
    (see `job.ResultWriter`) with `returncode` and, when it failed, the child's last output lines in
    `output_tail`. A timeout or a crash keeps what the child had written; `error` then says why it stopped."""
    with tempfile.TemporaryDirectory(prefix=f"wm_jax_peer_{job.peer}_") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(job.to_json())
        env = dict(os.environ)
        env.pop("JAX_PLATFORMS", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(Path(__file__).resolve().parents[3]),
                                                        env.get("PYTHONPATH", "")] if p)
        cmd = [sys.executable, "-m", "wm_jax.bench.peers.runner", str(job_path), str(result_path)]
        output: list[str] = []
        try:  # its own process group: a timeout stops torch.compile's workers too
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
        except OSError as err:
            return {"peer": job.peer, "error": f"could not start the peer: {err}", "returncode": None, "chunks": [],
                    "forward": {}}

        def pump():  # the child's output, line by line, to `log`
            for line in proc.stdout:
                output.append(line.rstrip("\n"))
                if log:
                    log(f"[{job.peer}] {line.rstrip()}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            returncode = None
        reader.join(timeout=10)
        result = json.loads(result_path.read_text()) if result_path.is_file() else {
            "peer": job.peer, "chunks": [], "forward": {}, "notes": [], "error": None}
        result["returncode"] = returncode
        if returncode != 0:
            result["output_tail"] = output[-20:]
            if returncode is None:
                result["error"] = f"timed out after {timeout_s:.0f} s"
            elif returncode < 0:
                result["error"] = f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
            elif not result.get("error"):
                result["error"] = output[-1] if output else f"exit status {returncode}"
        return result
