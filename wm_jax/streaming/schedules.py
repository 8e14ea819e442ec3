"""Few-step flow-matching schedules of the causal models (computed in float64, stored float32).

Flow matching: x_t = (1 − σ) x0 + σ ε, the network predicts v ≈ ε − x0 from (x_t, t), so
x0 = x_t − σ v. Shift warp: σ' = sσ / (1 + (s − 1)σ).

A `StepSchedule` holds, per denoising pass i: the timestep the network sees (`t`), the σ used to
turn its flow into x0 (`sigma_x0`), and the σ used to re-noise x0 towards pass i+1 (`sigma_next`;
the last entry is unused). Upstream looks σ up from t in a table, and for LingBot-Fast the integer t
table has duplicates: x0 uses the first match and re-noising the second. Both are reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def self_forcing_schedule(shift: float = 5.0, steps=(1000, 750, 500, 250)) -> StepSchedule:
    """Self-Forcing / CausVid: 1000-entry warped table σ_j = warp(linspace(1, 0, 1001)[j]), t_j = 1000σ_j
    (float); step s maps to table index 1000 − s. Default shift 5 (official CLI config); demo.py and
    FlashDreams use 8."""
    sigmas = shift_warp(np.linspace(1.0, 0.0, 1001)[:-1], shift)
    table_t = np.concatenate([sigmas * 1000.0, [0.0]])
    table_sigma = np.concatenate([sigmas, [0.0]])
    index = 1000 - np.asarray(steps)
    t = table_t[index].astype(np.float32)
    sigma = table_sigma[index].astype(np.float32)
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
