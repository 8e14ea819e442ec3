"""Peak host memory of `wm-jax convert` on a synthetic sharded 14B-shaped checkpoint.

Writes a LingBot-shaped checkpoint (dim 5120, ffn 13824, 40 heads, in_dim 36, camera layers; fewer
blocks) in the ORIGINAL key layout as float32 shards + index json, converts it in a subprocess while
sampling that process's resident memory, and reports the peak as a multiple of the checkpoint size.
Target (issue 2): below 1.3x one expert's size.

    python benchmarks/convert_memory.py --layers 2 --workdir /tmp/wm_jax_convmem --json results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil
from safetensors.numpy import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from wm_jax.models.config import preset  # noqa: E402


def write_checkpoint(folder: Path, layers: int, shard_bytes: int) -> int:
    from tests.wan_testlib import original_key_shapes

    cfg = preset("lingbot-world-fast").replace(num_layers=layers)
    shapes = original_key_shapes(cfg)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    weight_map, shard, shard_size, total, index = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, shard_size, index
        if shard:
            index += 1
            name = f"diffusion_pytorch_model-{index:05d}.safetensors"
            save_file(shard, str(folder / name))
            weight_map.update({k: name for k in shard})
            shard, shard_size = {}, 0

    for key, shape in shapes.items():
        value = rng.standard_normal(shape, dtype=np.float32) * 0.02
        shard[key] = value
        shard_size += value.nbytes
        total += value.nbytes
        if shard_size >= shard_bytes:
            flush()
    flush()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def convert_with_peak(src: Path, dst: Path) -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-m", "wm_jax.cli", "convert", "--src", str(src), "--dst", str(dst)],
                            env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    peak, ps = 0, psutil.Process(proc.pid)
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    start = time.perf_counter()
    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    done.set()
    sampler.join()
    if code:
        raise SystemExit(f"conversion failed with exit code {code}")
    return peak, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--shard_gb", type=float, default=1.0)
    parser.add_argument("--workdir", default="/tmp/wm_jax_convmem")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    size = write_checkpoint(work / "src", args.layers, int(args.shard_gb * 2**30))
    shards = len(list((work / "src").glob("*.safetensors")))
    peak, seconds = convert_with_peak(work / "src", work / "dst")
    result = {"date": date.today().isoformat(), "checkpoint_gib": size / 2**30, "shards": shards,
              "layers": args.layers, "dtype": "float32", "peak_rss_gib": peak / 2**30,
              "peak_over_checkpoint": peak / size, "convert_seconds": seconds,
              "command": " ".join(sys.argv)}
    print(f"{'checkpoint':>12} {'shards':>6} {'peak RSS':>10} {'ratio':>6} {'time':>7}")
    print(f"{size / 2**30:>10.2f}Gi {shards:>6} {peak / 2**30:>8.2f}Gi {peak / size:>6.2f} {seconds:>6.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
