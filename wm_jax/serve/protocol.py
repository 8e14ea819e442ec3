"""The live protocol between `wm-jax serve` and its page: one TCP port (HTTP + one WebSocket), so a
single `ssh -L PORT:localhost:PORT` tunnel carries everything.

HTTP
    GET  /              the page
    GET  /healthz       {"status": "ok", "slug", "busy", "queued"} once the world is compiled and warm
    POST /api/image?session=TOKEN   body: an image file (≤ MAX_IMAGE_BYTES); I2V recipes restart the
                        world from it (resized to the video size as upstream does); a non-image is refused
    WS   /ws            the session

Client -> server, JSON text messages (≤ MAX_MESSAGE_BYTES; anything malformed, unknown or oversized is
ignored and counted, never fatal):
    {"type": "action", "action": {"event": "keydown" | "keyup", "key": K}, "id": N}
        K: a KeyboardEvent.key (w a s d q e i j k l, arrows); N: the client's id for latency reports
    {"type": "look", "dx": DEG, "dy": DEG, "id": N}     mouse drag: yaw right / pitch up, in degrees
    {"type": "prompt", "text": S}                      new prompt from the next chunk on
    {"type": "reset"} | {"type": "pause"} | {"type": "resume"} | {"type": "disconnect"}
    {"type": "heartbeat"}                              every HEARTBEAT_INTERVAL_S; silence for
                                                       HEARTBEAT_TIMEOUT_S drops the client

Server -> client:
    {"type": "busy", "queue_position": N}              the world is in use; N visitors ahead (≥ 1)
    {"type": "hello", "session": TOKEN, "slug", "task", "fps", "width", "height", "prompt",
     "text_max_tokens", "keys": {...}}                 the world is yours (sent again after a reset)
    {"type": "chunk", "chunk_index", "num_frames", "fps", "gen_ms", "queue_depth", "consumed": [N...],
     "poses_moved": bool}                              announces the next num_frames binary messages
    binary messages: one JPEG frame each, sent at the recipe's fps (a slow client loses frames, the
                     queue never grows past one chunk)
    {"type": "notice", "text": S}                      e.g. a prompt was truncated
    {"type": "error", "text": S}                       e.g. a refused upload
    {"type": "stats", "ignored_messages": N, ...}      with every chunk
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 15 * 1024 * 1024  # FlashDreams' upload limit
MAX_PROMPT_CHARS = 2000  # FlashDreams' prompt limit; the text encoder's token limit applies after it
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 4.0  # a closed tab or a silent client frees the world within 5 s
MAX_CONNECTIONS = 8  # the visitor with the world + the queue; more are refused (HTTP 503)
JPEG_QUALITY = 85
CLIENT_MESSAGES = ("action", "look", "prompt", "reset", "pause", "resume", "disconnect", "heartbeat")
