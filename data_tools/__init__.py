"""data_tools: numpy-only volume I/O, phantoms and preprocessing (no JAX).

Everything is imported lazily, so ``import data_tools`` costs almost nothing::

    from data_tools import Volume, load_input, make_phantom, read_volume, write_prediction

Modules (imports flow one way, top to bottom)::

    datasets      MSD / nnU-Net dataset folders: dataset.json, pairing, checks, 5-fold split
    io            public entry points: detect, read, read_box, info, write, CLI specs
    synthetic     phantoms: anatomy (random, in mm) -> raster (blocks) -> write (OME-Zarr)
    samples       the MNI152 template
    formats       the format table: nifti, numpy (npy, npz), tiff, zarr, dicom
    preprocess    windowing, normalisation, resampling, padding
    atomic        atomic writes (atomic_output, write_text_atomic)
    geometry      the Box type, check_box, iter_blocks
    volume        the Volume
    errors        DataError, MissingDataError
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Volume": "volume",
    "DataError": "errors",
    "MissingDataError": "errors",
    "read_volume": "io",
    "write_volume": "io",
    "read_box": "io",
    "volume_info": "io",
    "detect_format": "io",
    "load_input": "io",
    "write_prediction": "io",
    "write_dicom_series": "io",
    "open_dataset": "datasets",
    "write_phantom_dataset": "datasets",
    "make_phantom": "synthetic",
    "make_phantom_block": "synthetic",
    "write_phantom": "synthetic",
    "phantom_lesions": "synthetic",
    "load_mni": "samples",
    "window": "preprocess",
    "zscore": "preprocess",
    "percentile_normalise": "preprocess",
    "resample": "preprocess",
    "pad_to_multiple": "preprocess",
    "crop_padding": "preprocess",
}
_MODULES = ("volume", "errors", "geometry", "atomic", "io", "formats", "synthetic", "samples", "preprocess", "datasets")

__all__ = [
    "DataError",
    "MissingDataError",
    "Volume",
    "crop_padding",
    "detect_format",
    "load_input",
    "load_mni",
    "make_phantom",
    "make_phantom_block",
    "open_dataset",
    "pad_to_multiple",
    "percentile_normalise",
    "phantom_lesions",
    "read_box",
    "read_volume",
    "resample",
    "volume_info",
    "window",
    "write_dicom_series",
    "write_phantom",
    "write_phantom_dataset",
    "write_prediction",
    "write_volume",
    "zscore",
]
assert sorted(_EXPORTS) == __all__


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'data_tools' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .datasets import open_dataset, write_phantom_dataset
    from .errors import DataError, MissingDataError
    from .io import (
        detect_format,
        load_input,
        read_box,
        read_volume,
        volume_info,
        write_dicom_series,
        write_prediction,
        write_volume,
    )
    from .preprocess import crop_padding, pad_to_multiple, percentile_normalise, resample, window, zscore
    from .samples import load_mni
    from .synthetic import make_phantom, make_phantom_block, phantom_lesions, write_phantom
    from .volume import Volume
