"""Device discovery and simulated CPU devices.

JAX reads ``jax_num_cpu_devices`` only when its CPU backend starts, so
:func:`configure_cpu_devices` must run before the first JAX computation (the CLI
calls it first thing; tests do it in ``conftest.py``; notebooks in their first cell).
"""

from __future__ import annotations

import os

from workbench.errors import UserError

__all__ = ["configure_cpu_devices", "cpu_codegen_flags", "device_summary"]

DEFAULT_CPU_DEVICES = 8


# XLA:CPU's older elemental code generator compiles this project's programs about a quarter
# faster than the fusion emitters that became XLA's default, and runs them as fast (a small
# U-Net's float32 and float64 training steps, 24³-64³, 1 and 8 simulated devices: compile
# 18.4 → 14.5 s, step 3.28 → 3.21 CPU-seconds; jaxlib 0.10.2). XLA aborts on a flag it does
# not know, so it is set only on the jaxlib versions it was measured on; a flag the user
# already put in XLA_FLAGS wins, and WORKBENCH_XLA_CPU_DEFAULTS=1 keeps XLA's own choice.
CPU_CODEGEN_FLAG = "--xla_cpu_use_fusion_emitters=false"
CPU_CODEGEN_JAXLIB = ((0, 6), (0, 12))  # [from, to) where the flag exists and was measured


def cpu_codegen_flags() -> None:
    """Add :data:`CPU_CODEGEN_FLAG` to ``XLA_FLAGS`` (read when XLA first starts a backend)."""
    import jaxlib

    flags = os.environ.get("XLA_FLAGS", "")
    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
    low, high = CPU_CODEGEN_JAXLIB
    if os.environ.get("WORKBENCH_XLA_CPU_DEFAULTS") == "1" or "xla_cpu_use_fusion_emitters" in flags:
        return
    if low <= version < high:
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_CODEGEN_FLAG}".strip()


def configure_cpu_devices(n: int = DEFAULT_CPU_DEVICES) -> None:
    """Simulate ``n`` CPU devices (no effect on GPU/TPU devices, which JAX prefers), and
    choose XLA:CPU's faster-compiling code generator (:func:`cpu_codegen_flags`)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"--cpu-devices {n!r} must be a positive integer, e.g. 8")
    cpu_codegen_flags()
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:  # backend already started with another count
        have = len(jax.devices("cpu"))
        if have != n:
            raise UserError(
                f"JAX already started with {have} CPU devices, cannot switch to {n}; "
                "set the device count before the first JAX computation (restart the kernel)"
            ) from err
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def device_summary() -> dict:
    """Platform, device kind and count of the default backend, plus versions."""
    import jax
    import jaxlib

    devices = jax.devices()
    return {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }


# -- planning for a GPU this machine does not have ---------------------------------------------
# XLA:GPU's description of the device it compiles for (a GpuTargetConfigProto). With it,
# the CUDA plugin of JAX compiles for N such GPUs with no GPU present ("deviceless"), and
# ``memory_analysis()`` gives XLA:GPU's own per-device bytes: bfloat16 convolutions stay
# bfloat16, which XLA:CPU's plans cannot show. Checked against an H100 (same commit, jax
# 0.10.2 here, 0.11.2 there): the single-device float32 plans at 256³ agree to the byte,
# 512³ training on 2x2x2 and 256³ inference on 2x2x2 within 0.003 %, 512³ training on
# 1x4x4 within 1.1 % (README, "GPU check").
GPU_TARGETS = {
    "h100": """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability { major: 9 minor: 0 }
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
# The H200 (SXM) is an H100 die with 141 GB of HBM3e at 4.8 TB/s: same SM count, clock and
# caches; device memory as its nvidia-smi reports it (143771 MiB, gpu_check_h200_2026-11-29.json).
GPU_TARGETS["h200"] = (
    GPU_TARGETS["h100"]
    .replace("memory_bandwidth: 3352320000000", "memory_bandwidth: 4800000000000")
    .replace("device_memory_size: 84929347584", "device_memory_size: 150754820096")
    .replace('"NVIDIA H100 80GB HBM3"', '"NVIDIA H200"')
)
COMPILERS = ("cpu", *GPU_TARGETS)
GPU_PLAN_ENV = ".venv-gpu-plan"
_gpu_target: str | None = None


def validate_compiler(name: str) -> str:
    """``cpu`` or a known GPU target (:data:`GPU_TARGETS`); anything else is a clear error."""
    if name not in COMPILERS:
        raise UserError(f"--compiler {name!r} is unknown; use one of {', '.join(COMPILERS)}")
    return name


def gpu_target() -> str | None:
    """The GPU this process compiles for without having it (:func:`use_gpu_target`), or None."""
    return _gpu_target


def has_cuda_plugin() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no jax_plugins namespace at all
        return False


def gpu_plan_python() -> str:
    """An interpreter whose JAX has the CUDA plugin: ``$WORKBENCH_GPU_PLAN_PYTHON``, this
    one, or the checkout's ``.venv-gpu-plan`` (``make install`` creates it)."""
    import sys
    from pathlib import Path

    if os.environ.get("WORKBENCH_GPU_PLAN_PYTHON"):
        return os.environ["WORKBENCH_GPU_PLAN_PYTHON"]
    if has_cuda_plugin():
        return sys.executable
    candidate = Path(__file__).resolve().parents[2] / GPU_PLAN_ENV / "bin" / "python"
    if candidate.exists():
        return str(candidate)
    raise UserError(
        "planning for a GPU needs JAX's CUDA plugin (no GPU needed) and this Python has none; "
        f"`make install` creates {GPU_PLAN_ENV} with it, or set WORKBENCH_GPU_PLAN_PYTHON to a "
        "Python with jax-cuda12-plugin of the same version as jax"
    )


def use_gpu_target(n: int, target: str = "h100") -> list:
    """Compile for ``n`` GPUs of kind ``target`` in this process, with no GPU present.

    JAX keeps its CPU backend; the returned devices come from a GPU topology
    description, and ``jax.devices()`` / ``jax.local_devices()`` return them from now on,
    so meshes and single-device shardings built from them make ``lower().compile()``
    target XLA:GPU. Programs can be compiled, not run: use it only in a process that
    plans (``workbench plan --compiler h100`` runs one). Call before the first JAX
    computation.
    """
    global _gpu_target
    if target not in GPU_TARGETS:
        raise UserError(f"unknown GPU target {target!r}; use one of {', '.join(GPU_TARGETS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"GPU device count {n!r} must be a positive integer, e.g. 8")
    if not has_cuda_plugin():
        raise UserError(
            f"this Python has no CUDA plugin for JAX, so it cannot compile for {target}; "
            f"plan with `workbench plan --compiler {target}`, which runs {GPU_PLAN_ENV}"
        )
    import jax
    from jax.experimental import topologies

    jax.config.update("jax_platforms", "cpu")  # the plugin is never started: no GPU is needed
    topology = topologies.get_topology_desc(platform="cuda", target_config=GPU_TARGETS[target], topology=f"1x1x{n}")
    devices = list(topology.devices)
    jax.devices = lambda backend=None: list(devices)
    jax.local_devices = lambda process_index=None, backend=None, host_id=None: list(devices)
    _gpu_target = target
    return devices
