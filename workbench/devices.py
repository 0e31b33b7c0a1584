"""Device discovery and simulated CPU devices.

JAX reads ``jax_num_cpu_devices`` only when its CPU backend starts, so
:func:`configure_cpu_devices` must run before the first JAX computation (the CLI
calls it first thing; tests do it in ``conftest.py``; notebooks in their first cell).
"""

from __future__ import annotations

import os

__all__ = ["configure_cpu_devices", "device_summary"]

DEFAULT_CPU_DEVICES = 8


def configure_cpu_devices(n: int = DEFAULT_CPU_DEVICES) -> None:
    """Simulate ``n`` CPU devices (no effect on GPU/TPU devices, which JAX prefers)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"--cpu-devices {n!r} must be a positive integer, e.g. 8")
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:  # backend already started with another count
        have = len(jax.devices("cpu"))
        if have != n:
            raise ValueError(
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
