"""The rollout plan: every shape of a streaming run, derived and validated once, then passed down.

    pixels  [T_px, H, W, 3]        T_px = 1 + 4·(T − 1) for T latent frames (VAE temporal stride 4)
    latents [T, H/8, W/8, C]       C = the DiT's out_dim (16 Wan 2.1, 48 Wan 2.2 TI2V)
    chunks  T = F₀ + (total_blocks − 1) · F: chunk 0 holds F₀ frames (F₀ = F except FastVideo's causal
            Wan2.2: 1), every later chunk F; with prefix frames, chunk 0 holds given latents (the I2V image
            latent), committed without denoising; blocks count the generated chunks
    tokens  S = (H/16)·(W/16) per latent frame (patch 1x2x2); a chunk is F frames = F·S tokens
    devices S padded per frame to a multiple of the device count P; S_pad / P tokens per device;
            N heads padded to a multiple of P (N_pad); N_pad / P heads of the KV cache per device

The engine, the streaming step, the parity runners and the benchmarks take a `RolloutPlan` and read
these numbers from it; none of them recomputes a shape. Validation errors are `OptionError`s naming the
option at fault (the CLI spells them as flags).
"""

from __future__ import annotations

from dataclasses import dataclass

from absl import logging
from jax.sharding import Mesh

from wm_jax.errors import OptionError
from wm_jax.models.config import PATCH_SIZE, WanConfig
from wm_jax.models.embeddings import ROPE_MAX_POSITIONS, ROPE_POSITION_LIMIT
from wm_jax.models.wan_vae import VAE_STRIDE
from wm_jax.parallel.mesh import unpadded_device_counts
from wm_jax.parallel.sharding import ShardingRules
from wm_jax.parallel.ulysses import SequenceShards
from wm_jax.streaming.kv_cache import CacheLayout

SPATIAL_MULTIPLE = VAE_STRIDE[1] * PATCH_SIZE[1]  # video sizes are multiples of it: pixels per token side (16)


@dataclass(frozen=True)
class RolloutPlan:
    """Frozen geometry of one rollout on one mesh (see the module docstring).

    Attributes:
      pixel_height, pixel_width: video size.
      latent_height, latent_width, latent_channels: one latent frame [h, w, C] (C = DiT out_dim).
      condition_channels: channels concatenated after the noise (I2V: mask 4 + image latent 16), else 0.
      chunk_frames: latent frames per chunk (AR step; 1 = frame-wise); total_blocks: chunks in the
        rollout, given ones included.
      first_chunk_frames: latent frames of chunk 0 (= chunk_frames unless the model starts with a shorter
        block).
      prefix_frames: latent frames given up front (the I2V image latent): 0, or all of chunk 0, committed
        at t = 0 and never denoised.
      cache: the KV-cache layout (sink + ring, tokens per frame).
      mesh, rules: devices and the sharding table; shards: the Ulysses token split (static).
      batch: worlds generated together.
    """

    pixel_height: int
    pixel_width: int
    latent_height: int
    latent_width: int
    latent_channels: int
    condition_channels: int
    chunk_frames: int
    first_chunk_frames: int
    total_blocks: int
    cache: CacheLayout
    mesh: Mesh
    rules: ShardingRules
    shards: SequenceShards
    batch: int = 1
    vae_stride: tuple[int, int, int] = VAE_STRIDE
    prefix_frames: int = 0

    @classmethod
    def create(cls, model: WanConfig, mesh: Mesh, *, pixel_height: int, pixel_width: int, chunk_frames: int,
               total_blocks: int, sink_frames: int | None, ring_frames: int, rules: ShardingRules | None = None,
               batch: int = 1, vae_stride: tuple[int, int, int] = VAE_STRIDE, prefix_frames: int = 0,
               first_chunk_frames: int | None = None) -> RolloutPlan:
        """Validates the options and derives every shape.

        sink_frames None keeps every frame of the rollout (a global cache: sink = all latent frames,
        no ring); else `sink_frames` first frames plus a ring of the `ring_frames` most recent ones.
        prefix_frames: latent frames given up front (all of chunk 0), committed without denoising.
        first_chunk_frames: frames of chunk 0 (None: chunk_frames).
        """
        rules = rules or ShardingRules()
        check_resolution(pixel_height, pixel_width, vae_stride[1] * PATCH_SIZE[1])
        first_chunk_frames = chunk_frames if first_chunk_frames is None else first_chunk_frames
        if chunk_frames <= 0 or first_chunk_frames <= 0:
            raise ValueError(f"chunk_frames {chunk_frames}, first chunk {first_chunk_frames}: expected at least 1 "
                             "latent frame per chunk")
        if prefix_frames not in (0, first_chunk_frames):
            raise ValueError(f"{prefix_frames} given latent frame(s) do not fill chunk 0 ({first_chunk_frames} "
                             "frames): committed up front, they take a chunk of their own")
        prefix_chunks = 1 if prefix_frames else 0
        if total_blocks <= prefix_chunks:
            given = " (chunk 0 holds the given latents)" if prefix_chunks else ""
            raise OptionError("total_blocks", f"{{total_blocks}} {total_blocks}: expected at least "
                              f"{prefix_chunks + 1} chunk{'s' if prefix_chunks else ''}{given}")
        latent_frames = first_chunk_frames + (total_blocks - 1) * chunk_frames
        if latent_frames > ROPE_POSITION_LIMIT:
            most = (ROPE_POSITION_LIMIT - first_chunk_frames) // chunk_frames + 1
            raise OptionError("total_blocks", f"{{total_blocks}} {total_blocks} needs {latent_frames} latent frames, "
                              f"past the {ROPE_POSITION_LIMIT} RoPE positions wm_jax computes; use {{total_blocks}} "
                              f"{most} or fewer")
        if latent_frames > ROPE_MAX_POSITIONS:
            logging.warning("latent frames %d..%d lie past the %d RoPE positions the models were trained with; "
                            "their positions continue upstream's formula", ROPE_MAX_POSITIONS, latent_frames - 1,
                            ROPE_MAX_POSITIONS)
        num_devices = mesh.shape[rules.tokens] if rules.tokens else 1
        if rules.context_heads is not None and model.num_heads % num_devices:
            raise OptionError("num_devices", f"{{num_devices}} {num_devices}: head-sharded cross-attention K/V need "
                              f"a device count that divides the {model.num_heads} heads: "
                              f"{unpadded_device_counts(model.num_heads, mesh.size)}")
        latent_h, latent_w = pixel_height // vae_stride[1], pixel_width // vae_stride[2]
        tokens_per_frame = (latent_h // PATCH_SIZE[1]) * (latent_w // PATCH_SIZE[2])
        if sink_frames is None:
            sink_frames, ring_frames = latent_frames, 0
        cache = CacheLayout(tokens_per_frame, sink_frames, ring_frames, chunk_frames)
        shards = SequenceShards(rules.tokens, num_devices, tokens_per_frame, model.num_heads,
                                context_heads_sharded=rules.context_heads is not None)
        if shards.padded_heads != model.num_heads:
            logging.warning("%d devices do not divide the model's %d heads: padded to %d (%.0f %% of the attention "
                            "work is padding); device counts without padding here: %s", num_devices,
                            model.num_heads, shards.padded_heads, 100 * (1 - model.num_heads / shards.padded_heads),
                            unpadded_device_counts(model.num_heads, mesh.size))
        return cls(pixel_height, pixel_width, latent_h, latent_w, model.out_dim, model.in_dim - model.out_dim,
                   chunk_frames, first_chunk_frames, total_blocks, cache, mesh, rules, shards, batch, vae_stride,
                   prefix_frames)

    @classmethod
    def for_recipe(cls, recipe, model: WanConfig, mesh: Mesh, rules: ShardingRules | None = None) -> RolloutPlan:
        """The plan of a `Recipe` (its options already applied) for `model` on `mesh`."""
        sink_frames, ring_frames = recipe.cache_frames()
        first = recipe.first_frames
        if recipe.prefix_frames not in (0, first):
            raise ValueError(f"recipe {recipe.slug}: task {recipe.task} commits the image latent as a chunk of its "
                             f"own, which needs a 1-frame first chunk (chunk_frames 1 or first_chunk_frames 1, not "
                             f"{first})")
        if first != recipe.chunk_frames and recipe.task == "i2v_camera":
            raise ValueError(f"recipe {recipe.slug}: a first chunk of {first} frames (not {recipe.chunk_frames}) with "
                             "camera conditioning is not wired (the pose and I2V streams take whole chunks)")
        return cls.create(model, mesh, pixel_height=recipe.pixel_height, pixel_width=recipe.pixel_width,
                          chunk_frames=recipe.chunk_frames, total_blocks=recipe.total_blocks,
                          sink_frames=sink_frames, ring_frames=ring_frames, rules=rules,
                          prefix_frames=recipe.prefix_frames, first_chunk_frames=first)

    # -- derived sizes ---------------------------------------------------------------------------------

    @property
    def num_devices(self) -> int:
        return self.shards.num_shards

    @property
    def latent_frames(self) -> int:
        return self.first_chunk_frames + (self.total_blocks - 1) * self.chunk_frames

    def frames_of(self, chunk_index: int) -> int:
        """Latent frames of chunk `chunk_index`."""
        return self.first_chunk_frames if chunk_index == 0 else self.chunk_frames

    def first_frame_of(self, chunk_index: int) -> int:
        """Absolute latent index of the chunk's first frame."""
        return 0 if chunk_index == 0 else self.first_chunk_frames + (chunk_index - 1) * self.chunk_frames

    @property
    def distinct_chunks(self) -> tuple[int, ...]:
        """One chunk index per distinct chunk length (chunk 0, then chunk 1 where it is longer): the chunks whose
        shapes the compiled programs take."""
        return (0,) if self.total_blocks == 1 or self.first_chunk_frames == self.chunk_frames else (0, 1)

    @property
    def prefix_chunks(self) -> int:
        """Chunks that hold given latents (committed, never denoised) before the first generated block."""
        return 1 if self.prefix_frames else 0

    def block_index(self, chunk_index: int) -> int:
        """The generated block of a chunk (its index among the denoised chunks); negative for a given one."""
        return chunk_index - self.prefix_chunks

    @property
    def pixel_frames(self) -> int:
        """Video frames of the whole rollout: 1 + 4·(T − 1)."""
        return 1 + self.vae_stride[0] * (self.latent_frames - 1)

    def chunk_pixel_frames(self, chunk_index: int) -> int:
        """Video frames a chunk decodes to: 1 + 4·(F₀ − 1) for the first chunk, 4·F after."""
        frames = self.vae_stride[0] * self.frames_of(chunk_index)
        return frames - (self.vae_stride[0] - 1 if chunk_index == 0 else 0)

    @property
    def tokens_per_frame(self) -> int:
        return self.cache.tokens_per_frame

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame

    @property
    def chunk_tokens_per_device(self) -> int:
        """Tokens each device carries outside self-attention (padding included)."""
        return self.chunk_frames * self.shards.tokens_per_shard

    @property
    def attention_tokens_per_device(self) -> int:
        """Queries of each device's self-attention, inside the Ulysses exchange: every token of the chunk
        (padding included) for that device's share of the heads."""
        return self.chunk_frames * self.shards.padded_tokens_per_frame

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        """Noise / clean latents of one (steady, chunk >= 1) chunk: [B, F, h, w, C]."""
        return self.chunk_shape_of(1)

    def chunk_shape_of(self, chunk_index: int) -> tuple[int, int, int, int, int]:
        """Noise / clean latents of chunk `chunk_index`: [B, F(chunk), h, w, C]."""
        return (self.batch, self.frames_of(chunk_index), self.latent_height, self.latent_width,
                self.latent_channels)

    @property
    def condition_shape(self) -> tuple[int, int, int, int, int]:
        """I2V conditioning of one chunk: [B, F, h, w, condition_channels]."""
        return (self.batch, self.chunk_frames, self.latent_height, self.latent_width, self.condition_channels)

    def describe(self) -> dict:
        """The plan as plain data (for stats files and benchmark JSON)."""
        return {"pixel": [self.pixel_height, self.pixel_width], "latent": [self.latent_height, self.latent_width,
                                                                          self.latent_channels],
                "chunk_frames": self.chunk_frames, "first_chunk_frames": self.first_chunk_frames,
                "total_blocks": self.total_blocks,
                "prefix_frames": self.prefix_frames,
                "tokens_per_frame": self.tokens_per_frame, "chunk_tokens": self.chunk_tokens,
                "num_devices": self.num_devices, "padded_tokens_per_frame": self.shards.padded_tokens_per_frame,
                "padded_heads": self.shards.padded_heads, "heads_per_device": self.shards.heads_per_shard,
                "chunk_tokens_per_device": self.chunk_tokens_per_device,
                "cache": {"sink_frames": self.cache.sink_frames, "ring_frames": self.cache.ring_frames,
                          "buffer_tokens": self.cache.buffer_tokens}}


def aspect_resolution(image_height: int, image_width: int, max_area: int) -> tuple[int, int]:
    """(pixel height, pixel width) of the video for an input image of this size, by upstream's image-to-video
    arithmetic, float64 rounding included: latent side = sqrt(max_area · aspect) // VAE stride // patch ·
    patch (aspect = height / width; 1 / aspect for the width), video side = latent side · stride. At
    480·832 pixels: a 720x1280 (16:9) image gives 464x832, a square one 624x624, and a 480x832 image also
    464x832 (sqrt(480·832 · 480/832) evaluates to 479.99999999999994). Raises OptionError (naming the
    image) when a side would hold no token."""
    import numpy as np

    aspect = image_height / image_width
    sides = tuple(int(round(np.sqrt(max_area * a) // stride // patch * patch)) * stride
                  for a, stride, patch in ((aspect, VAE_STRIDE[1], PATCH_SIZE[1]),
                                           (1 / aspect, VAE_STRIDE[2], PATCH_SIZE[2])))
    if min(sides) <= 0:
        side = VAE_STRIDE[1] * PATCH_SIZE[1]  # one token
        other = max(side, max_area // side // side * side)
        nearest = (side, other) if sides[0] <= 0 else (other, side)
        raise OptionError("image", f"{{image}} is {image_height}x{image_width}: at {max_area} pixels that aspect "
                                   f"gives a {sides[0]}x{sides[1]} video, no whole token on one side; the nearest "
                                   f"valid size is {nearest[0]}x{nearest[1]}: set {{pixel_height}} {nearest[0]} and "
                                   f"{{pixel_width}} {nearest[1]}, or use an image nearer 480x832")
    return sides


def check_resolution(height: int, width: int, multiple: int = SPATIAL_MULTIPLE) -> None:
    """Raises OptionError with the nearest valid sizes unless both are positive multiples of `multiple`
    (VAE stride x patch: the pixels of one token side)."""
    for name, value in (("pixel_height", height), ("pixel_width", width)):
        if value <= 0 or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            upper = max(multiple, (value // multiple + 1) * multiple)
            sizes = f"{lower}" if lower == upper else f"{lower} or {upper}"
            raise OptionError(name, f"{{{name}}} {value}: the video size must be a positive multiple of {multiple} "
                              f"(VAE stride {multiple // PATCH_SIZE[1]} x patch {PATCH_SIZE[1]}); use {sizes}")
