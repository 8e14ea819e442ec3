"""The newcomer's first run: `wm-jax run <slug>` timed from a cold start, as README quotes it.

    python benchmarks/first_run.py --json benchmarks/results/first_run_tiny_cpu_<date>.json

Runs the command `--repeats` times in a subprocess, each from a fresh `git clone` of this checkout's HEAD
(wm_jax imported from it, so no bytecode of ours is cached; installed packages as they are), and records
the seconds until the first stage line, the total wall time and the run's own stats (load, compilation
per program, steady chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from wm_jax.bench.common import format_table, run_metadata, write_json  # noqa: E402


def one_run(slug: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        clone, out = Path(tmp) / "wm_jax", Path(tmp) / "out"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "PYTHONPATH": str(clone)}
        command = [sys.executable, "-m", "wm_jax.cli", "run", slug, "--output_dir", str(out), *extra]
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=clone)
        first_line, lines = None, []
        for line in process.stdout:
            first_line = first_line if first_line is not None else time.perf_counter() - start
            lines.append(line.rstrip())
        if process.wait() != 0:
            raise SystemExit("\n".join(lines))
        wall = time.perf_counter() - start
        stats = json.loads((out / f"stats_{slug}.json").read_text())
    return {"first_line_seconds": first_line, "wall_seconds": wall, "output": lines,
            "load_seconds": stats["load_seconds"], "compile_seconds": stats["compile_seconds"],
            "steady_state": stats["steady_state"], "num_frames": stats["num_frames"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slug", default="tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("extra", nargs="*", help="more flags for wm-jax run")
    args = parser.parse_args()
    runs = [one_run(args.slug, args.extra) for _ in range(args.repeats)]
    rows = [[i, r["first_line_seconds"], r["wall_seconds"], r["load_seconds"], r["compile_seconds"]["total"],
             r["steady_state"]["total_ms"]] for i, r in enumerate(runs)]
    print(format_table(["run", "first line s", "wall s", "load s", "compile s", "steady ms/chunk"], rows))
    walls = sorted(r["wall_seconds"] for r in runs)
    report = {**run_metadata(), "slug": args.slug, "median_wall_seconds": walls[len(walls) // 2], "runs": runs}
    print(f"median wall {report['median_wall_seconds']:.1f} s over {len(runs)} cold runs")
    write_json(args.json, report)


if __name__ == "__main__":
    main()
