"""``workbench launch --processes N -- COMMAND ARGS``: one command as N cooperating processes.

Starts N local copies of ``workbench COMMAND ARGS`` joined by ``jax.distributed`` (the
first one hosts the coordinator; CPU collectives go over gloo), each with
``--devices-per-process`` simulated CPU devices, so a 2x2x2 mesh spans 2 processes × 4
devices exactly as it would span 2 hosts × 4 GPUs. Output lines are prefixed with the
process number; each process reads and writes only its own blocks, process 0 writes the
shared files (``report.json``, training history and weights).

If one process fails (an error, or killed), a line names it and its exit status at once;
the others get :data:`PEER_SECONDS` to end by themselves (a survivor whose collective
fails because its peer is gone prints one line saying so and exits with status 75,
:data:`~workbench.execute.distributed.PEER_LOST_STATUS`), then are stopped (SIGTERM, then
SIGKILL after :data:`GRACE_SECONDS`: a process waiting for a dead one may never return),
and the failed process's status is the launch's (128 + N for signal N). SIGINT / SIGTERM to the launcher are passed on to every process:
training checkpoints at the same step everywhere and stops.

On a real cluster you do not need this command: start ``workbench COMMAND ARGS`` once per
host from the job script with ``WORKBENCH_DISTRIBUTED=auto`` (see
:mod:`workbench.execute.distributed`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from workbench.cli.args import positive_int
from workbench.errors import UserError
from workbench.execute.distributed import PEER_LOST_STATUS, STARTUP_ENV, STARTUP_TIMEOUT_SECONDS
from workbench.execute.signals import StopSignals

HELP = "run a command as several cooperating processes (jax.distributed, local CPU devices)"

# Commands whose every step is written for several processes (process 0 writes files).
MULTIPROCESS_COMMANDS = ("evaluate", "infer", "train")
GRACE_SECONDS = 10.0  # after a failure: SIGTERM, then SIGKILL this much later
PEER_SECONDS = 5.0  # after a failure, before SIGTERM: the survivors' time to say their peer is gone
EPILOG = f"""exit status:
  0    every process finished
  N    the status of the first process that failed (128 + S when killed by signal S,
       e.g. 137 for SIGKILL); the line "process K (pid P) failed: ..." names it
  {PEER_LOST_STATUS}   a process lost a peer (it died or its connection dropped) or not every process
       joined the coordinator within {STARTUP_ENV} (default {STARTUP_TIMEOUT_SECONDS}):
       each such process prints one line; the launcher's line names the process that ended
  124  --timeout passed
  130, 143  SIGINT / SIGTERM to the launcher (passed on; training checkpoints and stops)
A process's own errors keep their statuses: 2 for bad input, 1 for a bug (traceback in a
file its line names)."""
STOP_SECONDS = 120.0  # after SIGINT/SIGTERM to the launcher: time to checkpoint and exit


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=positive_int, default=2, help="number of processes (default 2)")
    p.add_argument(
        "--devices-per-process", type=positive_int, default=4, help="simulated CPU devices in each process (default 4)"
    )
    p.add_argument("--port", type=int, default=0, help="coordinator port on localhost (default: a free one)")
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds before the processes are stopped (default 1800)"
    )
    p.add_argument("--verbose", action="store_true", help="keep gloo's connection log lines")
    p.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        help=f"-- then the command and its arguments; one of: {', '.join(MULTIPROCESS_COMMANDS)}",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(argv: list[str]) -> list[str]:
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError(
            "no command given; e.g. workbench launch --processes 2 -- infer phantom:64 --mesh 2x2x2 --out runs/mp"
        )
    if argv[0] not in MULTIPROCESS_COMMANDS:
        raise UserError(f"{argv[0]!r} cannot run as several processes; use one of: {', '.join(MULTIPROCESS_COMMANDS)}")
    if any(a == "--cpu-devices" or a.startswith("--cpu-devices=") for a in argv):
        raise UserError("--cpu-devices does not apply under launch; use --devices-per-process")
    return argv


def _is_chatter(line: str) -> bool:
    """gloo's connection log lines (written by its C++ code, interleaved between processes)."""
    return "[Gloo]" in line or "peer ranks" in line


def _pump(stream, prefix: str, out, verbose: bool) -> None:
    for line in iter(stream.readline, ""):
        if verbose or not _is_chatter(line):
            out.write(f"{prefix}{line}")
            out.flush()
    stream.close()


def _describe(status: int) -> str:
    """``exit status 2`` or ``killed by SIGKILL``, for a Popen return code."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def _shell_status(status: int) -> int:
    """A Popen return code as a shell exit status (a signal N gives 128 + N)."""
    return 128 - status if status < 0 else status


def _forward_to(procs, out):
    """SIGINT / SIGTERM to the launcher are passed on to every process as SIGTERM
    (training checkpoints and stops at the end of its step) instead of ending it."""

    def forward(name):
        if not announced:
            announced.append(name)
            out.write(f"workbench launch: {name}: asking every process to stop (SIGTERM)\n")
            out.flush()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    announced: list[str] = []
    return StopSignals(forward)


def launch(
    argv: list[str],
    *,
    processes: int = 2,
    devices_per_process: int = 4,
    port: int = 0,
    timeout: float = 1800.0,
    out=None,
    verbose: bool = False,
    grace: float = GRACE_SECONDS,
    peer_wait: float = PEER_SECONDS,
    stop_timeout: float = STOP_SECONDS,
    program: list[str] | None = None,
    env: dict | None = None,
) -> int:
    """Run ``workbench ARGV`` as ``processes`` local processes; return the launch's exit status.

    When one process fails (non-zero status or killed), a line names it and its status,
    the others get ``peer_wait`` seconds to end by themselves (each that finds its peer gone
    prints one line), then are sent SIGTERM and, after ``grace`` seconds, SIGKILL (a process waiting in
    a collective for the dead one never returns by itself), and the failed process's status
    is returned (128 + N for signal N). SIGINT / SIGTERM to the launcher are passed on as
    SIGTERM; the processes get ``stop_timeout`` seconds to checkpoint and exit.
    ``program`` (tests, benchmarks) replaces ``python -m workbench`` and skips the
    command check; ``env`` adds variables to the processes' environment.
    """
    out = out or sys.stdout
    argv = _command(argv) if program is None else list(argv)
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; use 1..65535 or 0 for a free one")
    port = port or _free_port()
    from workbench.execute.distributed import ENV, NATIVE_STDOUT_ENV

    base = {k: v for k, v in os.environ.items() if k not in ENV.values()}  # this launch sets them
    base.update(env or {})
    program = program or [sys.executable, "-m", "workbench"]
    procs, pumps = [], []
    for rank in range(processes):
        proc_env = {
            **base,
            "WORKBENCH_COORDINATOR": f"localhost:{port}",
            "WORKBENCH_NUM_PROCESSES": str(processes),
            "WORKBENCH_PROCESS_ID": str(rank),
            "WORKBENCH_LOCAL_DEVICES": str(devices_per_process),
            "PYTHONUNBUFFERED": "1",
        }
        if verbose:  # gloo's own connection log, which each process otherwise discards
            proc_env[NATIVE_STDOUT_ENV] = "keep"
        proc = subprocess.Popen(
            [*program, *argv], env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        procs.append(proc)
        out.write(f"workbench launch: process {rank} is pid {proc.pid}\n")
        out.flush()
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[process {rank}] ", out, verbose), daemon=True)
        pump.start()
        pumps.append(pump)
    deadline = time.monotonic() + timeout
    status = 0
    with _forward_to(procs, out) as forward:
        try:
            stop_deadline = None
            while True:
                running = [p.poll() for p in procs].count(None)  # poll every process, not just the first running one
                failed = [(rank, p.returncode) for rank, p in enumerate(procs) if p.returncode not in (None, 0)]
                if forward.received and stop_deadline is None:
                    stop_deadline = time.monotonic() + stop_timeout
                if failed and not forward.received:
                    # several seen at once: an abort or PEER_LOST_STATUS is what a process does
                    # when its peer died, so the other one is named
                    failed.sort(key=lambda f: (f[1] in (-signal.SIGABRT, PEER_LOST_STATUS), f[0]))
                    rank, code = failed[0]
                    others = "".join(f" (process {r} also ended: {_describe(c)})" for r, c in failed[1:])
                    out.write(
                        f"workbench launch: process {rank} (pid {procs[rank].pid}) failed: {_describe(code)}{others}; "
                        "stopping the other processes\n"
                    )
                    status = _shell_status(code)
                    break
                if stop_deadline is not None and time.monotonic() > stop_deadline:
                    out.write(
                        f"workbench launch: processes still running {stop_timeout:.0f} s after the stop request\n"
                    )
                    break
                if not running:
                    break
                if time.monotonic() > deadline:
                    out.write(f"workbench launch: stopped after {timeout:.0f} s (--timeout)\n")
                    status = 124
                    break
                time.sleep(0.1)
        finally:
            _stop(procs, grace, wait=peer_wait if status not in (0, 124) else 0.0)
            for t in pumps:
                t.join(timeout=5)
    if status == 0:
        status = next((_shell_status(p.returncode) for p in procs if p.returncode), 0)
    if status == 0 and forward.received:
        status = 130 if forward.received == "SIGINT" else 143
    return status


def _stop(procs, grace: float, wait: float = 0.0) -> None:
    """After ``wait`` seconds for them to end by themselves, SIGTERM to the processes still
    running, SIGKILL to those left after ``grace`` seconds."""
    end = time.monotonic() + wait
    while time.monotonic() < end and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(args) -> int:
    return launch(
        args.argv,
        processes=args.processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        timeout=args.timeout,
        verbose=args.verbose,
    )
