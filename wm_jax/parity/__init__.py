"""Parity harness: run OUR implementation on a golden case folder and compare with upstream's outputs.

A case folder holds `weights.safetensors` (upstream key layout), `config.json`, `inputs.npz` and, where
the reference is known, `outputs.npz`. The case name is `config.json["case"]`; its runner is the module
`wm_jax.parity.<case>` with a function

    run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]

that computes every output array from those files alone (shapes and settings read from them, never
hard-coded), under the same names and shapes as `outputs.npz`, in float32.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

# 1e-5 relative L2 per array: 25x above upstream's own float32 reordering floor (../shared/golden/README.md).
DEFAULT_TOLERANCE = 1e-5


class ParityError(ValueError):
    pass


def load_case(case_dir: str | Path) -> tuple[Path, dict, dict[str, np.ndarray]]:
    case_dir = Path(case_dir)
    for name in ("config.json", "inputs.npz", "weights.safetensors"):
        if not (case_dir / name).is_file():
            raise ParityError(f"{case_dir}: not a golden case folder (missing {name})")
    config = json.loads((case_dir / "config.json").read_text())
    with np.load(case_dir / "inputs.npz") as npz:
        inputs = {k: npz[k] for k in npz.files}
    return case_dir, config, inputs


def run_case(case_dir: str | Path) -> dict[str, np.ndarray]:
    case_dir, config, inputs = load_case(case_dir)
    case = config.get("case")
    try:
        runner = importlib.import_module(f"wm_jax.parity.{case}")
    except ModuleNotFoundError:
        raise ParityError(f"{case_dir}: no parity runner for case {case!r}") from None
    outputs = runner.run(case_dir, config, inputs)
    return {k: np.asarray(v, dtype=np.float32) for k, v in outputs.items()}


def relative_l2(ours: np.ndarray, golden: np.ndarray) -> float:
    ours = ours.astype(np.float64)
    golden = golden.astype(np.float64)
    denom = np.linalg.norm(golden)
    err = np.linalg.norm(ours - golden)
    return float(err / denom) if denom > 0 else float(err)


def compare(outputs: dict[str, np.ndarray], golden: dict[str, np.ndarray]) -> dict[str, float]:
    """Relative L2 per golden array; raises ParityError on a missing array or a shape mismatch."""
    errors = {}
    for name, ref in golden.items():
        if name not in outputs:
            raise ParityError(f"our run produced no array {name!r} (it produced {sorted(outputs)})")
        if outputs[name].shape != ref.shape:
            raise ParityError(f"{name}: our shape {outputs[name].shape}, golden {ref.shape}")
        errors[name] = relative_l2(outputs[name], ref)
    return errors
