"""Files that several processes write block by block: the prediction of a multi-process run.

One process writes a whole volume through :func:`data_tools.io.write_prediction`; several
processes (each holding only its own blocks) write the same file this way:

1. one process (process 0) calls :func:`create_block_file` in a staged folder: an
   uncompressed file whose voxels are one contiguous C-order (Z, Y, X) array at a byte
   offset, filled with zeros, with the header the one-process writer gives (NIfTI ``.nii``,
   TIFF ``.tif``, ``.npy``);
2. every process writes its own boxes into it in place (:func:`write_file_block`: a
   memory map of the file, so a process holds only the pages of its blocks);
3. once every process has written (a barrier), process 0 calls :func:`finish_block_file`,
   which turns it into the asked-for file when that is not written in place: ``.nii.gz``
   (the ``.nii`` gzip-compressed as a stream, a buffer's memory), NRRD / MetaImage (read
   whole by process 0 and written by SimpleITK, as one process does: the whole label map
   in process 0's memory).

Geometry (affine, spacing, a NIfTI input's header codes, ITK's origin / spacing /
direction) comes from :func:`prediction_geometry` of the input's headers, so it equals what
the one-process writer gives. Nothing here is atomic by itself: the staged folder is
renamed into place when complete (:func:`workbench.app.results.finish_staged`).

Concurrent writes of disjoint byte ranges of one file are safe on local and cluster file
systems (Lustre, GPFS, BeeGFS); NFS clients may cache whole pages, so on NFS prefer
``--output-format zarr`` (one file per block).
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = [
    "FAMILY",
    "WRITTEN_IN_PLACE",
    "Geometry",
    "prediction_suffix",
    "prediction_geometry",
    "staged_suffix",
    "create_block_file",
    "write_file_block",
    "finish_block_file",
]

# The prediction's suffix for each input format (the one-process writer's choice).
FAMILY = {"nifti": ".nii.gz", "dicom": ".nii.gz", "mni": ".nii.gz", "zarr": ".zarr", "tiff": ".tif",
          "nrrd": ".nrrd", "metaimage": ".mha", "npy": ".npy", "npz": ".npy", "phantom": ".npy",
          "array": ".npy"}  # fmt: skip
# Suffixes whose file every process fills in place; the others are staged as one of these
# (:func:`staged_suffix`) and converted by :func:`finish_block_file`.
WRITTEN_IN_PLACE = (".nii", ".tif", ".npy")
_STAGED_AS = {".nii.gz": ".nii", ".nrrd": ".npy", ".mha": ".npy"}
_GZIP_LEVEL = 1  # nibabel's default for .nii.gz, as the one-process writer uses
_COPY_BYTES = 1 << 20


@dataclass
class Geometry:
    """What a prediction inherits from its input: spacing (dz, dy, dx), the (z, y, x) affine
    and format metadata (``nifti_header``, ``itk_geometry``), as a :class:`~data_tools.volume.Volume`
    holds them."""

    spacing: tuple
    affine: np.ndarray
    metadata: dict = field(default_factory=dict)


def prediction_suffix(source_format: str) -> str:
    """The suffix one process writes a prediction of an input of ``source_format`` with."""
    return FAMILY.get(source_format, ".npy")


def prediction_geometry(source, info) -> Geometry:
    """The :class:`Geometry` of a prediction of ``source`` (a path or spec) whose header
    says ``info`` (:class:`data_tools.io.VolumeInfo`); headers only."""
    meta = {}
    fmt = info.source_format
    if fmt in ("nifti", "mni"):
        from .formats import nifti

        if fmt == "mni":  # the template's own header, as load_mni keeps it
            from .samples import mni_files

            source = mni_files()["t1"]
        meta["nifti_header"] = nifti.header(Path(source))
    elif fmt in ("nrrd", "metaimage"):
        from .formats import itk

        meta["itk_geometry"] = itk.geometry(Path(source))
    return Geometry(tuple(float(s) for s in info.spacing), np.asarray(info.affine, np.float64), meta)


def staged_suffix(suffix: str) -> str:
    """The suffix of the file the processes fill for a final ``suffix`` (itself when written in place)."""
    if suffix in WRITTEN_IN_PLACE:
        return suffix
    if suffix not in _STAGED_AS:
        raise DataError("output", f"{suffix} cannot be written block by block",
                        f"use one of {', '.join(WRITTEN_IN_PLACE + tuple(_STAGED_AS))} or .zarr")  # fmt: skip
    return _STAGED_AS[suffix]


def create_block_file(path: str | os.PathLike, shape, dtype, like: Geometry) -> Path:
    """Create the zero-filled file at ``path`` (``.nii``, ``.tif`` or ``.npy``) that
    :func:`write_file_block` fills; its header is the one-process writer's for ``like``."""
    path = Path(path)
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    if path.name.endswith(".nii"):
        from .formats import nifti

        nifti.create(path, shape, dtype, like)
    elif path.name.endswith(".tif"):
        from .formats import tiff

        tiff.create(path, shape, dtype, like)
    elif path.name.endswith(".npy"):
        np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    else:
        raise DataError(path, "is not written block by block", f"name it with one of {WRITTEN_IN_PLACE}")
    return path


def _open(path: Path) -> np.ndarray:
    """A writable (Z, Y, X) memory map of a file from :func:`create_block_file`."""
    if path.name.endswith(".nii"):
        from .formats import nifti

        (z, y, x), dtype, _, _ = nifti.info(path)
        return np.memmap(path, dtype=dtype, mode="r+", offset=nifti.data_offset(path), shape=(z, y, x))
    if path.name.endswith(".tif"):
        import tifffile

        return tifffile.memmap(str(path), mode="r+")
    return np.load(path, mmap_mode="r+")


def write_file_block(path: str | os.PathLike, box, block: np.ndarray) -> None:
    """Write ``block`` at ``box`` ((z0, z1), (y0, y1), (x0, x1)) of a file from
    :func:`create_block_file`, in place; flushed before returning."""
    stack = _open(Path(path))
    if tuple(block.shape) != tuple(hi - lo for lo, hi in box):
        raise ValueError(f"block of shape {block.shape} does not fill box {box}")
    stack[tuple(slice(lo, hi) for lo, hi in box)] = block
    stack.flush()
    del stack


def finish_block_file(staged: str | os.PathLike, final: str | os.PathLike, like: Geometry) -> Path:
    """Turn a filled ``staged`` file into ``final`` (see the module notes) and remove it;
    ``final`` is ``staged`` itself for a file written in place."""
    staged, final = Path(staged), Path(final)
    if staged == final:
        return final
    if final.name.endswith(".nii.gz") and staged.name.endswith(".nii"):
        with open(staged, "rb") as src, open(final, "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0) as dst:
                shutil.copyfileobj(src, dst, _COPY_BYTES)
    elif final.name.endswith((".nrrd", ".mha")) and staged.name.endswith(".npy"):
        from .formats import itk
        from .volume import Volume

        array = np.load(staged)  # whole: SimpleITK writes an image it holds
        itk.write(Volume(array, spacing=like.spacing, affine=like.affine, metadata=dict(like.metadata)), final)
    else:
        raise DataError(final, f"cannot be made from {staged.name}", "stage it as staged_suffix() says")
    staged.unlink()
    return final
