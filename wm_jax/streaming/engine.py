"""A world rollout: prompt (+ image + camera) -> video, chunk by chunk, with per-step timings.

`WorldRollout` owns the compiled step programs, the KV cache, the decoder state, the I2V encoder
state and the camera stream. Each `next_chunk()` is one autoregressive step:

    conditioning (I2V latents, camera map)  ->  denoise k passes  ->  commit  ->  decode

and returns the new pixel frames (1 + 4(F − 1) for the first chunk of F latent frames, 4F after; uint8,
converted on the device) with the milliseconds of each phase, measured with the device synchronised at
the phase boundaries. Generated block b runs the recipe's schedule for b (`BlockSchedules`: one compiled
denoise program per distinct pass count and chunk length; chunk 0 may be shorter than the others, as in
FastVideo's causal Wan2.2). With task "i2v_first_latent" the first chunk is the start image's VAE latent
instead: encoded, committed at t = 0 and decoded, never denoised. The DiT may be an `ExpertPair`: the step
then runs each expert's passes and commits both caches.

Device memory: the rollout's buffers are estimated at construction (`wm_jax.streaming.memory`) and
checked against the device before anything is allocated or compiled, again with XLA's measured
temporaries once compiled; an XLA out-of-memory error in any phase is re-raised as `DeviceMemoryError`
with that estimate and the flags that reduce it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wm_jax.errors import OptionError
from wm_jax.io.video import frames_to_uint8
from wm_jax.models import camera as cam
from wm_jax.models.wan import ExpertPair, WanModel
from wm_jax.parallel.mesh import local_replica, to_host
from wm_jax.streaming import memory
from wm_jax.streaming.decoders import Decoder
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.recipes import Recipe
from wm_jax.streaming.schedules import StepSchedule
from wm_jax.streaming.step import ChunkInputs, StreamingStep, chunk_noise


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


@dataclass(frozen=True)
class DenoisePrograms:
    """A rollout's compiled denoise programs, one per (pass count, chunk frames), each with its (placed)
    schedule; called as one program `(params, cache, cross_kv, noise, inputs) -> x0`, it runs the one of
    noise's [passes, B, frames, ...] shape."""

    programs: dict[tuple[int, int], tuple[Any, StepSchedule]]

    def __call__(self, params, cache, cross_kv, noise: jax.Array, inputs: ChunkInputs) -> jax.Array:
        executable, schedule = self.programs[noise.shape[0], noise.shape[2]]
        return executable(params, cache, cross_kv, noise, inputs, schedule)

    @property
    def executables(self) -> list[Any]:
        return [executable for executable, _ in self.programs.values()]


@dataclass(frozen=True)
class CommitPrograms:
    """A rollout's compiled commit programs, one per chunk length; called as one program, it runs x0's."""

    programs: dict[int, Any]

    def __call__(self, params, cache, cross_kv, x0: jax.Array, inputs: ChunkInputs):
        return self.programs[x0.shape[1]](params, cache, cross_kv, x0, inputs)

    @property
    def executables(self) -> list[Any]:
        return list(self.programs.values())


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
    """Streams a world from a recipe, its rollout plan and loaded components (DiT, decoder, optional
    I2V VAE encoder), on the plan's mesh.

    Raises DeviceMemoryError at construction when the estimated buffers per device (`self.memory`,
    activations aside) exceed a device's memory (`memory.device_capacity()`; not checked where unknown,
    e.g. CPU).
    """

    def __init__(self, recipe: Recipe, plan: RolloutPlan, dit: WanModel | ExpertPair, decoder: Decoder, *, seed: int,
                 vae_encoder=None, noise_dtype=jnp.float32):
        if recipe.encodes_image and vae_encoder is None:
            raise ValueError(f"recipe {recipe.slug} is image-to-video: it needs the Wan VAE encoder")
        if recipe.prefix_frames != plan.prefix_frames:
            raise ValueError(f"recipe {recipe.slug} commits {recipe.prefix_frames} given latent frame(s); the plan "
                             f"was made for {plan.prefix_frames}")
        self.recipe = recipe
        self.plan = plan
        self.decoder = decoder
        self.vae_encoder = vae_encoder
        self.noise_dtype = noise_dtype
        self.schedules = recipe.block_schedules()
        self.step = StreamingStep(dit, self.schedules.rest, plan)
        self._noise = jax.jit(lambda chunk, passes, shape: chunk_noise(jax.random.key(seed), chunk, passes, shape,
                                                                       noise_dtype),
                              static_argnums=(1, 2), out_shardings=self.step.replicated)
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
        plan = self.plan
        if self.recipe.encodes_image:
            if image is None:
                raise OptionError("image", f"recipe {self.recipe.slug} needs a conditioning image ({{image}} or "
                                  "{example_data})")
            if image.shape[:2] != (plan.pixel_height, plan.pixel_width):
                raise ValueError(f"image is {image.shape[:2]}, expected {(plan.pixel_height, plan.pixel_width)} "
                                 "(resize before starting)")
        whole = self.step.whole
        with self._explain_oom("allocating the KV cache, cross-attention K/V and decoder/encoder state"):
            cache, decoder_state, encoder_cache, cross_kv = jax.block_until_ready((
                self.step.init_cache(),
                whole(self.decoder.init_state(plan.batch, plan.latent_height, plan.latent_width)),
                (whole(self.vae_encoder.init_encoder_cache(plan.batch, plan.pixel_height, plan.pixel_width))
                 if self.recipe.task == "i2v_camera" else None),
                self.step.cross_kv(text_features)))
        self.state = RolloutState(
            cache=cache, decoder_state=decoder_state, encoder_cache=encoder_cache, camera=camera, cross_kv=cross_kv,
            image=None if image is None else whole(np.asarray(image, np.float32)[None] / 127.5 - 1.0),
        )

    def _conditioning(self, latent_poses: np.ndarray | None) -> ChunkInputs:
        from wm_jax.models.wan_vae import i2v_condition_chunk

        s = self.state
        y = camera = None
        if self.recipe.task == "i2v_camera":
            first = s.chunk_index == 0
            y, s.encoder_cache = i2v_condition_chunk(self.vae_encoder, s.encoder_cache, self.plan.chunk_frames,
                                                     image=s.image if first else None)
        if s.camera is not None:
            if latent_poses is None:
                raise ValueError("this rollout streams a camera: pass the chunk's latent poses")
            camera = self.step.whole(s.camera.next_chunk(latent_poses)[None])
        return ChunkInputs(y=y, camera=camera)

    def _given_latents(self) -> jax.Array:
        """The latents of a given chunk: the start image through the VAE encoder, [B, 1, h, w, C] float32."""
        latents = self.vae_encoder.encode(self.state.image[:, None])
        if latents.shape != self.plan.chunk_shape_of(0):
            raise ValueError(f"the image encodes to latents {latents.shape}; the plan's chunk 0 is "
                             f"{self.plan.chunk_shape_of(0)}")
        return self.step.whole(latents.astype(jnp.float32))

    def next_chunk(self, latent_poses: np.ndarray | None = None, noise: np.ndarray | None = None, *,
                   float_frames: bool = False) -> tuple[np.ndarray, StepStats]:
        """One AR step. latent_poses: [chunk, 4, 4] c2w poses of this chunk's latent frames (camera recipes);
        noise: recorded noise [k, 1, F, h, w, 16] to replay instead of the seeded draws (k = the passes of
        this block's schedule, F = this chunk's frames; unused for a given chunk, the I2V image latent).

        Returns (frames [T, H, W, 3], stats). Frames are uint8, converted on the device exactly as
        `wm_jax.io.video.to_uint8(frames, decoder.value_range)` (a 4x smaller host copy); with
        float_frames, the decoder's float32 frames in its value range (parity checks).
        Raises DeviceMemoryError when a phase runs out of device memory, ValueError on NaN/inf frames.
        """
        s = self.state
        if s.cache is None:
            raise RuntimeError("call start() first")
        if s.chunk_index >= self.plan.total_blocks:
            raise RuntimeError(f"the rollout was planned for {self.plan.total_blocks} chunks (total_blocks)")
        sync = jax.block_until_ready
        block = self.plan.block_index(s.chunk_index)
        t0 = time.perf_counter()
        with self._explain_oom("encoding the conditioning"):
            inputs = sync(self._conditioning(latent_poses))
            given = sync(self._given_latents()) if block < 0 else None
        t1 = time.perf_counter()
        if given is None:
            passes = self.schedules.for_block(block).num_steps
            shape = self.plan.chunk_shape_of(s.chunk_index)
            if noise is not None and np.shape(noise) != (passes, *shape):
                raise ValueError(f"recorded noise is {np.shape(noise)}; block {block} runs {passes} passes on a chunk "
                                 f"{shape}")
            noise = (self._noise(self.step.whole(np.int32(s.chunk_index)), passes, shape) if noise is None
                     else self.step.whole(np.asarray(noise, self.noise_dtype)))
        if self._denoise is None:
            with self._explain_oom("compiling the denoise/commit programs"):
                self._compile(inputs)
            t1 = time.perf_counter()
        if given is not None:
            x0 = given
        else:
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
        self.last_latents = to_host(x0)[0]
        return frames, stats

    def _decode(self, x0: jax.Array, float_frames: bool) -> np.ndarray:
        """Clean chunk x0 [1, F, h, w, 16] -> host frames [T, H, W, 3]: uint8, or float32 with float_frames."""
        s = self.state
        frames, s.decoder_state = self.decoder.step(x0.astype(self.step.compute_dtype), s.decoder_state)
        if float_frames:
            return to_host(frames).astype(np.float32)[0]
        return frames_to_uint8(local_replica(frames), self.decoder.value_range)[0]

    def _compile(self, inputs: ChunkInputs) -> None:
        """Compiles, ahead of time for this rollout's shapes, one denoise program per (pass count, chunk length)
        that a generated block runs (the schedule is an input of the program, placed once here) and one commit
        program per chunk length. `inputs`: chunk 0's conditioning, whose leaves are
        [B, F, ...]; every other shape comes from the plan.

        Every later step calls these executables: a shape that changed would be an error, never a
        silent recompile. The memory estimate takes XLA's temporaries from them and is checked again.
        """
        s, step, plan = self.state, self.step, self.plan
        start = time.perf_counter()
        spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=step.replicated)
        with_frames = lambda frames: jax.tree.map(
            lambda a: spec((a.shape[0], frames, *a.shape[2:]), a.dtype), inputs)
        # generated blocks 0 and 1 cover every (schedule, chunk length) pair: later blocks repeat block 1's
        needed = {}
        for chunk in range(plan.prefix_chunks, min(plan.total_blocks, plan.prefix_chunks + 2)):
            schedule = self.schedules.for_block(plan.block_index(chunk))
            needed[schedule.num_steps, plan.frames_of(chunk)] = schedule, chunk
        denoise, commit = {}, {}
        for (passes, frames), (schedule, chunk) in needed.items():
            placed = step.whole(schedule)
            shape = plan.chunk_shape_of(chunk)
            self._noise(step.whole(np.int32(0)), passes, shape)  # compiles this shape's draws
            denoise[passes, frames] = (step.denoise.lower(
                step.params, s.cache, s.cross_kv, spec((passes, *shape), self.noise_dtype), with_frames(frames),
                placed).compile(), placed)
        for chunk in plan.distinct_chunks:
            frames = plan.frames_of(chunk)
            x0_spec = spec(plan.chunk_shape_of(chunk), jnp.float32)
            commit[frames] = step.commit.lower(step.params, s.cache, s.cross_kv, x0_spec, with_frames(frames)).compile()
        self._denoise, self._commit = DenoisePrograms(denoise), CommitPrograms(commit)
        self.compile_seconds = time.perf_counter() - start
        self.memory = self.memory.with_compiled(*self._denoise.executables, *self._commit.executables)
        self._check_fits(self.memory.total, "not enough device memory for the compiled denoise/commit programs")

    # -- device memory -------------------------------------------------------------------------------

    def _estimate_memory(self) -> memory.MemoryEstimate:
        """Bytes per part on one device from shapes only (nothing allocated, nothing compiled); rough
        activations. The KV cache is split over the devices by heads; everything else is whole."""
        plan, cfg, encoder = self.plan, self.step.config, self.vae_encoder
        text = jax.ShapeDtypeStruct((1, 1, cfg.text_dim), jnp.float32)  # padded to text_len inside
        states = [jax.eval_shape(lambda: self.decoder.init_state(plan.batch, plan.latent_height, plan.latent_width))]
        if self.recipe.task == "i2v_camera":  # the streaming encoder's state (a first latent is encoded at once)
            states.append(jax.eval_shape(lambda: encoder.init_encoder_cache(plan.batch, plan.pixel_height,
                                                                            plan.pixel_width)))
        cache = jax.eval_shape(self.step.init_cache)
        dit_weights = memory.tree_nbytes(self.step.params)
        vae_weights = memory.tree_nbytes(self.decoder.weights, None if encoder is None else nnx.state(encoder))
        in_use = memory.device_bytes_in_use()
        cross_kv = memory.tree_nbytes(jax.eval_shape(self.step._compute_cross_kv, self.step.params, text, None))
        return memory.MemoryEstimate(
            dit_weights=dit_weights,
            kv_cache=sum(memory.tree_nbytes(c.k, c.v) for c in self.step.per_expert(cache)) // plan.num_devices,
            cross_kv=cross_kv // (plan.num_devices if plan.shards.context_heads_sharded else 1),
            vae_weights=vae_weights,
            vae_state=memory.tree_nbytes(*states),
            activations=memory.rough_activation_bytes(cfg, plan.chunk_tokens_per_device),
            other=0 if in_use is None else max(0, in_use - dit_weights - vae_weights))

    def _check_fits(self, needed: int, reason: str) -> None:
        capacity = memory.device_capacity()
        if capacity is not None and needed > capacity:
            raise self._memory_error(reason, capacity)

    def _memory_error(self, reason: str, capacity: int | None, cause: str | None = None) -> memory.DeviceMemoryError:
        plan = self.plan
        size = memory.RolloutSize(self.recipe.slug, plan.pixel_height, plan.pixel_width, plan.total_blocks,
                                  plan.cache, jnp.dtype(self.step.compute_dtype).name)
        return memory.memory_error(reason, self.memory, capacity, memory.reduction_flags(size, self.memory, capacity),
                                   jax.local_devices()[0].device_kind, cause)

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
