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


@pytest.fixture(scope="session")
def live_world():
    """The `tiny` recipe as `wm-jax serve` builds it (endless sink + window rollout, warm), built once."""
    from wm_jax.serve.launch import build_world
    from wm_jax.streaming.run import RunOptions

    world, _ = build_world(RunOptions(slug="tiny", num_devices=1), log=lambda line: None)
    return world


@pytest.fixture(scope="session")
def live_server(live_world):
    """(WorldServer, base URL) serving `live_world` on a free local port from a background thread; the
    world is reset whenever a visitor takes it."""
    import asyncio
    import threading

    from wm_jax.serve.launch import serve_forever
    from wm_jax.serve.server import WorldServer

    server = WorldServer(live_world, log=lambda line: server.events.append(line))
    server.events = []
    loop = asyncio.new_event_loop()
    started, stop = threading.Event(), None

    def serve():
        nonlocal stop
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        loop.run_until_complete(serve_forever(server, "127.0.0.1", 0, server.events.append, ready=started.set,
                                              stop=stop))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(60), "the server did not start"
    yield server, f"http://127.0.0.1:{server.port}"
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


MEASUREMENTS: list[str] = []


@pytest.fixture
def record_measurement():
    """Adds a line to the "measurements" section printed at the end of the test run."""
    return MEASUREMENTS.append


def pytest_terminal_summary(terminalreporter):
    if MEASUREMENTS:
        terminalreporter.section("measurements")
        for line in MEASUREMENTS:
            terminalreporter.write_line(line)
