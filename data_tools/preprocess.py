"""Intensity normalisation, resampling and padding (numpy + scipy.ndimage, no JAX).

Round trips that are exact, and tested as such:

- ``crop_padding(*pad_to_multiple(a, m))`` returns ``a`` for any shape, multiple and side;
- ``resample`` to the volume's own shape returns the data unchanged;
- labels up-sampled by an integer factor with nearest neighbour and down-sampled back
  return the original labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import DataError
from .volume import Volume

__all__ = [
    "WINDOWS",
    "window",
    "zscore",
    "percentile_normalise",
    "resample",
    "resample_array",
    "resample_grid",
    "resampled_spacing",
    "resample_source_box",
    "resample_block",
    "block_moments",
    "combine_moments",
    "pad_to_multiple",
    "crop_padding",
    "pad_volume",
]

#: CT windows as (centre, width) in HU.
WINDOWS = {
    "abdomen": (40.0, 400.0),
    "liver": (80.0, 150.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _mask(array: np.ndarray, mask) -> np.ndarray:
    if mask is None:
        return array.ravel()
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != array.shape:
        raise DataError("mask", f"shape {mask.shape} differs from the image shape {array.shape}",
                        "pass a boolean mask of the image's shape")  # fmt: skip
    values = array[mask]
    if values.size == 0:
        raise DataError("mask", "selects no voxels", "pass a mask with at least one True voxel, or mask=None")
    return values


def window(array: np.ndarray, *, center: float | None = None, width: float | None = None,
           preset: str | None = None, in_place: bool = False) -> np.ndarray:  # fmt: skip
    """CT windowing to float32 in [0, 1]: ``center - width/2`` -> 0, ``center + width/2`` -> 1.

    ``in_place``: overwrite ``array`` (float32) instead of allocating (the same values).

    Examples
    --------
    >>> window(np.array([-1000.0, 40.0, 1000.0]), preset="abdomen").tolist()
    [0.0, 0.5, 1.0]
    """
    if preset is not None:
        if preset not in WINDOWS:
            raise DataError("preset", f"unknown window {preset!r}", f"use one of {sorted(WINDOWS)}")
        center, width = WINDOWS[preset]
    if center is None or width is None or not width > 0:
        raise DataError("window", f"center={center!r}, width={width!r}", "pass center and a positive width, or preset=")
    lo = center - width / 2.0
    if in_place:
        out = _float32_buffer(array)
        out -= np.float32(lo)
        out *= np.float32(1.0 / width)
    else:
        out = (np.asarray(array, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / width)
    return np.clip(out, 0.0, 1.0, out=out)


def _float32_buffer(array) -> np.ndarray:
    if not (isinstance(array, np.ndarray) and array.dtype == np.float32 and array.flags.writeable):
        raise DataError("array", "in_place needs a writeable float32 numpy array", "pass one, or in_place=False")
    return array


def zscore(array: np.ndarray, *, mask=None, eps: float = 1e-6, mean: float | None = None,
           std: float | None = None, in_place: bool = False) -> np.ndarray:  # fmt: skip
    """float32 ``(array - mean) / std`` with statistics over ``mask`` (all voxels if None).

    ``mean`` and ``std`` given (both): use them, e.g. the whole volume's for one block of it.
    ``in_place``: overwrite ``array`` (float32) instead of allocating (the same values).

    Examples
    --------
    >>> z = zscore(np.array([1.0, 2.0, 3.0]))
    >>> [round(float(v), 4) for v in z]
    [-1.2247, 0.0, 1.2247]
    """
    array = np.asarray(array)
    if mean is None or std is None:
        values = _mask(array, mask).astype(np.float64)
        mean, std = float(values.mean()), float(values.std())
    out = _float32_buffer(array) if in_place else array.astype(np.float32)
    out -= np.float32(mean)
    out *= np.float32(1.0 / max(std, eps))
    return out


def percentile_normalise(array: np.ndarray, *, lower: float = 0.5, upper: float = 99.5, mask=None,
                         clip: bool = True) -> np.ndarray:  # fmt: skip
    """float32 with the ``lower``/``upper`` percentiles (over ``mask``) mapped to 0 and 1.

    Examples
    --------
    >>> percentile_normalise(np.arange(101.0), lower=10, upper=90)[[0, 50, 100]].tolist()
    [0.0, 0.5, 1.0]
    """
    if not 0 <= lower < upper <= 100:
        raise DataError("percentiles", f"lower={lower}, upper={upper}", "use 0 <= lower < upper <= 100")
    array = np.asarray(array)
    lo, hi = (float(v) for v in np.percentile(_mask(array, mask), [lower, upper]))
    out = array.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / max(hi - lo, 1e-12))
    return np.clip(out, 0.0, 1.0, out=out) if clip else out


# -- resampling -------------------------------------------------------------------------
def _as3(value, name: str, cast=float) -> tuple:
    if np.isscalar(value):
        value = (value,) * 3
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(v > 0 for v in out):
        raise DataError(name, f"{name}={value!r} is not one or three positive numbers", f"pass e.g. {name}=128")
    return out


def _sampling(old_shape, new_shape, scale) -> tuple[np.ndarray, np.ndarray]:
    """Input coordinate = scale * output index + offset, grids sharing their centre."""
    scale = np.asarray(scale, dtype=np.float64)
    offset = (np.asarray(old_shape) - 1) / 2.0 - (np.asarray(new_shape) - 1) / 2.0 * scale
    return scale, offset


def _apply(array: np.ndarray, new_shape, scale, offset, order: int) -> np.ndarray:
    from scipy import ndimage

    if tuple(new_shape) == array.shape and np.all(scale == 1) and np.all(offset == 0):
        return array.copy()
    if order in (0, 1):
        whole = tuple((0, n) for n in new_shape)
        return resample_block(lambda box: array[tuple(slice(a, b) for a, b in box)], array.shape, scale, offset,
                              whole, order)  # fmt: skip
    out_dtype = array.dtype if order == 0 else np.float32
    source = array if order == 0 or array.dtype == np.float32 else array.astype(np.float32)
    return ndimage.affine_transform(source, scale, offset=offset, output_shape=tuple(new_shape),
                                    output=out_dtype, order=order, mode="nearest", prefilter=order > 1)  # fmt: skip


def resample_array(array: np.ndarray, shape, *, order: int = 1) -> np.ndarray:
    """Resample a (Z, Y, X) array to ``shape``, voxel edges aligned (order 0 = labels).

    Examples
    --------
    >>> resample_array(np.arange(8.0).reshape(2, 2, 2), (4, 4, 4)).shape
    (4, 4, 4)
    """
    array = np.asarray(array)
    new_shape = _as3(shape, "shape", int)
    scale, offset = _sampling(array.shape, new_shape, np.asarray(array.shape) / np.asarray(new_shape))
    return _apply(array, new_shape, scale, offset, order)


def resample(volume: Volume, *, shape=None, spacing=None, order: int = 1) -> Volume:
    """Resample a :class:`Volume` to a target ``shape`` or ``spacing`` (mm).

    The image uses spline ``order`` (1 linear, 3 cubic), labels nearest neighbour. With
    ``shape`` the field of view is kept (voxel edges aligned); with ``spacing`` the new
    spacing is exact and the grid is centred on the old one. The affine follows.

    Examples
    --------
    >>> v = Volume(np.zeros((10, 10, 10), np.float32), spacing=(2.0, 1.0, 1.0))
    >>> r = resample(v, spacing=1.0)
    >>> r.shape, r.spacing
    ((20, 10, 10), (1.0, 1.0, 1.0))
    """
    if (shape is None) == (spacing is None):
        raise DataError("resample", "pass exactly one of shape= or spacing=", "e.g. resample(v, shape=128)")
    old = np.asarray(volume.shape)
    if shape is not None:
        new_shape = _as3(shape, "shape", int)
        scale = old / np.asarray(new_shape)
    else:
        target = np.asarray(_as3(spacing, "spacing"))
        new_shape = tuple(max(1, int(round(n))) for n in old * np.asarray(volume.spacing) / target)
        scale = target / np.asarray(volume.spacing)
    scale, offset = _sampling(old, new_shape, scale)
    affine = volume.affine @ _step(scale, offset)
    new_spacing = _column_spacing(affine)
    if spacing is not None:
        new_spacing = tuple(float(s) for s in _as3(spacing, "spacing"))
    image = _apply(volume.array, new_shape, scale, offset, order)
    labels = None if volume.labels is None else _apply(volume.labels, new_shape, scale, offset, 0)
    meta = dict(volume.metadata)
    meta["resampled_from"] = {"shape": volume.shape, "spacing": volume.spacing}
    return volume.replace(array=image, spacing=new_spacing, affine=affine, labels=labels, metadata=meta)


# -- block-exact resampling ------------------------------------------------------------
def resample_grid(old_shape, old_spacing, *, shape=None, spacing=None):
    """``(new_shape, scale, offset)`` of :func:`resample` to ``shape`` or ``spacing``: input
    coordinate = ``scale * output index + offset`` per axis (float64)."""
    old = np.asarray(old_shape)
    if shape is not None:
        new_shape = _as3(shape, "shape", int)
        scale = old / np.asarray(new_shape)
    else:
        target = np.asarray(_as3(spacing, "spacing"))
        new_shape = tuple(max(1, int(round(n))) for n in old * np.asarray(old_spacing, np.float64) / target)
        scale = target / np.asarray(old_spacing, np.float64)
    scale, offset = _sampling(old, new_shape, scale)
    return new_shape, scale, offset


def resampled_spacing(affine, old_shape, old_spacing, *, shape=None, spacing=None) -> tuple:
    """The spacing (mm) :func:`resample` gives a volume of ``old_shape`` / ``old_spacing`` /
    ``affine`` resampled to ``shape`` or ``spacing``, from its header alone (the same floats)."""
    if spacing is not None:
        return tuple(float(s) for s in _as3(spacing, "spacing"))
    _, scale, offset = resample_grid(old_shape, old_spacing, shape=shape)
    return _column_spacing(np.asarray(affine, np.float64) @ _step(scale, offset))


def _step(scale, offset) -> np.ndarray:
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = offset
    return step


def _column_spacing(affine) -> tuple:
    return tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))


def _axis_sampling(n_in: int, scale: float, offset: float, lo: int, hi: int, order: int):
    """Per output index ``lo..hi-1`` of one axis: (first, last + 1) of the input rows read
    and the rows (and linear weights) relative to ``first``. The coordinates are global
    (``(i + offset / scale) * scale`` in float64), so any block samples exactly as the whole does."""
    # (i + offset / scale) * scale: how ndimage.affine_transform computes a diagonal
    # transform's coordinates, so nearest-neighbour ties (exact .5) fall the same way
    coords = (np.arange(lo, hi, dtype=np.float64) + np.float64(offset) / np.float64(scale)) * np.float64(scale)
    if order == 0:
        index = np.clip(np.floor(coords + 0.5), 0, n_in - 1).astype(np.int64)
        first = int(index.min())
        return first, int(index.max()) + 1, index - first, None, None
    base = np.floor(coords)
    weight = coords - base  # of the upper neighbour; clamped rows: mode "nearest"
    i0 = np.clip(base, 0, n_in - 1).astype(np.int64)
    i1 = np.clip(base + 1, 0, n_in - 1).astype(np.int64)
    first = int(i0.min())
    return first, int(i1.max()) + 1, i0 - first, i1 - first, weight


def resample_source_box(box, old_shape, scale, offset, order: int = 1):
    """The box of the input that :func:`resample_block` reads for output ``box``."""
    out = []
    for (lo, hi), n, s, o in zip(box, old_shape, scale, offset):
        first, end = _axis_sampling(int(n), float(s), float(o), int(lo), int(hi), order)[:2]
        out.append((first, end))
    return tuple(out)


def resample_block(read, old_shape, scale, offset, box, order: int = 1) -> np.ndarray:
    """Output ``box`` of resampling an ``old_shape`` volume (``scale``/``offset`` as
    :func:`resample_grid`), reading only ``read(resample_source_box(...))``.

    Order 0 (labels) takes the nearest input row per axis (ties round up); order 1 is
    separable linear interpolation in float64, cast to float32; edges are clamped (ndimage's
    mode ``"nearest"``). Each output voxel is computed from global coordinates by the same
    element-wise operations whatever the box, so a block equals the same slice of the whole
    result bitwise. The whole-volume :func:`resample` uses it too (within ~1e-6 relative of
    ``scipy.ndimage.affine_transform``, which rounds its coordinates differently).
    """
    if order not in (0, 1):
        raise DataError("order", f"order={order} for a block", "resample blocks with order 0 or 1 (cubic: whole)")
    axes = [_axis_sampling(int(n), float(s), float(o), int(lo), int(hi), order)
            for (lo, hi), n, s, o in zip(box, old_shape, scale, offset)]  # fmt: skip
    out = np.asarray(read(tuple((a[0], a[1]) for a in axes)))
    if order == 0:
        for axis, (_, _, index, _, _) in enumerate(axes):
            out = np.take(out, index, axis=axis)
        return np.ascontiguousarray(out)
    out = out.astype(np.float64)
    for axis, (_, _, i0, i1, weight) in enumerate(axes):
        shape = [1, 1, 1]
        shape[axis] = -1
        w = weight.reshape(shape)
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i1, axis=axis) * w
    return out.astype(np.float32)


# -- moments over blocks ----------------------------------------------------------------
def block_moments(block: np.ndarray) -> tuple[float, float, float, float, float]:
    """``(count, mean, m2, min, max)`` of a block in float64 (``m2``: the sum of squared
    deviations from the mean), for :func:`combine_moments`."""
    values = np.asarray(block)
    if not values.size:
        return (0.0, 0.0, 0.0, np.inf, -np.inf)
    values = values.reshape(1) if values.ndim == 0 else values
    mean = float(values.sum(dtype=np.float64)) / values.size
    # the squared deviations in float64 a slab of leading rows at a time (no float64 copy of the block)
    step = max(1, (1 << 16) // max(1, values[0].size))
    m2 = sum(
        float(np.square(values[i : i + step].astype(np.float64) - mean).sum()) for i in range(0, len(values), step)
    )
    return (float(values.size), mean, m2, float(values.min()), float(values.max()))


def combine_moments(rows) -> dict:
    """``{count, mean, std, min, max}`` of the union of blocks from their
    :func:`block_moments`, combined in the given order (Chan et al.'s pairwise update): the
    same rows in the same order give the same floats, however they were computed."""
    count = mean = m2 = 0.0
    low, high = np.inf, -np.inf
    for n, m, q, lo, hi in rows:
        if not n:
            continue
        delta = m - mean
        total = count + n
        mean += delta * n / total
        m2 += q + delta * delta * count * n / total
        count = total
        low, high = min(low, lo), max(high, hi)
    std = float(np.sqrt(m2 / count)) if count else 0.0
    return {"count": count, "mean": float(mean), "std": std, "min": float(low), "max": float(high)}


# -- padding ----------------------------------------------------------------------------
def pad_to_multiple(array: np.ndarray, multiple, *, side: str = "end", mode: str = "constant",
                    value: float = 0) -> tuple[np.ndarray, Pads]:  # fmt: skip
    """Pad each axis up to a multiple of ``multiple``; returns ``(padded, pads)``.

    ``side="end"`` pads after the data (the affine's origin is unchanged); ``"both"``
    splits the padding, the extra voxel going after (like MONAI's ``DivisiblePad``).
    ``mode`` is any :func:`numpy.pad` mode; ``value`` is used by ``"constant"``.

    Examples
    --------
    >>> padded, pads = pad_to_multiple(np.ones((5, 8, 3)), 4)
    >>> padded.shape, pads
    ((8, 8, 4), ((0, 3), (0, 0), (0, 1)))
    >>> crop_padding(padded, pads).shape
    (5, 8, 3)
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise DataError("array", f"has shape {array.shape}, expected (Z, Y, X)", "pass a 3-D array")
    multiple = _as3(multiple, "multiple", int)
    if side not in ("end", "both"):
        raise DataError("side", f"side={side!r}", "use side='end' or side='both'")
    pads = []
    for n, m in zip(array.shape, multiple):
        total = (-n) % m
        before = total // 2 if side == "both" else 0
        pads.append((before, total - before))
    pads_t: Pads = tuple(pads)  # type: ignore[assignment]
    if not any(a or b for a, b in pads_t):
        return array.copy(), pads_t
    kwargs = {"constant_values": value} if mode == "constant" else {}
    return np.pad(array, pads_t, mode=mode, **kwargs), pads_t


def crop_padding(array: np.ndarray, pads: Sequence[Sequence[int]]) -> np.ndarray:
    """Undo :func:`pad_to_multiple` (works on any array whose last 3 axes are Z, Y, X).

    Returns a view.
    """
    index = tuple(slice(int(a), array.shape[-3 + i] - int(b)) for i, (a, b) in enumerate(pads))
    return array[(..., *index)]


def pad_volume(volume: Volume, multiple, *, side: str = "end", mode: str = "constant",
               value: float = 0) -> tuple[Volume, Pads]:  # fmt: skip
    """Pad a :class:`Volume` (labels with 0) and shift the affine origin for ``side="both"``."""
    image, pads = pad_to_multiple(volume.array, multiple, side=side, mode=mode, value=value)
    labels = None
    if volume.labels is not None:
        labels, _ = pad_to_multiple(volume.labels, multiple, side=side, mode="constant", value=0)
    affine = volume.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([p[0] for p in pads], dtype=np.float64)
    return volume.replace(array=image, labels=labels, affine=affine), pads
