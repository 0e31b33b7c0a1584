"""NRRD (``.nrrd``, ``.nhdr``) and MetaImage (``.mha``, ``.mhd``) through SimpleITK.

Detected by content: NRRD by its ``NRRD000`` magic (attached ``.nrrd`` or a detached
``.nhdr`` header naming its data file), MetaImage by a ``key = value`` header whose first
line is a MetaImage key and which declares ``NDims`` (``.mha``: one file; ``.mhd``: the
header naming its data file, ``.raw`` or ``.zraw``). SimpleITK reads and writes the files;
nothing here parses the voxels by hand.

Axes and geometry
-----------------
ITK indexes an image ``(x, y, z)`` (x fastest on disk) and places it in LPS+ world space::

    p_LPS = origin + direction @ diag(spacing) @ [x, y, z]

Reading gives the (Z, Y, X) array of :mod:`data_tools.volume` and its affine in RAS+ (world
x and y negated, as for DICOM), so an image written as NIfTI and as NRRD with the same
geometry reads back with the same affine. ``metadata["itk_geometry"]`` keeps ITK's own
``origin``, ``spacing`` and ``direction`` (as read); writing a volume whose affine is still
that geometry's writes those numbers verbatim, so a prediction carries exactly the input's
origin, spacing and direction. A 4-D image whose 4th size is 1 is read as its 3-D volume.

Reading a box
-------------
:func:`read_box` asks SimpleITK's ``ImageFileReader`` for the box only
(``SetExtractIndex``/``SetExtractSize``). ITK streams it where its reader can
(``ImageFileReader.CanStreamRead()``): uncompressed MetaImage (``.mha``, ``.mhd`` +
``.raw``) reads only the box. NRRD (ITK's NRRD reader does not stream, compressed or not)
and compressed MetaImage fall back to reading the whole image and cropping it: memory of
the whole volume for the duration of the read. (Measured with SimpleITK 2.5: an 8-slice
box of a 256 MiB volume took 153 MiB peak for an uncompressed ``.mha``, 411 MiB for a
``.nrrd``.)

Messages
--------
ITK's warnings are switched off and MetaIO's own lines on the C++ standard error are held
back during a read: a damaged file gives one :class:`~data_tools.errors.DataError`, and
nothing else reaches the terminal. Writing: :func:`write` compresses (gzip) by default;
``.nhdr`` and ``.mhd`` write their data file beside the header (the data file first, the
header last, each renamed into place).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ..atomic import atomic_output, sweep_stale, temp_sibling
from ..errors import DataError
from ..geometry import Box, spacing_of
from ..volume import Volume, ijk_affine_from_zyx, zyx_affine_from_ijk

__all__ = [
    "FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write",
    "itk_geometry", "affine_from_itk", "reads_whole", "modality", "geometry",
]  # fmt: skip

FORMATS = ("nrrd", "metaimage")
SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_IO = {"nrrd": "NrrdImageIO", "metaimage": "MetaImageIO"}
_NAMES = {"nrrd": "NRRD", "metaimage": "MetaImage"}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_META_KEYS = (
    b"ObjectType", b"ObjectSubType", b"NDims", b"Comment", b"DimSize", b"ElementType", b"BinaryData",
    b"BinaryDataByteOrderMSB", b"ElementByteOrderMSB", b"CompressedData", b"HeaderSize", b"TransformMatrix",
    b"Offset", b"Origin", b"Position", b"ElementSpacing", b"AnatomicalOrientation", b"ElementDataFile",
)  # fmt: skip
_MODALITY = {"MET_MOD_CT": "CT", "MET_MOD_MR": "MR", "MET_MOD_NM": "NM", "MET_MOD_US": "US"}
_REDOWNLOAD = "re-export or re-download the file"


# -- detection --------------------------------------------------------------------------
def sniff(path: Path, head: bytes | None) -> str | None:
    """``"nrrd"`` or ``"metaimage"`` from the header's first bytes, else None (``head`` None: a folder)."""
    if head is None:
        return None
    if head[:7] == b"NRRD000":
        return "nrrd"
    first = head.lstrip().split(b"\n", 1)[0]
    key = first.split(b"=", 1)[0].strip()
    if b"=" in first and key in _META_KEYS and re.search(rb"(^|\n)\s*NDims\s*=", head):
        return "metaimage"
    return None


def _format_of(path: Path) -> str:
    with open(path, "rb") as f:
        fmt = sniff(path, f.read(1024))
    if fmt is None:
        raise DataError(path, "is neither a NRRD nor a MetaImage file", "pass a .nrrd, .nhdr, .mha or .mhd file")
    return fmt


# -- SimpleITK, quietly -----------------------------------------------------------------
def _sitk():
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    return sitk


_HOLD_LOCK = threading.Lock()
_HOLD: dict = {"depth": 0, "saved": -1, "sink": None, "drop": False}  # shared by concurrent reads


@contextlib.contextmanager
def _held_stderr():
    """Hold what native code writes to file descriptor 2 while the block runs (MetaIO prints
    its parse errors there); yield a dict whose ``"text"`` then holds it. The held text is
    passed on afterwards (another thread may have written it) unless the block set
    ``"drop"`` (a failed read, whose lines the DataError replaces). Reads in several threads
    share one hold: the first redirects, the last restores."""
    held = {"text": "", "drop": False}
    with _HOLD_LOCK:
        if _HOLD["depth"] == 0:
            with contextlib.suppress(Exception):
                sys.stderr.flush()  # Python's own buffered lines go out before the hold
            saved, sink = -1, None
            with contextlib.suppress(OSError):  # no stderr: nothing to hold
                saved = os.dup(2)
                sink = tempfile.TemporaryFile()
                os.dup2(sink.fileno(), 2)
            _HOLD.update(saved=saved, sink=sink, drop=False)
        _HOLD["depth"] += 1
    try:
        yield held
    finally:
        with _HOLD_LOCK:
            sink = _HOLD["sink"]
            if sink is not None:  # pread: the offset stays where native writers append
                data = os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0)
                held["text"] = data.decode("utf-8", "replace")
            _HOLD["drop"] = _HOLD["drop"] or held["drop"]
            _HOLD["depth"] -= 1
            if _HOLD["depth"] == 0 and sink is not None:
                os.dup2(_HOLD["saved"], 2)
                os.close(_HOLD["saved"])
                if data and not _HOLD["drop"]:
                    with contextlib.suppress(OSError):
                        os.write(2, data)
                sink.close()
                _HOLD.update(saved=-1, sink=None, drop=False)


def _call(path: Path, fmt: str, step, *, header: bool):
    """``step()`` (a SimpleITK read) with native stderr held; its RuntimeError a DataError."""
    failed = None
    with _held_stderr() as held:
        try:
            return step()
        except RuntimeError as exc:
            held["drop"] = True
            failed = exc
    raise _failure(path, fmt, failed, held["text"], header=header)


def _data_file(path: Path) -> str | None:
    """The one data file a detached header (``.nhdr``, ``.mhd``) names, or None (data in
    the file itself, a list or a numbered pattern of files: left to ITK)."""
    with open(path, "rb") as f:
        head = f.read(8192)
    if head[:7] == b"NRRD000":
        m = re.search(rb"\n(?:data file|datafile)\s*:[ \t]*([^\r\n]*)", head.split(b"\n\n", 1)[0])
    else:
        m = re.search(rb"(?:^|\n)\s*ElementDataFile\s*=[ \t]*([^\r\n]*)", head)
    value = m.group(1).strip() if m else b""
    if not value or len(value.split()) != 1 or value.upper() in (b"LOCAL", b"LIST"):
        return None
    return value.decode("utf-8", "replace")


def _failure(path: Path, fmt: str, exc: RuntimeError, held: str, *, header: bool) -> DataError:
    """One DataError for what SimpleITK raised (its text and MetaIO's held lines)."""
    text = str(exc) + "\n" + held
    name = _NAMES[fmt]
    data = _data_file(path)
    if data is not None and not (path.parent / data).is_file():
        return _missing_data(path, fmt, data)
    if header:
        detail = _detail(text)
        return DataError(path, f"the {name} header is incomplete or damaged{detail}", _REDOWNLOAD)
    if re.search(r"gzip|zlib|compress|inflate|bzip", text, re.I):
        return DataError(path, f"the compressed {name} data are truncated or damaged", _REDOWNLOAD)
    return DataError(path, "the file is shorter than its header says (truncated or damaged)", _REDOWNLOAD)


def _missing_data(path: Path, fmt: str, data: str) -> DataError:
    return DataError(path, f"the {_NAMES[fmt]} header names the data file {data!r}, which does not exist beside it",
                     "keep the header and its data file together in one folder")  # fmt: skip


def _detail(text: str) -> str:
    """The most telling line of ITK's / teem's / MetaIO's message, or ''."""
    teem = re.findall(r"\[nrrd\] \w+: ([^\n]*\S)", text)  # teem's chain of reasons, the last the root
    meta = re.search(r"(?:^|\n)(\w+ required and not defined)", text)
    found = teem[-1] if teem else meta.group(1) if meta else ""
    return f" ({found[:120]})" if found else ""


def _reader(path: Path, fmt: str | None = None):
    """``(ImageFileReader with the header read, format name)``; every failure a DataError."""
    sitk = _sitk()
    fmt = fmt or _format_of(path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_IO[fmt])
    reader.SetFileName(str(path))
    _call(path, fmt, reader.ReadImageInformation, header=True)
    data = _data_file(path)
    if data is not None and not (path.parent / data).is_file():
        raise _missing_data(path, fmt, data)
    _check(path, fmt, reader)
    return reader, fmt


def _check(path: Path, fmt: str, reader) -> None:
    """One 3-D volume of one value per voxel (a 4-D image of one 3-D volume passes)."""
    size = tuple(int(s) for s in reader.GetSize())
    sitk = _sitk()
    components = int(reader.GetNumberOfComponents())
    if components != 1:
        kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
        raise DataError(
            path,
            f"holds {components} values per voxel ({kind}), expected one (a grey-value image or a label map)",
            "write each channel as its own file (nnU-Net: CASE_0000, CASE_0001, ...), e.g. "
            "SimpleITK.VectorIndexSelectionCast(image, 0) for the first",
        )
    if len(size) < 3:
        raise DataError(
            path,
            f"the image has {len(size)} dimensions (x, y) = {size}, expected 3",
            "pass a 3-D volume (a single slice cannot be segmented in 3-D)",
        )
    if len(size) > 3 and any(s != 1 for s in size[3:]):
        raise DataError(
            path,
            f"the image has {len(size)} dimensions (x, y, z, ...) = {size}, expected one 3-D volume",
            "pick one volume first, e.g. SimpleITK.WriteImage(image[:, :, :, 0], 'one.nrrd'), and read that file",
        )
    if _dtype(reader) is None:
        raise DataError(path, f"has voxels of type {sitk.GetPixelIDValueAsString(reader.GetPixelID())}",
                        "convert it to an integer or float image")  # fmt: skip


def _dtype(reader) -> np.dtype | None:
    sitk = _sitk()
    table = {
        sitk.sitkUInt8: np.uint8, sitk.sitkInt8: np.int8, sitk.sitkUInt16: np.uint16, sitk.sitkInt16: np.int16,
        sitk.sitkUInt32: np.uint32, sitk.sitkInt32: np.int32, sitk.sitkUInt64: np.uint64, sitk.sitkInt64: np.int64,
        sitk.sitkFloat32: np.float32, sitk.sitkFloat64: np.float64,
    }  # fmt: skip
    found = table.get(reader.GetPixelID())
    return None if found is None else np.dtype(found)


def _execute(path: Path, fmt: str, reader, box: Box | None = None) -> np.ndarray:
    """The voxels as a (Z, Y, X) array (of ``box`` only when given)."""
    sitk = _sitk()
    size = tuple(int(s) for s in reader.GetSize())
    extra = len(size) - 3
    if box is None:
        box = ((0, size[2]), (0, size[1]), (0, size[0]))
    (z0, z1), (y0, y1), (x0, x1) = box
    if box != ((0, size[2]), (0, size[1]), (0, size[0])) or extra:
        reader.SetExtractIndex((x0, y0, z0) + (0,) * extra)
        reader.SetExtractSize((x1 - x0, y1 - y0, z1 - z0) + (0,) * extra)  # 0: that axis collapsed
    image = _call(path, fmt, reader.Execute, header=False)
    array = sitk.GetArrayFromImage(image)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


# -- geometry ---------------------------------------------------------------------------
def affine_from_itk(origin, spacing, direction) -> np.ndarray:
    """The (z, y, x) -> RAS+ affine of ITK's LPS+ ``origin``, ``spacing``, ``direction``
    (row-major 3x3, as ``Image.GetDirection()``), all in (x, y, z) order.

    Examples
    --------
    >>> a = affine_from_itk((10.0, -20.0, 30.0), (0.5, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    >>> a[:3, 3].tolist(), np.round(np.diag(a[:3, :3][:, ::-1]), 3).tolist()
    ([-10.0, 20.0, 30.0], [-0.5, -0.7, 2.5])
    """
    d = np.asarray(direction, np.float64).reshape(3, 3)
    ijk = np.eye(4)
    ijk[:3, :3] = _LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, np.float64))
    ijk[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, np.float64)
    return zyx_affine_from_ijk(ijk)


def itk_geometry(affine) -> dict:
    """ITK's ``origin``, ``spacing`` and ``direction`` (LPS+, (x, y, z) order) of a (z, y, x)
    -> RAS+ affine; the inverse of :func:`affine_from_itk`."""
    ijk = ijk_affine_from_zyx(np.asarray(affine, np.float64))
    m = _LPS_TO_RAS @ ijk[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    origin = _LPS_TO_RAS @ ijk[:3, 3]
    return {"origin": tuple(float(v) for v in origin), "spacing": tuple(float(v) for v in spacing),
            "direction": tuple(float(v) for v in direction.ravel())}  # fmt: skip


def _geometry_of(reader) -> dict:
    """The 3-D part of the reader's geometry (a 4-D image of one volume: its first three axes)."""
    n = len(reader.GetSize())
    d = np.asarray(reader.GetDirection(), np.float64).reshape(n, n)[:3, :3]
    return {"origin": tuple(float(v) for v in reader.GetOrigin()[:3]),
            "spacing": tuple(float(v) for v in reader.GetSpacing()[:3]),
            "direction": tuple(float(v) for v in d.ravel())}  # fmt: skip


def _modality(fmt: str, reader) -> str:
    if fmt != "metaimage" or not reader.HasMetaDataKey("Modality"):
        return ""
    return _MODALITY.get(reader.GetMetaData("Modality").strip(), "")


# -- reading ----------------------------------------------------------------------------
def read(path: Path, *, series=None) -> Volume:
    """The image with its affine; ``metadata["itk_geometry"]`` keeps ITK's origin, spacing
    and direction, ``metadata["modality"]`` a MetaImage's CT/MR/NM/US (``series``: unused)."""
    reader, fmt = _reader(path)
    geometry = _geometry_of(reader)
    modality = _modality(fmt, reader)
    array = _execute(path, fmt, reader)
    affine = affine_from_itk(**geometry)
    meta = {"itk_geometry": geometry, "on_disk_dtype": str(array.dtype)}
    if modality:
        meta["modality"] = modality
    return Volume(array, spacing=spacing_of(affine), affine=affine, source_format=fmt, path=str(path),
                  metadata=meta)  # fmt: skip


def read_box(path: Path, box: Box, *, series=None) -> np.ndarray:
    """Only the (z, y, x) box, streamed where ITK can (see the module notes)."""
    reader, fmt = _reader(path)
    return _execute(path, fmt, reader, box)


def info(path: Path, *, series=None):
    """``(shape, dtype, spacing, affine)`` from the header (``series``: unused)."""
    reader, _ = _reader(path)
    x, y, z = (int(s) for s in reader.GetSize()[:3])
    affine = affine_from_itk(**_geometry_of(reader))
    return (z, y, x), _dtype(reader), spacing_of(affine), affine


def geometry(path: Path) -> dict:
    """ITK's ``origin``, ``spacing`` and ``direction`` of the file (header only), as
    :func:`read` keeps them in ``metadata["itk_geometry"]``."""
    return _geometry_of(_reader(Path(path))[0])


def reads_whole(path) -> bool:
    """Whether ITK reads the whole image for any box of ``path`` (NRRD, compressed
    MetaImage): a caller reading several boxes of it is better off reading their union once.
    False for other files."""
    name = str(path).lower()
    if name.endswith((".nrrd", ".nhdr")):
        return True
    if not name.endswith((".mha", ".mhd")):
        return False
    reader, _ = _reader(Path(path))
    return not reader.CanStreamRead()


def modality(path: Path) -> str:
    """A MetaImage header's ``Modality`` as ``"CT"``/``"MR"``/... (``""``: none or NRRD)."""
    reader, fmt = _reader(path)
    return _modality(fmt, reader)


# -- writing ----------------------------------------------------------------------------
def _image(volume: Volume):
    """A SimpleITK image of ``volume`` with the input's own geometry where the affine is unchanged."""
    sitk = _sitk()
    array = volume.array
    if array.dtype == bool or array.dtype == np.float16:  # no such ITK pixel types
        array = array.astype(np.uint8 if array.dtype == bool else np.float32)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    geometry = volume.metadata.get("itk_geometry")
    if not (isinstance(geometry, dict) and _same(affine_from_itk(**geometry), volume.affine)):
        geometry = itk_geometry(volume.affine)
    image.SetOrigin(geometry["origin"])
    image.SetSpacing(geometry["spacing"])
    image.SetDirection(geometry["direction"])
    return image


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(1.0, float(np.abs(b).max()))
    return bool(np.allclose(a, b, rtol=0.0, atol=1e-9 * scale))


def write(volume: Volume, path: Path, *, compress: bool = True) -> Path:
    """Write ``volume`` as NRRD or MetaImage (by the suffix), gzip-compressed unless
    ``compress=False``, atomically; ``.nhdr``/``.mhd`` also write their data file."""
    sitk = _sitk()
    path = Path(path)
    image = _image(volume)
    if path.name.lower().endswith((".nrrd", ".mha")):
        with atomic_output(path) as tmp:
            sitk.WriteImage(image, str(tmp), compress)
        return path
    # a header and its data file: both written in a hidden staging folder under their final
    # names (the header names the data file), then renamed into place, the header last
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    stage = temp_sibling(path)
    stage.mkdir()
    try:
        sitk.WriteImage(image, str(stage / path.name), compress)
        for part in sorted(stage.iterdir(), key=lambda p: p.name == path.name):
            os.replace(part, path.parent / part.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path
