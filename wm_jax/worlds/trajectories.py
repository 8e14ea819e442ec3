"""Camera trajectories through the procedural world, made with the live controls' motion (`Player`).

All functions return camera-to-world poses [num_frames, 4, 4] float32 in OpenCV axes, in the world frame
of `wm_jax.worlds.scene` (y down, the camera at y = 0 is EYE_HEIGHT above the ground); the first pose is
the start, each later pose one `Player.step` after the previous one.

- `player_trajectory(seed, num_frames)`: a seeded walk made of segments of 0.5–3 s (walk forward, back,
  strafe, turn, walk while turning, look up or down, stand still) at 0.5–2× the controls' speeds, that
  stops and turns away instead of coming closer than CLEARANCE to an object.
- `scripted_trajectory(actions)`: a given list of (seconds, forward, strafe, yaw, pitch) segments.
- `clear_start(seed)`: a start pose with room around it and a free view ahead.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from wm_jax.worlds.player import MOVE_SPEED, TURN_SPEED_DEG, Player, on_ground, yaw_matrix
from wm_jax.worlds.scene import CELL_SIZE, EYE_HEIGHT, distance

CLEARANCE = 0.4  # the walker's body never comes closer than this to an object (world units)
LOOKAHEAD = 0.6  # the walker also keeps CLEARANCE at this distance ahead of its motion, so it turns away early
MAX_SPEED_MULTIPLIER = 2.0  # segment speeds are 0.5x to this times the controls' speeds
MAX_STEP = MOVE_SPEED * MAX_SPEED_MULTIPLIER  # units per second, the fastest walk (diagonal moves included)
MAX_TURN_DEG = TURN_SPEED_DEG * MAX_SPEED_MULTIPLIER  # degrees per second, the fastest yaw or pitch
MAX_LOOK_PITCH_DEG = 20.0  # look up / down segments stay within this pitch
BODY_HEIGHTS = (0.0, 0.5 * EYE_HEIGHT, EYE_HEIGHT - 0.2)  # camera-relative y (down) of the body's samples
START_AREA = 100.0  # start positions are drawn in [-START_AREA, START_AREA]^2 of the xz-plane (small enough
# that float32 world positions keep the renderer's normals smooth; each seed is another world anyway)
START_DRAWS = 10_000  # clear_start gives up after this many random poses
MAX_ROOM = CELL_SIZE / 2  # the scene distance, a lower bound, never exceeds CELL_SIZE / 2 + CELL_MARGIN
SEGMENT_SECONDS = (0.5, 3.0)
SEGMENT_KINDS = {  # kind -> relative frequency
    "forward": 0.34, "forward_turn": 0.2, "turn": 0.12, "back": 0.05, "strafe": 0.08, "look": 0.06,
    "level": 0.05, "still": 0.1,
}

_distance = jax.jit(distance)


def body_clearance(seed: int, positions: np.ndarray) -> np.ndarray:
    """The distance [M] from a standing player's body (camera positions [M, 3] at y = 0, down to near the
    ground) to the nearest object of world `seed`: the minimum over samples at BODY_HEIGHTS. Runs on the
    CPU: these small host-side queries would only wait on an accelerator."""
    positions = np.asarray(positions, np.float32)
    samples = positions[:, None, :] + np.array([[0.0, h, 0.0] for h in BODY_HEIGHTS], np.float32)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return np.asarray(_distance(seed, samples)).min(axis=1)


def _free_run(seed: int, position: np.ndarray, directions: np.ndarray, reach: float) -> np.ndarray:
    """How far [D] (up to `reach`, in steps of 0.25) the player can walk from `position` [3] along each
    unit direction [D, 3] in the xz-plane before coming within CLEARANCE of an object."""
    steps = np.arange(1, int(reach / 0.25) + 1) * 0.25
    points = position + steps[None, :, None] * directions[:, None, :]  # [D, S, 3]
    blocked = body_clearance(seed, points.reshape(-1, 3)).reshape(points.shape[:2]) < CLEARANCE
    first_blocked = np.where(blocked.any(axis=1), blocked.argmax(axis=1), len(steps))
    return np.concatenate([[0.0], steps])[first_blocked]


def _start_pose(position: np.ndarray, yaw_deg: float) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = yaw_matrix(yaw_deg), position
    return pose


def clear_start(seed: int, *, view: float = 8.0, room: float = 1.5, attempt: int = 0) -> np.ndarray:
    """A level start pose [4, 4] float32 on the ground plane of world `seed` with at least `room` units
    around the body (at most MAX_ROOM) and `view` units free straight ahead. Deterministic; `attempt`
    draws another one."""
    if room > MAX_ROOM:
        raise ValueError(f"room {room} is more than the {MAX_ROOM} units the scene distance can vouch for")
    rng = np.random.default_rng([seed, attempt, 0x57A27])
    for _ in range(START_DRAWS):
        position = np.array([rng.uniform(-START_AREA, START_AREA), 0.0, rng.uniform(-START_AREA, START_AREA)])
        yaw_deg = rng.uniform(-180.0, 180.0)
        forward = yaw_matrix(yaw_deg)[:, 2]
        if (body_clearance(seed, position[None])[0] >= room
                and _free_run(seed, position, forward[None], view)[0] >= view):
            return _start_pose(position, yaw_deg).astype(np.float32)
    raise ValueError(f"no start with {room} units of room and {view} units of view in world {seed} after "
                     f"{START_DRAWS} draws; ask for less")


def scripted_trajectory(actions: Sequence[tuple[float, float, float, float, float]], fps: float = 16,
                        start: np.ndarray | None = None) -> np.ndarray:
    """Poses [1 + Σ round(seconds·fps), 4, 4] float32 of `start` (default: the identity) followed by the
    segments `actions`: (seconds, forward, strafe, yaw, pitch), the actions held for that long (see
    `wm_jax.worlds.player`; ±1 = a held key). No collision handling."""
    player = Player(fps, start=start)
    poses = [player.pose]
    for seconds, forward, strafe, yaw, pitch in actions:
        poses.extend(player.step(forward, strafe, yaw, pitch) for _ in range(int(round(seconds * fps))))
    return np.stack(poses).astype(np.float32)


def _segment(rng: np.random.Generator, kind: str, pitch_deg: float) -> np.ndarray:
    """The (forward, strafe, yaw, pitch) actions [4] of a new segment of `kind`."""
    def speed():
        return rng.uniform(0.5, MAX_SPEED_MULTIPLIER)

    def sign():
        return rng.choice([-1.0, 1.0])

    actions = {
        "forward": (speed(), 0.0, 0.0, 0.0),
        "forward_turn": (speed(), 0.0, sign() * speed(), 0.0),
        "turn": (0.0, 0.0, sign() * speed(), 0.0),
        "back": (-speed(), 0.0, 0.0, 0.0),
        "strafe": (0.0, sign() * speed(), 0.0, 0.0),
        "look": (0.0, 0.0, 0.0, sign() * rng.uniform(0.5, 1.0)),
        "level": (0.0, 0.0, 0.0, -np.sign(pitch_deg) * rng.uniform(0.5, 1.0)),
        "still": (0.0, 0.0, 0.0, 0.0),
    }[kind]
    return np.array(actions)


def _clamped_diagonal(actions: np.ndarray) -> np.ndarray:
    """Actions whose ground move (forward, strafe) is at most MAX_SPEED_MULTIPLIER long."""
    move = np.hypot(actions[0], actions[1])
    scale = min(1.0, MAX_SPEED_MULTIPLIER / move) if move > 0 else 1.0
    return actions * np.array([scale, scale, 1.0, 1.0])


def player_trajectory(seed: int, num_frames: int, fps: float = 16, *, start: np.ndarray | None = None
                      ) -> np.ndarray:
    """A player-like walk through world `seed`: poses [num_frames, 4, 4] float32 (see the module docstring).

    The first pose is `start` or a seed-drawn level pose on the ground plane with a random heading and
    room around it. Each frame moves at most MAX_STEP / fps units and turns at most MAX_TURN_DEG / fps
    degrees of yaw and of pitch. When a step would bring the body within CLEARANCE of an object, or
    LOOKAHEAD ahead of it would, the player stays put and the segment becomes a turn toward the freer
    side. Deterministic in its arguments.
    """
    rng = np.random.default_rng([seed, 0x7A1C])
    if start is None:
        position = np.array([rng.uniform(-START_AREA, START_AREA), 0.0, rng.uniform(-START_AREA, START_AREA)])
        while body_clearance(seed, position[None])[0] < 1.0:
            position += rng.uniform(-2.0, 2.0, size=3) * np.array([1.0, 0.0, 1.0])
        start = _start_pose(position, rng.uniform(-180.0, 180.0))
    player = Player(fps, start=start)
    kinds, weights = list(SEGMENT_KINDS), np.array(list(SEGMENT_KINDS.values()))
    poses = [player.pose]
    frames_left, actions, pitch_range = 0, np.zeros(4), (-MAX_LOOK_PITCH_DEG, MAX_LOOK_PITCH_DEG)
    while len(poses) < num_frames:
        if frames_left == 0:
            kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
            frames_left = max(1, int(round(rng.uniform(*SEGMENT_SECONDS) * fps)))
            actions = _clamped_diagonal(_segment(rng, kind, player.pitch_deg))
            # Pitch stays within +-MAX_LOOK_PITCH_DEG, and levelling stops at level.
            pitch_range = (min(0.0, player.pitch_deg), max(0.0, player.pitch_deg)) if kind == "level" else (
                -MAX_LOOK_PITCH_DEG, MAX_LOOK_PITCH_DEG)
        pitch_per_action = TURN_SPEED_DEG / fps
        actions[3] = np.clip(actions[3], (pitch_range[0] - player.pitch_deg) / pitch_per_action,
                             (pitch_range[1] - player.pitch_deg) / pitch_per_action)
        previous = (player.rotation.copy(), player.position.copy(), player.pitch_deg)
        player.step(*actions)
        if np.any(actions[:2]) and not _may_move(seed, previous[1], player.position):
            player.rotation, player.position, player.pitch_deg = previous
            actions = _turn_away(rng, seed, player)
            frames_left = max(1, int(round(rng.uniform(0.5, 1.5) * fps)))
            player.step(*actions)
        poses.append(player.pose)
        frames_left -= 1
    return np.stack(poses).astype(np.float32)


def _may_move(seed: int, before: np.ndarray, after: np.ndarray) -> bool:
    """Whether the body keeps CLEARANCE at `after` [3] and LOOKAHEAD further along the move from `before`."""
    move = after - before
    ahead = after + LOOKAHEAD * move / max(np.linalg.norm(move), 1e-9)
    return bool(body_clearance(seed, np.stack([after, ahead])).min() >= CLEARANCE)


def _turn_away(rng: np.random.Generator, seed: int, player: Player) -> np.ndarray:
    """Actions [4] of a standing turn toward the side (right or left of the heading) with the longer free
    run; a coin decides a tie."""
    right = on_ground(player.rotation[:, 0])
    free_right, free_left = _free_run(seed, player.position, np.stack([right, -right]), 4.0)
    direction = np.sign(free_right - free_left) or rng.choice([-1.0, 1.0])
    return np.array([0.0, 0.0, direction * rng.uniform(1.0, MAX_SPEED_MULTIPLIER), 0.0])
