"""GPU step: the paper model's training step and inference on one GPU, variant by variant.

The paper model (depth 4, 32 filters, batch norm, bfloat16) at 256³ (``--size``), one
process per variant (its own compile, autotuning and allocator peak), each timed as the
median of 3 runs after a warm-up (:func:`gpu_check.run_phase`). For every variant:

* seconds per step, XLA's FLOP count of the compiled program (``cost_analysis``), the
  TFLOP/s this makes and the fraction of the device's dense bf16 peak (:data:`PEAK_TFLOPS`,
  looked up by the device's name);
* compile seconds, XLA's bytes (``memory_analysis``), the allocator's peak, a hash of the
  optimised HLO (equal hashes: XLA compiled the same program) and the device's name
  (``nvidia-smi`` and JAX's ``device_kind``).

Variants (:data:`VARIANTS`, in the order they run; ``--variants`` picks some):

* ``infer``, ``train``: the explicit backend on a 1x1x1 mesh, as ``workbench train/infer``
  run it (kernel-gradient barrier on, XLA's default autotuning, ``--comm-overlap auto``);
  after the timed runs one more training step runs under ``jax.profiler.trace``: the
  device's kernels summed by name (the top ones in the JSON, the trace in ``--out``);
* ``infer-jit``, ``train-jit``: plain ``jax.jit`` of the same model (``backend="reference"``);
* ``train-nobarrier``: :func:`workbench.model.layers.conv3d` without its
  ``optimization_barrier`` (replaced in the worker process only: there is no switch in the
  package, the barrier exists for memory, see its docstring);
* ``train-autotune0`` / ``train-autotune2``: ``--xla_gpu_autotune_level=0`` (no autotuning:
  cuDNN's heuristic algorithm choice) and ``=2``; XLA's default is 4;
* ``train-remat``: ``--remat`` (activations rematerialised per U-Net level);
* ``train-overlap``, ``infer-overlap``: ``--comm-overlap on``. On one GPU no axis exchanges
  halos, so the split into interior and boundary does not apply: the HLO hash says whether
  XLA compiled the baseline's program.

Derived: training ÷ inference (time and FLOPs), explicit ÷ jit, and every variant's time
÷ the baseline's. Usage::

    OUT=/tmp/out python benchmarks/gpu_step.py                            # on a GPU, ~8 minutes
    python benchmarks/gpu_step.py --allow-cpu --size 32 --out /tmp/dry   # dry run on a CPU
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import _common
from gpu_check import _child, _gib, run_phase

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, by device name (the first match wins):
# NVIDIA's H100 and H200 datasheets give 1,979 (SXM), 1,671 (NVL) and 1,513 (H100 PCIe)
# TFLOP/s "with sparsity"; dense is half.
PEAK_TFLOPS = (("H200 NVL", 835.0), ("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0))

# key: (phase, options for run_phase, extra XLA flags, per-variant time limit in seconds)
VARIANTS = {
    "infer": ("infer:explicit", {}, "", 80),
    "train": ("train:explicit", {"profile": True}, "", 170),
    "infer-jit": ("infer:reference", {}, "", 80),
    "train-jit": ("train:reference", {}, "", 150),
    "infer-overlap": ("infer:explicit", {"comm_overlap": "on"}, "", 80),
    "train-nobarrier": ("train:explicit", {"barrier": False}, "", 150),
    "train-autotune0": ("train:explicit", {}, "--xla_gpu_autotune_level=0", 120),
    "train-remat": ("train:explicit", {"remat": True}, "", 150),
    "train-overlap": ("train:explicit", {"comm_overlap": "on"}, "", 150),
    "train-autotune2": ("train:explicit", {}, "--xla_gpu_autotune_level=2", 150),
}


def peak_tflops(name: str | None) -> float | None:
    """The dense bf16 peak of a device called ``name`` (nvidia-smi's or JAX's), None if unknown."""
    for key, peak in PEAK_TFLOPS:
        if name and key.lower() in name.lower():
            return peak
    return None


def _drop_barrier() -> None:
    """Replace the U-Net's ``conv3d`` by the same convolution without the barrier."""
    from jax import lax

    from workbench.model import layers

    def conv3d(x, kernel, padding):
        return lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1, 1), padding=padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )

    layers.conv3d = conv3d


def kernel_table(trace_dir: Path, top: int = 25) -> dict:
    """Kernels of the device's streams in a perfetto trace, summed by name (µs, calls).

    Reads the Chrome-trace JSON ``jax.profiler.trace(create_perfetto_trace=True)`` writes;
    the device's processes are those named ``/device:…`` (on a CPU dry run there are none
    and every complete event counts)."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) + sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        return {"error": f"no trace under {trace_dir}"}
    with gzip.open(files[-1], "rt") as fh:
        events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M"}
    device = {pid for pid, n in names.items() if "/device:" in str(n)}
    total, calls = {}, {}
    for e in events:
        if e.get("ph") != "X" or (device and e.get("pid") not in device):
            continue
        total[e["name"]] = total.get(e["name"], 0.0) + float(e.get("dur", 0.0))
        calls[e["name"]] = calls.get(e["name"], 0) + 1
    rows = sorted(total.items(), key=lambda kv: -kv[1])
    return {
        "file": str(files[-1].relative_to(trace_dir)),
        "device_streams": bool(device),
        "total_us": sum(total.values()),
        "top": [{"name": n[:160], "us": round(us, 1), "calls": calls[n]} for n, us in rows[:top]],
    }


def run_variant(key: str, size: int, allow_cpu: bool, out: Path) -> dict:
    """One variant in this process (the worker side of :func:`main`)."""
    phase, options, _, _ = VARIANTS[key]
    options = dict(options)
    if not options.pop("barrier", True):
        _drop_barrier()
    profile = options.pop("profile", False)
    if not profile:
        return {"variant": key, **run_phase(phase, size, allow_cpu, None, **options)}
    trace_dir = out / "profile"
    result = run_phase(phase, size, allow_cpu, None, **options, profile_dir=str(trace_dir))
    return {"variant": key, **result, "kernels": kernel_table(trace_dir)}


def _derive(rows: dict) -> dict:
    """Ratios between variants that both ran."""

    def sec(k):
        return rows.get(k, {}).get("seconds")

    out = {}
    pairs = {
        "train / infer (time)": ("train", "infer"),
        "explicit / jit, infer": ("infer", "infer-jit"),
        "explicit / jit, train": ("train", "train-jit"),
    }
    pairs.update({f"{k} / train": (k, "train") for k in rows if k.startswith("train-") and k != "train-jit"})
    pairs.update({f"{k} / infer": (k, "infer") for k in rows if k.startswith("infer-") and k != "infer-jit"})
    for label, (a, b) in pairs.items():
        if sec(a) and sec(b):
            out[label] = sec(a) / sec(b)
    if rows.get("train", {}).get("flops") and rows.get("infer", {}).get("flops"):
        out["train / infer (FLOPs)"] = rows["train"]["flops"] / rows["infer"]["flops"]
    for k in ("train-overlap", "infer-overlap"):
        base = rows.get(k.split("-")[0], {}).get("hlo_sha1")
        if rows.get(k, {}).get("hlo_sha1") and base:
            out[f"{k}: same program as {k.split('-')[0]}"] = rows[k]["hlo_sha1"] == base
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="cube edge (default 256)")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on CPU devices (small sizes)")
    ap.add_argument("--budget-s", type=float, default=480, help="start no variant after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_step"))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.size, args.allow_cpu, out)))
        return 0

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    smi = _common.nvidia_smi()
    info = {"argv": sys.argv[1:], "nvidia_smi": smi, "size": args.size, "peak_table_tflops": dict(PEAK_TFLOPS)}
    print(f"GPU: {smi or 'none (nvidia-smi absent)'}", flush=True)
    rows = {}

    def save():
        _common.write_json(out / "gpu_step.json", {**info, "variants": rows, "derived": _derive(rows)})

    for key in args.variants:
        phase, _, flags, limit = VARIANTS[key]
        left = args.budget_s - (time.perf_counter() - start)
        if left < 25:
            rows[key] = {"variant": key, "error": "skipped: out of time"}
            continue
        common = ["--size", str(args.size), "--out", str(out)] + (["--allow-cpu"] if args.allow_cpu else [])
        got, err = _child(["--variant", key, *common], timeout=min(limit, left), xla_flags=flags, script=__file__)
        row = got or {"variant": key, "phase": phase, "error": err}
        row["xla_flags"] = flags
        # The device's name with every number: nvidia-smi's (the driver's) and JAX's.
        row["nvidia_smi"] = smi.split(",")[0].strip() if smi else None
        if "seconds" in row and row.get("flops"):
            row["tflops_per_s"] = row["flops"] / row["seconds"] / 1e12
            peak = peak_tflops(row["nvidia_smi"] or row.get("device"))
            row["peak_tflops"] = peak
            row["fraction_of_peak"] = row["tflops_per_s"] / peak if peak else None
        rows[key] = row
        print(f"{key}: {row.get('seconds', err)}", flush=True)
        save()
    save()

    ok = {k: r for k, r in rows.items() if "seconds" in r}
    print(f"\nGPU step: {smi or 'no GPU'}; paper model, bfloat16, {args.size}³, one device")
    print(
        _common.table(
            ["variant", "step s", "TFLOP", "TFLOP/s", "% of peak", "compile s", "XLA GiB", "alloc GiB", "HLO"],
            [
                [
                    k,
                    r["seconds"],
                    r["flops"] / 1e12,
                    r.get("tflops_per_s", float("nan")),
                    "-" if r.get("fraction_of_peak") is None else f"{100 * r['fraction_of_peak']:.1f}",
                    r["compile_s"],
                    _gib(r["xla_bytes"]),
                    _gib(r["allocator_peak"]),
                    r["hlo_sha1"],
                ]
                for k, r in ok.items()
            ],
            ["", ".4f", ".3f", ".1f", "", ".1f", "", "", ""],
        )
    )
    for k, r in rows.items():
        if k not in ok:
            print(f"{k}: {r['error'][:120]}")
    for label, value in _derive(rows).items():
        print(f"{label}: {value if isinstance(value, bool) else f'{value:.3f}'}")
    kernels = rows.get("train", {}).get("kernels", {})
    for row in kernels.get("top", [])[:12]:
        print(f"  {row['us'] / 1e3:9.2f} ms  {row['calls']:5d}×  {row['name'][:90]}")
    print(f"total {time.perf_counter() - start:.0f} s; JSON in {out / 'gpu_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
