"""Importing a user's upstream checkout in a peer's child process, and the changes the rollout adapters
(`self_forcing`, `lingbot_fast`) make around it, each written to the result's notes:

* `checkout_first`: the checkout first on sys.path, same-named modules imported from elsewhere dropped.
* `register_packages`: packages whose `__init__` imports far more than the loop needs are registered empty,
  with their folders as `__path__`: their submodules import, their `__init__.py` never runs.
* `stub`: a third-party package (or an upstream module off the timed path) that is missing or broken here is
  replaced by stand-in modules: the attributes in `STAND_INS` (diffusers' `ModelMixin` / `ConfigMixin` /
  `register_to_config`, the scheduler mixins, torchvision's `to_tensor`, tqdm, EasyDict, ...), and for any
  other name a placeholder class that raises when it is instantiated. `stub_if_broken` tries the real
  package first.
* `route_attention`: flash-attn is not used; upstream's `flash_attention` / `attention` names go to its own
  SDPA fallback (torch SDPA, restricted to cuDNN on CUDA by the runner), or in a float32 job to a torch SDPA
  that keeps the inputs' dtype.

Nothing of upstream is copied here. Imports torch and numpy: child process only.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import importlib.util
import inspect
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------- the checkout

def under(path: str | None, root: Path) -> bool:
    """Whether the file `path` is under `root`."""
    try:
        return bool(path) and Path(path).resolve().is_relative_to(root)
    except (OSError, ValueError):
        return False


def _file(module: Any) -> str | None:
    return getattr(module, "__dict__", {}).get("__file__")


def is_stub(module: Any) -> bool:
    return bool(getattr(module, "__dict__", {}).get("__wm_jax_stub__"))


def checkout_first(root: Path) -> set[str]:
    """Puts `root` first on sys.path and drops every module whose top-level name is one of the checkout's
    (a module or package at its top) but that was loaded from elsewhere; returns those top-level names."""
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    tops = {p.stem if p.suffix == ".py" else p.name for p in root.iterdir()
            if not p.name.startswith((".", "_")) and (p.is_dir() or p.suffix == ".py")}
    for name in [n for n in sys.modules if n.split(".")[0] in tops]:
        if not under(_file(sys.modules[name]), root) and not is_stub(sys.modules[name]):
            del sys.modules[name]
    return tops


def _link(name: str, module: types.ModuleType) -> None:
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent in sys.modules:
        setattr(sys.modules[parent], child, module)


def register_packages(root: Path, names: tuple[str, ...], why: str, writer: Any) -> None:
    """Registers each package of `names` (parents first) that is a folder of the checkout as an empty module
    with that folder as its `__path__`: the modules the loop needs import from it, its `__init__.py` is not run."""
    names = tuple(n for n in names if root.joinpath(*n.split(".")).is_dir())
    if not names:
        return
    for name in names:
        spec = importlib.util.spec_from_loader(name, loader=None, is_package=True)
        spec.submodule_search_locations = [str(root.joinpath(*name.split(".")))]
        _link(name, importlib.util.module_from_spec(spec))
    inits = ", ".join(f"{name.replace('.', '/')}/__init__.py" for name in names)
    writer.note(f"imports: {', '.join(names)} registered as empty packages: their __init__ files ({inits}), which "
                f"{why}, are not run; the modules the loop needs are imported directly")


# ------------------------------------------------------------------------------------- third-party stand-ins

def placeholder(qualname: str) -> type:
    """A class named like `qualname` that raises when instantiated (or subclassed and instantiated)."""
    def fail(*_, **__):
        raise RuntimeError(f"{qualname} is a stub (its package is missing or broken here) and was called; the peer "
                           "adapter assumed it is not on the timed path")

    module, _, name = qualname.rpartition(".")
    return type(name, (), {"__init__": fail, "__module__": module})


class _AttrDict(dict):
    """What `easydict.EasyDict` gives upstream's config files: a dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def _register_to_config(init: Callable) -> Callable:
    """diffusers' `register_to_config` decorator, reduced to what the loops read: the constructor's arguments
    (defaults filled in) as an attribute dict at `.config`."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)
            elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                values[name] = value
        object.__setattr__(self, "_internal_dict", _AttrDict(values))
        init(self, *args, **kwargs)

    return wrapped


class _ConfigMixin:
    config_name = None
    ignore_for_config: list[str] = []

    @property
    def config(self) -> _AttrDict:
        return self.__dict__.setdefault("_internal_dict", _AttrDict())

    def register_to_config(self, **values: Any) -> None:
        self.config.update(values)


class _ModelMixin(torch.nn.Module):
    pass


class _SchedulerMixin:
    pass


@dataclasses.dataclass
class _SchedulerOutput:
    prev_sample: torch.Tensor


def _to_tensor(pic: Any) -> torch.Tensor:
    """torchvision's `to_tensor` for what upstream passes (a PIL image or an HWC array): CHW float in [0, 1]."""
    array = np.asarray(pic)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    return tensor.float().div(255) if array.dtype == np.uint8 else tensor.float()


# module -> the names upstream imports from it, as stand-ins (a package's parents are stubbed empty)
STAND_INS: dict[str, dict[str, Any]] = {
    "transformers": {"AutoTokenizer": placeholder("transformers.AutoTokenizer")},
    "diffusers.configuration_utils": {"ConfigMixin": _ConfigMixin, "register_to_config": _register_to_config},
    "diffusers.models.modeling_utils": {"ModelMixin": _ModelMixin},
    "diffusers.schedulers.scheduling_utils": {
        "KarrasDiffusionSchedulers": enum.Enum("KarrasDiffusionSchedulers", {"FlowUniPCMultistepScheduler": 1}),
        "SchedulerMixin": _SchedulerMixin, "SchedulerOutput": _SchedulerOutput},
    "diffusers.utils": {"deprecate": lambda *args, **kwargs: None,
                        "is_scipy_available": lambda: importlib.util.find_spec("scipy") is not None},
    "torchvision.transforms.functional": {"to_tensor": _to_tensor},
    "tqdm": {"tqdm": lambda iterable=None, *args, **kwargs: iterable},
    "easydict": {"EasyDict": _AttrDict},
    "ftfy": {"fix_text": lambda text, *args, **kwargs: text},
    "regex": {name: getattr(re, name) for name in ("compile", "sub")},
}
STAND_IN_NOTES = {
    "transformers": "AutoTokenizer for the T5 tokenizer (unused; the text encoder is a stand-in); placeholder",
    "diffusers": "ModelMixin -> torch.nn.Module (the DiT's base; its forward is upstream's own), ConfigMixin / "
                 "register_to_config -> the constructor's arguments as .config, the scheduler's mixins; no compute",
    "torchvision": "to_tensor on the input image; numpy stand-in",
    "tqdm": "the chunk loop's progress bar; identity stand-in",
    "easydict": "upstream config objects; dict-with-attributes stand-in",
    "ftfy": "imported for the T5 tokenizer (unused); no-op stand-in",
    "regex": "imported for the T5 tokenizer (unused); stdlib re stand-in",
}


def _stub_module(name: str) -> types.ModuleType:
    parent = name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        _stub_module(parent)
    module = types.ModuleType(name, "wm_jax peer adapter stub")
    module.__spec__ = importlib.util.spec_from_loader(name, loader=None, is_package=True)  # find_spec answers
    module.__path__, module.__package__, module.__wm_jax_stub__ = [], name, True
    module.__dict__.update(STAND_INS.get(name, {}))

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return placeholder(f"{name}.{attr}")

    module.__getattr__ = __getattr__
    _link(name, module)
    return module


def stub(name: str, reason: str, writer: Any, use: str | None = None) -> None:
    """Replaces module `name` (whatever of it was imported goes) by a stub package, with the `STAND_INS`
    modules under it; notes it with `reason` and what it stands in for."""
    for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        del sys.modules[loaded]
    for module in [name] + sorted(m for m in STAND_INS if m.startswith(name + ".")):
        _stub_module(module)
    writer.note(f"stub module {name} ({reason}): {use or STAND_IN_NOTES.get(name, 'not on the timed path')}")


def stub_if_broken(top: str, writer: Any) -> None:
    """Imports the real package `top` and checks it has every name `STAND_INS` lists under it; when that fails
    (missing, or broken: e.g. a torchvision built for another torch), `stub`s it."""
    try:
        for name in sorted({top, *(m for m in STAND_INS if m.startswith(top + "."))}):
            module = importlib.import_module(name)
            for attr in STAND_INS.get(name, {}):
                getattr(module, attr)
    except Exception as err:  # noqa: BLE001 - any failure: the stand-in replaces it
        stub(top, f"{type(err).__name__}: {err}", writer)


# ---------------------------------------------------------------------------------------------- attention

def sdpa_keep_dtype(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=None, **unused):
    """[B, L, N, D] attention by torch SDPA in q's dtype (scale 1/sqrt(D)); for float32 jobs only."""
    if q_scale is not None:
        q = q * q_scale
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype), dropout_p=dropout_p,
        is_causal=causal, scale=softmax_scale)
    return out.transpose(1, 2).contiguous()


def route_attention(root: Path, attention: types.ModuleType, dtype: torch.dtype, writer: Any) -> None:
    """Forces the FLASH_ATTN_*_AVAILABLE flags of `attention` (upstream's wan.modules.attention) off and points
    every `flash_attention` / `attention` name a module of the checkout holds at
    - in a half-precision job, upstream's own SDPA fallback `attention.attention` with flash-attn's dtype rule
      (half inputs in their own dtype, others cast to `dtype`, bfloat16 by default; the output in q's dtype);
    - in a float32 job, `sdpa_keep_dtype` (flash-attn and the fallback would cast to bfloat16)."""
    fallback = attention.attention
    originals = (fallback, attention.flash_attention)
    was_on = [flag for flag in ("FLASH_ATTN_2_AVAILABLE", "FLASH_ATTN_3_AVAILABLE") if getattr(attention, flag, False)]
    for flag in was_on:
        setattr(attention, flag, False)
    if dtype in HALF_DTYPES:
        def routed(q, k, v, *args, version=None, fa_version=None, dtype=torch.bfloat16, **kwargs):
            return fallback(q, k, v, *args, dtype=q.dtype if q.dtype in HALF_DTYPES else dtype, **kwargs).to(q.dtype)

        target = (f"upstream's SDPA fallback {attention.__name__}.attention (flash flags off) with flash-attn's "
                  "dtype rule (half inputs keep their dtype, others are cast to its dtype argument, bfloat16 by "
                  "default) = torch scaled_dot_product_attention (cuDNN backend forced on CUDA)")
    else:
        routed = sdpa_keep_dtype
        target = (f"torch scaled_dot_product_attention in the inputs' dtype ({dtype}; upstream's SDPA fallback "
                  f"{attention.__name__}.attention, like flash-attn, would cast to bfloat16)")
    names = []
    for name, module in sorted(sys.modules.items()):
        if module is None or not under(_file(module), root):
            continue
        for attr in ("flash_attention", "attention"):
            if any(module.__dict__.get(attr) is f for f in originals):
                setattr(module, attr, routed)
                names.append(f"{name}.{attr}")
    if not names:
        raise RuntimeError(f"found no flash_attention / attention to route in the modules of {root}")
    writer.note(f"attention: flash-attn is not used{' (it is installed: ' + ', '.join(was_on) + ' forced off)' if was_on else ''}; "
                f"{', '.join(names)} -> {target}")
