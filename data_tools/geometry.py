"""Voxel boxes: the one :data:`Box` type, checking a box against a shape, tiling a shape.

A box is ``((z0, z1), (y0, y1), (x0, x1))``, half-open voxel ranges per axis.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .errors import DataError

__all__ = ["Box", "as_box", "box_inside", "check_box", "iter_blocks", "spacing_of"]

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def as_box(box) -> tuple:
    """``box`` as a tuple of ``(int, int)`` pairs, or ``()`` when it is not pairs of numbers."""
    try:
        return tuple((int(a), int(b)) for a, b in box)
    except (TypeError, ValueError):
        return ()


def box_inside(box: tuple, shape) -> bool:
    """Whether ``box`` (from :func:`as_box`) has 3 non-empty ranges inside ``shape``."""
    return len(box) == 3 and all(0 <= a < b <= n for (a, b), n in zip(box, shape))


def check_box(where, box, shape) -> Box:
    """``box`` as ints, or a :class:`~data_tools.errors.DataError` about ``where``.

    Examples
    --------
    >>> check_box("scan.nii", [(0, 2), (0, 3), (1, 4)], (2, 3, 4))
    ((0, 2), (0, 3), (1, 4))
    """
    box = as_box(box)
    if not box_inside(box, shape):
        raise DataError(where, f"box={box!r} is not inside the volume of shape {tuple(shape)}",
                        "pass ((z0, z1), (y0, y1), (x0, x1)) with 0 <= start < stop <= size")  # fmt: skip
    return box  # type: ignore[return-value]


def iter_blocks(shape, block) -> Iterator[Box]:
    """Boxes tiling ``shape`` in C order with blocks of ``block`` voxels per axis.

    Examples
    --------
    >>> list(iter_blocks((3, 2, 2), (2, 2, 2)))
    [((0, 2), (0, 2), (0, 2)), ((2, 3), (0, 2), (0, 2))]
    """
    block = (block,) * 3 if isinstance(block, (int, np.integer)) else tuple(block)
    for z0 in range(0, shape[0], block[0]):
        for y0 in range(0, shape[1], block[1]):
            for x0 in range(0, shape[2], block[2]):
                yield (
                    (z0, min(z0 + block[0], shape[0])),
                    (y0, min(y0 + block[1], shape[1])),
                    (x0, min(x0 + block[2], shape[2])),
                )


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing ``(dz, dy, dx)`` in mm: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]
