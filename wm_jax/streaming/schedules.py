"""Few-step flow-matching schedules of the causal models (computed in float64, stored float32).

Flow matching: x_t = (1 − σ) x0 + σ ε, the network predicts v ≈ ε − x0 from (x_t, t), so
x0 = x_t − σ v. Shift warp: σ' = sσ / (1 + (s − 1)σ).

A `StepSchedule` holds, per denoising pass i, the timestep the network sees (`t`) and three scales:

    prediction = x − flow_scale_i · v
    x_next     = signal_scale_i · prediction + noise_scale_i · ε_{i+1}     (unused after the last pass)

For one network, prediction is x0 (flow_scale = σ_i) and re-noising goes to σ_{i+1}
(signal_scale = 1 − σ_{i+1}, noise_scale = σ_{i+1}). Upstream looks σ up from t in a table, and for
LingBot-Fast the integer t table has duplicates: x0 uses the first match and re-noising the second.
Both are reproduced.

Two-expert models (FastVideo's causal Wan2.2 A14B, `boundary_schedule`) run their high-noise passes
first, then the low-noise ones (`expert_passes`). A high-noise pass predicts the latent at the boundary
σ_b rather than x0 (flow_scale = σ_i − σ_b) and re-noises it to σ_{i+1} with α = (1 − σ_{i+1}) /
(1 − σ_b), β = sqrt(σ_{i+1}² − (α σ_b)²); the last high-noise pass hands its boundary latent to the first
low-noise pass unchanged (signal 1, noise 0) although that pass is told its own t.

A `StepSchedule` is a pytree of its four arrays (`expert_passes` is static), so a compiled denoise
program takes it as an input and depends only on the number of passes (and their split between
experts). `BlockSchedules` says which schedule each generated block uses: Causal-Forcing++ runs a
longer list on the first block only (`first`), `rest` after.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np


def shift_warp(sigma: np.ndarray, shift: float) -> np.ndarray:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


@dataclass(frozen=True)
class StepSchedule:
    """Per-pass timesteps and update scales (module docstring); arrays [k] float32.

    expert_passes: passes run by each expert in turn, (k,) for a single network, (high, low) for an
    expert pair (`boundary_schedule`)."""

    t: np.ndarray
    flow_scale: np.ndarray
    signal_scale: np.ndarray
    noise_scale: np.ndarray
    expert_passes: tuple[int, ...]

    @classmethod
    def renoising(cls, t, sigma_x0, sigma_next) -> StepSchedule:
        """One network: x0 = x − σ^x0_i v, then x = (1 − σ^next_i) x0 + σ^next_i ε (the last σ^next unused)."""
        sigma_next = np.asarray(sigma_next, np.float32)
        return cls(t=np.asarray(t, np.float32), flow_scale=np.asarray(sigma_x0, np.float32),
                   signal_scale=(np.float32(1.0) - sigma_next).astype(np.float32), noise_scale=sigma_next,
                   expert_passes=(len(sigma_next),))

    @property
    def num_steps(self) -> int:
        return len(self.t)


jax.tree_util.register_dataclass(StepSchedule, data_fields=["t", "flow_scale", "signal_scale", "noise_scale"],
                                 meta_fields=["expert_passes"])


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


def self_forcing_sigmas(shift: float) -> np.ndarray:
    """Self-Forcing's 1000-entry scheduler table (float64): σ_j = warp(linspace(1, 0, 1001)[j]), t_j = 1000σ_j."""
    return shift_warp(np.linspace(1.0, 0.0, 1001)[:-1], shift)


def self_forcing_schedule(shift: float = 5.0, steps=(1000, 750, 500, 250), warp: bool = True) -> StepSchedule:
    """Self-Forcing / CausVid / Causal-Forcing: 1000-entry shifted table σ_j = warp(linspace(1, 0, 1001)[j]),
    t_j = 1000σ_j (float). Default shift 5 (Self-Forcing's and Causal-Forcing's CLI configs); demo.py,
    FlashDreams and CausVid use 8.

    warp True: step s maps to table index 1000 − s (s = 0 to the appended t = σ = 0). warp False (CausVid's
    released 3-step model): the network sees the raw step as t, and σ is the table's σ at the entry whose
    t is nearest (upstream's argmin lookup), for x0 and for re-noising towards the next step alike."""
    sigmas = self_forcing_sigmas(shift)
    steps = np.asarray(steps, np.float64)
    if warp:
        index = 1000 - steps.astype(np.int64)
        t = np.concatenate([sigmas * 1000.0, [0.0]])[index]
        sigma = np.concatenate([sigmas, [0.0]])[index]
    else:
        t = steps
        sigma = sigmas[np.abs(sigmas[None, :] * 1000.0 - steps[:, None]).argmin(axis=1)]
    t, sigma = t.astype(np.float32), sigma.astype(np.float32)
    return StepSchedule.renoising(t, sigma, np.append(sigma[1:], np.float32(0.0)))


def boundary_schedule(shift: float, steps, boundary: float) -> StepSchedule:
    """A two-expert model's passes (FastVideo's causal Wan2.2 sampler): the warped Self-Forcing `steps` at
    `shift`; passes whose t >= boundary·1000 run the high-noise expert, the rest the low-noise one.

    σ_b is the table σ whose t is nearest boundary·1000. High-noise passes predict the boundary latent and
    re-noise it with the boundary rule; the last one hands it to the low-noise expert unchanged; low-noise
    passes are the usual x0 / re-noise ones (module docstring). At shift 5 the default 8-step list gives
    t = 1000, 965.9, 921.05 (high) and 859.4, 729.2, 654.8, 555.6, 416.7 (low)."""
    base = self_forcing_schedule(shift, steps)
    table = self_forcing_sigmas(shift)
    sigma_b = table[np.abs(table * 1000.0 - boundary * 1000.0).argmin()]
    t = base.t
    if np.any(np.diff(t) > 0):
        raise ValueError(f"steps {list(steps)}: a two-expert schedule needs decreasing timesteps")
    high = int(np.sum(t >= np.float32(boundary * 1000.0)))
    k = len(t)
    if high == k:
        raise ValueError(f"steps {list(steps)}: every pass is at t >= {boundary * 1000:g}; the last pass must run "
                         "the low-noise expert")
    sigma = base.flow_scale.astype(np.float64)  # the table σ of each pass
    sigma_next = np.append(sigma[1:], 0.0)
    flow, signal, noise = sigma.copy(), 1.0 - sigma_next, sigma_next.copy()
    for i in range(high):
        flow[i] = sigma[i] - sigma_b
        if i + 1 < high:
            signal[i] = (1.0 - sigma_next[i]) / (1.0 - sigma_b)
            noise[i] = np.sqrt(sigma_next[i] ** 2 - (signal[i] * sigma_b) ** 2)
        else:  # the hand-off: the boundary latent goes to the low-noise expert as it is
            signal[i], noise[i] = 1.0, 0.0
    as32 = lambda a: np.asarray(a, np.float32)
    return StepSchedule(t=t, flow_scale=as32(flow), signal_scale=as32(signal), noise_scale=as32(noise),
                        expert_passes=(high, k - high))


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
    return StepSchedule.renoising(t, sigma_x0, sigma_next)
