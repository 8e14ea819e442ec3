"""A world rollout: prompt (+ image + camera) -> video, chunk by chunk, with per-step timings.

`WorldRollout` owns the compiled step programs, the KV cache, the decoder state, the I2V encoder
state and the camera stream. Each `next_chunk()` is one autoregressive step:

    conditioning (I2V latents, camera map)  ->  denoise k passes  ->  commit  ->  decode

and returns the new pixel frames (9 for the first chunk, 12 after; uint8, converted on the device)
with the milliseconds of each phase, measured with the device synchronised at the phase boundaries.

Device memory: the rollout's buffers are estimated at construction (`wm_jax.streaming.memory`) and
checked against the device before anything is allocated or compiled, again with XLA's measured
temporaries once compiled; an XLA out-of-memory error in any phase is re-raised as `DeviceMemoryError`
with that estimate and the flags that reduce it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.io.video import frames_to_uint8
from wm_jax.models import camera as cam
from wm_jax.models.embeddings import ROPE_MAX_POSITIONS
from wm_jax.models.wan import WanModel
from wm_jax.streaming import memory
from wm_jax.streaming.recipes import Recipe
from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise

VAE_STRIDE = (4, 8, 8)
SPATIAL_MULTIPLE = 16  # VAE stride 8 x DiT patch 2


def check_resolution(height: int, width: int) -> None:
    """Raises ValueError with the nearest valid sizes unless both are multiples of 16."""
    bad = [(name, v) for name, v in (("pixel_height", height), ("pixel_width", width)) if v % SPATIAL_MULTIPLE or v <= 0]
    if bad:
        hints = ", ".join(f"--{n} {v}: use {max(SPATIAL_MULTIPLE, v // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE)} or "
                          f"{(v // SPATIAL_MULTIPLE + 1) * SPATIAL_MULTIPLE}" for n, v in bad)
        raise ValueError(f"resolution must be a multiple of {SPATIAL_MULTIPLE} (VAE stride 8 x patch 2): {hints}")


def check_rope_limit(total_blocks: int, chunk_frames: int) -> None:
    frames = total_blocks * chunk_frames
    if frames > ROPE_MAX_POSITIONS:
        raise ValueError(f"--total_blocks {total_blocks} needs {frames} latent frames, past the RoPE position limit "
                         f"of {ROPE_MAX_POSITIONS} (absolute frame index <= {ROPE_MAX_POSITIONS - 1}); "
                         f"use --total_blocks {ROPE_MAX_POSITIONS // chunk_frames} or fewer")


@dataclass
class StepStats:
    """One autoregressive step. denoise_ms = all k passes (FlashDreams' diffuse); total = the sum."""

    autoregressive_index: int
    encode_ms: float
    denoise_ms: float
    commit_ms: float
    decode_ms: float
    num_frames: int

    @property
    def total_ms(self) -> float:
        return self.encode_ms + self.denoise_ms + self.commit_ms + self.decode_ms

    def to_dict(self) -> dict[str, Any]:
        return {"autoregressive_index": self.autoregressive_index, "encode_ms": self.encode_ms,
                "denoise_ms": self.denoise_ms, "commit_ms": self.commit_ms, "decode_ms": self.decode_ms,
                "total_ms_wo_finalize": self.total_ms, "num_frames": self.num_frames}


@dataclass
class Decoder:
    """A streaming decoder: `step(z_chunk [B, F, h, w, C], state) -> (frames [B, T, H, W, 3], state)`.

    value_range is the frames' range: (-1, 1) for the Wan VAE, (0, 1) for TAEHV. weights is the
    parameter pytree (for the memory estimate).
    """

    name: str
    init_state: Callable[[int, int, int], Any]  # (batch, latent_h, latent_w) -> state
    step: Callable[[jax.Array, Any], tuple[jax.Array, Any]]
    value_range: tuple[float, float]
    weights: Any


def wan_vae_decoder(vae) -> Decoder:
    from wm_jax.models import wan_vae

    return Decoder("wan_vae", lambda b, h, w: vae.init_decoder_cache(b, h, w),
                   wan_vae.jit_decode_chunk(vae, donate_cache=True), (-1.0, 1.0), nnx.state(vae))


def taehv_decoder(module) -> Decoder:
    from wm_jax.models import taehv

    graphdef, params = nnx.split(module)
    step = jax.jit(lambda p, z, state: taehv.decode_chunk(nnx.merge(graphdef, p), z, state), donate_argnums=(2,))
    return Decoder("taehv", lambda b, h, w: taehv.init_decoder_state(module, b, h, w),
                   lambda z, state: step(params, z, state), (0.0, 1.0), params)


@dataclass
class RolloutState:
    chunk_index: int = 0
    cache: Any = None
    decoder_state: Any = None
    encoder_cache: Any = None
    camera: cam.StreamingCamera | None = None
    cross_kv: Any = None
    image: jax.Array | None = None
    history: list[StepStats] = field(default_factory=list)


class WorldRollout:
    """Streams a world from a recipe and loaded components (DiT, decoder, optional I2V VAE encoder).

    Raises DeviceMemoryError at construction when the estimated buffers (`self.memory`, activations
    aside) exceed the device's memory (`memory.device_capacity()`; not checked where unknown, e.g. CPU).
    """

    def __init__(self, recipe: Recipe, dit: WanModel, decoder: Decoder, *, pixel_height: int, pixel_width: int,
                 total_blocks: int, seed: int, vae_encoder=None, noise_dtype=jnp.float32):
        check_resolution(pixel_height, pixel_width)
        check_rope_limit(total_blocks, recipe.chunk_frames)
        if recipe.task == "i2v_camera" and vae_encoder is None:
            raise ValueError(f"recipe {recipe.slug} is image-to-video: it needs the Wan VAE encoder")
        self.recipe = recipe
        self.decoder = decoder
        self.vae_encoder = vae_encoder
        self.pixel_height, self.pixel_width = pixel_height, pixel_width
        self.latent_h, self.latent_w = pixel_height // VAE_STRIDE[1], pixel_width // VAE_STRIDE[2]
        self.total_blocks = total_blocks
        self.key = jax.random.key(seed)
        self.noise_dtype = noise_dtype
        tokens_per_frame = (self.latent_h // 2) * (self.latent_w // 2)
        self.layout = recipe.cache_layout(tokens_per_frame, total_blocks * recipe.chunk_frames)
        self.step = StreamingStep(dit, recipe.step_schedule(), self.layout)
        self.chunk_shape = (1, recipe.chunk_frames, self.latent_h, self.latent_w, 16)
        self._noise = jax.jit(lambda key, chunk: chunk_noise(key, chunk, self.step.schedule.num_steps,
                                                             self.chunk_shape, noise_dtype))
        self.state = RolloutState()
        self.compile_seconds = 0.0
        self.last_latents: np.ndarray | None = None
        self._denoise = self._commit = None  # AOT executables, compiled at the first step
        self.memory = self._estimate_memory()
        self._check_fits(self.memory.known, "not enough device memory (checked before compiling)")

    # ----------------------------------------------------------------------------------------------

    def start(self, text_features: np.ndarray, *, image: np.ndarray | None = None,
              camera: cam.StreamingCamera | None = None) -> None:
        """Resets the world: prompt features [1, L, text_dim]; I2V image uint8 [H, W, 3]; camera stream."""
        if self.recipe.task == "i2v_camera":
            if image is None:
                raise ValueError(f"recipe {self.recipe.slug} needs a conditioning image (--image or --example_data)")
            if image.shape[:2] != (self.pixel_height, self.pixel_width):
                raise ValueError(f"image is {image.shape[:2]}, expected {(self.pixel_height, self.pixel_width)} "
                                 "(resize before starting)")
        with self._explain_oom("allocating the KV cache, cross-attention K/V and decoder/encoder state"):
            cache, decoder_state, encoder_cache, cross_kv = jax.block_until_ready((
                self.step.init_cache(1),
                self.decoder.init_state(1, self.latent_h, self.latent_w),
                (self.vae_encoder.init_encoder_cache(1, self.pixel_height, self.pixel_width)
                 if self.vae_encoder is not None else None),
                self.step.cross_kv(jnp.asarray(text_features))))
        self.state = RolloutState(
            cache=cache, decoder_state=decoder_state, encoder_cache=encoder_cache, camera=camera, cross_kv=cross_kv,
            image=None if image is None else jnp.asarray(image, jnp.float32)[None] / 127.5 - 1.0,
        )

    def _conditioning(self, latent_poses: np.ndarray | None) -> ChunkInputs:
        from wm_jax.models.wan_vae import i2v_condition_chunk

        s = self.state
        y = camera = None
        if self.vae_encoder is not None:
            first = s.chunk_index == 0
            y, s.encoder_cache = i2v_condition_chunk(self.vae_encoder, s.encoder_cache, self.recipe.chunk_frames,
                                                     image=s.image if first else None)
        if s.camera is not None:
            if latent_poses is None:
                raise ValueError("this rollout streams a camera: pass the chunk's latent poses")
            camera = jnp.asarray(s.camera.next_chunk(latent_poses))[None]
        return ChunkInputs(y=y, camera=camera)

    def next_chunk(self, latent_poses: np.ndarray | None = None, noise: np.ndarray | None = None, *,
                   float_frames: bool = False) -> tuple[np.ndarray, StepStats]:
        """One AR step. latent_poses: [chunk, 4, 4] c2w poses of this chunk's latent frames (camera recipes);
        noise: recorded noise [k, 1, F, h, w, 16] to replay instead of the seeded draws.

        Returns (frames [T, H, W, 3], stats). Frames are uint8, converted on the device exactly as
        `wm_jax.io.video.to_uint8(frames, decoder.value_range)` (a 4x smaller host copy); with
        float_frames, the decoder's float32 frames in its value range (parity checks).
        Raises DeviceMemoryError when a phase runs out of device memory, ValueError on NaN/inf frames.
        """
        s = self.state
        if s.cache is None:
            raise RuntimeError("call start() first")
        if s.chunk_index >= self.total_blocks:
            raise RuntimeError(f"the rollout was sized for {self.total_blocks} blocks (--total_blocks)")
        sync = jax.block_until_ready
        t0 = time.perf_counter()
        with self._explain_oom("encoding the conditioning"):
            inputs = sync(self._conditioning(latent_poses))
        t1 = time.perf_counter()
        noise = self._noise(self.key, s.chunk_index) if noise is None else jnp.asarray(noise, self.noise_dtype)
        if self._denoise is None:
            with self._explain_oom("compiling the denoise/commit programs"):
                self._compile(noise, inputs)
            t1 = time.perf_counter()
        with self._explain_oom("denoising"):
            x0 = sync(self._denoise(self.step.params, s.cache, s.cross_kv, noise, inputs))
        t2 = time.perf_counter()
        with self._explain_oom("committing the chunk to the KV cache"):
            s.cache = sync(self._commit(self.step.params, s.cache, s.cross_kv, x0, inputs))
        t3 = time.perf_counter()
        with self._explain_oom("decoding"):
            frames = self._decode(x0, float_frames)
        t4 = time.perf_counter()
        stats = StepStats(s.chunk_index, (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t4 - t3) * 1e3,
                          frames.shape[0])
        s.history.append(stats)
        s.chunk_index += 1
        self.last_latents = np.asarray(x0[0])
        return frames, stats

    def _decode(self, x0: jax.Array, float_frames: bool) -> np.ndarray:
        """Clean chunk x0 [1, F, h, w, 16] -> host frames [T, H, W, 3]: uint8, or float32 with float_frames."""
        s = self.state
        frames, s.decoder_state = self.decoder.step(x0.astype(self.step.compute_dtype), s.decoder_state)
        if float_frames:
            return np.asarray(frames, np.float32)[0]
        return frames_to_uint8(frames, self.decoder.value_range)[0]

    def _compile(self, noise: jax.Array, inputs: ChunkInputs) -> None:
        """Compiles the denoise and commit programs once, ahead of time, for this rollout's shapes.

        Every later step calls these executables: a shape that changed would be an error, never a
        silent recompile. The memory estimate takes XLA's temporaries from them and is checked again.
        """
        s = self.state
        start = time.perf_counter()
        args = (self.step.params, s.cache, s.cross_kv, noise, inputs)
        self._denoise = self.step.denoise.lower(*args).compile()
        x0_spec = jax.ShapeDtypeStruct(noise.shape[1:], jnp.float32)
        self._commit = self.step.commit.lower(self.step.params, s.cache, s.cross_kv, x0_spec, inputs).compile()
        self.compile_seconds = time.perf_counter() - start
        self.memory = self.memory.with_compiled(self._denoise, self._commit)
        self._check_fits(self.memory.total, "not enough device memory for the compiled denoise/commit programs")

    # -- device memory -------------------------------------------------------------------------------

    def _estimate_memory(self) -> memory.MemoryEstimate:
        """Bytes per part from shapes only (nothing allocated, nothing compiled); rough activations."""
        cfg, encoder = self.step.config, self.vae_encoder
        text = jax.ShapeDtypeStruct((1, 1, cfg.text_dim), jnp.float32)  # padded to text_len inside
        states = [jax.eval_shape(lambda: self.decoder.init_state(1, self.latent_h, self.latent_w))]
        if encoder is not None:
            states.append(jax.eval_shape(lambda: encoder.init_encoder_cache(1, self.pixel_height, self.pixel_width)))
        cache = jax.eval_shape(lambda: self.step.init_cache(1))
        dit_weights = memory.tree_nbytes(self.step.params)
        vae_weights = memory.tree_nbytes(self.decoder.weights, None if encoder is None else nnx.state(encoder))
        in_use = memory.device_bytes_in_use()
        return memory.MemoryEstimate(
            dit_weights=dit_weights,
            kv_cache=memory.tree_nbytes(cache.k, cache.v),
            cross_kv=memory.tree_nbytes(jax.eval_shape(self.step.cross_kv, text)),
            vae_weights=vae_weights,
            vae_state=memory.tree_nbytes(*states),
            activations=memory.rough_activation_bytes(cfg, self.recipe.chunk_frames * self.layout.tokens_per_frame),
            other=0 if in_use is None else max(0, in_use - dit_weights - vae_weights))

    def _check_fits(self, needed: int, reason: str) -> None:
        capacity = memory.device_capacity()
        if capacity is not None and needed > capacity:
            raise self._memory_error(reason, capacity)

    def _memory_error(self, reason: str, capacity: int | None, cause: str | None = None) -> memory.DeviceMemoryError:
        size = memory.RolloutSize(self.recipe.slug, self.pixel_height, self.pixel_width, self.total_blocks,
                                  self.layout, jnp.dtype(self.step.compute_dtype).name)
        return memory.memory_error(reason, self.memory, capacity, memory.reduction_flags(size, self.memory, capacity),
                                   jax.devices()[0].device_kind, cause)

    @contextlib.contextmanager
    def _explain_oom(self, phase: str):
        """Re-raises XLA's out-of-memory error inside the block as DeviceMemoryError (estimate + flags)."""
        try:
            yield
        except jax.errors.JaxRuntimeError as err:
            if not memory.is_out_of_memory(err):
                raise
            raise self._memory_error(f"out of device memory while {phase}", memory.device_capacity(),
                                     str(err).strip().splitlines()[0]) from err
