"""Golden cases through `wm-jax parity`, exactly as a user runs it (1e-5 relative L2 per array)."""

import os
import subprocess
import sys

import numpy as np

from wm_jax.parity import DEFAULT_TOLERANCE, compare, run_case


def test_lingbot_cam_forward_cli(golden_dir, tmp_path):
    case = golden_dir / "lingbot_cam_forward"
    out = tmp_path / "ours.npz"
    proc = subprocess.run([sys.executable, "-m", "wm_jax.cli", "parity", str(case), "--out", str(out)],
                          capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    with np.load(out) as ours, np.load(case / "outputs.npz") as golden:
        assert set(ours.files) == set(golden.files)
        errors = compare({k: ours[k] for k in ours.files}, {k: golden[k] for k in golden.files})
    assert max(errors.values()) <= DEFAULT_TOLERANCE, errors


def test_parity_fails_loudly_on_a_wrong_model(golden_dir, tmp_path, monkeypatch):
    """The harness must be able to fail: perturb one weight and the comparison exceeds tolerance."""
    from converters import wan_dit
    import wm_jax.parity.lingbot_cam_forward as runner

    original = wan_dit.load_source

    def perturbed(source, **kw):
        model = original(source, **kw)
        model.blocks.self_attn.q.kernel[...] = model.blocks.self_attn.q.kernel[...] * 1.01
        return model

    monkeypatch.setattr(runner.wan_dit, "load_source", perturbed)
    case = golden_dir / "lingbot_cam_forward"
    outputs = run_case(case)
    with np.load(case / "outputs.npz") as golden:
        errors = compare(outputs, {k: golden[k] for k in golden.files})
    assert errors["flow_t0"] > DEFAULT_TOLERANCE
    assert errors["cam_plucker"] <= DEFAULT_TOLERANCE


import pytest  # noqa: E402


@pytest.mark.parametrize("case", ["self_forcing_rollout", "lingbot_fast_rollout", "taehv_decode",
                                  "causal_forcing_rollout", "lingbot_v2_rollout"])
def test_golden_case_within_tolerance(golden_dir, case):
    """Rollouts replay upstream's recorded noise through the streaming step (global and sink+window;
    Causal-Forcing: frame-wise, a first-block step list, an I2V first latent, a rolling window)."""
    if not (golden_dir / case).is_dir():
        pytest.skip(f"golden case {case} not found in {golden_dir}")
    outputs = run_case(golden_dir / case)
    with np.load(golden_dir / case / "outputs.npz") as golden:
        errors = compare(outputs, {k: golden[k] for k in golden.files})
    assert max(errors.values()) <= DEFAULT_TOLERANCE, errors


def test_lingbot_v2_cache_and_schedule_match_upstream(golden_dir):
    """LingBot v2's sink (6) is not a whole number of chunks (4): the cache layout converted from the case's
    upstream settings attends exactly the latent frames read back from upstream's cache for every chunk, and
    the schedule's σ for x0 / re-noising are the ones upstream used (duplicated integer t)."""
    import json

    from wm_jax.streaming.kv_cache import CacheLayout, upstream_cache_frames
    from wm_jax.streaming.schedules import lingbot_fast_schedule

    case = golden_dir / "lingbot_v2_rollout"
    if not case.is_dir():
        pytest.skip(f"golden case lingbot_v2_rollout not found in {golden_dir}")
    config = json.loads((case / "config.json").read_text())
    shapes, chunk = config["shapes"], config["generate_call"]["chunk_size"]
    lat_f = shapes["lat_f"]
    for name, run in config["runs"].items():
        sink, ring = upstream_cache_frames(run["local_attn_size"], run["sink_size"], chunk)
        layout = CacheLayout(tokens_per_frame=shapes["frame_seqlen_tokens"], sink_frames=lat_f if sink is None
                             else sink, ring_frames=ring, chunk_frames=chunk)
        visible = layout.visible_frames(lat_f)
        for c, frames in enumerate(run["attended_latent_frames_per_chunk"].values()):
            assert np.nonzero(visible[c * chunk])[0].tolist() == frames, (name, c)
    sched = config["schedule"]
    schedule = lingbot_fast_schedule(shift=sched["shift"], indices=tuple(sched["timesteps_index"]),
                                     num_train_timesteps=sched["num_train_timesteps"])
    assert schedule.t.tolist() == sched["timesteps"]
    np.testing.assert_array_equal(schedule.flow_scale, np.float32(sched["sigma_for_x0"]))
    np.testing.assert_array_equal(schedule.noise_scale[:-1], np.float32(sched["sigma_for_renoise_to_next_t"]))
