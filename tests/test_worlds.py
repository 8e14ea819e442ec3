"""The procedural world: rendering (determinism, seeds, jit/vmap, geometry of the image under camera
motion), the objects' distance, and the player's trajectories (clearance, speed, variety, the live
controls' motion)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wm_jax.serve.controls import PoseIntegrator
from wm_jax.worlds import (CLEARANCE, EYE_HEIGHT, MAX_STEP, MAX_TURN_DEG, Player, body_clearance, clear_start,
                           distance, player_trajectory, render, scripted_trajectory)
from wm_jax.worlds import scene

FPS = 16
H, W = 48, 80  # one image size for every render here: each new shape costs a compilation
K = np.array([60.0, 56.0, W / 2, H / 2], np.float32)  # fx != fy on purpose


def heading_deg(poses):
    """Yaw of each pose's forward axis in the xz-plane, degrees (0 = +z, positive toward +x), unwrapped."""
    return np.degrees(np.unwrap(np.arctan2(poses[:, 0, 2], poses[:, 2, 2])))


def grey(image):
    return np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])


def image_shift(before, after):
    """(rows, columns) by which the content of `after` is moved relative to `before` (phase correlation
    of the Hann-windowed grey images): positive columns = content moved right."""
    window = np.outer(np.hanning(before.shape[0]), np.hanning(before.shape[1]))
    a, b = (np.fft.fft2((g - g.mean()) * window) for g in (grey(before), grey(after)))
    cross = b * np.conj(a)
    peak = np.unravel_index(np.argmax(np.fft.ifft2(cross / (np.abs(cross) + 1e-12)).real), cross.shape)
    return tuple(int(p - n if p > n // 2 else p) for p, n in zip(peak, cross.shape))


@pytest.fixture(scope="module")
def start():
    return clear_start(0)


def test_render_is_deterministic_per_seed_with_shape_dtype_and_range(start):
    poses = scripted_trajectory([(0.25, 1.0, 0.0, 1.0, 0.0)], start=start)[:2]
    first = np.asarray(render(0, poses, K, H, W))
    assert first.shape == (2, H, W, 3) and first.dtype == np.float32
    assert 0.0 <= first.min() and first.max() <= 1.0 and first.std() > 0.05
    np.testing.assert_array_equal(first, np.asarray(render(0, poses, K, H, W)))
    other_world = np.asarray(render(1, poses, K, H, W))
    assert np.abs(other_world - first).mean() > 0.03


def test_render_jits_and_vmaps_over_seeds(start):
    poses = start[None]
    batch = jax.jit(jax.vmap(lambda seed: render(seed, poses, K, H, W)))(jnp.arange(2, dtype=jnp.uint32))
    assert batch.shape == (2, 1, H, W, 3)
    for seed in range(2):
        np.testing.assert_allclose(batch[seed], render(seed, poses, K, H, W), atol=1e-4)


def test_sky_above_and_ground_below_the_horizon_for_a_level_camera():
    """Over the free view ahead of a clear start (the middle third of the columns)."""
    for seed in range(3):
        image = np.asarray(render(seed, clear_start(seed)[None], K, H, W))[0, :, W // 3: -(W // 3)]
        sky, ground = image[: H // 6].reshape(-1, 3), image[-H // 6:].reshape(-1, 3)
        assert np.mean(sky[:, 2] > sky[:, 0]) > 0.9  # the sky is blue
        assert np.mean(ground[:, 2] < ground[:, :2].max(axis=1)) > 0.9  # the ground is earth or grass
        assert grey(sky).mean() > grey(ground).mean()


def test_turning_right_moves_the_content_left(start):
    """Yawing right by 6 degrees moves what the camera sees left by about fx·tan(6°) = 6.3 pixels."""
    poses = np.stack([start, Player(FPS, start=start).step(look_yaw_deg=6.0)])
    assert heading_deg(poses)[1] - heading_deg(poses)[0] == pytest.approx(6.0)
    before, after = np.asarray(render(0, poses, K, H, W))
    rows, columns = image_shift(before, after)
    assert rows == 0 and -8 <= columns <= -5


def test_walking_forward_enlarges_the_centre(start):
    """The frame after walking 1.5 units forward matches the first frame zoomed in about the principal
    point better than the first frame itself."""
    poses = np.stack([start, scripted_trajectory([(1.875, 1.0, 0.0, 0.0, 0.0)], start=start)[-1]])
    before, after = np.asarray(render(0, poses, K, H, W))
    rows, columns = np.mgrid[0:H, 0:W] + 0.5

    def zoomed(image, factor):
        r = np.clip(((rows - K[3]) / factor + K[3]).astype(int), 0, H - 1)
        c = np.clip(((columns - K[2]) / factor + K[2]).astype(int), 0, W - 1)
        return image[r, c]

    errors = {f: np.abs(zoomed(before, f) - after)[H // 4: -H // 4, W // 4: -W // 4].mean() for f in (1.0, 1.1, 1.25)}
    assert min(errors, key=errors.get) > 1.0, errors


def test_distance_is_negative_inside_objects_and_positive_outside(start):
    xs, zs = np.meshgrid(np.arange(40) * scene.CELL_SIZE + 0.5 * scene.CELL_SIZE, [0.5 * scene.CELL_SIZE])
    cells = scene.cell_at(scene._seed_key(0), jnp.asarray(xs.ravel(), jnp.float32), jnp.asarray(zs.ravel(), jnp.float32))
    index = int(np.flatnonzero(np.asarray(cells.kind) == scene.SPHERE)[0])
    centre = np.array([np.asarray(c)[index] for c in cells.centre])
    radius = float(np.asarray(cells.half[0])[index])
    assert float(distance(0, centre)) == pytest.approx(-radius, abs=1e-4)
    assert float(distance(0, centre + [radius + 0.2, 0.0, 0.0])) == pytest.approx(0.2, abs=1e-4)
    assert centre[1] + radius == pytest.approx(EYE_HEIGHT)  # resting on the ground
    assert float(distance(0, start[:3, 3])) >= 1.0


def test_player_trajectory_is_deterministic_clear_and_player_like():
    poses = player_trajectory(3, 60 * FPS)
    np.testing.assert_array_equal(poses, player_trajectory(3, 60 * FPS))
    assert poses.shape == (60 * FPS, 4, 4) and poses.dtype == np.float32
    assert not np.array_equal(poses[:50], player_trajectory(4, 50))
    np.testing.assert_allclose(poses[0][:3, 1], [0.0, 1.0, 0.0], atol=1e-6)  # level, upright start
    np.testing.assert_allclose(poses[:, 1, 3], 0.0, atol=1e-6)  # on the ground plane throughout
    assert float(np.asarray(distance(3, poses[:, :3, 3])).min()) >= 0.35
    assert body_clearance(3, poses[:, :3, 3]).min() >= CLEARANCE - 0.01

    steps = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    turns = np.abs(np.diff(heading_deg(poses)))
    assert steps.max() <= MAX_STEP / FPS + 1e-5 and turns.max() <= MAX_TURN_DEG / FPS + 1e-3
    assert np.mean(steps > 0.3 * MAX_STEP / FPS) > 0.3  # mostly walking
    assert np.sum(steps < 1e-6) > FPS  # it stands still or turns on the spot at times
    assert np.sum(turns > 0.5) > 2 * FPS and np.ptp(heading_deg(poses)) > 90.0
    forward = np.einsum("ij,ij->i", np.diff(poses[:, :3, 3], axis=0), poses[1:, :3, 2])
    assert forward.max() > 0.04 and forward.min() < -0.02  # walks forward and back


def test_clear_start_has_room_and_a_free_view():
    pose = clear_start(5)
    assert body_clearance(5, pose[None, :3, 3])[0] >= 1.5
    ahead = pose[:3, 3] + np.arange(1, 9)[:, None] * pose[:3, 2]
    assert body_clearance(5, ahead).min() >= CLEARANCE
    with pytest.raises(ValueError, match="room 3.0"):
        clear_start(5, room=3.0)  # more than the conservative scene distance can ever report


def test_scripted_trajectory_and_the_live_controls_move_alike():
    actions = [(1.0, 1.0, 0.0, 1.0, 0.0), (0.5, 0.0, -1.0, 0.0, 1.0), (0.25, -1.0, 0.0, -1.0, -1.0)]
    scripted = scripted_trajectory(actions, fps=FPS)
    assert scripted.shape == (1 + 16 + 8 + 4, 4, 4)
    controls = PoseIntegrator(FPS)
    keys = [("w", "d"), ("q", "i"), ("s", "a", "k")]
    live = [np.eye(4)]
    for (seconds, *_), held in zip(actions, keys):
        for key in held:
            controls.key_down(key)
        live.extend(controls.advance(int(seconds * FPS)))
        controls.release_all()
    np.testing.assert_allclose(scripted, np.stack(live), atol=1e-6)
    player = Player(FPS)
    np.testing.assert_allclose(player.step(yaw=1.0, look_yaw_deg=3.0)[:3, 2],
                               [np.sin(np.radians(5.0)), 0.0, np.cos(np.radians(5.0))], atol=1e-12)
