"""``workbench plan``: per-device memory and communication of a step, from AOT compilation."""

from __future__ import annotations

import argparse
import json

from workbench.cli.args import positive_int
from workbench.cli.plan_nnunet import NOTICE as _NOTICE  # the CUDA plugin's notices
from workbench.errors import UserError
from workbench.options import DTYPES, PLAN_BACKENDS, PRESETS

HELP = "per-device memory and communication of a step at any resolution and mesh (nothing allocated)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resolution", default=None, help="volume side N, or ZxYxX (e.g. 512 or 256x512x512)")
    p.add_argument("--mesh", default=None, help="ZxYxX or data=D,z=Z,y=Y,x=X")
    from workbench.cli.plan_nnunet import add_nnunet_arguments

    add_nnunet_arguments(p)
    p.add_argument(
        "--data",
        default=None,
        metavar="N|DIR",
        help="a number: the data-parallel size (overrides the mesh's); a dataset folder (MSD / nnU-Net "
        "layout): plan nnU-Net's network for its whole median volume and the smallest mesh that fits",
    )
    p.add_argument("--model", default=None, help=f"model preset: {' | '.join(PRESETS)} (default small)")
    p.add_argument("--dtype", default=None, help=f"{' | '.join(DTYPES[:2])} (default: the preset's)")
    p.add_argument(
        "--model-config",
        default=None,
        metavar="JSON",
        help="the whole model as a JSON object of UNetConfig fields (e.g. config.as_dict()); "
        "instead of --model/--dtype/--remat",
    )
    p.add_argument("--train", action="store_true", help="plan a training step (Adam state included)")
    p.add_argument("--remat", action="store_true", help="rematerialise each conv block in the backward pass")
    p.add_argument(
        "--comm-overlap",
        default="auto",
        help="explicit backend: convolutions as interior + boundary shells: auto | on | off (default auto: off for now; the --budget-gib recommendation plans with the default)",
    )
    p.add_argument("--backend", default="explicit", help=f"{' | '.join(PLAN_BACKENDS)} (default explicit)")
    p.add_argument("--halo", default="exact", help="halo mode for inference plans (default exact)")
    p.add_argument("--batch", type=positive_int, default=None, help="global batch (default: the data size)")
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="memory per device in GiB (default 16 for `fits`); given, also recommends the smallest mesh that fits",
    )
    p.add_argument(
        "--allow-padding",
        action="store_true",
        help="plan a resolution that the mesh does not split evenly (the run pads it)",
    )
    p.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the single-device compile (bytes_single_device and efficiency are null)",
    )
    p.add_argument(
        "--max-devices",
        type=positive_int,
        default=4096,
        help="largest device count the recommendation considers (default 4096)",
    )
    p.add_argument(
        "--compiler",
        default="cpu",
        help="whose memory accounting and schedule: cpu (XLA:CPU on simulated devices, default), h100 or "
        "h200 (XLA:GPU compiling for those GPUs without a GPU: bfloat16 stays bfloat16; needs "
        "JAX's CUDA plugin, which `make install` puts in .venv-gpu-plan)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    # Not `cpu_devices`: the CLI would configure it before we know the mesh's size.
    p.add_argument(
        "--cpu-devices",
        dest="plan_cpu_devices",
        type=positive_int,
        default=None,
        help="simulated CPU devices (default: as many as the mesh needs)",
    )


def run(args) -> int:
    """Validate everything, simulate enough devices, compile, print."""
    import os
    import sys

    from workbench.analysis.plan import _budget_bytes, format_plan, plan, plan_layout, recommend
    from workbench.cli.plan_nnunet import nnunet_mode, run_nnunet
    from workbench.execute.devices import configure_cpu_devices, has_cuda_plugin, use_gpu_target, validate_compiler
    from workbench.mesh import MeshSpec, parse_mesh, parse_resolution
    from workbench.model.halo import validate_halo
    from workbench.model.interior import validate_comm_overlap

    if nnunet_mode(args):
        return run_nnunet(args)
    for flag, value in (("--resolution", args.resolution), ("--mesh", args.mesh)):
        if value is None:
            raise UserError(f"{flag} is required (or plan an nnU-Net network: --data DIR, or --plans FILE --mesh M)")
    spec = parse_mesh(args.mesh)
    if args.data is not None:
        if not str(args.data).isdigit() or int(args.data) < 1:
            raise UserError(f"--data {args.data!r}: give the data-parallel size (an integer >= 1) or a dataset folder")
        args.data = int(args.data)
        spec = MeshSpec(spec.z, spec.y, spec.x, data=args.data)
    config = model_config_from_args(args)
    if args.backend not in PLAN_BACKENDS:
        raise UserError(f"--backend {args.backend!r} is unknown; use {' or '.join(PLAN_BACKENDS)}")
    halo = validate_halo(args.halo)
    budget = 16.0 if args.budget_gib is None else args.budget_gib
    _budget_bytes(budget)  # --budget-gib <= 0 fails before any compile
    resolution = parse_resolution(args.resolution)
    plan_layout(resolution, spec, config, allow_padding=args.allow_padding)
    n_devices = max(args.plan_cpu_devices or 1, spec.n_devices)
    if validate_compiler(args.compiler) != "cpu":
        if not has_cuda_plugin():  # plan in an interpreter that has the plugin
            if os.environ.get("WORKBENCH_GPU_PLAN_CHILD"):
                raise UserError(
                    f"{sys.executable} has no CUDA plugin for JAX, so it cannot plan for "
                    f"{args.compiler}; point WORKBENCH_GPU_PLAN_PYTHON at a Python with "
                    "jax-cuda12-plugin (`make install` creates .venv-gpu-plan)"
                )
            return _delegate(args, n_devices)
        use_gpu_target(n_devices, args.compiler)
    else:
        configure_cpu_devices(n_devices)
    log = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    result = plan(
        config,
        resolution,
        spec,
        train=args.train,
        backend=args.backend,
        halo=halo,
        batch=args.batch,
        budget_gib=budget,
        reference=not args.no_reference,
        allow_padding=args.allow_padding,
        comm_overlap=validate_comm_overlap(args.comm_overlap),
    )
    if args.budget_gib is not None:
        if log:
            log(f"searching the smallest mesh that fits {budget:g} GiB/device:")
        result["recommended"] = recommend(
            config,
            resolution,
            budget_gib=budget,
            train=args.train,
            backend=args.backend,
            halo=halo,
            known=result,
            max_devices=args.max_devices,
            log=log,
        )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def model_config_from_args(args):
    """The ``UNetConfig`` of ``--model-config JSON``, or of ``--model`` with ``--dtype``/``--remat``."""
    from workbench.model.unet import UNetConfig

    if args.model_config is None:
        overrides = {"remat": args.remat}
        if args.dtype is not None:
            overrides["dtype"] = args.dtype
        return UNetConfig.preset(args.model or "small", **overrides)
    given = [
        flag for flag, value in (("--model", args.model), ("--dtype", args.dtype), ("--remat", args.remat)) if value
    ]
    if given:
        raise UserError(
            f"--model-config is the whole model, so {'/'.join(given)} cannot be added to it; "
            "put those fields in the JSON instead"
        )
    try:
        fields = json.loads(args.model_config)
    except json.JSONDecodeError as err:
        raise UserError(
            f"--model-config is not valid JSON ({err}); pass an object of UNetConfig fields, "
            """e.g. '{"depth": 2, "base_filters": 6}'"""
        ) from None
    try:
        return UNetConfig.from_dict(fields)
    except (TypeError, ValueError) as err:
        raise UserError(f"--model-config: {err}") from None


def _delegate(args, n_devices: int) -> int:
    """Run this plan in the interpreter that has JAX's CUDA plugin; relay its output."""
    import subprocess
    import sys

    from workbench.analysis.plan import plan_command

    argv = [
        "--resolution",
        str(args.resolution),
        "--mesh",
        str(args.mesh),
        "--backend",
        args.backend,
        "--halo",
        str(args.halo),
        "--max-devices",
        str(args.max_devices),
    ]
    for flag, value in (
        ("--model", args.model),
        ("--model-config", args.model_config),
        ("--data", args.data),
        ("--dtype", args.dtype),
        ("--batch", args.batch),
        ("--budget-gib", args.budget_gib),
        ("--comm-overlap", args.comm_overlap),
    ):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (
        ("--train", args.train),
        ("--remat", args.remat),
        ("--allow-padding", args.allow_padding),
        ("--no-reference", args.no_reference),
        ("--json", args.json),
    ):
        argv += [flag] if on else []
    cmd, env = plan_command(argv, devices=n_devices, compiler=args.compiler)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode == 2:  # its one-line error
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("workbench: error:")]
        raise UserError(lines[-1].removeprefix("workbench: error: ") if lines else proc.stderr.strip())
    sys.stderr.writelines(ln for ln in proc.stderr.splitlines(keepends=True) if not _NOTICE.match(ln))
    if proc.returncode != 0:
        raise UserError(f"planning with {cmd[0]} failed (exit {proc.returncode}); its messages are above")
    return 0
