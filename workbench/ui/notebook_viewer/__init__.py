"""See the shards inside a notebook, on a remote kernel: :func:`viewer`.

Three orthogonal slices (z, y, x) kept in sync, with the image, prediction, ground truth
(outlined), reference prediction, the error against the reference (``|Δ|`` or signed),
the halo band and every shard's boundary in its own colour; the shard, its error and the
values under the cursor; a table of per-shard errors (click a row to go to that shard).
Runs in the browser (JupyterLab 4, VS Code notebooks: an anywidget), needs nothing on
the kernel's machine but the kernel, and streams only the slices in view. For 3D
rendering on a desktop use napari (``workbench view``, ``panel.open_napari()``).

Example
-------
>>> from workbench.ui.notebook_viewer import viewer
>>> v = viewer("demo_out")            # a result folder, Inference, panel, RunResult ...
>>> v                                 # last line of a cell: the viewer
>>> v.position = [10, 32, 32]         # move the cursor (the three slices) from Python
>>> v.show(error=True, halo_band=True)

Importing this starts neither JAX nor Qt.
"""

from __future__ import annotations

from workbench.ui.notebook_viewer.scene import Scene
from workbench.ui.notebook_viewer.sources import scene_from
from workbench.ui.notebook_viewer.widget import START_BUDGET_FRACTION, SliceViewer

__all__ = ["viewer", "Scene", "SliceViewer", "scene_from", "START_BUDGET_FRACTION"]


def viewer(source, *, position=None, size: int = 256, reference=None, image=None, ground_truth=None, layout=None,
           **options) -> SliceViewer:  # fmt: skip
    """The notebook viewer of ``source``: a result folder (path or ``ResultFolder``), an
    ``Inference``, the ``WorkbenchPanel``, a ``RunResult`` (``reference=`` a second one to
    compare) or a ``Comparison`` kept with its error map (``layout=`` the run's layout).

    ``position``: the cursor (z, y, x), default the centre; ``size``: each view's largest
    side in screen pixels; ``options``: ``title``, ``tolerance``, ``spacing``, ``class_names``.
    """
    scene = scene_from(source, reference=reference, image=image, ground_truth=ground_truth, layout=layout, **options)
    return SliceViewer(scene, position=position, size=size)
