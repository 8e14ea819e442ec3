"""What the benchmark asks of a peer (`PeerJob`) and what the peer answers (`PeerResult`): plain JSON both ways.

Both sides import only the standard library here: the parent (JAX) writes the job, the child (torch, the
upstream checkout) reads it and writes the result, one record at a time, so a peer that dies mid-run still
leaves every chunk it finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class PeerJob:
    """The shapes and settings a peer must reproduce (all read from our recipe and its rollout plan).

    model: the Wan DiT config as `wm_jax.models.config.WanConfig.to_dict()` (dim, ffn_dim, num_heads,
      num_layers, in_dim, out_dim, text_dim, freq_dim, text_len, camera_channels, ...), the sizes the
      peer's random weights must have.
    Geometry: latents are [latent_channels, frames, latent_height, latent_width] per sample (channel-first,
      like upstream); a chunk is `chunk_frames` latent frames of `tokens_per_frame` tokens.
    Rollout: `total_blocks` chunks; each chunk runs `len(timesteps)` denoise passes, then one commit pass
      (the t = context_timestep pass that writes the clean chunk into the cache), after `warmup_rollouts`
      untimed whole rollouts (first-use costs of eager runtimes: cuDNN plans per key length, allocator growth).
    Cache, in latent frames (`wm_jax.streaming.kv_cache.CacheLayout`'s terms): `sink_frames` first frames kept
      for good plus a ring of the `ring_frames` most recent committed frames, the current chunk not counted;
      ring_frames None = global cache (every frame kept). `upstream_cache()` gives upstream's settings.
    Forward peers (diffusers-wan): `forward_frames` latent frames in one bidirectional forward, timed
      `forward_iters` times after `forward_warmup` untimed calls, eager and (with `compile`) torch.compile'd.
    """

    peer: str
    upstream_dir: str | None
    model: dict[str, Any]
    pixel_height: int
    pixel_width: int
    latent_height: int
    latent_width: int
    latent_channels: int
    chunk_frames: int
    tokens_per_frame: int
    total_blocks: int
    timesteps: list[float]
    context_timestep: float
    shift: float
    sink_frames: int
    ring_frames: int | None
    text_tokens: int
    dtype: str = "bfloat16"
    seed: int = 0
    device: str = "cuda"
    forward_frames: int = 21
    forward_warmup: int = 2
    forward_iters: int = 5
    compile: bool = True
    warmup_rollouts: int = 1

    def upstream_cache(self) -> tuple[int, int]:
        """(local_attn_size, sink_size) as the upstream loops take them: a buffer of local_attn_size frames
        holding the sink, the ring and the chunk being denoised; (-1, 0) for the global cache (the inverse of
        `wm_jax.streaming.kv_cache.upstream_cache_frames`)."""
        if self.ring_frames is None:
            return -1, 0
        return self.sink_frames + self.ring_frames + self.chunk_frames, self.sink_frames

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "PeerJob":
        return cls(**json.loads(text))


class ResultWriter:
    """The child's side of the result file: every record is written through (temp file, then rename), so the
    file always holds a complete JSON document with everything finished so far.

    Fields: `peer`, `device_name`, `torch`, `notes` (what the adapter changed in upstream's setup, one line
    each), `config` (what the peer actually built), `chunks` (rollout peers: one per AR step, with
    `autoregressive_index`, `denoise_ms`, `commit_ms`, `pass_ms` = every model call of the step in order),
    `forward` (forward peers: variant -> {"ms": [...], "compile_s": ...}), `peak_memory_gib`, `error`
    (None, or the last line of the exception that stopped the peer).
    """

    def __init__(self, path: str | os.PathLike, peer: str):
        self.path = Path(path)
        self.data: dict[str, Any] = {"peer": peer, "device_name": None, "torch": None, "notes": [], "config": {},
                                     "chunks": [], "forward": {}, "peak_memory_gib": None, "error": None}
        self.flush()

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.flush()

    def note(self, line: str) -> None:
        self.data["notes"].append(line)
        self.flush()

    def chunk(self, index: int, denoise_ms: float, commit_ms: float, pass_ms: list[float]) -> None:
        self.data["chunks"].append({"autoregressive_index": index, "denoise_ms": denoise_ms, "commit_ms": commit_ms,
                                    "pass_ms": pass_ms})
        self.flush()

    def forward(self, variant: str, ms: float, compile_s: float | None = None) -> None:
        entry = self.data["forward"].setdefault(variant, {"ms": [], "compile_s": None})
        entry["ms"].append(ms)
        if compile_s is not None:
            entry["compile_s"] = compile_s
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.partial")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)
