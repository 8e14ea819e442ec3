"""The streaming decoder protocol and its two implementations (Wan 2.1 VAE, TAEHV).

A `Decoder` turns each clean latent chunk into pixel frames while carrying its own state between
chunks. Decoders run whole on every device of the run's mesh (the sharding table replicates them):
`on_mesh` places a module's weights there before its decoder is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from wm_jax.parallel.mesh import put_replicated


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


def on_mesh(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Replicates a (decoder / encoder) module's variables on every device of `mesh`, in place."""
    nnx.update(module, put_replicated(nnx.state(module), mesh))
    return module


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
