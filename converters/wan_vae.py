"""Wan 2.1 VAE checkpoints -> `wm_jax.models.wan_vae.WanVAE`.

Accepted layouts:

* original (`Wan2.1_VAE.pth`, a torch pickle: open it with `open_source(path, allow_pickle=True)`):
  `encoder.conv1`, `encoder.downsamples.{i}.residual.{0,2,3,6}` / `.shortcut` / `.resample.1` /
  `.time_conv`, `encoder.middle.{0,1,2}`, `encoder.head.{0,2}`, `conv1`, `conv2`, and the decoder
  likewise (`decoder.upsamples.{i}`);
* diffusers `AutoencoderKLWan` (`vae/diffusion_pytorch_model.safetensors`): renamed back to the original
  names first (`to_original_layout`), then the same rules apply.

The architecture (dim, z_dim, dim_mult, num_res_blocks, temporal flags) is read off the tensor shapes.
The latent mean/std are constants of the code (SPEC trap 19), used when z_dim is 16.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flax import nnx

from converters.core import (CONV2D, CONV3D, Rule, Transform, as_source, convert_tensors, load_converted,
                             make_config)
from wm_jax.io.checkpoint import (
    assign_params,
    atomic_folder,
    check_destination,
    param_spec,
    read_manifest,
    write_manifest,
    write_params,
)
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import RenamedSource, Source
from wm_jax.models import wan_vae as W

KIND = "wan_vae"

# RMS_norm γ: (C, 1, 1, 1) in video blocks, (C, 1, 1) in the per-frame attention block -> (C,).
GAMMA_VIDEO = Transform("rms_gamma", lambda a: a.reshape(-1), lambda s: (s[0], 1, 1, 1))
GAMMA_IMAGE = Transform("rms_gamma_image", lambda a: a.reshape(-1), lambda s: (s[0], 1, 1))


# ---------------------------------------------------------------------------------------------------
# Rules (original key names -> module parameter paths), generated from the module tree.
# ---------------------------------------------------------------------------------------------------


def conv3d_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", CONV3D), Rule(f"{src}.bias", f"{dst}/bias")]


def conv2d_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.weight", f"{dst}/kernel", CONV2D), Rule(f"{src}.bias", f"{dst}/bias")]


def residual_rules(src: str, dst: str) -> list[Rule]:
    """`residual.{0,2,3,6}` = RMS, conv, RMS, conv (1 = SiLU, 4 = SiLU, 5 = dropout); `shortcut` 1³ conv."""
    return [Rule(f"{src}.residual.0.gamma", f"{dst}/norm1/gamma", GAMMA_VIDEO),
            *conv3d_rules(f"{src}.residual.2", f"{dst}/conv1"),
            Rule(f"{src}.residual.3.gamma", f"{dst}/norm2/gamma", GAMMA_VIDEO),
            *conv3d_rules(f"{src}.residual.6", f"{dst}/conv2"),
            *conv3d_rules(f"{src}.shortcut", f"{dst}/shortcut")]  # inactive when in == out


def attention_rules(src: str, dst: str) -> list[Rule]:
    return [Rule(f"{src}.norm.gamma", f"{dst}/norm/gamma", GAMMA_IMAGE),
            *conv2d_rules(f"{src}.to_qkv", f"{dst}/to_qkv"), *conv2d_rules(f"{src}.proj", f"{dst}/proj")]


def resample_rules(src: str, dst: str) -> list[Rule]:
    """`resample.1` is the conv after the (parameter-free) upsample / zero-pad at `resample.0`."""
    return [*conv2d_rules(f"{src}.resample.1", f"{dst}/resample"),
            *conv3d_rules(f"{src}.time_conv", f"{dst}/time_conv")]  # inactive for 2d modes


def layer_rules(layer: nnx.Module, src: str, dst: str) -> list[Rule]:
    if isinstance(layer, W.ResidualBlock):
        return residual_rules(src, dst)
    if isinstance(layer, W.AttentionBlock):
        return attention_rules(src, dst)
    if isinstance(layer, W.Resample):
        return resample_rules(src, dst)
    raise TypeError(f"no rules for {type(layer).__name__}")


def trunk_rules(part: str, body: list[tuple[str, nnx.Module]], middle) -> list[Rule]:
    """`{part}.conv1`, the body layers (name, module), `middle` (Res, Attn, Res), `head` (RMS at 0, conv at
    2) of an encoder or decoder; module paths mirror the names with `head.0`/`head.2` -> head_norm/head_conv."""
    rules = conv3d_rules(f"{part}.conv1", f"{part}/conv1")
    for name, layer in body:
        rules += layer_rules(layer, f"{part}.{name}", f"{part}/{name.replace('.', '/')}")
    for j, layer in enumerate(middle):
        rules += layer_rules(layer, f"{part}.middle.{j}", f"{part}/middle/{j}")
    rules += [Rule(f"{part}.head.0.gamma", f"{part}/head_norm/gamma", GAMMA_VIDEO),
              *conv3d_rules(f"{part}.head.2", f"{part}/head_conv")]
    return rules


def rules_for(vae: W.WanVAE) -> list[Rule]:
    enc = [(f"downsamples.{j}", layer) for j, layer in enumerate(vae.encoder.downsamples)]
    dec = [(f"upsamples.{j}", layer) for j, layer in enumerate(vae.decoder.upsamples)]
    return (trunk_rules("encoder", enc, vae.encoder.middle) + conv3d_rules("conv1", "conv1")
            + conv3d_rules("conv2", "conv2") + trunk_rules("decoder", dec, vae.decoder.middle))


# ---------------------------------------------------------------------------------------------------
# Diffusers names -> original names.
# ---------------------------------------------------------------------------------------------------

_RESNET_PARTS = {"norm1.gamma": "residual.0.gamma", "conv1": "residual.2", "norm2.gamma": "residual.3.gamma",
                 "conv2": "residual.6", "conv_shortcut": "shortcut"}


def rename_resnet_part(rest: str) -> str:
    """`norm1.gamma` / `conv1.weight` / ... inside a diffusers resnet -> `residual.N...` / `shortcut...`."""
    for new, old in _RESNET_PARTS.items():
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    raise CheckpointError(f"unknown diffusers resnet parameter {rest!r}")


_TRUNK_ENDS = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}


def rename_common(key: str) -> str | None:
    """The parts shared by the 2.1 and 2.2 layouts; None if `key` is not one of them."""
    for new, old in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if key.startswith(new):
            return old + key[len(new):]
    m = re.match(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.+)\Z", key)
    if m:
        part, name, rest = m.groups()
        return f"{part}.{_TRUNK_ENDS[name]}.{rest}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)\Z", key)
    if m:
        part, kind, i, rest = m.groups()
        if kind == "attentions":
            return f"{part}.middle.{2 * int(i) + 1}.{rest}"
        return f"{part}.middle.{2 * int(i)}.{rename_resnet_part(rest)}"
    return None


def _count_indices(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def diffusers_renamer(keys) -> Callable[[str], str]:
    """Diffusers `AutoencoderKLWan` (Wan 2.1, `is_residual=False`) key -> original key."""
    resnets_per_up = _count_indices(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.")

    def rename(key: str) -> str:
        common = rename_common(key)
        if common is not None:
            return common
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(.+)\Z", key)
        if m:
            i, rest = m.groups()
            if rest.startswith(("resample.", "time_conv.")):
                return f"encoder.downsamples.{i}.{rest}"
            return f"encoder.downsamples.{i}.{rename_resnet_part(rest)}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)\Z", key)
        if m:
            b, r, rest = m.groups()
            return f"decoder.upsamples.{int(b) * (resnets_per_up + 1) + int(r)}.{rename_resnet_part(rest)}"
        m = re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)\Z", key)
        if m:
            b, rest = m.groups()
            return f"decoder.upsamples.{int(b) * (resnets_per_up + 1) + resnets_per_up}.{rest}"
        return key  # unknown: reported as unexpected by the conversion

    return rename


def is_diffusers_layout(keys) -> bool:
    return any(k.startswith(("decoder.conv_in.", "encoder.conv_in.", "post_quant_conv.", "decoder.up_blocks."))
               for k in keys)


def to_original_layout(source: Source, renamer_factory=diffusers_renamer) -> tuple[Source, str]:
    keys = source.keys()
    if not is_diffusers_layout(keys):
        return source, "original"
    return RenamedSource(source, renamer_factory(keys), f"{source.description} (diffusers layout)"), "diffusers"


# ---------------------------------------------------------------------------------------------------
# Config from shapes.
# ---------------------------------------------------------------------------------------------------


def _require(source: Source, key: str) -> tuple[int, ...]:
    if key not in set(source.keys()):
        raise CheckpointError(f"{source.description}: missing {key!r}; is this a Wan VAE checkpoint?")
    return tuple(source.shape(key))


def latent_z_dim(source: Source) -> int:
    keys = set(source.keys())
    return source.shape("conv2.weight")[0] if "conv2.weight" in keys else _require(source, "decoder.conv1.weight")[1]


def infer_config(source: Source, **overrides) -> W.WanVAEConfig:
    """Reads the Wan 2.1 VAE architecture off an original-layout source."""
    keys = set(source.keys())
    z_dim = latent_z_dim(source)
    dim = _require(source, "decoder.head.2.weight")[1]
    layers = sorted({int(m.group(1)) for k in keys for m in [re.match(r"decoder\.upsamples\.(\d+)\.", k)] if m})
    levels: list[list[int]] = [[]]  # output widths of the residual blocks of each level
    temporal_up: list[bool] = []
    for i in layers:
        if f"decoder.upsamples.{i}.residual.6.weight" in keys:
            levels[-1].append(source.shape(f"decoder.upsamples.{i}.residual.6.weight")[0])
        elif f"decoder.upsamples.{i}.resample.1.weight" in keys:
            temporal_up.append(f"decoder.upsamples.{i}.time_conv.weight" in keys)
            levels.append([])
        else:
            raise CheckpointError(f"{source.description}: decoder.upsamples.{i} is neither a residual block nor a "
                                  "resampler (a Wan 2.2 VAE? use kind wan2_2_vae)")
    if not levels[0] or any(len(lv) != len(levels[0]) for lv in levels):
        raise CheckpointError(f"{source.description}: decoder levels have {[len(lv) for lv in levels]} residual "
                              "blocks; expected equal non-zero counts")
    dim_mult = tuple(lv[0] // dim for lv in levels)[::-1]
    fields = dict(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=len(levels[0]) - 1,
                  temporal_downsample=tuple(temporal_up[::-1]))
    return vae_config(source, W.WanVAEConfig, fields, overrides, "Wan VAE")


def vae_config(source: Source, config_cls: type, fields: Mapping[str, Any], overrides: Mapping[str, Any],
               what: str) -> Any:
    """`config_cls` from the `fields` read off `source`, `overrides` winning (CheckpointError if bad).

    The built-in latent statistics (the default config's) fit its z_dim only: another inferred z_dim needs
    latent_mean and latent_std in `overrides`.
    """
    builtin_z_dim = config_cls().z_dim
    if fields["z_dim"] != builtin_z_dim and not ("latent_mean" in overrides and "latent_std" in overrides):
        raise CheckpointError(f"{source.description}: z_dim {fields['z_dim']}: the built-in latent statistics are "
                              f"for z_dim {builtin_z_dim}; pass latent_mean and latent_std in config_overrides")
    return make_config(source, config_cls, {**fields, **overrides}, what)


# ---------------------------------------------------------------------------------------------------
# Converter interface.
# ---------------------------------------------------------------------------------------------------


def matches(keys) -> bool:
    keys = set(keys)
    original = "decoder.conv1.weight" in keys and any(
        re.match(r"decoder\.upsamples\.\d+\.residual\.", k) for k in keys)
    diffusers = "decoder.conv_in.weight" in keys and any(
        re.match(r"decoder\.up_blocks\.\d+\.upsamplers\.0\.", k) for k in keys)
    return original or diffusers


@dataclass(frozen=True)
class VAEConverter:
    """The converter interface (`convert`, `load`, `load_source`) of one Wan VAE generation, from its parts.

    kind: the manifest kind; config_cls / module_cls: its config dataclass and module (`build(config)`:
    `module_cls(config, rngs=nnx.Rngs(0))`); infer_config(original-layout source, **overrides) -> config;
    rules_for(abstract module) -> rules; renamer: keys -> diffusers-to-original key renamer; ignore:
    regexes of source keys dropped on purpose.
    """

    kind: str
    config_cls: type
    module_cls: type
    infer_config: Callable[..., Any]
    rules_for: Callable[[nnx.Module], list[Rule]]
    renamer: Callable[[Any], Callable[[str], str]]
    ignore: tuple[str, ...] = ()

    def build(self, config) -> nnx.Module:
        return self.module_cls(config, rngs=nnx.Rngs(0))

    def abstract_module(self, config) -> nnx.Module:
        return nnx.eval_shape(lambda: self.build(config))

    def convert_arrays(self, source: Source, config_overrides: Mapping[str, Any], on_tensor=None):
        """Any-layout source -> (abstract module, config, flat numpy params, report, layout name);
        `on_tensor` as in `converters.core.convert_tensors`."""
        original, layout = to_original_layout(source, self.renamer)
        config = self.infer_config(original, **config_overrides)
        module = self.abstract_module(config)
        arrays, report = convert_tensors(original, self.rules_for(module), param_spec(module), ignore=self.ignore,
                                         on_tensor=on_tensor)
        return module, config, arrays, report, layout

    def convert(self, source, dst, *, overwrite: bool = False, dtype=None, config_overrides=None,
                allow_pickle: bool = False, on_tensor=None) -> dict:
        """Converts a checkpoint (Source or path) into the folder `dst`; returns the manifest.

        dtype: stored parameter dtype (default float32). config_overrides: config fields that win over
        the inferred ones (e.g. compute_dtype). allow_pickle: needed only when `source` is a `.pth` path.
        """
        check_destination(dst, overwrite)
        source = as_source(source, allow_pickle)
        overrides = dict(config_overrides or {})
        if dtype is not None:
            overrides["param_dtype"] = W.dtype_name(W.dtype_from_name(dtype))
        _, config, arrays, report, layout = self.convert_arrays(source, overrides, on_tensor)
        manifest = {"kind": self.kind, "config": config.to_dict(), "source": source.description, "layout": layout,
                    "num_tensors": report.num_tensors, "ignored_keys": report.ignored}
        with atomic_folder(dst, overwrite) as tmp:
            write_params(tmp, arrays)
            write_manifest(tmp, manifest)
        return read_manifest(dst)

    def load(self, folder) -> nnx.Module:
        """Loads a converted folder."""
        return load_converted(folder, self.kind, self.config_cls, self.build)

    def load_source(self, source, *, allow_pickle: bool = False, **config_overrides) -> nnx.Module:
        """In-memory conversion (no folder); `config_overrides` may set e.g. compute_dtype or param_dtype."""
        module, _, arrays, _, _ = self.convert_arrays(as_source(source, allow_pickle), config_overrides)
        assign_params(module, arrays)
        return module


WAN21_VAE = VAEConverter(KIND, W.WanVAEConfig, W.WanVAE, infer_config, rules_for, diffusers_renamer)
abstract_module = WAN21_VAE.abstract_module
convert = WAN21_VAE.convert
load = WAN21_VAE.load
load_source = WAN21_VAE.load_source
