"""Read and write volumes in any supported format; the entry points the CLI calls.

=================  ==================================  =============================
format             read (by content, not by name)      write (by suffix)
=================  ==================================  =============================
NIfTI              ``.nii`` / ``.nii.gz`` header        ``.nii``, ``.nii.gz``
DICOM series       folder (or one file) with ``DICM``   ``write_dicom_series``
TIFF stack         ``II*``/``MM*`` (incl. BigTIFF)       ``.tif``, ``.tiff``
NRRD               ``NRRD000`` (``.nrrd``, ``.nhdr``)    ``.nrrd``, ``.nhdr`` (SimpleITK)
MetaImage          ``NDims = ...`` header (``.mha``,     ``.mha``, ``.mhd`` (SimpleITK)
                   ``.mhd`` + ``.raw``/``.zraw``)
zarr / OME-Zarr    folder with ``zarr.json``/``.zarray`` ``.zarr`` (OME-Zarr 0.5)
numpy              ``\\x93NUMPY`` / zip with ``.npy``    ``.npy``, ``.npz``
=================  ==================================  =============================

Inputs may also be the specs ``phantom:N``, ``phantom:N:SEED``, ``phantom:ZxYxX[:SEED]``,
``mni`` and ``mni:N`` / ``mni:ZxYxX`` (see :func:`load_input`).

:func:`read_box` reads one shard's block: zarr reads only the chunks it touches; ``.npy``
and uncompressed ``.nii`` are memory-mapped; ``.nii.gz`` is streamed up to the block
(memory of the block only, time of decompressing up to it); TIFF reads only the pages
of the z range; DICOM reads only the slice files of the z range; uncompressed MetaImage
(``.mha``, ``.mhd``) streams only the block through SimpleITK, while NRRD and compressed
MetaImage are read whole by ITK and cropped (see :mod:`data_tools.formats.itk`); ``phantom:`` specs
generate only the block; an ``.npz`` member (the image, or ``member="labels"``) is
memory-mapped when stored uncompressed and otherwise decompressed as a stream up to the
block, keeping only its z slab. ``mni`` specs read this process's memory-mapped copy of the
native template (:func:`~data_tools.samples.mni_native_files`), resampled by block for ``mni:N``.

Every writer is atomic: it writes a hidden temporary sibling and renames it, so a
failure leaves nothing behind.

Each format is one module of :mod:`data_tools.formats`; this module only dispatches
through that table (detection by each module's ``sniff``, writing by its ``SUFFIXES``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .blockfile import prediction_suffix
from .errors import DataError, MissingDataError
from .formats import FORMATS, MODULES, format_module, module_for_name
from .geometry import Box, check_box
from .samples import load_mni
from .synthetic import make_phantom, make_phantom_block, phantom_geometry
from .volume import Volume

__all__ = [
    "FORMATS",
    "VolumeInfo",
    "detect_format",
    "read_volume",
    "write_volume",
    "read_box",
    "volume_info",
    "load_input",
    "write_prediction",
    "write_dicom_series",
]

_SUPPORTED = (
    "supported: NIfTI (.nii, .nii.gz), DICOM series folders, TIFF stacks, NRRD (.nrrd, .nhdr), "
    "MetaImage (.mha, .mhd), zarr/OME-Zarr stores, .npy/.npz, or the specs phantom:N and mni"
)


@dataclass(frozen=True)
class VolumeInfo:
    """What a reader can tell without loading the voxels."""

    shape: tuple[int, int, int]
    dtype: np.dtype
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source_format: str
    modality: str = ""  # DICOM Modality (or as a zarr store recorded it); "" when unknown


# -- format detection -------------------------------------------------------------------
def _missing(path: Path) -> MissingDataError:
    parent = path.parent
    hint = "check the path"
    if parent.is_dir():
        near = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))[:8]
        hint = f"check the path; {parent} holds {near}" if near else f"check the path; {parent} is empty"
    return MissingDataError(path, "no such file or folder", hint)


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its content: one of :data:`FORMATS`.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "a.bin"
    >>> np.save(open(p, "wb"), np.zeros((2, 2, 2)))
    >>> detect_format(p)
    'npy'
    """
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    if path.is_dir():
        fmt = _sniff(path, None)  # a zarr store may hold only hidden files (.zarray)
        if fmt is not None:
            return fmt
        entries = [p for p in path.iterdir() if not p.name.startswith(".")]
        if not entries:
            raise DataError(path, "the folder is empty",
                            "point to a DICOM series folder or a zarr store (or a file)")  # fmt: skip
        names = sorted(p.name for p in entries)[:6]
        raise DataError(path, f"the folder holds no DICOM files and no zarr metadata ({len(entries)} entries: {names})",
                        "point to a DICOM series folder, a zarr store, or one of the files; " + _SUPPORTED)  # fmt: skip
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        raise DataError(path, "the file is empty (0 bytes)", "re-export or re-download the file")
    fmt = _sniff(path, head)
    if fmt is not None:
        return fmt
    if head[:2] == b"\x1f\x8b":  # NIfTI is the only format read inside gzip
        raise DataError(path, "a gzip file that does not hold a NIfTI image", _SUPPORTED)
    raise DataError(path, f"unknown format (file starts with {head[:8]!r})", _SUPPORTED)


def _sniff(path: Path, head: bytes | None) -> str | None:
    """The first format module (in table order) that recognises ``path``."""
    for module in MODULES.values():
        fmt = module.sniff(path, head)
        if fmt is not None:
            return fmt
    return None


# -- reading ----------------------------------------------------------------------------
def read_volume(path: str | os.PathLike, *, series: str | None = None, labels: str | os.PathLike | None = None,
                class_names=None) -> Volume:  # fmt: skip
    """Read a volume, choosing the reader from the content.

    Parameters
    ----------
    path : str or path-like
        File or folder (DICOM series folder, zarr store).
    series : str, optional
        For a DICOM folder with several series: the SeriesInstanceUID (or SeriesNumber).
    labels : path-like, optional
        A label map on the same grid (any format) to attach as ``Volume.labels``.
    class_names : sequence of str, optional
        Names for the label values (checked against the label map).

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "v.npy"
    >>> np.save(p, np.zeros((2, 3, 4), np.float32))
    >>> read_volume(p).shape
    (2, 3, 4)
    """
    path = Path(path)
    vol = format_module(detect_format(path)).read(path, series=series)
    if labels is not None:
        lab = read_volume(labels)
        values = lab.array
        if not np.issubdtype(values.dtype, np.integer):
            if not np.array_equal(values, np.rint(values)):
                raise DataError(labels, "label map holds non-integer values",
                                "pass an integer label map (nearest-neighbour resampled)")  # fmt: skip
            values = values.astype(np.int64)
        if values.shape != vol.shape:
            raise DataError(labels, f"label map has shape {values.shape}, the image {vol.shape}",
                            "pass the label map of this image (same grid)")  # fmt: skip
        names = class_names if class_names is not None else vol.class_names
        try:
            vol = vol.replace(labels=values, class_names=names)
        except DataError as exc:
            raise DataError(labels, exc.problem, exc.fix) from None
    elif class_names is not None:
        vol = vol.replace(class_names=class_names)
    return vol


def read_box(path: str | os.PathLike, box: Box, *, series: str | None = None, member: str | None = None) -> np.ndarray:
    """Read only ``box`` = ``((z0, z1), (y0, y1), (x0, x1))`` of the image (half-open).

    Equals ``read_volume(path).array[z0:z1, y0:y1, x0:x1]`` (phantom specs: the image of
    :func:`~data_tools.synthetic.make_phantom_block`). ``member``: another array of an
    ``.npz`` (``"labels"``: ``read_volume(path).labels[...]``). See the module notes for
    which formats avoid reading the whole volume.
    """
    if member is not None:
        if detect_format(Path(path)) != "npz":
            raise DataError(path, f"is not an .npz, so it holds no {member!r} array",
                            "pass the .npz holding it, or read its own file")  # fmt: skip
        from .formats import numpy as npformat

        box = check_box(path, box, volume_info(path).shape)
        return npformat.read_member_box(Path(path), box, member)
    spec = _parse_spec(str(path)) if isinstance(path, str) else None
    if spec is not None and spec[0] == "phantom":
        _, shape, seed = spec
        return make_phantom_block(shape, box, seed=seed)[0]
    if spec is not None:  # mni / mni:N: this process's memory-mapped copy of the native template
        from .preprocess import resample_block, resample_grid
        from .samples import mni_native_files

        image = mni_native_files()[0]
        native = volume_info(image).shape
        target = spec[1] if spec[1] is not None and tuple(spec[1]) != tuple(native) else None
        if target is None:
            return read_box(image, check_box(path, box, native))
        grid, scale, offset = resample_grid(native, (1.0, 1.0, 1.0), shape=target)
        box = check_box(path, box, grid)
        return resample_block(lambda b: read_box(image, b), native, scale, offset, box, 1)
    info = volume_info(path, series=series)
    box = check_box(path, box, info.shape)
    return format_module(info.source_format).read_box(Path(path), box, series=series)


def volume_info(path: str | os.PathLike, *, series: str | None = None) -> VolumeInfo:
    """Shape, dtype, spacing and affine from headers only (phantom specs: computed).

    Examples
    --------
    >>> volume_info("phantom:64").shape
    (64, 64, 64)
    """
    spec = _parse_spec(str(path)) if isinstance(path, str) else None
    if spec is not None:
        if spec[0] == "phantom":
            spacing, affine = phantom_geometry(spec[1])
            return VolumeInfo(spec[1], np.dtype(np.float32), spacing, affine, "phantom")
        vol = load_input(str(path))
        return VolumeInfo(vol.shape, vol.dtype, vol.spacing, vol.affine, vol.source_format,
                          str(vol.metadata.get("modality", "")))  # fmt: skip
    path = Path(path)
    fmt = detect_format(path)
    shape, dtype, spacing, affine = format_module(fmt).info(path, series=series)
    spacing = tuple(float(s) for s in spacing)
    modality = ""
    if fmt == "dicom":
        modality = format_module(fmt).scan_series(path, series).modality
    elif fmt == "zarr":
        import zarr

        modality = str(dict(zarr.open(str(path), mode="r").attrs).get("data_tools", {}).get("modality", ""))
    elif fmt == "metaimage":
        modality = format_module(fmt).modality(path)
    shape = tuple(int(s) for s in shape)
    return VolumeInfo(shape, np.dtype(dtype), spacing, affine, fmt, modality)  # type: ignore[arg-type]


# -- writing ----------------------------------------------------------------------------
def _writer_for(path: Path):
    module = module_for_name(path)
    if module is None:
        raise DataError(path, f"cannot tell the output format from the name {path.name!r}",
                        "end the name with .nii.gz, .nii, .tif, .nrrd, .mha, .zarr, .npy or .npz")  # fmt: skip
    return module


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` in the format named by ``path``'s suffix, atomically.

    NIfTI keeps the affine (and a source NIfTI header); NRRD (``.nrrd``, ``.nhdr``) and
    MetaImage (``.mha``, ``.mhd``) keep origin, spacing and direction (gzip-compressed);
    TIFF and ``.npz`` keep spacing and affine; zarr (``.zarr``) writes OME-Zarr with down-sampled levels and the labels;
    ``.npy`` keeps only the array. DICOM export: :func:`write_dicom_series`.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "v.nii.gz"
    >>> _ = write_volume(Volume(np.zeros((2, 3, 4), np.float32), spacing=(3.0, 2.0, 1.0)), p)
    >>> read_volume(p).spacing
    (3.0, 2.0, 1.0)
    """
    path = Path(path)
    return _writer_for(path).write(volume, path)


def write_dicom_series(volume: Volume, folder: str | os.PathLike, **kwargs) -> Path:
    """Write ``volume`` as a CT DICOM series folder (int16 + RescaleSlope/Intercept).

    Keyword arguments: ``slope`` (1.0), ``intercept`` (-1024.0), ``series_uid``,
    ``description``, ``file_names``. Mostly for tests and demos of the DICOM reader.
    """
    return format_module("dicom").write(volume, Path(folder), **kwargs)


# -- CLI entry points -------------------------------------------------------------------
_SHAPE = r"(\d+)(?:x(\d+)x(\d+))?"


def _parse_spec(spec: str):
    """``("phantom", shape, seed)``, ``("mni", shape_or_None)`` or None for a path."""
    low = spec.strip().lower()
    if low.startswith("phantom:") or low == "phantom":
        m = re.fullmatch(rf"phantom:{_SHAPE}(?::(-?\d+))?", low)
        if not m:
            raise DataError(spec, "malformed phantom spec",
                            "use phantom:N, phantom:N:SEED or phantom:ZxYxX[:SEED], e.g. phantom:128")  # fmt: skip
        n = int(m.group(1))
        shape = (n, n, n) if m.group(2) is None else (n, int(m.group(2)), int(m.group(3)))
        return ("phantom", shape, int(m.group(4) or 0))
    if low == "mni" or low.startswith("mni:"):
        if low == "mni":
            return ("mni", None)
        m = re.fullmatch(rf"mni:{_SHAPE}", low)
        if not m:
            raise DataError(spec, "malformed mni spec", "use mni (native 189x233x197), mni:N or mni:ZxYxX")
        n = int(m.group(1))
        return ("mni", (n, n, n) if m.group(2) is None else (n, int(m.group(2)), int(m.group(3))))
    return None


def load_input(spec: str | os.PathLike, *, series: str | None = None) -> Volume:
    """A :class:`Volume` from a CLI input: any readable path or a sample spec.

    ``phantom:N`` (N³, seed 0), ``phantom:N:SEED``, ``phantom:ZxYxX[:SEED]``, ``mni``
    (native grid) and ``mni:N`` / ``mni:ZxYxX`` (resampled). A file literally named
    ``mni`` is read with ``./mni``.

    Examples
    --------
    >>> v = load_input("phantom:32:1")
    >>> v.shape, v.source_format, v.metadata["seed"]
    ((32, 32, 32), 'phantom', 1)
    """
    parsed = _parse_spec(str(spec)) if isinstance(spec, str) else None
    if parsed is None:
        return read_volume(spec, series=series)
    if parsed[0] == "phantom":
        return make_phantom(parsed[1], seed=parsed[2])
    return load_mni(shape=parsed[1])


_KEPT = ("nifti_header", "itk_geometry")  # format metadata a prediction inherits from its input


def write_prediction(array: np.ndarray, like: Volume, out_dir: str | os.PathLike, *, name: str = "prediction",
                     suffix: str | None = None) -> Path:  # fmt: skip
    """Write a (Z, Y, X) prediction next to its input's format family; returns the path.

    NIfTI, DICOM and MNI inputs give ``name.nii.gz`` with the input's affine (a NIfTI
    input's header codes are kept); NRRD gives ``name.nrrd`` and MetaImage (``.mha`` or
    ``.mhd``) ``name.mha``, with the input's origin, spacing and direction exactly; zarr gives
    ``name.zarr`` (OME-Zarr, same spacing and affine); TIFF gives ``name.tif``; npy, npz and phantoms give ``name.npy``.
    ``suffix`` (e.g. ``".nii"``, ``".tif"``) chooses another format, with the same geometry. Atomic.

    Examples
    --------
    >>> import tempfile
    >>> like = load_input("phantom:32")
    >>> write_prediction(like.labels, like, tempfile.mkdtemp()).suffix
    '.npy'
    """
    array = np.asarray(array)
    if array.shape != like.shape:
        raise DataError("prediction", f"has shape {array.shape}, the input {like.shape}",
                        "crop the padding off the prediction before writing it")  # fmt: skip
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise DataError("name", f"name={name!r} is not a plain file name", "pass e.g. name='prediction'")
    suffix = suffix or prediction_suffix(like.source_format)
    out = Path(out_dir) / f"{name}{suffix}"
    meta = {key: like.metadata[key] for key in _KEPT if key in like.metadata}
    pred = Volume(array, spacing=like.spacing, affine=like.affine, source_format=like.source_format,
                  path=str(out), metadata=meta)  # fmt: skip
    return write_volume(pred, out)
