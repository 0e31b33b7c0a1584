"""Several processes vs one: inference and training step time, and host memory per process.

Each row runs real commands in fresh processes: ``workbench infer`` / ``workbench train`` as one
process with 8 simulated CPU devices, and the same command under ``workbench launch`` as P
processes joined by jax.distributed (gloo collectives over loopback), so the ratios below
are measured in the same run on the same machine. Nothing here passes or fails on time.

* inference (64³ phantom, 2x2x2, the shipped small model): wall time, and its parts from
  ``report.json``: compile, the run (forward pass), reading and writing; "start-up" is the
  rest of the wall time (interpreter, imports, jax.distributed, weights, output folder).
* training (phantom, 2x2x2): the median step after the first (the first compiles).
* host memory for volume data (256³ zarr, a tiny random model, 2x2x2): each process's peak
  ``tracemalloc`` allocation from reading its blocks to writing its output
  (``WORKBENCH_TRACE_MEMORY=1``), as a fraction of the whole volume's float32 bytes, for
  P = 2 and 4. On simulated CPU devices the devices' input buffers are host memory too, so
  the fraction is about 1/P plus the transient of reading one block.

    python benchmarks/multiprocess.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps (a few minutes)")
    p.add_argument("--infer-size", type=int, default=64)
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--memory-size", type=int, default=256)
    p.add_argument("--memory-processes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p.parse_args()


def _workbench(argv, *, processes: int = 1, env=None) -> float:
    """Run ``workbench ARGV`` (under launch when processes > 1); its wall time in seconds."""
    prefix = [] if processes == 1 else ["launch", "--processes", str(processes), "--devices-per-process",
                                         str(8 // processes), "--"]  # fmt: skip
    if processes == 1:
        argv = [*argv, "--cpu-devices", "8"]
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}, **(env or {})}
    full_env.setdefault("JAX_PLATFORMS", "cpu")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "workbench", *prefix, *argv], cwd=_common.ROOT, env=full_env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"workbench {' '.join(prefix + argv)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds


def _inference(tmp: Path, size: int) -> list[dict]:
    rows = []
    for processes in (1, 2):
        out = tmp / f"infer{processes}"
        wall = _workbench(["infer", f"phantom:{size}", "--mesh", "2x2x2", "--out", str(out)], processes=processes)
        report = json.loads((out / "report.json").read_text())
        parts = report.get("processes") or [{}]
        io = max(p.get("read_seconds", 0.0) + p.get("write_seconds", 0.0) for p in parts)
        work = report["compile_seconds"] + report["seconds"] + io
        rows.append({"processes": processes, "wall": wall, "startup": wall - work, "compile": report["compile_seconds"],
                     "run": report["seconds"], "io": io})  # fmt: skip
    return rows


def _training(tmp: Path, size: int, steps: int) -> list[dict]:
    rows = []
    for processes in (1, 2):
        work = tmp / f"train{processes}"
        argv = ["train", "--data", f"phantom:{size}", "--mesh", "2x2x2", "--steps", str(steps), "--eval-cases", "0",
                "--checkpoint-every", str(steps), "--no-progress", "--checkpoint-dir", str(work)]  # fmt: skip
        wall = _workbench(argv, processes=processes)
        seconds = [r["seconds"] for r in json.loads((work / "history.json").read_text())["train"]]
        rows.append({"processes": processes, "wall": wall, "first_step": seconds[0],
                     "step": statistics.median(seconds[1:])})  # fmt: skip
    return rows


def _memory(tmp: Path, size: int, counts) -> list[dict]:
    from data_tools.synthetic import write_phantom
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import save_weights

    volume = write_phantom(tmp / "volume.zarr", size, seed=1)
    weights = save_weights(tmp / "tiny.msgpack", Model.init(UNetConfig.preset("small", depth=2, base_filters=4,
                                                                                norm="batch")))  # fmt: skip
    rows = []
    for processes in counts:
        out = tmp / f"memory{processes}"
        argv = ["infer", str(volume), "--mesh", "2x2x2", "--checkpoint", str(weights), "--out", str(out)]
        _workbench(argv, processes=processes, env={"WORKBENCH_TRACE_MEMORY": "1"})
        report = json.loads((out / "report.json").read_text())
        whole = report["volume_bytes"]
        for p in report["processes"]:
            rows.append({"processes": processes, "process": p["process"], "peak_bytes": p["host_peak_bytes"],
                         "fraction": p["host_peak_bytes"] / whole, "read_fraction": p["voxels_read"] * 4 / whole,
                         "whole_bytes": whole})  # fmt: skip
    return rows


def main() -> int:
    args = _parse()
    if args.quick:
        args.train_steps, args.memory_size, args.train_size = 4, 128, 16
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        infer = _inference(tmp, args.infer_size)
        train = _training(tmp, args.train_size, args.train_steps)
        memory = _memory(tmp, args.memory_size, args.memory_processes)
    one, two = infer
    print(f"\ninference: phantom:{args.infer_size}, mesh 2x2x2, small model; 2 processes × 4 devices vs 1 × 8")
    print(_common.table(
        ["processes", "wall s", "start-up s", "compile s", "run s", "read+write s"],
        [[r["processes"], r["wall"], r["startup"], r["compile"], r["run"], r["io"]] for r in infer],
        ["d", ".2f", ".2f", ".2f", ".3f", ".3f"],
    ))  # fmt: skip
    print(f"ratio 2 ÷ 1: wall {two['wall'] / one['wall']:.2f}, wall without start-up "
          f"{(two['wall'] - two['startup']) / (one['wall'] - one['startup']):.2f}, run {two['run'] / one['run']:.2f}")  # fmt: skip
    one, two = train
    print(f"\ntraining step: phantom:{args.train_size}, mesh 2x2x2, small model, {args.train_steps} steps")
    print(_common.table(
        ["processes", "wall s", "first step s", "median step s"],
        [[r["processes"], r["wall"], r["first_step"], r["step"]] for r in train],
        ["d", ".2f", ".2f", ".3f"],
    ))  # fmt: skip
    print(f"ratio 2 ÷ 1: step {two['step'] / one['step']:.2f}, wall {two['wall'] / one['wall']:.2f}")
    print(
        f"\nhost memory for volume data: {args.memory_size}³ float32 zarr, mesh 2x2x2, peak per process ÷ whole volume"
    )
    print(_common.table(
        ["processes", "process", "peak MiB", "peak ÷ whole", "read ÷ whole", "1/P"],
        [[r["processes"], r["process"], r["peak_bytes"] / 2**20, r["fraction"], r["read_fraction"],
          1 / r["processes"]] for r in memory],
        ["d", "d", ".1f", ".3f", ".3f", ".3f"],
    ))  # fmt: skip
    _common.write_json(args.json, {"machine": _common.machine(), "inference": infer, "training": train,
                                   "memory": memory, "args": vars(args)})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
