"""`wm-jax serve`: the protocol as a client speaks it (aiohttp's client against the real server on a local
port, the tiny recipe's world), the world's prompt / reset / save and restore, bad input."""

from __future__ import annotations

import asyncio
import io
import json
import time

import aiohttp
import jax
import numpy as np
import pytest

from wm_jax.serve import protocol as P
from wm_jax.serve.server import decode_image


async def _open(base: str, session: aiohttp.ClientSession):
    ws = await session.ws_connect(f"{base}/ws")
    return ws, await ws.receive_json(timeout=30)


async def _frames(ws, seconds: float, heartbeat=()) -> tuple[list[dict], int]:
    """(chunk announcements, binary frames) received within `seconds`, heartbeats sent meanwhile."""
    chunks, frames, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for client in (ws, *heartbeat):
            await client.send_json({"type": "heartbeat"})
        try:
            message = await ws.receive(timeout=max(0.05, min(1.0, end - time.monotonic())))
        except asyncio.TimeoutError:
            continue
        if message.type == aiohttp.WSMsgType.BINARY:
            frames += 1
        elif message.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(message.data)
            if data["type"] == "chunk":
                chunks.append(data)
        else:
            break
    return chunks, frames


def _yaw(pose) -> float:
    return float(np.degrees(np.arctan2(pose[0, 2], pose[2, 2])))


def test_healthz_once_ready(live_server):
    server, base = live_server

    async def check():
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as reply:
                return reply.status, await reply.json()

    status, body = asyncio.run(check())
    assert status == 200 and body["status"] == "ok" and body["slug"] == "tiny"


def test_a_session_streams_frames_and_keys_turn_the_camera(live_server):
    """The visitor gets the world, frames arrive at the recipe's size, D turns the poses the model receives
    to the right and the chunk that applied the key press names it; bad messages are ignored and counted."""
    server, base = live_server
    world = server.world

    async def session():
        async with aiohttp.ClientSession() as http:
            ws, hello = await _open(base, http)
            size = (world.plan.pixel_width, world.plan.pixel_height)
            assert hello["type"] == "hello" and (hello["width"], hello["height"]) == size and hello["camera"]
            ignored = server.ignored_messages
            for bad in ("not json", json.dumps({"type": "teleport"}), json.dumps([1, 2]),
                        json.dumps({"type": "action", "action": {"event": "keydown", "key": "x"}}),
                        json.dumps({"type": "look", "dx": "far", "dy": 0}), "x" * (P.MAX_MESSAGE_BYTES + 1)):
                await ws.send_str(bad)
            await ws.send_bytes(b"\x00\x01")
            still, _ = await _frames(ws, 3.0)
            await ws.send_json({"type": "action", "action": {"event": "keydown", "key": "d"}, "id": 41})
            turning, frames = await _frames(ws, 6.0)
            await ws.send_json({"type": "action", "action": {"event": "keyup", "key": "d"}, "id": 42})
            await ws.close()
            return still, turning, frames, server.ignored_messages - ignored

    still, turning, frames, ignored = asyncio.run(session())
    assert ignored == 7
    assert frames >= 12 and turning, "no frames arrived"
    applied = [c for c in turning if 41 in c["consumed"]]
    assert len(applied) == 1 and applied[0]["poses_moved"]
    # server side: the latent poses the model received yaw to the right once D was held
    yaws = np.degrees(np.unwrap(np.radians([_yaw(poses[-1]) for poses in world.pose_log])))
    assert yaws[-1] > yaws[0] + 5.0 and np.all(np.diff(yaws) >= -1e-9), yaws


def test_second_visitor_waits_and_gets_the_world_when_the_first_leaves(live_server):
    server, base = live_server

    async def visitors():
        async with aiohttp.ClientSession() as http:
            first, hello = await _open(base, http)
            second, busy = await _open(base, http)
            await _frames(first, 1.0, heartbeat=[second])
            await first.close()
            start = time.monotonic()
            while True:
                message = await second.receive_json(timeout=10)
                if message["type"] == "hello":
                    break
            waited = time.monotonic() - start
            await second.close()
            return hello, busy, waited

    hello, busy, waited = asyncio.run(visitors())
    assert hello["type"] == "hello" and busy == {"type": "busy", "queue_position": 1}
    assert waited < 5.0


def test_a_silent_client_is_dropped_and_frees_the_world(live_server):
    server, base = live_server

    async def silent():
        async with aiohttp.ClientSession() as http:
            ws, hello = await _open(base, http)
            start = time.monotonic()
            async for message in ws:  # never answers: the server closes after HEARTBEAT_TIMEOUT_S
                pass
            return hello, time.monotonic() - start, ws.close_code

    hello, lasted, code = asyncio.run(silent())
    assert hello["type"] == "hello" and lasted < 5.0 and code == 4000
    time.sleep(0.5)
    assert server.active is None and any("no message for" in line for line in server.events)


def test_too_many_visitors_are_refused(live_server, monkeypatch):
    server, base = live_server
    monkeypatch.setattr(P, "MAX_CONNECTIONS", 2)

    async def crowd():
        async with aiohttp.ClientSession() as http:
            first, _ = await _open(base, http)
            second, _ = await _open(base, http)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{base}/ws")
            await first.close()
            await second.close()
            return refused.value.status

    assert asyncio.run(crowd()) == 503


def test_prompt_and_image_upload(live_server):
    """A long prompt is cut with a notice; a non-image upload is refused with a message; an image of the
    wrong size restarts the world from it, resized."""
    from PIL import Image

    server, base = live_server
    picture = io.BytesIO()
    Image.fromarray(np.full((30, 50, 3), (200, 30, 30), np.uint8)).save(picture, format="PNG")

    async def visit():
        async with aiohttp.ClientSession() as http:
            ws, hello = await _open(base, http)
            await ws.send_json({"type": "prompt", "text": "road " * 600})
            notices = []
            while not notices:
                message = await ws.receive(timeout=20)
                if message.type == aiohttp.WSMsgType.TEXT and json.loads(message.data)["type"] == "notice":
                    notices.append(json.loads(message.data)["text"])
            url = f"{base}/api/image?session={hello['session']}"
            async with http.post(url, data=b"definitely not a picture") as reply:
                refused = reply.status, await reply.json()
            async with http.post(url, data=picture.getvalue()) as reply:
                accepted = reply.status
            async with http.post(f"{base}/api/image?session=wrong", data=picture.getvalue()) as reply:
                stranger = reply.status
            await ws.close()
            return notices, refused, accepted, stranger

    notices, refused, accepted, stranger = asyncio.run(visit())
    assert "cut to 2000 characters" in notices[0]
    assert refused[0] == 400 and "not an image" in refused[1]["error"]
    assert accepted == 200 and stranger == 403
    height, width = server.world.plan.pixel_height, server.world.plan.pixel_width
    assert server.world.image.shape == (height, width, 3)
    assert tuple(server.world.image[height // 2, width // 2]) == (200, 30, 30)


def test_decode_image_refuses_oversized_uploads():
    with pytest.raises(ValueError, match="at most"):
        decode_image(b"\x00" * (P.MAX_IMAGE_BYTES + 1), 64, 96)


def test_reset_recompiles_nothing_and_a_saved_world_continues_exactly(live_server, tmp_path):
    """Run after the server tests (no visitor holds the world): two chunks, save, a third chunk; restoring
    the save and generating again gives the same third chunk, bit for bit, and nothing recompiles."""
    server, _ = live_server
    world = server.world
    assert server.active is None
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    world.reset()
    world.controls.key_down("w")
    world.next_chunk()
    world.next_chunk()
    world.save(tmp_path / "world")
    expected, info = world.next_chunk()
    world.reset()  # a different world in between
    world.next_chunk()
    world.restore(tmp_path / "world")
    world.controls.key_down("w")
    again, again_info = world.next_chunk()
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_array_equal(again_info.latent_poses, info.latent_poses)
    assert info.chunk_index == again_info.chunk_index == 2
    assert compiles == [], f"{len(compiles)} compilations"
    world.controls.release_all()
