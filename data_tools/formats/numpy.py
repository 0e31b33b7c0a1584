"""``.npy`` (one array, 1 mm spacing) and ``.npz`` (image plus geometry and labels).

An ``.npz`` written here holds ``image`` and, when known, ``labels``, ``spacing``,
``affine`` and ``class_names``. Reading takes ``image`` (or the only array, or
``arr_0``). A ``.npy`` holds only the array: spacing is 1 mm and the affine the default.

One module, two formats: ``npy`` (``\\x93NUMPY``) and ``npz`` (a zip); every function
tells them apart by the first bytes of the file (writing: by the suffix).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import DataError
from ..geometry import Box
from ..volume import Volume, default_affine

__all__ = ["FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write", "npz_members", "read_member_box"]

FORMATS = ("npy", "npz")
SUFFIXES = (".npy", ".npz")
_MAGIC = {b"\x93NUMPY": "npy", b"PK\x03\x04": "npz"}


def sniff(path: Path, head: bytes | None) -> str | None:
    """``"npy"`` or ``"npz"`` from the first bytes, else None (``head`` None: a folder)."""
    if head is None:
        return None
    return next((fmt for magic, fmt in _MAGIC.items() if head.startswith(magic)), None)


def _is_npz(path: Path) -> bool:
    with open(path, "rb") as f:
        return sniff(path, f.read(6)) == "npz"


def _load(path: Path, mmap: bool = False):
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc):
            raise DataError(path, "holds Python objects (a pickled array), not numbers",
                            "save a numeric array with np.save") from None  # fmt: skip
        raise DataError(path, f"not a readable numpy file ({exc})", "re-save it with np.save / np.savez") from None
    except (EOFError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"not a readable numpy file, truncated? ({exc})",
                        "re-save it with np.save / np.savez") from None  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a damaged header (numpy parses it with tokenize/ast)
        raise DataError(path, f"has a damaged .npy header ({type(exc).__name__})",
                        "re-save it with np.save / np.savez") from None  # fmt: skip


def read(path: Path, *, series=None) -> Volume:
    """The ``.npy`` array (1 mm) or the ``.npz`` image with its geometry (``series``: unused)."""
    if _is_npz(path):
        return _read_npz(path)
    return Volume(np.asarray(_load(path)), source_format="npy", path=str(path))


def read_box(path: Path, box: Box, *, series=None) -> np.ndarray:
    """Only the box: memory-mapped for ``.npy``; the ``.npz`` image as :func:`read_member_box`."""
    if not _is_npz(path):
        return _npy_box(path, box)
    return read_member_box(path, box, None)


def read_member_box(path: Path, box: Box, member: str | None) -> np.ndarray:
    """Only the box of ``.npz`` array ``member`` (None: the image): memory-mapped when the
    member is stored uncompressed; a compressed member is decompressed as a stream up to the
    box's last z row, keeping only the box's z slab (memory of the slab, time of
    decompressing up to it)."""
    with _open_zip(path) as zf:
        name = member if member is not None else _npz_image_key(path, _zip_keys(zf))
        return _member_box(path, zf, name, box)


def info(path: Path, *, series=None):
    """``(shape, dtype, spacing, affine)``: the ``.npy`` header, or the ``.npz`` image
    member's header and its (small) geometry arrays."""
    if _is_npz(path):
        with _open_zip(path) as zf:
            shape, dtype, _ = _member_header(path, zf, _npz_image_key(path, _zip_keys(zf)))
        with _load(path) as npz:
            keys = list(npz.files)
            spacing = tuple(float(s) for s in npz["spacing"]) if "spacing" in keys else (1.0, 1.0, 1.0)
            affine = np.asarray(npz["affine"], np.float64) if "affine" in keys else default_affine(spacing)
        return shape, dtype, spacing, affine
    return _npy_info(path)


def npz_members(path: Path) -> dict:
    """``{name: (shape, dtype)}`` of the arrays of an ``.npz``, from their headers only."""
    with _open_zip(path) as zf:
        return {k: _member_header(path, zf, k)[:2] for k in _zip_keys(zf)}


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(path, f"not a readable numpy file, truncated? ({exc})",
                        "re-save it with np.save / np.savez") from None  # fmt: skip


def _zip_keys(zf: zipfile.ZipFile) -> list[str]:
    return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _member_header(path: Path, zf: zipfile.ZipFile, name: str):
    """``(shape, dtype, fortran_order)`` of member ``name`` (its .npy header only)."""
    if name + ".npy" not in zf.namelist():
        raise DataError(path, f"holds no array named {name!r} (it holds {_zip_keys(zf)})",
                        f"save it with np.savez(path, image=..., {name}=...)")  # fmt: skip
    try:
        with zf.open(name + ".npy") as f:
            shape, fortran, dtype = _npy_header(f)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(path, f"member {name!r} has a damaged .npy header ({exc})",
                        "re-save it with np.savez") from None  # fmt: skip
    return tuple(int(s) for s in shape), np.dtype(dtype), bool(fortran)


def _npy_header(f):
    """``(shape, fortran_order, dtype)`` of a .npy stream, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _member_box(path: Path, zf: zipfile.ZipFile, name: str, box) -> np.ndarray:
    shape, dtype, fortran = _member_header(path, zf, name)
    if len(shape) != 3:
        raise DataError(path, f"array {name!r} has shape {shape}, expected 3-D (Z, Y, X)", "save a 3-D array")
    sl = tuple(slice(a, b) for a, b in box)
    entry = zf.getinfo(name + ".npy")
    with zf.open(entry) as f:
        _npy_header(f)
        header = f.tell()
    if entry.compress_type == zipfile.ZIP_STORED:  # memory-map the member's bytes in the zip
        with open(path, "rb") as raw:
            raw.seek(entry.header_offset)
            local = raw.read(30)
            start = (
                entry.header_offset
                + 30
                + int.from_bytes(local[26:28], "little")
                + int.from_bytes(local[28:30], "little")
            )
        mm = np.memmap(path, dtype=dtype, mode="r", offset=start + header, shape=shape, order="F" if fortran else "C")
        return np.array(mm[sl])
    if fortran:  # the z rows are not contiguous: the whole member, then the slice
        with _load(path) as npz:
            return np.ascontiguousarray(npz[name][sl])
    row = int(np.prod(shape[1:])) * dtype.itemsize
    (z0, z1) = box[0]
    with zf.open(entry) as f:
        f.seek(header)
        skip = z0 * row
        while skip:  # decompress and drop the rows before the slab
            chunk = f.read(min(skip, 1 << 16))
            if not chunk:
                break
            skip -= len(chunk)
        data = f.read((z1 - z0) * row)
    if len(data) != (z1 - z0) * row:
        raise DataError(path, f"member {name!r} is truncated", "re-save it with np.savez")
    slab = np.frombuffer(data, dtype=dtype).reshape((z1 - z0, *shape[1:]))
    return np.ascontiguousarray(slab[:, sl[1], sl[2]])


def write(volume: Volume, path: Path) -> Path:
    """``.npz`` (image, labels, geometry) when the name ends in ``.npz``, else ``.npy`` (array only)."""
    return (_write_npz if Path(path).name.lower().endswith(".npz") else _write_npy)(volume, path)


def _npy_box(path: Path, box) -> np.ndarray:
    """Only the box, through a read-only memory map."""
    mm = _load(path, mmap=True)
    if mm.ndim != 3:
        raise DataError(path, f"array has shape {mm.shape}, expected 3-D (Z, Y, X)", "save a 3-D array")
    return np.array(mm[tuple(slice(a, b) for a, b in box)])


def _npy_info(path: Path):
    mm = _load(path, mmap=True)
    if mm.ndim != 3:
        raise DataError(path, f"array has shape {mm.shape}, expected 3-D (Z, Y, X)", "save a 3-D array")
    return tuple(int(s) for s in mm.shape), np.dtype(mm.dtype), (1.0, 1.0, 1.0), default_affine((1.0, 1.0, 1.0))


def _npz_image_key(path: Path, keys: list[str]) -> str:
    if "image" in keys:
        return "image"
    arrays = [k for k in keys if k not in ("labels", "spacing", "affine", "class_names")]
    if len(arrays) == 1:
        return arrays[0]
    raise DataError(path, f"holds arrays {keys} and none is named 'image'",
                    "save the volume under the key 'image', e.g. np.savez(path, image=array)")  # fmt: skip


def _read_npz(path: Path) -> Volume:
    with _load(path) as npz:
        keys = list(npz.files)
        image = npz[_npz_image_key(path, keys)]
        labels = npz["labels"] if "labels" in keys else None
        spacing = tuple(float(s) for s in npz["spacing"]) if "spacing" in keys else (1.0, 1.0, 1.0)
        affine = npz["affine"] if "affine" in keys else None
        names = tuple(str(n) for n in npz["class_names"]) if "class_names" in keys else None
    return Volume(image, spacing=spacing, affine=affine, source_format="npz", labels=labels,  # type: ignore[arg-type]
                  class_names=names, path=str(path))  # fmt: skip


def _write_npy(volume: Volume, path: Path) -> Path:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, volume.array)
    return Path(path)


def _write_npz(volume: Volume, path: Path) -> Path:
    items = {"image": volume.array, "spacing": np.asarray(volume.spacing), "affine": volume.affine}
    if volume.labels is not None:
        items["labels"] = volume.labels
    if volume.class_names is not None:
        items["class_names"] = np.asarray(volume.class_names, dtype=str)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **items)
    return Path(path)
