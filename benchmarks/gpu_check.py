"""GPU check: the paper model on one GPU, and XLA:GPU's memory plan for the paper's meshes.

Part 1 (real runs, one GPU). The paper model (depth 4, 32 filters, batch norm,
bfloat16) at 256³: inference and one full training step (loss, gradients, Adam),
reference backend and explicit backend on a 1-device mesh. Each phase runs in its own
process, so the allocator's peak belongs to that phase alone. Printed: median step time
of 3 after a warm-up, XLA's per-device bytes (``compiled.memory_analysis()``), the
allocator's peak, the explicit ÷ reference ratios, and how far the explicit logits are
from the reference's.

Part 2 (ahead-of-time plans, nothing allocated). ``jax_mock_gpu_topology`` makes one GPU
stand for N: XLA:GPU compiles the real N-device program, so ``memory_analysis()`` gives
per-device bytes with bfloat16 convolutions kept in bfloat16 (XLA:CPU, which the planner
uses on a laptop, computes them in float32). Plans: 512³ training on 16 devices (1x4x4)
and on 8 (2x2x2, with rematerialisation), 1024³ training on 64 (4x4x4), and the paper
model in float32 at 256³ on 2x2x2 (memory efficiency, inference and training).

Plans compile without autotuning (``--xla_gpu_autotune_level=0``): they are about
memory, and with autotuning a mocked 16-device training step took over 150 s to compile
on an H100, against ~10 s without. Every phase has its own time limit; a phase that fails prints its last error line and
the check goes on. Results go to ``$OUT`` (or ``--out``) as JSON. Usage::

    bash benchmarks/gpu_check.sh                  # on a GPU machine, under 9 minutes
    python benchmarks/gpu_check.py --allow-cpu --size 32 --plan-scale 8   # dry run on a CPU
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
GIB = 2**30
BUDGET_GIB = 16.0

# (name, resolution, mesh, dtype, remat, train, reference)
PLANS = [
    ("512³ train 1x4x4", 512, "1x4x4", "bfloat16", False, True, False),
    ("512³ train 2x2x2 remat", 512, "2x2x2", "bfloat16", True, True, False),
    ("1024³ train 4x4x4", 1024, "4x4x4", "bfloat16", False, True, False),
    ("1024³ train 4x4x4 remat", 1024, "4x4x4", "bfloat16", True, True, False),
    ("256³ f32 infer 2x2x2", 256, "2x2x2", "float32", False, False, True),
    ("256³ f32 train 2x2x2", 256, "2x2x2", "float32", False, True, True),
]


PHASES = ("infer:reference", "infer:explicit", "train:reference", "train:explicit")


# -- workers (each in its own process) --------------------------------------------------------
def run_phase(
    phase: str,
    size: int,
    allow_cpu: bool,
    dump: str | None,
    *,
    remat: bool = False,
    comm_overlap: str = "auto",
    profile_dir: str | None = None,
) -> dict:
    """One real run: ``infer:reference``, ``infer:explicit``, ``train:reference``, ``train:explicit``.

    ``remat`` and ``comm_overlap`` (explicit backend) as the CLI's ``--remat`` and
    ``--comm-overlap``. Also returned: XLA's FLOP count of the compiled program
    (``cost_analysis``) and a hash of its optimised HLO (equal hashes: the same program).
    With ``profile_dir``, one more run is traced there (``jax.profiler``, perfetto JSON).
    """
    import hashlib

    import jax
    import numpy as np

    from workbench.execute.run import make_forward, memory_stats
    from workbench.mesh import ShardLayout
    from workbench.model.unet import Model, UNetConfig

    dev = jax.devices()[0]
    if dev.platform != "gpu" and not allow_cpu:
        raise SystemExit(f"JAX sees {dev.platform} devices, not a GPU; pass --allow-cpu for a dry run")
    kind, backend = phase.split(":")
    cfg = UNetConfig.preset("paper").replace(remat=remat)
    model = Model.init(cfg, seed=0)
    x = np.random.default_rng(0).standard_normal((1, size, size, size, 1)).astype(np.float32)
    layout = ShardLayout((size,) * 3, "1x1x1", multiple=cfg.multiple)
    out = {"phase": phase, "size": size}
    t0 = time.perf_counter()
    if kind == "infer":
        fn, _, xs, vs = make_forward(cfg, layout, backend=backend, comm_overlap=comm_overlap)
        v, xd = jax.device_put(model.variables, vs), jax.device_put(x, xs)
        compiled = fn.lower(v, xd).compile()
        out["compile_s"] = time.perf_counter() - t0
        step = lambda: compiled(v, xd)  # noqa: E731
        out["seconds"] = _common.median_seconds(step, 3)[0]
        if dump:
            np.save(dump, np.asarray(compiled(v, xd), np.float32)[..., :size, :size, :size, :])
    else:
        from workbench.training import TrainConfig, build_train_step, create_train_state

        tc = TrainConfig(mesh="1x1x1", backend=backend, comm_overlap=comm_overlap)
        ts = build_train_step(cfg, tc, layout)
        state = jax.device_put(create_train_state(cfg, tc, variables=model.variables), ts.state_sharding)
        labels = np.random.default_rng(1).integers(0, cfg.num_classes, (1, size, size, size)).astype(np.int32)
        images, labels = jax.device_put(x, ts.image_sharding), jax.device_put(labels, ts.label_sharding)
        compiled = ts.fn.lower(state, images, labels).compile()
        out["compile_s"] = time.perf_counter() - t0
        box = {"state": state}

        def step():
            box["state"], metrics = compiled(box["state"], images, labels)
            return metrics

        out["seconds"] = _common.median_seconds(step, 3)[0]
        out["loss"] = float(step()["loss"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in older JAX
    out["flops"] = float((cost or {}).get("flops", float("nan")))
    out["hlo_sha1"] = hashlib.sha1(compiled.as_text().encode()).hexdigest()[:12]
    if profile_dir:  # after the hash: the program text of a profiled executable differs
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            jax.block_until_ready(step())
    out["xla_bytes"] = memory_stats(compiled).get("peak")
    out["allocator_peak"] = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    out["device"] = dev.device_kind
    return out


def run_plan(name: str, mock: int, allow_cpu: bool, scale: int) -> dict:
    """One ahead-of-time plan on ``mock`` devices that this one GPU stands for."""
    import jax

    if allow_cpu:
        jax.config.update("jax_num_cpu_devices", mock)
    else:
        try:
            jax.config.update("jax_mock_gpu_topology", f"1x{mock}x1")
        except AttributeError:  # older/newer JAX without the topology flag
            jax.config.update("mock_num_gpu_processes", mock)
    from workbench.analysis.plan import plan
    from workbench.model.unet import UNetConfig

    _, res, mesh, dtype, remat, train, reference = next(p for p in PLANS if p[0] == name)
    cfg = UNetConfig.preset("paper").replace(dtype=dtype, remat=remat)
    if allow_cpu and scale > 1:
        res //= scale
    result = plan(cfg, res, mesh, train=train, reference=reference, budget_gib=BUDGET_GIB)
    return {
        "plan": name,
        "devices_seen": len(jax.devices()),
        "platform": jax.devices()[0].platform,
        "device": jax.devices()[0].device_kind,
        **{
            k: result[k]
            for k in (
                "resolution",
                "mesh_text",
                "bytes_per_device",
                "memory",
                "bytes_single_device",
                "efficiency",
                "fits",
                "compile_seconds",
                "warnings",
            )
        },
        "convolution_dtypes": result["communication"].get("convolution_dtypes"),
    }


# -- driver -----------------------------------------------------------------------------------
def _child(args: list[str], timeout: float, xla_flags: str = "", script: str = __file__) -> tuple[dict | None, str]:
    """Run ``script`` with ``args`` in a fresh process; (its last JSON line, or None and why)."""
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if xla_flags:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
    try:
        proc = subprocess.run(
            [sys.executable, script, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        return None, f"exit {proc.returncode}: " + (" | ".join(err[-3:]) if err else "no output")
    return json.loads(lines[-1]), ""


def _gib(n):
    return "-" if n is None else f"{n / GIB:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="cube edge of the real runs (default 256)")
    ap.add_argument("--allow-cpu", action="store_true", help="dry run on CPU devices (small sizes)")
    ap.add_argument("--plan-scale", type=int, default=1, help="with --allow-cpu: divide plan resolutions by this")
    ap.add_argument("--budget-s", type=float, default=500, help="stop starting phases after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    ap.add_argument("--skip-plans", action="store_true")
    ap.add_argument(
        "--phases",
        nargs="+",
        default=list(PHASES),
        choices=PHASES,
        help="real runs to do (default all four)",
    )
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--plan", help=argparse.SUPPRESS)
    ap.add_argument("--mock", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase:
        print(json.dumps(run_phase(args.phase, args.size, args.allow_cpu, args.dump)))
        return 0
    if args.plan:
        print(json.dumps(run_plan(args.plan, args.mock, args.allow_cpu, args.plan_scale)))
        return 0

    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--size", str(args.size)] + (["--allow-cpu"] if args.allow_cpu else [])
    info = {"argv": sys.argv[1:]}
    info["nvidia_smi"] = _common.nvidia_smi()
    vers = subprocess.run(
        [
            sys.executable,
            "-c",
            "import jax, jaxlib, flax, optax; print(jax.__version__, "
            "jaxlib.__version__, flax.__version__, optax.__version__)",
        ],
        capture_output=True,
        text=True,
    ).stdout.split()
    info["versions"] = dict(zip(("jax", "jaxlib", "flax", "optax"), vers))
    print(f"GPU: {info['nvidia_smi']}; versions {info['versions']}", flush=True)

    phases, plans = {}, {}

    def remaining():
        return args.budget_s - (time.perf_counter() - start)

    def save():
        (out / "gpu_check.json").write_text(json.dumps({**info, "phases": phases, "plans": plans}, indent=1))

    for phase in args.phases:
        if remaining() < 20:
            phases[phase] = {"error": "skipped: out of time"}
            continue
        dump = ["--dump", str(out / f"logits_{phase.split(':')[1]}.npy")] if phase.startswith("infer") else []
        res, err = _child(["--phase", phase, *common, *dump], timeout=min(150, remaining()))
        phases[phase] = res or {"error": err}
        print(f"{phase}: {res or err}", flush=True)
        save()
    try:
        import numpy as np

        a, b = (np.load(out / f"logits_{n}.npy") for n in ("explicit", "reference"))
        info["logits_rel_error"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
        info["logits_max_abs_error"] = float(np.abs(a - b).max())
        info["argmax_disagreement"] = float((a.argmax(-1) != b.argmax(-1)).mean())
        for n in ("explicit", "reference"):
            (out / f"logits_{n}.npy").unlink()
    except (OSError, ValueError) as err:
        info["logits_compare_error"] = str(err)

    if not args.skip_plans:
        for name, _res, mesh, *_ in PLANS:
            n = math.prod(int(m) for m in mesh.split("x"))
            if remaining() < 30:
                plans[name] = {"error": "skipped: out of time"}
                continue
            extra = ["--allow-cpu", "--plan-scale", str(args.plan_scale)] if args.allow_cpu else []
            # Plans are about memory, not speed: without autotuning a mocked 16-device training
            # step compiles in ~10 s on an H100 instead of over 150 s.
            got, err = _child(
                ["--plan", name, "--mock", str(n), *extra],
                timeout=min(90, remaining()),
                xla_flags="" if args.allow_cpu else "--xla_gpu_autotune_level=0",
            )
            plans[name] = got or {"error": err}
            print(f"{name}: {(got or {}).get('bytes_per_device', err)}", flush=True)
            save()
    save()

    # -- tables -------------------------------------------------------------------------------
    print(
        f"\nGPU check: {info['nvidia_smi'] or 'no GPU'}; jax {info['versions'].get('jax')}; "
        f"paper model, bfloat16, {args.size}³, one device"
    )
    ok = {k: r for k, r in phases.items() if "error" not in r}
    print(
        _common.table(
            ["phase", "step s", "compile s", "XLA GiB", "alloc peak GiB"],
            [[k, r["seconds"], r["compile_s"], _gib(r["xla_bytes"]), _gib(r["allocator_peak"])] for k, r in ok.items()],
            ["", ".3f", ".1f", "", ""],
        )
    )
    for k, r in phases.items():
        if k not in ok:
            print(f"{k}: {r['error'][:110]}")
    for kind in ("infer", "train"):
        e, r = phases.get(f"{kind}:explicit", {}), phases.get(f"{kind}:reference", {})
        if "seconds" in e and "seconds" in r:
            print(
                f"explicit 1x1x1 ÷ reference, {kind}: time {e['seconds'] / r['seconds']:.3f}, "
                f"XLA bytes {e['xla_bytes'] / r['xla_bytes']:.3f}"
            )
    if "logits_rel_error" in info:
        print(
            f"explicit vs reference logits: relative error {info['logits_rel_error']:.2e}, "
            f"max abs {info['logits_max_abs_error']:.3g}, argmax disagreement {info['argmax_disagreement']:.2%}"
        )
    if plans:
        print(
            f"\nPlans (XLA:{'CPU dry run' if args.allow_cpu else 'GPU, mocked devices'}; "
            f"budget {BUDGET_GIB:g} GiB per device)"
        )
        ok = {k: r for k, r in plans.items() if "error" not in r}
        print(
            _common.table(
                ["plan", "GiB/device", "fits", "efficiency", "compile s"],
                [
                    [
                        k,
                        _gib(r["bytes_per_device"]),
                        "yes" if r["fits"] else "no",
                        r["efficiency"],
                        r["compile_seconds"],
                    ]
                    for k, r in ok.items()
                ],
                ["", "", "", ".3f", ".1f"],
            )
        )
        for k, r in plans.items():
            if k not in ok:
                print(f"{k}: {r['error'][:110]}")
    print(f"total {time.perf_counter() - start:.0f} s; JSON in {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
