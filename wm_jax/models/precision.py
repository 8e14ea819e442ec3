"""Matmul / convolution precision given by the caller as a `jax.lax.Precision` or its name."""

from __future__ import annotations

import jax


def precision_from_name(p: str | jax.lax.Precision | None) -> jax.lax.Precision | None:
    """None, a `jax.lax.Precision`, or its name ("default", "high", "highest") -> None or the Precision."""
    if p is None or isinstance(p, jax.lax.Precision):
        return p
    try:
        return jax.lax.Precision[str(p).upper()]
    except KeyError:
        raise ValueError(f"unknown precision {p!r}; use default, high or highest") from None
