"""Golden case `lingbot_v2_rollout`: LingBot-World v2 causal-fast (`infer_mode causal_fast`).

The same loop as LingBot-World Fast (`lingbot_fast_rollout`) with v2's settings, all read from the case:
chunk 4, timesteps at table indices [0, 250, 500, 750] (t = [999, 967, 908, 768]: x0 takes the σ of the
first table entry equal to t, re-noising that of the second), and a sink of 6 latent frames that is not a
whole number of chunks. Upstream's window (local_attn_size 18) counts the sink and the current chunk,
so the cache holds the sink plus a ring of the 8 most recent committed frames; chunk 1 is split between
the sink and the ring, and later chunks straddle the ring's wrap (the per-frame slot writes of
`streaming.kv_cache.commit`). The camera tensor is `c2ws_plucker_emb`, [1, 384, lat_f, h, w].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wm_jax.parity.lingbot_fast_rollout import lingbot_causal_rollout


def run(case_dir: Path, config: dict, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return lingbot_causal_rollout(case_dir, config, inputs, camera_name="c2ws_plucker_emb")
