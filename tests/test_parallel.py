"""Ulysses sequence parallelism: the same numbers on any device count (float32, 1e-5 relative L2).

Devices are simulated on the CPU (`--xla_force_host_platform_device_count=4`, set before JAX starts), so
every run here is a subprocess (helpers: tests/parallel_worker.py):

  * the streaming step itself: one subprocess with 4 devices builds meshes of 1, 2 and 4 devices and
    streams a Self-Forcing-shaped and a LingBot-fast-shaped tiny model (I2V y + 384 camera channels) and
    a causal-Wan2.2-shaped expert pair (8 passes split 3 / 5, a 1-frame first chunk, one cache per expert)
    through `StreamingStep`, 4 chunks through a sink + ring cache that wraps. The LingBot shape has 6
    tokens per frame and 2 heads (both padded on 4 devices), the Self-Forcing one 8 tokens and 4 heads
    (no padding). Every chunk's x0 and the final cache must agree with the 1-device run, and the cache
    must really be split by heads across the devices (so the test cannot pass on one device);
  * what the compiled denoise / commit exchange (one subprocess with 2 devices): nothing on one device,
    only the chunk on two (no collective has the KV cache's shape), and commit takes the cache by donation;
    replicated arrays are recognised by equivalence, and a sharded one is never read as one replica;
  * `wm-jax run tiny --num_devices N` for N = 1, 2, 4 (three processes with 4 devices each);
  * the golden parity cases on 4 devices;
  * bad device counts: errors naming the option, before any model work.
"""

from __future__ import annotations

import json
import re
import sys
import time

import numpy as np
import pytest

from tests.parallel_worker import (HOST_DEVICES, MESH_SIZES, NUM_CHUNKS, TOLERANCE, cli, device_env, relative_l2,
                                   run_together, tiny_outputs, tiny_runs)

CASES = ("self_forcing", "lingbot_fast", "causal_wan22")


# ---------------------------------------------------------------------------------------------------
# (a) StreamingStep on meshes of 1, 2 and 4 devices (one subprocess)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """(arrays, report) of tests/parallel_worker.py run with 4 simulated devices."""
    out = tmp_path_factory.mktemp("stream")
    (result,) = run_together([([sys.executable, "tests/parallel_worker.py", str(out)], device_env(HOST_DEVICES))],
                             timeout_s=300)
    assert result.returncode == 0, result.describe()
    report = json.loads((out / "stream.json").read_text())
    with np.load(out / "stream.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, report


def _variants(report, case):
    return [label for label in report["cases"][case] if label != "1"]


@pytest.mark.parametrize("case", CASES)
def test_streamed_chunks_agree_on_every_device_count(streamed, case):
    arrays, report = streamed
    labels = _variants(report, case)
    assert {str(n) for n in MESH_SIZES} - {"1"} <= set(labels)
    errors = {}
    for label in labels:
        for c in range(NUM_CHUNKS):
            reference = arrays[f"{case}/1/x0_{c}"]
            assert np.isfinite(reference).all() and np.abs(reference).max() > 0.1
            errors[f"{label} devices, chunk {c}"] = relative_l2(arrays[f"{case}/{label}/x0_{c}"], reference)
        for part in ("cache_k", "cache_v"):  # every slot the rollout wrote, real heads only
            errors[f"{label} devices, final {part}"] = relative_l2(arrays[f"{case}/{label}/{part}"],
                                                                   arrays[f"{case}/1/{part}"])
    worst = max(errors.values())
    assert worst <= TOLERANCE, "\n".join(f"{k}: {v:.2e}" for k, v in errors.items())


@pytest.mark.parametrize("case", CASES)
def test_the_cache_is_split_by_heads_across_the_devices(streamed, case):
    _, report = streamed
    runs = report["cases"][case]
    assert report["devices"] == HOST_DEVICES
    for label, info in runs.items():
        n = info["num_devices"]
        assert info["mesh_devices"] == list(range(n)), label
        assert info["x0_devices"] == list(range(n)) and info["x0_fully_replicated"], label
        # [layers, B, T, heads, d]: only the heads axis is on the mesh axis; each device holds N_pad / P heads
        assert info["cache_k_spec"] == [None, None, None, "sp", None], label
        heads = info["padded_heads"]
        assert heads % n == 0 and info["cache_k_shape"][3] == heads, label
        shards = info["cache_k_shards"]
        assert sorted(s["device"] for s in shards) == list(range(n)), label
        for s in shards:
            assert s["shape"] == [*info["cache_k_shape"][:3], heads // n, info["cache_k_shape"][4]], (label, s)
        assert len({s["index"] for s in shards}) == n, f"{label}: devices hold the same heads {shards}"
        first = 1 if case == "causal_wan22" else 3  # its 1-frame first chunk
        assert info["committed_frames"] == first + (NUM_CHUNKS - 1) * 3


def test_padding_is_exercised(streamed):
    """LingBot shape: 6 tokens per frame and 2 heads, padded on 4 devices (8 tokens, 4 heads); the
    Self-Forcing shape divides evenly; the sink + ring caches wrap before the last chunk."""
    _, report = streamed
    lingbot, self_forcing = report["cases"]["lingbot_fast"], report["cases"]["self_forcing"]
    assert lingbot["4"]["tokens_per_frame"] == 6 and lingbot["4"]["padded_tokens_per_frame"] == 8
    assert lingbot["4"]["padded_heads"] == 4 and lingbot["2"]["padded_heads"] == 2
    assert lingbot["4"]["padded_heads_max_abs"] == 0.0, "the padded (zero) heads wrote into the cache"
    assert lingbot["2"]["padded_tokens_per_frame"] == 6
    for n in ("1", "2", "4"):
        assert self_forcing[n]["padded_tokens_per_frame"] == self_forcing[n]["tokens_per_frame"] == 8
        assert self_forcing[n]["padded_heads"] == 4
    from tests.parallel_worker import LATENT_CHUNK, _cases

    for case in _cases().values():
        non_sink_frames = (NUM_CHUNKS - 1) * LATENT_CHUNK - case["sink"]  # written before the last denoise
        assert non_sink_frames > case["ring"], "the ring must wrap"


def test_head_sharded_cross_attention_kv(streamed):
    """ShardingRules(context_heads="sp") on 4 devices (4 heads): cross K/V split by heads, same numbers;
    with 2 heads a plan on 4 devices is refused naming the counts that work."""
    _, report = streamed
    info = report["cases"]["self_forcing"]["4_context_heads_sharded"]
    assert info["cross_kv_spec"] and all(spec[3] == "sp" for spec in info["cross_kv_spec"].values())
    assert all(spec[3] is None for spec in report["cases"]["self_forcing"]["4"]["cross_kv_spec"].values())
    errors = report["errors"]
    assert errors["context_heads_sharded_1"] is None and errors["context_heads_sharded_2"] is None
    error = errors["context_heads_sharded_4"]
    assert error is not None and error["type"] == "OptionError" and error["option"] == "num_devices"
    assert "divides the 2 heads" in error["message"] and "[1, 2]" in error["message"], error


# ---------------------------------------------------------------------------------------------------
# (a') what the compiled programs exchange: the chunk only, never the cache (one subprocess, 2 devices)
# ---------------------------------------------------------------------------------------------------

COLLECTIVE_OPS = re.compile(r"^(all-to-all|ragged-all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute|"
                            r"collective-broadcast)(-start)?$")
INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+) = (?P<shape>\([^=]*?\)|\S+) "
                         r"(?P<op>[a-z][\w\-]*)\((?P<operands>[^)]*)\)")


def _dims(shape: str) -> list[tuple[int, ...]]:
    """Every array shape in an HLO shape string ('f32[3,1,128]{2,1,0}' or a tuple of them)."""
    return [tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\b[a-z]\w*\[([\d,]*)\]", shape)]


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, shapes of its result and operands) of every collective instruction in an HLO module's text."""
    parsed = [m for m in map(INSTRUCTION.match, hlo.splitlines()) if m]
    shapes = {m["name"]: m["shape"] for m in parsed}
    return [(m["op"], _dims(m["shape"]) + [d for name in re.findall(r"%([\w.\-]+)", m["operands"])
                                           for d in _dims(shapes[name])])
            for m in parsed if COLLECTIVE_OPS.match(m["op"])]


@pytest.fixture(scope="module")
def compiled_programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("collectives")
    (result,) = run_together([([sys.executable, "tests/parallel_worker.py", "--collectives", str(out)],
                               device_env(2, fast_compile=True))], timeout_s=120)
    assert result.returncode == 0, result.describe()
    report = json.loads((out / "collectives.json").read_text())
    return {int(n): {**info, **{name: (out / f"{n}_{name}.hlo").read_text() for name in ("denoise", "commit")}}
            for n, info in report.items()}


@pytest.mark.parametrize("program", ["denoise", "commit"])
def test_the_ulysses_program_moves_the_chunk_never_the_cache(compiled_programs, program):
    """One device: no collective at all. Two devices: all_to_alls (and the output's all_gather) whose
    operands and results never have the KV cache's shape, global or per device, nor its per-layer slice."""
    one, two = compiled_programs[1], compiled_programs[2]
    assert collectives(one[program]) == [], "the one-device program exchanges data"
    assert not re.search(r"all-to-all|all-gather|all-reduce|collective-permute", one[program])
    assert two["cache_shard_shapes"] == [[*two["cache_shape"][:3], two["cache_shape"][3] // 2,
                                          two["cache_shape"][4]]], two  # split by heads
    cache_shapes = {tuple(two["cache_shape"]), *map(tuple, two["cache_shard_shapes"])}
    cache_shapes |= {shape[1:] for shape in cache_shapes}  # one layer's [B, T, heads, d] (inside the layer scan)
    found = collectives(two[program])
    assert "all-to-all" in {op for op, _ in found}, f"no exchange in the two-device {program}"
    moved = [(op, shapes) for op, shapes in found if cache_shapes & set(shapes)]
    assert not moved, f"collectives of the cache's shape {sorted(cache_shapes)}: {moved}"


def test_commit_takes_the_cache_by_donation(compiled_programs):
    for n, info in compiled_programs.items():
        assert info["cache_deleted"] == [True, True], f"{n} device(s): commit left its input cache alive"


def test_replicated_arrays_by_equivalence_and_only_those_read_as_one_replica(compiled_programs):
    """`whole` keeps an array whose sharding is P(None, None) (equivalent to P(), though not equal);
    `local_replica` refuses the head-sharded cache instead of returning one device's heads."""
    one, two = compiled_programs[1], compiled_programs[2]
    assert one["whole_keeps_replicated"] and two["whole_keeps_replicated"]
    assert one["local_replica_of_cache"] is None
    assert "expected a replicated array" in two["local_replica_of_cache"], two["local_replica_of_cache"]


# ---------------------------------------------------------------------------------------------------
# (b) `wm-jax run tiny --num_devices N`
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_runs(MESH_SIZES)


@pytest.mark.parametrize("num_devices", MESH_SIZES)
def test_wm_jax_run_tiny_gives_the_same_latents_on_any_device_count(tiny, num_devices):
    latents, stats = tiny_outputs(*tiny[num_devices])
    reference, _ = tiny_outputs(*tiny[1])
    assert latents.shape == (6, 8, 14, 16) and np.isfinite(latents).all()
    assert stats["num_devices"] == num_devices and stats["num_processes"] == 1
    assert stats["config"]["plan"]["num_devices"] == num_devices
    assert len(stats["chunks"]) == 2
    error = relative_l2(latents, reference)
    assert error <= TOLERANCE, f"{num_devices} devices vs 1: relative L2 {error:.2e}"
    if num_devices == 4:  # tiny has 2 heads: padded on 4 devices
        assert "4 devices do not divide the model's 2 heads" in tiny[num_devices][0].stderr


# ---------------------------------------------------------------------------------------------------
# (c) golden parity on 4 devices
# ---------------------------------------------------------------------------------------------------

GOLDEN_CASES = ("self_forcing_rollout", "lingbot_fast_rollout", "lingbot_v2_rollout", "causal_forcing_rollout")


@pytest.fixture(scope="module")
def parity_on_4_devices(golden_dir):
    results = run_together([(cli("parity", golden_dir / case), device_env(HOST_DEVICES)) for case in GOLDEN_CASES],
                           timeout_s=240)
    return dict(zip(GOLDEN_CASES, results))


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_rollout_passes_on_4_devices(parity_on_4_devices, case):
    result = parity_on_4_devices[case]
    assert result.returncode == 0, result.describe()
    assert "PASS" in result.stdout, result.describe()
    # every golden model has 2 heads: the plan's padding warning shows the run used the 4 devices
    assert "4 devices do not divide the model's 2 heads" in result.stderr, result.describe()


# ---------------------------------------------------------------------------------------------------
# (d) bad device counts
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_counts")
    counts = (HOST_DEVICES * 2, 0, -1)
    commands = [(cli("run", "tiny", "--num_devices", n, "--output_dir", out / f"devices{n}"), device_env(HOST_DEVICES))
                for n in counts]
    start = time.monotonic()
    results = run_together(commands, timeout_s=120)
    return dict(zip(counts, results)), out, time.monotonic() - start


def test_more_devices_than_present_is_refused_before_any_model_work(bad_counts):
    results, out, seconds = bad_counts
    result = results[HOST_DEVICES * 2]
    assert result.returncode == 1, result.describe()
    assert (f"error: --num_devices {HOST_DEVICES * 2} requested, but {HOST_DEVICES} cpu device(s) are present"
            in result.stderr), result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    assert not (out / f"devices{HOST_DEVICES * 2}").exists(), "the output folder was created before the check"
    assert seconds < 60, f"{seconds:.0f} s: the device count must be checked before any model work"


@pytest.mark.parametrize("count", [0, -1])
def test_a_device_count_below_one_is_refused(bad_counts, count):
    results, out, _ = bad_counts
    result = results[count]
    assert result.returncode == 1, result.describe()
    assert f"error: --num_devices {count}: expected at least 1" in result.stderr, result.describe()
    assert not (out / f"devices{count}").exists()


def test_mesh_errors_name_the_option(streamed):
    """make_mesh in the 4-device worker: 0 and 5 devices are MeshErrors (OptionErrors) for num_devices."""
    errors = streamed[1]["errors"]
    assert errors["make_mesh_0"]["option"] == "num_devices"
    assert "expected at least 1" in errors["make_mesh_0"]["message"]
    message = errors["make_mesh_5"]["message"]
    assert errors["make_mesh_5"]["option"] == "num_devices"
    assert "5 requested, but 4 cpu device(s) are present" in message and "[0, 1, 2, 3]" in message
