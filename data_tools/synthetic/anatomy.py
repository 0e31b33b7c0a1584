"""The random anatomy of a phantom, in millimetres, defined once per seed.

All random choices of a phantom (a few hundred numbers) are drawn here by
:func:`build_anatomy`; they do not depend on the grid, so the same seed gives the same
anatomy at every resolution. :mod:`~data_tools.synthetic.raster` samples it on a grid.
Frame: a ``FIELD_OF_VIEW_MM``-wide cube, axes (z, y, x) in mm, z = 0 inferior, +x the
patient's right, +y anterior.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["FIELD_OF_VIEW_MM", "CLASS_NAMES", "ORGAN", "LESION", "VESSEL", "HU", "Lesion", "Anatomy", "build_anatomy"]

FIELD_OF_VIEW_MM = 400.0
CLASS_NAMES = ("background", "organ", "lesion", "vessel")
ORGAN, LESION, VESSEL = 1, 2, 3
HU = {  # Hounsfield-like intensity per tissue
    "air": -1000.0, "fat": -100.0, "soft": 40.0, "lung": -850.0, "bone": 700.0,
    "disc": 90.0, "kidney": 150.0, "spleen": 50.0, "liver": 100.0, "vessel": 180.0,
}  # fmt: skip
# Lesion diameters in voxels *at 128³* (voxel 3.125 mm): 6.25 mm .. 50 mm.
_LESION_DIAMETERS_AT_128 = (2.0, 2.5, 3.0, 4.0, 5.0, 6.5, 8.0, 10.0, 13.0, 16.0)


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
        q = [(r[0] * dz + r[1] * dy + r[2] * dx) / rad for r, rad in zip(self.rotation, self.radii)]
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
class Anatomy:
    """Every random choice of one phantom, in mm (see :func:`build_anatomy`)."""

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
def build_anatomy(seed: int) -> Anatomy:
    """All random choices of a phantom: a few hundred numbers, independent of shape."""
    rng = np.random.default_rng([seed, 0x70A4])
    c = FIELD_OF_VIEW_MM / 2.0
    body_centre = (float(c + rng.uniform(-8, 8)), float(c + rng.uniform(-6, 6)))
    body_axes = (float(rng.uniform(115, 130)), float(rng.uniform(160, 175)))
    body_wave = (float(rng.uniform(0.02, 0.05)), float(2 * math.pi / rng.uniform(300, 500)),
                 float(rng.uniform(0, 2 * math.pi)))  # fmt: skip
    body_bumps = tuple((k, float(rng.uniform(0.01, 0.04)), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 4, 5))
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
    return Anatomy(body_centre, body_axes, body_wave, body_bumps, fat, liver, others, spine,
                   aorta, tuple(hepatic), lesions, bias, noise_key)  # fmt: skip
