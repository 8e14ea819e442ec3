"""Test setup: CPU JAX, float32 matmuls at full precision, paths to the shared golden data."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT.parent / "shared" / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (../shared/golden relative to the repo root)")
    return GOLDEN_DIR


def plan_of(recipe, num_devices: int = 1):
    """The rollout plan of a recipe on the first `num_devices` devices."""
    from wm_jax.parallel.mesh import make_mesh
    from wm_jax.streaming.components import model_config
    from wm_jax.streaming.plan import RolloutPlan

    return RolloutPlan.for_recipe(recipe, model_config(recipe), make_mesh(num_devices))


@pytest.fixture(scope="session")
def tiny_parts():
    """The `tiny` recipe and its random-weight components (seed 0), built once on one device."""
    from wm_jax.streaming.components import build_random
    from wm_jax.streaming.recipes import load_recipe

    recipe = load_recipe("tiny")
    return recipe, build_random(recipe, plan_of(recipe), seed=0)
