"""Scale: per-device memory of the paper model at 512³ and 1024³ from the planner.

Each row is ``workbench plan ... --json`` in its own process with as many simulated
CPU devices as its mesh (nothing is allocated: abstract inputs, AOT compile). The
paper model (depth 4, 32 filters, batch norm, bfloat16) with a full training step
(loss, gradients, Adam state). ``--compiler h100`` plans with XLA:GPU for H100s
instead (no GPU needed; bfloat16 convolutions stay bfloat16, which XLA:CPU computes in
float32). Columns: GiB per device (the compiler's accounting),
fit in a 16 GiB device (a TPU v3 core), halo bytes ÷ activation bytes, halo
collective-permutes and the fraction of their bytes with independent compute scheduled
between start and done (forward, backward: :mod:`workbench.analysis.schedule`), wall
seconds of the planning process.

    python benchmarks/scale.py [--quick] [--compiler cpu|h100|h200] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import _common

# (resolution, mesh, train, remat)
ROWS = [
    (512, "1x4x4", True, False),  # the paper's 4x4 layout, 16 devices
    (512, "2x2x2", True, True),  # 8 devices, rematerialised
    (512, "2x2x2", True, False),
    (512, "4x4x4", True, False),  # 64 devices
    (1024, "4x4x4", True, True),  # 64 devices
    (1024, "4x4x4", True, False),
    (1024, "8x8x8", True, False),  # 512 devices
]
QUICK_ROWS = [(128, "2x2x2", True, False), (128, "2x2x2", True, True)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="paper")
    p.add_argument("--budget-gib", type=float, default=16.0)
    p.add_argument("--quick", action="store_true", help="small model, 128³ on 2x2x2 only")
    p.add_argument(
        "--compiler",
        default="cpu",
        help="cpu (XLA:CPU, simulated devices), h100 or h200 (XLA:GPU for those GPUs, no GPU needed)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model = "small"
    from workbench.analysis.plan import GIB, plan_subprocess
    from workbench.mesh import parse_mesh

    rows = []
    for res, mesh, train, remat in QUICK_ROWS if args.quick else ROWS:
        devices = parse_mesh(mesh).n_devices
        argv_ = ["--resolution", str(res), "--mesh", mesh, "--model", args.model, "--no-reference"]
        argv_ += ["--train"] if train else []
        argv_ += ["--remat"] if remat else []
        row = {"resolution": res, "mesh": mesh, "devices": devices, "train": train, "remat": remat}
        t0 = time.perf_counter()
        try:
            r = plan_subprocess(argv_, devices=devices, timeout=900, compiler=args.compiler)
        except Exception as err:  # record and go on: a benchmark never fails as a whole
            rows.append({**row, "error": str(err), "wall_seconds": time.perf_counter() - t0})
            print(f"{res}³ {mesh}: failed: {err}", flush=True)
            continue
        wall = time.perf_counter() - t0
        rows.append(
            {
                **row,
                "gib_per_device": r["bytes_per_device"] / GIB,
                "memory": r["memory"],
                "fits": r["bytes_per_device"] <= args.budget_gib * GIB,
                "halo_ratio": r["communication"]["halo_ratio"],
                "collectives": r["communication"]["collectives"],
                "halo_overlap": r["communication"]["schedule"]["passes"],
                "scheduler_flags": r["communication"]["schedule"]["flags"],
                "warnings": r["warnings"],
                "compile_seconds": r["compile_seconds"],
                "wall_seconds": wall,
            }
        )
        print(
            f"{res}³ on {mesh}{' remat' if remat else ''}: {rows[-1]['gib_per_device']:.2f} GiB/device ({wall:.0f} s)",
            flush=True,
        )
    ok = [r for r in rows if "error" not in r]
    print(
        f"\n{args.model} model, {'training step + Adam' if ok and ok[0]['train'] else 'inference'}, "
        f"budget {args.budget_gib:g} GiB/device, {args.compiler} compiler"
    )
    print(
        _common.table(
            [
                "resolution",
                "mesh",
                "devices",
                "remat",
                "GiB/device",
                f"fits {args.budget_gib:g}",
                "halo/act",
                "permutes",
                "overlapped fwd",
                "overlapped bwd",
                "compile s",
                "wall s",
            ],
            [
                [
                    f"{r['resolution']}³",
                    r["mesh"],
                    r["devices"],
                    "yes" if r["remat"] else "no",
                    r["gib_per_device"],
                    "yes" if r["fits"] else "NO",
                    r["halo_ratio"],
                    r["collectives"]["collective-permute"]["count"],
                    r["halo_overlap"]["forward"]["overlapped_fraction"] or 0.0,
                    r["halo_overlap"]["backward"]["overlapped_fraction"] or 0.0,
                    r["compile_seconds"],
                    r["wall_seconds"],
                ]
                for r in ok
            ],
            ["", "", "d", "", ".2f", "", ".3f", "d", ".1%", ".1%", ".0f", ".0f"],
        )
    )
    _common.write_json(
        args.json,
        {
            "benchmark": "scale",
            "machine": _common.machine(),
            "model": args.model,
            "compiler": args.compiler,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
