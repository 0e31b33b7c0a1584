"""npe2 reader: open a workbench result folder (``report.json`` + prediction + reference).

``napari_get_reader`` returns ``None`` for anything that is not a folder holding
``report.json`` (another reader may want it). A result folder with a missing or
mismatched file gives one error notification naming the file and the fix, and no layers.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["napari_get_reader", "read_result_folder"]


def napari_get_reader(path):
    """The reader for a result folder, or ``None``."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    folder = Path(os.fspath(path))
    if folder.is_dir() and (folder / "report.json").is_file():
        return read_result_folder
    return None


def read_result_folder(path):
    """Layer data tuples of a result folder; ``[(None,)]`` after notifying a bad folder."""
    from napari.utils.notifications import show_error

    from workbench.app import load_result
    from workbench.ui.napari.layers import result_layers

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        layers = result_layers(load_result(path))
    except ValueError as err:  # DataError: names the file, the problem and the fix
        show_error(f"cannot open result folder: {err}")
        return [(None,)]
    _apply_contours_on_insert()
    return layers


def _apply_contours_on_insert() -> None:
    """Readers return data, not layers: set ``contour`` (a property napari cannot take
    from layer data) when the shard-contour layer is inserted into the current viewer."""
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:  # connecting the same callback twice is a no-op
        viewer.layers.events.inserted.connect(_on_inserted)


def _on_inserted(event) -> None:
    from workbench.ui.napari.view import apply_contour

    apply_contour(event.value)
