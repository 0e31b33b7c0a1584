"""Result folders: the one ``report.json`` schema, written and read in one place.

A result folder is what ``workbench infer`` and ``workbench demo`` write (and what
``workbench view``, the napari reader and the notebooks read)::

    report.json                  the report (schema below)
    prediction.<ext>             labels in the input's format family (NIfTI in, NIfTI out)
    image.npy                    the input image (with a reference: what the viewers show);
                                 (Z, Y, X, C) for several channels, named by ``channel_names``
    reference_prediction.npy     the single-device reference's labels (with --reference)
    error.npy                    partitioned − reference per voxel, float32 (with --reference)
    ground_truth.npy             labels that came with the input (demo)
    logits.npy                   on request

A multi-process run (:mod:`workbench.app.sharded`) writes each array from the processes
that hold its shards: the prediction in the input's family as one process does
(:mod:`workbench.app.prediction_output`; zarr above a size), the others as zarr:
``reference_prediction.zarr`` and ``error.zarr`` (OME-Zarr), ``logits.zarr`` (Z, Y, X, K);
no ``image.npy``. Its report adds ``processes`` (per process: devices, boxes read, host
memory), ``reference_mode`` and ``finish_seconds`` (process 0 finishing the prediction file).

``report.json`` keys (:data:`REPORT_KEYS` are always present): ``input_shape``,
``output_shape``, ``num_classes``, ``mesh`` (axis → size), ``padded_shape``, ``backend``,
``halo``, ``seconds``, ``compile_seconds``, ``peak_bytes_per_device``, ``memory``,
``model`` (the U-Net config), ``weights`` (where they came from), ``max_abs_diff``,
``mean_abs_diff``, ``argmax_disagreement``, ``dice``, ``reference_seconds``,
``reference_peak_bytes``, ``per_shard`` (one row per shard: ``index``, ``coords``,
``box``, ``max_abs_diff``, ``mean_abs_diff``, ``rms_diff``, ``voxels_over_tolerance``),
``profile`` (the seam profile), and from the writer ``input``, ``prediction``,
``machine``, ``spacing``, ``class_names``. Comparison fields are ``null`` without a
reference. An nnU-Net model's result (:func:`workbench.app.nnunet.write_nnunet_result`)
adds ``channel_names`` (one per input channel), ``regions`` (``[[name, [label values]],
…]`` for region outputs: what each region covers in the painted prediction) and
``network_shape`` (its shards split the network's grid; when that differs from the input's,
the per-shard boxes are not checked against the input and the viewers draw the mesh over
the input's grid).

Folders are written under a temporary sibling name and renamed when complete
(:func:`staged_output`), so a reader never sees half a result.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.atomic import atomic_output, sweep_stale, temp_sibling, write_text_atomic
from data_tools.errors import DataError, MissingDataError
from workbench.analysis.compare import shard_stats
from workbench.analysis.receptive import halo_width
from workbench.errors import NotAFolderError, OutputExistsError
from workbench.mesh import ShardLayout, parse_mesh

__all__ = [
    "REPORT_KEYS",
    "build_report",
    "summary_line",
    "check_output_folder",
    "staged_output",
    "finish_staged",
    "write_report",
    "write_result",
    "write_result_files",
    "ResultFolder",
    "load_result",
]

REPORT_KEYS = (
    "input_shape",
    "output_shape",
    "num_classes",
    "mesh",
    "padded_shape",
    "backend",
    "halo",
    "seconds",
    "compile_seconds",
    "peak_bytes_per_device",
    "memory",
    "model",
    "weights",
    "max_abs_diff",
    "mean_abs_diff",
    "reference_scale",
    "argmax_disagreement",
    "dice",
    "reference_seconds",
    "reference_peak_bytes",
    "per_shard",
    "profile",
)
_STAT_KEYS = ("max_abs_diff", "mean_abs_diff", "rms_diff", "voxels_over_tolerance")


# -- the report ----------------------------------------------------------------------------
def build_report(result, *, model, reference=None, comparison=None, weights: str | None = None, volume=None) -> dict:
    """The ``report.json`` object of a run (a :class:`~workbench.execute.run.RunResult`),
    with the reference's figures and the comparison when given."""
    layout = result.layout
    report = {
        "input_shape": list(layout.volume_shape),
        "output_shape": list(result.output.shape[:3]),
        "num_classes": int(result.output.shape[-1]),
        "mesh": parse_mesh(layout.mesh).as_dict(),
        "padded_shape": list(layout.padded_shape),
        "backend": result.backend,
        "halo": result.halo,
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "peak_bytes_per_device": result.memory.get("peak"),
        "memory": dict(result.memory),
        "model": model.config.as_dict(),
        "weights": weights,
        "max_abs_diff": None,
        "mean_abs_diff": None,
        "reference_scale": None,
        "argmax_disagreement": None,
        "dice": None,
        "reference_seconds": None,
        "reference_peak_bytes": None,
        "per_shard": [
            {
                "index": s.index,
                "coords": list(s.coords),
                "box": [list(b) for b in s.valid_box],
                **dict.fromkeys(_STAT_KEYS),
            }
            for s in layout.shards()
        ],
        "profile": None,
    }
    if reference is not None:
        report["reference_seconds"] = reference.seconds
        report["reference_peak_bytes"] = reference.memory.get("peak")
    if comparison is not None:
        summary = comparison.as_dict()
        for key in (
            "max_abs_diff",
            "mean_abs_diff",
            "reference_scale",
            "argmax_disagreement",
            "dice",
            "per_shard",
            "profile",
        ):
            report[key] = summary[key]
    if volume is not None:
        report["spacing"] = [float(s) for s in volume.spacing]
        names = volume.class_names
        report["class_names"] = list(names) if names and len(names) == report["num_classes"] else None
    return report


def summary_line(report: dict) -> str:
    """One line: backend, mesh, time, memory and (with a reference) the largest difference."""
    mesh = report["mesh"]
    diff = report["max_abs_diff"]
    peak = report["peak_bytes_per_device"]
    return (
        f"{report['backend']} on z={mesh['z']},y={mesh['y']},x={mesh['x']},data={mesh['data']}: "
        f"{report['seconds']:.2f} s"
        + ("" if peak is None else f", peak {peak / 2**20:.1f} MiB/device")
        + ("" if diff is None else f", max |Δ| vs reference {diff:.3g}")
    )


# -- writing -------------------------------------------------------------------------------
def check_output_folder(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an output folder that is a file, or that holds files without ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotAFolderError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"--out {out} already holds files; choose a new folder or pass --overwrite")
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = False, marker: str = "report.json"):
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    An existing non-empty ``out`` is an error unless ``overwrite``; then only the
    files written here replace their namesakes, everything else in ``out`` stays. The
    ``marker`` file (what makes a folder look complete to its readers: ``report.json``,
    a dataset evaluation's ``summary.json``) is removed from ``out`` before the first
    replacement and moved in last, so a run killed while replacing never leaves a mix of
    old and new files that looks complete.
    """
    out = check_output_folder(out, overwrite=overwrite)
    if not out.exists():
        with atomic_output(out) as tmp:  # renamed into place only when the block succeeds
            tmp.mkdir()
            yield tmp
        return
    sweep_stale(out)
    tmp = temp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finish_staged(tmp, out, marker=marker)


def finish_staged(tmp: Path, out: Path, *, marker: str = "report.json") -> None:
    """Put a complete staged folder ``tmp`` in place at ``out``: one rename when ``out`` does
    not exist, else each of its files replaces its namesake in ``out`` (``--overwrite``),
    the ``marker`` removed first and moved in last (see :func:`staged_output`)."""
    if not out.exists():
        os.rename(tmp, out)
        return
    with contextlib.suppress(FileNotFoundError):
        (out / marker).unlink()  # from here until the last rename, ``out`` does not look complete
    items = sorted(tmp.iterdir(), key=lambda item: item.name == marker)
    for item in items:  # each file replaces its namesake in one rename; the marker last
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            with atomic_output(target) as staged:
                os.rename(item, staged)
        else:
            os.replace(item, target)
    tmp.rmdir()


def write_report(folder: str | os.PathLike, report: dict) -> Path:
    """``folder/report.json``, atomically."""
    return write_text_atomic(Path(folder) / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_result_files(
    folder: str | os.PathLike,
    inference,
    *,
    input_name: str | None = None,
    save_logits: bool = False,
    images: bool | None = None,
    ground_truth: bool = False,
    native_format: bool = True,
    output_format: str = "auto",
) -> dict:
    """Write a run's arrays into ``folder``; return its report with the file names added.

    The prediction goes in the input's format family when ``native_format`` (NIfTI in,
    NIfTI out, same affine), else ``prediction.npy``. ``images`` (default: when there is a
    reference) adds ``image.npy``, ``reference_prediction.npy`` and ``error.npy``, and
    ``ground_truth`` the input's labels as ``ground_truth.npy``: what ``workbench view``
    and the napari reader show. ``output_format`` other than ``auto`` names the
    prediction's suffix (``nii``, ``tif``, ``zarr``, ...) instead of the input's family.
    """
    from data_tools.io import write_prediction
    from workbench.execute.devices import device_summary

    folder = Path(folder)
    loaded = inference.loaded
    volume = None if loaded is None else loaded.volume
    labels = inference.labels
    if native_format and volume is not None:
        suffix = None if output_format == "auto" else "." + output_format
        written = Path(write_prediction(labels, volume, folder, suffix=suffix)).name
    else:
        written = "prediction.npy"
        np.save(folder / written, labels)
    if save_logits:
        np.save(folder / "logits.npy", inference.logits)
    if images if images is not None else inference.reference is not None:
        if volume is not None:
            np.save(folder / "image.npy", np.asarray(volume.array, np.float32))
        if ground_truth and volume is not None and volume.labels is not None:
            np.save(folder / "ground_truth.npy", np.asarray(volume.labels, np.uint8))
        if inference.reference is not None:
            np.save(folder / "reference_prediction.npy", inference.reference_labels)
            np.save(folder / "error.npy", inference.signed_error())
    report = dict(inference.report)
    report.update(input=input_name, prediction=written, machine=device_summary())
    return report


def write_result(
    out: str | os.PathLike,
    inference,
    *,
    overwrite: bool = False,
    input_name: str | None = None,
    save_logits: bool = False,
    images: bool | None = None,
    output_format: str = "auto",
) -> dict:
    """Write a whole result folder at ``out`` (staged, renamed when complete); return the report."""
    with staged_output(out, overwrite=overwrite) as tmp:
        report = write_result_files(tmp, inference, input_name=input_name, save_logits=save_logits, images=images,
                                    output_format=output_format)  # fmt: skip
        write_report(tmp, report)
    return report


# -- reading -------------------------------------------------------------------------------
@dataclass
class ResultFolder:
    """What ``workbench infer --reference`` / ``workbench demo`` wrote, validated."""

    path: Path
    report: dict
    layout: ShardLayout
    spacing: tuple[float, float, float]
    prediction: np.ndarray
    image: np.ndarray | None = None
    ground_truth: np.ndarray | None = None
    reference_prediction: np.ndarray | None = None
    signed: np.ndarray | None = None
    class_names: list[str] | None = None
    halo_band_width: int = 0
    files: dict[str, str] = field(default_factory=dict)
    stats: list[dict] | None = None  # per-shard error statistics of ``signed``
    channel_names: list[str] | None = None  # names of ``image``'s channels (its last axis), or None: one channel
    regions: list[tuple[str, tuple[int, ...]]] | None = None  # (name, label values) of region outputs

    def channels(self) -> list[tuple[str, np.ndarray]]:
        """(name, (Z, Y, X) array) of each input channel (none without ``image``)."""
        if self.image is None:
            return []
        if np.ndim(self.image) == 3:
            return [((self.channel_names or ["image"])[0], self.image)]
        names = self.channel_names or [f"channel {c}" for c in range(self.image.shape[-1])]
        return [(name, self.image[..., c]) for c, name in enumerate(names)]

    def region_masks(self, labels=None) -> list[tuple[str, np.ndarray]]:
        """(name, uint8 mask) of each region in ``labels`` (default the prediction):
        ``isin(labels, values)``, what nnU-Net's region output covers (none without regions)."""
        labels = self.prediction if labels is None else labels
        return [(name, np.isin(np.asarray(labels), values).astype(np.uint8)) for name, values in self.regions or []]


def _read_array(path: Path):
    """A (Z, Y, X) array (memory-mapped for .npy) and its spacing if the format knows it."""
    if path.suffix == ".npy":
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        except ValueError as err:
            raise DataError(path, f"is not a readable .npy file ({err})", "rerun the command that wrote it") from None
    from data_tools.io import read_volume

    volume = read_volume(path)
    return volume.array, volume.spacing


def load_result(path: str | os.PathLike) -> ResultFolder:
    """Read and check a result folder: ``report.json``, the prediction and, when present,
    ``image.npy``, ``ground_truth.npy``, ``reference_prediction.npy`` and ``error.npy``.

    Raises :class:`~data_tools.errors.DataError` (a ``ValueError``) naming the file, the
    problem and the fix for a missing or mismatched file.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise MissingDataError(folder, "is not a result folder", "pass the --out folder of workbench infer or demo")
    report_path = folder / "report.json"
    if not report_path.is_file():
        raise MissingDataError(report_path, "is missing",
                               "pass the --out folder of `workbench infer ... --out DIR` or `workbench demo`")  # fmt: skip
    try:
        report = json.loads(report_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(report_path, f"is not valid JSON ({err})", "rerun the command that wrote it") from None
    if not isinstance(report, dict):
        raise DataError(report_path, f"holds a JSON {type(report).__name__}, not an object",
                        "rerun workbench infer/demo to rewrite it")  # fmt: skip
    missing = [k for k in ("input_shape", "mesh", "halo", "per_shard") if k not in report]
    if missing:
        raise DataError(report_path, f"lacks the keys {missing}", "rerun workbench infer/demo to rewrite it")
    shape = tuple(int(s) for s in report["input_shape"])
    model = report.get("model") or {}
    multiple = model.get("multiple") or 2 ** (int(model.get("depth", 1)) - 1)  # nnU-Net specs: per axis
    network = tuple(int(s) for s in report.get("network_shape") or shape)
    try:
        layout = ShardLayout(shape, report["mesh"], multiple=multiple)
    except (TypeError, ValueError) as err:
        raise DataError(
            report_path, f"has an unusable mesh/input_shape ({err})", "rerun workbench infer/demo"
        ) from None
    boxes = [[list(b) for b in s.valid_box] for s in layout.shards()]
    if network == shape and [row.get("box") for row in report["per_shard"]] != boxes:
        raise DataError(report_path, f"per_shard boxes do not match mesh {layout.mesh} on {shape}",
                        "the report was edited or comes from another run; rerun workbench infer/demo")  # fmt: skip

    files: dict[str, str] = {}
    pred_name = report.get("prediction")
    if pred_name is None:
        found = sorted(p.name for p in folder.iterdir() if p.name.startswith("prediction."))
        pred_name = found[0] if found else "prediction.npy"
    pred_path = folder / pred_name
    if not pred_path.exists():
        raise MissingDataError(
            pred_path, "is missing (report.json names it)", "rerun workbench infer/demo into a new folder"
        )
    prediction, file_spacing = _read_array(pred_path)
    files["prediction"] = pred_name

    channel_names = report.get("channel_names")

    def check(name, array):
        if name.startswith("image.") and np.ndim(array) == 4:  # several channels, last
            if channel_names is not None and array.shape[-1] != len(channel_names):
                raise DataError(folder / name, f"has {array.shape[-1]} channels but report.json names "
                                f"{len(channel_names)} {channel_names}", "rerun workbench infer into a new folder")  # fmt: skip
            if tuple(array.shape[:3]) == shape:
                return array
        if np.ndim(array) != 3 or tuple(array.shape) != shape:
            raise DataError(folder / name, f"has shape {tuple(np.shape(array))} but report.json says the "
                            f"volume is {shape}", "the files come from different runs; rerun workbench infer/demo")  # fmt: skip
        return array

    check(pred_name, prediction)
    if not np.issubdtype(prediction.dtype, np.integer):
        raise DataError(
            pred_path, f"has dtype {prediction.dtype}, expected integer labels", "rerun workbench infer/demo"
        )
    optional = {}
    for key, stem in (("image", "image"), ("ground_truth", "ground_truth"),
                      ("reference_prediction", "reference_prediction"), ("signed", "error")):  # fmt: skip
        for name in (f"{stem}.npy", f"{stem}.zarr"):  # .zarr: written by a multi-process run
            if (folder / name).exists():
                optional[key] = check(name, _read_array(folder / name)[0])
                files[key] = name
                break
    spacing = report.get("spacing") or file_spacing or (1.0, 1.0, 1.0)
    stats = None
    if "signed" in optional:
        stats = shard_stats(optional["signed"], layout)
        for row, mine in zip(report["per_shard"], stats):
            theirs = row.get("max_abs_diff")
            if theirs is not None and not math.isclose(theirs, mine["max_abs_diff"], rel_tol=1e-6, abs_tol=1e-7):
                raise DataError(folder / "error.npy", f"gives max |Δ| {mine['max_abs_diff']:.3g} in shard "
                                f"{row['index']} but report.json says {theirs:.3g}",
                                "the files come from different runs; rerun workbench infer/demo")  # fmt: skip
    try:
        spacing = tuple(float(s) for s in np.ravel(spacing))
    except (TypeError, ValueError):
        spacing = ()
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise DataError(
            report_path,
            f"has spacing {report.get('spacing')!r}, not 3 positive numbers (mm)",
            "rerun workbench infer/demo to rewrite it",
        )
    regions = [(str(n), tuple(int(v) for v in values)) for n, values in report.get("regions") or []] or None
    return ResultFolder(folder, report, layout, spacing, prediction,
                        class_names=report.get("class_names"),
                        halo_band_width=halo_width(report["halo"], model=report.get("model")),
                        files=files, stats=stats, channel_names=channel_names, regions=regions,
                        **optional)  # fmt: skip
