"""Per-device memory planner from ahead-of-time compilation (nothing is allocated).

Inputs are ``jax.ShapeDtypeStruct``s carrying their shardings; ``lower().compile()``
gives XLA's own per-device accounting through ``compiled.memory_analysis()``
(arguments, outputs, temporaries, aliasing), and the compiled HLO gives the
communication audit (:mod:`workbench.analysis.audit`).

* inference is compiled by :func:`workbench.execute.run.compile_forward`, a training step by
  :func:`workbench.training.step.compile_train_step`: the very step training runs (loss,
  gradients, clipping, Adam update; parameters and optimiser state donated).
* :func:`plan_memory`: per-device bytes of either, for a layout.
* :func:`plan`: one resolution on one mesh: per-device bytes, the single-device
  bytes, efficiency, fit against a budget, communication audit.
* :func:`recommend`: the smallest mesh (power-of-two device count, most cube-like
  split) whose plan fits the budget; meshes that need more devices than this process
  has are planned in a subprocess with that many simulated CPU devices.

Figures are XLA's for the backend that compiles (CPU when simulating devices); a
GPU/TPU compiler schedules differently, so treat them as a plan, not a guarantee.

Example
-------
>>> from workbench.mesh import ShardLayout
>>> cfg = UNetConfig.preset("small")
>>> layout = ShardLayout((128, 128, 128), "2x2x2", multiple=cfg.multiple)
>>> plan_memory(cfg, layout, backend="explicit", train=True)["peak"]  # bytes per device
>>> plan(cfg, 128, "2x2x2", train=True)["efficiency"]
"""

from __future__ import annotations

import copy
import functools

import jax

from workbench.errors import UserError
from workbench.execute.run import compile_forward, memory_stats
from workbench.mesh import ShardLayout, parse_resolution
from workbench.model.unet import UNetConfig
from workbench.options import PLAN_BACKENDS
from workbench.training.config import TrainConfig
from workbench.training.step import compile_train_step

__all__ = [
    "plan_memory",
    "plan_layout",
    "plan",
    "recommend",
    "plan_subprocess",
    "plan_command",
    "plan_argv",
    "format_plan",
    "GIB",
]

GIB = 2**30


def _compile(config, layout, *, backend, halo, train, batch, train_config=None, comm_overlap="auto"):
    """Inference, or the real train step (the one training runs: loss, gradients,
    clipping, optimiser update with its state donated)."""
    if train:
        if halo != "exact":
            raise UserError(f"training plans use exact halos; halo {halo!r} is for inference only")
        train_config = train_config or TrainConfig(comm_overlap=comm_overlap)
        return compile_train_step(config, layout, train_config, backend=backend, batch=batch)
    return compile_forward(config, layout, backend=backend, halo=halo, batch=batch, comm_overlap=comm_overlap).compiled


def plan_memory(
    config: UNetConfig,
    layout: ShardLayout,
    *,
    backend: str = "explicit",
    halo="exact",
    train: bool = False,
    batch: int = 1,
    train_config: TrainConfig | None = None,
) -> dict[str, int]:
    """Per-device bytes (argument, output, temp, alias, peak) of the compiled program:
    inference, or with ``train`` the whole train step of ``train_config`` (default
    ``TrainConfig()``: Adam), the same program ``workbench plan --train`` and
    :func:`workbench.training.loop.train_and_evaluate` compile."""
    return memory_stats(
        _compile(config, layout, backend=backend, halo=halo, train=train, batch=batch, train_config=train_config)
    )


# -- one plan ------------------------------------------------------------------------------------
def plan_layout(resolution, mesh, config: UNetConfig, *, allow_padding: bool = False) -> ShardLayout:
    """The shard layout of ``resolution`` on ``mesh``; refuses uneven splits unless
    ``allow_padding``, naming the padding a run would add."""
    from workbench.mesh import parse_mesh

    shape = parse_resolution(resolution)
    spec = parse_mesh(mesh)
    layout = ShardLayout(shape, spec, multiple=config.multiple)
    if layout.padded_shape != shape and not allow_padding:
        need = [m * config.multiple for m in spec.spatial]
        raise UserError(
            f"resolution {'x'.join(map(str, shape))} does not split evenly over mesh {spec} with a "
            f"depth-{config.depth} U-Net (each axis must be a multiple of mesh size x {config.multiple}: "
            f"{'x'.join(map(str, need))}); a run would pad it to {'x'.join(map(str, layout.padded_shape))} "
            f"(+{layout.padding_fraction / (1 - layout.padding_fraction):.0%} voxels); plan that "
            f"resolution or pass --allow-padding"
        )
    return layout


def _budget_bytes(budget_gib) -> int:
    if isinstance(budget_gib, bool) or not isinstance(budget_gib, (int, float)) or not budget_gib > 0:
        raise UserError(f"budget {budget_gib!r} GiB must be a positive number (e.g. 16 for a TPU v3 core)")
    return int(budget_gib * GIB)


@functools.lru_cache(maxsize=64)
def _measure(config, volume_shape, spec, backend, halo, train, batch, comm_overlap="auto"):
    """(memory, audit, compile seconds) of one step; cached, so a notebook or a budget
    search asking again costs nothing (the compiled program itself is not kept)."""
    import time

    from workbench.analysis.audit import audit_text
    from workbench.analysis.schedule import schedule_summary

    layout = ShardLayout(volume_shape, spec, multiple=config.multiple)
    t0 = time.perf_counter()
    compiled = _compile(config, layout, backend=backend, halo=halo, train=train, batch=batch, comm_overlap=comm_overlap)
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    comm = {**audit_text(text), "schedule": schedule_summary(text, mesh=spec)}
    return memory_stats(compiled), comm, seconds


def plan(
    config: UNetConfig,
    resolution,
    mesh,
    *,
    train: bool = False,
    backend: str = "explicit",
    halo="exact",
    batch: int | None = None,
    budget_gib: float = 16.0,
    reference: bool = True,
    allow_padding: bool = False,
    comm_overlap: str = "auto",
) -> dict:
    """Per-device memory of one step of ``config`` at ``resolution`` on ``mesh``
    (``comm_overlap``: the explicit backend's interior/boundary split, ``--comm-overlap``).

    Returns the ``plan --json`` object: ``resolution``, ``mesh``, ``devices``,
    ``bytes_per_device`` (peak = arguments + outputs + temporaries - aliased),
    ``memory`` (that breakdown), ``bytes_single_device`` (the same step unpartitioned
    on one device; ``None`` without ``reference``), ``efficiency``
    (= single / devices / per-device), ``budget_bytes``, ``fits``, ``padded_shape``,
    ``padding_fraction``, ``communication`` (see :func:`workbench.analysis.audit.audit`;
    its ``schedule``: the halo overlap of the compiled schedule and the scheduler flags,
    :func:`workbench.analysis.schedule.schedule_summary`),
    ``warnings`` and compile times. The mesh needs that many JAX devices in this process.
    """
    from workbench.mesh import MeshSpec

    if backend not in PLAN_BACKENDS:
        raise UserError(f"backend {backend!r} cannot be planned; use {' or '.join(PLAN_BACKENDS)}")
    budget = _budget_bytes(budget_gib)
    layout = plan_layout(resolution, mesh, config, allow_padding=allow_padding)
    spec = layout.mesh
    batch = spec.data if batch is None else batch
    have = len(jax.devices())
    if spec.n_devices > have:
        raise UserError(
            f"mesh {spec} needs {spec.n_devices} devices but this process has {have}; "
            f"pass --cpu-devices {spec.n_devices} (simulated CPU devices) or plan a smaller mesh"
        )
    memory, comm, seconds = _measure(config, layout.volume_shape, spec, backend, halo, train, batch, comm_overlap)
    single = None
    ref_seconds = None
    if reference:
        single_memory, _, ref_seconds = _measure(
            config, layout.volume_shape, MeshSpec(), "reference", "exact", train, batch
        )
        single = single_memory["peak"]
    per_device = memory["peak"]
    warnings = list(comm["warnings"])
    if config.dtype == "bfloat16" and "f32" in comm["convolution_dtypes"]:
        warnings.append(
            f"the {jax.devices()[0].platform} compiler computes these bfloat16 convolutions in float32, so "
            "this plan counts float32 activations around them; TPU/GPU compilers keep bfloat16 and need less"
        )
    if layout.padding_fraction > 0:
        warnings.append(
            f"the volume is padded to {'x'.join(map(str, layout.padded_shape))}: "
            f"{layout.padding_fraction:.1%} of the compute is padding"
        )
    return {
        "resolution": list(layout.volume_shape),
        "mesh": spec.as_dict(),
        "mesh_text": str(spec),
        "devices": spec.n_devices,
        "backend": backend,
        "halo": halo,
        "train": bool(train),
        "batch": batch,
        "model": config.as_dict(),
        "bytes_per_device": per_device,
        "memory": dict(memory),
        "bytes_single_device": single,
        "efficiency": None if single is None else single / spec.n_devices / per_device,
        "budget_bytes": budget,
        "fits": per_device <= budget,
        "padded_shape": list(layout.padded_shape),
        "block_shape": list(layout.block_shape),
        "padding_fraction": layout.padding_fraction,
        "communication": copy.deepcopy(comm),
        "warnings": warnings,
        "compile_seconds": seconds,
        "reference_compile_seconds": ref_seconds,
        "platform": jax.devices()[0].platform,
        "compiler": _compiler_name(),
    }


def _compiler_name() -> str:
    """Whose accounting the plan is: ``cpu``, ``gpu``/``tpu`` (real devices) or a GPU target."""
    from workbench.execute.devices import gpu_target

    return gpu_target() or jax.devices()[0].platform


# -- the smallest mesh that fits ------------------------------------------------------------------
def plan_command(argv: list[str], *, devices: int, compiler: str = "cpu") -> tuple[list[str], dict]:
    """The command line and environment of ``workbench plan ARGV`` in its own process
    with ``devices`` simulated devices of ``compiler`` (``cpu``, or a GPU target such as
    ``h100``, planned by an interpreter whose JAX has the CUDA plugin)."""
    import os
    import sys
    from pathlib import Path

    from workbench.execute.devices import gpu_plan_python, validate_compiler

    validate_compiler(compiler)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    python = sys.executable
    if compiler != "cpu":
        python = gpu_plan_python()
        env["WORKBENCH_GPU_PLAN_CHILD"] = "1"  # that process must plan, not delegate again
        root = str(Path(__file__).resolve().parents[2])  # that interpreter may lack the package
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # Plans are about memory; XLA:GPU cannot autotune without a GPU anyway.
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_autotune_level=0".strip()
    cmd = [python, "-m", "workbench", "plan", *argv, "--cpu-devices", str(devices), "--compiler", compiler]
    return cmd, env


def plan_subprocess(argv: list[str], *, devices: int, timeout: float = 600.0, compiler: str = "cpu") -> dict:
    """Run ``workbench plan ARGV --json`` in its own process (:func:`plan_command`) and
    return its JSON."""
    import json
    import subprocess

    cmd, env = plan_command([*argv, "--json"], devices=devices, compiler=compiler)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"planning in a subprocess failed ({' '.join(cmd[2:])}): {tail}")
    return json.loads(proc.stdout)


def plan_argv(
    config: UNetConfig, resolution, mesh, *, train, backend, halo, allow_padding, reference: bool = False
) -> list[str]:
    """``workbench plan`` arguments for ``config`` (any config: it travels as ``--model-config`` JSON)."""
    import json

    argv = [
        "--resolution",
        "x".join(map(str, parse_resolution(resolution))),
        "--mesh",
        str(mesh),
        "--model-config",
        json.dumps(config.as_dict(), separators=(",", ":")),
        "--backend",
        backend,
        "--halo",
        str(halo),
    ]
    argv += [] if reference else ["--no-reference"]
    argv += ["--train"] if train else []
    argv += ["--allow-padding"] if allow_padding else []
    return argv


def recommend(
    config: UNetConfig,
    resolution,
    *,
    budget_gib: float = 16.0,
    train: bool = False,
    backend: str = "explicit",
    halo="exact",
    known: dict | None = None,
    max_devices: int = 4096,
    allow_padding: bool = True,
    log=None,
) -> dict:
    """The smallest power-of-two device count whose most cube-like mesh fits ``budget_gib``.

    ``known`` is a :func:`plan` result to start from (its per-device bytes give the
    first guess by ideal scaling). Each candidate is compiled (in a subprocess with
    enough simulated CPU devices when this process has too few). Returns
    ``{"mesh", "devices", "bytes_per_device", "tried": [...]}``, with ``mesh`` None
    when nothing up to ``max_devices`` fits.
    """
    from workbench.execute.devices import gpu_target
    from workbench.mesh import auto_mesh

    budget = _budget_bytes(budget_gib)
    have = len(jax.devices())
    tried: dict[int, dict] = {}

    def measure(n: int) -> int:
        spec = auto_mesh(n)
        if known is not None and known["devices"] == n and known["mesh"] == spec.as_dict():
            peak = known["bytes_per_device"]
        elif n <= have:
            peak = plan(
                config,
                resolution,
                spec,
                train=train,
                backend=backend,
                halo=halo,
                budget_gib=budget_gib,
                reference=False,
                allow_padding=allow_padding,
            )["bytes_per_device"]
        elif jax.devices()[0].platform == "cpu" or gpu_target() is not None:
            argv = plan_argv(
                config, resolution, spec, train=train, backend=backend, halo=halo, allow_padding=allow_padding
            )
            peak = plan_subprocess(argv, devices=n, compiler=gpu_target() or "cpu")["bytes_per_device"]
        else:
            raise UserError(
                f"mesh {spec} needs {n} devices but only {have} {jax.devices()[0].platform} "
                "devices are here; plan on CPU (JAX_PLATFORMS=cpu) to simulate them"
            )
        tried[n] = {"mesh": str(spec), "devices": n, "bytes_per_device": peak, "fits": peak <= budget}
        if log is not None:
            log(f"  {str(spec):>8} ({n} devices): {_size(peak)}/device {'fits' if peak <= budget else 'does not fit'}")
        return peak

    counts = [2**k for k in range(max_devices.bit_length()) if 2**k <= max_devices]
    if known is not None:
        total = known["bytes_per_device"] * known["devices"]
        guess = next((n for n in counts if total / n <= budget), counts[-1])
    else:
        guess = 1
    i = counts.index(guess)
    if measure(counts[i]) <= budget:
        while i > 0 and measure(counts[i - 1]) <= budget:
            i -= 1
        best = counts[i]
    else:
        best = None
        while i + 1 < len(counts):
            i += 1
            if measure(counts[i]) <= budget:
                best = counts[i]
                break
    rows = [tried[n] for n in sorted(tried)]
    if best is None:
        return {"mesh": None, "devices": None, "bytes_per_device": None, "tried": rows}
    return {**tried[best], "tried": rows}


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 4 else f"{nbytes / 2**20:.1f} MiB"


def _compiler_text(result: dict) -> str:
    compiler = result.get("compiler") or result["platform"]
    if compiler in ("cpu", "gpu", "tpu"):
        return f"{compiler} compiler"
    return f"XLA:GPU compiler for {compiler.upper()} (no GPU needed)"


def format_plan(result: dict) -> str:
    """Human-readable summary of a :func:`plan` result (and its recommendation)."""
    from workbench.analysis.audit import format_audit

    m = result["memory"]
    model = result["model"]
    lines = [
        f"{'training step' if result['train'] else 'inference'} of a depth-{model['depth']}, "
        f"{model['base_filters']}-filter U-Net ({model['dtype']}, norm {model['norm']}"
        f"{', remat' if model['remat'] else ''}) at {'x'.join(map(str, result['resolution']))} "
        f"on mesh {result['mesh_text']} ({result['devices']} devices, {result['backend']}, "
        f"{_compiler_text(result)}, compiled in {result['compile_seconds']:.1f} s)",
        f"  per device: {_size(m['peak'])} = arguments {_size(m['argument'])} + outputs "
        f"{_size(m['output'])} + temporaries {_size(m['temp'])} - aliased {_size(m['alias'])}",
    ]
    if result["bytes_single_device"] is not None:
        lines.append(
            f"  single device: {_size(result['bytes_single_device'])}; efficiency "
            f"(single / devices / per device) {result['efficiency']:.3f}"
        )
    lines.append(
        f"  budget {result['budget_bytes'] / GIB:g} GiB/device: {'fits' if result['fits'] else 'does NOT fit'}"
    )
    rec = result.get("recommended")
    if rec is not None:
        if rec["mesh"] is None:
            lines.append(f"  no mesh up to {rec['tried'][-1]['devices']} devices fits the budget")
        else:
            lines.append(
                f"  smallest mesh that fits: {rec['mesh']} ({rec['devices']} devices, "
                f"{_size(rec['bytes_per_device'])}/device)"
            )
    lines.append("communication per step and device:")
    lines.extend("  " + line for line in format_audit(result["communication"]).splitlines())
    if result["communication"].get("schedule"):
        from workbench.analysis.schedule import format_schedule

        text = format_schedule(result["communication"]["schedule"], _compiler_text(result))
        lines.extend("  " + line for line in text.splitlines())
    lines.extend(f"warning: {w}" for w in result["warnings"] if w not in result["communication"]["warnings"])
    return "\n".join(lines)
