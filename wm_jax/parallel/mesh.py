"""The device mesh of a run: one axis, `sp`, over which tokens and attention heads are split (Ulysses).

`make_mesh(num_devices)` takes the first `num_devices` of `jax.devices()` (every process's devices
after `initialize_distributed`, so a multi-host run spans hosts) and checks the count against the
heads before anything is loaded. Host values enter the mesh with `put_replicated` and leave it with
`to_host`; both work when the mesh spans processes (no array is fully addressable there).
"""

from __future__ import annotations

import datetime
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wm_jax.errors import OptionError

SEQUENCE_AXIS = "sp"


class MeshError(OptionError):
    """The requested device layout cannot be built (`option` names the setting at fault)."""


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh ("sp",) over the first `num_devices` devices (default: all of them, every process's)."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if num_devices <= 0:
        raise MeshError("num_devices", f"{{num_devices}} {num_devices}: expected at least 1")
    if num_devices > len(devices):
        kinds = sorted({d.device_kind for d in devices})
        raise MeshError("num_devices", f"{{num_devices}} {num_devices} requested, but {len(devices)} {jax.default_backend()} "
                        f"device(s) are present ({', '.join(kinds)}: ids {[d.id for d in devices]})")
    if jax.process_count() > 1 and num_devices != len(devices):
        raise MeshError("num_devices", f"{{num_devices}} {num_devices}: a multi-process run uses every device of every process "
                        f"({len(devices)})")
    return Mesh(np.asarray(devices[:num_devices]), (SEQUENCE_AXIS,))


def unpadded_device_counts(num_heads: int, available: int) -> list[int]:
    """Device counts up to `available` that split `num_heads` evenly (no padded heads in Ulysses)."""
    return [n for n in range(1, available + 1) if num_heads % n == 0]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put(tree: Any, shardings: Any) -> Any:
    """Host (numpy) or device values -> arrays in `shardings` (one sharding for every leaf, or a tree of
    them matching `tree`). A leaf already placed so (an equivalent sharding of the same kind, so that
    jitted programs see the shardings they were compiled for) is kept as it is. With
    several processes each one fills its own devices from its copy of host data (the copies must be
    identical), and an array that spans processes is resharded on the devices."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree_util.tree_map(lambda _: shardings, tree)

    def put_leaf(x, sharding):
        if (isinstance(x, jax.Array) and type(x.sharding) is type(sharding)
                and x.sharding.is_equivalent_to(sharding, x.ndim)):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put_leaf, tree, shardings)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """`put` with every leaf replicated on every device of `mesh`."""
    return put(tree, replicated(mesh))


def local_replica(x: jax.Array) -> jax.Array:
    """This process's first copy of a replicated array (a single-device array: readable on the host).
    Raises ValueError for an array that is not fully replicated (no device holds all of it)."""
    if not isinstance(x, jax.Array) or len(x.sharding.device_set) == 1:
        return x
    if not x.sharding.is_fully_replicated:
        raise ValueError(f"expected a replicated array, got {x.shape} sharded as {x.sharding}")
    return x.addressable_data(0)


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated (or single-device) array as numpy, read from this process's first replica."""
    return np.asarray(local_replica(x))


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           timeout_s: int = 60) -> None:
    """`jax.distributed.initialize` with a bounded wait: a coordinator that cannot be reached, or processes
    that do not all join, within `timeout_s` (up to about twice that: jax's registration RPC adds its own
    deadline) raise MeshError instead of hanging or aborting. Call before any other JAX work.

    jax's distributed-runtime client ends the whole process (a C++ fatal error, SIGABRT, exit 134) when
    joining fails, because jax creates it without an error callback; while jax initialises, the client
    is created here with one, so the failure comes back as a Python exception. (Where jax's internals
    differ from jax 0.10's, jax's own client is used.) On CPU the cross-process collectives are gloo's
    (jax 0.10's default; set explicitly for older versions, whose default has none).
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise MeshError("process_id", f"{{process_id}} {process_id} with {{num_processes}} {num_processes}: "
                        "expected 0 <= process_id < num_processes")
    if _cpu_requested():  # (asking jax for its backend here would initialise it too early)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    joined = False

    def on_error(status) -> None:
        # After the join, jax's default applies: a coordination error (another process died) ends this
        # process instead of leaving it waiting in a collective. (jaxlib 0.10 cannot even convert the
        # status for this callback: the call fails inside the client, whose caller raises instead.)
        if joined:
            import os
            import sys

            sys.stderr.write(f"error: the distributed run failed (process {process_id} of {num_processes}, "
                             f"coordinator {coordinator_address}): {status}\n")
            sys.stderr.flush()
            os._exit(1)

    try:
        from jax._src import distributed as jax_distributed

        runtime = jax_distributed._jax
        make_client = runtime.get_distributed_runtime_client
        takes_callback = "missed_heartbeat_callback" in (make_client.__doc__ or "")
    except (ImportError, AttributeError):
        takes_callback = False

    if takes_callback:
        class _Runtime:  # jaxlib's module as jax.distributed sees it, but the client gets `on_error`
            def __getattr__(self, name):
                return getattr(runtime, name)

            @staticmethod
            def get_distributed_runtime_client(*args, **kwargs):
                kwargs.setdefault("missed_heartbeat_callback", on_error)
                return make_client(*args, **kwargs)

        jax_distributed._jax = _Runtime()
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - jax raises several error types for an unreachable coordinator
        # take down what jax set up before failing (process 0's coordinator service, the failed client), so
        # that jax's exit hook does not try again and print a second traceback
        state = getattr(jax_distributed, "global_state", None) if takes_callback else None
        for part in ("preemption_sync_manager", "client", "service"):
            if getattr(state, part, None) is not None:
                try:
                    getattr(state, part).shutdown()
                except Exception:  # noqa: BLE001 - an agent in error state reports it again on shutdown
                    pass
                setattr(state, part, None)
        detail = _first_line(err)
        if "bad_cast" in detail:  # the callback's conversion failure (see on_error): says nothing more
            detail = "the wait timed out"
        who = ("the other processes did not all connect to this coordinator" if process_id == 0 else
               "no coordinator answered there, or not every process joined")
        raise MeshError("coordinator_address", f"{{coordinator_address}} {coordinator_address}: process {process_id} "
                        f"of {num_processes} could not join within {datetime.timedelta(seconds=timeout_s)}: {who} "
                        f"({detail}); start all {num_processes} processes ({{num_processes}}) with this address, "
                        "or raise {coordinator_timeout}") from err
    finally:
        if takes_callback:
            jax_distributed._jax = runtime
    joined = True


def _cpu_requested() -> bool:
    """JAX_PLATFORMS asks for the CPU backend first (read from the environment: the backend is not up yet)."""
    import os

    return os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower() == "cpu"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
