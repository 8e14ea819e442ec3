"""Multi-host runs: processes joined through jax.distributed (gloo collectives on the CPU).

Two local processes with 2 simulated CPU devices each run `wm-jax run tiny` as one 4-device mesh. The
reference is ONE process with 4 devices: the same global mesh, hence the same Ulysses split (tiny's 28
tokens per frame, 7 per device; its 2 heads padded to 4, one per device) and the same compiled programs,
so the comparison isolates what is specific to several processes (gloo's collectives, inputs placed with
`make_array_from_callback`, results read from local replicas, process 0 alone writing). That any device
count gives the 1-device numbers is tests/test_parallel.py's part; the streaming-worker test here also
compares 2 processes x 2 devices directly with one device. Every subprocess is bounded by a timeout and
killed on failure: a hang fails.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import numpy as np
import pytest

from tests.parallel_worker import (NUM_CHUNKS, TINY_ARGS, TOLERANCE, cli, device_env, free_ports, relative_l2,
                                   run_together, tiny_outputs, tiny_runs_with)

PROCESS_DEVICES = 2
NUM_PROCESSES = 2


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Started together: `wm-jax run tiny` on 2 processes x 2 devices (and, unless this session already
    has it, on 1 process x 4 devices), and the streaming worker on 2 processes x 2 devices.
    Returns (4-device reference, [tiny process 0, 1], their output dirs, [worker process 0, 1], its dir)."""
    out = tmp_path_factory.mktemp("multihost")
    address, worker_address = (f"127.0.0.1:{port}" for port in free_ports(2))
    dirs = [out / f"process{i}" for i in range(NUM_PROCESSES)]
    worker_dir = out / "worker"
    worker_dir.mkdir()
    commands = [(cli("run", "tiny", "--coordinator_address", address, "--num_processes", NUM_PROCESSES,
                     "--process_id", i, "--coordinator_timeout", 120, *TINY_ARGS, "--output_dir", dirs[i]),
                 device_env(PROCESS_DEVICES, fast_compile=True)) for i in range(NUM_PROCESSES)]
    commands += [([sys.executable, "tests/parallel_worker.py", "--distributed", worker_address, str(i),
                   str(NUM_PROCESSES), str(worker_dir)], device_env(PROCESS_DEVICES)) for i in range(NUM_PROCESSES)]
    runs, results = tiny_runs_with([4], commands, timeout_s=240)
    return runs[4], results[:NUM_PROCESSES], dirs, results[NUM_PROCESSES:], worker_dir


def test_two_processes_give_the_latents_of_one_process_with_the_same_devices(two_processes):
    reference, results, dirs, _, _ = two_processes
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i}:\n{result.describe()}"
    latents, stats = tiny_outputs(results[0], dirs[0])
    expected, reference_stats = tiny_outputs(*reference)
    assert reference_stats["num_devices"] == 4 and reference_stats["num_processes"] == 1
    assert stats["num_devices"] == PROCESS_DEVICES * NUM_PROCESSES
    assert stats["num_processes"] == NUM_PROCESSES
    assert stats["config"]["plan"]["num_devices"] == 4
    assert latents.shape == expected.shape == (6, 8, 14, 16)
    error = relative_l2(latents, expected)
    assert error <= TOLERANCE, f"2 processes x 2 devices vs 1 process x 4 devices: relative L2 {error:.2e}"


def test_only_process_0_writes_files(two_processes):
    _, results, dirs, _, _ = two_processes
    assert all(r.returncode == 0 for r in results), "\n\n".join(r.describe() for r in results)
    assert sorted(p.name for p in dirs[0].iterdir()) == ["latents_tiny.npy", "stats_tiny.json", "tiny.mp4"]
    assert not dirs[1].exists() or not any(dirs[1].iterdir()), sorted(dirs[1].rglob("*"))
    assert "wrote" in results[0].stdout and "wrote" not in results[1].stdout


def test_streaming_step_across_processes_equals_one_local_device(two_processes):
    """StreamingStep with a model built eagerly on each process's own device (placed on the global mesh by
    the step), I2V y and camera inputs: the LingBot shape on 2 x 2 devices (6 tokens per frame and 2 heads,
    both padded) against process 0 alone on one of its devices."""
    _, _, _, results, out = two_processes
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i}:\n{result.describe()}"
    info = json.loads((out / "distributed.json").read_text())
    assert info["processes"] == NUM_PROCESSES and info["num_devices"] == PROCESS_DEVICES * NUM_PROCESSES
    assert info["padded_heads"] == 4 and info["padded_tokens_per_frame"] == 8
    # each process holds its own devices' shards of the head-sharded cache: one padded head per device
    assert [s["shape"][3] for s in info["cache_k_shards"]] == [1] * PROCESS_DEVICES
    assert sorted(p.name for p in out.iterdir()) == ["distributed.json", "distributed.npz"]
    with np.load(out / "distributed.npz") as npz:
        errors = {c: relative_l2(npz[f"global/x0_{c}"], npz[f"local/x0_{c}"]) for c in range(NUM_CHUNKS)}
    assert max(errors.values()) <= TOLERANCE, errors


# ---------------------------------------------------------------------------------------------------
# joining fails: a bounded wait and an error naming the flag, never a hang
# ---------------------------------------------------------------------------------------------------

JOIN_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def lonely_processes(tmp_path_factory):
    """Process 1 with nobody listening at the address, and process 0 whose peer never comes."""
    out = tmp_path_factory.mktemp("lonely")
    ports = dict(zip((1, 0), free_ports(2)))
    commands = [(cli("run", "tiny", "--coordinator_address", f"127.0.0.1:{ports[i]}", "--num_processes", 2,
                     "--process_id", i, "--coordinator_timeout", JOIN_TIMEOUT_S, "--total_blocks", 1,
                     "--output_dir", out / f"process{i}"), device_env(PROCESS_DEVICES)) for i in (1, 0)]
    return dict(zip((1, 0), run_together(commands, timeout_s=90))), out


@pytest.mark.parametrize("process_id", [1, 0])
def test_an_unreachable_coordinator_is_an_error_naming_the_flag(lonely_processes, process_id):
    results, out = lonely_processes
    result = results[process_id]
    assert result.returncode == 1, result.describe()  # an error exit, not a crash (134: jax's abort)
    assert result.seconds < 30, result.describe()
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("wm-jax: error: --coordinator_address 127.0.0.1:"), result.describe()
    assert f"process {process_id} of 2 could not join within {datetime.timedelta(seconds=JOIN_TIMEOUT_S)}" in message
    assert "--coordinator_timeout" in message and "--num_processes" in message
    assert "Traceback" not in result.stderr, result.describe()
    assert not (out / f"process{process_id}").exists()


@pytest.fixture(scope="module")
def usage_errors():
    cases = {
        "address only": ("--coordinator_address", "127.0.0.1:12345"),
        "no address": ("--num_processes", 2, "--process_id", 0),
        "no port": ("--coordinator_address", "localhost", "--num_processes", 2, "--process_id", 0),
    }
    commands = [(cli("run", "tiny", *args, "--total_blocks", 1, "--output_dir", "/nonexistent/wm_jax_usage"),
                 device_env(1)) for args in cases.values()]
    start = time.monotonic()
    results = run_together(commands, timeout_s=90)
    return dict(zip(cases, results)), time.monotonic() - start


def test_multihost_flags_go_together(usage_errors):
    results, seconds = usage_errors
    for name in ("address only", "no address"):
        result = results[name]
        assert result.returncode == 2, result.describe()  # a usage mistake (flags that go together), not a value
        assert "--coordinator_address, --num_processes and --process_id go together" in result.stderr, \
            result.describe()
    assert "missing --num_processes, --process_id" in results["address only"].stderr
    assert "missing --coordinator_address" in results["no address"].stderr
    assert results["no port"].returncode == 1 and "expected HOST:PORT" in results["no port"].stderr, \
        results["no port"].describe()
    assert seconds < 60
