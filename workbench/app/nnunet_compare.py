"""The whole-volume prediction of an nnU-Net model against another segmentation of the same
case, usually nnU-Net's own sliding-window prediction (``nnUNetv2_predict``).

``workbench infer CASE_0000.nii.gz --checkpoint FOLDER --compare-with nnunet_seg.nii.gz``
calls :func:`read_comparison` before the network runs and :func:`compare_labels` after it; the
result folder then holds the other segmentation as ``reference_prediction.npy`` (what the
viewers show as the comparison: ``workbench view``, the notebook viewer and napari draw it
and, in napari, the voxels where the two differ), ``disagreement.npy`` (uint8, 1 where the
labels differ) and ``image.npy``, and ``report.json`` gets a ``compare_with`` section.

:func:`compare_labels` is also what ``benchmarks/nnunet_whole_vs_window.py`` reports: the Dice
of the two per class, the fraction of voxels that differ, and where they differ: within
``band`` voxels of an inner border of nnU-Net's sliding-window tiles (:func:`sliding_window_starts`
reproduces nnU-Net's ``compute_steps_for_sliding_window``), of a face of the volume, or of a
label edge of either segmentation, each beside the fraction of all voxels that lie there.

Example
-------
>>> a = np.zeros((4, 8, 8), np.uint8); a[1:3, 2:6, 2:6] = 1
>>> b = a.copy(); b[1, 2, 2] = 0
>>> r = compare_labels(a, b, ["background", "organ"])
>>> r["differ_voxels"], round(r["dice_between"]["organ"], 4)
(1, 0.9841)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from workbench.errors import InputNotFoundError, UserError

__all__ = ["dice_per_class", "sliding_window_starts", "tile_borders", "compare_labels", "read_comparison",
           "comparison_for", "comparison_line", "write_comparison", "write_extras"]  # fmt: skip


def dice_per_class(a: np.ndarray, b: np.ndarray, names) -> dict:
    """Dice of label ``k`` in ``a`` and ``b`` for every class but background (index 0), keyed by
    name; ``None`` where neither holds the label."""
    out = {}
    for k, name in enumerate(names):
        if k == 0:
            continue
        x, y = a == k, b == k
        total = int(x.sum()) + int(y.sum())
        out[str(name)] = None if total == 0 else 2.0 * int(np.logical_and(x, y).sum()) / total
    return out


def sliding_window_starts(size, patch, step: float = 0.5) -> list[list[int]]:
    """The tile starts per axis of nnU-Net's sliding window (``compute_steps_for_sliding_window``):
    ``ceil((size - patch) / (patch * step)) + 1`` tiles spread evenly from 0 to ``size - patch``,
    rounded; an axis no larger than the patch has one tile at 0."""
    starts = []
    for n, p in zip(size, patch):
        if n <= p:
            starts.append([0])
            continue
        count = math.ceil((n - p) / (p * step)) + 1
        stride = (n - p) / (count - 1)
        starts.append([int(np.round(stride * i)) for i in range(count)])
    return starts


def tile_borders(size, patch, step: float = 0.5) -> list[list[int]]:
    """The inner tile borders per axis: each tile's first voxel and the voxel after its last,
    without the volume's own faces (0 and ``size``)."""
    out = []
    for n, p, starts in zip(size, patch, sliding_window_starts(size, patch, step)):
        planes = {s for s in starts} | {s + min(p, n) for s in starts}
        out.append(sorted(b for b in planes if 0 < b < n))
    return out


def _plane_distance(n: int, planes) -> np.ndarray:
    """Per voxel along an axis of ``n``: voxels between it and the nearest plane (0 = touches it)."""
    i = np.arange(n)[:, None]
    if not len(planes):
        return np.full(n, n, np.int64)
    b = np.asarray(planes)[None, :]
    return np.where(i >= b, i - b, b - 1 - i).min(axis=1)


def _near(distances, shape, band: int) -> np.ndarray:
    """Voxels within ``band`` of a plane on any axis, from per-axis distance vectors."""
    near = np.zeros(shape, bool)
    for axis, d in enumerate(distances):
        view = [1, 1, 1]
        view[axis] = shape[axis]
        near |= (d < band).reshape(view)
    return near


def _label_edges(labels: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour of another label."""
    edge = np.zeros(labels.shape, bool)
    for axis in range(3):
        step = np.diff(labels, axis=axis) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, -1), slice(1, None)
        edge[tuple(lo)] |= step
        edge[tuple(hi)] |= step
    return edge


def _where(differ: np.ndarray, near: np.ndarray) -> dict:
    n_differ = int(differ.sum())
    inside = int(np.logical_and(differ, near).sum())
    return {
        "differ_fraction_within": None if n_differ == 0 else inside / n_differ,
        "volume_fraction_within": float(near.mean()),
        "differ_rate_within": None if not near.any() else inside / int(near.sum()),
        "differ_rate_elsewhere": None if near.all() else (n_differ - inside) / int((~near).sum()),
    }


def compare_labels(prediction, other, names, *, tiles=None, band: int = 3) -> dict:
    """``prediction`` (the whole-volume labels) against ``other`` (Z, Y, X) of the same shape.

    ``tiles``: the inner tile borders per axis (:func:`tile_borders`) on this grid, or None.
    Returns ``voxels``, ``differ_voxels``, ``differ_fraction``, ``label_agreement``,
    ``dice_between`` per class and ``where``: for ``tile_border`` (with ``tiles``),
    ``volume_face`` and ``label_edge`` (either segmentation's), the fraction of the differing
    voxels within ``band`` voxels of it, the fraction of all voxels there, and the rates of
    differing voxels within and elsewhere.
    """
    a, b = np.asarray(prediction), np.asarray(other)
    differ = a != b
    shape = a.shape
    faces = [np.minimum(np.arange(n), n - 1 - np.arange(n)) for n in shape]
    where = {"band_voxels": int(band)}
    if tiles is not None:
        where["tile_border"] = _where(differ, _near([_plane_distance(n, t) for n, t in zip(shape, tiles)], shape, band))
        where["tile_border"]["borders"] = [list(map(int, t)) for t in tiles]
    where["volume_face"] = _where(differ, _near(faces, shape, band))
    edges = _label_edges(a) | _label_edges(b)
    if band > 1:
        from scipy.ndimage import binary_dilation

        edges = binary_dilation(edges, np.ones((3, 3, 3), bool), iterations=band - 1)
    where["label_edge"] = _where(differ, edges)
    n = int(differ.sum())
    return {
        "voxels": int(differ.size),
        "differ_voxels": n,
        "differ_fraction": n / differ.size,
        "label_agreement": 1.0 - n / differ.size,
        "dice_between": dice_per_class(a, b, names),
        "where": where,
    }


def read_comparison(path) -> np.ndarray:
    """The labels of ``--compare-with PATH`` (any format ``data_tools`` reads) as an integer
    (Z, Y, X) array; one :class:`UserError` when it is missing, not 3-D or not labels."""
    from data_tools.io import read_volume

    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"--compare-with {path} does not exist; pass nnU-Net's segmentation of the case")
    try:
        array = np.asarray(read_volume(path).array)
    except (OSError, ValueError) as exc:
        raise UserError(f"--compare-with {path} is not a readable volume ({exc}); pass a segmentation file") from None
    if (
        array.ndim != 3
        or not np.all(np.isfinite(array))
        or not np.array_equal(array, np.round(array))
        or array.min() < 0
    ):
        raise UserError(
            f"--compare-with {path} is not a label map (shape {array.shape}, dtype {array.dtype}); pass a "
            "segmentation of non-negative integer labels, e.g. nnUNetv2_predict's CASE.nii.gz"
        )
    return array.astype(np.int64 if array.max() > 255 else np.uint8)


def comparison_for(prediction, other: np.ndarray, path, *, step: float = 0.5) -> dict:
    """The ``compare_with`` report of an :class:`~workbench.app.nnunet.NNUNetPrediction`
    against ``other``, with nnU-Net's tile borders (the plan's patch, ``step``) where the
    network's grid is the input's (no resampling, no transpose)."""
    seg = prediction.segmentation
    if other.shape != seg.shape:
        raise UserError(
            f"--compare-with {path} has shape {other.shape} but the prediction of the case has {seg.shape}; "
            "pass the segmentation nnU-Net predicted for this case"
        )
    pre = prediction.preprocessed
    tiles = None
    identity = tuple(pre.transpose_forward) == (0, 1, 2)
    if identity and not pre.resampled:
        patch = prediction.folder.config["patch_size"]
        inner = tile_borders(pre.data.shape[1:], patch, step)
        tiles = [[lo + b for b in t] for (lo, _), t in zip(pre.box, inner)]
    report = compare_labels(seg, other, prediction.report["class_names"], tiles=tiles)
    report.update(file=str(path), tile_step_size=step, patch_size=list(prediction.folder.config["patch_size"]))
    if tiles is None:
        report["where"]["tile_border"] = None  # the network's grid is not the input's
    return report


def write_comparison(folder: Path, prediction, other: np.ndarray) -> None:
    """``reference_prediction.npy`` (the other labels, as the viewers' comparison) and
    ``disagreement.npy`` (the input channels go to ``image.npy``, see ``write_nnunet_result``)."""
    np.save(folder / "reference_prediction.npy", other)
    np.save(folder / "disagreement.npy", (np.asarray(prediction.segmentation) != other).astype(np.uint8))


def comparison_line(report: dict) -> str:
    """One line for the terminal: agreement, Dice per class, where the differing voxels lie."""
    dice = ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in report["dice_between"].items())
    line = f"against {report['file']}: labels equal on {report['label_agreement']:.2%} of voxels, Dice {dice}"
    tile = report["where"].get("tile_border")
    if tile and tile["differ_fraction_within"] is not None:
        line += (f"; {tile['differ_fraction_within']:.0%} of the differing voxels lie within "
                 f"{report['where']['band_voxels']} voxels of a tile border ({tile['volume_fraction_within']:.0%} of all)")  # fmt: skip
    return line


def write_extras(folder: Path, prediction, *, save_logits: bool = False, compare_with=None) -> None:
    """The optional files of an nnU-Net result folder: with a reference its labels as
    ``reference_prediction.npy``, with ``save_logits`` ``logits.npy`` (network grid), with
    ``compare_with`` (other labels of the case) :func:`write_comparison`'s files."""
    if prediction.reference_segmentation is not None:
        np.save(folder / "reference_prediction.npy", prediction.reference_segmentation)
    if save_logits:
        np.save(folder / "logits.npy", prediction.logits)
    if compare_with is not None:
        write_comparison(folder, prediction, compare_with)
