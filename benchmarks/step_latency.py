"""Per-AR-step latency (FlashDreams' method) with peers in the same call: the script behind `wm-jax bench`.

Every field of `wm_jax.bench.step_latency.BenchOptions` is a flag (`--peer NAME=DIR` repeatable; DIR may be
empty for an installed diffusers). The module docstring there states what is measured and how.

GPU runs (exact commands, as README's Performance section):

    python benchmarks/step_latency.py --slug self-forcing-wan2.1-t2v-1.3b --peer self-forcing=$SF \
        --peer diffusers-wan= --json $OUT/bench_sf.json --plot $OUT/bench_sf.png
    python benchmarks/step_latency.py --slug lingbot-world-fast --decoders taehv --peer lingbot-fast=$LB \
        --json $OUT/bench_lingbot.json
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


def parse_args(argv=None) -> S.BenchOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(S.BenchOptions)
    for field in dataclasses.fields(S.BenchOptions):
        hint = str(hints[field.name])
        if field.name == "peers":
            p.add_argument("--peer", action="append", default=[], metavar="NAME=DIR",
                           help="a peer and its checkout (repeatable); NAME= for an installed package")
        elif hint.startswith("tuple"):
            p.add_argument(f"--{field.name}", default=None, help="comma list")
        elif "bool" in hint:
            p.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = int if "int" in hint else float if "float" in hint else str
            p.add_argument(f"--{field.name}", type=kind, default=field.default)
    args = vars(p.parse_args(argv))
    peers = []
    for item in args.pop("peer"):
        name, _, folder = item.partition("=")
        peers.append((name, folder or None))
    if args["decoders"] is not None:
        args["decoders"] = tuple(d for d in args["decoders"].split(",") if d and d != "none")
    return S.BenchOptions(**args, peers=tuple(peers))


def main(argv=None):
    report = S.run_bench(parse_args(argv), log=lambda line: print(line, flush=True))
    print()
    print(R.format_report(report))


if __name__ == "__main__":
    main()
