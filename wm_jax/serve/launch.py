"""`wm-jax serve <slug>`: load, compile and warm up a world, then open the port.

Order: the recipe and its plan are resolved exactly as `wm-jax run` does (same options, same errors),
with a bounded sink + window cache and an endless rollout; the components are built; the world is
started and two chunks are generated and thrown away (they compile the first-chunk and steady
programs), or a saved world is restored from `state_dir`; only then does the port open and the URL
appear. Every session event is one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path

from wm_jax.models.embeddings import ROPE_POSITION_LIMIT
from wm_jax.serve.server import WorldServer
from wm_jax.serve.world import LiveWorld, serving_recipe
from wm_jax.streaming.run import RunOptions, compute_dtype_of, load_parts, resolve_with_scene

WARMUP_CHUNKS = 2


def build_world(options: RunOptions, log: Callable[[str], None] = print, state_dir: str | None = None
                ) -> tuple[LiveWorld, bool]:
    """(the warm world, whether it was restored from `state_dir`)."""
    notes = []

    def adapt(recipe):
        recipe, note = serving_recipe(recipe)
        if note:
            notes.append(note)
        return recipe.replace(total_blocks=ROPE_POSITION_LIMIT // recipe.chunk_frames)  # endless

    recipe, plan, _, (image, _, intrinsics, prompt) = resolve_with_scene(options, adapt)
    for note in dict.fromkeys(notes):  # adapt runs again when the image sets the video size
        log(note)
    start = time.perf_counter()
    log(f"loading {recipe.slug} ({plan.pixel_height}x{plan.pixel_width}, {plan.num_devices} device(s))")
    recipe, parts = load_parts(recipe, plan, options, compute_dtype_of(options.compute_dtype))
    world = LiveWorld(recipe, plan, parts, prompt=prompt, image=image,
                      intrinsics=intrinsics if recipe.task == "i2v_camera" else None, seed=recipe.seed)
    world.reset()
    for _ in range(WARMUP_CHUNKS):
        world.next_chunk()
    saved = Path(state_dir) / "world" if state_dir else None
    resumed = saved is not None and (saved / "world.json").is_file()
    if resumed:
        world.restore(saved)
        log(f"restored the world saved in {saved} (chunk {world.rollout.state.chunk_index})")
    else:
        world.reset()
    log(f"compiled and warm in {time.perf_counter() - start:.1f} s (compile {world.rollout.compile_seconds:.1f} s)")
    return world, resumed


async def serve_forever(server: WorldServer, host: str, port: int, log: Callable[[str], None],
                        ready: Callable[[], None] | None = None, stop: asyncio.Event | None = None) -> None:
    """Opens the port, reports the URL, and serves until `stop` is set or SIGINT / SIGTERM arrives."""
    from aiohttp import web

    runner = web.AppRunner(server.app(), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    bound = runner.addresses[0][1]
    log(f"serving {server.world.recipe.slug} at http://{host}:{bound}/  (remote GPU: ssh -L {bound}:localhost:{bound} "
        f"HOST, then open http://localhost:{bound}/)")
    server.port = bound
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        log("stopping")
        await runner.cleanup()
