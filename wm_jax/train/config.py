"""Training configurations: plain data, one file per job under `configs/` (`get_config() -> TrainConfig`).

Shapes never live here: the model, the autoencoder, the resolution, the chunk, the cache window and the
few-step schedule all come from the recipe the training serves (`TrainConfig.recipe`), so the trained
world runs in the streaming engine exactly as it was trained. Overrides address fields by dotted path
(`world_model.steps=100`), see `apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wm_jax.errors import OptionError


@dataclass(frozen=True)
class AutoencoderTraining:
    """The Wan-VAE-shaped encoder/decoder pair, trained as an autoencoder on rendered clips.

    clip_latents: latent frames per training clip (pixel frames 1 + 4(n-1)); latent_penalty: weight of
    mean(μ²), which keeps the latent scale bounded; stats_batches: batches measured for the latent
    statistics stored with the VAE after training.
    """

    steps: int = 3000
    batch: int = 16
    clip_latents: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    latent_penalty: float = 1e-4
    stats_batches: int = 8


@dataclass(frozen=True)
class WorldModelTraining:
    """The camera-conditioned DiT, trained with teacher forcing under the recipe's block-causal cache mask.

    pool_clips: rendered clips encoded once into latents and reused (each from its own world seed);
    clip_chunks: chunks per clip (the first is the cache's sink); context_noise: largest std of the noise
    added to the clean context (robustness to the model's own, imperfect, committed chunks);
    max_position_offset: chunks of RoPE offset drawn for the non-sink chunks (long rollouts put the sink
    far in the past).
    """

    steps: int = 5000
    batch: int = 32
    pool_clips: int = 4096
    clip_chunks: int = 5
    learning_rate: float = 3e-4
    warmup_steps: int = 300
    context_noise: float = 0.1
    max_position_offset: int = 40


@dataclass(frozen=True)
class TrainConfig:
    """A training job: which recipe it trains weights for, its stages' hyper-parameters, and bookkeeping.

    intrinsics: (fx, fy, cx, cy) for a 480x832 frame (scaled to the recipe's size like the engine does);
    None = the first row of the recipe's shipped example scene.
    """

    name: str
    recipe: str = "tiny"
    seed: int = 0
    intrinsics: tuple[float, float, float, float] | None = None
    supersample: int = 2
    autoencoder: AutoencoderTraining = field(default_factory=AutoencoderTraining)
    world_model: WorldModelTraining = field(default_factory=WorldModelTraining)
    checkpoint_every: int = 500
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str) -> TrainConfig:
    """A config file (`configs/train_tiny_world.py`) -> its `get_config()`."""
    file = Path(path)
    if not file.is_file() or file.suffix != ".py":
        raise OptionError("config", f"{path}: expected a Python config file with get_config() "
                          "(e.g. configs/train_tiny_world.py)")
    spec = importlib.util.spec_from_file_location(f"wm_jax_train_config_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise OptionError("config", f"{path}: defines no get_config()")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise OptionError("config", f"{path}: get_config() returned {type(config).__name__}, expected TrainConfig")
    return config


def apply_overrides(config: TrainConfig, items: list[str]) -> TrainConfig:
    """`KEY=VALUE` items with dotted keys (`world_model.steps=100`); values parsed as JSON, else strings."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise OptionError("override", f"{{override}} {item!r}: expected KEY=VALUE, e.g. world_model.steps=100")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        config = _replace_path(config, key.split("."), value, key)
    return config


def _replace_path(node, parts: list[str], value, key: str):
    names = {f.name: f for f in dataclasses.fields(node)}
    head = parts[0]
    if head not in names:
        raise OptionError("override", f"{{override}} {key}: {type(node).__name__} has no field {head!r} "
                          f"(fields: {', '.join(names)})")
    if len(parts) > 1:
        child = getattr(node, head)
        if not dataclasses.is_dataclass(child):
            raise OptionError("override", f"{{override}} {key}: {head} is not a group of fields")
        return dataclasses.replace(node, **{head: _replace_path(child, parts[1:], value, key)})
    current = getattr(node, head)
    if dataclasses.is_dataclass(current):
        raise OptionError("override", f"{{override}} {key}: name a field inside it, e.g. {key}.steps=100")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise OptionError("override", f"{{override}} {key}={value!r}: expected a number")
        value = type(current)(value)
        if value <= 0 and head not in ("seed", "context_noise", "latent_penalty", "max_position_offset"):
            raise OptionError("override", f"{{override}} {key}={value}: expected a positive number")
    if isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(node, **{head: value})
