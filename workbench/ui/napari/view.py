"""The napari side: add layer data to a viewer, screenshot it, and ask whether a window can open.

Everything here imports napari inside the function that needs it; :func:`display_available`
imports no Qt at all, so the CLI and the notebook panel can ask before they try.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["add_layers", "apply_contour", "display_available", "save_view_png", "show_view"]

LayerData = tuple  # (data, kwargs, layer_type), see workbench.ui.napari.layers


def add_layers(viewer, layers: Sequence[LayerData], *, replace: bool = True) -> list:
    """Add layer data tuples to a napari viewer; with ``replace``, a layer of the same
    name is removed first (re-running a widget updates instead of duplicating)."""
    from napari.layers import Layer

    added = []
    for data, kwargs, kind in layers:
        if replace and kwargs.get("name") in viewer.layers:
            viewer.layers.remove(kwargs["name"])
        layer = Layer.create(data, dict(kwargs), kind)
        apply_contour(layer)
        added.append(viewer.add_layer(layer))
    return added


def apply_contour(layer) -> None:
    """Set a Labels layer's ``contour`` from ``metadata["contour"]`` (see :func:`contour_layer`)."""
    if "contour" in layer.metadata and hasattr(layer, "contour"):
        layer.contour = int(layer.metadata["contour"])


def display_available() -> tuple[bool, str]:
    """Can napari open a window here? ``(ok, reason)``; no Qt is imported."""
    import importlib.util

    if os.environ.get("QT_QPA_PLATFORM", "") == "offscreen":
        return False, "QT_QPA_PLATFORM=offscreen cannot render napari's 3D canvas"
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False, "no display (DISPLAY is unset); run under xvfb-run or on a desktop"
    if importlib.util.find_spec("napari") is None:
        return False, "napari is not installed (pip install 'partitioned-unet-workbench[viewer]')"
    return True, ""


def save_view_png(
    path: str | os.PathLike,
    layers: Sequence[LayerData],
    *,
    ndisplay: int = 3,
    angles=(0.0, -35.0, 120.0),
    size=(720, 720),
) -> Path:
    """Open a napari viewer with ``layers``, screenshot the canvas to ``path``, close it.

    Needs a display (a real one or Xvfb): a hidden viewer renders black.
    """
    import napari

    loop = _ipython_event_loop()
    viewer = napari.Viewer(show=True, title="workbench view")
    try:
        add_layers(viewer, layers)
        show_view(viewer, ndisplay=ndisplay, angles=angles)
        viewer.screenshot(path=str(path), canvas_only=True, size=tuple(size), flash=False)
    finally:
        viewer.close()
        _restore_ipython_event_loop(loop)
    return Path(path)


def _ipython_event_loop():
    """The kernel's GUI event loop integration (None: plain), or ``False`` outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return False if shell is None else getattr(shell, "active_eventloop", None)


def _restore_ipython_event_loop(loop) -> None:
    """Undo napari's ``%gui qt`` after a screenshot: under ipykernel's Qt loop, messages
    that arrive together wait for the next one (the notebook viewer's slice requests)."""
    if loop is False:
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None and getattr(shell, "active_eventloop", None) != loop:
        shell.enable_gui(loop)


def show_view(viewer, *, ndisplay: int = 3, angles=(0.0, -35.0, 120.0)) -> None:
    """Switch to 2D/3D, fit the data, and in 3D turn the camera to an oblique view."""
    viewer.dims.ndisplay = ndisplay
    if ndisplay == 3:
        viewer.scene.camera.angles = tuple(angles)
    viewer.reset_view(reset_camera_angle=False)
