"""A :class:`~workbench.ui.notebook_viewer.scene.Scene` from whatever holds a result.

Accepted: a result folder (a path, or :func:`workbench.app.load_result`'s
``ResultFolder``), an :class:`~workbench.app.inference.Inference` (what the panel's
``run_inference`` / ``compare`` leave in ``panel.inference``), the panel itself, a
:class:`~workbench.execute.run.RunResult` (with ``reference=`` another one: the
comparison), or a :class:`~workbench.analysis.compare.Comparison` that kept its error map
(``compare(..., keep_error=True)``) with ``layout=``.
"""

from __future__ import annotations

import os

import numpy as np

from workbench.errors import UserError
from workbench.ui.notebook_viewer.scene import Scene

__all__ = ["scene_from"]


def _halo_width(halo, model) -> int:
    from workbench.analysis.receptive import halo_width

    return halo_width(halo, model=model)


def _from_folder(folder, options: dict) -> Scene:
    options.setdefault("title", str(folder.path))
    return Scene(folder.layout, spacing=folder.spacing, image=folder.image, prediction=folder.prediction,
                 ground_truth=folder.ground_truth, reference_prediction=folder.reference_prediction,
                 signed=folder.signed, stats=folder.stats, halo_width=folder.halo_band_width,
                 class_names=folder.class_names, channel_names=folder.channel_names, regions=folder.regions,
                 **options)  # fmt: skip


def _from_inference(inference, options: dict) -> Scene:
    loaded = inference.loaded
    comparison = inference.comparison
    signed = inference.signed_error()
    stats = comparison.per_shard if comparison is not None and signed is not None else None
    result = inference.result
    options.setdefault("title", f"{result.backend} on {result.layout.mesh}, halo {result.halo}")
    return Scene(
        inference.layout,
        spacing=getattr(loaded, "spacing", (1.0, 1.0, 1.0)),
        image=getattr(loaded, "image", None),
        prediction=inference.labels,
        ground_truth=getattr(loaded, "labels", None),
        reference_prediction=inference.reference_labels,
        signed=signed,
        stats=stats,
        halo_width=_halo_width(result.halo, inference.report.get("model")),
        class_names=getattr(loaded, "class_names", None),
        **options,
    )


def _from_run(result, options: dict, *, reference=None, image=None, ground_truth=None) -> Scene:
    from workbench.analysis.compare import signed_error

    output = np.asarray(result.output)
    if output.ndim != 4:
        raise UserError(f"the run's output has shape {output.shape}; the viewer shows one volume (Z, Y, X, K)")
    signed = ref_labels = None
    if reference is not None:
        signed = signed_error(output, reference.output)
        ref_labels = np.asarray(reference.output).argmax(-1).astype(np.uint8)
    options.setdefault("title", f"{result.backend} on {result.layout.mesh}, halo {result.halo}")
    if "halo_width" not in options:
        try:
            options["halo_width"] = _halo_width(result.halo, None)
        except UserError:  # 'overlap' needs the model's config: no band then
            options["halo_width"] = 0
    return Scene(result.layout, image=image, prediction=output.argmax(-1).astype(np.uint8),
                 ground_truth=ground_truth, reference_prediction=ref_labels, signed=signed, **options)  # fmt: skip


def scene_from(source, *, reference=None, image=None, ground_truth=None, layout=None, **options) -> Scene:
    """The scene of ``source`` (see the module docstring); ``options`` go to :class:`Scene`
    (``title``, ``tolerance``, and for runs and comparisons ``spacing``, ``class_names``)."""
    from workbench.analysis.compare import Comparison
    from workbench.app.results import ResultFolder, load_result

    if isinstance(source, Scene):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _from_folder(load_result(source), options)
    if isinstance(source, ResultFolder):
        return _from_folder(source, options)
    if hasattr(source, "inference") and hasattr(source, "session"):  # the notebook panel
        if source.inference is None:
            raise UserError("the panel has no result yet; run inference (or compare) first")
        return _from_inference(source.inference, options)
    if hasattr(source, "loaded") and hasattr(source, "signed_error"):  # app.inference.Inference
        return _from_inference(source, options)
    if isinstance(source, Comparison):
        if source.error is None or layout is None:
            raise UserError("a Comparison needs its error map and the layout: use "
                            "compare(..., keep_error=True) and viewer(comparison, layout=result.layout)")  # fmt: skip
        return Scene(layout, image=image, ground_truth=ground_truth, signed=source.error,
                     stats=source.per_shard, **options)  # fmt: skip
    if hasattr(source, "output") and hasattr(source, "layout"):  # execute.run.RunResult
        return _from_run(source, options, reference=reference, image=image, ground_truth=ground_truth)
    raise UserError(
        f"cannot view a {type(source).__name__}; pass a result folder, a ResultFolder, an Inference, "
        "the panel, a RunResult or a Comparison with keep_error=True"
    )
