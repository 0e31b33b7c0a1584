"""Shared bits of the benchmark scripts: machine record, tables, JSON output.

Every script accepts ``--quick`` (laptop-sized, about a minute) and ``--json PATH``,
prints its tables, and never fails on time. ``workbench bench`` runs them all.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def start(devices: int = 8) -> None:
    """Simulate ``devices`` CPU devices (must run before JAX starts)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from workbench.execute.devices import configure_cpu_devices

    configure_cpu_devices(devices)


def nvidia_smi() -> str | None:
    """``name, memory.total, driver_version`` of each GPU as nvidia-smi prints them; None
    where there is no nvidia-smi (every GPU figure is recorded with the device's name)."""
    import subprocess

    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine() -> dict:
    """Host, devices and package versions of this run."""
    from workbench.execute.devices import device_summary

    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "monai"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        **device_summary(),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }


def median_seconds(fn, repeats: int):
    """Time ``fn()``: one warm-up call (compilation, caches), then ``repeats`` timed calls.

    Every call's output is waited for (``jax.block_until_ready``). Returns (median
    seconds of the timed calls, seconds of the warm-up call, the last output).
    """
    import statistics
    import time

    import jax

    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    warm_up = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm_up, out


def table(headers: list[str], rows: list[list], formats: list[str]) -> str:
    """Right-aligned text table; ``None`` cells print as '-'."""
    cells = [[h for h in headers]]
    for row in rows:
        cells.append(["-" if v is None else format(v, f) for v, f in zip(row, formats)])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=float) + "\n")
