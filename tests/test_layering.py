"""Imports run downward only; only the CLI words errors in `--flag` names.

Layers, top to bottom (a module may import its own package and the layers below it):

    wm_jax (package root), wm_jax.cli > wm_jax.serve > wm_jax.bench > wm_jax.train > wm_jax.parity > wm_jax.streaming
    > converters > wm_jax.models > wm_jax.parallel > wm_jax.kernels > wm_jax.worlds > wm_jax.io > wm_jax.errors

bench (our step benchmark and the peers' adapters, which import torch and a user's checkout in a child
process) sits beside serve: it drives the streaming step, and nothing below it imports it.

parity runs our implementation on golden cases, so it may use streaming; streaming never imports parity.
worlds (the procedural training world and the player's motion) sits just above io: serve's live controls
use its motion model, and it never imports models, streaming or serve.
Every import counts, including those inside functions; cycles are checked among module-level imports.

Library code names options as `{name}` placeholders (wm_jax.errors); only wm_jax/cli.py writes `--name`.
The one exception is `wm_jax.io.hub.hub_cli_command`, which spells out the Hugging Face CLI's own flags.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from wm_jax import cli
from wm_jax.errors import OptionError

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("wm_jax", "converters")
FIRST_PARTY = {"wm_jax", "converters", "configs", "tests", "benchmarks"}
TOP = ("wm_jax", "wm_jax.cli")  # exact modules: the package root and the CLI
LAYERS = ("wm_jax.serve", "wm_jax.bench", "wm_jax.train", "wm_jax.parity", "wm_jax.streaming", "converters",
          "wm_jax.models", "wm_jax.parallel", "wm_jax.kernels", "wm_jax.worlds", "wm_jax.io",
          "wm_jax.errors")  # packages (or modules) with their submodules


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))}


MODULES = _sources()


def _layer(module: str) -> tuple[int, str] | None:
    """(rank, short name) of the layer holding `module`, rank 0 at the top; None outside every layer."""
    if module in TOP:
        return 0, module.rsplit(".", 1)[-1]
    for rank, package in enumerate(LAYERS, start=1):
        if module == package or module.startswith(package + "."):
            return rank, package.rsplit(".", 1)[-1]
    return None


def _is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").is_file()


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module named by a (possibly relative) `from X import ...`."""
    if not node.level:
        return node.module
    base = importer if _is_package(importer) else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(importer: str, tree: ast.AST, module_level: bool) -> list[tuple[int, str]]:
    """(line, first-party module) of every import; `from pkg import sub` names the submodule `pkg.sub`.

    With `module_level`, only the imports that run when the module is imported (none inside functions)."""
    found = []

    def visit(node):
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(importer, node)
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else module))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [(line, module) for line, module in found if module.split(".")[0] in FIRST_PARTY]


def _trees() -> dict[str, ast.AST]:
    return {module: ast.parse(path.read_text(), str(path)) for module, path in MODULES.items()}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) is None] == []


def test_imports_run_downward():
    violations = []
    for importer, tree in _trees().items():
        rank, name = _layer(importer)
        for line, module in _imports(importer, tree, module_level=False):
            target = _layer(module)
            if target is None:
                violations.append(f"{MODULES[importer].relative_to(ROOT)}:{line} imports {module} "
                                  f"(no layer: {name} may import only the layers below it)")
            elif target[0] < rank:
                violations.append(f"{MODULES[importer].relative_to(ROOT)}:{line} imports {module} "
                                  f"({name} may not import {target[1]})")
    assert not violations, "imports that go up the layers:\n" + "\n".join(violations)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles():
    graph = {module: {m for _, m in _imports(module, tree, module_level=True) if m in MODULES and m != module}
             for module, tree in _trees().items()}
    cycles = _cycles(graph)
    assert not cycles, "module-level import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


# ---------------------------------------------------------------------------------------------------
# Option names in messages.
# ---------------------------------------------------------------------------------------------------

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*")
DASHES = re.compile(r"(?<![\w-])--$")  # an f-string part right before a field: f"--{name}"
CLI = "wm_jax/cli.py"
FOREIGN_FLAGS = {("wm_jax/io/hub.py", "hub_cli_command"),  # (file, function) spelling another program's flags
                 ("wm_jax/bench/report.py", "main")}  # `python -m wm_jax.bench.report`: its own argument parser


def test_option_error_renders_flags_in_the_cli_only(capsys):
    err = OptionError("x", "bad {x} 3; lower it or raise {y_max} (found {'x': 1} in {3})")
    assert isinstance(err, ValueError) and err.option == "x"
    assert str(err) == "bad x 3; lower it or raise y_max (found {'x': 1} in {3})"

    def main(argv):
        raise err

    with pytest.raises(SystemExit) as exit_info:
        cli._friendly_errors(main)(["wm-jax run"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "wm-jax: error: bad --x 3; lower it or raise --y_max (found {'x': 1} in {3})\n"


def _flag_literals(path: Path) -> list[str]:
    """`file:line` + text of every string literal (f-string parts included) naming a flag, or building
    one as f"--{name}".

    Docstrings are documentation, not messages: they may describe the command line."""
    found = []
    where = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and ast.get_docstring(n, clean=False) is not None}

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        allowed = id(node) in docstrings or (where, function) in FOREIGN_FLAGS
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and FLAG.search(node.value) and not allowed:
            found.append(f"{where}:{node.lineno} {', '.join(FLAG.findall(node.value))} in {node.value!r}")
        if isinstance(node, ast.JoinedStr) and not allowed:
            found.extend(f"{where}:{node.lineno} --{{{ast.unparse(field.value)}}} in {ast.unparse(node)}"
                         for part, field in zip(node.values, node.values[1:])
                         if isinstance(part, ast.Constant) and isinstance(field, ast.FormattedValue)
                         and DASHES.search(part.value))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, None)
    return found


def test_only_the_cli_writes_flag_names():
    offenders = [line for module, path in MODULES.items() if module != "wm_jax.cli" for line in _flag_literals(path)]
    assert not offenders, ("string literals naming --flags outside " + CLI + " (name options as {name} "
                           "placeholders, see wm_jax.errors):\n" + "\n".join(offenders))


def test_foreign_flags_are_spelled_out_where_allowed():
    """The allowlist names real functions, and they do spell out flags (else the entry is stale)."""
    for where, function in FOREIGN_FLAGS:
        tree = ast.parse((ROOT / where).read_text())
        [node] = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function]
        assert any(isinstance(n, ast.Constant) and isinstance(n.value, str) and FLAG.search(n.value)
                   for n in ast.walk(node)), (where, function)
