"""``workbench plan --data DIR`` and ``workbench plan --plans FILE --mesh M``: nnU-Net's networks.

``--data DIR`` plans a dataset folder (:func:`workbench.analysis.nnunet_planning.plan_dataset`:
nnU-Net's rules on the whole median volume, the smallest mesh whose compiled training step fits
``--budget-gib``), writes the plans file (``--out``) and prints a short table.
``--plans FILE --mesh M [--shape ZxYxX]`` reports the per-device memory of any plans file's
network (:func:`workbench.analysis.nnunet_memory.spec_memory`), at the plans' whole-volume shape
(or nnU-Net's patch) unless ``--shape`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from workbench.errors import UserError

__all__ = ["add_nnunet_arguments", "nnunet_mode", "run_nnunet", "NOTICE"]

PLANNER_NAMES = ("nnunet", "resenc-m", "resenc-l", "resenc-xl")
DEFAULT_BUDGET_GIB = 80.0
CPU_DEVICES_IN_PROCESS = 64  # XLA:CPU meshes beyond this are compiled in a subprocess
# The CUDA plugin's notices when it loads on a machine without a GPU driver.
NOTICE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IW]\d{4} .*cudart_stub)")


def add_nnunet_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("nnU-Net networks (--data DIR or --plans FILE)")
    g.add_argument("--planner", default="nnunet", help=f"with --data DIR: {' | '.join(PLANNER_NAMES)} (default nnunet)")
    g.add_argument("--plans", default=None, metavar="FILE", help="a plans file (nnU-Net's or workbench plan --data's)")
    g.add_argument("--shape", default=None, metavar="ZxYxX", help="with --plans: the volume (default: the plans')")
    g.add_argument("--infer", action="store_true", help="plan inference instead of the training step")
    g.add_argument("--out", default=None, metavar="FILE", help="with --data: the plans file to write")


def nnunet_mode(args) -> bool:
    """Whether the arguments ask for an nnU-Net plan (``--plans``, or ``--data`` naming a folder)."""
    return args.plans is not None or (args.data is not None and not str(args.data).isdigit())


def _check(args) -> tuple[bool, str]:
    if args.plans is not None and args.data is not None:
        raise UserError("--plans FILE and --data DIR are two ways to plan; pass one of them")
    for flag, value in (
        ("--model", args.model),
        ("--model-config", args.model_config),
        ("--resolution", args.resolution),
    ):
        if value is not None:
            raise UserError(f"{flag} names the workbench's own U-Net; nnU-Net plans (--data/--plans) take --shape")
    if args.train and args.infer:
        raise UserError("--train and --infer both given; nnU-Net plans are of the training step unless --infer")
    dtype = args.dtype or "bfloat16"
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"--dtype {dtype!r} is not planned for nnU-Net networks; use bfloat16 or float32")
    return not args.infer, dtype


def run_nnunet(args) -> int:
    from workbench.analysis import nnunet_rules as rules
    from workbench.execute.devices import has_cuda_plugin, validate_compiler

    train, dtype = _check(args)
    compiler = validate_compiler(args.compiler)
    if args.data is not None:
        rules.planner(args.planner)  # an unknown planner fails before anything is read
        if args.mesh is not None:
            raise UserError("--data DIR finds the mesh itself; plan a given mesh with --plans FILE --mesh M")
        budget = DEFAULT_BUDGET_GIB if args.budget_gib is None else args.budget_gib
        if isinstance(budget, bool) or not budget > 0:
            raise UserError(f"--budget-gib {budget!r} must be a positive number of GiB per device (e.g. 80)")
        devices = args.max_devices if args.max_devices != 4096 else 512
    else:
        if args.mesh is None:
            raise UserError("--plans FILE needs --mesh M (e.g. 2x2x2); `workbench plan --data DIR` finds one")
        from workbench.mesh import parse_mesh

        devices = parse_mesh(args.mesh).n_devices
    if compiler != "cpu" and args.data is None:
        if not has_cuda_plugin():
            if os.environ.get("WORKBENCH_GPU_PLAN_CHILD"):
                raise UserError(f"{sys.executable} has no CUDA plugin for JAX, so it cannot plan for {compiler}")
            return _delegate(args, devices)
        from workbench.execute.devices import use_gpu_target

        use_gpu_target(max(devices, args.plan_cpu_devices or 1), compiler)
    else:  # --data reads the dataset here (the GPU planning venv has no image readers); each mesh
        # for another compiler is compiled in a subprocess (spec_memory)
        from workbench.execute.devices import configure_cpu_devices

        try:
            configure_cpu_devices(max(min(devices, CPU_DEVICES_IN_PROCESS), args.plan_cpu_devices or 1))
        except UserError:  # JAX already runs (a notebook, a test): meshes beyond its devices go to a subprocess
            pass
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    if args.data is not None:
        return _plan_data(args, budget, train, dtype, devices, log)
    return _plan_file(args, train, dtype)


def _plan_data(args, budget, train, dtype, max_devices, log) -> int:
    from data_tools.atomic import atomic_output
    from workbench.analysis.nnunet_planning import format_dataset_plan, plan_dataset
    from workbench.analysis.nnunet_rules import planner

    out = args.out or f"{planner(args.planner).plans_name}_workbench.json"
    if os.path.isdir(out):
        raise UserError(f"--out {out!r} is a folder; name the plans file to write (e.g. {out}/plans.json)")
    plans = plan_dataset(
        args.data,
        planner=args.planner,
        budget_gib=budget,
        dtype=dtype,
        train=train,
        compiler=args.compiler,
        max_devices=max_devices,
        log=log,
    )
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(plans, indent=2))
    if args.json:
        print(json.dumps({"plans_file": os.path.abspath(out), **plans["workbench"]}, indent=2))
    else:
        print(format_dataset_plan(plans))
        print(f"plans written to {out}; check any mesh with: workbench plan --plans {out} --mesh M")
    return 0


def _plan_file(args, train, dtype) -> int:
    from workbench.analysis.nnunet_memory import spec_memory
    from workbench.mesh import parse_resolution
    from workbench.model.nnunet_plans import load_plans_file

    plans = load_plans_file(args.plans)
    if args.shape is not None:
        shape = parse_resolution(args.shape)
    elif plans.workbench.get("median_shape"):
        shape = tuple(plans.workbench["median_shape"])
    elif plans.configuration.get("patch_size"):
        shape = tuple(int(v) for v in plans.configuration["patch_size"])
    else:
        raise UserError(f"plans file {args.plans!r} names no volume shape; pass --shape ZxYxX")
    result = spec_memory(plans.spec, shape, args.mesh, train=train, dtype=dtype, batch=args.batch)
    result["plans"] = os.path.abspath(args.plans)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    m, gib = result["memory"], 2**30
    spec = plans.spec
    print(
        f"{'training step' if train else 'inference'} of {spec.network_class} ({spec.n_stages} stages, "
        f"{spec.num_params:,} parameters, {dtype}) at {'x'.join(map(str, shape))} on mesh {result['mesh']} "
        f"({result['devices']} devices, {result['compiler']} compiler, compiled in {result['compile_seconds']:.1f} s)\n"
        f"  per device: {m['peak'] / gib:.3f} GiB = arguments {m['argument'] / gib:.3f} + outputs "
        f"{m['output'] / gib:.3f} + temporaries {m['temp'] / gib:.3f} - aliased {m['alias'] / gib:.3f}"
    )
    return 0


def _delegate(args, devices: int) -> int:
    """Run this plan in the interpreter that has JAX's CUDA plugin; relay its output."""
    import subprocess

    from workbench.analysis.plan import plan_command

    argv = []
    for flag, value in (
        ("--data", args.data),
        ("--plans", args.plans),
        ("--mesh", args.mesh),
        ("--shape", args.shape),
        ("--planner", args.planner),
        ("--dtype", args.dtype),
        ("--batch", args.batch),
        ("--budget-gib", args.budget_gib),
        ("--out", None if args.out is None else os.path.abspath(args.out)),
        ("--max-devices", args.max_devices),
    ):
        if value is not None:
            argv += [flag, str(value)]
    argv += [f for f, on in (("--infer", args.infer), ("--json", args.json)) if on]
    cmd, env = plan_command(argv, devices=devices, compiler=args.compiler)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err_lines = []
    for line in proc.stderr:  # progress as it comes
        if not NOTICE.match(line):
            err_lines.append(line)
            if not line.startswith("workbench: error:"):
                sys.stderr.write(line)
    sys.stdout.write(proc.stdout.read())
    proc.wait()
    if proc.returncode == 2:
        lines = [ln for ln in err_lines if ln.startswith("workbench: error:")]
        raise UserError(lines[-1].removeprefix("workbench: error: ").strip() if lines else "".join(err_lines).strip())
    if proc.returncode != 0:
        raise UserError(f"planning with {cmd[0]} failed (exit {proc.returncode}); its messages are above")
    return 0
