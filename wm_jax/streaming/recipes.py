"""Recipes: everything a `wm-jax run <slug>` needs besides user flags, as plain data.

Each recipe lives in its own plain-Python file under `configs/` with a `get_config() -> Recipe`;
`SLUGS` maps the command-line slug (FlashDreams' names where they exist) to that module.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

from wm_jax.streaming.schedules import (BlockSchedules, StepSchedule, boundary_schedule, lingbot_fast_schedule,
                                        self_forcing_schedule)

SLUGS = {
    "tiny": "configs.tiny",
    "self-forcing-wan2.1-t2v-1.3b": "configs.self_forcing_wan21_t2v_1_3b",
    "self-forcing-wan2.1-t2v-1.3b-taehv": "configs.self_forcing_wan21_t2v_1_3b_taehv",
    "lingbot-world-fast": "configs.lingbot_world_fast",
    "lingbot-world-fast-taehv-window15-sink3": "configs.lingbot_world_fast_taehv_window15_sink3",
    "lingbot-world-v2-fast": "configs.lingbot_world_v2_fast",
    "causal-forcing-wan2.1-t2v-1.3b-chunkwise": "configs.causal_forcing_wan21_t2v_1_3b_chunkwise",
    "causal-forcing-wan2.1-t2v-1.3b-framewise": "configs.causal_forcing_wan21_t2v_1_3b_framewise",
    "causal-forcing-wan2.1-t2v-1.3b-framewise-2step": "configs.causal_forcing_wan21_t2v_1_3b_framewise_2step",
    "causal-forcing-wan2.1-t2v-1.3b-framewise-1step": "configs.causal_forcing_wan21_t2v_1_3b_framewise_1step",
    "causal-forcing-wan2.1-i2v-1.3b-framewise": "configs.causal_forcing_wan21_i2v_1_3b_framewise",
    "causvid-wan2.1-t2v-1.3b": "configs.causvid_wan21_t2v_1_3b",
    "causvid-wan2.1-t2v-1.3b-warp-4step": "configs.causvid_wan21_t2v_1_3b_warp_4step",
    "causal-wan2.2-t2v-a14b": "configs.causal_wan22_t2v_a14b",
    "causal-wan2.2-i2v-a14b": "configs.causal_wan22_i2v_a14b",
}


@dataclass(frozen=True)
class HubFiles:
    """Where a component's weights come from: a Hugging Face repo and the files to fetch."""

    repo: str
    allow_patterns: tuple[str, ...]
    path: str = ""  # inside the snapshot: the file or folder to convert
    allow_pickle: bool = False  # the upstream file is a torch pickle (needs --allow_pickle)


@dataclass(frozen=True)
class Recipe:
    """A streaming world-model configuration.

    Attributes:
      slug: command-line name.
      model: WanConfig preset name (`wm_jax.models.config.PRESETS`), or a dict of WanConfig fields.
      task: "t2v" (text only), "i2v_camera" (LingBot: image + camera trajectory, the image latent in
        every chunk's conditioning channels) or "i2v_first_latent" (Causal-Forcing, causal Wan2.2: a T2V
        network; the image's latent is committed at t = 0 as latent frame 0, output as the first frame, and
        generation continues from frame 1; needs a 1-frame first chunk).
      schedule: "self_forcing" or "lingbot_fast"; `shift` and `steps` (Self-Forcing step list) or
        `step_indices` (LingBot table indices) parameterise it. `warp` False feeds Self-Forcing steps
        to the network unwarped (CausVid's 3-step model).
      first_block_steps: the first generated block's own list, in the same terms as `steps` /
        `step_indices` (Causal-Forcing++: 4 steps on block 0, then the short list); None = the same.
      chunk_frames: latent frames per AR step (3 chunk-wise, 1 frame-wise).
      first_chunk_frames: latent frames of the first AR step when it differs (causal Wan2.2: 1); None = chunk_frames.
      boundary: two-expert models (causal Wan2.2): passes at t >= boundary·1000 run the high-noise expert,
        with FastVideo's boundary rule (`wm_jax.streaming.schedules.boundary_schedule`); None = one network.
      sink_frames / window_frames: KV cache in FlashDreams' terms: `window_frames` recent latent
        frames INCLUDING the current chunk, plus `sink_frames` never evicted; window None = keep
        every frame of the rollout.
      decoder: "wan_vae" or "taehv".
      pixel_height / pixel_width / total_blocks / fps / seed / prompt: run defaults (flags override).
      max_area: with an input image and no pixel size given, the video size follows the image's aspect at
        this many pixels (upstream's rule, `wm_jax.streaming.plan.aspect_resolution`); None = always
        pixel_height x pixel_width (the image is resized to it).
      world_scale: fixed camera translation scale for streaming (FlashDreams' interactive default).
      weights: component -> HubFiles for real checkpoints; empty for random-weight recipes.
      random_weights: build every component with seeded random weights (no checkpoint at all).
      shipped_weights: name of a trained world shipped inside the package (`wm_jax/assets/<name>/`,
        see `wm_jax.io.shipped`); used when no checkpoint folder is given.
      attention: attention backend (`wm_jax.kernels.ATTENTION_IMPLEMENTATIONS`); "auto" = the fastest
        measured on the running GPU kind, XLA on the CPU. The `attention` run option overrides it.
    """

    slug: str
    model: str | dict
    task: str
    schedule: str
    shift: float
    decoder: str
    pixel_height: int
    pixel_width: int
    total_blocks: int
    steps: tuple[float, ...] = (1000, 750, 500, 250)
    step_indices: tuple[int, ...] = (0, 179, 358, 679)
    warp: bool = True
    first_block_steps: tuple[float, ...] | None = None
    chunk_frames: int = 3
    first_chunk_frames: int | None = None
    boundary: float | None = None
    sink_frames: int = 0
    window_frames: int | None = None
    fps: int = 16
    seed: int = 42
    prompt: str = ""
    world_scale: float = 1.2712
    weights: dict[str, HubFiles] = field(default_factory=dict)
    random_weights: bool = False
    shipped_weights: str = ""
    attention: str = "auto"
    max_area: int | None = None
    decoder_config: dict = field(default_factory=dict)
    vae_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.boundary is not None and (self.schedule != "self_forcing" or not self.warp):
            raise ValueError(f"recipe {self.slug}: two experts (boundary {self.boundary}) run FastVideo's warped "
                             f"Self-Forcing schedule, not schedule {self.schedule!r} with warp {self.warp}")

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    @property
    def first_frames(self) -> int:
        """Latent frames of the first AR step."""
        return self.first_chunk_frames or self.chunk_frames

    def step_schedule(self, steps=None) -> StepSchedule:
        """The schedule of `steps` (default: the recipe's list, which every block after the first runs)."""
        if self.boundary is not None:  # a Self-Forcing schedule (__post_init__)
            return boundary_schedule(self.shift, self.steps if steps is None else steps, self.boundary)
        if self.schedule == "self_forcing":
            return self_forcing_schedule(self.shift, self.steps if steps is None else steps, warp=self.warp)
        if self.schedule == "lingbot_fast":
            return lingbot_fast_schedule(self.shift, self.step_indices if steps is None else steps)
        raise ValueError(f"recipe {self.slug}: unknown schedule {self.schedule!r}")

    def block_schedules(self) -> BlockSchedules:
        """The schedule of every generated block (`first_block_steps` on block 0, if set)."""
        first = None if self.first_block_steps is None else self.step_schedule(self.first_block_steps)
        return BlockSchedules(rest=self.step_schedule(), first=first)

    @property
    def encodes_image(self) -> bool:
        """The run starts from an image through the Wan VAE encoder (either I2V task)."""
        return self.task in ("i2v_camera", "i2v_first_latent")

    @property
    def prefix_frames(self) -> int:
        """Latent frames committed up front without denoising: the image latent of "i2v_first_latent"."""
        return 1 if self.task == "i2v_first_latent" else 0

    def cache_frames(self) -> tuple[int | None, int]:
        """(sink frames, ring frames) of the KV cache in `CacheLayout` terms; sink None = keep every frame.

        FlashDreams' window counts the current chunk, which the cache never stores."""
        if self.window_frames is None:
            return None, 0
        ring = self.window_frames - self.chunk_frames
        if ring < 0:
            raise ValueError(f"recipe {self.slug}: window {self.window_frames} is smaller than a chunk")
        return self.sink_frames, ring


def load_recipe(slug: str) -> Recipe:
    if slug not in SLUGS:
        raise ValueError(f"unknown recipe {slug!r}; known: {', '.join(SLUGS)}")
    recipe = importlib.import_module(SLUGS[slug]).get_config()
    if recipe.slug != slug:
        raise AssertionError(f"{SLUGS[slug]} defines slug {recipe.slug!r}, registered as {slug!r}")
    return recipe
