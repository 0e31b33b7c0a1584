"""NIfTI-1/2 (``.nii``, ``.nii.gz``) with nibabel: (i, j, k) on disk <-> (z, y, x) in memory.

Detected by the header (size 348 or 540 and the ``n+1``/``ni1``/``n+2``/``ni2`` magic),
also inside gzip. :func:`read_box` slices through nibabel: memory-mapped for ``.nii``,
streamed up to the block for ``.nii.gz``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import DataError
from ..geometry import Box, spacing_of
from ..volume import Volume, ijk_affine_from_zyx, zyx_affine_from_ijk

__all__ = ["FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write", "create", "data_offset", "header"]

FORMATS = ("nifti",)
SUFFIXES = (".nii.gz", ".nii")

_TRUNCATED = (
    "truncated gzip stream (file is incomplete)",
    "re-export or re-download the file",
)
_SHORT = (
    "the file is shorter than its header says (truncated or damaged)",
    "re-export or re-download the file",
)


# -- detection --------------------------------------------------------------------------
def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def _gunzip_head(path: Path, n: int = 600) -> bytes:
    with open(path, "rb") as f:
        raw = f.read(64 * 1024)
    try:
        d = zlib.decompressobj(31)
        return d.decompress(raw, n)
    except zlib.error:
        raise DataError(path, "damaged gzip stream", "re-export or re-download the file") from None


def sniff(path: Path, head: bytes | None) -> str | None:
    """``"nifti"`` for a NIfTI file (plain or gzip), else None (``head`` None: a folder)."""
    if head is None:
        return None
    if head[:2] == b"\x1f\x8b":
        head = _gunzip_head(path)
    return "nifti" if _is_nifti_header(head) else None


# -- reading ----------------------------------------------------------------------------
def _load(path: Path):
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        return nib.load(str(path))
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise DataError(path, *_TRUNCATED) from None
    except ImageFileError as exc:
        raise DataError(path, f"not a readable NIfTI file ({exc})", "check that the file is a NIfTI image") from None


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        return shape[:3]  # type: ignore[return-value]
    if len(shape) < 3:
        raise DataError(
            path,
            f"the image has {len(shape)} dimensions {shape}, expected 3",
            "pass a 3-D volume (a single slice cannot be segmented in 3-D)",
        )
    raise DataError(
        path,
        f"the image has {len(shape)} dimensions {shape}, expected one 3-D volume",
        "pick a volume first, e.g. nibabel.four_to_three(img)[0] or `fslroi in.nii.gz out.nii.gz 0 1`, "
        "and read that file",
    )


def _read_data(path: Path, img, index=None) -> np.ndarray:
    """On-disk (i, j, k) data (or ``dataobj[index]``), unscaled when scaling is identity."""
    proxy = img.dataobj
    slope, inter = float(proxy.slope), float(proxy.inter)
    try:
        # identity scaling: nibabel returns the on-disk dtype untouched
        data = np.asarray(proxy) if index is None else np.asarray(proxy[index])
        if not data.dtype.isnative:  # big-endian files: native order for everything downstream
            data = data.astype(data.dtype.newbyteorder("="))
        if slope == 1.0 and inter == 0.0:
            return data
        return data.astype(np.float32, copy=False)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise DataError(path, *_TRUNCATED) from None
    except OSError as exc:
        if "Expected" in str(exc) or "bytes" in str(exc):
            raise DataError(path, *_SHORT) from None
        raise


def read(path: Path, *, series=None) -> Volume:
    """The image with its affine; ``metadata["nifti_header"]`` keeps the header (``series``: unused)."""
    img = _load(path)
    spatial = _spatial_shape(path, tuple(int(s) for s in img.shape))
    data = _read_data(path, img)
    data = data.reshape(spatial, order="F") if data.ndim != 3 else data
    affine = zyx_affine_from_ijk(img.affine)
    spacing = spacing_of(affine)
    header = img.header.copy()
    return Volume(
        data.transpose(2, 1, 0),
        spacing=spacing,  # type: ignore[arg-type]
        affine=affine,
        source_format="nifti",
        path=str(path),
        metadata={
            "nifti_header": header,
            "nifti_shape": spatial,
            "on_disk_dtype": str(header.get_data_dtype()),
            "qform_code": int(header["qform_code"]),
            "sform_code": int(header["sform_code"]),
        },
    )


def read_box(path: Path, box: Box, *, series=None) -> np.ndarray:
    """Only the (z, y, x) box: nibabel slices the file (memory-mapped when uncompressed)."""
    img = _load(path)
    spatial = _spatial_shape(path, tuple(int(s) for s in img.shape))
    (z0, z1), (y0, y1), (x0, x1) = box
    index = (slice(x0, x1), slice(y0, y1), slice(z0, z1)) + (0,) * (len(img.shape) - 3)
    del spatial
    return np.ascontiguousarray(_read_data(path, img, index).transpose(2, 1, 0))


def header(path: Path):
    """The file's NIfTI header (read alone), as ``read`` keeps it in ``metadata["nifti_header"]``."""
    return _load(path).header.copy()


def info(path: Path, *, series=None):
    """``(shape, dtype, spacing, affine)`` from the header (``series``: unused)."""
    img = _load(path)
    i, j, k = _spatial_shape(path, tuple(int(s) for s in img.shape))
    proxy = img.dataobj
    dtype = img.get_data_dtype() if (proxy.slope == 1 and proxy.inter == 0) else np.dtype(np.float32)
    affine = zyx_affine_from_ijk(img.affine)
    return (k, j, i), np.dtype(dtype), spacing_of(affine), affine


# -- writing ----------------------------------------------------------------------------


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype == np.int64:
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
            return array.astype(np.int32)
    if array.dtype == np.uint64 and (array.max() if array.size else 0) <= np.iinfo(np.uint32).max:
        return array.astype(np.uint32)
    return array


def write(volume: Volume, path: Path) -> Path:
    """Write ``volume`` as NIfTI with its affine; keeps a source NIfTI header's codes/units."""
    img = _image(_storable(volume.array).transpose(2, 1, 0), volume)  # (i, j, k), a view
    with atomic_output(path) as tmp:
        img.to_filename(str(tmp))
    return Path(path)


def create(path: Path, shape, dtype, like: Volume) -> int:
    """An uncompressed ``.nii`` at ``path`` holding zeros of ``shape`` (z, y, x) and ``dtype``,
    with the header :func:`write` gives ``like`` (its affine, a source header's codes), for
    writers that fill it block by block (:func:`data_tools.blockfile.open_blocks`); returns
    the data's byte offset. Not atomic by itself: create it inside a staged folder."""
    zeros = np.broadcast_to(np.zeros((), dtype), tuple(int(n) for n in shape)[::-1])  # (i, j, k), no memory
    _image(zeros, like).to_filename(str(path))  # nibabel writes it slice by slice
    return data_offset(path)


def data_offset(path: Path) -> int:
    """The byte offset of an uncompressed NIfTI file's voxels."""
    return int(_load(path).dataobj.offset)


def _image(data: np.ndarray, volume: Volume):
    """The nibabel image :func:`write` saves: ``data`` (i, j, k) with ``volume``'s affine and
    source header."""
    import nibabel as nib

    header = volume.metadata.get("nifti_header")
    image_class = nib.Nifti1Image
    if isinstance(header, nib.Nifti2Header):
        image_class = nib.Nifti2Image
    elif not isinstance(header, nib.Nifti1Header):
        header = None
    if header is not None:
        header = header.copy()
        header.set_data_dtype(data.dtype)
        header["scl_slope"], header["scl_inter"] = np.nan, np.nan
    img = image_class(data, ijk_affine_from_zyx(volume.affine), header=header, dtype=data.dtype)
    if header is None:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    return img
