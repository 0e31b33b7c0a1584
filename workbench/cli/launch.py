"""``workbench launch --processes N -- COMMAND ARGS``: one command as N cooperating processes.

Starts N local copies of ``workbench COMMAND ARGS`` joined by ``jax.distributed`` (the
first one hosts the coordinator; CPU collectives go over gloo), each with
``--devices-per-process`` simulated CPU devices, so a 2x2x2 mesh spans 2 processes × 4
devices exactly as it would span 2 hosts × 4 GPUs. Output lines are prefixed with the
process number; process 0 writes the files. If one process fails the others are stopped
and its exit status is returned.

On a real cluster you do not need this command: start ``workbench COMMAND ARGS`` once per
host from the job script with ``WORKBENCH_DISTRIBUTED=auto`` (see
:mod:`workbench.execute.distributed`).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

from workbench.cli.args import positive_int
from workbench.errors import UserError

HELP = "run a command as several cooperating processes (jax.distributed, local CPU devices)"

# Commands whose every step is written for several processes (process 0 writes files).
MULTIPROCESS_COMMANDS = ("infer",)


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


def launch(
    argv: list[str],
    *,
    processes: int = 2,
    devices_per_process: int = 4,
    port: int = 0,
    timeout: float = 1800.0,
    out=None,
    verbose: bool = False,
) -> int:
    """Run ``workbench ARGV`` as ``processes`` local processes; return the first failing status."""
    out = out or sys.stdout
    argv = _command(argv)
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port; use 1..65535 or 0 for a free one")
    port = port or _free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    procs, pumps = [], []
    for rank in range(processes):
        env = {
            **base,
            "WORKBENCH_COORDINATOR": f"localhost:{port}",
            "WORKBENCH_NUM_PROCESSES": str(processes),
            "WORKBENCH_PROCESS_ID": str(rank),
            "WORKBENCH_LOCAL_DEVICES": str(devices_per_process),
            "PYTHONUNBUFFERED": "1",
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "workbench", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[process {rank}] ", out, verbose), daemon=True)
        pump.start()
        pumps.append(pump)
    deadline = time.monotonic() + timeout
    status = 0
    try:
        while [p.poll() for p in procs].count(None):  # poll every process, not just the first running one
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                status = failed[0] if failed else 124
                if not failed:
                    out.write(f"workbench launch: stopped after {timeout:.0f} s (--timeout)\n")
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(timeout=5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status


def run(args) -> int:
    return launch(
        args.argv,
        processes=args.processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        timeout=args.timeout,
        verbose=args.verbose,
    )
