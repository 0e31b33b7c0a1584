"""The one lookup of file formats: a name -> module table, one module per format.

Every module in :data:`MODULES` exposes the same names (:data:`INTERFACE`)::

    FORMATS                          the format names it reads (as detect_format says them)
    SUFFIXES                         output names it writes, by ending (DICOM: none)
    sniff(path, head) -> str | None  one of FORMATS, or None; head = first 1024 bytes
                                     of a file, None for a folder
    read(path, *, series=None) -> Volume
    read_box(path, box, *, series=None) -> ndarray     only the box (half-open, checked)
    info(path, *, series=None) -> (shape, dtype, spacing, affine)   without the voxels
    write(volume, path, **options) -> Path             atomic

``series`` picks a DICOM series; the other formats ignore it. The heavy libraries
(nibabel, pydicom, tifffile, SimpleITK, zarr) are imported only inside the functions that use
them, so importing this table is cheap. Adding a format = one module + one table row.

Examples
--------
>>> format_module("npz").__name__
'data_tools.formats.numpy'
>>> module_for_name("out.nii.gz").__name__
'data_tools.formats.nifti'
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from . import dicom, itk, nifti, numpy, tiff, zarr

__all__ = ["FORMATS", "INTERFACE", "MODULES", "format_module", "module_for_name"]

# In detection order: magic bytes and folder metadata first, DICOM (which walks a whole
# folder looking for DICM files) last.
MODULES: dict[str, ModuleType] = {
    "nifti": nifti, "numpy": numpy, "tiff": tiff, "itk": itk, "zarr": zarr, "dicom": dicom,
}  # fmt: skip
INTERFACE = ("FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write")
FORMATS = ("nifti", "dicom", "tiff", "nrrd", "metaimage", "zarr", "npy", "npz")
_BY_FORMAT = {fmt: module for module in MODULES.values() for fmt in module.FORMATS}
assert sorted(_BY_FORMAT) == sorted(FORMATS)


def format_module(name: str) -> ModuleType:
    """The module of a table name (``"numpy"``) or of a format name (``"npz"``)."""
    module = MODULES.get(name) or _BY_FORMAT.get(name)
    if module is None:
        raise KeyError(f"no format {name!r}; formats: {sorted(set(MODULES) | set(FORMATS))}")
    return module


def module_for_name(path: str | os.PathLike) -> ModuleType | None:
    """The module writing files named like ``path`` (by suffix), or None."""
    name = Path(path).name.lower()
    for module in MODULES.values():
        if any(name.endswith(suffix) for suffix in module.SUFFIXES):
            return module
    return None
