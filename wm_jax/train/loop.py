"""One training stage: optax AdamW over a module's parameters, orbax checkpoints, resume, progress, logs.

The stage's batches come from a `loss(module, key)` function that draws its own data from `key`; the key
of step s is `fold_in(seed, s)`, so a resumed run continues with exactly the batches it would have seen.
Checkpoints go to `workdir/<stage>/checkpoints` (orbax CheckpointManager: parameters + optimiser state,
the last two kept) every `checkpoint_every` steps, at the end, and when the run is interrupted (Ctrl-C);
`workdir/<stage>/log.jsonl` gets one line of metrics every `log_every` steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wm_jax.streaming.memory import DeviceMemoryError, is_out_of_memory


def optimizer(learning_rate: float, warmup_steps: int, steps: int) -> optax.GradientTransformation:
    """AdamW (weight decay 0.01) with linear warmup and cosine decay to 5%, gradients clipped at norm 1."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(warmup_steps, max(steps - 1, 1)),
                                                  max(steps, 2), end_value=0.05 * learning_rate)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def fit(stage: str, module: nnx.Module, loss: Callable, *, steps: int, learning_rate: float, warmup_steps: int,
        workdir: Path, seed: int, checkpoint_every: int, log_every: int, describe: str = "",
        print_fn: Callable[[str], None] = print) -> dict:
    """Trains `module` in place for `steps` steps (resuming from its stage's latest checkpoint); returns the
    last logged metrics. `loss(module, key) -> (scalar, metrics dict)`.

    Raises DeviceMemoryError when a step does not fit in device memory (with the override that shrinks it).
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    folder = Path(workdir).absolute() / stage
    folder.mkdir(parents=True, exist_ok=True)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    tx = optimizer(learning_rate, warmup_steps, steps)
    opt_state = tx.init(params)
    manager = ocp.CheckpointManager(folder / "checkpoints", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = manager.latest_step() or 0
    if start:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": opt_state})
        restored = manager.restore(start, args=ocp.args.StandardRestore(target))
        params, opt_state = restored["params"], restored["opt_state"]
        print_fn(f"{stage}: resumed from step {start} ({folder / 'checkpoints'})")
    if start >= steps:
        nnx.update(module, params)
        manager.close()
        return _last_logged(folder / "log.jsonl")

    @jax.jit
    def train_step(params, opt_state, step):
        def objective(p):
            return loss(nnx.merge(graphdef, p, rest), jax.random.fold_in(jax.random.key(seed), step))

        (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {**metrics, "loss": value,
                                                                  "grad_norm": optax.global_norm(grads)}

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state}), force=True)
        manager.wait_until_finished()

    metrics, logged = {}, {}
    log_file = folder / "log.jsonl"
    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", dynamic_ncols=True)
    started, completed = time.perf_counter(), start
    try:
        for step in range(start, steps):
            try:
                params, opt_state, metrics = train_step(params, opt_state, jnp.int32(step))
            except jax.errors.JaxRuntimeError as err:
                if not is_out_of_memory(err):
                    raise
                raise DeviceMemoryError(f"out of device memory while training {stage} ({describe}): reduce the "
                                        f"batch with {{override}} {stage}.batch=N; XLA: "
                                        f"{str(err).strip().splitlines()[0]}") from err
            completed = done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                logged = {"stage": stage, "step": done, "seconds": round(time.perf_counter() - started, 2),
                          **{k: float(v) for k, v in metrics.items()}}
                with open(log_file, "a") as f:
                    f.write(json.dumps(logged) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k not in ("stage", "step", "seconds")})
            if done % checkpoint_every == 0 and done < steps:
                save(done)
        save(steps)
    except KeyboardInterrupt:
        bar.close()
        if completed > start:
            save(completed)
            print_fn(f"{stage}: interrupted after step {completed}; checkpoint saved, the same command resumes it")
        manager.close()
        raise
    bar.close()
    manager.close()
    nnx.update(module, params)
    return logged


def _last_logged(log_file: Path) -> dict:
    """The last metrics line of a finished stage's log (empty when there is none)."""
    lines = log_file.read_text().splitlines() if log_file.is_file() else []
    return json.loads(lines[-1]) if lines else {}
