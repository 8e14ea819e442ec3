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
                                  "causal_forcing_rollout"])
def test_golden_case_within_tolerance(golden_dir, case):
    """Rollouts replay upstream's recorded noise through the streaming step (global and sink+window;
    Causal-Forcing: frame-wise, a first-block step list, an I2V first latent, a rolling window)."""
    if not (golden_dir / case).is_dir():
        pytest.skip(f"golden case {case} not found in {golden_dir}")
    outputs = run_case(golden_dir / case)
    with np.load(golden_dir / case / "outputs.npz") as golden:
        errors = compare(outputs, {k: golden[k] for k in golden.files})
    assert max(errors.values()) <= DEFAULT_TOLERANCE, errors
