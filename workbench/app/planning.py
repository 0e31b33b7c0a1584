"""Per-device memory before anything runs: the planner behind the panel and notebook 04.

:class:`PlanKey` is everything a step's per-device memory depends on; :func:`plan_bytes`
compiles that step ahead of time (:func:`workbench.analysis.plan.plan_memory`: for
training, the same train step — loss, gradients and optimiser state — that
``workbench plan --train`` and ``workbench train`` compile) and reads XLA's accounting.
:class:`MemoryEstimator` caches results per key and computes them in one background
thread, so a notebook's controls never wait for a compile. :func:`memory_table` plans a
grid of resolutions and meshes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from workbench.errors import UserError
from workbench.mesh import MeshSpec, ShardLayout

__all__ = [
    "PlanKey",
    "plan_bytes",
    "nnunet_network",
    "MemoryEstimator",
    "memory_table",
    "memory_vs_devices",
    "smallest_fitting",
    "table_text",
    "format_bytes",
    "fits_line",
]


def format_bytes(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def fits_line(stats: dict, budget_gib: float) -> tuple[bool, str]:
    """(fits, text) for planner ``stats`` (with ``peak`` bytes per device) against a budget."""
    peak = stats["peak"]
    budget = budget_gib * 2**30
    if peak <= budget:
        return True, f"{format_bytes(peak)} per device: fits {budget_gib:g} GiB ({100 * peak / budget:.0f}%)"
    return False, (
        f"{format_bytes(peak)} per device: does not fit {budget_gib:g} GiB ({peak / budget:.1f}× the budget)"
    )


@dataclass(frozen=True)
class PlanKey:
    """Everything the per-device memory depends on (hashable: the cache key).

    ``config``: a preset's ``UNetConfig``, or an nnU-Net network: an ``NNUNetConfig`` (its
    ``spec`` at its ``dtype``) or a bare ``NetworkSpec`` (at ``dtype``, default bfloat16 as
    ``workbench plan --plans``). nnU-Net networks are planned by
    :func:`workbench.analysis.nnunet_memory.spec_memory` (explicit backend, exact halos)."""

    config: Any  # UNetConfig | NNUNetConfig | NetworkSpec
    shape: tuple[int, int, int]
    mesh: MeshSpec
    backend: str = "explicit"
    halo: Any = "exact"
    train: bool = False
    batch: int = 1
    dtype: str | None = None  # a bare NetworkSpec's (the other configs carry their own)


def nnunet_network(config) -> tuple[Any, str] | None:
    """(NetworkSpec, dtype) of an nnU-Net network config (``NNUNetConfig`` or ``NetworkSpec``), else None."""
    from workbench.model.spec import NetworkSpec

    if isinstance(config, NetworkSpec):
        return config, None
    if getattr(config, "kind", None) == "nnunet":
        return config.spec, config.dtype
    return None


def plan_bytes(key: PlanKey) -> dict[str, int]:
    """Per-device bytes of the compiled program for ``key``: :func:`workbench.analysis.plan.plan_memory`
    for a preset's U-Net, :func:`workbench.analysis.nnunet_memory.spec_memory` (the number
    ``workbench plan --plans FILE --mesh M --shape S`` prints) for an nnU-Net network."""
    from workbench.analysis.plan import plan_memory

    network = nnunet_network(key.config)
    if network is not None:
        from workbench.analysis.nnunet_memory import spec_memory

        spec, dtype = network
        if key.backend != "explicit" or key.halo != "exact":
            raise UserError(
                f"nnU-Net networks are planned with the explicit backend and exact halos, not "
                f"{key.backend} with halo {key.halo}; choose explicit and exact"
            )
        dtype = dtype or key.dtype or "bfloat16"
        return spec_memory(spec, key.shape, key.mesh, train=key.train, dtype=dtype, batch=key.batch)["memory"]
    layout = ShardLayout(key.shape, key.mesh, multiple=key.config.multiple)
    return plan_memory(key.config, layout, backend=key.backend, halo=key.halo, train=key.train, batch=key.batch)


class MemoryEstimator:
    """Planner results cached per :class:`PlanKey`, computed in one background thread.

    ``submit(key)`` returns a ``Future`` at once (the cached one when the key was seen
    before); ``estimate(key)`` waits for it. ``computed`` counts planner calls made.
    """

    def __init__(self, planner: Callable[[PlanKey], dict] = plan_bytes):
        self._planner = planner
        self._futures: dict[PlanKey, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="workbench-plan")
        self.computed = 0

    def _plan(self, key: PlanKey) -> dict:
        with self._lock:
            self.computed += 1
        return self._planner(key)

    def submit(self, key: PlanKey) -> concurrent.futures.Future:
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._pool.submit(self._plan, key)
                self._futures[key] = future
            return future

    def estimate(self, key: PlanKey, timeout: float | None = None) -> dict:
        return self.submit(key).result(timeout)


def memory_table(
    config,
    resolutions,
    meshes,
    *,
    train: bool = False,
    backend: str = "explicit",
    budgets_gib=(16, 80),
    estimator: MemoryEstimator | None = None,
    progress: bool = True,
) -> list[dict]:
    """Planner bytes per device for every (resolution, mesh), with the single-device bytes.

    Each row: ``resolution``, ``mesh``, ``devices``, ``bytes_per_device``,
    ``bytes_single_device`` (same resolution on one device), ``efficiency`` (= single ×
    data ÷ devices ÷ per-device: 1.0 is a perfect split) and ``fits_<B>GiB`` per budget.
    Meshes need that many devices to compile (``configure_cpu_devices(N)`` on CPU).
    """
    from tqdm.auto import tqdm

    from workbench.mesh import parse_mesh

    estimator = estimator or MemoryEstimator()
    specs = [parse_mesh(m) for m in meshes]
    rows = []
    jobs = [(n, spec) for n in resolutions for spec in specs]
    for n, spec in tqdm(jobs, desc="planning", disable=not progress, leave=False):
        shape = (int(n),) * 3
        single = estimator.estimate(PlanKey(config, shape, MeshSpec(), backend, "exact", train, 1))["peak"]
        peak = estimator.estimate(PlanKey(config, shape, spec, backend, "exact", train, spec.data))["peak"]
        row = {
            "resolution": int(n),
            "mesh": str(spec),
            "devices": spec.n_devices,
            "bytes_per_device": peak,
            "bytes_single_device": single,
            "efficiency": single * spec.data / spec.n_devices / peak,
        }
        for budget in budgets_gib:
            row[f"fits_{budget:g}GiB"] = peak <= budget * 2**30
        rows.append(row)
    return rows


def table_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned text table (bytes columns in MiB/GiB, floats to 3 digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(key, value):
        if value is None:
            return "-"
        if key.startswith("bytes") and isinstance(value, (int, float)):
            return format_bytes(value)
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(k, r.get(k)) for k in columns] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(columns)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def memory_vs_devices(estimator: MemoryEstimator, key: PlanKey, counts) -> list[dict]:
    """Per-device peak of ``key``'s step on each device count (the most cube-like mesh of
    that many devices, ``key``'s data-parallel size kept): rows for :func:`plot_memory`."""
    from tqdm.auto import tqdm

    from workbench.mesh import auto_mesh

    rows = []
    for n in tqdm(list(counts), desc="planning", leave=False):
        spec = auto_mesh(n * key.mesh.data, data=key.mesh.data)
        stats = estimator.estimate(dataclasses.replace(key, mesh=spec))
        shape = tuple(key.shape)
        rows.append(
            {
                "devices": spec.n_devices,
                "mesh": str(spec),
                "resolution": f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(map(str, shape)),
                "bytes_per_device": stats["peak"],
            }
        )
    return rows


def smallest_fitting(rows: list[dict], budgets_gib=(16, 80)) -> list[dict]:
    """Per (budget, resolution) of :func:`memory_table` rows: the mesh with the fewest
    devices that fits (``mesh`` None when no mesh tried fits)."""
    out = []
    for budget in budgets_gib:
        for n in dict.fromkeys(r["resolution"] for r in rows):
            fitting = [r for r in rows if r["resolution"] == n and r["bytes_per_device"] <= budget * 2**30]
            best = min(fitting, key=lambda r: r["devices"], default=None)
            out.append(
                {
                    "budget_gib": budget,
                    "resolution": n,
                    "mesh": best and best["mesh"],
                    "devices": best and best["devices"],
                    "bytes_per_device": best and best["bytes_per_device"],
                }
            )
    return out
