"""Host memory per process of each prediction format in a multi-process inference.

One input (a phantom saved as uncompressed ``.nii``, memory-mapped when read), the small
model with random weights on a 2x2x2 mesh, as ``workbench launch --processes 2
--devices-per-process 4 -- infer … --output-format F`` for every format F, and as one
process (8 devices) writing ``.nii.gz`` for comparison. Each process runs under a wrapper
that prints its peak resident set size at exit (``getrusage``: the high-water mark of the
whole process: the interpreter, XLA, the simulated devices' buffers, which are host memory
here, and the pages of the output file it wrote through its memory map). With
``WORKBENCH_TRACE_MEMORY=1`` the report also gives process 0's traced peak while it
finishes the file (the gzip pass, or NRRD / MetaImage read whole; SimpleITK's own copy of
the image is not traced) and how long that took. Nothing here passes or fails on time.

A second table times process 0's finishing step alone, in this process, on larger label
maps (the 128³ phantom's labels repeated to N³): filling the ``.nii`` in place (every
block, as the processes would), then each conversion: gzip to ``.nii.gz``, NRRD and
MetaImage through SimpleITK, with the traced peak and the file sizes.

    python benchmarks/output_memory.py [--quick] [--size 192] [--finish-sizes 256 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import _common

FORMATS = ("nii.gz", "nii", "tif", "nrrd", "mha", "npy", "zarr")
# Runs `workbench ARGV` and, at exit, prints this process's peak RSS (KiB on Linux).
WRAPPER = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: print(f'PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}',"
    " file=sys.stderr, flush=True))\n"
    "from workbench.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64³ instead of --size")
    p.add_argument("--size", type=int, default=192, help="edge of the cubic phantom (default 192)")
    p.add_argument("--finish-sizes", type=int, nargs="*", default=[256, 512], help="label maps for the second table")
    p.add_argument("--skip-runs", action="store_true", help="only the second table")
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p.parse_args()


def _finish_rows(sizes) -> list[dict]:
    """Process 0's finishing step alone on N³ label maps (see the module notes)."""
    import tracemalloc

    import numpy as np

    from data_tools.blockfile import Geometry, create_block_file, finish_block_file, write_file_block
    from data_tools.synthetic import make_phantom

    base = make_phantom(128, seed=0).labels.astype(np.uint8)
    rows = []
    for n in sizes:
        labels = np.repeat(np.repeat(np.repeat(base, n // 128, 0), n // 128, 1), n // 128, 2)
        geometry = Geometry((1.0, 1.0, 1.0), np.eye(4)[[2, 1, 0, 3]], {})
        half = n // 2
        boxes = [((z, z + half), (y, y + half), (x, x + half)) for z in (0, half) for y in (0, half) for x in (0, half)]
        with tempfile.TemporaryDirectory() as tmp:
            for final, staged in (("nii", "nii"), ("nii.gz", "nii"), ("nrrd", "npy"), ("mha", "npy")):
                path = Path(tmp) / (f"prediction.{final}" if final == staged else f"p.{staged}")
                t0 = time.perf_counter()
                create_block_file(path, labels.shape, np.uint8, geometry)
                for box in boxes:
                    write_file_block(path, box, labels[tuple(slice(a, b) for a, b in box)])
                fill = time.perf_counter() - t0
                tracemalloc.start()
                t0 = time.perf_counter()
                out = finish_block_file(path, Path(tmp) / f"prediction.{final}", geometry)
                seconds = time.perf_counter() - t0
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                rows.append({"size": n, "format": final, "fill_seconds": fill, "finish_seconds": seconds,
                             "finish_peak_bytes": peak, "file_bytes": out.stat().st_size})  # fmt: skip
                out.unlink()
                print(f"{n}³ {final}: fill {fill:.2f} s, finish {seconds:.2f} s", flush=True)
        del labels
    return rows


def _run(argv, work: Path, processes: int) -> tuple[list[int], dict, float]:
    """(peak RSS per process in bytes, report.json, wall seconds) of one inference."""
    from workbench.cli.launch import launch

    out = io.StringIO()
    env = {"WORKBENCH_TRACE_MEMORY": "1", "PYTHONPATH": str(_common.ROOT), "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    if processes > 1:
        status = launch(argv, processes=processes, devices_per_process=8 // processes, out=out,
                        program=[sys.executable, "-c", WRAPPER], env=env)  # fmt: skip
        text = out.getvalue()
        rss = [int(m) * 1024 for m in re.findall(r"\[process \d+\] PEAK_RSS_KIB (\d+)", text)]
    else:
        import subprocess

        done = subprocess.run([sys.executable, "-c", WRAPPER, *argv, "--cpu-devices", "8"], capture_output=True,
                              text=True, env={**os.environ, **env})  # fmt: skip
        status, text = done.returncode, done.stdout + done.stderr
        rss = [int(m) * 1024 for m in re.findall(r"PEAK_RSS_KIB (\d+)", text)]
    seconds = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"workbench {' '.join(argv)} failed ({status}):\n{text[-3000:]}")
    folder = Path(argv[argv.index("--out") + 1])
    return rss, json.loads((folder / "report.json").read_text()), seconds


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    args = _parse()
    size = 64 if args.quick else args.size
    from data_tools.io import load_input, write_volume

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scan = write_volume(load_input(f"phantom:{size}"), work / "scan.nii")
        runs = [] if args.skip_runs else [(1, "nii.gz")] + [(2, f) for f in FORMATS]
        for processes, fmt in runs:
            out = work / f"out-{processes}-{fmt}"
            argv = ["infer", str(scan), "--mesh", "2x2x2", "--random-weights", "--output-format", fmt,
                    "--out", str(out)]  # fmt: skip
            rss, report, seconds = _run(argv, work, processes)
            name = report["prediction"]
            rows.append({
                "processes": processes, "format": fmt, "prediction": name,
                "peak_rss_bytes": rss, "file_bytes": _bytes(out / name),
                "finish_seconds": report.get("finish_seconds"), "finish_peak_bytes": report.get("finish_peak_bytes"),
                "wall_seconds": seconds,
            })  # fmt: skip
            print(f"{processes} process(es), {fmt}: peak RSS {[round(r / 2**20) for r in rss]} MiB", flush=True)
    mib = 2**20
    table = [
        [r["processes"], r["prediction"], " / ".join(f"{b / mib:.0f}" for b in r["peak_rss_bytes"]),
         "-" if r["finish_peak_bytes"] is None else f"{r['finish_peak_bytes'] / mib:.1f}",
         "-" if r["finish_seconds"] is None else f"{r['finish_seconds']:.2f}",
         f"{r['file_bytes'] / mib:.2f}", f"{r['wall_seconds']:.0f}"]
        for r in rows
    ]  # fmt: skip
    print(f"\n{size}³ phantom (.nii input), small model (random weights), mesh 2x2x2; labels {size**3 / mib:.1f} MiB")
    print(_common.table(
        ["processes", "prediction", "peak RSS per process (MiB)", "finish: traced peak (MiB)", "finish (s)",
         "file (MiB)", "wall (s)"],
        table, ["", "", "", "", "", "", ""],
    ))  # fmt: skip
    finish = _finish_rows([] if args.quick else args.finish_sizes)
    print("\nprocess 0's finishing step alone (labels of the 128³ phantom repeated to N³; fill = 8 blocks in place)")
    print(_common.table(
        ["N", "prediction", "fill in place (s)", "finish (s)", "finish: traced peak (MiB)", "file (MiB)"],
        [[r["size"], r["format"], f"{r['fill_seconds']:.2f}", f"{r['finish_seconds']:.2f}",
          f"{r['finish_peak_bytes'] / mib:.1f}", f"{r['file_bytes'] / mib:.2f}"] for r in finish],
        ["", "", "", "", "", ""],
    ))  # fmt: skip
    _common.write_json(args.json, {"machine": _common.machine(), "size": size, "rows": rows, "finish": finish})


if __name__ == "__main__":
    main()
