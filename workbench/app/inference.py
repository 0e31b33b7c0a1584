"""Run a partitioned inference, and compare it with the single-device reference.

:func:`infer` is what ``workbench infer`` / ``demo``, the notebook panel and the napari
widget all call: it runs the model on one mesh and backend, optionally runs the reference
and compares (:func:`workbench.analysis.compare.compare`: per-shard errors and the seam
profile, computed in one place), and returns an :class:`Inference` whose ``report`` is the
``report.json`` object (:func:`workbench.app.results.build_report`).

Example
-------
>>> choice = resolve_model("small")
>>> loaded = load_volume("phantom:32")
>>> run = infer(choice, loaded, "2x2x2", reference=True)
>>> run.report["max_abs_diff"] <= 1e-5
True
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.options import BACKENDS

__all__ = ["Inference", "infer", "check_run_options", "guard_input"]


@dataclass
class Inference:
    """One partitioned run, optionally with its reference and their comparison."""

    result: Any  # workbench.execute.run.RunResult (logits cropped to the volume)
    reference: Any | None  # RunResult of the single-device reference, or None
    comparison: Any | None  # workbench.analysis.compare.Comparison, or None
    report: dict  # the report.json object
    loaded: Any = None  # the LoadedVolume it ran on

    @property
    def layout(self):
        return self.result.layout

    @property
    def logits(self) -> np.ndarray:
        return self.result.output

    @property
    def labels(self) -> np.ndarray:
        """The prediction: argmax of the logits, uint8 (Z, Y, X)."""
        return self.result.output.argmax(-1).astype(np.uint8)

    @property
    def reference_labels(self) -> np.ndarray | None:
        return None if self.reference is None else self.reference.output.argmax(-1).astype(np.uint8)

    def signed_error(self) -> np.ndarray | None:
        """Partitioned − reference per voxel (see :func:`workbench.analysis.compare.signed_error`)."""
        from workbench.analysis.compare import signed_error

        return None if self.reference is None else signed_error(self.result.output, self.reference.output)


def check_run_options(config, backend: str, halo, mesh=None, *, inference: bool = True):
    """Validate backend, halo mode and mesh before anything is read or compiled.

    Returns ``(halo, MeshSpec or None)``; raises one :class:`~workbench.errors.UserError`.
    """
    import jax

    from workbench.execute.run import check_options
    from workbench.mesh import parse_mesh
    from workbench.model.halo import validate_halo

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    halo = validate_halo(halo)
    check_options(config, backend, halo)
    spec = None
    if mesh is not None and not (isinstance(mesh, str) and mesh.strip().lower() == "auto"):
        spec = parse_mesh(mesh)
        if spec.n_devices > len(jax.devices()):
            parse_mesh(spec, n_devices=len(jax.devices()))  # raises: names the meshes that fit
        if inference and spec.data > 1:
            raise UserError(
                f"mesh {spec} has a data-parallel axis of {spec.data} but inference runs one volume; "
                "set data-parallel to 1 (it is for training and memory plans)"
            )
    return halo, spec


def infer(
    model,
    loaded,
    mesh,
    *,
    backend: str = "explicit",
    halo="exact",
    reference: bool = False,
    tolerance: float = 1e-5,
    on_stage=None,
    force: bool = False,
    comm_overlap: str = "auto",
) -> Inference:
    """Run ``model`` (a :class:`~workbench.app.models.ModelChoice` or a ``Model``) on
    ``loaded`` (a :class:`~workbench.app.volumes.LoadedVolume`, a (Z, Y, X) image, or a spec
    or path: then the memory guard runs from its headers before it is loaded).

    With ``reference``, the single-device reference runs too and the report holds the
    comparison: ``max_abs_diff``, ``argmax_disagreement``, per-shard statistics and the
    seam profile. ``on_stage(text)``, if given, is called as each stage starts (progress bars).
    A run that would not fit in memory is refused first (:func:`workbench.app.memory_guard.check_memory`)
    unless ``force``. ``comm_overlap``: as :func:`workbench.execute.run.make_forward`'s.
    """
    from workbench.analysis.compare import compare
    from workbench.app.results import build_report
    from workbench.execute.run import run

    choice = model
    model = getattr(choice, "model", choice)
    if isinstance(loaded, (str, os.PathLike)):
        from workbench.app.volumes import load_volume

        force = force or guard_input(model.config, loaded, mesh, backend=backend, halo=halo, reference=reference)
        loaded = load_volume(loaded)
    image = getattr(loaded, "image", loaded)
    stage = on_stage or (lambda text: None)
    if not force:
        _check_memory(model.config, np.shape(image), mesh, backend, halo, reference=reference)
    window = getattr(choice, "window", None)
    if window is not None:  # trained on patches: Gaussian sliding windows of its patch, on one device
        stage(f"sliding windows of {'x'.join(map(str, window))}")
        result = window_run(model, image, window)
    else:
        stage(f"compile and run ({backend})")
        result = run(model, image, mesh, backend=backend, halo=halo, comm_overlap=comm_overlap)
    ref = comparison = None
    if reference:
        stage("single-device reference")
        ref = run(model, image, backend="reference")
        stage("compare")
        comparison = compare(result.output, ref.output, result.layout, keep_error=False, tol=tolerance)
    report = build_report(
        result,
        model=model,
        reference=ref,
        comparison=comparison,
        weights=getattr(choice, "description", None),
        volume=getattr(loaded, "volume", None),
    )
    if window is not None:
        from workbench.execute.windows import PATCH_OVERLAP

        report["sliding_window"] = {"patch": list(window), "overlap": PATCH_OVERLAP, "mode": "gaussian"}
    return Inference(result, ref, comparison, report, loaded=loaded if hasattr(loaded, "image") else None)


def window_run(model, image, window):
    """The :class:`~workbench.execute.run.RunResult` of a patch-trained model's sliding-window
    prediction (:func:`workbench.execute.windows.patch_logits`): windows on one device."""
    import time

    from workbench.execute.run import RunResult
    from workbench.execute.windows import patch_logits
    from workbench.mesh import MeshSpec, ShardLayout

    t0 = time.perf_counter()
    logits = patch_logits(model, image, window)
    seconds = time.perf_counter() - t0
    layout = ShardLayout(np.shape(image)[:3], MeshSpec(), multiple=model.config.multiple)
    return RunResult(logits, "reference", "exact", layout, seconds, 0.0)


def guard_input(
    config, source, mesh, *, backend: str = "explicit", halo="exact", series: str | None = None, reference=False
) -> bool:
    """The memory guard for a run of ``config`` on ``source`` (a spec or path), and with
    ``reference`` for the single-device reference too, before it is generated or read: its
    shape from the spec or headers
    (:func:`~workbench.app.memory_guard.input_shape`). Raises
    :class:`~workbench.app.memory_guard.MemoryRefused`; True when checked, False when the
    shape is known only once loaded (then :func:`infer` checks it)."""
    from workbench.app.memory_guard import MemoryRefused, input_shape

    shape = input_shape(source, series=series)
    if shape is None:
        return False
    try:
        _check_memory(config, shape, mesh, backend, halo, reference=reference)
    except MemoryRefused:
        raise
    except UserError:  # a shape the run cannot take: loading names the problem first
        return False
    return True


def _check_memory(config, shape, mesh, backend, halo, *, reference: bool = False) -> None:
    """The guard for the run on ``mesh``, then (``reference``) for the whole-volume
    single-device reference, which a partitioned run that fits may still not."""
    import jax

    from workbench.app.memory_guard import check_run_memory
    from workbench.mesh import MeshSpec, auto_mesh, parse_mesh

    if getattr(config, "kind", None) == "nnunet":  # a plans network trained by the workbench: the guard reads its spec
        config = config.spec
    if backend == "reference":
        spec = MeshSpec()
    elif isinstance(mesh, str) and mesh.strip().lower() == "auto":
        spec = auto_mesh(len(jax.devices()))
    else:
        spec = parse_mesh(mesh)
    check_run_memory(config, tuple(shape), spec, backend=backend, halo=halo, reference=reference)
