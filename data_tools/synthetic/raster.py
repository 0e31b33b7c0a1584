"""The block rasteriser: samples the anatomy of :mod:`.anatomy` at voxel centres.

Every voxel depends only on its own position, so :func:`make_phantom_block` of a box is
exactly the same slice of :func:`make_phantom`, and costs only that box. A block is
painted tissue by tissue with a linear partial-volume ramp one voxel wide, then gets the
attenuation drift and per-voxel noise hashed from (seed, shape, voxel index).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import DataError
from ..geometry import Box, as_box, box_inside
from ..volume import Volume, zyx_affine_from_ijk
from .anatomy import CLASS_NAMES, FIELD_OF_VIEW_MM, HU, LESION, ORGAN, VESSEL, Anatomy, build_anatomy

__all__ = ["check_shape", "make_phantom", "make_phantom_block", "phantom_geometry", "phantom_lesions"]

NOISE_SD_HU = 12.0
_BLOCK_VOXELS = 1 << 21  # one-shot generation works in slabs of ~2M voxels


def check_shape(shape) -> tuple[int, int, int]:
    """``shape`` (an int for a cube) as 3 ints between 4 and 8192, or a DataError."""
    if isinstance(shape, (int, np.integer)):
        shape = (int(shape),) * 3
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or not all(4 <= s <= 8192 for s in shape):
        raise DataError(
            "phantom", f"shape={shape!r} is not 3 sizes between 4 and 8192", "pass e.g. shape=128 or (96, 128, 128)"
        )
    return shape  # type: ignore[return-value]


def _check_box(box, shape) -> Box:
    box = as_box(box)
    if not box_inside(box, shape):
        raise DataError(
            "phantom",
            f"box={box!r} is not ((z0, z1), (y0, y1), (x0, x1)) with 0 <= start < stop <= {shape}",
            "clip the box to the volume shape",
        )
    return box  # type: ignore[return-value]


def phantom_geometry(shape) -> tuple[tuple[float, float, float], np.ndarray]:
    """``(spacing, affine)`` of a phantom of ``shape``: 400 mm field of view, centred on 0.

    Examples
    --------
    >>> spacing, affine = phantom_geometry(128)
    >>> spacing
    (3.125, 3.125, 3.125)
    """
    shape = check_shape(shape)
    spacing = tuple(FIELD_OF_VIEW_MM / n for n in shape)
    dz, dy, dx = spacing
    half = FIELD_OF_VIEW_MM / 2.0
    ijk = np.array([[dx, 0, 0, dx / 2 - half], [0, dy, 0, dy / 2 - half], [0, 0, dz, dz / 2 - half], [0, 0, 0, 1]])
    return spacing, zyx_affine_from_ijk(ijk)  # type: ignore[return-value]


class _Canvas:
    """The block being painted: image, labels and its voxel-centre coordinates in mm."""

    def __init__(self, shape, box):
        self.shape, self.box = shape, box
        self.spacing = np.array([FIELD_OF_VIEW_MM / n for n in shape])
        self.edge_mm = float(np.cbrt(self.spacing.prod()))  # partial-volume ramp width
        self.axes = [
            ((np.arange(a, b, dtype=np.float32) + np.float32(0.5)) * np.float32(s))
            for (a, b), s in zip(box, self.spacing)
        ]
        size = tuple(b - a for a, b in box)
        self.image = np.full(size, HU["air"], dtype=np.float32)
        self.labels = np.zeros(size, dtype=np.uint8)

    def window(self, lo_mm, hi_mm):
        """Local index slices covering [lo_mm, hi_mm] (+ one ramp width), or None."""
        out = []
        for (a, b), s, lo, hi in zip(self.box, self.spacing, lo_mm, hi_mm):
            i0 = max(a, int(math.floor((lo - self.edge_mm) / s - 0.5)))
            i1 = min(b, int(math.ceil((hi + self.edge_mm) / s + 0.5)) + 1)
            if i0 >= i1:
                return None
            out.append(slice(i0 - a, i1 - a))
        return tuple(out)

    def grid(self, win):
        z, y, x = (ax[w] for ax, w in zip(self.axes, win))
        return z[:, None, None], y[None, :, None], x[None, None, :]

    def occupancy(self, distance):
        """Fraction of each voxel inside (linear partial-volume ramp across one voxel)."""
        return np.clip(np.float32(0.5) - distance * np.float32(1.0 / self.edge_mm), 0.0, 1.0)

    def paint(self, win, distance, hu, label=None, occupancy=None):
        occ = self.occupancy(distance) if occupancy is None else occupancy
        view = self.image[win]
        view += occ * (np.float32(hu) - view)
        if label is not None:
            self.labels[win][distance < 0] = label


def _paint_body(cv: _Canvas, an: Anatomy) -> None:
    z, y, x = cv.grid((slice(None),) * 3)
    dy, dx = y - np.float32(an.body_centre[0]), x - np.float32(an.body_centre[1])
    amp, freq, phase = an.body_axis_wave
    wave = 1.0 + amp * np.sin(z * np.float32(freq) + np.float32(phase))
    ay, ax = np.float32(an.body_axes[0]), np.float32(an.body_axes[1])
    theta = np.arctan2(dy / ay, dx / ax)  # (1, Y, X)
    bump = np.ones_like(theta)
    for k, a, p in an.body_bumps:
        bump += np.float32(a) * np.cos(k * theta + np.float32(p))
    bump -= np.float32(0.05) * np.maximum(-np.sin(theta), 0) ** 2  # flatter back
    rho = np.sqrt((dy / ay) ** 2 + (dx / ax) ** 2) / wave  # (Z, Y, X)
    ray_mm = np.sqrt((np.sin(theta) * ay) ** 2 + (np.cos(theta) * ax) ** 2)
    body = (rho - bump) * ray_mm  # approximate signed distance to the skin, mm
    cv.paint((slice(None),) * 3, body, HU["fat"])
    fat_mean, fat_amp, fat_phase = an.fat_mm
    fat = np.float32(fat_mean) + np.float32(fat_amp) * np.sin(2 * theta + np.float32(fat_phase))
    body += fat
    cv.paint((slice(None),) * 3, body, HU["soft"])


def _paint_spine(cv: _Canvas, an: Anatomy) -> None:
    cy, cx, ry, rx, phase = an.spine
    win = cv.window((-1e9, cy - ry, cx - rx), (1e9, cy + ry, cx + rx))
    if win is None:
        return
    z, y, x = cv.grid(win)
    r = min(ry, rx)
    d = (np.sqrt(((y - np.float32(cy)) / np.float32(ry)) ** 2 + ((x - np.float32(cx)) / np.float32(rx)) ** 2) - 1) * r
    d = np.broadcast_to(d, tuple(s.stop - s.start for s in win))
    # vertebral bodies every 32 mm separated by discs
    level = np.cos((z + np.float32(phase)) * np.float32(2 * math.pi / 32.0))
    hu = np.where(level > -0.7, np.float32(HU["bone"]), np.float32(HU["disc"]))
    cv.paint(win, d, hu)


def _paint_blob(cv: _Canvas, blob, hu, label=None) -> None:
    win = cv.window(*blob.bbox())
    if win is not None:
        cv.paint(win, blob.distance(*cv.grid(win)), hu, label)


def _paint_liver(cv: _Canvas, an: Anatomy, vessel_label: int | None) -> None:
    win = cv.window(*an.liver_bbox())
    if win is None:
        return
    z, y, x = cv.grid(win)
    d_liver = an.liver_distance(z, y, x)
    cv.paint(win, d_liver, HU["liver"], ORGAN)
    # hepatic vessels, clipped to the organ
    size = tuple(s.stop - s.start for s in win)
    d_vessel = None
    for tube in an.hepatic:
        sub = cv.window(*tube.bbox())
        if sub is None:
            continue
        sub = tuple(slice(max(s.start, w.start), min(s.stop, w.stop)) for s, w in zip(sub, win))
        if any(s.start >= s.stop for s in sub):
            continue
        if d_vessel is None:
            d_vessel = np.full(size, np.inf, dtype=np.float32)
        local = tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(sub, win))
        np.minimum(d_vessel[local], tube.distance(*cv.grid(sub)), out=d_vessel[local])
    if d_vessel is not None:
        occ = cv.occupancy(d_vessel) * cv.occupancy(d_liver)
        cv.paint(win, d_vessel, HU["vessel"], occupancy=occ)
        if vessel_label is not None:
            cv.labels[win][(d_vessel < 0) & (d_liver < 0)] = vessel_label
    for lesion in an.lesions:
        c, r = np.asarray(lesion.centre_mm), lesion.radius_mm
        sub = cv.window(c - r, c + r)
        if sub is None:
            continue
        lz, ly, lx = cv.grid(sub)
        d = np.sqrt(
            (lz - np.float32(c[0])) ** 2 + (ly - np.float32(c[1])) ** 2 + (lx - np.float32(c[2])) ** 2
        ) - np.float32(r)
        cv.paint(sub, d, lesion.hu, LESION)


def _paint_aorta(cv: _Canvas, an: Anatomy, vessel_label: int | None) -> None:
    for tube in an.aorta:
        win = cv.window(*tube.bbox())
        if win is not None:
            cv.paint(win, tube.distance(*cv.grid(win)), HU["vessel"], vessel_label)


def _hash_uniform16(index: np.ndarray, key: int) -> list[np.ndarray]:
    """Four uniform [0, 1) float32 arrays from a splitmix64 hash of uint64 ``index``."""
    h = index + np.uint64(key)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return [((h >> np.uint64(16 * i)) & np.uint64(0xFFFF)).astype(np.float32) for i in range(4)]


def _noise(cv: _Canvas, key: int) -> np.ndarray:
    """Zero-mean, unit-variance noise (Irwin-Hall of 4 uniforms) hashed per global voxel."""
    (z0, z1), (y0, y1), (x0, x1) = cv.box
    _, ny, nx = cv.shape
    zz = np.arange(z0, z1, dtype=np.uint64)[:, None, None] * np.uint64(ny * nx)
    yy = np.arange(y0, y1, dtype=np.uint64)[None, :, None] * np.uint64(nx)
    xx = np.arange(x0, x1, dtype=np.uint64)[None, None, :]
    index = zz + yy + xx
    u = _hash_uniform16(index, key)
    total = u[0] + u[1] + u[2] + u[3]
    # each uniform is k/65536 * 65536: mean 4*32767.5, variance 4*(65536**2 - 1)/12
    return (total - np.float32(4 * 32767.5)) * np.float32(1.0 / math.sqrt(4 * (65536.0**2 - 1) / 12))


def _finish(cv: _Canvas, an: Anatomy) -> None:
    z, y, x = cv.grid((slice(None),) * 3)
    bias = np.ones(cv.image.shape, dtype=np.float32)
    for amp, wz, pz, wy, py, wx, px in an.bias:
        term = np.cos(z * np.float32(wz) + np.float32(pz)) * np.cos(y * np.float32(wy) + np.float32(py))
        bias += np.float32(amp) * term * np.cos(x * np.float32(wx) + np.float32(px))
    cv.image -= np.float32(HU["air"])
    cv.image *= bias
    cv.image += np.float32(HU["air"])
    nz, ny, nx = cv.shape
    seed_key = (an.noise_key * 0x9E3779B97F4A7C15 + (nz * 1_000_003 + ny) * 1_000_003 + nx) % (1 << 64)
    cv.image += _noise(cv, seed_key) * np.float32(NOISE_SD_HU)


def make_phantom_block(shape, box: Box, *, seed: int = 0, vessels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels of one block of the phantom, equal to the same slice of the whole.

    Parameters
    ----------
    shape : int or (Z, Y, X)
        Shape of the whole phantom.
    box : ((z0, z1), (y0, y1), (x0, x1))
        Half-open voxel ranges of the block.
    seed : int
        Anatomy and noise seed.
    vessels : bool
        Label vessels as 3 (else 1 inside the organ, 0 outside).

    Returns
    -------
    image : float32 array, shape of the box, Hounsfield-like units
    labels : uint8 array, shape of the box

    Examples
    --------
    >>> img, lab = make_phantom_block(64, ((0, 8), (0, 64), (0, 64)), seed=1)
    >>> img.shape, img.dtype, lab.dtype
    ((8, 64, 64), dtype('float32'), dtype('uint8'))
    """
    shape = check_shape(shape)
    box = _check_box(box, shape)
    an = build_anatomy(int(seed))
    vessel_label = VESSEL if vessels else None
    cv = _Canvas(shape, box)
    _paint_body(cv, an)
    for name, blob in an.others:
        _paint_blob(cv, blob, HU[name])
    _paint_spine(cv, an)
    _paint_aorta(cv, an, vessel_label)
    _paint_liver(cv, an, vessel_label if vessels else ORGAN)
    _finish(cv, an)
    return cv.image, cv.labels


def phantom_lesions(shape, *, seed: int = 0) -> list[dict]:
    """Per-lesion metadata on the grid of ``shape`` (see :meth:`Lesion.in_voxels`).

    Examples
    --------
    >>> les = phantom_lesions(128, seed=0)
    >>> len(les), min(l["diameter_voxels"] for l in les)
    (10, 2.0)
    """
    spacing, _ = phantom_geometry(shape)
    return [les.in_voxels(spacing) for les in build_anatomy(int(seed)).lesions]


def make_phantom(shape, *, seed: int = 0, vessels: bool = True):
    """A whole phantom as a :class:`~data_tools.volume.Volume` (built slab by slab).

    Parameters
    ----------
    shape : int or (Z, Y, X)
        e.g. ``128`` for 128³; 32³ to 1024³ are the intended range.
    seed : int
        Same seed, same anatomy at every resolution.
    vessels : bool
        Keep vessels as label 3 (``class_names`` then has 4 entries, else 3).

    Returns
    -------
    Volume
        float32 image, uint8 labels, 400 mm field of view, ``metadata["lesions"]``.

    Examples
    --------
    >>> v = make_phantom(32, seed=0)
    >>> v.shape, v.class_names
    ((32, 32, 32), ('background', 'organ', 'lesion', 'vessel'))
    """
    shape = check_shape(shape)
    image = np.empty(shape, dtype=np.float32)
    labels = np.empty(shape, dtype=np.uint8)
    slab = max(1, _BLOCK_VOXELS // (shape[1] * shape[2]))
    for z0 in range(0, shape[0], slab):
        box = ((z0, min(z0 + slab, shape[0])), (0, shape[1]), (0, shape[2]))
        image[box[0][0] : box[0][1]], labels[box[0][0] : box[0][1]] = make_phantom_block(
            shape, box, seed=seed, vessels=vessels
        )
    spacing, affine = phantom_geometry(shape)
    return Volume(
        image,
        spacing=spacing,
        affine=affine,
        source_format="phantom",
        labels=labels,
        class_names=CLASS_NAMES if vessels else CLASS_NAMES[:3],
        path=f"phantom:{'x'.join(map(str, shape))}:{int(seed)}",
        metadata={
            "seed": int(seed),
            "field_of_view_mm": FIELD_OF_VIEW_MM,
            "lesions": phantom_lesions(shape, seed=seed),
        },
    )
