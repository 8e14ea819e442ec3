"""Child process of a peer run: `python -m wm_jax.bench.peers.runner JOB.json RESULT.json`.

Reads the `PeerJob`, imports the peer's adapter (which imports torch and the upstream checkout), runs it with
cuDNN SDPA forced, and leaves RESULT.json complete after every chunk; an exception ends the run with its last
line in `error` and exit status 1 (what was measured before it stays).
"""

from __future__ import annotations

import importlib
import sys
import traceback
from pathlib import Path

from wm_jax.bench.peers.job import PeerJob, ResultWriter


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m wm_jax.bench.peers.runner JOB.json RESULT.json\n")
        return 2
    from wm_jax.bench.peers import PEERS

    job = PeerJob.from_json(Path(argv[1]).read_text())
    writer = ResultWriter(argv[2], job.peer)
    try:
        import torch

        from wm_jax.bench.peers import torch_timing

        device = torch.device(job.device)
        writer.set(torch=torch.__version__, device_name=torch_timing.device_name(device))
        adapter = importlib.import_module(PEERS[job.peer].module)
        with torch_timing.cudnn_sdpa(device):
            adapter.run(job, writer, device)
        writer.set(peak_memory_gib=torch_timing.peak_memory_gib(device))
    except BaseException as err:  # noqa: BLE001 - the parent reports it in the peer's row
        traceback.print_exc()
        lines = [line for line in traceback.format_exception_only(type(err), err) if line.strip()]
        writer.set(error=lines[-1].strip() if lines else type(err).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
