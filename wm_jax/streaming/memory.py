"""Device memory of a rollout: an estimate per part, the device's capacity, and the out-of-memory error.

Parts of `MemoryEstimate` (bytes, batch 1):

    dit_weights     the DiT parameter leaves
    kv_cache        2 (K, V) · layers · buffer_tokens · heads · head_dim · itemsize
                    (compute dtype); global caches (ring_frames 0) grow with the rollout's length
    cross_kv        the prompt's cross-attention K/V (text_len tokens per layer)
    vae_weights     decoder + I2V encoder parameters (a module shared by both counted once)
    vae_state       the decoder's and encoder's streaming caches
    activations     XLA's temporaries of the compiled denoise / commit (the larger one; they run one
                    after the other), or before compiling a rough guess: one chunk's hidden states
                    through one block in float32 (q, k, v, output, FFN hidden). Decoder temporaries
                    are not counted.
    other           buffers already on the device besides those weights (e.g. `wm-jax run`'s text
                    encoder): `memory_stats()['bytes_in_use']` minus the weights, when the rollout is built

`WorldRollout` checks the parts it knows before compiling (everything but the activations) against
`device_capacity()`, again with the measured activations after compiling, and turns an XLA
RESOURCE_EXHAUSTED error into `DeviceMemoryError`, whose message lists the parts and the `wm-jax run`
flags that shrink them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from wm_jax.errors import TemplatedError
from wm_jax.models.config import WanConfig
from wm_jax.streaming.kv_cache import CacheLayout
from wm_jax.streaming.plan import SPATIAL_MULTIPLE

GIB = 2**30
MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"  # JAX's share of GPU memory (default 0.75)
WINDOW_RECIPES = {"lingbot-world-fast": "lingbot-world-fast-taehv-window15-sink3"}  # global cache -> sink+window
PART_LABELS = {"dit_weights": "DiT weights", "kv_cache": "KV cache", "cross_kv": "cross-attention K/V",
               "vae_weights": "decoder/encoder weights", "vae_state": "decoder/encoder state",
               "activations": "activations", "other": "other device buffers"}


class DeviceMemoryError(TemplatedError, RuntimeError):
    """The rollout does not fit in device memory; the message gives the parts and the options that shrink them
    (as `{name}` placeholders, see wm_jax.errors)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of a rollout on one device (see the module docstring)."""

    dit_weights: int
    kv_cache: int
    cross_kv: int
    vae_weights: int
    vae_state: int
    activations: int
    other: int = 0
    activations_measured: bool = False  # True once taken from the compiled programs

    @property
    def known(self) -> int:
        """Everything but the activations: the buffers that exist before the first step runs."""
        return self.total - self.activations

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in PART_LABELS)

    @property
    def pixel_bytes(self) -> int:
        """The parts that scale with the pixel count (cache, decoder state, activations)."""
        return self.kv_cache + self.vae_state + self.activations

    @property
    def fixed_bytes(self) -> int:
        """The parts no run flag changes (weights, cross-attention K/V, other buffers)."""
        return self.total - self.pixel_bytes

    def describe(self) -> str:
        """One line per part and the total, in GiB."""
        how = "measured by XLA for the compiled denoise/commit" if self.activations_measured else \
            "rough, before compiling: one chunk through one block"
        notes = {"activations": how, "other": "already in use on the device, e.g. the text encoder"}
        lines = [f"  {label:<25}{getattr(self, name) / GIB:9.2f} GiB" + (f"  ({notes[name]})" if name in notes else "")
                 for name, label in PART_LABELS.items() if name != "other" or self.other]
        return "\n".join([*lines, f"  {'total':<25}{self.total / GIB:9.2f} GiB"])

    def with_compiled(self, *executables) -> MemoryEstimate:
        """The activations replaced by the largest `temp_size_in_bytes` of the compiled executables
        (unchanged where the backend reports no memory analysis)."""
        temps = [t for t in map(compiled_temp_bytes, executables) if t is not None]
        if not temps:
            return self
        return dataclasses.replace(self, activations=max(temps), activations_measured=True)


def tree_nbytes(*trees) -> int:
    """Bytes of the array leaves of `trees` (arrays or ShapeDtypeStructs); a leaf shared between trees
    (the same array object) is counted once."""
    leaves = {id(x): x for tree in trees for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves.values())


def rough_activation_bytes(config: WanConfig, tokens: int) -> int:
    """Hidden states of `tokens` tokens through one block in float32: q, k, v, output (dim) + FFN hidden."""
    return tokens * (4 * config.dim + config.ffn_dim) * 4


def compiled_temp_bytes(executable) -> int | None:
    """`temp_size_in_bytes` of a compiled executable's memory analysis, None where the backend has none."""
    try:
        analysis = executable.memory_analysis()
    except (AttributeError, NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    return getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None


def device_capacity(device=None) -> int | None:
    """Bytes a JAX device can allocate (`memory_stats()['bytes_limit']`); None where unknown (CPU)."""
    stats = (device or jax.local_devices()[0]).memory_stats()
    return stats.get("bytes_limit") if stats else None


def device_bytes_in_use(device=None) -> int | None:
    """Bytes allocated on a JAX device now (`memory_stats()['bytes_in_use']`); None where unknown (CPU)."""
    stats = (device or jax.local_devices()[0]).memory_stats()
    return stats.get("bytes_in_use") if stats else None


def is_out_of_memory(err: BaseException) -> bool:
    """True for XLA's allocation failures (RESOURCE_EXHAUSTED / "Out of memory")."""
    text = str(err)
    return isinstance(err, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text or
                                                           "out of memory" in text.lower())


@dataclass(frozen=True)
class RolloutSize:
    """The `wm-jax run` settings that size a rollout's memory (what the hints talk about)."""

    slug: str
    pixel_height: int
    pixel_width: int
    total_blocks: int
    layout: CacheLayout
    compute_dtype: str


def reduction_flags(size: RolloutSize, estimate: MemoryEstimate, capacity: int | None) -> list[str]:
    """The `wm-jax run` flags (and recipes) that shrink this rollout, with values where they can be computed;
    on a GPU with JAX's default memory share, the environment variable that raises it."""
    share = [] if capacity is None or MEM_FRACTION_VAR in os.environ else [
        f"{MEM_FRACTION_VAR}=0.95 in the environment (JAX takes 75% of the GPU's memory by default: "
        f"{capacity / GIB:.2f} GiB here)"]
    if capacity is not None and estimate.fixed_bytes >= capacity:
        return [*share, f"no flag: the weights, cross-attention K/V and other buffers alone take "
                f"{estimate.fixed_bytes / GIB:.2f} GiB; this model needs a device with more memory"]
    flags = [*share, _pixel_flag(size, estimate, capacity)]
    if size.layout.ring_frames == 0:
        flags.append(_blocks_flag(size, estimate, capacity))
        if size.slug in WINDOW_RECIPES:
            window = WINDOW_RECIPES[size.slug]
            flags.append(f"wm-jax run {window} (sink+window cache: its size stays fixed however long the rollout)")
    if size.compute_dtype == "float32":
        flags.append("{compute_dtype} bfloat16 (now float32: halves the KV cache, shrinks the activations)")
    return flags


def _pixel_flag(size: RolloutSize, estimate: MemoryEstimate, capacity: int | None) -> str:
    now = (f"now {size.pixel_height}x{size.pixel_width}; the KV cache, decoder state and activations scale "
           "with the pixels")
    room = None if capacity is None else capacity - estimate.fixed_bytes
    if room is None or room >= estimate.pixel_bytes:
        return f"smaller {{pixel_height}} / {{pixel_width}} ({now})"
    scale = math.sqrt(room / estimate.pixel_bytes)
    height, width = (max(SPATIAL_MULTIPLE, int(v * scale) // SPATIAL_MULTIPLE * SPATIAL_MULTIPLE)
                     for v in (size.pixel_height, size.pixel_width))
    return f"{{pixel_height}} {height} {{pixel_width}} {width} or smaller ({now})"


def _blocks_flag(size: RolloutSize, estimate: MemoryEstimate, capacity: int | None) -> str:
    # the buffer is total_blocks·chunk + 1 frames (+ padding to whole pages)
    per_frame = estimate.kv_cache * size.layout.tokens_per_frame // size.layout.buffer_tokens
    per_block = per_frame * size.layout.chunk_frames
    why = (f"now {size.total_blocks}; this recipe's cache keeps every frame, so it grows with {{total_blocks}}: "
           f"{per_block / GIB:.2f} GiB per block")
    room = None if capacity is None else capacity - (estimate.total - estimate.kv_cache) - per_frame
    fit = None if room is None else room // max(per_block, 1)
    if fit is None or not 1 <= fit < size.total_blocks:
        return f"fewer {{total_blocks}} ({why})"
    return f"{{total_blocks}} {fit} or fewer ({why})"


def memory_error(reason: str, estimate: MemoryEstimate, capacity: int | None, flags: list[str],
                 device_kind: str, cause: str | None = None) -> DeviceMemoryError:
    """The error `wm-jax run` prints: what the rollout needs per part, what the device has, what to change.
    cause: the first line of XLA's error, when there was one."""
    has = f"the device ({device_kind}) has {capacity / GIB:.2f} GiB" if capacity else \
        f"the device ({device_kind}) reports no memory limit"
    return DeviceMemoryError("\n".join([
        f"{reason}: this rollout needs about {estimate.total / GIB:.2f} GiB, {has}.",
        estimate.describe(),
        "Reduce it with:",
        *(f"  {flag}" for flag in flags),
        *([f"XLA: {cause}"] if cause else []),
    ]))
