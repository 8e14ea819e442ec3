"""MP4 output for generated videos: H.264 (libx264), yuv420p, crf 18, preset medium, +faststart.

These are the encoder settings FlashDreams uses for its `outputs/<slug>.mp4` files. Encoding goes
through PyAV (`av` on PyPI; its wheels bundle an ffmpeg build with libx264), imported lazily so the
rest of wm_jax works without it.

Frames are uint8 `[T, H, W, 3]` RGB: `to_uint8` converts float frames on the host, `frames_to_uint8`
the same way on a JAX device (copying only the uint8 result). A rollout can stream them chunk by chunk:

    with Mp4Writer("outputs/run.mp4", fps=16) as writer:
        for chunk in rollout:                      # each [t, H, W, 3] uint8
            writer.append(chunk)

The file is written to a hidden temporary file in the destination folder and renamed into place
on `close()`; if anything raises inside the `with` block (or `abort()` is called) the temporary
file is deleted and the destination is left untouched. To keep what was made when the user presses
Ctrl-C, catch KeyboardInterrupt and call `close()`: the frames appended so far become a finished,
playable file (a SIGINT arriving in the middle of `append` or `close` waits until that call has
finished, so the stream is never cut between a frame and its packets).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import uuid
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

CODEC = "libx264"
PIX_FMT = "yuv420p"
CRF = 18
PRESET = "medium"
DEFAULT_FPS = 16


def _import_av():
    try:
        import av
    except ImportError as err:
        raise ImportError(
            "writing MP4 files needs PyAV: pip install 'av>=14' (its wheels include ffmpeg with libx264)"
        ) from err
    return av


def to_uint8(video, value_range: tuple[float, float]) -> np.ndarray:
    """Float frames -> uint8 frames, mapping `value_range` linearly onto [0, 255].

    Args:
      video: any array (numpy, JAX, bfloat16 ...) of float pixel values, any shape (e.g. [T, H, W, 3]).
      value_range: (low, high) of the decoder's output, e.g. (-1, 1) for the Wan VAE or (0, 1) for
        TAEHV. Values outside the range are clipped; the result is rounded to the nearest integer.
    Returns:
      uint8 numpy array of the same shape.
    Raises:
      ValueError if the range is empty or the video contains NaN/inf (a diverged rollout should not
      silently turn into black pixels).
    """
    low, high = _check_range(value_range)
    x = np.asarray(video)
    if x.dtype.kind not in "fiu" and x.dtype.name != "bfloat16":
        raise TypeError(f"to_uint8 expects numeric pixel values, got dtype {x.dtype}")
    x = x.astype(np.float32)
    _check_finite(int(np.size(x) - np.count_nonzero(np.isfinite(x))), x.shape)
    return _scale_to_uint8(x, low, high, np)


def frames_to_uint8(video, value_range: tuple[float, float]) -> np.ndarray:
    """`to_uint8` of a JAX array, converted on its device: only the uint8 frames are copied to the host.

    Same mapping bit for bit (`_scale_to_uint8` on float32), same errors. video: float JAX array of any
    shape (e.g. [B, T, H, W, 3], any float dtype). Returns the uint8 numpy array of the same shape.
    """
    low, high = _check_range(value_range)
    pixels, bad = _device_to_uint8(low, high)(video)
    pixels, bad = np.asarray(pixels), int(bad)
    _check_finite(bad, pixels.shape)
    return pixels


@functools.cache
def _device_to_uint8(low: float, high: float):
    """Jitted video -> (uint8 frames, int32 count of NaN/inf values), one per value range."""
    import jax
    import jax.numpy as jnp

    def convert(video):
        x = video.astype(jnp.float32)
        return _scale_to_uint8(x, low, high, jnp), jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)

    return jax.jit(convert)


def _scale_to_uint8(x, low: float, high: float, xp):
    """The 8-bit mapping of both converters, in float32 (`xp`: numpy or jax.numpy): x [...] float32 ->
    rint((x - low) * 255 / (high - low)) clipped to [0, 255] (ties to even) -> uint8 [...]."""
    x = (x - low) * (255.0 / (high - low))
    return xp.clip(xp.rint(x), 0.0, 255.0).astype(xp.uint8)


def _check_range(value_range: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    return low, high


def _check_finite(bad: int, shape: tuple[int, ...]) -> None:
    if bad:
        raise ValueError(f"video contains {bad} NaN/inf values (shape {shape}); refusing to encode them")


def _fps_fraction(fps) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001 * 1000) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def _check_destination(path: Path) -> Path:
    folder = path.parent
    if path.is_dir():
        raise IsADirectoryError(f"cannot write video to {path}: it is a directory")
    if not folder.exists():
        raise FileNotFoundError(f"cannot write video to {path}: folder {folder} does not exist (create it first)")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write video to {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write video to {path}: folder {folder} is not writable")
    return folder


class Mp4Writer:
    """Streaming H.264 MP4 writer; frames are appended chunk by chunk.

    Args:
      path: destination `.mp4` file. Its folder must exist and be writable (checked here, before any
        frame is encoded). An existing file is replaced only when the writer closes successfully.
      fps: frame rate (int, float or Fraction); default 16 like FlashDreams.

    The frame size is taken from the first chunk; every later chunk must match it. Width and height
    must be even (yuv420p subsamples chroma 2x2).
    """

    def __init__(self, path: str | os.PathLike, fps=DEFAULT_FPS):
        self.path = Path(path)
        self.rate = _fps_fraction(fps)
        folder = _check_destination(self.path)
        self._av = _import_av()
        self._tmp = folder / f".{self.path.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            # Created here (O_EXCL, umask-respecting mode) so a permission problem surfaces now.
            os.close(os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as err:
            raise PermissionError(f"cannot write video to {self.path}: cannot create a file in {folder}: "
                                  f"{err.strerror or err}") from err
        self._container = None
        self._stream = None
        self._shape: tuple[int, int] | None = None
        self.frames_written = 0
        self._state = "open"

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self):
        # A writer dropped without close()/abort() must not leave its temporary file behind.
        if getattr(self, "_state", None) == "open":
            with contextlib.suppress(Exception):
                self.abort()

    # -- writing --------------------------------------------------------------------------------

    def _start(self, height: int, width: int) -> None:
        av = self._av
        self._container = av.open(str(self._tmp), mode="w", format="mp4",
                                  options={"movflags": "+faststart"})
        stream = self._container.add_stream(CODEC, rate=self.rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = PIX_FMT
        stream.codec_context.time_base = 1 / self.rate
        stream.options = {"crf": str(CRF), "preset": PRESET}
        # Frame + slice threading allowed, as the ffmpeg command line does (PyAV defaults to slices only).
        stream.codec_context.thread_type = "AUTO"
        self._stream = stream
        self._shape = (height, width)

    def append(self, chunk) -> None:
        """Encodes a uint8 chunk `[t, H, W, 3]` (a single `[H, W, 3]` frame is accepted too).

        Shape/dtype errors raise before anything is encoded and leave the writer usable; an
        encoder failure aborts the writer (temporary file removed) and re-raises.
        """
        if self._state != "open":
            raise ValueError(f"Mp4Writer for {self.path} is {self._state}; cannot append")
        frames = np.asarray(chunk)
        if frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"video frames must be [t, H, W, 3] RGB, got shape {frames.shape}")
        if frames.dtype != np.uint8:
            raise TypeError(f"video frames must be uint8, got {frames.dtype} (shape {frames.shape}); "
                            f"convert float frames with wm_jax.io.video.to_uint8(video, value_range=...)")
        height, width = frames.shape[1:3]
        if self._shape is None:
            if height % 2 or width % 2 or height == 0 or width == 0:
                raise ValueError(f"video frames of shape {frames.shape} have an odd or zero height/width "
                                 f"({height}x{width}); H.264 yuv420p needs both even")
        elif (height, width) != self._shape:
            raise ValueError(f"chunk shape {frames.shape} does not match the video's frame size "
                             f"{self._shape[0]}x{self._shape[1]}")
        if frames.shape[0] == 0:
            return
        with deferred_interrupts():  # a Ctrl-C lands after the chunk, never between a frame and its packets
            try:
                if self._container is None:
                    self._start(height, width)
                frames = np.ascontiguousarray(frames)
                for image in frames:
                    frame = self._av.VideoFrame.from_ndarray(image, format="rgb24")
                    frame.pts = self.frames_written
                    frame.time_base = 1 / self.rate
                    for packet in self._stream.encode(frame):
                        self._container.mux(packet)
                    self.frames_written += 1
            except BaseException:
                self.abort()
                raise

    def close(self) -> Path:
        """Flushes the encoder, finishes the file and renames it to `path`. Returns `path`."""
        if self._state == "closed":
            return self.path
        if self._state != "open":
            raise ValueError(f"Mp4Writer for {self.path} was aborted; nothing to close")
        if self.frames_written == 0:
            self.abort()
            raise ValueError(f"no frames were written to {self.path}; an MP4 needs at least one frame")
        with deferred_interrupts():
            try:
                for packet in self._stream.encode(None):
                    self._container.mux(packet)
                self._container.close()
                self._container = None
                os.replace(self._tmp, self.path)
            except BaseException:
                self.abort()
                raise
            self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Discards everything written so far; the destination is left untouched."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._container is not None:
            with contextlib.suppress(Exception):  # already failing; the file is discarded anyway
                self._container.close()
            self._container = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


@contextlib.contextmanager
def deferred_interrupts():
    """Holds back Ctrl-C (SIGINT) until the block has finished, then raises KeyboardInterrupt.

    For steps that must not be cut in half (a chunk's frames and their packets, the file's trailer, a
    chunk and its bookkeeping). Only where Python's default SIGINT handler is installed and this is the
    main thread; elsewhere (another thread, a custom or nested handler) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def write_mp4(path: str | os.PathLike, frames, fps=DEFAULT_FPS) -> Path:
    """Writes an H.264 MP4 (libx264, yuv420p, crf 18, preset medium, +faststart) at `fps`.

    Args:
      path: destination file; its folder must exist.
      frames: uint8 `[T, H, W, 3]` array, or an iterable of uint8 `[t, H, W, 3]` chunks (encoded as
        they arrive, e.g. a generator yielding each decoded rollout chunk).
      fps: frame rate, default 16.
    Returns:
      `path` as a Path. On any error (including one raised by the iterator) no file is left behind.
    """
    with Mp4Writer(path, fps=fps) as writer:
        if hasattr(frames, "__array__"):  # numpy / JAX array: one chunk
            writer.append(frames)
        elif isinstance(frames, Iterable):
            for chunk in frames:
                writer.append(chunk)
        else:
            raise TypeError(f"frames must be a [T, H, W, 3] uint8 array or an iterable of chunks, "
                            f"got {type(frames).__name__}")
    return writer.path
