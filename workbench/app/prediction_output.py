"""The prediction file of a multi-process run, in the input's format family.

One process writes the prediction in the input's family (:func:`data_tools.io.write_prediction`:
NIfTI in, NIfTI out with the same affine; DICOM and MNI give NIfTI; TIFF, NRRD, MetaImage,
zarr and numpy their own). A multi-process run (:mod:`workbench.app.sharded`) writes the
same kind of file, each process its own blocks (:mod:`data_tools.blockfile`):

===========  ==============================================  =============================
prediction   how the processes write it                      host memory beyond the blocks
===========  ==============================================  =============================
``.nii``     in place, every process at its blocks' offsets  none
``.nii.gz``  ``.nii`` in place, then gzip-streamed by         a copy buffer (1 MiB)
             process 0
``.tif``     in place (uncompressed, contiguous)              none
``.npy``     in place                                         none
``.nrrd``,   ``.npy`` in place, then read whole and written   the whole label map (1 byte
``.mha``     by process 0 (SimpleITK, as one process)         per voxel) and ITK's copy
``.zarr``    one chunk per block (OME-Zarr)                   none
===========  ==============================================  =============================

``--output-format auto`` (the default) picks the input's family, except above
:data:`ZARR_ABOVE_VOXELS` voxels, where it writes zarr (one file per block: no
single-file limits, no pass by one process) and says so; any other choice is written as
asked, at any size.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["OUTPUT_FORMATS", "ZARR_ABOVE_VOXELS", "choose_suffix", "PredictionOutput"]

OUTPUT_FORMATS = ("auto", "nii.gz", "nii", "tif", "nrrd", "mha", "npy", "zarr")
ZARR_ABOVE_VOXELS = 1024**3  # 1 GiB of uint8 labels


def choose_suffix(output_format: str, source_format: str, shape) -> tuple[str, str | None]:
    """(the prediction's suffix, a line to tell the user or None) for ``--output-format``."""
    from data_tools.blockfile import prediction_suffix

    if output_format != "auto":
        return "." + output_format, None
    suffix = prediction_suffix(source_format)
    voxels = math.prod(int(n) for n in shape)
    if suffix != ".zarr" and voxels > ZARR_ABOVE_VOXELS:
        return ".zarr", (
            f"the prediction has {voxels:,} voxels (over {ZARR_ABOVE_VOXELS:,}): written as prediction.zarr, one "
            f"file per block; --output-format {suffix[1:]} writes {suffix} instead"
        )
    return suffix, None


class PredictionOutput:
    """``prediction<suffix>`` in a staged folder: :meth:`create` (process 0), :meth:`write`
    (every process, its own boxes), :meth:`finish` (process 0, after every process wrote)."""

    def __init__(self, folder: Path, suffix: str, shape, block, geometry, name: str = "prediction"):
        from data_tools.blockfile import staged_suffix

        self.final = Path(folder) / f"{name}{suffix}"
        self.staged = self.final if suffix == ".zarr" else Path(folder) / f"{name}{staged_suffix(suffix)}"
        self.shape, self.block, self.geometry = tuple(shape), tuple(block), geometry

    def create(self) -> None:
        if self.final.suffix == ".zarr":
            from data_tools.formats.zarr import create_ome_zarr

            create_ome_zarr(self.final, self.shape, dtype=np.uint8, spacing=self.geometry.spacing,
                            affine=self.geometry.affine, block=self.block)  # fmt: skip
        else:
            from data_tools.blockfile import create_block_file

            create_block_file(self.staged, self.shape, np.uint8, self.geometry)

    def write(self, box, block: np.ndarray) -> None:
        if self.final.suffix == ".zarr":
            from data_tools.formats.zarr import write_ome_block

            write_ome_block(self.final, box, block)
        else:
            from data_tools.blockfile import write_file_block

            write_file_block(self.staged, box, block)

    def finish(self) -> str:
        """Convert the staged file when the format is not written in place; the file's name."""
        from data_tools.blockfile import finish_block_file

        if self.final.suffix != ".zarr":
            finish_block_file(self.staged, self.final, self.geometry)
        return self.final.name
