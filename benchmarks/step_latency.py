"""Per-AR-step latency (FlashDreams' method) with peers in the same call: the script behind `wm-jax bench`.

Every field of `wm_jax.bench.step_latency.BenchOptions` is a flag of the same name (tuples as comma lists,
`--peer NAME` and `--upstream_dir DIR | NAME=DIR` repeatable, as `wm-jax bench`), plus the development
fields `wm-jax bench` leaves out: `--small` (a 2-layer model on the CPU), `--context_heads`,
`--profile_chunk`, `--encode`, `--vae_dim`, `--text_tokens`, `--seed`. The module docstring of
`wm_jax.bench.step_latency` states what is measured and how. Unlike `wm-jax bench`, it writes JSON and a
plot only where `--json` / `--plot` say.

    # the committed README runs use `wm-jax bench` (README, Performance); the same through this script:
    python benchmarks/step_latency.py --slug self-forcing-wan2.1-t2v-1.3b --peer self-forcing \
        --upstream_dir ~/Self-Forcing --json $OUT/bench_sf.json --plot $OUT/bench_sf.png
    python benchmarks/step_latency.py --total_blocks 7 --decoders taehv --slug lingbot-world-fast --num_devices 2

CPU smoke test: `JAX_PLATFORMS=cpu python benchmarks/step_latency.py --small [--slug lingbot-world-fast]`
(add `XLA_FLAGS=--xla_force_host_platform_device_count=2` and `--num_devices 2` for the mesh)
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # grow on demand: 14B + cache needs > 75 %

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wm_jax.bench import report as R  # noqa: E402
from wm_jax.bench import step_latency as S  # noqa: E402
from wm_jax.bench.peers import pair_peers  # noqa: E402
from wm_jax.errors import OptionError  # noqa: E402


def parse_args(argv=None) -> S.BenchOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(S.BenchOptions)
    for field in dataclasses.fields(S.BenchOptions):
        hint = str(hints[field.name])
        if field.name == "peers":
            p.add_argument("--peer", action="append", default=[], metavar="NAME", help="a peer (repeatable)")
            p.add_argument("--upstream_dir", action="append", default=[], metavar="DIR",
                           help="its checkout: DIR with one --peer, NAME=DIR per peer with several")
        elif hint.startswith("tuple"):
            p.add_argument(f"--{field.name}", default=None, help="comma list")
        elif "bool" in hint:
            p.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = int if "int" in hint else float if "float" in hint else str
            p.add_argument(f"--{field.name}", type=kind, default=field.default)
    args = vars(p.parse_args(argv))
    peers = pair_peers(args.pop("peer"), args.pop("upstream_dir"))
    for name in ("decoders", "attention"):
        if args[name] is not None:
            args[name] = tuple(d for d in args[name].split(",") if d and d != "none")
    return S.BenchOptions(**args, peers=peers)


def main(argv=None):
    try:
        report = S.run_bench(parse_args(argv), log=lambda line: print(line, flush=True))
    except OptionError as err:
        sys.exit(f"error: {err.render(lambda name: f'--{name}')}")
    print()
    print(R.format_report(report))


if __name__ == "__main__":
    main()
