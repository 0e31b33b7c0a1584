"""Synthetic CT-like abdominal phantoms with labels, at any resolution, block by block.

Modules: :mod:`.anatomy` (the random anatomy in mm, per seed), :mod:`.raster` (samples it
on a grid, block by block) and :mod:`.write` (streams a phantom into OME-Zarr).

The anatomy is defined once per seed in continuous millimetres inside a
``FIELD_OF_VIEW_MM``-wide cube (400 mm, axes z, y, x; z = 0 is inferior) and
rasterised at voxel centres, so the same seed gives the same anatomy at 128³ and 256³
(only the sampling differs). What is in it:

- air around a body (a deformed elliptic cylinder) with a fat layer over soft tissue;
- a liver-like organ (smooth union of two deformed ellipsoids), spleen, two kidneys,
  lung bases, a vertebral column with discs, the aorta;
- a branching tree of hepatic vessels (tubes tapering from 6 mm to ~1 mm) inside the liver;
- ten spherical lesions inside the liver, diameters 2 to 16 voxels *at 128³*
  (6 to 50 mm), so the smallest vanish when the volume is down-sampled;
- Hounsfield-like intensities per tissue, partial-volume edges, a smooth multiplicative
  drift of the attenuation (at most ±2.4 %, i.e. about ±25 HU in the liver: CT numbers are
  calibrated, so the drift stays at the scale of cupping and scatter artefacts, unlike an
  MRI bias field) and per-voxel noise hashed from (seed, shape, voxel index).

Labels: 0 background, 1 organ (the liver), 2 lesion, 3 vessel (hepatic vessels and
aorta; ``vessels=False`` folds them into 1 inside the liver and 0 outside). Spleen,
kidneys, lungs and bone are present in the image but unlabelled (background).

Every voxel depends only on its own position, so :func:`make_phantom_block` of a box is
exactly the same slice of :func:`make_phantom`, and costs only that box.
"""

from __future__ import annotations

from .anatomy import CLASS_NAMES, FIELD_OF_VIEW_MM, Lesion
from .raster import make_phantom, make_phantom_block, phantom_geometry, phantom_lesions
from .write import write_phantom

__all__ = [
    "FIELD_OF_VIEW_MM",
    "CLASS_NAMES",
    "Lesion",
    "make_phantom",
    "make_phantom_block",
    "write_phantom",
    "phantom_lesions",
    "phantom_geometry",
]
