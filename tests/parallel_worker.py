"""Helpers of the multi-device tests (tests/test_parallel.py, tests/test_multihost.py).

Simulated CPU devices (`--xla_force_host_platform_device_count`) must be chosen before JAX starts, so
every multi-device run is a subprocess: this module starts them (bounded by timeouts, their process
groups killed on failure) and, run as a script, is the subprocess that streams the test models:

    python3 tests/parallel_worker.py OUT_DIR    (with 4 simulated devices)

streams two tiny models (Self-Forcing and LingBot-fast shapes) through `StreamingStep` on meshes of 1,
2 and 4 devices and writes `OUT_DIR/stream.npz` (every chunk's x0 and the final KV cache per case and
mesh) and `OUT_DIR/stream.json` (the plans' padding and the caches' shardings as seen on the devices);

    python3 tests/parallel_worker.py --distributed HOST:PORT PROCESS_ID NUM_PROCESSES OUT_DIR

is one process of a multi-process run of the LingBot shape (see `distributed_worker_main`);

    python3 tests/parallel_worker.py --collectives OUT_DIR    (with 2 simulated devices)

writes the compiled denoise / commit programs of the LingBot shape on 1 and 2 devices and whether commit
took the cache by donation (see `collectives_worker_main`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_DEVICES = 4  # simulated CPU devices of the multi-device subprocesses
MESH_SIZES = (1, 2, 4)
TOLERANCE = 1e-5
# `wm-jax run tiny` on a CPU is mostly XLA compilation (its VAE programs above all), which takes about half
# as long without backend optimisation: the subprocesses compile that way. Runs compared with each other
# always use the same flags, so this changes no comparison.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def relative_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def device_env(host_devices: int, fast_compile: bool = False) -> dict[str, str]:
    """Environment of a subprocess with `host_devices` simulated CPU devices."""
    flags = [f"--xla_force_host_platform_device_count={host_devices}"]
    if fast_compile:
        flags.append(FAST_COMPILE_FLAGS)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), "PYTHONUNBUFFERED": "1"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now (held together while chosen, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Finished:
    """A finished subprocess: argv, exit code, output and wall seconds."""

    def __init__(self, args, returncode: int, stdout: str, stderr: str, seconds: float):
        self.args, self.returncode, self.stdout, self.stderr, self.seconds = args, returncode, stdout, stderr, seconds

    def describe(self) -> str:
        tail = lambda text: "\n".join(text.strip().splitlines()[-40:])
        return (f"$ {' '.join(map(str, self.args))}\nexit code {self.returncode} after {self.seconds:.1f} s\n"
                f"--- stdout (tail)\n{tail(self.stdout)}\n--- stderr (tail)\n{tail(self.stderr)}")


def run_together(commands: list[tuple[list[str], dict[str, str]]], timeout_s: float) -> list[Finished]:
    """Runs (argv, env) commands at the same time (cwd: the repo root), each in its own process group.

    Waits at most `timeout_s` for all of them; past it, or if this is interrupted, every group still
    running is killed and AssertionError (with each command's output so far) is raised: a hang fails.
    """
    start = time.monotonic()
    procs, logs = [], []
    try:
        for argv, env in commands:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            logs.append((out, err))
            procs.append(subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=err, text=True,
                                          start_new_session=True))
        ended = {}
        for proc in procs:
            remaining = timeout_s - (time.monotonic() - start)
            try:
                proc.wait(timeout=max(remaining, 0.1))
            except subprocess.TimeoutExpired:
                break
            ended[proc.pid] = time.monotonic() - start
    finally:
        timed_out = [p for p in procs if p.poll() is None]
        for proc in timed_out:
            _kill_group(proc)
    results = []
    for (argv, _), proc, (out, err) in zip(commands, procs, logs):
        out.seek(0), err.seek(0)
        results.append(Finished(argv, proc.returncode, out.read(), err.read(),
                                ended.get(proc.pid, time.monotonic() - start)))
        out.close(), err.close()
    if timed_out:
        report = "\n\n".join(r.describe() for r in results)
        raise AssertionError(f"{len(timed_out)} of {len(procs)} process(es) still running after {timeout_s:.0f} s "
                             f"(killed):\n{report}")
    return results


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this module started for `proc` (it leads its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wm_jax.cli", *map(str, args)]


# ---------------------------------------------------------------------------------------------------
# `wm-jax run tiny` on several device counts (shared by both test files within one pytest session)
# ---------------------------------------------------------------------------------------------------

TINY_ARGS = ("--save_latents", "--total_blocks", "2")
_tiny_root = None
_tiny_runs: dict[int, tuple[Finished, Path]] = {}


def tiny_run_dir() -> Path:
    global _tiny_root
    if _tiny_root is None:
        _tiny_root = Path(tempfile.mkdtemp(prefix="wm_jax_tiny_runs_"))
    return _tiny_root


def tiny_runs(device_counts, timeout_s: float = 240) -> dict[int, tuple[Finished, Path]]:
    """`wm-jax run tiny --num_devices N --save_latents --total_blocks 2` in one process with 4 simulated
    devices, for each N: N -> (result, output dir). Each N runs once per pytest session; those not run
    yet start together."""
    return tiny_runs_with(device_counts, (), timeout_s)[0]


def tiny_runs_with(device_counts, commands, timeout_s: float = 240):
    """`tiny_runs(device_counts)` started together with other (argv, env) `commands`: (runs, their results)."""
    missing = [n for n in device_counts if n not in _tiny_runs]
    tiny = [(cli("run", "tiny", "--num_devices", n, *TINY_ARGS, "--output_dir", tiny_run_dir() / f"devices{n}"),
             device_env(HOST_DEVICES, fast_compile=True)) for n in missing]
    results = run_together(tiny + list(commands), timeout_s) if tiny or commands else []
    for n, result in zip(missing, results):
        _tiny_runs[n] = (result, tiny_run_dir() / f"devices{n}")
    return {n: _tiny_runs[n] for n in device_counts}, results[len(missing):]


def tiny_outputs(result: Finished, out_dir: Path):
    """(latents [F, h, w, C], stats dict) written by a finished `wm-jax run tiny`; AssertionError if absent."""
    import numpy as np

    assert result.returncode == 0, result.describe()
    latents, stats = out_dir / "latents_tiny.npy", out_dir / "stats_tiny.json"
    assert latents.is_file() and stats.is_file(), f"missing outputs in {out_dir}: {sorted(os.listdir(out_dir))}\n" \
                                                  f"{result.describe()}"
    return np.load(latents), json.loads(stats.read_text())


# ---------------------------------------------------------------------------------------------------
# The streaming worker (run as a script in a subprocess with 4 simulated devices)
# ---------------------------------------------------------------------------------------------------

LATENT_CHUNK, NUM_CHUNKS = 3, 4


def _cases():
    from wm_jax.models.config import CAMERA_FOLD, WanConfig
    from wm_jax.streaming.schedules import boundary_schedule, lingbot_fast_schedule, self_forcing_schedule

    return {
        # Self-Forcing shape: t2v, float modulation in the compute dtype, 4 heads; latent 4x8 -> 8 tokens per
        # frame: tokens and heads divide over 1, 2 and 4 devices. Sink 1 + ring 4: chunk writes split across
        # the ring's wrap.
        "self_forcing": dict(config=WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=2, text_dim=64,
                                              fp32_modulation=False),
                             schedule=self_forcing_schedule(shift=5.0), latent=(4, 8), sink=1, ring=4),
        # LingBot-fast shape: I2V (y: mask 4 + image latent 16) + camera (6·8·8 = 384 channels), 2 heads;
        # latent 4x6 -> 6 tokens per frame: padded to 8 over 4 devices, and 2 heads padded to 4.
        "lingbot_fast": dict(config=WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36,
                                              text_dim=64, camera_channels=6 * CAMERA_FOLD**2),
                             schedule=lingbot_fast_schedule(), latent=(4, 6), sink=3, ring=4),
        # causal Wan2.2 shape: two experts (3 high-noise passes, then 5 low-noise, one cache each, the
        # high-noise expert's text K/V shared), a 1-frame first chunk then 3-frame chunks.
        "causal_wan22": dict(config=WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=2, text_dim=64),
                             schedule=boundary_schedule(5.0, (1000, 850, 700, 550, 350, 275, 200, 125), 0.875),
                             latent=(4, 8), sink=1, ring=4, experts=2, first_chunk=1),
    }


def _model(config, experts: int = 1):
    """The same weights on every run: seed 0, then every parameter perturbed (modulation tables and norm
    scales start at 0 / 1: no path is an identity); with 2 experts, an `ExpertPair` perturbed apart."""
    if experts == 2:
        from wm_jax.models.wan import ExpertPair

        return ExpertPair(_one_model(config, 11), _one_model(config, 12), boundary=0.875)
    return _one_model(config, 11)


def _one_model(config, perturbation_seed: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from wm_jax.models.wan import WanModel

    model = WanModel(config, rngs=nnx.Rngs(0), compute_dtype=jnp.float32, attention_impl="xla")
    leaves, treedef = jax.tree_util.tree_flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(perturbation_seed), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


def _stream(case: dict, model, num_devices: int, rules=None, *, mesh=None, read_cache: bool = True):
    """Streams NUM_CHUNKS chunks on a mesh of `num_devices` (or `mesh`): (x0 per chunk, final cache k/v
    [real heads] or None without `read_cache`, info)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from wm_jax.parallel.mesh import make_mesh, to_host
    from wm_jax.streaming.plan import RolloutPlan
    from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise

    cfg, (lat_h, lat_w) = case["config"], case["latent"]
    plan = RolloutPlan.create(cfg, mesh or make_mesh(num_devices), pixel_height=8 * lat_h, pixel_width=8 * lat_w,
                              chunk_frames=LATENT_CHUNK, total_blocks=NUM_CHUNKS, sink_frames=case["sink"],
                              ring_frames=case["ring"], rules=rules, first_chunk_frames=case.get("first_chunk"))
    step = StreamingStep(model, case["schedule"], plan)
    frames = plan.latent_frames
    rng = np.random.default_rng(7)
    text = rng.standard_normal((1, 7, cfg.text_dim), np.float32)
    y = (rng.standard_normal((1, frames, lat_h, lat_w, cfg.in_dim - cfg.out_dim), np.float32)
         if cfg.in_dim > cfg.out_dim else None)
    camera = (rng.standard_normal((1, frames, lat_h, lat_w, cfg.camera_channels), np.float32)
              if cfg.camera_channels else None)
    key = jax.random.key(5)
    cross_kv = step.cross_kv(text)
    cache = step.init_cache(jnp.float32)
    x0s = []
    for c in range(NUM_CHUNKS):
        window = slice(plan.first_frame_of(c), plan.first_frame_of(c) + plan.frames_of(c))
        inputs = step.whole(ChunkInputs(y=None if y is None else y[:, window],
                                        camera=None if camera is None else camera[:, window]))
        noise = step.whole(chunk_noise(key, c, case["schedule"].num_steps, plan.chunk_shape_of(c)))
        x0 = step.denoise(step.params, cache, cross_kv, noise, inputs)
        cache = step.commit(step.params, cache, cross_kv, x0, inputs)
        x0s.append(to_host(x0))
    caches = step.per_expert(cache)  # one per expert
    cache = caches[0]
    x0_devices = sorted(d.id for d in x0.sharding.device_set)
    k_shards = sorted(cache.k.addressable_shards, key=lambda s: s.device.id)  # (this process's devices)
    info = {
        "num_devices": plan.num_devices,
        "padded_heads": plan.shards.padded_heads,
        "padded_tokens_per_frame": plan.shards.padded_tokens_per_frame,
        "tokens_per_frame": plan.tokens_per_frame,
        "mesh_devices": [d.id for d in plan.mesh.devices.flat],
        "cache_k_shape": list(cache.k.shape),
        "cache_k_spec": [None if a is None else str(a) for a in cache.k.sharding.spec],
        "cache_k_shards": [{"device": s.device.id, "shape": list(s.data.shape), "index": str(s.index)}
                           for s in k_shards],
        "cross_kv_spec": {name: [None if a is None else str(a) for a in value.sharding.spec]
                          for name, value in cross_kv.items()} if isinstance(cross_kv, dict) else None,
        "x0_devices": x0_devices,
        "x0_fully_replicated": bool(x0.sharding.is_fully_replicated),
        "committed_frames": int(to_host(cache.committed_frames)),
    }
    if not read_cache:  # (a cache spread over several processes cannot be read by one)
        return x0s, None, info
    # the cache holds the padded heads; the real ones are the first num_heads on every device count (the
    # experts' caches stacked along the layer axis)
    k, v = (np.concatenate([np.asarray(getattr(c, name)) for c in caches]) for name in ("k", "v"))
    info["padded_heads_max_abs"] = float(max(np.abs(k[:, :, :, cfg.num_heads:]).max(initial=0.0),
                                             np.abs(v[:, :, :, cfg.num_heads:]).max(initial=0.0)))
    return x0s, (k[:, :, :, : cfg.num_heads], v[:, :, :, : cfg.num_heads]), info


def _option_error(fn) -> dict | None:
    from wm_jax.errors import OptionError

    try:
        fn()
    except OptionError as err:
        return {"option": err.option, "message": str(err), "type": type(err).__name__}
    return None


def worker_main(out_dir: str) -> None:
    import jax
    import numpy as np

    from wm_jax.parallel.mesh import make_mesh
    from wm_jax.parallel.sharding import ShardingRules
    from wm_jax.streaming.plan import RolloutPlan

    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == HOST_DEVICES, jax.devices()
    out = Path(out_dir)
    arrays, report = {}, {"devices": len(jax.devices()), "cases": {}, "errors": {}}
    cases = _cases()
    sharded_context = ShardingRules(context_heads="sp")
    for name, case in cases.items():
        model = _model(case["config"], case.get("experts", 1))
        variants = [(str(n), n, None) for n in MESH_SIZES]
        if case["config"].num_heads % HOST_DEVICES == 0:  # head-sharded cross-attention K/V where they divide
            variants.append((f"{HOST_DEVICES}_context_heads_sharded", HOST_DEVICES, sharded_context))
        report["cases"][name] = {}
        for label, n, rules in variants:
            start = time.perf_counter()
            x0s, (k, v), info = _stream(case, model, n, rules)
            info["seconds"] = time.perf_counter() - start
            report["cases"][name][label] = info
            for c, x0 in enumerate(x0s):
                arrays[f"{name}/{label}/x0_{c}"] = x0
            arrays[f"{name}/{label}/cache_k"], arrays[f"{name}/{label}/cache_v"] = k, v
            print(f"{name} on {label} device(s): {info['seconds']:.1f} s", flush=True)

    lingbot = cases["lingbot_fast"]
    plan_args = dict(pixel_height=8 * lingbot["latent"][0], pixel_width=8 * lingbot["latent"][1],
                     chunk_frames=LATENT_CHUNK, total_blocks=NUM_CHUNKS, sink_frames=lingbot["sink"],
                     ring_frames=lingbot["ring"])
    for n in MESH_SIZES:  # 2 heads with head-sharded cross-attention K/V: 4 devices cannot split them
        report["errors"][f"context_heads_sharded_{n}"] = _option_error(
            lambda: RolloutPlan.create(lingbot["config"], make_mesh(n), rules=sharded_context, **plan_args))
    for n in (0, HOST_DEVICES + 1):
        report["errors"][f"make_mesh_{n}"] = _option_error(lambda: make_mesh(n))
    np.savez(out / "stream.npz", **arrays)
    (out / "stream.json").write_text(json.dumps(report, indent=1))


def collectives_worker_main(out_dir: str) -> None:
    """The LingBot shape on meshes of 1 and 2 devices: writes the compiled HLO of `denoise` and `commit`
    (OUT_DIR/{n}_{denoise,commit}.hlo) and OUT_DIR/collectives.json with the KV cache's global and
    per-device shapes, whether one `commit` deleted (took by donation) the cache it was given, whether
    `StreamingStep.whole` keeps an array already replicated as P(None, None), and `local_replica`'s error
    for the cache (None where it is whole on the one device)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax.sharding import NamedSharding, PartitionSpec

    from wm_jax.parallel.mesh import local_replica, make_mesh
    from wm_jax.streaming.plan import RolloutPlan
    from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise

    assert len(jax.devices()) == 2, jax.devices()
    out, case = Path(out_dir), _cases()["lingbot_fast"]
    cfg, (lat_h, lat_w) = case["config"], case["latent"]
    model, rng, report = _model(cfg), np.random.default_rng(0), {}
    for n in (1, 2):
        plan = RolloutPlan.create(cfg, make_mesh(n), pixel_height=8 * lat_h, pixel_width=8 * lat_w,
                                  chunk_frames=LATENT_CHUNK, total_blocks=NUM_CHUNKS, sink_frames=case["sink"],
                                  ring_frames=case["ring"])
        step = StreamingStep(model, case["schedule"], plan)
        cross_kv = step.cross_kv(rng.standard_normal((1, 7, cfg.text_dim), np.float32))
        inputs = step.whole(ChunkInputs(y=rng.standard_normal(plan.condition_shape, np.float32),
                                        camera=rng.standard_normal((*plan.chunk_shape[:4], cfg.camera_channels),
                                                                   np.float32)))
        noise = step.whole(chunk_noise(jax.random.key(0), 0, case["schedule"].num_steps, plan.chunk_shape))
        cache = step.init_cache(jnp.float32)
        x0 = step.denoise(step.params, cache, cross_kv, noise, inputs)
        programs = {"denoise": step.denoise.lower(step.params, cache, cross_kv, noise, inputs),
                    "commit": step.commit.lower(step.params, cache, cross_kv, x0, inputs)}
        for name, lowered in programs.items():
            (out / f"{n}_{name}.hlo").write_text(lowered.compile().as_text())
        report[n] = {"cache_shape": list(cache.k.shape),
                     "cache_shard_shapes": sorted({tuple(s.data.shape) for s in cache.k.addressable_shards})}
        spelled_out = jax.device_put(np.zeros((2, 3), np.float32), NamedSharding(plan.mesh, PartitionSpec(None, None)))
        report[n]["whole_keeps_replicated"] = step.whole(spelled_out) is spelled_out  # P(None, None) ~ P()
        try:
            local_replica(cache.k)
            report[n]["local_replica_of_cache"] = None
        except ValueError as err:
            report[n]["local_replica_of_cache"] = str(err)
        step.commit(step.params, cache, cross_kv, x0, inputs)
        report[n]["cache_deleted"] = [cache.k.is_deleted(), cache.v.is_deleted()]
    (out / "collectives.json").write_text(json.dumps(report))


def distributed_worker_main(address: str, process_id: int, num_processes: int, out_dir: str) -> None:
    """One process of a multi-process run: joins through `initialize_distributed`, streams the LingBot
    shape on the global mesh (every process's devices), and process 0 then streams it again on one of
    its own devices; process 0 writes both to OUT_DIR/distributed.npz (other processes write nothing)."""
    from wm_jax.parallel.mesh import initialize_distributed

    initialize_distributed(address, num_processes, process_id, timeout_s=120)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    jax.config.update("jax_default_matmul_precision", "highest")
    case = _cases()["lingbot_fast"]
    model = _model(case["config"])  # created on this process's default device, placed by StreamingStep
    x0s, _, info = _stream(case, model, len(jax.devices()), read_cache=False)
    print(f"process {jax.process_index()}: global mesh {info['mesh_devices']}, cache shards "
          f"{[s['shape'] for s in info['cache_k_shards']]}", flush=True)
    if jax.process_index() != 0:
        return
    local = Mesh(np.asarray(jax.local_devices()[:1]), ("sp",))
    reference, _, _ = _stream(case, model, 1, mesh=local)
    arrays = {f"global/x0_{c}": x for c, x in enumerate(x0s)}
    arrays.update({f"local/x0_{c}": x for c, x in enumerate(reference)})
    np.savez(Path(out_dir) / "distributed.npz", **arrays)
    (Path(out_dir) / "distributed.json").write_text(json.dumps({**info, "processes": jax.process_count()}))


if __name__ == "__main__":
    if sys.argv[1] == "--distributed":
        distributed_worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "--collectives":
        collectives_worker_main(sys.argv[2])
    else:
        worker_main(sys.argv[1])
