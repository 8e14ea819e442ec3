"""The one sharding table: logical axes -> mesh axes, and parameter paths -> logical axes.

Every array of a run is described by LOGICAL axes; `ShardingRules` maps each logical axis to a mesh
axis (or None: replicated). Changing a parallelism scheme means changing this table, not the model.

    logical axis     what it indexes                                     Ulysses (default)
    batch            the batch of worlds                                 replicated
    tokens           a chunk's patch tokens per latent frame (outside    sp
                     self-attention: norms, projections, FFN, camera)
    heads            attention heads of self-attention and the KV cache  sp
    context_heads    heads of the cross-attention K/V (text, CLIP)       replicated (see below)
    cache_tokens     token slots of the KV cache                         replicated (each device: whole window)
    layers           the stacked-block axis of weights / caches          replicated
    embed, mlp, attn weight axes: model width, FFN width, q/k/v/o width  replicated (Ulysses keeps whole weights)

Cross-attention K/V are replicated by default: queries then attend with every head on the device's
own tokens and no exchange is needed. Head-sharding them (`context_heads="sp"`) divides their
memory (0.84 GB for a 14B model) by the device count at the price of two more all_to_alls per layer.

Parameters get logical axes from `PARAM_AXES` (regular expressions on the flat nnx path, e.g.
`blocks/ffn/fc1/kernel`; first match wins, every path must match one, with one logical axis per array axis).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wm_jax.parallel.mesh import SEQUENCE_AXIS

Logical = tuple[str | None, ...]


@dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis name (None = replicated). See the module docstring for the axes."""

    batch: str | None = None
    tokens: str | None = SEQUENCE_AXIS
    heads: str | None = SEQUENCE_AXIS
    context_heads: str | None = None
    cache_tokens: str | None = None
    layers: str | None = None
    embed: str | None = None
    mlp: str | None = None
    attn: str | None = None

    def __post_init__(self):
        if self.tokens != self.heads:
            raise ValueError(f"Ulysses exchanges tokens for heads on one mesh axis: tokens -> {self.tokens!r} "
                             f"and heads -> {self.heads!r} must be the same")

    def replace(self, **changes) -> ShardingRules:
        return dataclasses.replace(self, **changes)

    def spec(self, logical: Logical) -> PartitionSpec:
        """PartitionSpec of an array whose axes are the named logical axes (None: an unnamed, replicated axis)."""
        return PartitionSpec(*(None if name is None else getattr(self, name) for name in logical))

    def sharding(self, mesh: Mesh, logical: Logical) -> NamedSharding:
        return NamedSharding(mesh, self.spec(logical))


# Logical axes of the streaming state (see wm_jax.streaming.kv_cache / step). Latents, noise and
# conditioning enter the step whole (their token split happens inside the model, per frame: `tokens`).
KV_CACHE_AXES: Logical = ("layers", "batch", "cache_tokens", "heads", None)  # [layers, B, T, N, d]
CROSS_KV_AXES: Logical = ("layers", "batch", None, "context_heads", None)  # [layers, B, Lc, N, d]
LATENT_AXES: Logical = ("batch", None, None, None, None)  # latents, conditioning [B, F, h, w, C]
NOISE_AXES: Logical = (None, "batch", None, None, None, None)  # chunk noise [k, B, F, h, w, C]

# Wan DiT parameters (flat nnx paths of wm_jax.models.wan.WanModel) -> logical axes, one per array axis; first
# match wins. No rule matches everything: a parameter the table does not name is an error (KeyError).
_ATTN = r"(self_attn|cross_attn)"
PARAM_AXES: tuple[tuple[str, Logical], ...] = (
    # the stacked blocks: [layers, ...]
    (rf"^blocks/{_ATTN}/(q|k|v|k_img|v_img)/kernel$", ("layers", "embed", "attn")),
    (rf"^blocks/{_ATTN}/o/kernel$", ("layers", "attn", "embed")),
    (rf"^blocks/{_ATTN}/(q|k|v|k_img|v_img)/bias$", ("layers", "attn")),
    (rf"^blocks/{_ATTN}/(o/bias|norm_(q|k|k_img)/scale)$", ("layers", "embed")),
    (r"^blocks/ffn/fc1/kernel$", ("layers", "embed", "mlp")),
    (r"^blocks/ffn/fc1/bias$", ("layers", "mlp")),
    (r"^blocks/ffn/fc2/kernel$", ("layers", "mlp", "embed")),
    (r"^blocks/camera/(fc1|fc2|scale|shift)/kernel$", ("layers", "embed", "embed")),
    (r"^blocks/(ffn/fc2|camera/(fc1|fc2|scale|shift))/bias$", ("layers", "embed")),
    (r"^blocks/norm3/(scale|bias)$", ("layers", "embed")),
    (r"^blocks/modulation$", ("layers", None, "embed")),  # [layers, 6, D]
    # embeddings into the model width: [in, D] kernels, [D] biases and norms
    (r"^(patch_embed|text_fc1|text_fc2|time_fc1|time_fc2|camera_embed/(patch|fc1|fc2)|image_embed/fc2)/kernel$",
     (None, "embed")),
    (r"^(patch_embed|text_fc1|text_fc2|time_fc1|time_fc2|camera_embed/(patch|fc1|fc2)|image_embed/fc2)/bias$",
     ("embed",)),
    (r"^image_embed/norm_out/(scale|bias)$", ("embed",)),
    # out of the model width: time_proj [D, 6D] (the blocks' modulation), head [D, patch·out_dim]
    (r"^(time_proj|head/linear)/kernel$", ("embed", None)),
    (r"^(time_proj|head/linear)/bias$", (None,)),
    (r"^head/modulation$", (None, "embed")),  # [2, D]
    # CLIP-width layers of the I2V image embedding: [image_dim, image_dim], [image_dim], pos [tokens, image_dim]
    (r"^image_embed/fc1/kernel$", (None, None)),
    (r"^image_embed/(fc1/bias|norm_in/(scale|bias))$", (None,)),
    (r"^image_embed/pos$", (None, None)),
)


def _flat_path(path: tuple) -> str:
    """`blocks/ffn/fc1/kernel` from a pytree key path (nnx's trailing `.value` attribute dropped)."""
    names = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def logical_axes(path: str, ndim: int, table=PARAM_AXES) -> Logical:
    """The logical axes of the parameter at `path`, which has `ndim` axes (KeyError: no rule names the path;
    ValueError: its rule names another number of axes)."""
    for pattern, axes in table:
        if re.search(pattern, path):
            if len(axes) != ndim:
                raise ValueError(f"sharding rule {pattern!r} gives parameter {path!r} {len(axes)} axes {axes}; "
                                 f"it has {ndim}")
            return axes
    raise KeyError(f"no sharding rule matches parameter {path!r}")


def param_shardings(params: Any, rules: ShardingRules, mesh: Mesh, table=PARAM_AXES) -> Any:
    """A pytree like `params` (an nnx State or any pytree of arrays / ShapeDtypeStructs) of NamedShardings."""
    def one(path, leaf):
        return rules.sharding(mesh, logical_axes(_flat_path(path), len(leaf.shape), table))

    return jax.tree_util.tree_map_with_path(one, params)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
    """Every leaf replicated (decoders, encoders and their states: each device runs its own copy)."""
    return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, PartitionSpec()), tree)


def flat_param_shardings(params: Any, rules: ShardingRules, mesh: Mesh, table=PARAM_AXES) -> dict[str, NamedSharding]:
    """Flat path ('blocks/ffn/fc1/kernel') -> NamedSharding, for restoring a checkpoint straight into place."""
    return {_flat_path(path): rules.sharding(mesh, logical_axes(_flat_path(path), len(leaf.shape), table))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def create_sharded(build: Callable[[], nnx.Module], shardings: Callable[[Any], Any]) -> nnx.Module:
    """`build()` with its variables created directly on the devices, in `shardings(abstract_state)`.

    One jitted initialisation: no host copy and no full copy on any single device, e.g. random
    full-size weights for benchmarks, or a decoder replicated on the mesh.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()), out_shardings=shardings(abstract))()
    return nnx.merge(graphdef, state)
