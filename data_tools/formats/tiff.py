"""TIFF stacks with tifffile; spacing from our metadata, ImageJ metadata or resolution tags.

Spacing is taken, in this order, from: the ``data_tools`` JSON this package writes
(exact spacing and affine), ImageJ metadata (``spacing`` and ``unit`` for z,
``XResolution``/``YResolution`` for x/y), or resolution tags in centimetres. Anything
else (no tags, or the 72 dpi of a screen image) gives 1 mm and
``metadata["spacing_source"] = "default"``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import DataError
from ..geometry import Box, spacing_of
from ..volume import Volume, default_affine

__all__ = ["FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write", "create"]

FORMATS = ("tiff",)
SUFFIXES = (".tif", ".tiff")

_UNIT_MM = {
    "mm": 1.0, "millimeter": 1.0, "millimetre": 1.0, "um": 1e-3, "µm": 1e-3, "\\u00B5m": 1e-3,
    "micron": 1e-3, "microns": 1e-3, "micrometer": 1e-3, "nm": 1e-6, "nanometer": 1e-6,
    "cm": 10.0, "centimeter": 10.0, "m": 1000.0, "meter": 1000.0,
}  # fmt: skip
_IMAGEJ_DTYPES = {np.dtype(t) for t in ("uint8", "uint16", "int16", "float32")}
_KEY = "data_tools"


def sniff(path: Path, head: bytes | None) -> str | None:
    """``"tiff"`` for classic or BigTIFF, either byte order, else None (``head`` None: a folder)."""
    if head is not None and head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


def _open(path: Path):
    import tifffile

    try:
        return tifffile.TiffFile(str(path))
    except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error...
        raise DataError(path, f"not a readable TIFF file ({exc})", "re-export the stack as TIFF") from None


@contextlib.contextmanager
def _damaged(path: Path):
    """A body that tifffile cannot decode (cut short, overwritten) is one DataError."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - tifffile raises ValueError, IndexError, struct.error...
        text = str(exc).strip().splitlines()
        raise DataError(path, f"the TIFF body is incomplete or damaged ({type(exc).__name__}: "
                        f"{text[0][:120] if text else ''})", "re-export or re-download the file") from None  # fmt: skip


def _zyx_series(path: Path, tif):
    """The first series and how to index it as (Z, Y, X): ``(series, squeeze_index)``."""
    series = tif.series[0]
    axes, shape = series.axes, tuple(series.shape)
    if "S" in axes and shape[axes.index("S")] > 1:
        raise DataError(path, f"is a colour stack (axes {axes}, shape {shape})", "save a single-channel grey stack")
    keep = [i for i, (a, n) in enumerate(zip(axes, shape)) if a in "YX" or n > 1]
    extra = [axes[i] for i in keep if axes[i] not in "YX"]
    if len(keep) != 3 or len(extra) != 1 or axes[keep[1]] != "Y" or axes[keep[2]] != "X":
        raise DataError(
            path,
            f"has axes {axes} with shape {shape}, expected a 3-D stack (Z, Y, X)",
            "save one channel / time point as a Z stack of 2-D pages",
        )
    index = tuple(slice(None) if i in keep else 0 for i in range(len(axes)))
    return series, index


def _spacing(path: Path, tif) -> tuple[tuple[float, float, float], np.ndarray | None, str]:
    ij = tif.imagej_metadata or {}
    ours = None
    if _KEY in ij:
        ours = json.loads(ij[_KEY])
    elif tif.shaped_metadata and _KEY in tif.shaped_metadata[0]:
        ours = tif.shaped_metadata[0][_KEY]
    if ours is not None:
        spacing = tuple(float(s) for s in ours["spacing"])
        return spacing, np.asarray(ours["affine"], float), "data_tools"  # type: ignore[return-value]
    page = tif.pages[0]
    tags = page.tags

    def per_unit(name):
        if name not in tags:
            return None
        num, den = tags[name].value
        return num / den if num and den else None

    xres, yres = per_unit("XResolution"), per_unit("YResolution")
    if ij:
        unit = _UNIT_MM.get(str(ij.get("unit", "mm")).strip().lower(), 1.0)
        dz = float(ij.get("spacing", 1.0)) * unit
        dy = unit / yres if yres else 1.0
        dx = unit / xres if xres else 1.0
        return (dz, dy, dx), None, "imagej"
    res_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if res_unit == 3 and xres and yres:  # pixels per centimetre
        return (1.0, 10.0 / yres, 10.0 / xres), None, "resolution tags (z spacing unknown: 1 mm)"
    return (1.0, 1.0, 1.0), None, "default"


def read(path: Path, *, series=None) -> Volume:
    """The stack with its spacing (``metadata["spacing_source"]`` says from where; ``series``: unused)."""
    with _open(path) as tif, _damaged(path):
        stack, index = _zyx_series(path, tif)
        data = stack.asarray()[index]
        spacing, affine, source = _spacing(path, tif)
    if affine is None:
        affine = default_affine(spacing)
    return Volume(
        np.ascontiguousarray(data),
        spacing=spacing,
        affine=affine,
        source_format="tiff",
        path=str(path),
        metadata={"spacing_source": source},
    )


def read_box(path: Path, box: Box, *, series=None) -> np.ndarray:
    """Only the box, reading only the pages of its z range when each page is one slice."""
    with _open(path) as tif, _damaged(path):
        stack, index = _zyx_series(path, tif)
        (z0, z1), (y0, y1), (x0, x1) = box
        data = _read_pages(tif, stack, index, z0, z1)
        return np.ascontiguousarray(data[:, y0:y1, x0:x1])


def _read_pages(tif, series, index, z0, z1) -> np.ndarray:
    """Only pages z0..z1 when each page is one z slice; else the whole series, sliced."""
    shape = tuple(n for n, i in zip(series.shape, index) if i == slice(None))
    pages = list(series.pages) if hasattr(series, "pages") else []
    if len(pages) == shape[0] and all(p is not None for p in pages[z0:z1]):
        return np.stack([p.asarray() for p in pages[z0:z1]]).reshape((z1 - z0, *shape[1:]))
    return series.asarray()[index][z0:z1]


def info(path: Path, *, series=None):
    """``(shape, dtype, spacing, affine)`` from the tags and metadata (``series``: unused)."""
    with _open(path) as tif, _damaged(path):
        stack, index = _zyx_series(path, tif)
        shape = tuple(n for n, i in zip(stack.shape, index) if i == slice(None))
        spacing, affine, _ = _spacing(path, tif)
        affine = affine if affine is not None else default_affine(spacing)
        return shape, np.dtype(stack.dtype), spacing_of(affine), affine


def write(volume: Volume, path: Path) -> Path:
    """ImageJ-compatible stack for uint8/uint16/int16/float32, a plain stack otherwise.

    Both carry exact spacing and affine in a ``data_tools`` JSON entry, plus resolution
    tags (pixels per mm) and, for ImageJ, ``spacing`` and ``unit=mm``.
    """
    import tifffile

    array = volume.array if volume.dtype != bool else volume.array.astype(np.uint8)
    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, array, **_options(volume, array.dtype))
    return Path(path)


def create(path: Path, shape, dtype, like: Volume) -> None:
    """An uncompressed, contiguous stack of zeros of ``shape`` (z, y, x) and ``dtype`` at
    ``path``, with the tags and metadata :func:`write` gives ``like``, for writers that fill
    it block by block (:func:`data_tools.blockfile.open_blocks`). Not atomic by itself:
    create it inside a staged folder."""
    import tifffile

    stack = tifffile.memmap(str(path), shape=tuple(int(n) for n in shape), dtype=np.dtype(dtype),
                            **_options(like, np.dtype(dtype)))  # fmt: skip
    stack.flush()
    del stack


def _options(volume: Volume, dtype: np.dtype) -> dict:
    """tifffile's keywords for a stack of ``dtype`` with ``volume``'s spacing and affine."""
    dz, dy, dx = volume.spacing
    ours = {"spacing": list(volume.spacing), "affine": np.asarray(volume.affine).tolist()}
    if dtype in _IMAGEJ_DTYPES:
        return dict(imagej=True, photometric="minisblack", resolution=(1.0 / dx, 1.0 / dy),
                    metadata={"axes": "ZYX", "spacing": dz, "unit": "mm", _KEY: json.dumps(ours)})  # fmt: skip
    return dict(photometric="minisblack",  # else 3 or 4 slices would be stored as RGB(A)
                resolution=(10.0 / dx, 10.0 / dy), resolutionunit="CENTIMETER",
                metadata={"axes": "ZYX", _KEY: ours})  # fmt: skip
