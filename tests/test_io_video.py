"""MP4 writer: round trip through PyAV, encoder settings, atomic writes, input errors."""

from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

from wm_jax.io.video import Mp4Writer, frames_to_uint8, to_uint8, write_mp4  # noqa: E402


def gradient_video(frames=20, height=64, width=96) -> np.ndarray:
    """Smooth moving gradients: easy for H.264, so decoded pixels must be close."""
    t = np.arange(frames, dtype=np.float64)[:, None, None]
    y = np.arange(height, dtype=np.float64)[None, :, None]
    x = np.arange(width, dtype=np.float64)[None, None, :]
    shape = (frames, height, width)
    channels = [
        np.broadcast_to(40 + 1.5 * x + 2 * t, shape),
        np.broadcast_to(30 + 2.5 * y + t, shape),
        np.broadcast_to(200 - x - y + 0.5 * t, shape),
    ]
    return np.clip(np.stack(channels, axis=-1), 0, 255).round().astype(np.uint8)


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = {"codec": stream.codec_context.name, "pix_fmt": stream.codec_context.pix_fmt,
                "rate": stream.average_rate, "width": stream.width, "height": stream.height}
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return info, frames


def psnr(a, b) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_round_trip_array(tmp_path):
    video = gradient_video()
    out = write_mp4(tmp_path / "clip.mp4", video, fps=16)
    assert out == tmp_path / "clip.mp4"
    info, frames = decode(out)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["rate"] == Fraction(16)
    assert (info["height"], info["width"]) == (64, 96)
    assert frames.shape == video.shape
    assert psnr(frames, video) > 35.0
    # Only the destination is left in the folder (the temporary file was renamed).
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_encoder_settings_and_faststart(tmp_path):
    out = write_mp4(tmp_path / "clip.mp4", gradient_video(frames=5), fps=16)
    data = out.read_bytes()
    # libx264 records its settings in the stream; +faststart puts the index (moov) before the data.
    assert b"crf=18.0" in data
    assert b"subme=7" in data  # preset medium
    assert 0 <= data.find(b"moov") < data.find(b"mdat")


def test_streaming_chunks_and_fps(tmp_path):
    video = gradient_video(frames=21)
    chunks = (video[i:i + 9] if i == 0 else video[i:i + 12] for i in (0, 9))
    out = write_mp4(tmp_path / "stream.mp4", chunks, fps=24)
    info, frames = decode(out)
    assert info["rate"] == Fraction(24)
    assert frames.shape == video.shape
    assert psnr(frames, video) > 35.0

    with Mp4Writer(tmp_path / "writer.mp4", fps=16) as writer:
        for i in range(0, 21, 4):
            writer.append(video[i:i + 4])
        writer.append(video[0])  # a single [H, W, 3] frame
    assert writer.frames_written == 22
    _, frames = decode(tmp_path / "writer.mp4")
    assert len(frames) == 22


def test_interrupted_write_leaves_nothing(tmp_path):
    video = gradient_video(frames=8)

    def rollout():
        yield video[:4]
        raise RuntimeError("rollout crashed")

    with pytest.raises(RuntimeError, match="rollout crashed"):
        write_mp4(tmp_path / "crash.mp4", rollout())
    assert list(tmp_path.iterdir()) == []

    # An existing destination survives a failed rewrite untouched.
    good = write_mp4(tmp_path / "keep.mp4", video)
    before = good.read_bytes()
    with pytest.raises(KeyboardInterrupt), Mp4Writer(good) as writer:
        writer.append(video[:4])
        raise KeyboardInterrupt
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


def test_odd_size_error_names_shape(tmp_path):
    odd = np.zeros((3, 63, 96, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\(3, 63, 96, 3\)"):
        write_mp4(tmp_path / "odd.mp4", odd)
    assert list(tmp_path.iterdir()) == []


def test_input_errors(tmp_path):
    with pytest.raises(TypeError, match="uint8"):
        write_mp4(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        write_mp4(tmp_path / "g.mp4", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        write_mp4(tmp_path / "m.mp4", [np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 10, 3), np.uint8)])
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "e.mp4", [])
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_fails_before_encoding(tmp_path):
    frames_pulled = []

    def rollout():
        frames_pulled.append(1)
        yield np.zeros((1, 8, 8, 3), np.uint8)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_mp4(tmp_path / "missing" / "a.mp4", rollout())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        write_mp4(blocker / "a.mp4", rollout())
    with pytest.raises(IsADirectoryError):
        write_mp4(tmp_path, rollout())
    assert frames_pulled == []


def test_to_uint8():
    x = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0, -3.0], np.float32)
    np.testing.assert_array_equal(to_uint8(x, value_range=(-1, 1)), [0, 64, 128, 191, 255, 255, 0])
    y = np.array([0.0, 0.5, 1.0, 1.5, -0.1, 0.2], np.float32)
    np.testing.assert_array_equal(to_uint8(y, value_range=(0, 1)), [0, 128, 255, 255, 0, 51])
    assert to_uint8(np.zeros((2, 4, 4, 3)), value_range=(0, 1)).dtype == np.uint8
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(np.array([0.0, np.nan]), value_range=(0, 1))
    with pytest.raises(ValueError, match="high > low"):
        to_uint8(x, value_range=(1, -1))


def test_to_uint8_jax_bfloat16(tmp_path):
    jnp = pytest.importorskip("jax.numpy")
    video = jnp.linspace(-1, 1, 2 * 8 * 8 * 3, dtype=jnp.bfloat16).reshape(2, 8, 8, 3)
    frames = to_uint8(video, value_range=(-1, 1))
    assert frames.shape == (2, 8, 8, 3) and frames.min() == 0 and frames.max() == 255
    write_mp4(tmp_path / "j.mp4", frames)
    assert decode(tmp_path / "j.mp4")[1].shape == (2, 8, 8, 3)


@pytest.mark.parametrize("value_range", [(-1, 1), (0, 1)])
def test_frames_to_uint8_on_device_equals_to_uint8(value_range):
    jnp = pytest.importorskip("jax.numpy")
    rng = np.random.default_rng(0)
    low, high = value_range
    ties = ((np.arange(256) + 0.5) / 255 * (high - low) + low).astype(np.float32)  # land near k + 0.5
    x = np.concatenate([rng.normal(0.3, 0.8, 20000).astype(np.float32), np.linspace(low - 0.2, high + 0.2, 4001,
                        dtype=np.float32), ties, np.nextafter(ties, np.float32(2)), np.nextafter(ties, np.float32(-2)),
                        np.float32([low, high, 0.5, -0.5])])
    for video in (x, x.astype(jnp.bfloat16)):
        got = frames_to_uint8(jnp.asarray(video), value_range)
        assert got.dtype == np.uint8 and isinstance(got, np.ndarray)
        np.testing.assert_array_equal(got, to_uint8(video, value_range))
    with pytest.raises(ValueError, match="1 NaN/inf"):
        frames_to_uint8(jnp.asarray([0.0, jnp.inf]), value_range)
