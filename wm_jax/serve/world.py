"""A live world: the streaming engine driven chunk by chunk by a visitor's controls, for as long as they stay.

`LiveWorld` owns one `WorldRollout` (compiled once) and a `PoseIntegrator`. Each `next_chunk()` turns
the held keys into one pose per output frame, feeds the chunk's latent poses to the camera
conditioning (streaming translation scale, no clip-wide knowledge) and returns the decoded frames.
A session never runs out: the cache is sink + window (a global-cache recipe is served with
`SERVE_SINK_FRAMES` + `SERVE_WINDOW_FRAMES`), and RoPE positions continue past upstream's 1024 frames.

Prompt changes take effect at the next chunk: only the cross-attention K/V are recomputed; the frames
already committed keep the K/V they were generated with (no re-commit under the new prompt). Reset
starts a new world with the same compiled programs. `save` / `restore` keep a world across server
restarts (orbax for the device state, JSON for the rest).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from wm_jax.models import camera as cam
from wm_jax.serve.controls import PoseIntegrator, chunk_latent_poses
from wm_jax.serve.protocol import MAX_PROMPT_CHARS
from wm_jax.streaming.engine import WorldRollout

SERVE_SINK_FRAMES = 3  # FlashDreams' window15-sink3
SERVE_WINDOW_FRAMES = 15


def serving_recipe(recipe):
    """(recipe, note): a recipe whose cache stays bounded however long the session lasts."""
    if recipe.window_frames is not None:
        return recipe, None
    note = (f"recipe {recipe.slug} keeps every frame in its cache; serving it with sink {SERVE_SINK_FRAMES} + "
            f"window {SERVE_WINDOW_FRAMES} frames so sessions never run out of memory")
    return recipe.replace(sink_frames=SERVE_SINK_FRAMES, window_frames=SERVE_WINDOW_FRAMES), note


@dataclass
class ChunkInfo:
    """What the page shows and the tests check for one generated chunk."""

    chunk_index: int
    num_frames: int
    gen_ms: float
    latent_poses: np.ndarray  # [chunk, 4, 4] the camera conditioning received
    moved: bool  # the camera moved since the previous chunk's last latent pose (the start pose for chunk 0)
    consumed: list[int] = field(default_factory=list)  # client action ids applied before this chunk


class LiveWorld:
    """One world (one model replica) for one visitor at a time.

    Args:
      recipe, plan, parts: as `wm-jax run` builds them (`parts.encode_prompt` stays alive for prompt changes).
      image: I2V start image uint8 [H, W, 3] (I2V recipes); intrinsics: [N, 4] (camera recipes).
    """

    def __init__(self, recipe, plan, parts, *, prompt: str, image: np.ndarray | None,
                 intrinsics: np.ndarray | None, seed: int):
        self.recipe, self.plan = recipe, plan
        self.encode_prompt: Callable[[str], np.ndarray] = parts.encode_prompt
        self.rollout = WorldRollout(recipe, plan, parts.dit, parts.decoder, seed=seed, vae_encoder=parts.vae_encoder)
        self.image, self.intrinsics = image, intrinsics
        self.prompt = prompt
        self.controls = PoseIntegrator(recipe.fps)
        self.pending_actions: list[int] = []
        self.pose_log: list[np.ndarray] = []  # latent poses fed to the model, per chunk (newest last)
        self.text_len = parts.dit.config.text_len

    @property
    def camera_driven(self) -> bool:
        return self.intrinsics is not None

    def reset(self, *, image: np.ndarray | None = None) -> None:
        """A new world from the start image / prompt (same compiled programs, nothing recompiled)."""
        if image is not None:
            self.image = image
        self.controls = PoseIntegrator(self.recipe.fps)
        self.pending_actions.clear()
        self.pose_log.clear()
        camera = (cam.StreamingCamera(self.intrinsics[0], self.plan.pixel_height, self.plan.pixel_width,
                                      self.recipe.world_scale) if self.camera_driven else None)
        self.rollout.start(self.encode_prompt(self.prompt), image=self.image, camera=camera)

    def set_prompt(self, text: str) -> str | None:
        """Switches the prompt from the next chunk on; returns a notice when the prompt was truncated."""
        notice = None
        if len(text) > MAX_PROMPT_CHARS:
            text, notice = text[:MAX_PROMPT_CHARS], f"the prompt was cut to {MAX_PROMPT_CHARS} characters"
        features = self.encode_prompt(text)
        if features.shape[1] >= self.text_len:
            notice = f"the prompt was cut to the text encoder's {self.text_len} tokens"
        self.prompt = text
        self.rollout.state.cross_kv = self.rollout.step.cross_kv(features)
        return notice

    def take_controls(self) -> tuple[np.ndarray, list[int]]:
        """Advances the controls through the next chunk's output frames: (its latent poses [chunk, 4, 4],
        the action ids applied). Cheap; the server calls it on its event loop, where the controls live."""
        index = self.rollout.state.chunk_index
        consumed, self.pending_actions = self.pending_actions, []
        frame_poses = self.controls.advance(self.plan.chunk_pixel_frames(index))
        return chunk_latent_poses(frame_poses, index, self.plan.frames_of(index)), consumed

    def generate(self, latent_poses: np.ndarray, consumed: list[int]) -> tuple[np.ndarray, ChunkInfo]:
        """One AR step at these latent poses: (frames uint8 [T, H, W, 3], info). The device work."""
        index = self.rollout.state.chunk_index
        previous = self.pose_log[-1][-1] if self.pose_log else np.eye(4)
        start = time.perf_counter()
        frames, _ = self.rollout.next_chunk(latent_poses if self.camera_driven else None)
        info = ChunkInfo(index, frames.shape[0], (time.perf_counter() - start) * 1e3, latent_poses,
                         not np.allclose(latent_poses, previous[None]), consumed)
        self.pose_log.append(latent_poses)
        del self.pose_log[:-64]
        return frames, info

    def next_chunk(self) -> tuple[np.ndarray, ChunkInfo]:
        """`take_controls` then `generate`."""
        return self.generate(*self.take_controls())

    # -- save / restore ------------------------------------------------------------------------------

    def save(self, folder: str | Path) -> None:
        """Writes the world (KV cache, decoder/encoder state, pose, chunk index, prompt) into `folder`
        atomically (a temporary folder renamed into place)."""
        import orbax.checkpoint as ocp

        folder = Path(folder).absolute()
        tmp, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / "arrays", self._device_state())
        s, player = self.rollout.state, self.controls.player
        meta = {"slug": self.recipe.slug, "chunk_index": s.chunk_index, "prompt": self.prompt,
                "rotation": player.rotation.tolist(), "position": player.position.tolist(),
                "pitch_deg": player.pitch_deg,
                "camera_previous_pose": (None if s.camera is None or s.camera.previous_pose is None
                                         else s.camera.previous_pose.tolist())}
        (tmp / "world.json").write_text(json.dumps(meta, indent=1) + "\n")
        if folder.exists():
            folder.rename(old)  # the previous save stays on disk until the new one is in place
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    def restore(self, folder: str | Path) -> None:
        """Continues a saved world exactly where it stopped (the same recipe and plan)."""
        import orbax.checkpoint as ocp

        folder = Path(folder).absolute()
        meta = json.loads((folder / "world.json").read_text())
        if meta["slug"] != self.recipe.slug:
            raise ValueError(f"{folder}: a saved {meta['slug']} world, this server runs {self.recipe.slug}")
        self.prompt = meta["prompt"]
        self.reset()  # the state's structure and shardings, filled below
        s = self.rollout.state
        if meta["chunk_index"] > 0:  # past the first chunk every streaming state has started
            s.decoder_state = dataclasses.replace(s.decoder_state, started=True)
            if s.encoder_cache is not None:
                s.encoder_cache = dataclasses.replace(s.encoder_cache, started=True)
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                        self._device_state())
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(folder / "arrays", target)
        s.cache, s.decoder_state, s.encoder_cache = restored["cache"], restored["decoder"], restored.get("encoder")
        s.chunk_index = meta["chunk_index"]
        self.controls.player.rotation = np.asarray(meta["rotation"])
        self.controls.player.position = np.asarray(meta["position"])
        self.controls.player.pitch_deg = meta["pitch_deg"]
        if s.camera is not None and meta["camera_previous_pose"] is not None:
            s.camera.previous_pose = np.asarray(meta["camera_previous_pose"])

    def _device_state(self) -> dict[str, Any]:
        """The arrays of the world's state (the I2V encoder's only for I2V recipes)."""
        s = self.rollout.state
        state = {"cache": s.cache, "decoder": s.decoder_state, "encoder": s.encoder_cache}
        return {k: v for k, v in state.items() if v is not None}
