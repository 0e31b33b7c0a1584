"""Weak scaling on paper: the paper model's training step with a 256³ block per device, 8 → 512 devices.

Nothing here runs on more than one device. The prediction combines:

* per-device compute of one training step (loss, gradients, Adam), measured on one
  NVIDIA H200 (explicit backend, 1x1x1 mesh, 256³; ``gpu_check_h200_2026-11-29.json``);
* every collective of the step, read from XLA:GPU's compiled program for H100s (no GPU
  needed; ``--compile`` meshes, default 2x2x2): message bytes, the mesh axis of each
  halo exchange, and what the schedule runs between each async start and done;
* the analytic halo rule of :mod:`workbench.analysis.scaling`, checked against the
  compiled audit at 256³ and at 128³ blocks (the 128³ audit is the README's Scale row);
* published link rates (NVLink 4, InfiniBand NDR per GPU, TPU v5p ICI per link) and
  stated latencies; see docs/scaling.md for every assumption and its source.

With a fixed block per device, every device runs the same program on every mesh: only
which links the halo messages cross and how many devices reduce the gradients change.

    python benchmarks/weak_scaling.py [--compile 2x2x2 2x2x4] [--reuse RESULTS.json] [--json OUT]

``--reuse`` takes the compiled facts from an earlier result instead of compiling
(each 256³-per-device compile takes 1-3 minutes here). ``--quick`` is ``--reuse`` of the
committed result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common

ROOT = _common.ROOT
RESULTS = ROOT / "benchmarks" / "results"
GPU_CHECK = RESULTS / "gpu_check_h200_2026-11-29.json"
SCALE_H100 = RESULTS / "scale_h100_deviceless_2026-11-26.json"
COMMITTED = RESULTS / "weak_scaling_2026-11-29.json"
BLOCK = 256
MESHES = ["2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8"]
GPUS_PER_NODE = 8
GIB = 2**30

# Link rates (bytes/s, one direction) and per-message latencies (s). Sources and the
# reasoning behind each latency in docs/scaling.md; the latencies are assumptions.
LINKS = {
    # NVLink 4 on H100/H200 SXM: 900 GB/s bidirectional per GPU through NVSwitch -> 450 GB/s each way
    "nvlink": {"bandwidth": 450e9, "latency": 10e-6},
    # one 400 Gb/s ConnectX-7 (InfiniBand NDR) per GPU in a DGX H100/H200 -> 50 GB/s each way
    "ib": {"bandwidth": 50e9, "latency": 15e-6},
    # TPU v5p: 1200 GB/s bidirectional ICI per chip over 6 torus links -> 100 GB/s per link each way
    "ici": {"bandwidth": 100e9, "latency": 5e-6},
}
# All-reduce latency: a fixed start-up plus a per-level cost of a tree (GPU: over nodes) or
# of the rings along each torus axis (TPU: hops), up and down.
ALLREDUCE_LATENCY = {"gpu": {"base": 15e-6, "per_level": 5e-6}, "tpu": {"base": 5e-6, "per_hop": 1e-6}}
HBM_BANDWIDTH = 4.8e12  # H200 HBM3e, bytes/s: how fast scheduled-in-between fusions write their results


# -- child: one deviceless XLA:GPU compile --------------------------------------------------------
def child(mesh: str, out: str, hlo_out: str | None) -> None:
    """Compile the training step for H100s at BLOCK³ per device on ``mesh``; write the facts."""
    from workbench.analysis.audit import async_overlap, audit_text
    from workbench.execute.devices import use_gpu_target
    from workbench.mesh import SPATIAL_AXES, ShardLayout, parse_mesh

    spec = parse_mesh(mesh)
    use_gpu_target(spec.n_devices, "h100")
    from workbench.execute.run import memory_stats
    from workbench.model.unet import UNetConfig
    from workbench.training.step import compile_train_step

    config = UNetConfig.preset("paper")
    layout = ShardLayout(tuple(BLOCK * m for m in spec.spatial), spec, multiple=config.multiple)
    t0 = time.perf_counter()
    compiled = compile_train_step(config, layout)
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    if hlo_out:
        Path(hlo_out).write_text(text)
    overlap = async_overlap(text)
    strides = {"z": spec.y * spec.x, "y": spec.x, "x": 1}
    for c in overlap["collectives"]:
        if c["pairs"]:
            step = abs(c["pairs"][0][1] - c["pairs"][0][0])
            c["axis"] = next(a for a in SPATIAL_AXES if strides[a] == step and spec.spatial[SPATIAL_AXES.index(a)] > 1)
            c["pairs"] = c["pairs"][:1]  # one pair names the axis and direction; the rest follow
    result = {
        "mesh": mesh,
        "block": BLOCK,
        "compile_seconds": seconds,
        "memory": memory_stats(compiled),
        "audit": {k: v for k, v in audit_text(text).items() if k != "activation_all_gathers"},
        "overlap": overlap,
    }
    Path(out).write_text(json.dumps(result))


def compile_mesh(mesh: str, hlo_dir: str | None) -> dict:
    from workbench.execute.devices import gpu_plan_python

    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"weak_scaling_{mesh}_{os.getpid()}.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WORKBENCH_GPU_PLAN_CHILD": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    cmd = [gpu_plan_python(), __file__, "--child", mesh, str(out)]
    if hlo_dir:
        cmd += ["--hlo", str(Path(hlo_dir) / f"train_{BLOCK}_{mesh}_h100.hlo")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {mesh} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


# -- the model ------------------------------------------------------------------------------------
def allreduce_latency(system: str, spec, nodes: int) -> float:
    """Latency of one small all-reduce over every device (assumed; see ALLREDUCE_LATENCY)."""
    a = ALLREDUCE_LATENCY[system]
    if system == "gpu":
        return a["base"] + 2 * math.ceil(math.log2(nodes)) * a["per_level"] if nodes > 1 else a["base"]
    return a["base"] + 2 * sum(math.ceil(m / 2) for m in spec.spatial) * a["per_hop"]


def collective_seconds(system: str, spec, c: dict, *, bandwidth=1.0, latency=1.0) -> tuple[float, float]:
    """(bandwidth, latency) seconds of one collective ``c`` (``kind``, ``bytes``, ``axis`` of
    a permute) on ``system`` over mesh ``spec``, link rates and latencies scaled by the factors."""
    from workbench.analysis.scaling import crossing_axes

    p = spec.n_devices
    nodes = math.ceil(p / GPUS_PER_NODE)
    if c["kind"] == "collective-permute":
        axes = crossing_axes(spec, GPUS_PER_NODE)
        # an edge or corner message over combined axes ("?", the one-phase exchange) crosses
        # a node boundary if any axis does: timed at the slower link
        crossing = axes[c["axis"]] if c["axis"] in axes else any(axes.values())
        link = LINKS["ici"] if system == "tpu" else LINKS["ib" if crossing else "nvlink"]
        return c["bytes"] / (link["bandwidth"] * bandwidth), link["latency"] * latency
    # over every device: a ring's bandwidth term, a tree's (or torus rings') latency
    link = LINKS["ici"] if system == "tpu" else LINKS["ib" if nodes > 1 else "nvlink"]
    bw = 2 * (p - 1) / p * c["bytes"] / (link["bandwidth"] * bandwidth)
    return bw, allreduce_latency(system, spec, nodes) * latency


def comm_times(system: str, spec, collectives: list[dict], *, bandwidth=1.0, latency=1.0) -> dict:
    """Seconds of every collective of the step on ``system`` (``gpu``: NVLink inside a node,
    InfiniBand between nodes; ``tpu``: v5p ICI), scaled by the ``bandwidth``/``latency`` factors."""
    parts = {"halo_bandwidth": 0.0, "halo_latency": 0.0, "allreduce_bandwidth": 0.0, "allreduce_latency": 0.0}
    exposed = 0.0
    for c in collectives:
        bw, lat = collective_seconds(system, spec, c, bandwidth=bandwidth, latency=latency)
        part = "halo" if c["kind"] == "collective-permute" else "allreduce"
        parts[f"{part}_bandwidth"] += bw
        parts[f"{part}_latency"] += lat
        # what the schedule runs between start and done hides the message
        exposed += max(0.0, bw + lat - c["fusion_bytes"] / HBM_BANDWIDTH)
    return {**parts, "total": sum(parts.values()), "exposed": exposed}


def predict(mesh: str, collectives: list[dict], compute_s: float) -> dict:
    """Predicted communication and step time of the training step on ``mesh``."""
    from workbench.analysis.scaling import busiest_device_halo_bytes, crossing_axes
    from workbench.mesh import parse_mesh
    from workbench.model.unet import UNetConfig

    spec = parse_mesh(mesh)
    nodes = math.ceil(spec.n_devices / GPUS_PER_NODE)
    out = {
        "mesh": mesh,
        "devices": spec.n_devices,
        "nodes": nodes,
        "crossing_axes": [a for a, c in crossing_axes(spec, GPUS_PER_NODE).items() if c],
        "halo_bytes_busiest": busiest_device_halo_bytes(UNetConfig.preset("paper"), (BLOCK,) * 3, spec),
    }
    for system in ("gpu", "tpu"):
        t = comm_times(system, spec, collectives)
        steps = {
            "no_overlap": compute_s + t["total"],
            "as_scheduled": compute_s + t["exposed"],
            "full_overlap": max(compute_s, t["total"]),
        }
        out[system] = {
            **{f"{k}_s": v for k, v in t.items()},
            "step_s": steps,
            "comm_share": t["total"] / steps["no_overlap"],
            "efficiency": {k: compute_s / v for k, v in steps.items()},
            # how the no-overlap efficiency moves if links deliver half their rate, or latencies double
            "efficiency_half_bandwidth": compute_s
            / (compute_s + comm_times(system, spec, collectives, bandwidth=0.5)["total"]),
            "efficiency_double_latency": compute_s
            / (compute_s + comm_times(system, spec, collectives, latency=2.0)["total"]),
        }
    return out


def check_rule(compiled: dict) -> list[dict]:
    """The analytic halo rule against the compiled audits: this run's, and the 128³-block
    rows of the README's Scale table (512³ on 4x4x4, 1024³ on 8x8x8)."""
    from workbench.analysis.scaling import halo_bytes
    from workbench.model.unet import UNetConfig

    config = UNetConfig.preset("paper")
    checks = [
        {
            "source": f"this run, {c['mesh']}",
            "block": f"{BLOCK}x{BLOCK}x{BLOCK}",
            "audit": c["audit"]["halo_bytes"],
            "rule": halo_bytes(config, (BLOCK,) * 3, c["mesh"], paired=False),  # compiled before pairing
        }
        for c in compiled
    ]
    if SCALE_H100.exists():
        for row in json.loads(SCALE_H100.read_text())["rows"]:
            if "collectives" in row and not row["remat"]:
                block = tuple(row["resolution"] // int(m) for m in row["mesh"].split("x"))
                checks.append(
                    {
                        "source": f"{SCALE_H100.name}, {row['resolution']}³ on {row['mesh']}",
                        "block": "x".join(map(str, block)),
                        "audit": row["collectives"]["collective-permute"]["bytes"],
                        "rule": halo_bytes(config, block, row["mesh"], paired=False),
                    }
                )
    return checks


def _schedule(compiled: dict) -> list[tuple]:
    keys = ("kind", "bytes", "is_sync", "convolutions", "fusions", "fusion_bytes")  # the first four: the messages
    return [tuple(c.get(k) for k in keys) for c in compiled["overlap"]["collectives"]]


# -- the model from the schedule (benchmarks/halo_overlap.py results) -----------------------------
PEAK_BF16 = 989e12  # H100/H200 SXM dense bfloat16, FLOP/s: only its ratio to HBM_BANDWIDTH is used
SCHEDULE_MESHES = ["2x2x2", "4x4x4", "8x8x8"]
SENSITIVITY = [(1.0, 1.0), (0.5, 1.0), (0.25, 1.0), (1.0, 2.0), (1.0, 4.0), (0.5, 2.0)]  # (link rate, latency)


def work(events: list[dict]) -> float:
    """The roofline seconds of a timeline's compute (FLOPs at peak plus bytes at HBM rate)."""
    return sum(e["flops"] / PEAK_BF16 + e["bytes"] / HBM_BANDWIDTH for e in events if e["event"] == "compute")


def scheduled_efficiency(events, compute_s: float, mesh: str, *, bandwidth=1.0, latency=1.0) -> dict:
    """:func:`workbench.analysis.scaling.simulate_step` of a compiled timeline on ``mesh`` (GPU links)."""
    from workbench.analysis.scaling import simulate_step
    from workbench.mesh import parse_mesh

    spec = parse_mesh(mesh)

    def seconds(e):
        return sum(collective_seconds("gpu", spec, e, bandwidth=bandwidth, latency=latency))

    r = simulate_step(events, compute_s, seconds, flop_rate=PEAK_BF16, byte_rate=HBM_BANDWIDTH)
    return {**r, "efficiency": compute_s / r["step_s"], "no_overlap": compute_s / (compute_s + r["communication_s"])}


def _program_for(mesh: str, programs: dict):
    """The compiled run whose program a device of ``mesh`` runs (256³ per device): the same
    mesh's, or for a mesh with 3+ devices on every axis one compiled on such a mesh (interior
    devices talk both ways), or the 2x2x2 program if it sends one message per direction
    (no axis of two paired into one two-way message)."""
    from workbench.mesh import parse_mesh

    if mesh in programs:
        return programs[mesh]
    if min(parse_mesh(mesh).spatial) >= 3:
        wide = [r for m, r in programs.items() if min(parse_mesh(m).spatial) >= 3]
        if wide:
            return wide[0]
    small = programs.get("2x2x2")
    if small is not None and not small["passes"]["total"].get("two_way", 0):
        return small
    return None


def schedule_model(paths: list[str], compute_s: float) -> list[dict]:
    """Per program (label, GPU target, scheduler flag) of the halo_overlap results (before,
    after), the predicted efficiency at 8, 64 and 512 GPUs with 256³ per device, and its
    sensitivity to link rate and latency."""
    groups: dict[tuple, dict] = {}
    for path in paths:
        result = json.loads(Path(path).read_text())
        for run in result["runs"]:
            if "timeline" not in run or any(run["res"] != BLOCK * int(m) for m in run["mesh"].split("x")):
                continue  # another block per device than the model's
            key = (result.get("label") or Path(path).name, run["target"], run["flags"]["latency_hiding_scheduler"])
            groups.setdefault(key, {})[run["mesh"]] = run
    out, base_work = [], {}  # per GPU target: the first program's (before) roofline work
    for (label, target, lhs), programs in groups.items():
        row = {"label": label, "compiler": f"XLA:GPU {target.upper()}", "latency_hiding_scheduler": lhs}
        row["programs"], row["sensitivity"] = {}, [{"bandwidth": bw, "latency": lat} for bw, lat in SENSITIVITY]
        for mesh in SCHEDULE_MESHES:
            run = _program_for(mesh, programs)
            if run is None:
                continue
            events = run["timeline"]
            base = base_work.setdefault(target, work(events))
            # Compute stays the measured step's: another program (convolutions split into
            # interior and boundary) may take another time, which no GPU has measured; the
            # roofline estimate of the change is recorded, not used.
            compute = compute_s
            row["programs"][mesh] = {
                "compiled_mesh": run["mesh"],
                "resolution": run["res"],
                "compute_s": compute,
                "roofline_work_ratio": work(events) / base,
                "halo_overlapped": {k: run["passes"][k]["overlapped_fraction"] for k in ("forward", "backward")},
            }
            for s in row["sensitivity"]:
                s[mesh] = scheduled_efficiency(events, compute, mesh, bandwidth=s["bandwidth"], latency=s["latency"])
        out.append(row)
    return out


def print_schedule_model(model: list[dict]) -> None:
    print("\nPredicted weak-scaling efficiency from the compiled schedule (GPU: NVLink in a node, IB between)")
    rows = []
    for m in model:
        name = f"{m['label']}, {m['compiler']}, LHS {'on' if m['latency_hiding_scheduler'] else 'off'}"
        for s in m["sensitivity"]:
            last = s.get(SCHEDULE_MESHES[-1], {})
            rows.append(
                [name, f"x{s['bandwidth']:g}", f"x{s['latency']:g}"]
                + [s[mesh]["efficiency"] if mesh in s else float("nan") for mesh in SCHEDULE_MESHES]
                + [last.get("no_overlap", float("nan")), last.get("hidden_s", float("nan")) * 1e3]
            )
            name = ""
    print(
        _common.table(
            ["program", "link rate", "latency", "8 GPUs", "64 GPUs", "512 GPUs", "512: no overlap", "512: hidden ms"],
            rows,
            ["", "", "", ".1%", ".1%", ".1%", ".1%", ".2f"],
        )
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compile", nargs="+", default=["2x2x2"], help="meshes to compile for H100 (256³ per device)")
    p.add_argument("--reuse", default=None, help="take the compiled facts from this earlier result JSON")
    p.add_argument("--quick", action="store_true", help="--reuse the committed result (no compile)")
    p.add_argument("--hlo-dir", default=None, help="also write each compiled program's text here")
    p.add_argument(
        "--schedule",
        nargs="+",
        default=None,
        metavar="HALO_OVERLAP.json",
        help="also predict from these benchmarks/halo_overlap.py results' schedules (e.g. before, after)",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=2, metavar=("MESH", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--hlo", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child, args.hlo)
        return 0
    if args.quick and args.reuse is None:
        args.reuse = str(COMMITTED)

    gpu = json.loads(GPU_CHECK.read_text())
    compute_s = gpu["phases"]["train:explicit"]["seconds"]
    infer_s = gpu["phases"]["infer:explicit"]["seconds"]
    if args.reuse:
        compiled = json.loads(Path(args.reuse).read_text())["compiled"]
        for c in compiled:
            for op in c["overlap"].get("collectives", []):
                op["pairs"] = op["pairs"][:1]
    else:
        compiled = []
        for mesh in args.compile:
            t0 = time.perf_counter()
            compiled.append(compile_mesh(mesh, args.hlo_dir))
            print(f"compiled {mesh} for H100 in {time.perf_counter() - t0:.0f} s", flush=True)
    base = compiled[0]
    collectives = [c for c in base["overlap"]["collectives"] if c["kind"] in ("collective-permute", "all-reduce")]
    for other in compiled[1:]:  # the same program? messages, sync flags, what lies between start and done
        if "collectives" in other["overlap"]:
            mine, first = _schedule(other), _schedule(base)
            other["overlap"]["same_messages_as_first"] = [m[:4] for m in mine] == [m[:4] for m in first]
            other["overlap"]["scheduled_alike_as_first"] = sum(m == f for m, f in zip(mine, first))
            del other["overlap"]["collectives"]
    rows = [predict(mesh, collectives, compute_s) for mesh in MESHES]
    checks = check_rule(compiled)

    print(f"\nTraining step, paper model, {BLOCK}³ per device; compute {compute_s * 1e3:.0f} ms (H200, measured)")
    for c in compiled:
        s = c["overlap"]["summary"]
        cp, ar = s["collective-permute"], s.get("all-reduce", {})
        print(
            f"  {c['mesh']}: {c['memory']['peak'] / GIB:.2f} GiB/device (XLA:GPU, H100); "
            f"{cp['count']} halo permutes: {cp['with_convolution']} with a convolution between start and done, "
            f"{cp['with_fusion']} with other work (fusions) only, {cp['nothing_between']} with nothing "
            f"({cp['sync']} run synchronously); {ar.get('count', 0)} all-reduces, {ar.get('with_convolution', 0)} "
            "with a convolution between"
            + (
                ""
                if "same_messages_as_first" not in c["overlap"]
                else f"; same messages, sync flags and convolution overlap as {compiled[0]['mesh']}: "
                f"{c['overlap']['same_messages_as_first']}, identical in-between work for "
                f"{c['overlap']['scheduled_alike_as_first']} of {len(collectives)}"
            )
        )
    for c in checks:
        print(f"  halo rule at {c['block']} ({c['source']}): audit {c['audit']:,} B, rule {c['rule']:,} B")
    grad = max(c["bytes"] for c in collectives if c["kind"] == "all-reduce")
    print(f"  gradient all-reduce: {grad / 2**20:.1f} MiB in one message; {len(collectives)} collectives in all\n")
    print(
        _common.table(
            [
                "mesh",
                "devices",
                "nodes",
                "off-node axes",
                "halo MiB",
                "halo ms",
                "all-reduce ms",
                "step s: no overlap",
                "as scheduled",
                "full overlap",
                "comm share",
                "efficiency",
                "TPU v5p comm ms",
                "TPU eff.",
            ],
            [
                [
                    r["mesh"],
                    r["devices"],
                    r["nodes"],
                    ",".join(r["crossing_axes"]) or "-",
                    r["halo_bytes_busiest"] / 2**20,
                    (r["gpu"]["halo_bandwidth_s"] + r["gpu"]["halo_latency_s"]) * 1e3,
                    (r["gpu"]["allreduce_bandwidth_s"] + r["gpu"]["allreduce_latency_s"]) * 1e3,
                    r["gpu"]["step_s"]["no_overlap"],
                    r["gpu"]["step_s"]["as_scheduled"],
                    r["gpu"]["step_s"]["full_overlap"],
                    r["gpu"]["comm_share"],
                    r["gpu"]["efficiency"]["no_overlap"],
                    r["tpu"]["total_s"] * 1e3,
                    r["tpu"]["efficiency"]["no_overlap"],
                ]
                for r in rows
            ],
            ["", "d", "d", "", ".0f", ".2f", ".2f", ".4f", ".4f", ".4f", ".1%", ".1%", ".2f", ".1%"],
        )
    )
    last = rows[-1]["gpu"]
    print(
        f"\nGPU efficiency at {rows[-1]['devices']} devices without overlap: {last['efficiency']['no_overlap']:.1%}; "
        f"links at half rate: {last['efficiency_half_bandwidth']:.1%}; latencies doubled: "
        f"{last['efficiency_double_latency']:.1%}"
    )
    model = schedule_model(args.schedule, compute_s) if args.schedule else None
    if model:
        print_schedule_model(model)
    _common.write_json(
        args.json,
        {
            "benchmark": "weak_scaling",
            "schedule_model": model,
            "machine": _common.machine(),
            "block": BLOCK,
            "compute_s": compute_s,
            "inference_s": infer_s,
            "compute_source": f"{GPU_CHECK.name}: {gpu['nvidia_smi']}, jax {gpu['versions']['jax']}",
            "links": LINKS,
            "allreduce_latency": ALLREDUCE_LATENCY,
            "hbm_bandwidth": HBM_BANDWIDTH,
            "gpus_per_node": GPUS_PER_NODE,
            "halo_rule_checks": checks,
            "compiled": compiled,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
