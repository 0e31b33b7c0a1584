"""What partitioning costs: time and per-device memory vs the single-device reference.

For each resolution, the same weights run (a) unpartitioned on one device, (b) with
our explicit ``shard_map`` + halo exchange, (c) with GSPMD, all in this process on
simulated CPU devices. Time is the median of ``--repeats`` runs after a warm-up
(inputs already on the devices), as wall time and as the CPU time of the process (every
thread; on a shared host the steadier of the two); memory is XLA's per-device accounting from
``compiled.memory_analysis()`` (arguments + outputs + temporaries − aliases) for
inference and for the training step that training runs (loss, gradients, clipping,
Adam update). Efficiency = ideal ÷ measured,
ideal = reference bytes ÷ devices. Nothing here passes or fails on time.

    python benchmarks/partition_overhead.py [--sizes 64 128] [--mesh 2x2x2] [--comm-overlap auto] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys

import _common


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--model", default="small")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cpu-devices", type=int, default=8)
    p.add_argument("--no-train", action="store_true", help="skip the training-step memory")
    p.add_argument(
        "--comm-overlap",
        default=None,
        help="auto | on | off (explicit backend; default: make_forward's, auto: off for now)",
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p.parse_args()


def _time_forward(config, layout, backend, variables, image, repeats, comm_overlap=None):
    """(median wall seconds, warm-up seconds, cropped logits, median CPU seconds of this process)."""
    import time

    import jax
    import numpy as np

    from workbench.execute.run import make_forward

    extra = {} if comm_overlap is None else {"comm_overlap": comm_overlap}
    fn, _, in_sharding, var_sharding = make_forward(config, layout, backend=backend, **extra)
    target = layout.reference_shape if backend == "reference" else layout.padded_shape
    x = np.pad(image, [(0, 0)] + [(0, t - s) for t, s in zip(target, image.shape[1:4])] + [(0, 0)])
    x = jax.device_put(x, in_sharding)
    v = jax.device_put(variables, var_sharding)
    seconds, compile_s, out = _common.median_seconds(lambda: fn(v, x), repeats)  # warm-up: compile + first run
    cpu = []  # CPU seconds of every thread of this process: steadier than wall time on a loaded host
    for _ in range(repeats):
        t0 = time.process_time()
        jax.block_until_ready(fn(v, x))
        cpu.append(time.process_time() - t0)
    return seconds, compile_s, layout.crop(np.asarray(out)), float(np.median(cpu))


def main() -> int:
    args = _parse()
    from workbench.execute.devices import configure_cpu_devices, device_summary

    configure_cpu_devices(args.cpu_devices)
    import numpy as np

    from workbench.analysis.plan import plan_memory
    from workbench.mesh import ShardLayout, parse_mesh
    from workbench.model.unet import Model, UNetConfig

    config = UNetConfig.preset(args.model)
    model = Model.init(config, seed=0)
    spec = parse_mesh(args.mesh)
    machine = device_summary()
    print(
        f"# partition overhead: model={args.model} mesh={spec} devices={spec.n_devices} "
        f"platform={machine['platform']} ({machine['device_kind']}), jax {machine['jax']}, "
        f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    )
    rows = []
    for n in args.sizes:
        image = np.random.default_rng(0).standard_normal((1, n, n, n, 1)).astype(np.float32)
        ref_layout = ShardLayout((n, n, n), "1x1x1", multiple=config.multiple)
        layout = ShardLayout((n, n, n), spec, multiple=config.multiple)
        ref_t, _, ref_logits, ref_cpu = _time_forward(
            config, ref_layout, "reference", model.variables, image, args.repeats
        )
        ref_mem = {"forward": plan_memory(config, ref_layout, backend="reference")["peak"]}
        if not args.no_train:
            ref_mem["train"] = plan_memory(config, ref_layout, backend="reference", train=True)["peak"]
        for backend in ("explicit", "gspmd"):
            t, _, logits, cpu = _time_forward(
                config, layout, backend, model.variables, image, args.repeats, args.comm_overlap
            )
            row = {
                "resolution": n,
                "backend": backend,
                "seconds": t,
                "reference_seconds": ref_t,
                "time_ratio": t / ref_t,
                "cpu_seconds": cpu,
                "reference_cpu_seconds": ref_cpu,
                "cpu_ratio": cpu / ref_cpu,
                "max_abs_diff": float(np.abs(logits - ref_logits).max()),
                "comm_overlap": args.comm_overlap if backend == "explicit" else None,
            }
            for mode in ref_mem:
                peak = plan_memory(config, layout, backend=backend, train=mode == "train")["peak"]
                ideal = ref_mem[mode] / spec.n_devices
                row[f"{mode}_bytes_per_device"] = peak
                row[f"{mode}_ideal_bytes"] = ideal
                row[f"{mode}_efficiency"] = ideal / peak
            rows.append(row)
    header = (
        "| size | backend  | time ÷ ref | CPU time ÷ ref | max abs Δ | fwd MiB/dev (ideal) | fwd eff "
        "| train MiB/dev (ideal) | train eff |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        train = (
            (
                f"{r['train_bytes_per_device'] / 2**20:8.1f} ({r['train_ideal_bytes'] / 2**20:6.1f}) "
                f"| {r['train_efficiency']:9.2f}"
            )
            if "train_efficiency" in r
            else "n/a | n/a"
        )
        print(
            f"| {r['resolution']:>3}³ | {r['backend']:<8} | {r['time_ratio']:10.2f} | {r['cpu_ratio']:14.3f} "
            f"| {r['max_abs_diff']:9.1e} "
            f"| {r['forward_bytes_per_device'] / 2**20:8.1f} ({r['forward_ideal_bytes'] / 2**20:6.1f})  "
            f"| {r['forward_efficiency']:7.2f} | {train} |"
        )
    print(
        "(reference seconds: "
        + ", ".join(f"{r['resolution']}³ {r['reference_seconds']:.3f}" for r in rows if r["backend"] == "explicit")
        + ")"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "mesh": str(spec), "model": args.model, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
