"""The live server: one `LiveWorld`, one visitor at a time, over one port (aiohttp: HTTP + WebSocket).

aiohttp is a well-kept asyncio HTTP + WebSocket server and client in one package: the page, the health
check, the image upload and the video all share the port, so `ssh -L` carries a session, and the same
library drives the protocol tests. Video goes as one JPEG per frame over the WebSocket (every
browser decodes JPEG; Debian's Chromium has no H.264 decoder to rely on).

Scheduling (see `wm_jax.serve.protocol` for the messages):

    producer:  take the controls -> generate a chunk (device work, in the one worker thread) -> JPEGs
               -> hand over; the hand-over holds one chunk, so generation runs at most one chunk
               ahead of playback (a virtual clock of num_frames / fps per chunk)
    player:    announce the chunk, send its frames at the recipe's fps; a frame more than one frame
               period late is dropped (a slow client loses frames, nothing queues up)
    watchdog:  a visitor silent for HEARTBEAT_TIMEOUT_S is dropped; the world goes to the next in line

A visitor who arrives while the world is in use waits in line with its position shown; every JAX call
(generation, prompt changes, resets) runs in one worker thread, so they never overlap.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from aiohttp import WSMsgType, web

from wm_jax.serve import protocol as P
from wm_jax.serve.world import LiveWorld

STATIC = Path(__file__).parent / "static"


@dataclass(eq=False)
class Visitor:
    ws: web.WebSocketResponse
    number: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    last_seen: float = field(default_factory=time.monotonic)


class WorldServer:
    """Serves `world` (already compiled and warm) to one visitor at a time.

    log: one line per session event (the CLI prints them). state_dir: where the world is saved when a
    visitor leaves and when the server stops (None: not kept); resumed: the world was restored from
    there, and the first visitor continues it instead of starting a new one.
    """

    def __init__(self, world: LiveWorld, *, log: Callable[[str], None] = print, state_dir: str | Path | None = None,
                 resumed: bool = False):
        self.world = world
        self._keep_world = resumed  # the first visitor continues a world restored from state_dir
        self.log = log
        self.state_dir = Path(state_dir) if state_dir else None
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="world")
        self.visitors: list[Visitor] = []  # in arrival order; the active one holds the world
        self.active: Visitor | None = None
        self.ready = False
        self.running = asyncio.Event()
        self.ignored_messages = 0
        self.dropped_frames = 0
        self.chunks_sent = 0
        self._arrivals = 0
        self._session: asyncio.Task | None = None

    # -- app ---------------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=P.MAX_IMAGE_BYTES + 1024)
        app.add_routes([web.get("/", self.page), web.get("/healthz", self.healthz), web.get("/ws", self.websocket),
                        web.post("/api/image", self.upload_image)])
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_startup(self, app) -> None:
        self.running.set()
        self.ready = True

    async def _on_shutdown(self, app) -> None:
        for visitor in list(self.visitors):
            await visitor.ws.close(code=1001, message=b"server stopping")
        if self._session is not None:
            self._session.cancel()
        await self._save("server stopping")

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html")

    async def healthz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok", "slug": self.world.recipe.slug, "busy": self.active is not None,
                                  "queued": max(0, len(self.visitors) - (self.active is not None))})

    # -- image upload (I2V recipes) ------------------------------------------------------------------

    async def upload_image(self, request: web.Request) -> web.Response:
        visitor = self.active
        if visitor is None or request.query.get("session") != visitor.token:
            return web.json_response({"error": "no session: only the visitor holding the world can upload"},
                                     status=403)
        if self.world.image is None:
            return web.json_response({"error": f"recipe {self.world.recipe.slug} takes no image"}, status=400)
        body = await request.read()
        try:
            image = decode_image(body, self.world.plan.pixel_height, self.world.plan.pixel_width)
        except ValueError as err:
            await self._send(visitor, {"type": "error", "text": str(err)})
            return web.json_response({"error": str(err)}, status=400)
        await self._run(lambda: self.world.reset(image=image))
        self.log(f"visitor {visitor.number}: new image {image.shape[1]}x{image.shape[0]}, world restarted")
        await self._send(visitor, self._hello(visitor))
        return web.json_response({"ok": True})

    # -- websocket -------------------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if len(self.visitors) >= P.MAX_CONNECTIONS:
            self.log(f"refused a connection: {len(self.visitors)} visitors already")
            raise web.HTTPServiceUnavailable(text=f"too many visitors ({P.MAX_CONNECTIONS}); try again later")
        ws = web.WebSocketResponse(max_msg_size=4 * P.MAX_IMAGE_BYTES)
        await ws.prepare(request)
        self._arrivals += 1
        visitor = Visitor(ws, self._arrivals)
        self.visitors.append(visitor)
        watchdog = asyncio.create_task(self._watch(visitor))
        try:
            await self._assign()
            if visitor is not self.active:
                self.log(f"visitor {visitor.number} waits: position {self.visitors.index(visitor)}")
            async for message in ws:
                await self._receive(visitor, message)
        finally:
            watchdog.cancel()
            await self._leave(visitor)
        return ws

    async def _watch(self, visitor: Visitor) -> None:
        while not visitor.ws.closed:
            await asyncio.sleep(P.HEARTBEAT_INTERVAL_S / 2)
            if time.monotonic() - visitor.last_seen > P.HEARTBEAT_TIMEOUT_S:
                self.log(f"visitor {visitor.number} dropped: no message for {P.HEARTBEAT_TIMEOUT_S:.0f} s")
                await visitor.ws.close(code=4000, message=b"heartbeat timeout")
                return

    async def _leave(self, visitor: Visitor) -> None:
        if visitor in self.visitors:
            self.visitors.remove(visitor)
        if visitor is self.active:
            self.active = None
            if self._session is not None:
                self._session.cancel()
                try:
                    await self._session
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the session ends with its visitor
                    pass
                self._session = None
            self.world.controls.release_all()
            self.log(f"visitor {visitor.number} left; the world is free")
            await self._save(f"visitor {visitor.number} left")
            await self._assign()  # (tells the others their new place)
        else:
            self.log(f"visitor {visitor.number} left the line")
            await self._tell_positions()

    async def _assign(self) -> None:
        """Gives the world to the first visitor in line when it is free; tells the others their place."""
        if self.active is None and self.visitors:
            visitor = self.visitors[0]
            self.active = visitor
            if self._keep_world:
                self._keep_world = False
            elif self.world.rollout.state.chunk_index > 0:
                await self._run(self.world.reset)
            self.running.set()
            self.log(f"visitor {visitor.number} has the world")
            await self._send(visitor, self._hello(visitor))
            self._session = asyncio.create_task(self._stream(visitor))
        await self._tell_positions()

    async def _tell_positions(self) -> None:
        for position, visitor in enumerate(self.visitors):
            if visitor is not self.active:
                await self._send(visitor, {"type": "busy", "queue_position": position})

    def _hello(self, visitor: Visitor) -> dict:
        world, plan = self.world, self.world.plan
        return {"type": "hello", "session": visitor.token, "slug": world.recipe.slug, "task": world.recipe.task,
                "fps": world.recipe.fps, "width": plan.pixel_width, "height": plan.pixel_height,
                "prompt": world.prompt, "text_max_tokens": world.text_len, "image": world.image is not None,
                "camera": world.camera_driven}

    # -- control messages ------------------------------------------------------------------------------

    async def _receive(self, visitor: Visitor, message) -> None:
        data = self._parse(message)
        if data is None:
            self.ignored_messages += 1
            return
        visitor.last_seen = time.monotonic()
        kind = data["type"]
        if kind == "heartbeat":
            return
        if kind == "disconnect":
            await visitor.ws.close()
            return
        if visitor is not self.active:  # waiting visitors only keep their place
            self.ignored_messages += 1
            return
        world = self.world
        if kind == "action":
            action = data.get("action")
            event = action.get("event") if isinstance(action, dict) else None
            key = action.get("key") if isinstance(action, dict) else None
            press = {"keydown": world.controls.key_down, "keyup": world.controls.key_up}.get(event)
            if press is None or not isinstance(key, str) or not press(key):
                self.ignored_messages += 1
                return
            self._note_action(data)
        elif kind == "look":
            dx, dy = data.get("dx"), data.get("dy")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and abs(v) <= 180 for v in (dx, dy)):
                self.ignored_messages += 1
                return
            world.controls.look(dx, dy)
            self._note_action(data)
        elif kind == "prompt":
            text = data.get("text")
            if not isinstance(text, str) or not text.strip():
                self.ignored_messages += 1
                return
            notice = await self._run(lambda: world.set_prompt(text))
            self.log(f"visitor {visitor.number}: new prompt ({len(text)} characters)")
            if notice:
                await self._send(visitor, {"type": "notice", "text": notice})
        elif kind == "reset":
            await self._run(world.reset)
            self.log(f"visitor {visitor.number}: reset")
            await self._send(visitor, self._hello(visitor))
        elif kind == "pause":
            self.running.clear()
        elif kind == "resume":
            self.running.set()

    def _note_action(self, data: dict) -> None:
        if isinstance(data.get("id"), int):
            self.world.pending_actions.append(data["id"])

    @staticmethod
    def _parse(message) -> dict | None:
        """The message as a dict with a known "type", or None (malformed, unknown, binary or oversized)."""
        if message.type != WSMsgType.TEXT or len(message.data) > P.MAX_MESSAGE_BYTES:
            return None
        try:
            data = json.loads(message.data)
        except (ValueError, TypeError):
            return None
        return data if isinstance(data, dict) and data.get("type") in P.CLIENT_MESSAGES else None

    # -- streaming ---------------------------------------------------------------------------------------

    async def _stream(self, visitor: Visitor) -> None:
        handover: asyncio.Queue = asyncio.Queue(maxsize=1)
        producer = asyncio.create_task(self._produce(handover))
        try:
            await self._play(visitor, handover)
        finally:
            producer.cancel()

    async def _produce(self, handover: asyncio.Queue) -> None:
        quality = P.JPEG_QUALITY
        while True:
            await self.running.wait()
            poses, consumed = self.world.take_controls()

            def work():
                frames, info = self.world.generate(poses, consumed)
                return [encode_jpeg(frame, quality) for frame in frames], info

            jpegs, info = await self._run(work)
            await handover.put((jpegs, info))

    async def _play(self, visitor: Visitor, handover: asyncio.Queue) -> None:
        fps = self.world.recipe.fps
        clock = time.monotonic()
        while not visitor.ws.closed:
            jpegs, info = await handover.get()
            await self._send(visitor, {"type": "chunk", "chunk_index": info.chunk_index, "num_frames": len(jpegs),
                                       "fps": fps, "gen_ms": round(info.gen_ms, 1), "queue_depth": handover.qsize(),
                                       "consumed": info.consumed, "poses_moved": info.moved})
            clock = max(clock, time.monotonic())
            for i, jpeg in enumerate(jpegs):
                due = clock + i / fps
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if time.monotonic() - due > 1.0 / fps or visitor.ws.closed:
                    self.dropped_frames += 1
                    continue
                await visitor.ws.send_bytes(jpeg)
            clock += len(jpegs) / fps
            self.chunks_sent += 1
            await self._send(visitor, {"type": "stats", "ignored_messages": self.ignored_messages,
                                       "dropped_frames": self.dropped_frames, "chunks": self.chunks_sent})

    # -- helpers -------------------------------------------------------------------------------------------

    async def _run(self, fn):
        """Runs JAX work in the one worker thread (never two at once, never on the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn)

    async def _send(self, visitor: Visitor, data: dict) -> None:
        if not visitor.ws.closed:
            try:
                await visitor.ws.send_str(json.dumps(data))
            except ConnectionError:
                pass

    async def _save(self, why: str) -> None:
        if self.state_dir is None or self.world.rollout.state.chunk_index == 0:
            return
        await self._run(lambda: self.world.save(self.state_dir / "world"))
        self.log(f"saved the world ({why}) to {self.state_dir / 'world'}")


def encode_jpeg(frame: np.ndarray, quality: int = P.JPEG_QUALITY) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def decode_image(data: bytes, height: int, width: int) -> np.ndarray:
    """An uploaded image file -> uint8 [height, width, 3], resized (bicubic, no crop) as upstream does.

    Raises ValueError for data that is not an image or is larger than MAX_IMAGE_BYTES.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > P.MAX_IMAGE_BYTES:
        raise ValueError(f"the image is {len(data)} bytes; at most {P.MAX_IMAGE_BYTES} are accepted")
    try:
        with Image.open(io.BytesIO(data)) as img:
            image = img.convert("RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BICUBIC)
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"the upload is not an image ({type(err).__name__})") from None
