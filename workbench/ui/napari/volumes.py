"""Volumes for the napari layers: large ones stay lazy, computed maps are built slab by slab.

Above :data:`LARGE_VOXELS` voxels an image or label volume becomes a multiscale pyramid of
strided views (no copy), and a computed map (shard ids, the halo band) a dask array
evaluated slice by slice. :func:`halo_band` is the map of the voxels each shard receives
from its neighbours. Pure numpy/dask: no Qt, no napari.
"""

from __future__ import annotations

import math

import numpy as np

from workbench.errors import UserError
from workbench.mesh import ShardLayout

__all__ = ["LARGE_VOXELS", "halo_band"]

LARGE_VOXELS = 256**3  # above this: multiscale views / lazy arrays, no whole-volume copies
_SLAB_VOXELS = 1 << 22  # temporaries of computed maps stay below ~16 MiB per array
_SAMPLE_VOXELS = 1 << 21  # contrast limits from a strided sample of about this many voxels
_NO_BOUNDARY = np.iinfo(np.int32).max


def _spacing(spacing) -> tuple[float, float, float]:
    values = tuple(float(s) for s in np.ravel(spacing))
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise UserError(f"spacing={spacing!r} must be 3 positive numbers (dz, dy, dx) in mm")
    return values


def _check_volume(array, name: str, shape=None) -> None:
    if np.ndim(array) != 3:
        raise UserError(
            f"{name} has {np.ndim(array)} dimensions {tuple(np.shape(array))}, expected 3 (Z, Y, X); "
            "pick one channel or time point first"
        )
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise UserError(
            f"{name} has shape {tuple(array.shape)} but the volume is {tuple(shape)}; "
            "pass arrays of the same run (crop padding first)"
        )


def _is_large(shape) -> bool:
    return math.prod(shape) > LARGE_VOXELS


def _pyramid(array, *, reduce: str = "stride") -> list:
    """Levels halving each side until the largest is <= 256 (views or lazy, never copies)."""
    levels = [array]
    while max(levels[-1].shape[:3]) > 256:
        prev = levels[-1]
        if reduce == "max":
            import dask.array as da

            lazy = prev if isinstance(prev, da.Array) else da.from_array(prev, chunks=(64, -1, -1))
            trim = tuple(s - s % 2 for s in lazy.shape)
            lazy = lazy[: trim[0], : trim[1], : trim[2]]
            levels.append(da.coarsen(np.max, lazy, {0: 2, 1: 2, 2: 2}))
        else:
            levels.append(prev[::2, ::2, ::2])
    return levels


def _maybe_multiscale(array, kwargs: dict, *, reduce: str = "stride"):
    if _is_large(array.shape):
        kwargs["multiscale"] = True
        return _pyramid(array, reduce=reduce)
    return array


def _computed_volume(shape, dtype, fn, box=None):
    """A (Z, Y, X) map ``fn(zs, ys, xs)`` of 1-D index arrays: numpy, or dask when large;
    with ``box`` only that sub-block (numpy)."""
    if box is not None:
        return fn(*(np.arange(lo, hi) for lo, hi in box))
    if not _is_large(shape):
        return fn(*(np.arange(s) for s in shape))
    import dask.array as da

    rows = max(1, _SLAB_VOXELS // (shape[1] * shape[2]))

    def block(block_info=None):
        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        return fn(np.arange(z0, z1), np.arange(y0, y1), np.arange(x0, x1))

    chunks = da.core.normalize_chunks((rows, shape[1], shape[2]), shape=tuple(shape))
    return da.map_blocks(block, dtype=dtype, chunks=chunks, meta=np.empty((0, 0, 0), dtype))


def _percentile_limits(array, percentiles=(0.5, 99.5)) -> list[float]:
    step = max(1, math.ceil((math.prod(array.shape) / _SAMPLE_VOXELS) ** (1 / 3)))
    sample = np.asarray(array[::step, ::step, ::step], np.float32)
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if not hi > lo:
        lo, hi = float(sample.min()), float(sample.max())
    if not hi > lo:
        hi = lo + 1.0
    return [lo, hi]


def _axis_halo(n: int, block: int, mesh: int, width: int):
    """Per position along one axis: distance to the nearest inner boundary (0 = adjacent
    voxel) and the step (+1/-1) to the shard across it that receives the voxel."""
    pos = np.arange(n)
    dist = np.full(n, _NO_BOUNDARY, np.int32)
    step = np.zeros(n, np.int32)
    for k in range(1, mesh):
        b = k * block
        if b >= n:  # the shard beyond holds only padding
            break
        d = np.where(pos < b, b - 1 - pos, pos - b)
        closer = d < dist
        dist = np.where(closer, d, dist)
        step = np.where(closer, np.where(pos < b, 1, -1), step)
    return dist, step


def halo_band(layout: ShardLayout, width: int, *, shard: int | None = None, box=None):
    """Map of the voxels shards receive from their neighbours (level 0), as labels.

    ``shard=None``: every voxel within ``width`` of an inner shard boundary, valued
    ``receiving shard index + 1`` (the shard across the nearest boundary; voxels near
    edges and corners are also received diagonally). ``shard=i``: the exact shell shard
    ``i`` receives, its box grown by ``width`` and clipped to the volume, minus its own
    box; valued ``i + 1``. 0 elsewhere. Numpy, or dask for large volumes; with ``box``
    (``((z0, z1), (y0, y1), (x0, x1))``) only that sub-block, always numpy (a viewer's slice).
    """
    if not isinstance(width, (int, np.integer)) or width < 1:
        raise UserError(f"halo band width {width!r} must be an integer >= 1 (halo modes without "
                         "exchange receive nothing; skip the band for them)")  # fmt: skip
    shards = layout.shards()
    n = len(shards)
    dtype = np.uint8 if n < 255 else np.uint16
    if shard is not None:
        if not 0 <= shard < n:
            raise UserError(f"shard={shard} is not a shard of mesh {layout.mesh}; use 0..{n - 1}")
        own_box = shards[shard].valid_box

        def shell(*axes):
            inside = [((a >= lo) & (a < hi)) for a, (lo, hi) in zip(axes, own_box)]
            grown = [((a >= lo - width) & (a < hi + width)) for a, (lo, hi) in zip(axes, own_box)]
            own = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
            near = grown[0][:, None, None] & grown[1][None, :, None] & grown[2][None, None, :]
            return ((near & ~own) * (shard + 1)).astype(dtype)

        return _computed_volume(layout.volume_shape, dtype, shell, box)

    per_axis = [_axis_halo(s, b, m, width) for s, b, m in
                zip(layout.volume_shape, layout.block_shape, layout.mesh.spatial)]  # fmt: skip
    strides = (layout.mesh.y * layout.mesh.x, layout.mesh.x, 1)

    def band(zs, ys, xs):
        d, shift, base = [], [], 0
        for axis, idx in enumerate((zs, ys, xs)):
            shape = [1, 1, 1]
            shape[axis] = len(idx)
            dist, step = per_axis[axis]
            d.append(dist[idx].reshape(shape))
            shift.append((step[idx] * strides[axis]).reshape(shape))
            base = base + (idx // layout.block_shape[axis] * strides[axis]).reshape(shape)
        nearest = np.minimum(np.minimum(d[0], d[1]), d[2])  # ties: z before y before x
        receiver = base + np.where(d[0] == nearest, shift[0], np.where(d[1] == nearest, shift[1], shift[2]))
        return np.where(nearest < width, receiver + 1, 0).astype(dtype)

    return _computed_volume(layout.volume_shape, dtype, band, box)
