"""Rule-driven conversion of upstream (PyTorch) tensors into a model's flat parameter dict.

A converter is a list of `Rule`s. Each rule maps one upstream key pattern to one parameter path of the
Flax module, with a layout transform. `{i}` in a pattern is a layer index: those parameters are stacked
on a leading layer axis, as the scanned modules hold them.

`iter_converted` checks the whole key set BEFORE reading any data — missing keys, unexpected keys and
mis-shaped tensors are reported together, each with the shape that was expected — then yields one
finished parameter at a time (a stacked parameter gathered from all its layers), so a converter can
write each one out and free it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flax import nnx

from wm_jax.io import checkpoint as ckpt
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import Source, open_source

Shape = tuple[int, ...]


# ---------------------------------------------------------------------------------------------------
# Layout transforms: torch layout -> Flax layout, with the inverse shape map for up-front checks.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """`apply(torch_array) -> flax_array`; `source_shape(flax_shape) -> torch_shape` (None: not derivable)."""

    name: str
    apply: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[Shape], Shape | None]


IDENTITY = Transform("identity", lambda a: a, lambda s: s)
# nn.Linear weight [out, in] -> Dense kernel [in, out].
LINEAR = Transform("linear", lambda a: a.T, lambda s: tuple(reversed(s)))
# A leading singleton axis dropped ([1, 6, D] modulation -> [6, D]).
SQUEEZE_LEADING = Transform("squeeze_leading", lambda a: a.reshape(a.shape[1:]), lambda s: (1, *s))
# Conv3d OIDHW -> DHWIO; Conv2d OIHW -> HWIO.
CONV3D = Transform("conv3d", lambda a: a.transpose(2, 3, 4, 1, 0), lambda s: (s[4], s[3], s[0], s[1], s[2]))
CONV2D = Transform("conv2d", lambda a: a.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]))


def patch_conv_as_dense(patch: tuple[int, int, int]) -> Transform:
    """Conv3d with kernel == stride == `patch`, [D, C, pt, ph, pw] -> Dense kernel [C*pt*ph*pw, D].

    The Dense input features are ordered (c, pt, ph, pw), c slowest — the order `patchify` produces.
    """
    pt, ph, pw = patch

    def source_shape(s: Shape) -> Shape:
        return (s[1], s[0] // (pt * ph * pw), pt, ph, pw)

    return Transform("patch_conv_as_dense", lambda a: a.reshape(a.shape[0], -1).T, source_shape)


# ---------------------------------------------------------------------------------------------------
# Rules.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    source: str  # upstream key pattern, e.g. "blocks.{i}.self_attn.q.weight"
    target: str  # flat parameter path, e.g. "blocks/self_attn/q/kernel"
    transform: Transform = IDENTITY

    @property
    def stacked(self) -> bool:
        return "{i}" in self.source

    def regex(self) -> re.Pattern:
        return re.compile(re.escape(self.source).replace(re.escape("{i}"), r"(\d+)") + r"\Z")

    def key(self, layer: int | None = None) -> str:
        return self.source.replace("{i}", str(layer)) if layer is not None else self.source


def linear_rules(source_prefix: str, target_prefix: str, bias: bool = True) -> list[Rule]:
    """nn.Linear `<prefix>.weight/.bias` -> Dense `<target>/kernel`, `<target>/bias`."""
    rules = [Rule(f"{source_prefix}.weight", f"{target_prefix}/kernel", LINEAR)]
    if bias:
        rules.append(Rule(f"{source_prefix}.bias", f"{target_prefix}/bias"))
    return rules


@dataclass
class ConversionReport:
    """What a conversion consumed; `ignored` lists keys dropped on purpose (e.g. buffers)."""

    source: str
    num_tensors: int = 0
    num_bytes_read: int = 0
    ignored: list[str] = field(default_factory=list)


def _describe(items: Sequence[str], limit: int = 25) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return "\n  " + shown + more


def plan_conversion(source: Source, rules: Sequence[Rule], expected: Mapping[str, tuple[Shape, np.dtype]],
                    ignore: Sequence[str] = ()) -> tuple[dict[str, tuple[Rule, int | None]], list[str]]:
    """Matches every source key to a rule and checks shapes; raises CheckpointError listing all problems.

    Args:
      source: upstream tensors.
      rules: the converter's rules. Rules whose target is not in `expected` do not apply (optional parts
        of the architecture that this config does not have); their keys count as unexpected.
      expected: flat parameter path -> (shape, dtype) of the target module; stacked paths include the
        leading layer axis.
      ignore: regexes of source keys that are dropped on purpose.

    Returns:
      (source key -> (rule, layer or None)), and the list of ignored keys.
    """
    active = [r for r in rules if r.target in expected]
    covered = {r.target for r in active}
    uncovered = sorted(set(expected) - covered)
    if uncovered:
        raise AssertionError(f"converter has no rule for model parameters {uncovered}")
    patterns = [(r.regex(), r) for r in active]
    ignore_res = [re.compile(p) for p in ignore]
    plan: dict[str, tuple[Rule, int | None]] = {}
    unexpected, ignored, misshaped = [], [], []
    for key in source.keys():
        for rx, rule in patterns:
            m = rx.match(key)
            if m:
                layer = int(m.group(1)) if rule.stacked else None
                plan[key] = (rule, layer)
                break
        else:
            if any(rx.match(key) for rx in ignore_res):
                ignored.append(key)
            else:
                unexpected.append(f"{key} {list(source.shape(key))}")
    missing = []
    for rule in active:
        shape, _ = expected[rule.target]
        layers = range(shape[0]) if rule.stacked else [None]
        want = rule.transform.source_shape(shape[1:] if rule.stacked else shape)
        for layer in layers:
            key = rule.key(layer)
            if key not in plan:
                missing.append(f"{key} (expected shape {list(want) if want else '?'})")
            elif want is not None and tuple(source.shape(key)) != tuple(want):
                misshaped.append(f"{key}: got {list(source.shape(key))}, expected {list(want)}")
    for key, (rule, layer) in plan.items():
        if rule.stacked and layer >= expected[rule.target][0][0]:
            unexpected.append(f"{key} (layer {layer}, but the model has {expected[rule.target][0][0]} layers)")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s):" + _describe(missing))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (no rule maps them):" + _describe(sorted(unexpected)))
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s):" + _describe(misshaped))
    if problems:
        raise CheckpointError(f"{source.description}: checkpoint does not match the model config:\n"
                              + "\n".join(problems))
    return plan, ignored


def iter_converted(source: Source, rules: Sequence[Rule], expected: Mapping[str, tuple[Shape, np.dtype]],
                   ignore: Sequence[str] = (), on_tensor: Callable[[str], None] | None = None,
                   report: ConversionReport | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (parameter path, array shaped/typed as `expected`) one parameter at a time.

    A stacked parameter is assembled from its per-layer tensors (wherever they are stored) before it
    is yielded, so memory holds one parameter plus one tensor, never the whole model. The whole key
    set is checked before the first read (`plan_conversion`).
    """
    plan, ignored = plan_conversion(source, rules, expected, ignore)
    if report is not None:
        report.ignored = ignored
    by_target: dict[str, list[tuple[str, int | None]]] = {}
    for key, (rule, layer) in plan.items():
        by_target.setdefault(rule.target, []).append((key, layer))
    rule_of = {rule.target: rule for rule, _ in plan.values()}
    for target, keys in by_target.items():
        rule = rule_of[target]
        shape, dtype = expected[target]
        out = np.empty(shape, dtype)
        for key, layer in keys:
            value = rule.transform.apply(source.read(key))
            want = shape[1:] if rule.stacked else shape
            if tuple(value.shape) != tuple(want):
                raise CheckpointError(f"{source.description}: {key} becomes {list(value.shape)} after "
                                      f"{rule.transform.name}, expected {list(want)}")
            if rule.stacked:
                out[layer] = value
            else:
                out[...] = value
            if report is not None:
                report.num_tensors += 1
                report.num_bytes_read += value.nbytes
            del value
            if on_tensor is not None:
                on_tensor(key)
        yield target, out
        del out


def convert_tensors(source: Source, rules: Sequence[Rule], expected: Mapping[str, tuple[Shape, np.dtype]],
                    ignore: Sequence[str] = (), on_tensor: Callable[[str], None] | None = None,
                    ) -> tuple[dict[str, np.ndarray], ConversionReport]:
    """All parameters at once, in memory (small models, tests): dict(iter_converted(...)) and its report."""
    report = ConversionReport(source.description)
    out = dict(iter_converted(source, rules, expected, ignore, on_tensor, report))
    return out, report


# ---------------------------------------------------------------------------------------------------
# Sources in, modules out (shared by the converter modules).
# ---------------------------------------------------------------------------------------------------


def as_source(source: Source | str | os.PathLike, allow_pickle: bool = False) -> Source:
    """A Source as is; a path via `open_source` (a `.pth` only with `allow_pickle=True`)."""
    if isinstance(source, (str, os.PathLike)):
        return open_source(source, allow_pickle=allow_pickle)
    return source


def make_config(source: Source, config_cls: type, fields: Mapping[str, Any], what: str) -> Any:
    """`config_cls(**fields)`; a bad field or value is raised as a CheckpointError naming the source and `what`."""
    try:
        return config_cls(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source.description}: bad {what} config {dict(fields)}: {err}") from None


def with_params(build: Callable[[], nnx.Module], flat: Mapping[str, np.ndarray]) -> nnx.Module:
    """`build()` traced abstractly (nothing allocated), then every parameter set from `flat` (path -> array)."""
    module = nnx.eval_shape(build)
    ckpt.assign_params(module, flat)
    return module


def load_converted(folder: str | os.PathLike, kind: str, config_cls: type, build: Callable[[Any], nnx.Module],
                   expected: Callable[[Any], Mapping[str, tuple[Shape, np.dtype]]] | None = None,
                   shardings: Mapping[str, Any] | None = None) -> nnx.Module:
    """Loads a converted folder of `kind` (refusing another kind): `config_cls.from_dict` of its manifest's
    config, `build(config)` traced abstractly, then its parameters restored in place.

    expected: config -> flat path -> (shape, dtype) as stored (default: the built module's parameters);
    shardings: path -> sharding of the restored arrays (default: the default device).
    """
    manifest = ckpt.read_manifest(folder, kind=kind)
    config = config_cls.from_dict(manifest["config"])
    module = nnx.eval_shape(lambda: build(config))
    spec = expected(config) if expected is not None else ckpt.param_spec(module)
    ckpt.assign_params(module, ckpt.restore_params(folder, spec, shardings), put=lambda name, value: value)
    return module
