"""Builds a recipe's components: DiT, decoder, I2V VAE encoder and the prompt -> features function.

Random-weight recipes (`tiny`) build everything from a seed. Real recipes load converted folders from
the checkpoint folder DIR (`DIR/dit`, `DIR/text_encoder`, `DIR/vae`, `DIR/decoder`), downloading and
converting any missing component from the recipe's hub files first. A two-expert recipe (`boundary`
set) has both experts in `DIR/dit` (`converters.wan_dit.convert_experts`) and takes its schedule shift
from the checkpoint's scheduler config (`Components.shift`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.models.config import WanConfig, preset
from wm_jax.models.wan import ExpertPair, WanModel
from wm_jax.models.wan_vae import VAE_STRIDE
from wm_jax.parallel.sharding import create_sharded, flat_param_shardings, param_shardings, replicated_shardings
from wm_jax.streaming.decoders import Decoder, on_mesh, taehv_decoder, wan_vae_decoder
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.recipes import HubFiles, Recipe


@dataclass
class Components:
    dit: WanModel | ExpertPair
    decoder: Decoder
    vae_encoder: Any | None
    encode_prompt: Callable[[str], np.ndarray]  # prompt -> [1, L, text_dim] float32 (real tokens only)
    description: dict[str, str]
    shift: float | None = None  # the schedule shift the checkpoint's scheduler config states, if any


def model_config(recipe: Recipe) -> WanConfig:
    return preset(recipe.model) if isinstance(recipe.model, str) else WanConfig(**recipe.model)


def hashed_text_features(prompt: str, text_dim: int) -> np.ndarray:
    """Seeded stand-in text features for random-weight recipes: one row per whitespace token."""
    tokens = max(1, min(len(prompt.split()), 512))
    seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal((1, tokens, text_dim)).astype(np.float32)


def build_random(recipe: Recipe, plan: RolloutPlan, seed: int, compute_dtype=jnp.float32) -> Components:
    """Every component with seeded random weights (no checkpoint, no text encoder), created on the plan's
    mesh in the sharding table's placement (one jitted initialisation each, no host copy)."""
    from wm_jax.models.wan_vae import WanVAE, WanVAEConfig

    cfg = model_config(recipe)
    if recipe.decoder != "wan_vae":
        raise ValueError(f"recipe {recipe.slug}: random weights are only wired for the Wan VAE decoder")
    mesh, rules = plan.mesh, plan.rules
    experts = [create_sharded(lambda s=s: WanModel(cfg, rngs=nnx.Rngs(s), compute_dtype=compute_dtype),
                              lambda state: param_shardings(state, rules, mesh))
               for s in ([seed] if recipe.boundary is None else [seed, seed + 2])]
    dit = experts[0] if recipe.boundary is None else ExpertPair(*experts, boundary=recipe.boundary)
    vae = create_sharded(lambda: WanVAE(WanVAEConfig(**recipe.vae_config), rngs=nnx.Rngs(seed + 1)),
                         lambda state: replicated_shardings(state, mesh))
    return Components(dit=dit, decoder=wan_vae_decoder(vae),
                      vae_encoder=vae if recipe.encodes_image else None,
                      encode_prompt=lambda p: hashed_text_features(p, cfg.text_dim),
                      description={"weights": f"random (seed {seed})", "text": "hashed prompt features"})


def load_shipped(recipe: Recipe, plan: RolloutPlan, compute_dtype=jnp.float32) -> Components:
    """The trained world shipped with the package for `recipe.shipped_weights` (`wm_jax.io.shipped`): its DiT
    placed by the sharding table on the plan's mesh, its VAE (encoder + decoder) replicated; prompts become
    hashed features (the world was trained to ignore them)."""
    from wm_jax.io.checkpoint import assign_params, param_spec
    from wm_jax.io.shipped import read_shipped
    from wm_jax.models.wan_vae import WanVAE, WanVAEConfig

    world = read_shipped(recipe.shipped_weights)
    cfg = WanConfig.from_dict(world.component("dit")["config"])
    if cfg != model_config(recipe):
        raise CheckpointError(f"{world.folder}: the shipped DiT ({cfg}) is not recipe {recipe.slug}'s model "
                              f"({model_config(recipe)}); retrain it or restore the recipe")
    check_plan(plan, cfg, world.folder)
    mesh, rules = plan.mesh, plan.rules
    dit = nnx.eval_shape(lambda: WanModel(cfg, compute_dtype=compute_dtype))
    shardings = flat_param_shardings(nnx.state(dit), rules, mesh)
    spec = param_spec(dit)
    assign_params(dit, world.params("dit"),
                  put=lambda name, value: jax.device_put(value.astype(spec[name][1]), shardings[name]))
    vae = nnx.eval_shape(lambda: WanVAE(WanVAEConfig.from_dict(world.component("vae")["config"])))
    vae_spec = param_spec(vae)
    assign_params(vae, world.params("vae"), put=lambda name, value: jnp.asarray(value.astype(vae_spec[name][1])))
    vae = on_mesh(vae, mesh)
    vae.compute_dtype = compute_dtype
    return Components(dit=dit, decoder=wan_vae_decoder(vae), vae_encoder=vae,
                      encode_prompt=lambda p: hashed_text_features(p, cfg.text_dim),
                      description={"weights": f"shipped {recipe.shipped_weights} ({world.folder})",
                                   "text": "hashed prompt features (ignored by the trained world)"})


# ---------------------------------------------------------------------------------------------------
# Real checkpoints.
# ---------------------------------------------------------------------------------------------------

COMPONENT_KINDS = {"dit": "wan_dit", "text_encoder": "umt5", "vae": "wan_vae", "decoder": "taehv"}


def ensure_component(name: str, folder: Path, hub: HubFiles | None, *, allow_pickle: bool,
                     cache_dir: str | None = None, experts: bool = False) -> Path:
    """`folder` if it already holds a converted component, else download + convert it there (`experts`: a
    two-expert DiT, converted with `converters.wan_dit.convert_experts`)."""
    import converters
    from converters import wan_dit
    from wm_jax.io.hub import HubError, download

    if (folder / "wm_jax.json").is_file():
        return folder
    if folder.exists():
        raise CheckpointError(f"{folder} exists but holds no converted {name} (no wm_jax.json); remove it to "
                              f"download and convert the {name} there again")
    if hub is None:
        raise CheckpointError(f"{folder}: no converted {name} here and the recipe names no hub files for it; "
                              f"convert one with `wm-jax convert {{src}} ... {{dst}} {folder}`")
    if hub.allow_pickle and not allow_pickle:
        raise CheckpointError(f"{name}: {hub.repo}/{hub.path} is a torch pickle; pass {{allow_pickle}} to convert it "
                              f"(or convert it yourself with `wm-jax convert ... {{dst}} {folder}`)")
    if experts:  # the scheduler is checked before the experts (tens of GB) are fetched
        small = tuple(p for p in hub.allow_patterns if not p.startswith(wan_dit.DIFFUSERS_EXPERT_DIRS))
        root = download(hub.repo, small, cache_dir=cache_dir)
        wan_dit.read_scheduler(root / hub.path if hub.path else root)
    root = download(hub.repo, hub.allow_patterns, cache_dir=cache_dir)
    src = root / hub.path if hub.path else root
    if not src.exists():
        raise HubError(f"{hub.repo}: the download (files {list(hub.allow_patterns)}) has no {hub.path!r}, the {name} "
                       f"weights this recipe converts")
    if experts:
        wan_dit.expert_sources(src, required=True)  # a one-DiT download is refused, naming the missing expert
    converters.convert_path(src, folder, kind=COMPONENT_KINDS[name], allow_pickle=allow_pickle)
    return folder


def check_compatible(recipe: Recipe, dit: WanConfig, text_dim: int, checkpoint_dir: Path) -> None:
    """Raises CheckpointError when the converted DiT cannot serve the recipe (wrong task inputs, no
    camera layers for a camera recipe, or a text width other than the text encoder's)."""
    where = f"{{checkpoint}} {checkpoint_dir}: {checkpoint_dir / 'dit'}"
    latent = dit.out_dim  # noise, then for I2V the mask (one channel per frame of a VAE time step) + image latent
    inputs = latent + VAE_STRIDE[0] + latent if recipe.task == "i2v_camera" else latent
    if dit.in_dim != inputs:
        raise CheckpointError(f"{where} takes {dit.in_dim} input channels; recipe {recipe.slug} ({recipe.task}) "
                              f"feeds {inputs}. Wrong {{hub_repo}} or checkpoint for this recipe?")
    if recipe.task == "i2v_camera" and not dit.camera_channels:
        raise CheckpointError(f"{where} has no camera layers; recipe {recipe.slug} steers the camera "
                              "(a LingBot-World camera checkpoint is needed)")
    if dit.text_dim != text_dim:
        raise CheckpointError(f"{where} expects {dit.text_dim}-wide text features; the text encoder in "
                              f"{checkpoint_dir / 'text_encoder'} gives {text_dim}")


def dit_config(recipe: Recipe, checkpoint_dir: str | Path | None) -> WanConfig:
    """The DiT architecture a run will have: the converted checkpoint's (when already there) or the
    recipe's preset. Read before any weight is loaded, so the rollout plan is validated first."""
    from wm_jax.io.checkpoint import read_manifest

    from converters.wan_dit import EXPERTS_KIND, KIND

    folder = Path(checkpoint_dir) / "dit" if checkpoint_dir else None
    if folder is not None and (folder / "wm_jax.json").is_file():
        kind = EXPERTS_KIND if recipe.boundary is not None else KIND
        manifest = read_manifest(folder)
        if manifest.get("kind") != kind:
            needs = "two experts" if recipe.boundary is not None else "one DiT"
            raise CheckpointError(f"{folder}: holds a {manifest.get('kind')!r} checkpoint; recipe {recipe.slug} "
                                  f"needs {needs} ({kind!r}): convert {'both experts' if recipe.boundary is not None else 'one'} "
                                  "there, or use another {checkpoint}")
        return WanConfig.from_dict(manifest["config"])
    return model_config(recipe)


def check_plan(plan: RolloutPlan, dit: WanConfig, folder: Path) -> None:
    """Raises CheckpointError when the converted DiT in `folder` has other heads or channels than the rollout
    plan was built for (a plan built from the recipe's preset before the DiT was converted)."""
    pairs = {"attention heads": (dit.num_heads, plan.shards.num_heads),
             "latent channels": (dit.out_dim, plan.latent_channels),
             "condition channels": (dit.in_dim - dit.out_dim, plan.condition_channels)}
    wrong = [f"{what} {has} where the rollout plan has {planned}" for what, (has, planned) in pairs.items()
             if has != planned]
    if wrong:
        raise CheckpointError(f"{folder}: the converted DiT has {'; '.join(wrong)} (the plan was built for "
                              "another model, e.g. the recipe's preset before this DiT was converted; a new run "
                              "reads the converted DiT)")


def load_components(recipe: Recipe, plan: RolloutPlan, checkpoint_dir: str | Path, *, compute_dtype,
                    dit_hub_repo: str | None = None, allow_pickle: bool = False, cache_dir: str | None = None,
                    text_cache_dir: str | None = None) -> Components:
    """Loads (downloading and converting where missing) every component onto the plan's mesh: the DiT
    restored straight into its sharding (after its converted config is checked against the plan), decoder /
    encoder replicated.

    With several processes, process 0 downloads and converts first; the others wait for it, then find
    the folders (on a filesystem they do not share with it, they convert their own)."""
    from converters import taehv as taehv_conv
    from converters import wan_dit
    from converters import wan_vae as wan_vae_conv
    from converters.umt5 import load_text_encoder
    from wm_jax.io import checkpoint as ckpt

    root = Path(checkpoint_dir)
    hubs = dict(recipe.weights)
    if dit_hub_repo:  # the recipe's expert folders from another repo, or any one DiT's weights
        patterns = recipe.weights["dit"].allow_patterns if recipe.boundary is not None else ("*.safetensors", "*.json")
        hubs["dit"] = HubFiles(dit_hub_repo, patterns, "")
    names = ["dit", *(["vae"] if recipe.decoder == "wan_vae" or recipe.encodes_image else []),
             *(["decoder"] if recipe.decoder != "wan_vae" else []), "text_encoder"]

    experts = recipe.boundary is not None

    def ensure(name: str) -> Path:
        return ensure_component(name, root / name, hubs.get(name), allow_pickle=allow_pickle, cache_dir=cache_dir,
                                experts=experts and name == "dit")

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            for name in names:
                ensure(name)
        multihost_utils.sync_global_devices("wm_jax: components converted by process 0")
    folder = {name: ensure(name) for name in names}

    mesh, rules = plan.mesh, plan.rules
    config = dit_config(recipe, root)
    check_plan(plan, config, folder["dit"])
    abstract = nnx.state(nnx.eval_shape(lambda: WanModel(config, compute_dtype=compute_dtype)))
    shardings = flat_param_shardings(abstract, rules, mesh)
    shift = None
    if experts:
        for name in wan_dit.EXPERT_DIRS:
            wan_dit.check_frames_per_block(folder["dit"] / name, recipe.chunk_frames, recipe.slug)
        manifest = ckpt.read_manifest(folder["dit"])
        if manifest["boundary"] != recipe.boundary:  # the recipe's schedule decides which expert runs a pass
            logging.warning("%s records boundary %s; recipe %s switches experts at %s (its sampler's)",
                            folder["dit"], manifest["boundary"], recipe.slug, recipe.boundary)
        dit = wan_dit.load_experts(folder["dit"], compute_dtype=compute_dtype, shardings=shardings,
                                   boundary=recipe.boundary)
        shift = None if manifest["scheduler"] is None else manifest["scheduler"]["shift"]
    else:
        wan_dit.check_frames_per_block(folder["dit"], recipe.chunk_frames, recipe.slug)
        dit = wan_dit.load(folder["dit"], compute_dtype=compute_dtype, shardings=shardings)
    vae = None
    if "vae" in folder:
        vae = on_mesh(wan_vae_conv.load(folder["vae"]), mesh)
        vae.compute_dtype = compute_dtype
    if recipe.decoder == "wan_vae":
        decoder = wan_vae_decoder(vae)
    else:
        decoder = taehv_decoder(on_mesh(taehv_conv.load(folder["decoder"], compute_dtype=compute_dtype), mesh))
    text = load_text_encoder(folder["text_encoder"], cache_dir=text_cache_dir)
    check_compatible(recipe, dit.config, text.config.dim, root)
    return Components(dit=dit, decoder=decoder, vae_encoder=vae if recipe.encodes_image else None,
                      encode_prompt=lambda p: np.asarray(text.encode([p])[0], np.float32)[None],
                      description={"weights": str(root), "text": "umT5"}, shift=shift)
