"""Wan 2.2 VAE checkpoints (TI2V-5B, z=48) -> `wm_jax.models.wan_vae22.Wan22VAE` (decoder only).

Accepted layouts:

* original (`Wan2.2_VAE.pth`, a torch pickle: `open_source(path, allow_pickle=True)`): `conv2`,
  `decoder.conv1`, `decoder.middle.{0,1,2}`, `decoder.upsamples.{b}.upsamples.{r}.residual.{0,2,3,6}` /
  `.shortcut` (r < 3), `decoder.upsamples.{b}.upsamples.3.{resample.1,time_conv}` (b < 3),
  `decoder.head.{0,2}`;
* diffusers `AutoencoderKLWan` with `is_residual=True` (`decoder.up_blocks.{b}.resnets.{r}`,
  `decoder.up_blocks.{b}.upsampler`, ...), renamed back to the original names.

The encoder (`encoder.*`) and the quant conv (`conv1.*`) are dropped on purpose (listed in the manifest's
`ignored_keys`): only the decoder is implemented.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from converters.core import Rule
from converters.wan_vae import (
    VAEConverter,
    _count_indices,
    _require,
    conv3d_rules,
    is_diffusers_layout,
    latent_z_dim,
    rename_common,
    rename_resnet_part,
    trunk_rules,
    vae_config,
)
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import Source
from wm_jax.models import wan_vae22 as W22

KIND = "wan2_2_vae"
IGNORED = (r"encoder\.", r"conv1\.(weight|bias)\Z")


def rules_for(vae: W22.Wan22VAE) -> list[Rule]:
    body = [(f"upsamples.{b}.upsamples.{r}", layer)
            for b, block in enumerate(vae.decoder.upsamples) for r, layer in enumerate(block.upsamples)]
    return conv3d_rules("conv2", "conv2") + trunk_rules("decoder", body, vae.decoder.middle)


def diffusers_renamer(keys) -> Callable[[str], str]:
    """Diffusers `AutoencoderKLWan` (`is_residual=True`) key -> original Wan 2.2 key."""
    resnets_per_up = max(1, _count_indices(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\."))
    resnets_per_down = max(1, _count_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))

    def rename(key: str) -> str:
        common = rename_common(key)
        if common is not None:
            return common
        for part, blocks, inner, sampler, n in (("decoder", "up_blocks", "upsamples", "upsampler", resnets_per_up),
                                                ("encoder", "down_blocks", "downsamples", "downsampler",
                                                 resnets_per_down)):
            m = re.match(rf"{part}\.{blocks}\.(\d+)\.resnets\.(\d+)\.(.+)\Z", key)
            if m:
                b, r, rest = m.groups()
                return f"{part}.{inner}.{b}.{inner}.{r}.{rename_resnet_part(rest)}"
            m = re.match(rf"{part}\.{blocks}\.(\d+)\.{sampler}\.(.+)\Z", key)
            if m:
                b, rest = m.groups()
                return f"{part}.{inner}.{b}.{inner}.{n}.{rest}"
        return key  # unknown: reported as unexpected by the conversion

    return rename


def infer_config(source: Source, **overrides) -> W22.Wan22VAEConfig:
    """Reads the Wan 2.2 decoder architecture off an original-layout source."""
    keys = set(source.keys())
    z_dim = latent_z_dim(source)
    head = _require(source, "decoder.head.2.weight")
    if head[0] != 3 * W22.PATCH * W22.PATCH:
        raise CheckpointError(f"{source.description}: decoder.head.2.weight has {head[0]} output channels; the Wan "
                              f"2.2 decoder emits {3 * W22.PATCH * W22.PATCH} (RGB in 2x2 space-to-depth)")
    dec_dim = head[1]
    num_blocks = _count_indices(keys, r"decoder\.upsamples\.(\d+)\.upsamples\.")
    if num_blocks == 0:
        raise CheckpointError(f"{source.description}: no decoder.upsamples.{{b}}.upsamples.* keys (a Wan 2.1 VAE? "
                              "use kind wan_vae)")
    outs, resnets, temporal_up = [], [], []
    for b in range(num_blocks):
        n = 0
        while f"decoder.upsamples.{b}.upsamples.{n}.residual.6.weight" in keys:
            n += 1
        if n == 0:
            raise CheckpointError(f"{source.description}: decoder.upsamples.{b} has no residual blocks")
        resnets.append(n)
        outs.append(source.shape(f"decoder.upsamples.{b}.upsamples.0.residual.6.weight")[0])
        if b < num_blocks - 1:
            if f"decoder.upsamples.{b}.upsamples.{n}.resample.1.weight" not in keys:
                raise CheckpointError(f"{source.description}: decoder.upsamples.{b} has no resampler at "
                                      f"upsamples.{n}")
            temporal_up.append(f"decoder.upsamples.{b}.upsamples.{n}.time_conv.weight" in keys)
    if len(set(resnets)) != 1:
        raise CheckpointError(f"{source.description}: decoder blocks have {resnets} residual blocks; expected equal")
    fields = dict(dec_dim=dec_dim, z_dim=z_dim, dim_mult=tuple(o // dec_dim for o in outs)[::-1],
                  num_res_blocks=resnets[0] - 1, temporal_downsample=tuple(temporal_up[::-1]))
    return vae_config(source, W22.Wan22VAEConfig, fields, overrides, "Wan 2.2 VAE")


# ---------------------------------------------------------------------------------------------------
# Converter interface.
# ---------------------------------------------------------------------------------------------------


def matches(keys) -> bool:
    keys = set(keys)
    original = "decoder.conv1.weight" in keys and any(
        re.match(r"decoder\.upsamples\.\d+\.upsamples\.\d+\.residual\.", k) for k in keys)
    diffusers = is_diffusers_layout(keys) and any(re.match(r"decoder\.up_blocks\.\d+\.upsampler\.", k) for k in keys)
    return original or diffusers


WAN22_VAE = VAEConverter(KIND, W22.Wan22VAEConfig, W22.Wan22VAE, infer_config, rules_for, diffusers_renamer,
                         IGNORED)
abstract_module = WAN22_VAE.abstract_module
convert = WAN22_VAE.convert
load = WAN22_VAE.load
load_source = WAN22_VAE.load_source
