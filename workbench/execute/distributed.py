"""Multi-process runs: ``jax.distributed`` set-up, host transfers that work across processes.

The same partitioned code runs on one process with simulated devices, on several local
processes (``workbench launch``, CPU collectives over gloo) and on a GPU cluster or TPU
pod (one process per host). What changes is only how each process learns its place:

* ``workbench launch`` sets ``WORKBENCH_COORDINATOR`` (host:port),
  ``WORKBENCH_NUM_PROCESSES``, ``WORKBENCH_PROCESS_ID`` and ``WORKBENCH_LOCAL_DEVICES``
  for the processes it starts;
* on a cluster, set ``WORKBENCH_DISTRIBUTED=auto`` in the job script: then
  ``jax.distributed.initialize()`` reads SLURM, Open MPI or the TPU pod environment itself
  (under SLURM, start one process per GPU, or per node with ``JAX_LOCAL_DEVICE_IDS``
  listing the node's GPUs: auto-detection gives a process only its SLURM_LOCALID's GPU;
  docs/cluster.md).

Every process then builds the same global mesh over ``jax.devices()``. Data enters and
leaves block by block, so no process needs the whole volume:

* :func:`put_blocks` builds a global array from a function that reads one device's block
  (its index into the global array): each process calls it only for its own devices
  (``jax.make_array_from_single_device_arrays``); :func:`put` is the same for a host array
  every process holds (small things: weights, or a volume the user chose to load whole).
* :func:`local_blocks` yields the blocks of a global array that live on this process's
  devices, one at a time (each written to disk by the process that holds it);
  :func:`to_host` gathers a whole array to every process (an all-gather; only for small
  arrays or when the user asks for the whole result).
* :func:`allgather`, :func:`barrier` and :func:`agree` are the few host-side collectives
  the runs need: small per-shard summaries, "every process has finished writing", and
  "does any process want to stop".

Only process 0 writes shared files (:func:`is_main`); every process writes its own blocks
of zarr outputs and takes part in checkpoints.

Output: only process 0 prints to stdout; every process writes warnings and errors to
stderr (``workbench launch`` prefixes each line with its process). With gloo (the CPU
collectives of ``workbench launch``), native code's writes to the process's stdout are
discarded: gloo logs each connection there from several threads, a line in several
pieces, so pieces of it would interleave into lines of their own. Python's ``print``
still reaches the real stdout; ``WORKBENCH_NATIVE_STDOUT=keep`` (``launch --verbose``)
keeps the native output.

Faults of the run itself, not of the workbench: a peer process that died or whose connection
dropped makes a collective fail in every survivor, and a peer that never joins makes
``jax.distributed`` wait at start-up. Either way each surviving process prints one line
(:func:`peer_lost_line`, or the start-up watchdog of :func:`initialize`) and exits with
:data:`PEER_LOST_STATUS` (75); the launcher or the cluster scheduler names the process that
ended and why. Start-up waits :data:`STARTUP_TIMEOUT_SECONDS` (``WORKBENCH_STARTUP_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

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
    "put_blocks",
    "put_tree",
    "local_blocks",
    "to_host",
    "allgather",
    "barrier",
    "agree",
    "HEARTBEAT_SECONDS",
    "PEER_LOST_STATUS",
    "STARTUP_TIMEOUT_SECONDS",
    "peer_lost_line",
]

ENV = {
    "coordinator": "WORKBENCH_COORDINATOR",
    "num_processes": "WORKBENCH_NUM_PROCESSES",
    "process_id": "WORKBENCH_PROCESS_ID",
    "local_devices": "WORKBENCH_LOCAL_DEVICES",
    "auto": "WORKBENCH_DISTRIBUTED",
}
# A process whose peer died waits in a collective until the coordination service misses
# the peer's heartbeats for this long, then aborts (JAX's default is 100 s); the variable
# changes it.
HEARTBEAT_SECONDS = 30
HEARTBEAT_ENV = "WORKBENCH_HEARTBEAT_SECONDS"
NATIVE_STDOUT_ENV = "WORKBENCH_NATIVE_STDOUT"
# How long a process waits for every process of the run to join (jax.distributed's
# registration); the variable changes it. Past it: one line and PEER_LOST_STATUS.
STARTUP_TIMEOUT_SECONDS = 120
STARTUP_ENV = "WORKBENCH_STARTUP_TIMEOUT_SECONDS"
# Exit status of a process whose peer died, dropped its connection or never joined
# (sysexits' EX_TEMPFAIL: the run can be repeated, or resumed, once every process runs).
PEER_LOST_STATUS = 75
# jax.distributed's own start-up limit is this much longer than ours, so that our one line,
# not its fatal abort, ends the process.
_NATIVE_MARGIN_SECONDS = 15

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


def _discard_native_stdout() -> None:
    """Point file descriptor 1 at /dev/null and Python's ``sys.stdout`` at a duplicate of
    the original: native code's stdout is dropped, ``print`` is not."""
    import io
    import sys

    sys.stdout.flush()
    kept = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = io.TextIOWrapper(
        io.FileIO(kept, "w"),
        encoding=sys.stdout.encoding,
        errors=sys.stdout.errors,
        line_buffering=True,
        write_through=True,
    )


def _seconds_from_env(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{name}={text!r} must be a number of seconds > 0")
    return value


def _startup_line(settings: dict, seconds: float, log: str) -> str:
    """The one line of a start-up that timed out: the coordinator and what to check."""
    if settings.get("auto"):
        where = "the coordinator the cluster environment names (SLURM, Open MPI or the TPU pod)"
        who = "this process"
    else:
        where = f"the coordinator at {settings['coordinator']}"
        who = f"process {settings['process_id']} of {settings['num_processes']}"
    return (
        f"workbench: {who}: not every process of the run joined {where} within {seconds:g} s; check that "
        "every process was started (and none failed: the launcher's or the job's other lines), that the "
        "coordinator's host and port are reachable from this host, and that all were given the same number "
        f"of processes ({STARTUP_ENV} waits longer); native log in {log}"
    )


def _start_watched(start, settings: dict, seconds: float) -> None:
    """``start()`` (jax.distributed.initialize), ended after ``seconds`` by one line and
    :data:`PEER_LOST_STATUS` if it has not returned: jax's own time-out aborts the process
    with a native stack trace. Native lines written meanwhile are held in a file, passed on
    when the start succeeds and kept (the line names the file) when it does not."""
    fd, log = tempfile.mkstemp(prefix="workbench-startup-", suffix=".txt")
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    done = threading.Event()

    def watchdog():
        if not done.wait(seconds):
            os.write(fd, f"\nno start within {seconds:g} s; settings {settings}\n".encode())
            os.write(saved, (_startup_line(settings, seconds, log) + "\n").encode())
            os._exit(PEER_LOST_STATUS)

    threading.Thread(target=watchdog, name="workbench-startup-watchdog", daemon=True).start()
    try:
        start()
    finally:
        done.set()
        os.dup2(saved, 2)
        os.close(saved)
        held = os.pread(fd, os.fstat(fd).st_size, 0)
        os.close(fd)
        if held:
            os.write(2, held)
        os.unlink(log)


def initialize(settings: dict) -> None:
    """Start ``jax.distributed`` for ``settings`` (from :func:`settings_from_env`). Idempotent.

    A process whose peers have not all joined within ``WORKBENCH_STARTUP_TIMEOUT_SECONDS``
    (default :data:`STARTUP_TIMEOUT_SECONDS`) prints one line naming the coordinator and
    what to check, and exits with :data:`PEER_LOST_STATUS`.
    """
    if _STATE["initialized"]:
        return
    import jax

    heartbeat = int(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_SECONDS))
    seconds = _seconds_from_env(STARTUP_ENV, STARTUP_TIMEOUT_SECONDS)
    native = int(seconds) + _NATIVE_MARGIN_SECONDS
    if settings.get("auto"):
        _start_watched(
            lambda: jax.distributed.initialize(initialization_timeout=native, heartbeat_timeout_seconds=heartbeat),
            settings,
            seconds,
        )
    else:
        from workbench.execute.devices import configure_cpu_devices

        # Simulated CPU devices per process, and CPU collectives between processes; an
        # accelerator backend (if any) ignores both and uses its own interconnect.
        configure_cpu_devices(settings["local_devices"])
        if os.environ.get(NATIVE_STDOUT_ENV, "").strip().lower() != "keep":
            _discard_native_stdout()
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        _start_watched(
            lambda: jax.distributed.initialize(
                settings["coordinator"],
                settings["num_processes"],
                settings["process_id"],
                initialization_timeout=native,
                heartbeat_timeout_seconds=heartbeat,
            ),
            settings,
            seconds,
        )
    _STATE["initialized"] = True


# What a collective's error says when the process at the other end is gone: gloo (CPU),
# NCCL (GPU) and the coordination service's heartbeats.
_PEER_GONE = re.compile(
    r"Connection (?:closed|reset) by peer|Broken pipe|Socket closed|heartbeat timeout|stopped sending heartbeats"
    r"|Remote process exited|remote process has (?:exited|failed)",
    re.IGNORECASE,
)
_PEER_ADDRESS = re.compile(r"peer \[?([0-9a-fA-F.:]+)\]?:(\d+)")


def peer_lost_line(err: BaseException) -> str | None:
    """One line for an error that says a peer process of a multi-process run is gone (it died
    or its connection dropped), naming the peer where the error tells; None for any other
    error, and always in a one-process run."""
    if not _STATE["initialized"]:
        return None
    text = f"{type(err).__name__}: {err}"
    found = _PEER_GONE.search(text)
    if found is None:
        return None
    import jax

    me, count = jax.process_index(), jax.process_count()
    address = _PEER_ADDRESS.search(text)
    if count == 2:
        peer = f"process {1 - me}"
    else:
        peer = "a peer process"
    if address is not None:
        peer += f" ({address.group(1)}:{address.group(2)})"
    kind = "Gloo" if "gloo" in text.lower() else "NCCL" if "nccl" in text.lower() else "the coordination service"
    return (
        f"workbench: process {me} of {count}: lost {peer} during a collective ({kind}: {found.group(0)}): "
        "it ended or its connection dropped; the launcher (or the cluster scheduler) reports which process "
        "ended and why"
    )


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


def put_blocks(shape, sharding, read_block, dtype=None):
    """A global ``jax.Array`` of ``shape`` whose blocks come from ``read_block(index)``.

    ``index`` is a tuple of slices into the global array (one device's block); the call
    returns that block as numpy. Each process calls it only for its own devices, once per
    distinct block (a block repeated over a replicated axis is read once), so a process
    never holds more than its own part.
    """
    import jax

    by_index = sharding.addressable_devices_indices_map(tuple(shape))
    read: dict = {}
    arrays = []
    for device, index in by_index.items():
        key = tuple((s.start, s.stop) for s in index)
        if key not in read:
            block = np.asarray(read_block(index))
            if dtype is not None:
                block = block.astype(dtype, copy=False)
            read[key] = block
        arrays.append(jax.device_put(read[key], device))
    read.clear()
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def local_blocks(array):
    """(index, numpy block) of each distinct block of ``array`` on this process's devices.

    ``index`` is a tuple of slices into the global array. Blocks are fetched one at a time;
    a block replicated over several devices comes once (its first replica).
    """
    for shard in array.addressable_shards:
        if shard.replica_id == 0:
            yield shard.index, np.asarray(shard.data)


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


def allgather(values) -> np.ndarray:
    """``values`` (a small numpy array, same shape on every process) from every process,
    stacked on a new first axis in process order; on one process ``values[None]``."""
    import jax

    values = np.asarray(values)
    if jax.process_count() == 1:
        return values[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called ``name`` (no-op on one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (e.g. "a signal arrived: stop")."""
    return bool(allgather(np.array([1 if flag else 0], np.int32)).max())
