"""Benchmarks as a product feature: `wm-jax bench <slug>` (per-AR-step latency of our streaming step, measured
the way FlashDreams does) with the peers' own loops run in the same call (`wm_jax.bench.peers`)."""
