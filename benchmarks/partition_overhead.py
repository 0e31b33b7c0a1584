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
import re
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
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="also trace one forward of the reference and of the explicit backend (jax.profiler, in DIR) "
        "and print the XLA:CPU operations' time by kind",
    )
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p.parse_args()


_KINDS = {  # XLA:CPU names its thunks after the HLO op or the JAX primitive
    "convolution": "convolution",
    "conv_general_dilated": "convolution",
    "collective-permute": "collective-permute (incl. waiting)",
    "ppermute": "collective-permute (incl. waiting)",
    "all-reduce": "all-reduce (incl. waiting)",
    "psum": "all-reduce (incl. waiting)",
    "psum_invariant": "all-reduce (incl. waiting)",
}


def _op_kind(name: str) -> str | None:
    """The kind of an XLA operation named in a CPU trace (``convolution.12`` -> ``convolution``,
    ``loop_pad_fusion.3`` -> ``fusion (loop_pad)``); None for the runtime's and Python's events."""
    if not re.fullmatch(r"[a-z][a-z0-9_\-]*(\.\d+)*", name):
        return None
    base = name.split(".")[0]
    if base in _KINDS:
        return _KINDS[base]
    if "fusion" in base or base.startswith("wrapped"):
        return "fusion (" + base.replace("_fusion", "").replace("wrapped_", "") + ")"
    return base


def _profile(fn, v, x, folder) -> dict:
    """Seconds of XLA:CPU operations by kind over one traced run (summed over the devices'
    threads: a collective's time includes waiting for the other devices)."""
    import gzip
    import json as _json
    from pathlib import Path

    import jax

    with jax.profiler.trace(str(folder), create_perfetto_trace=True):
        jax.block_until_ready(fn(v, x))
    trace = sorted(Path(folder).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)[-1]
    with gzip.open(trace, "rt") as fh:
        events = _json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds: dict[str, float] = {}
    for e in events:
        kind = _op_kind(e.get("name", "")) if e.get("ph") == "X" else None
        if kind:
            kinds[kind] = kinds.get(kind, 0.0) + float(e.get("dur", 0.0)) / 1e6
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def _time_forward(config, layout, backend, variables, image, repeats, comm_overlap=None, profile=None):
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
    if profile:
        _time_forward.profile = _profile(fn, v, x, profile)
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
        folder = f"{args.profile}/{n}" if args.profile else None
        ref_t, _, ref_logits, ref_cpu = _time_forward(
            config, ref_layout, "reference", model.variables, image, args.repeats, profile=folder and folder + "_ref"
        )
        ref_profile = getattr(_time_forward, "profile", None)
        ref_mem = {"forward": plan_memory(config, ref_layout, backend="reference")["peak"]}
        if not args.no_train:
            ref_mem["train"] = plan_memory(config, ref_layout, backend="reference", train=True)["peak"]
        for backend in ("explicit", "gspmd"):
            _time_forward.profile = None
            t, _, logits, cpu = _time_forward(
                config, layout, backend, model.variables, image, args.repeats, args.comm_overlap,
                profile=folder and backend == "explicit" and folder + "_explicit",
            )  # fmt: skip
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
            if _time_forward.profile:
                row["profile_seconds"] = _time_forward.profile
                row["reference_profile_seconds"] = ref_profile
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
    for r in rows:
        if "profile_seconds" in r:
            ref, exp = r["reference_profile_seconds"], r["profile_seconds"]
            print(f"\nXLA:CPU operation time by kind, one traced forward at {r['resolution']}³ (s, all threads)")
            print("| kind | reference | explicit | difference |\n|---|---|---|---|")
            for kind in sorted(set(ref) | set(exp), key=lambda k: -(exp.get(k, 0) - ref.get(k, 0))):
                a, b = ref.get(kind, 0.0), exp.get(kind, 0.0)
                if max(a, b) >= 0.001:
                    print(f"| {kind} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
            print(
                f"| total | {sum(ref.values()):.3f} | {sum(exp.values()):.3f} | {sum(exp.values()) - sum(ref.values()):+.3f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "mesh": str(spec), "model": args.model, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
