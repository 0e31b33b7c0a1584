"""DICOM series folders with pydicom: group, sort along the slice normal, rescale to HU.

Reading
-------
Every file whose bytes 128..132 read ``DICM`` (searched recursively, hidden files and
``DICOMDIR`` skipped) is parsed without pixels and grouped by ``SeriesInstanceUID``;
files without ``ImagePositionPatient``/``ImageOrientationPatient`` (reports, presentation
states) are ignored. Slices are sorted by the projection of ``ImagePositionPatient`` on
the slice normal ``row x column``; the slice step is ``(last - first) / (n - 1)`` (so a
gantry tilt is kept in the affine) and must be even. Pixel values become
``stored * RescaleSlope + RescaleIntercept`` (HU for CT) as float32.

Array axes: ``z`` = sorted slice index, ``y`` = pixel row, ``x`` = pixel column.
World coordinates are converted from DICOM's LPS to RAS (x and y negated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import DataError
from ..geometry import Box
from ..volume import Volume

__all__ = [
    "FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write",
    "Series", "dicom_files", "is_dicom_file", "scan_series",
]  # fmt: skip

FORMATS = ("dicom",)
SUFFIXES = ()  # written only on request: write_dicom_series(volume, folder)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            p = Path(root) / name
            if is_dicom_file(p):
                out.append(p)
    return out


def sniff(path: Path, head: bytes | None) -> str | None:
    """``"dicom"`` for a file with ``DICM`` at byte 128, or a folder holding such files."""
    if head is None:
        return "dicom" if dicom_files(path) else None
    return "dicom" if len(head) >= 132 and head[128:132] == b"DICM" else None


@dataclass
class _Slice:
    path: Path
    position: np.ndarray  # LPS mm
    slope: float
    intercept: float


@dataclass
class Series:
    """Geometry of one series, from headers only (no pixel data read)."""

    uid: str
    number: str
    description: str
    modality: str
    slices: list[_Slice]  # sorted along the normal
    rows: int
    columns: int
    affine: np.ndarray  # (z, y, x) index -> RAS mm
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.slices), self.rows, self.columns)


def _scan(folder: Path) -> dict[str, list]:
    import pydicom

    groups: dict[str, list] = {}
    for path in dicom_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for damaged files
            raise DataError(path, f"cannot parse DICOM header ({type(exc).__name__}: {exc})",
                            "remove or re-export the damaged file") from None  # fmt: skip
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            continue
        groups.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append((path, ds))
    return groups


def _describe(uid: str, items: list) -> str:
    ds = items[0][1]
    desc = str(ds.get("SeriesDescription", "")).strip()
    return f"{uid} (series {ds.get('SeriesNumber', '?')}, {desc!r}, {len(items)} slices)"


def _pick(folder: Path, groups: dict[str, list], series) -> tuple[str, list]:
    if not groups:
        raise DataError(folder, "contains no DICOM image slices", "point to a folder holding one DICOM series")
    if series is None:
        if len(groups) == 1:
            return next(iter(groups.items()))
        listing = "; ".join(_describe(u, items) for u, items in sorted(groups.items()))
        raise DataError(
            folder,
            f"contains {len(groups)} DICOM series: {listing}",
            "pick one with read_volume(path, series=UID) (CLI: --series UID)",
        )
    series = str(series)
    if series in groups:
        return series, groups[series]
    by_number = [u for u, items in groups.items() if str(items[0][1].get("SeriesNumber", "")) == series]
    if len(by_number) == 1:
        return by_number[0], groups[by_number[0]]
    listing = "; ".join(_describe(u, items) for u, items in sorted(groups.items()))
    raise DataError(folder, f"has no series {series!r}; it holds: {listing}", "pass one of these UIDs as series=")


def _geometry(folder: Path, uid: str, items: list) -> Series:
    first = items[0][1]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise DataError(
            folder,
            f"series {uid} is an enhanced multi-frame DICOM, which is not supported",
            "convert it to NIfTI (e.g. dcm2niix) and read the NIfTI file",
        )
    orient = np.asarray([float(v) for v in first.ImageOrientationPatient])
    row_cos, col_cos = orient[:3], orient[3:]
    normal = np.cross(row_cos, col_cos)
    rows, cols = int(first.Rows), int(first.Columns)
    spacing_rc = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    slices = []
    for path, ds in items:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orient, atol=1e-4):
            raise DataError(folder, f"series {uid} mixes slice orientations ({path.name})",
                            "split the series (e.g. with dcm2niix) and read one part")  # fmt: skip
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise DataError(folder, f"series {uid} mixes image sizes ({path.name})",
                            "split the series (e.g. with dcm2niix) and read one part")  # fmt: skip
        slices.append(_Slice(path, np.asarray([float(v) for v in ds.ImagePositionPatient]),
                             float(ds.get("RescaleSlope", 1.0) or 1.0),
                             float(ds.get("RescaleIntercept", 0.0) or 0.0)))  # fmt: skip
    slices.sort(key=lambda s: float(s.position @ normal))
    along = np.array([float(s.position @ normal) for s in slices])
    if len(slices) > 1:
        gaps = np.diff(along)
        if gaps.min() < 1e-3:
            raise DataError(
                folder,
                f"series {uid} has several slices at the same position (repeated acquisitions or echoes)",
                "split the series (e.g. with dcm2niix) and read one part",
            )
        if np.ptp(gaps) > max(1e-3, 0.01 * float(np.median(gaps))):
            raise DataError(
                folder,
                f"series {uid} has uneven slice gaps ({gaps.min():.4g} to {gaps.max():.4g} mm; missing slices?)",
                "check the series is complete, or convert it with dcm2niix, which resamples uneven gaps",
            )
        step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    else:
        thickness = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0)) or 1.0)
        step = normal * thickness
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = col_cos * spacing_rc[0]  # down the rows: y
    lps[:3, 2] = row_cos * spacing_rc[1]  # along a row: x
    lps[:3, 3] = slices[0].position
    affine = _LPS_TO_RAS @ lps
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    number, description = str(first.get("SeriesNumber", "")), str(first.get("SeriesDescription", ""))
    modality = str(first.get("Modality", ""))
    return Series(uid, number, description, modality, slices, rows, cols, affine, spacing)  # type: ignore[arg-type]


def scan_series(folder: Path, series=None) -> Series:
    """Geometry of the chosen series in ``folder`` (a single ``.dcm`` file picks its own series)."""
    folder = Path(folder)
    if folder.is_file():
        import pydicom

        uid = str(pydicom.dcmread(folder, stop_before_pixels=True).get("SeriesInstanceUID", "unknown"))
        series, folder = series or uid, folder.parent
    groups = _scan(folder)
    uid, items = _pick(folder, groups, series)
    return _geometry(folder, uid, items)


def _pixels(sl: _Slice) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(sl.path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing decoder plugins raise RuntimeError/NotImplementedError
        short = "less than expected" in str(exc)  # the file was cut short, not compressed
        raise DataError(
            sl.path,
            f"cannot decode pixel data ({str(exc).split(' - ')[0]})",
            "re-export or re-copy the damaged file"
            if short
            else "install a decoder (pip install pylibjpeg pylibjpeg-libjpeg) or decompress the series",
        ) from None
    if pixels.ndim != 2:
        raise DataError(sl.path, f"pixel data has shape {pixels.shape}, expected one grey slice",
                        "convert colour or multi-frame data to a grey series first")  # fmt: skip
    return pixels


def _hu(geo: Series, box) -> np.ndarray:
    """float32 HU of ``box`` of the series, reading only the slice files of its z range."""
    (z0, z1), (y0, y1), (x0, x1) = box
    out = np.empty((z1 - z0, y1 - y0, x1 - x0), dtype=np.float32)
    for i, sl in enumerate(geo.slices[z0:z1]):
        pixels = _pixels(sl)[y0:y1, x0:x1]
        out[i] = pixels.astype(np.float32) * np.float32(sl.slope) + np.float32(sl.intercept)
    return out


def read(path: Path, *, series=None) -> Volume:
    """The series as a float32 HU :class:`Volume` (``series``: UID or number, if several)."""
    geo = scan_series(path, series)
    return Volume(
        _hu(geo, ((0, geo.shape[0]), (0, geo.rows), (0, geo.columns))),
        spacing=geo.spacing,
        affine=geo.affine,
        source_format="dicom",
        path=str(path),
        metadata={
            "series_uid": geo.uid,
            "series_number": geo.number,
            "series_description": geo.description,
            "modality": geo.modality,
            "slice_files": [str(s.path) for s in geo.slices],
        },
    )


def read_box(path: Path, box: Box, *, series=None) -> np.ndarray:
    """Only ``box`` of the series (float32 HU), reading only the slice files of its z range."""
    return _hu(scan_series(path, series), box)


def info(path: Path, *, series=None):
    """``(shape, dtype, spacing, affine)`` from the headers (pixels are float32 HU once read)."""
    geo = scan_series(path, series)
    return geo.shape, np.dtype(np.float32), geo.spacing, geo.affine


def _ds(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write(
    volume: Volume,
    folder: Path,
    *,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    description: str = "data_tools export",
    file_names=None,
) -> Path:
    """Write ``volume`` as a CT DICOM series (one int16 file per z slice), atomically.

    Stored values are ``round((array - intercept) / slope)``; the geometry comes from the
    affine, whose y and x columns must be orthogonal. ``file_names`` (one per slice, any
    order) lets tests scramble the file order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ras_to_lps = _LPS_TO_RAS  # its own inverse
    lps = ras_to_lps @ volume.affine
    col_y, col_x = lps[:3, 1], lps[:3, 2]
    dy, dx = np.linalg.norm(col_y), np.linalg.norm(col_x)
    row_cos, col_cos = col_x / dx, col_y / dy
    if abs(float(row_cos @ col_cos)) > 1e-6:
        raise DataError(folder, "the affine's y and x columns are not orthogonal",
                        "resample to an orthogonal grid first")  # fmt: skip
    stored = np.rint((volume.array.astype(np.float64) - intercept) / slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise DataError(folder, "values do not fit int16 with this slope/intercept", "choose a larger slope")
    stored = stored.astype(np.int16)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    nz = volume.shape[0]
    names = list(file_names) if file_names is not None else [f"slice{z:04d}.dcm" for z in range(nz)]
    with atomic_output(folder) as tmp:
        tmp.mkdir()
        for z in range(nz):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = pydicom.Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.Modality, ds.PatientName, ds.PatientID = "CT", "Phantom^Synthetic", "PHANTOM"
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 1, z + 1, description
            ds.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
            ds.ImagePositionPatient = [_ds(v) for v in (lps @ np.array([z, 0, 0, 1.0]))[:3]]
            ds.PixelSpacing = [_ds(dy), _ds(dx)]
            ds.SliceThickness = _ds(np.linalg.norm(lps[:3, 0]))
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = _ds(slope), _ds(intercept), "HU"
            ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.PixelData = np.ascontiguousarray(stored[z]).tobytes()
            ds.save_as(tmp / names[z], enforce_file_format=True)
    return Path(folder)
