"""Keyboard and mouse state -> one camera pose per output video frame (FlashDreams' live controls).

The pose maths is `wm_jax.worlds.player.Player`'s, the motion the procedural training clips use.

Poses are camera-to-world 4x4 matrices in OpenCV axes (x right, y down, z forward), starting at the
identity. Per output frame (dt = 1 / fps):

    W / S        move ±0.8 units/s along the camera's forward, projected on the world xz-plane
    E / Q        move ±0.8 units/s along the camera's right, projected on the world xz-plane
    D, L / A, J  yaw ±32°/s about the world y axis (R ← R_y · R)       (D, L turn right)
    I / K        pitch ±32°/s about the camera x axis (R ← R · R_x)     (I looks up), clamped to ±85°:
                 a step that would pass the clamp is dropped
    arrows       aliases of W, S, A, D;  mouse drag: an immediate yaw / pitch of the dragged degrees

On each axis the latest pressed key that is still held wins. A chunk of the world model takes the
poses of its latent frames: the last pixel frame of each group of 4 (`chunk_latent_poses`).
"""

from __future__ import annotations

import numpy as np

from wm_jax.worlds.player import MOVE_SPEED, PITCH_LIMIT_DEG, TURN_SPEED_DEG, Player

KEY_ALIASES = {"arrowup": "w", "arrowdown": "s", "arrowleft": "a", "arrowright": "d"}
AXES = {  # axis -> key -> direction
    "forward": {"w": 1, "s": -1},
    "strafe": {"e": 1, "q": -1},
    "yaw": {"d": 1, "l": 1, "a": -1, "j": -1},
    "pitch": {"i": 1, "k": -1},
}
KEY_AXIS = {key: axis for axis, keys in AXES.items() for key in keys}


def normalize_key(key: str) -> str | None:
    """A browser `KeyboardEvent.key` (any case; arrows as 'ArrowUp') -> our key name, None if not a control."""
    key = str(key).lower()
    key = KEY_ALIASES.get(key, key)
    return key if key in KEY_AXIS else None


class PoseIntegrator:
    """Integrates held keys and mouse drags into camera-to-world poses, one per output frame.

    The motion is `wm_jax.worlds.player.Player`'s (the one the world models are trained on); its state
    is exposed here as `rotation`, `position` and `pitch_deg`."""

    def __init__(self, fps: float, *, move_speed: float = MOVE_SPEED, turn_speed_deg: float = TURN_SPEED_DEG,
                 pitch_limit_deg: float = PITCH_LIMIT_DEG):
        self.player = Player(fps, move_speed=move_speed, turn_speed_deg=turn_speed_deg,
                             pitch_limit_deg=pitch_limit_deg)
        self._held: dict[str, list[str]] = {axis: [] for axis in AXES}  # in press order, latest last
        self._look = np.zeros(2)  # pending mouse (yaw, pitch) degrees

    # -- input ---------------------------------------------------------------------------------------

    def key_down(self, key: str) -> bool:
        """Presses `key`; False (and no change) when it is not a control key."""
        name = normalize_key(key)
        if name is None:
            return False
        held = self._held[KEY_AXIS[name]]
        if name in held:
            held.remove(name)
        held.append(name)
        return True

    def key_up(self, key: str) -> bool:
        name = normalize_key(key)
        if name is None:
            return False
        held = self._held[KEY_AXIS[name]]
        if name in held:
            held.remove(name)
        return True

    def release_all(self) -> None:
        for held in self._held.values():
            held.clear()

    def look(self, yaw_deg: float, pitch_deg: float) -> None:
        """A mouse drag: turn by these degrees at the next frame (positive: right, up)."""
        self._look += (float(yaw_deg), float(pitch_deg))

    def direction(self, axis: str) -> int:
        """-1, 0 or +1: the latest held key of `axis`."""
        held = self._held[axis]
        return AXES[axis][held[-1]] if held else 0

    @property
    def pose(self) -> np.ndarray:
        """The current camera-to-world pose [4, 4] float64."""
        return self.player.pose

    # -- time --------------------------------------------------------------------------------------------

    def advance(self, num_frames: int) -> np.ndarray:
        """Moves the camera through `num_frames` output frames; returns their poses [num_frames, 4, 4]."""
        poses = np.empty((num_frames, 4, 4))
        for i in range(num_frames):
            look_yaw, look_pitch = self._look if i == 0 else (0.0, 0.0)
            poses[i] = self.player.step(self.direction("forward"), self.direction("strafe"), self.direction("yaw"),
                                        self.direction("pitch"), look_yaw_deg=look_yaw, look_pitch_deg=look_pitch)
            if i == 0:
                self._look = np.zeros(2)
        return poses


def chunk_latent_poses(frame_poses: np.ndarray, chunk_index: int, chunk_frames: int,
                       temporal_stride: int = 4) -> np.ndarray:
    """The poses of a chunk's latent frames from the poses of its output frames.

    Chunk 0 has 1 + 4·(F − 1) output frames and its latents take frames [0, 4, 8, ...]; later chunks
    have 4·F frames and take [3, 7, 11, ...] (the last frame of each group of 4).
    """
    first = 0 if chunk_index == 0 else temporal_stride - 1
    expected = temporal_stride * chunk_frames - (temporal_stride - 1 if chunk_index == 0 else 0)
    if len(frame_poses) != expected:
        raise ValueError(f"chunk {chunk_index} has {expected} output frames, got {len(frame_poses)} poses")
    return np.asarray(frame_poses)[first::temporal_stride][:chunk_frames]
