"""Halo overlap in XLA:GPU's schedule: the paper model's training step, compiled without a GPU.

For each (mesh, GPU target, latency-hiding scheduler on/off) the training step of the
paper model (depth 4, 32 filters, batch norm, bfloat16, Adam) at ``--resolution`` (512³)
is compiled deviceless for H100s or H200s in its own process (the interpreter with JAX's
CUDA plugin: ``.venv-gpu-plan``), and its scheduled program is read by
:func:`workbench.analysis.schedule.halo_schedule`: per pass (forward, backward) the halo
collective-permutes and bytes with independent compute (convolutions, matrix products)
between start and done, per layer what is not overlapped and why, and the flags the
compiling process had. The program's timeline (:func:`~workbench.analysis.schedule.timeline`)
is kept for the weak-scaling model (``benchmarks/weak_scaling.py --overlap``).

    python benchmarks/halo_overlap.py [--meshes 2x2x2 4x4x4] [--targets h100 h200]
        [--lhs off on] [--hlo-dir DIR [--reuse-hlo]] [--quick] --json OUT

``--quick``: a depth-2, 8-filter paper-style model at 64³ on 2x2x2, H100, scheduler off
(seconds). Each 512³ compile takes about a minute and 1-2 GiB here; they run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common

ROOT = _common.ROOT
LHS_FLAG = "--xla_gpu_enable_latency_hiding_scheduler=true"


def _config(quick: bool):
    from workbench.model.unet import UNetConfig

    config = UNetConfig.preset("paper")
    return config.replace(depth=2, base_filters=8) if quick else config


def child(mesh: str, target: str, resolution: int, quick: bool, out: str, comm_overlap: str = "on") -> None:
    """Compile in this process (it has the CUDA plugin); write the HLO text and a sidecar JSON."""
    from workbench.analysis.schedule import scheduler_flags
    from workbench.execute.devices import use_gpu_target
    from workbench.mesh import ShardLayout, parse_mesh

    spec = parse_mesh(mesh)
    use_gpu_target(spec.n_devices, target)
    from workbench.execute.run import memory_stats
    from workbench.training.config import TrainConfig
    from workbench.training.step import compile_train_step

    config = _config(quick)
    layout = ShardLayout((resolution,) * 3, spec, multiple=config.multiple)
    t0 = time.perf_counter()
    compiled = compile_train_step(config, layout, TrainConfig(comm_overlap=comm_overlap))
    seconds = time.perf_counter() - t0
    Path(out + ".hlo").write_text(compiled.as_text())
    side = {"mesh": mesh, "target": target, "res": resolution, "compile_seconds": seconds}
    side |= {"memory": memory_stats(compiled), "flags": scheduler_flags()}
    Path(out + ".json").write_text(json.dumps(side))


def compile_one(mesh, target, lhs, resolution, quick, stem: Path, comm_overlap: str = "on") -> None:
    from workbench.execute.devices import gpu_plan_python

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "WORKBENCH_GPU_PLAN_CHILD": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "latency_hiding_scheduler" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_gpu_autotune_level=0", *([LHS_FLAG] if lhs else [])])
    cmd = [gpu_plan_python(), __file__, "--child", mesh, target, str(resolution), str(stem)]
    cmd += ["--quick"] if quick else []
    cmd += ["--comm-overlap", comm_overlap]
    proc = subprocess.run(["nice", "-n", "10", *cmd], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {mesh} for {target} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def analyse(stem: Path, mesh: str) -> dict:
    from workbench.analysis.schedule import halo_schedule, scheduler_flags, timeline

    side = json.loads(stem.with_suffix(".json").read_text())
    if "flags" not in side:  # compiled by an earlier copy of the child: flags from its environment
        side["flags"] = scheduler_flags(side.get("xla_flags") or "", float(side.get("effort") or 0.0))
    text = stem.with_suffix(".hlo").read_text()
    report = halo_schedule(text, mesh=mesh, flags=side["flags"])
    return {**side, **report, "timeline": timeline(text, mesh=mesh)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meshes", nargs="+", default=["2x2x2", "4x4x4"])
    p.add_argument("--targets", nargs="+", default=["h100", "h200"])
    p.add_argument("--lhs", nargs="+", default=["off", "on"], help="latency-hiding scheduler off and/or on")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--comm-overlap",
        default="on",
        choices=("auto", "on", "off"),
        help="the split (default on; 'after' was measured with it)",
    )
    p.add_argument("--hlo-dir", default=None, help="keep each compiled program's text here")
    p.add_argument("--reuse-hlo", action="store_true", help="analyse programs already in --hlo-dir")
    p.add_argument("--label", default="", help="a name for this code state (e.g. before, after)")
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child[:2], int(args.child[2]), args.quick, args.child[3], args.comm_overlap)
        return 0
    if args.quick:
        args.meshes, args.targets, args.lhs, args.resolution = ["2x2x2"], ["h100"], ["off"], 64
    folder = Path(args.hlo_dir) if args.hlo_dir else Path(os.environ.get("TMPDIR", "/tmp")) / f"halo_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    for target in args.targets:
        for lhs in args.lhs:
            for mesh in args.meshes:
                if target != args.targets[0] and lhs != "off":
                    continue  # the second target only with XLA's defaults
                stem = folder / f"{args.label or 'train'}_{mesh}_{target}_lhs{lhs}"
                if not (args.reuse_hlo and stem.with_suffix(".hlo").exists()):
                    t0 = time.perf_counter()
                    compile_one(mesh, target, lhs == "on", args.resolution, args.quick, stem, args.comm_overlap)
                    print(
                        f"compiled {mesh} for {target}, scheduler {lhs}: {time.perf_counter() - t0:.0f} s", flush=True
                    )
                run = analyse(stem, mesh)
                if any(args.resolution != 256 * int(m) for m in mesh.split("x")):
                    del run["timeline"]  # the weak-scaling model reads 256³-per-device programs only
                if lhs == "on" or target != args.targets[0]:
                    del run["permutes"]  # one per-permute listing per mesh is enough
                runs.append(run)
                if not args.hlo_dir:
                    for suffix in (".hlo", ".json"):
                        stem.with_suffix(suffix).unlink()
    rows = []
    for r in runs:
        for name in ("forward", "backward"):
            q = r["passes"][name]
            rows.append(
                [
                    r["mesh"],
                    f"XLA:GPU {r['target'].upper()}",
                    "on" if r["flags"]["latency_hiding_scheduler"] else "off",
                    name,
                    q["count"],
                    q["overlapped"],
                    q["bytes"] / 2**20,
                    q["overlapped_bytes"] / 2**20,
                    q["overlapped_fraction"],
                    q["sync"],
                ]
            )
    print(f"\nhalo overlap, paper model{' (quick: depth 2, 8 filters)' if args.quick else ''}, training step at "
          f"{args.resolution}³{', ' + args.label if args.label else ''}")  # fmt: skip
    print(
        _common.table(
            ["mesh", "compiler", "LHS", "pass", "permutes", "overlapped", "MiB", "overlapped MiB", "fraction", "sync"],
            rows,
            ["", "", "", "", "d", "d", ".1f", ".1f", ".1%", "d"],
        )
    )
    for r in runs:
        if "permutes" not in r:  # one listing per mesh: the first target, scheduler off
            continue
        print(f"\nnot overlapped, by layer ({r['mesh']}, {r['target']}):")
        for layer in r["layers"]:
            if layer["overlapped_bytes"] < layer["bytes"]:
                print(f"  {layer['pass']:<9}{layer['layer']:<28}{layer['bytes'] / 2**20:>8.1f} MiB  "
                      f"{'; '.join(layer['reasons'])}")  # fmt: skip
    _common.write_json(
        args.json,
        {
            "benchmark": "halo_overlap",
            "machine": _common.machine(),
            "label": args.label,
            "model": _config(args.quick).as_dict(),
            "resolution": args.resolution,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
