"""Helpers shared by the parity runners."""

from __future__ import annotations

from typing import Any


def model_overrides(config: dict) -> dict[str, Any]:
    """WanConfig overrides from a golden case's upstream constructor arguments (`model_config`)."""
    mc = config.get("model_config", {})
    out: dict[str, Any] = {}
    for name in ("num_heads", "eps", "text_len"):
        if name in mc:
            out[name] = mc[name]
    if tuple(mc.get("patch_size", (1, 2, 2))) != (1, 2, 2):
        raise ValueError(f"patch_size {mc['patch_size']} is not supported (only (1, 2, 2))")
    return out
