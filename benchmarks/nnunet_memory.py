"""Per-device memory of nnU-Net's plain and ResEnc-L networks on whole volumes (issue 23, item 8).

For two geometries (a 128×512×512 CT at 2.5×0.8×0.8 mm, z y x, and a 512³ volume at 1 mm),
nnU-Net's planning rules (:mod:`workbench.analysis.nnunet_rules`) applied to the whole volume
give the network (``nnunet``: PlainConvUNet; ``resenc-l``: ResidualEncoderUNet). For each
network, training (``workbench train --plans``'s step, through
:func:`workbench.analysis.nnunet_memory.spec_memory`: deep supervision, nnU-Net's loss, Adam,
bfloat16 activations, batch 1; the committed 2026-12-06 table was measured with a memory model
of the step within 0.5 % of it) and inference (bfloat16, the
full-resolution head): the whole volume on one device, and the smallest mesh that fits 80 GiB
and 16 GiB per device (:func:`workbench.analysis.nnunet_mesh.smallest_mesh`, every figure
compiled). For comparison, the patch nnU-Net's own planner picks for the same dataset (its
rules, its VRAM estimate; 100 training cases, 3 labels) with its batch size, and that patch
network's memory on one device (the same step).

Figures are XLA:GPU's ``memory_analysis()`` compiling for H100s without a GPU
(``--compiler h100``, run in ``.venv-gpu-plan``: the script re-runs itself there) or XLA:CPU
(``--compiler cpu``). ``--quick`` plans 32×128×128 and 128³ (a check that it runs).

    nice -n 10 python benchmarks/nnunet_memory.py [--quick] [--compiler h100|cpu] [--out benchmarks/results]

Writes ``nnunet_memory_<date>.json`` (``_quick`` / ``_cpu`` in the name for those runs) after
every row, so an interrupted run keeps what it measured, and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GEOMETRIES = {  # name: (shape z y x, spacing mm z y x)
    "CT 128x512x512": ((128, 512, 512), (2.5, 0.8, 0.8)),
    "512^3": ((512, 512, 512), (1.0, 1.0, 1.0)),
}
QUICK = {"CT 32x128x128": ((32, 128, 128), (2.5, 0.8, 0.8)), "128^3": ((128, 128, 128), (1.0, 1.0, 1.0))}
PLANNERS = ("nnunet", "resenc-l")
BUDGETS = (80, 16)
N_CASES, N_LABELS, CHANNELS = 100, 3, 1
GIB = 2**30


def _maybe_reexec(compiler: str) -> None:
    """Compiling for a GPU needs JAX's CUDA plugin: re-run this script in the interpreter that has it."""
    from workbench.execute.devices import gpu_plan_python, has_cuda_plugin

    if compiler == "cpu" or has_cuda_plugin():
        return
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    python = gpu_plan_python()
    os.execve(python, [python, *sys.argv], env)


def _gib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.1f}"


def plan_rows(geometries, max_devices, compiler, log, on_row):
    from workbench.analysis import nnunet_rules as rules
    from workbench.analysis.nnunet_memory import spec_memory
    from workbench.analysis.nnunet_mesh import NothingFits, smallest_mesh
    from workbench.model.nnunet_plans import from_nnunet_arch

    rows = []
    for gname, (shape, spacing) in geometries.items():
        for pname in PLANNERS:
            plan = rules.planner(pname)
            topo = rules.pool_and_conv_props(spacing, shape)
            arch = rules.architecture(plan, topo)
            spec = from_nnunet_arch(arch["network_class_name"], arch["arch_kwargs"], CHANNELS, N_LABELS)
            nn = rules.nnunet_configuration(plan, spacing, shape, num_classes=N_LABELS, n_cases=N_CASES)
            nn_spec = from_nnunet_arch(
                nn["architecture"]["network_class_name"], nn["architecture"]["arch_kwargs"], CHANNELS, N_LABELS
            )
            measured: dict = {}
            for train in (True, False):
                step = "train" if train else "infer"
                log(f"{gname} {pname} {step}: {spec.n_stages} stages, {spec.num_params:,} parameters")
                batch = nn["batch_size"] if train else 1
                patch = spec_memory(nn_spec, nn["patch_size"], "1x1x1", train=train, dtype="bfloat16",
                                    compiler=compiler, batch=batch)  # fmt: skip
                row = {
                    "geometry": gname,
                    "shape": list(shape),
                    "spacing": list(spacing),
                    "planner": pname,
                    "network": spec.network_class,
                    "stages": spec.n_stages,
                    "parameters": spec.num_params,
                    "strides": [list(s.stride) for s in spec.stages],
                    "kernels": [list(s.kernel) for s in spec.stages],
                    "step": step,
                    "dtype": "bfloat16",
                    "nnunet_patch": nn["patch_size"],
                    "nnunet_batch": batch,
                    "nnunet_stages": nn_spec.n_stages,
                    "nnunet_patch_bytes": patch["bytes_per_device"],
                }
                for budget in BUDGETS:
                    try:
                        best = smallest_mesh(spec, shape, budget, train=train, dtype="bfloat16", compiler=compiler,
                                             max_devices=max_devices, measured=measured, log=log)  # fmt: skip
                        row[f"fits_{budget}"] = {k: best[k] for k in ("mesh", "devices", "bytes_per_device", "tried")}
                    except NothingFits as err:
                        row[f"fits_{budget}"] = {"mesh": None, "error": str(err)}
                single = [r for k, r in measured.items() if k[2] == "1x1x1" and k[3] == train]
                row["whole_volume_one_device_bytes"] = single[0]["bytes_per_device"] if single else None
                rows.append(row)
                on_row(rows)
    return rows


def format_table(rows) -> str:
    head = (
        "| network | volume | step | whole volume, 1 device (GiB) | smallest mesh ≤ 80 GiB (GiB/device) | "
        "smallest mesh ≤ 16 GiB (GiB/device) | nnU-Net's patch × batch | its memory, 1 device (GiB) |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = []
        for budget in BUDGETS:
            f = r[f"fits_{budget}"]
            cells.append(
                "none" if f["mesh"] is None else f"{f['mesh']} ({f['devices']}): {_gib(f['bytes_per_device'])}"
            )
        lines.append(
            f"| {r['planner']} ({r['stages']} stages, {r['parameters'] / 1e6:.1f} M) | {r['geometry']} | {r['step']} | "
            f"{_gib(r['whole_volume_one_device_bytes'])} | {cells[0]} | {cells[1]} | "
            f"{'x'.join(map(str, r['nnunet_patch']))} × {r['nnunet_batch']} | {_gib(r['nnunet_patch_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small volumes: a check that it runs")
    p.add_argument("--compiler", default="h100", help="h100 (XLA:GPU, deviceless; default) or cpu")
    p.add_argument("--max-devices", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    _maybe_reexec(args.compiler)

    from workbench.execute.devices import configure_cpu_devices, use_gpu_target

    if args.compiler == "cpu":
        args.max_devices = min(args.max_devices, 64)
        configure_cpu_devices(args.max_devices)
    else:
        use_gpu_target(args.max_devices, args.compiler)
    import jax

    date = datetime.date.today().isoformat()
    suffix = ("_quick" if args.quick else "") + ("_cpu" if args.compiler == "cpu" else "")
    out = Path(args.out) / f"nnunet_memory{suffix}_{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()

    def log(line):
        print(f"[{time.time() - started:6.0f} s] {line}", file=sys.stderr, flush=True)

    def on_row(rows):
        result = {
            "what": "per-device memory of nnU-Net's plain and ResEnc-L networks on whole volumes (issue 23 item 8)",
            "command": "python benchmarks/nnunet_memory.py"
            + (" --quick" if args.quick else "")
            + f" --compiler {args.compiler}",
            "compiler": f"XLA:GPU for {args.compiler.upper()} (deviceless)" if args.compiler != "cpu" else "XLA:CPU",
            "jax": jax.__version__,
            "dataset_for_nnunet_planner": {"cases": N_CASES, "labels": N_LABELS, "channels": CHANNELS},
            "seconds": round(time.time() - started, 1),
            "rows": rows,
        }
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)

    rows = plan_rows(QUICK if args.quick else GEOMETRIES, args.max_devices, args.compiler, log, on_row)
    print(format_table(rows))
    print(f"written {out} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
