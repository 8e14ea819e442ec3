"""The player's motion model: per-frame actions -> camera-to-world poses (the live controls' motion).

Poses are camera-to-world 4x4 matrices in OpenCV axes (camera x right, y down, z forward) in a world
whose y axis points down (gravity +y). Per frame (dt = 1 / fps), with actions in [-1, 1] (a held key is
±1; larger values move faster, as `wm_jax.worlds.trajectories` does for variety):

    forward   move forward · MOVE_SPEED units/s along the camera's forward, projected on the world xz-plane
    strafe    move strafe · MOVE_SPEED units/s along the camera's right, projected on the world xz-plane
    yaw       turn yaw · TURN_SPEED_DEG °/s about the world y axis (R ← R_y · R); positive turns right
    pitch     turn pitch · TURN_SPEED_DEG °/s about the camera x axis (R ← R · R_x); positive looks up;
              a step that would take the pitch past ±PITCH_LIMIT_DEG is dropped

A look (mouse drag) adds its yaw / pitch degrees to the frame's turn. The turns come first, then the
move along the turned axes; the camera never leaves its height.
"""

from __future__ import annotations

import numpy as np

MOVE_SPEED = 0.8  # world units per second
TURN_SPEED_DEG = 32.0  # degrees per second, yaw and pitch
PITCH_LIMIT_DEG = 85.0


def yaw_matrix(degrees: float) -> np.ndarray:
    """[3, 3] rotation about the world y axis (down); positive degrees turn +z toward +x (to the right)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def pitch_matrix(degrees: float) -> np.ndarray:
    """[3, 3] rotation about the x axis; applied on the camera side, positive degrees look up."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def on_ground(direction: np.ndarray) -> np.ndarray:
    """A direction [3] projected on the world xz-plane, unit length (zero when it points straight up/down)."""
    flat = np.array([direction[0], 0.0, direction[2]])
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 1e-9 else np.zeros(3)


class Player:
    """A camera walking on the ground: `step` applies one frame's actions and returns the new pose.

    State (public, may be set): `rotation` [3, 3], `position` [3] (float64), `pitch_deg` (the pitch the
    clamp counts; 0 for a level start).
    """

    def __init__(self, fps: float, *, move_speed: float = MOVE_SPEED, turn_speed_deg: float = TURN_SPEED_DEG,
                 pitch_limit_deg: float = PITCH_LIMIT_DEG, start: np.ndarray | None = None):
        """`start`: a [4, 4] camera-to-world pose with no roll (default: the identity)."""
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.dt = 1.0 / fps
        self.move_speed, self.turn_speed, self.pitch_limit = move_speed, turn_speed_deg, pitch_limit_deg
        start = np.eye(4) if start is None else np.asarray(start, np.float64)
        self.rotation = start[:3, :3].copy()
        self.position = start[:3, 3].copy()
        self.pitch_deg = float(np.degrees(np.arcsin(np.clip(-self.rotation[1, 2], -1.0, 1.0))))

    @property
    def pose(self) -> np.ndarray:
        """The current camera-to-world pose [4, 4] float64."""
        pose = np.eye(4)
        pose[:3, :3], pose[:3, 3] = self.rotation, self.position
        return pose

    def step(self, forward: float = 0.0, strafe: float = 0.0, yaw: float = 0.0, pitch: float = 0.0, *,
             look_yaw_deg: float = 0.0, look_pitch_deg: float = 0.0) -> np.ndarray:
        """Advances one frame (actions as in the module docstring); returns the new pose [4, 4] float64."""
        yaw_deg = yaw * self.turn_speed * self.dt + look_yaw_deg
        pitch_deg = pitch * self.turn_speed * self.dt + look_pitch_deg
        self.rotation = yaw_matrix(yaw_deg) @ self.rotation
        if abs(self.pitch_deg + pitch_deg) <= self.pitch_limit:
            self.rotation = self.rotation @ pitch_matrix(pitch_deg)
            self.pitch_deg += pitch_deg
        distance = self.move_speed * self.dt
        self.position = (self.position + forward * distance * on_ground(self.rotation[:, 2])
                         + strafe * distance * on_ground(self.rotation[:, 0]))
        return self.pose
