"""Keys and mouse -> camera poses (FlashDreams' live controls: speeds, axes, pitch clamp, key precedence)."""

import numpy as np
import pytest

from wm_jax.serve.controls import PoseIntegrator, chunk_latent_poses, normalize_key

FPS = 16


def yaw_of(pose) -> float:
    """Heading of the camera's forward axis in the world xz-plane, degrees (0 = +z, positive to +x)."""
    forward = pose[:3, 2]
    return float(np.degrees(np.arctan2(forward[0], forward[2])))


def pitch_of(pose) -> float:
    forward = pose[:3, 2]
    return float(np.degrees(np.arcsin(-forward[1])))  # y is down: looking up has forward.y < 0


def test_walking_forward_one_second_moves_0_8_units_along_the_view():
    controls = PoseIntegrator(FPS)
    assert controls.key_down("W")
    poses = controls.advance(FPS)
    np.testing.assert_allclose(poses[-1][:3, 3], [0.0, 0.0, 0.8], atol=1e-12)
    np.testing.assert_allclose(poses[0][:3, 3], [0.0, 0.0, 0.05], atol=1e-12)  # one frame: 0.8 / 16
    controls.key_up("w")
    np.testing.assert_allclose(controls.advance(4)[-1], poses[-1])  # released: the camera stands still


@pytest.mark.parametrize("key, sign", [("d", 1), ("l", 1), ("a", -1), ("j", -1), ("ArrowRight", 1), ("ArrowLeft", -1)])
def test_turning_32_degrees_per_second_about_the_world_vertical(key, sign):
    controls = PoseIntegrator(FPS)
    controls.key_down(key)
    pose = controls.advance(FPS)[-1]
    assert yaw_of(pose) == pytest.approx(sign * 32.0)
    np.testing.assert_allclose(pose[:3, 1], [0.0, 1.0, 0.0], atol=1e-12)  # no roll, no pitch


def test_pitch_is_clamped_at_85_degrees_and_walking_stays_level():
    controls = PoseIntegrator(FPS)
    controls.key_down("i")
    controls.advance(FPS)
    assert pitch_of(controls.pose) == pytest.approx(32.0)
    controls.advance(5 * FPS)  # 5 more seconds would be 192 degrees: the steps past 85 are dropped
    assert 83.0 <= pitch_of(controls.pose) <= 85.0 and controls.player.pitch_deg <= 85.0
    controls.key_up("i")
    controls.key_down("w")
    poses = controls.advance(FPS)
    assert poses[-1][1, 3] == pytest.approx(0.0, abs=1e-12)  # looking up, walking stays on the ground plane
    assert np.linalg.norm(poses[-1][:3, 3]) == pytest.approx(0.8)


def test_the_latest_held_key_wins_on_each_axis_and_strafing_goes_right():
    controls = PoseIntegrator(FPS)
    controls.key_down("w")
    controls.key_down("s")
    assert controls.direction("forward") == -1
    controls.key_up("s")
    assert controls.direction("forward") == 1
    controls.key_up("w")
    controls.key_down("e")
    np.testing.assert_allclose(controls.advance(FPS)[-1][:3, 3], [0.8, 0.0, 0.0], atol=1e-12)


def test_mouse_drag_turns_at_once_and_unknown_keys_change_nothing():
    controls = PoseIntegrator(FPS)
    assert not controls.key_down("x") and not controls.key_down("Shift") and normalize_key("F5") is None
    controls.look(10.0, -5.0)
    first = controls.advance(2)[0]
    assert yaw_of(first) == pytest.approx(10.0) and pitch_of(first) == pytest.approx(-5.0)


def test_chunk_latent_poses_take_the_last_frame_of_each_group_of_four():
    frames = np.arange(9)[:, None, None] * np.ones((1, 4, 4))
    np.testing.assert_array_equal(chunk_latent_poses(frames, 0, 3)[:, 0, 0], [0, 4, 8])
    frames = np.arange(12)[:, None, None] * np.ones((1, 4, 4))
    np.testing.assert_array_equal(chunk_latent_poses(frames, 1, 3)[:, 0, 0], [3, 7, 11])
    with pytest.raises(ValueError, match="chunk 1 has 12 output frames"):
        chunk_latent_poses(frames[:9], 1, 3)
