"""Multi-process runs: ``jax.distributed`` set-up, host transfers that work across processes.

The same partitioned code runs on one process with simulated devices, on several local
processes (``workbench launch``, CPU collectives over gloo) and on a GPU cluster or TPU
pod (one process per host). What changes is only how each process learns its place:

* ``workbench launch`` sets ``WORKBENCH_COORDINATOR`` (host:port),
  ``WORKBENCH_NUM_PROCESSES``, ``WORKBENCH_PROCESS_ID`` and ``WORKBENCH_LOCAL_DEVICES``
  for the processes it starts;
* on a cluster, set ``WORKBENCH_DISTRIBUTED=auto`` in the job script: then
  ``jax.distributed.initialize()`` reads SLURM, Open MPI or the TPU pod environment itself.

Every process then builds the same global mesh over ``jax.devices()``; each one puts
only its own blocks on its own devices (:func:`put`) and the result is gathered with
:func:`to_host` (an all-gather across processes; plain ``np.asarray`` on one process).
Only process 0 writes files (:func:`is_main`).
"""

from __future__ import annotations

import os

import numpy as np

from workbench.errors import UserError

__all__ = [
    "ENV",
    "settings_from_env",
    "initialize_from_env",
    "initialize",
    "is_main",
    "process_info",
    "put",
    "put_tree",
    "to_host",
]

ENV = {
    "coordinator": "WORKBENCH_COORDINATOR",
    "num_processes": "WORKBENCH_NUM_PROCESSES",
    "process_id": "WORKBENCH_PROCESS_ID",
    "local_devices": "WORKBENCH_LOCAL_DEVICES",
    "auto": "WORKBENCH_DISTRIBUTED",
}

_STATE = {"initialized": False}


def settings_from_env(environ=None) -> dict | None:
    """The multi-process settings in ``environ`` (default ``os.environ``), or None for one process.

    Raises ``ValueError`` naming the variable when a value is malformed.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV["auto"], "").strip().lower() == "auto":
        return {"auto": True}
    if ENV["coordinator"] not in env:
        return None

    def integer(key, low):
        name = ENV[key]
        text = env.get(name)
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise UserError(f"{name}={text!r} must be an integer >= {low} (set by `workbench launch`)") from None
        if value < low:
            raise UserError(f"{name}={value} must be an integer >= {low} (set by `workbench launch`)")
        return value

    coordinator = env[ENV["coordinator"]].strip()
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{ENV['coordinator']}={coordinator!r} must be host:port, e.g. localhost:12355")
    settings = {
        "auto": False,
        "coordinator": coordinator,
        "num_processes": integer("num_processes", 1),
        "process_id": integer("process_id", 0),
        "local_devices": integer("local_devices", 1),
    }
    if settings["process_id"] >= settings["num_processes"]:
        raise UserError(
            f"{ENV['process_id']}={settings['process_id']} must be below "
            f"{ENV['num_processes']}={settings['num_processes']}"
        )
    return settings


def initialize(settings: dict) -> None:
    """Start ``jax.distributed`` for ``settings`` (from :func:`settings_from_env`). Idempotent."""
    if _STATE["initialized"]:
        return
    import jax

    if settings.get("auto"):
        jax.distributed.initialize()
    else:
        from workbench.execute.devices import configure_cpu_devices

        # Simulated CPU devices per process, and CPU collectives between processes; an
        # accelerator backend (if any) ignores both and uses its own interconnect.
        configure_cpu_devices(settings["local_devices"])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            settings["coordinator"], settings["num_processes"], settings["process_id"], initialization_timeout=120
        )
    _STATE["initialized"] = True


def initialize_from_env(environ=None) -> bool:
    """Initialise from the environment when it asks for several processes; True if it did."""
    settings = settings_from_env(environ)
    if settings is None:
        return False
    initialize(settings)
    return True


def process_info() -> dict:
    import jax

    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
    }


def is_main() -> bool:
    """True on process 0 (the one that writes files and prints reports)."""
    import jax

    return jax.process_index() == 0


def put(array: np.ndarray, sharding):
    """A global ``jax.Array`` from a host array every process holds; each device gets its block.

    Unlike ``jax.device_put`` this never sends data to devices of other processes.
    """
    import jax

    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_tree(tree, sharding):
    """:func:`put` for every leaf of a pytree (e.g. replicated model variables)."""
    import jax

    return jax.tree.map(lambda leaf: put(np.asarray(leaf), sharding), tree)


def to_host(array) -> np.ndarray:
    """The whole of a global ``jax.Array`` as numpy on every process.

    One process: ``np.asarray``. Several: fully replicated arrays are read from a local
    copy, sharded ones are all-gathered across processes.
    """
    import jax

    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    if array.sharding.is_fully_replicated:
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(jax.block_until_ready(array), tiled=True))
