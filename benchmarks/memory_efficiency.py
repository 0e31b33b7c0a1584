"""Memory efficiency: ideal ÷ measured per-device bytes, explicit vs GSPMD.

ideal = the single-device program's bytes ÷ devices. The paper model (float32 by
default, as the issue's target) at 256³ on 2x2x2, inference and a full training
step (loss, gradients, Adam), each compiled ahead of time for abstract inputs (no
volume is allocated). Also the communication audit of each compiled step.
``--compiler h100`` plans with XLA:GPU for H100s (no GPU needed) instead of XLA:CPU.

    python benchmarks/memory_efficiency.py [--resolution 256] [--dtype float32] [--quick] [--compiler cpu|h100] [--json out.json]
"""

from __future__ import annotations

import argparse

import _common


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--model", default="paper")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true", help="small model at 64³")
    p.add_argument(
        "--compiler", default="cpu", help="cpu (XLA:CPU, simulated devices) or h100 (XLA:GPU for H100s, no GPU needed)"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.model = 64, "small"
    _common.start(8)
    from workbench.analysis.plan import GIB, plan, plan_argv, plan_subprocess
    from workbench.mesh import parse_mesh
    from workbench.model.unet import UNetConfig

    def plan_one(config, train, backend, reference):
        if args.compiler == "cpu":
            return plan(config, args.resolution, args.mesh, train=train, backend=backend, reference=reference)
        argv = plan_argv(
            config,
            args.resolution,
            args.mesh,
            train=train,
            backend=backend,
            halo="exact",
            allow_padding=False,
            reference=reference,
        )
        return plan_subprocess(argv, devices=parse_mesh(args.mesh).n_devices, compiler=args.compiler)

    config = UNetConfig.preset(args.model, dtype=args.dtype)
    rows = []
    single = {}
    for train in (False, True):
        for backend in ("explicit", "gspmd"):
            r = plan_one(config, train, backend, reference=train not in single)
            if r["bytes_single_device"] is not None:
                single[train] = r["bytes_single_device"]
            eff = single[train] / r["devices"] / r["bytes_per_device"]
            comm = r["communication"]
            rows.append(
                {
                    "step": "training" if train else "inference",
                    "backend": backend,
                    "gib_per_device": r["bytes_per_device"] / GIB,
                    "single_gib": single[train] / GIB,
                    "ideal_gib": single[train] / r["devices"] / GIB,
                    "efficiency": eff,
                    "memory": r["memory"],
                    "halo_ratio": comm["halo_ratio"],
                    "all_gathers": comm["collectives"]["all-gather"]["count"],
                    "collectives": comm["collectives"],
                    "warnings": r["warnings"],
                    "compile_seconds": r["compile_seconds"],
                }
            )
            print(f"{rows[-1]['step']} {backend}: {rows[-1]['gib_per_device']:.3f} GiB/device", flush=True)
    print(
        f"\n{args.model} model ({args.dtype}) at {args.resolution}³ on {args.mesh}, {args.compiler} compiler; "
        "efficiency = single-device bytes ÷ devices ÷ per-device bytes"
    )
    print(
        _common.table(
            ["step", "backend", "GiB/device", "ideal GiB", "1-device GiB", "efficiency", "halo/act", "all-gathers"],
            [
                [
                    r["step"],
                    r["backend"],
                    r["gib_per_device"],
                    r["ideal_gib"],
                    r["single_gib"],
                    r["efficiency"],
                    r["halo_ratio"],
                    r["all_gathers"],
                ]
                for r in rows
            ],
            ["", "", ".3f", ".3f", ".3f", ".3f", ".3f", "d"],
        )
    )
    by = {(r["step"], r["backend"]): r for r in rows}
    for step in ("inference", "training"):
        e, g = by[(step, "explicit")], by[(step, "gspmd")]
        print(f"{step}: gspmd ÷ explicit per-device bytes = {g['gib_per_device'] / e['gib_per_device']:.3f}")
    for r in rows:
        for w in r["warnings"]:
            print(f"warning ({r['step']}, {r['backend']}): {w}")
    _common.write_json(
        args.json,
        {
            "benchmark": "memory_efficiency",
            "machine": _common.machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
