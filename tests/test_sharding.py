"""The sharding table names every WanModel parameter explicitly, with one logical axis per array axis
(small T2V, I2V-with-CLIP and camera models, and every preset; abstract modules, nothing allocated)."""

from __future__ import annotations

import re

import jax
import pytest
from flax import nnx

from wm_jax.models.config import PRESETS, WanConfig
from wm_jax.models.wan import WanModel
from wm_jax.parallel.sharding import PARAM_AXES, _flat_path, logical_axes

BASE = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=256)
VARIANTS = {
    "t2v": WanConfig(**BASE),
    "i2v_clip": WanConfig(**BASE, in_dim=36, image_dim=32, image_pos_tokens=8),
    "camera": WanConfig(**BASE, in_dim=36, camera_channels=384),
}


def parameters(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Flat path -> shape of every parameter of an abstract WanModel (nothing allocated)."""
    state = nnx.state(nnx.eval_shape(lambda: WanModel(cfg, rngs=nnx.Rngs(0))))
    return {_flat_path(path): leaf.shape for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


@pytest.mark.parametrize("cfg", [*VARIANTS.values(), *PRESETS.values()], ids=[*VARIANTS, *PRESETS])
def test_every_parameter_matches_a_rule_with_its_number_of_axes(cfg):
    for path, shape in parameters(cfg).items():
        rule = next(((p, axes) for p, axes in PARAM_AXES if re.search(p, path)), None)
        assert rule is not None, f"no rule for {path}"
        pattern, axes = rule
        assert len(axes) == len(shape), f"{path} {shape}: rule {pattern!r} gives {axes}"
        assert logical_axes(path, len(shape)) == axes


def test_the_variants_have_their_extra_parameters():
    plain, clip, camera = (set(parameters(cfg)) for cfg in VARIANTS.values())
    assert {"image_embed/pos", "image_embed/fc1/kernel", "blocks/cross_attn/k_img/kernel"} <= clip - plain
    assert {"camera_embed/patch/kernel", "blocks/camera/scale/kernel"} <= camera - plain


def test_unknown_path_or_wrong_axis_count_is_refused():
    with pytest.raises(KeyError, match="no sharding rule matches parameter 'blocks/new_layer/kernel'"):
        logical_axes("blocks/new_layer/kernel", 3)
    with pytest.raises(KeyError, match="'extra/bias'"):
        logical_axes("extra/bias", 1)
    with pytest.raises(ValueError, match=r"'blocks/ffn/fc1/kernel' 3 axes .* it has 2"):
        logical_axes("blocks/ffn/fc1/kernel", 2)
