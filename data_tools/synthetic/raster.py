"""Synthetic CT-like abdominal phantoms with labels, at any resolution, block by block.

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

import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import DataError
from ..geometry import Box, as_box, box_inside, iter_blocks

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

FIELD_OF_VIEW_MM = 400.0
CLASS_NAMES = ("background", "organ", "lesion", "vessel")
ORGAN, LESION, VESSEL = 1, 2, 3
NOISE_SD_HU = 12.0
_HU = {
    "air": -1000.0, "fat": -100.0, "soft": 40.0, "lung": -850.0, "bone": 700.0,
    "disc": 90.0, "kidney": 150.0, "spleen": 50.0, "liver": 100.0, "vessel": 180.0,
}  # fmt: skip
# Lesion diameters in voxels *at 128³* (voxel 3.125 mm): 6.25 mm .. 50 mm.
_LESION_DIAMETERS_AT_128 = (2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0, 10.0, 13.0, 16.0)
_BLOCK_VOXELS = 1 << 21  # one-shot generation works in slabs of ~2M voxels

# -- shapes in millimetres --------------------------------------------------------------
def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two signed distances with a rounded join of width ``k`` mm."""
    h = np.maximum(k - np.abs(a - b), 0.0) / k
    return np.minimum(a, b) - h * h * (k * 0.25)


@dataclass(frozen=True)
class _Blob:
    """A smoothly deformed, rotated ellipsoid. ``distance`` is an approximate SDF in mm."""

    centre: tuple[float, float, float]  # z, y, x mm
    radii: tuple[float, float, float]
    rotation: tuple[tuple[float, ...], ...]  # rows: local axes in (z, y, x)
    bumps: tuple[tuple[float, float, float, float, float], ...]  # wz, wy, wx, amp, phase

    def distance(self, z, y, x):
        dz, dy, dx = z - self.centre[0], y - self.centre[1], x - self.centre[2]
        q = [
            (r[0] * dz + r[1] * dy + r[2] * dx) / rad for r, rad in zip(self.rotation, self.radii)
        ]
        rho = np.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        inv = 1.0 / np.maximum(rho, 1e-6)
        u = [qi * inv for qi in q]  # unit direction in the normalised frame
        bump = 1.0
        for wz, wy, wx, amp, phase in self.bumps:
            bump = bump + amp * np.sin(wz * u[0] + wy * u[1] + wx * u[2] + phase)
        ray_mm = np.sqrt(sum((ui * rad) ** 2 for ui, rad in zip(u, self.radii)))
        return (rho - bump) * ray_mm

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        reach = max(self.radii) * (1.0 + sum(abs(b[3]) for b in self.bumps))
        c = np.asarray(self.centre)
        return c - reach, c + reach


@dataclass(frozen=True)
class _Tube:
    """A straight tube from ``a`` to ``b`` whose radius tapers from ``ra`` to ``rb``."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    ra: float
    rb: float

    def distance(self, z, y, x):
        a, b = self.a, self.b
        e = (b[0] - a[0], b[1] - a[1], b[2] - a[2])
        ee = e[0] ** 2 + e[1] ** 2 + e[2] ** 2
        pz, py, px = z - a[0], y - a[1], x - a[2]
        t = np.clip((pz * e[0] + py * e[1] + px * e[2]) / ee, 0.0, 1.0)
        qz, qy, qx = pz - t * e[0], py - t * e[1], px - t * e[2]
        return np.sqrt(qz * qz + qy * qy + qx * qx) - (self.ra + t * (self.rb - self.ra))

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        a, b, r = np.asarray(self.a), np.asarray(self.b), max(self.ra, self.rb)
        return np.minimum(a, b) - r, np.maximum(a, b) + r


@dataclass(frozen=True)
class Lesion:
    """One lesion of a phantom, in millimetres of the phantom frame (z, y, x).

    ``centre_mm`` is measured from the corner of the field of view; voxel ``i`` of an
    axis with spacing ``s`` has its centre at ``(i + 0.5) * s`` mm.
    """

    index: int
    centre_mm: tuple[float, float, float]
    radius_mm: float
    hu: float

    def in_voxels(self, spacing: Sequence[float]) -> dict:
        """Centre, radius, diameter and expected voxel count on a grid of ``spacing``."""
        s = np.asarray(spacing, dtype=np.float64)
        centre_vox = np.asarray(self.centre_mm) / s - 0.5
        radius_vox = self.radius_mm / s
        return {
            "index": self.index,
            "centre_mm": tuple(float(c) for c in self.centre_mm),
            "radius_mm": float(self.radius_mm),
            "diameter_mm": float(2 * self.radius_mm),
            "hu": float(self.hu),
            "centre_voxel": tuple(float(c) for c in centre_vox),
            "radius_voxels": tuple(float(r) for r in radius_vox),
            "diameter_voxels": float(2 * radius_vox.min()),
            "expected_voxels": float(4.0 / 3.0 * math.pi * self.radius_mm**3 / s.prod()),
        }


@dataclass(frozen=True)
class _Anatomy:
    body_centre: tuple[float, float]  # y, x
    body_axes: tuple[float, float]  # y, x semi-axes, mm
    body_axis_wave: tuple[float, float, float]  # amplitude, z frequency (rad/mm), phase
    body_bumps: tuple[tuple[int, float, float], ...]  # k, amp, phase in angle
    fat_mm: tuple[float, float, float]  # mean thickness, amplitude, phase
    liver: tuple[_Blob, _Blob]
    others: tuple[tuple[str, _Blob], ...]  # painted before the liver
    spine: tuple[float, float, float, float, float]  # cy, cx, ry, rx, disc phase
    aorta: tuple[_Tube, ...]
    hepatic: tuple[_Tube, ...]
    lesions: tuple[Lesion, ...]
    bias: tuple[tuple[float, ...], ...]  # amp, wz, pz, wy, py, wx, px
    noise_key: int

    def liver_distance(self, z, y, x):
        return _smooth_min(self.liver[0].distance(z, y, x), self.liver[1].distance(z, y, x), 12.0)

    def liver_bbox(self) -> tuple[np.ndarray, np.ndarray]:
        (lo0, hi0), (lo1, hi1) = self.liver[0].bbox(), self.liver[1].bbox()
        return np.minimum(lo0, lo1), np.maximum(hi0, hi1)


def _rotation(rng: np.random.Generator, max_angle: float) -> tuple[tuple[float, ...], ...]:
    """A random rotation of at most ``max_angle`` radians (Rodrigues), rows as tuples."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    return tuple(tuple(float(v) for v in row) for row in r)


def _blob(rng, centre, radii, *, jitter=8.0, scale=0.08, angle=0.3, bump=0.05) -> _Blob:
    centre = tuple(float(c + rng.uniform(-jitter, jitter)) for c in centre)
    radii = tuple(float(r * (1 + rng.uniform(-scale, scale))) for r in radii)
    bumps = tuple(
        (*(float(w) for w in rng.normal(0, 2.0, size=3)), float(rng.uniform(0.3, 1) * bump),
         float(rng.uniform(0, 2 * math.pi)))
        for _ in range(3)
    )  # fmt: skip
    return _Blob(centre, radii, _rotation(rng, angle), bumps)


def _grow_tree(rng, liver_distance, start, direction, length, radius, depth) -> list[_Tube]:
    """A binary vessel tree: each branch shortens by 0.8 and narrows by 0.7."""
    tubes: list[_Tube] = []
    stack = [(np.asarray(start, float), np.asarray(direction, float), length, radius, depth)]
    while stack:
        a, d, length, r, level = stack.pop(0)
        d = d / np.linalg.norm(d)
        b = a + d * length
        for _ in range(8):  # shorten branches that would leave the organ
            if float(liver_distance(*(np.array([v]) for v in b))[0]) < -2.0:
                break
            length *= 0.7
            b = a + d * length
        if length < 4.0:  # no room left: this branch and its children are dropped
            continue
        tubes.append(_Tube(tuple(map(float, a)), tuple(map(float, b)), float(r), float(r * 0.7)))
        if level == 0:
            continue
        ortho = np.cross(d, rng.normal(size=3))
        ortho /= np.linalg.norm(ortho)
        spread = rng.uniform(0.45, 0.8)
        for sign in (1.0, -1.0):
            child = d * math.cos(spread) + sign * ortho * math.sin(spread)
            stack.append((b, child, length * 0.8, r * 0.7, level - 1))
    return tubes


def _place_lesions(rng, anatomy_liver, liver_bbox) -> tuple[Lesion, ...]:
    """Lesions fully inside the liver and apart from each other, largest first."""
    lo, hi = liver_bbox
    directions = np.array(
        [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)],
        dtype=np.float64,
    )
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    voxel_128 = FIELD_OF_VIEW_MM / 128.0
    placed: list[Lesion] = []
    for diameter in sorted(_LESION_DIAMETERS_AT_128, reverse=True):
        radius = diameter * voxel_128 / 2.0
        hu = 160.0 if rng.uniform() < 0.25 else 45.0  # mostly hypodense, some hyperdense
        for _ in range(50):
            cand = rng.uniform(lo, hi, size=(256, 3))
            ok = anatomy_liver(cand[:, 0], cand[:, 1], cand[:, 2]) < -(radius + 4.0)
            for les in placed:
                gap = np.linalg.norm(cand - np.asarray(les.centre_mm), axis=1)
                ok &= gap > radius + les.radius_mm + 3.0
            for c in cand[ok]:
                shell = c + directions * (radius + 2.0)
                if (anatomy_liver(shell[:, 0], shell[:, 1], shell[:, 2]) < 0).all():
                    placed.append(Lesion(len(placed), tuple(map(float, c)), float(radius), hu))
                    break
            else:
                continue
            break
        else:  # pragma: no cover - the liver always has room for ten lesions
            raise AssertionError(f"could not place a lesion of radius {radius} mm")
    return tuple(placed)


@functools.lru_cache(maxsize=16)
def _anatomy(seed: int) -> _Anatomy:
    """All random choices of a phantom: a few hundred numbers, independent of shape."""
    rng = np.random.default_rng([seed, 0x70A4])
    c = FIELD_OF_VIEW_MM / 2.0
    body_centre = (float(c + rng.uniform(-8, 8)), float(c + rng.uniform(-6, 6)))
    body_axes = (float(rng.uniform(115, 130)), float(rng.uniform(160, 175)))
    body_wave = (float(rng.uniform(0.02, 0.05)), float(2 * math.pi / rng.uniform(300, 500)),
                 float(rng.uniform(0, 2 * math.pi)))  # fmt: skip
    body_bumps = tuple(
        (k, float(rng.uniform(0.01, 0.04)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 4, 5)
    )
    fat = (float(rng.uniform(10, 16)), float(rng.uniform(2, 5)), float(rng.uniform(0, 2 * math.pi)))

    cy, cx = body_centre
    # +x is the patient's right, +y anterior (RAS); the liver sits on the right.
    liver = (
        _blob(rng, (c + 40, cy + 5, cx + 60), (75, 80, 68), bump=0.06),
        _blob(rng, (c + 60, cy + 25, cx + 5), (40, 45, 60), bump=0.06),
    )
    others = (
        ("lung", _blob(rng, (c + 200, cy + 5, cx + 80), (95, 80, 62))),
        ("lung", _blob(rng, (c + 200, cy + 5, cx - 80), (95, 80, 62))),
        ("spleen", _blob(rng, (c + 55, cy - 35, cx - 95), (50, 35, 28))),
        ("kidney", _blob(rng, (c - 20, cy - 70, cx + 70), (45, 28, 24), angle=0.25)),
        ("kidney", _blob(rng, (c - 15, cy - 70, cx - 70), (45, 28, 24), angle=0.25)),
    )
    spine = (float(cy - 95 + rng.uniform(-3, 3)), float(cx + rng.uniform(-3, 3)),
             float(rng.uniform(17, 20)), float(rng.uniform(20, 24)), float(rng.uniform(0, 30)))  # fmt: skip
    # aorta: a gently wandering tube in front of the spine, bottom to top of the field
    zs = np.linspace(-20, FIELD_OF_VIEW_MM + 20, 9)
    ay = spine[0] + 38 + np.cumsum(rng.uniform(-3, 3, size=zs.size))
    ax = spine[1] - 18 + np.cumsum(rng.uniform(-3, 3, size=zs.size))
    r_aorta = float(rng.uniform(10, 12))
    aorta = tuple(
        _Tube((float(zs[i]), float(ay[i]), float(ax[i])), (float(zs[i + 1]), float(ay[i + 1]),
              float(ax[i + 1])), r_aorta, r_aorta)
        for i in range(zs.size - 1)
    )  # fmt: skip

    def liver_distance(z, y, x):
        return _smooth_min(liver[0].distance(z, y, x), liver[1].distance(z, y, x), 12.0)

    hilum = np.asarray(liver[0].centre) + np.array([-15.0, 0.0, -25.0])
    hepatic = []
    for direction in ((0.3, 0.2, 1.0), (1.0, 0.1, 0.2), (0.5, 0.4, -1.0), (-0.6, 0.1, 0.6)):
        d = np.asarray(direction) + rng.normal(0, 0.15, size=3)
        hepatic += _grow_tree(rng, liver_distance, hilum, d, 30.0, 5.5, depth=4)
    lo0, hi0 = liver[0].bbox()
    lo1, hi1 = liver[1].bbox()
    lesions = _place_lesions(rng, liver_distance, (np.minimum(lo0, lo1), np.maximum(hi0, hi1)))
    bias = tuple(
        (float(rng.uniform(0.003, 0.008)),
         *(v for _ in range(3) for v in (float(2 * math.pi * rng.uniform(0.3, 1.2) / FIELD_OF_VIEW_MM),
                                         float(rng.uniform(0, 2 * math.pi)))))
        for _ in range(3)
    )  # fmt: skip
    noise_key = int(rng.integers(0, 2**62))
    return _Anatomy(body_centre, body_axes, body_wave, body_bumps, fat, liver, others, spine,
                    aorta, tuple(hepatic), lesions, bias, noise_key)  # fmt: skip


# -- rasterising ------------------------------------------------------------------------
def _check_shape(shape) -> tuple[int, int, int]:
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
    from ..volume import zyx_affine_from_ijk

    shape = _check_shape(shape)
    spacing = tuple(FIELD_OF_VIEW_MM / n for n in shape)
    dz, dy, dx = spacing
    half = FIELD_OF_VIEW_MM / 2.0
    ijk = np.array(
        [[dx, 0, 0, dx / 2 - half], [0, dy, 0, dy / 2 - half], [0, 0, dz, dz / 2 - half], [0, 0, 0, 1]]
    )
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
        self.image = np.full(size, _HU["air"], dtype=np.float32)
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


def _paint_body(cv: _Canvas, an: _Anatomy) -> None:
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
    cv.paint((slice(None),) * 3, body, _HU["fat"])
    fat_mean, fat_amp, fat_phase = an.fat_mm
    fat = np.float32(fat_mean) + np.float32(fat_amp) * np.sin(2 * theta + np.float32(fat_phase))
    body += fat
    cv.paint((slice(None),) * 3, body, _HU["soft"])


def _paint_spine(cv: _Canvas, an: _Anatomy) -> None:
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
    hu = np.where(level > -0.7, np.float32(_HU["bone"]), np.float32(_HU["disc"]))
    cv.paint(win, d, hu)


def _paint_blob(cv: _Canvas, blob, hu, label=None) -> None:
    win = cv.window(*blob.bbox())
    if win is not None:
        cv.paint(win, blob.distance(*cv.grid(win)), hu, label)


def _paint_liver(cv: _Canvas, an: _Anatomy, vessel_label: int | None) -> None:
    win = cv.window(*an.liver_bbox())
    if win is None:
        return
    z, y, x = cv.grid(win)
    d_liver = an.liver_distance(z, y, x)
    cv.paint(win, d_liver, _HU["liver"], ORGAN)
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
        cv.paint(win, d_vessel, _HU["vessel"], occupancy=occ)
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


def _paint_aorta(cv: _Canvas, an: _Anatomy, vessel_label: int | None) -> None:
    for tube in an.aorta:
        win = cv.window(*tube.bbox())
        if win is not None:
            cv.paint(win, tube.distance(*cv.grid(win)), _HU["vessel"], vessel_label)


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


def _finish(cv: _Canvas, an: _Anatomy) -> None:
    z, y, x = cv.grid((slice(None),) * 3)
    bias = np.ones(cv.image.shape, dtype=np.float32)
    for amp, wz, pz, wy, py, wx, px in an.bias:
        term = np.cos(z * np.float32(wz) + np.float32(pz)) * np.cos(y * np.float32(wy) + np.float32(py))
        bias += np.float32(amp) * term * np.cos(x * np.float32(wx) + np.float32(px))
    cv.image -= np.float32(_HU["air"])
    cv.image *= bias
    cv.image += np.float32(_HU["air"])
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
    shape = _check_shape(shape)
    box = _check_box(box, shape)
    an = _anatomy(int(seed))
    vessel_label = VESSEL if vessels else None
    cv = _Canvas(shape, box)
    _paint_body(cv, an)
    for name, blob in an.others:
        _paint_blob(cv, blob, _HU[name])
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
    return [les.in_voxels(spacing) for les in _anatomy(int(seed)).lesions]


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
    from ..volume import Volume

    shape = _check_shape(shape)
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
    from ..formats import zarr as _zarr

    shape = _check_shape(shape)
    spacing, affine = phantom_geometry(shape)
    names = CLASS_NAMES if vessels else CLASS_NAMES[:3]
    with _zarr.OmeZarrWriter(
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
