"""Write a phantom block by block straight into an OME-Zarr store."""

from __future__ import annotations

import os

import numpy as np

from ..formats.zarr import OmeZarrWriter
from ..geometry import iter_blocks
from .anatomy import CLASS_NAMES
from .raster import check_shape, make_phantom_block, phantom_geometry, phantom_lesions

__all__ = ["write_phantom"]


def write_phantom(
    path: str | os.PathLike,
    shape,
    *,
    seed: int = 0,
    vessels: bool = True,
    chunks: int = 64,
    block: int = 128,
    levels: int | None = None,
):
    """Generate a phantom block by block straight into an OME-Zarr store.

    Peak extra memory is a few times one ``block``³ (a 512³ phantom with ``block=128``
    stays well under 2 GB); the store gets the image, its down-sampled levels and the
    labels (``labels/tissue``). Written atomically: a temporary folder is renamed.

    Returns
    -------
    pathlib.Path
        The store written.
    """
    shape = check_shape(shape)
    spacing, affine = phantom_geometry(shape)
    names = CLASS_NAMES if vessels else CLASS_NAMES[:3]
    with OmeZarrWriter(
        path,
        shape,
        dtype=np.float32,
        spacing=spacing,
        affine=affine,
        class_names=names,
        chunks=chunks,
        levels=levels,
        block=block,
        extra_attrs={"source_format": "phantom", "seed": int(seed), "lesions": phantom_lesions(shape, seed=seed)},
    ) as writer:
        for box in iter_blocks(shape, writer.block):
            image, labels = make_phantom_block(shape, box, seed=seed, vessels=vessels)
            writer.write_block(box, image, labels)
            del image, labels
    return writer.path
