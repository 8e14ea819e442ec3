"""Few-step flow-matching schedules of the causal models (computed in float64, stored float32).

Flow matching: x_t = (1 − σ) x0 + σ ε, the network predicts v ≈ ε − x0 from (x_t, t), so
x0 = x_t − σ v. Shift warp: σ' = sσ / (1 + (s − 1)σ).

A `StepSchedule` holds, per denoising pass i: the timestep the network sees (`t`), the σ used to
turn its flow into x0 (`sigma_x0`), and the σ used to re-noise x0 towards pass i+1 (`sigma_next`;
the last entry is unused). Upstream looks σ up from t in a table, and for LingBot-Fast the integer t
table has duplicates: x0 uses the first match and re-noising the second. Both are reproduced.

A `StepSchedule` is a pytree of its three arrays, so a compiled denoise program takes it as an input
and depends only on the number of passes. `BlockSchedules` says which schedule each generated block
uses: Causal-Forcing++ runs a longer list on the first block only (`first`), `rest` after.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


def shift_warp(sigma: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


@dataclass(frozen=True)
class StepSchedule:
    t: np.ndarray  # [k] float32: network timestep per pass
    sigma_x0: np.ndarray  # [k] float32
    sigma_next: np.ndarray  # [k] float32: σ of pass i+1 (re-noise target); last entry 0, unused

    @property
    def num_steps(self) -> int:
        return len(self.t)


jax.tree_util.register_dataclass(StepSchedule, data_fields=["t", "sigma_x0", "sigma_next"], meta_fields=[])


@dataclass(frozen=True)
class BlockSchedules:
    """The schedule of each generated block: `first` on block 0 when given, `rest` on every other block.

    Blocks count generated chunks only (an I2V image latent committed up front is not a block)."""

    rest: StepSchedule
    first: StepSchedule | None = None

    def __post_init__(self):
        first, rest = self.first, self.rest
        if first is not None and first.num_steps == rest.num_steps and not all(
                np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(rest))):
            raise ValueError(f"the first block's list has as many passes ({first.num_steps}) as the other blocks' "
                             "but other timesteps; a rollout compiles one denoise program per pass count, with "
                             "one schedule each: give the first block a list of another length, or none")

    def for_block(self, block: int) -> StepSchedule:
        if block < 0:
            raise ValueError(f"block {block}: generated blocks count from 0")
        return self.first if block == 0 and self.first is not None else self.rest

    @property
    def by_passes(self) -> dict[int, StepSchedule]:
        """Pass count -> its schedule: one compiled denoise program each."""
        return {s.num_steps: s for s in (self.rest, self.first) if s is not None}


def self_forcing_schedule(shift: float = 5.0, steps=(1000, 750, 500, 250), warp: bool = True) -> StepSchedule:
    """Self-Forcing / CausVid / Causal-Forcing: 1000-entry shifted table σ_j = warp(linspace(1, 0, 1001)[j]),
    t_j = 1000σ_j (float). Default shift 5 (Self-Forcing's and Causal-Forcing's CLI configs); demo.py,
    FlashDreams and CausVid use 8.

    warp True: step s maps to table index 1000 − s (s = 0 to the appended t = σ = 0). warp False (CausVid's
    released 3-step model): the network sees the raw step as t, and σ is the table's σ at the entry whose
    t is nearest (upstream's argmin lookup), for x0 and for re-noising towards the next step alike."""
    sigmas = shift_warp(np.linspace(1.0, 0.0, 1001)[:-1], shift)
    steps = np.asarray(steps, np.float64)
    if warp:
        index = 1000 - steps.astype(np.int64)
        t = np.concatenate([sigmas * 1000.0, [0.0]])[index]
        sigma = np.concatenate([sigmas, [0.0]])[index]
    else:
        t = steps
        sigma = sigmas[np.abs(sigmas[None, :] * 1000.0 - steps[:, None]).argmin(axis=1)]
    t, sigma = t.astype(np.float32), sigma.astype(np.float32)
    return StepSchedule(t=t, sigma_x0=sigma, sigma_next=np.append(sigma[1:], np.float32(0.0)))


def lingbot_fast_schedule(shift: float = 10.0, indices=(0, 179, 358, 679), num_train_timesteps: int = 1000,
                          ) -> StepSchedule:
    """LingBot-World Fast (UniPC table, integer t): σ = warp(linspace(0.999, 0, 1001)[:-1]),
    t = int64(1000σ); picks `indices` → t = [999, 978, 947, 825] at shift 10. x0 uses the σ of the
    first table entry equal to t, re-noising the σ of the second one (upstream's two lookups)."""
    sigma_max = 1.0 - 1.0 / num_train_timesteps
    sigmas = shift_warp(np.linspace(sigma_max, 0.0, num_train_timesteps + 1)[:-1], shift).astype(np.float32)
    table_t = (sigmas.astype(np.float64) * num_train_timesteps).astype(np.int64)
    t = table_t[list(indices)]

    def sigma_of(value: int, second_duplicate: bool) -> np.float32:
        matches = np.nonzero(table_t == value)[0]
        return sigmas[matches[1] if second_duplicate and len(matches) > 1 else matches[0]]

    sigma_x0 = np.array([sigma_of(v, False) for v in t], np.float32)
    sigma_next = np.array([sigma_of(v, True) for v in t[1:]] + [0.0], np.float32)
    return StepSchedule(t=t.astype(np.float32), sigma_x0=sigma_x0, sigma_next=sigma_next)
