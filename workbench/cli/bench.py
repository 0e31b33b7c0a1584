"""``workbench bench [--quick] [--json OUT]``: run the benchmark suite in ``benchmarks/``.

Each benchmark is a script in the source checkout's ``benchmarks/`` folder, run in
its own process (each simulates the devices it needs); its tables stream through
and its JSON rows are gathered into one file with the machine and versions.
Benchmarks print ratios measured in the same run and never fail on time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workbench.errors import InputNotFoundError, UserError

HELP = "run the benchmark suite (tables of ratios and memory; never fails on time)"

# name -> (full arguments, --quick arguments)
BENCHMARKS = {
    "sliding_window": ([], ["--quick"]),
    "memory_efficiency": ([], ["--quick"]),
    "scale": ([], ["--quick"]),
    "partition_overhead": ([], ["--sizes", "64", "--repeats", "2", "--no-train"]),
    "dataset_memory": ([], ["--quick"]),
    "multiprocess": ([], ["--quick"]),
    "output_memory": ([], ["--quick"]),
    "training_reads": ([], ["--quick"]),
    "hd95_blocks": ([], ["--quick"]),
    "interior_boundary": ([], ["--blocks", "8", "16", "--channels", "8", "--repeats", "3"]),
}
# The benchmarks that time the explicit backend's forward and take --comm-overlap.
COMM_OVERLAP_BENCHMARKS = ("partition_overhead",)


def benchmarks_dir() -> Path:
    """The checkout's ``benchmarks/`` folder (the suite is not part of an installed wheel)."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    if not folder.is_dir():
        raise InputNotFoundError(
            f"no benchmarks folder at {folder}; run `workbench bench` from a source checkout (pip install -e .)"
        )
    return folder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="laptop-sized runs (a few minutes in all)")
    p.add_argument("--json", default=None, metavar="OUT", help="write every result to this JSON file")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help=f"run only these ({', '.join(BENCHMARKS)})")
    p.add_argument(
        "--comm-overlap",
        default="auto",
        help="auto | on | off: the explicit backend's interior/boundary convolutions in "
        f"{', '.join(COMM_OVERLAP_BENCHMARKS)} (default auto: off for now)",
    )


def run(args) -> int:
    """Run the selected scripts; a failing script is reported and the rest still run."""
    names = list(BENCHMARKS) if args.only is None else args.only
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    from workbench.model.interior import validate_comm_overlap

    comm_overlap = validate_comm_overlap(args.comm_overlap)
    out = Path(args.json) if args.json else None
    if out is not None and out.is_dir():
        raise UserError(f"--json {out} is a folder; give a file path such as bench.json")
    if out is not None and not out.parent.is_dir():
        raise InputNotFoundError(f"--json {out}: folder {out.parent} does not exist; create it first")
    folder = benchmarks_dir()
    results, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            script = folder / f"{name}.py"
            if not script.is_file():
                print(f"== {name}: {script} is missing; skipped", flush=True)
                results[name] = {"skipped": f"{script} is missing"}
                continue
            full, quick = BENCHMARKS[name]
            target = Path(tmp) / f"{name}.json"
            extra = ["--comm-overlap", comm_overlap] if name in COMM_OVERLAP_BENCHMARKS else []
            cmd = [sys.executable, str(script), *(quick if args.quick else full), *extra, "--json", str(target)]
            print(f"== {name}: {' '.join(cmd[1:-2])}", flush=True)
            t0 = time.perf_counter()
            code = subprocess.call(cmd, cwd=folder.parent)
            seconds = time.perf_counter() - t0
            if code != 0 or not target.is_file():
                failed.append(name)
                results[name] = {"failed": f"exit status {code}", "seconds": seconds}
                print(f"== {name}: failed (exit status {code})", flush=True)
                continue
            results[name] = {**json.loads(target.read_text()), "seconds": seconds}
    if out is not None:
        from workbench.execute.devices import device_summary

        payload = {"quick": args.quick, "machine": device_summary(), "results": results}
        from data_tools.atomic import write_text_atomic

        write_text_atomic(out, json.dumps(payload, indent=2, default=float) + "\n")
        print(f"wrote {out}")
    if failed:
        print(f"workbench: error: benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
