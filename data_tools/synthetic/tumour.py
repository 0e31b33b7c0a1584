"""A two-channel brain-tumour-like phantom with region labels (nnU-Net's region-based training).

One case is a head (an ellipsoid of brain with a smooth texture) holding one lesion: a
bumpy *whole* lesion (oedema and core) and, inside it, a smaller bumpy *core*. The two
channels see different parts of it, so a network needs both:

- channel 0, ``T2``: the whole lesion is bright (oedema and core alike), brain mid-grey;
- channel 1, ``ADC``: only the core is dark (restricted diffusion), the oedema looks like brain.

Labels: 0 background (and brain), 1 oedema (whole minus core), 2 core. As nnU-Net's
region-based labels (:data:`TUMOUR_LABELS`): ``whole`` = {1, 2}, ``core`` = {2}, painted in
:data:`TUMOUR_REGIONS_CLASS_ORDER`. Intensities get a smooth multiplicative bias field (±8 %)
and Gaussian noise; edges have a one-voxel partial-volume ramp. Everything is drawn from
``numpy.random.default_rng(seed)``, so a seed and shape give the same case every time.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "TUMOUR_CHANNELS",
    "TUMOUR_LABELS",
    "TUMOUR_REGIONS_CLASS_ORDER",
    "TUMOUR_INTENSITY",
    "TUMOUR_NOISE",
    "TUMOUR_SHAPES",
    "TUMOUR_SPACING",
    "make_tumour_phantom",
]

TUMOUR_CHANNELS = ("T2", "ADC")
TUMOUR_LABELS = {"background": 0, "whole": [1, 2], "core": 2}
TUMOUR_REGIONS_CLASS_ORDER = [1, 2]
#: mean intensity per tissue and channel (before the bias field and the noise)
TUMOUR_INTENSITY = {
    "air": (0.0, 0.0),
    "brain": (300.0, 800.0),
    "oedema": (520.0, 800.0),
    "core": (520.0, 380.0),
}
TUMOUR_NOISE = (15.0, 25.0)  # Gaussian noise SD per channel
TUMOUR_SHAPES = ((32, 36, 32), (36, 32, 32), (32, 32, 40), (40, 36, 36), (32, 40, 36), (36, 36, 40))
TUMOUR_SPACING = (1.5, 1.5, 1.5)  # mm


def _bumpy_distance(grid, centre, radius, rng, *, bumps: int = 3, amplitude: float = 0.15):
    """Approximate signed distance (voxels) to a sphere of ``radius`` whose surface is
    modulated by ``bumps`` random low-order waves of relative ``amplitude``."""
    d = [g - c for g, c in zip(grid, centre)]
    rho = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    unit = [di / np.maximum(rho, 1e-6) for di in d]
    surface = np.ones_like(rho)
    for _ in range(bumps):
        w = rng.normal(size=3) * 2.0
        surface = surface + amplitude / bumps * np.sin(w[0] * unit[0] + w[1] * unit[1] + w[2] * unit[2]
                                                       + rng.uniform(0, 2 * np.pi))  # fmt: skip
    return rho - radius * surface


def _smooth_field(grid, shape, rng, amplitude: float):
    """A smooth multiplicative field 1 ± ``amplitude`` (a few low-frequency waves)."""
    field = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), np.float64)
    for _ in range(3):
        k = rng.uniform(0.5, 1.5, size=3) * np.pi / np.asarray(shape)
        field += np.sin(k[0] * grid[0] + k[1] * grid[1] + k[2] * grid[2] + rng.uniform(0, 2 * np.pi))
    return 1.0 + amplitude * field / 3.0


def make_tumour_phantom(shape, *, seed: int = 0):
    """One case: ``(channels float32 (2, Z, Y, X), labels uint8 (Z, Y, X))``.

    Examples
    --------
    >>> image, labels = make_tumour_phantom((32, 32, 32), seed=1)
    >>> image.shape, sorted(np.unique(labels).tolist())
    ((2, 32, 32, 32), [0, 1, 2])
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape {shape} must be three sides of at least 16 voxels")
    rng = np.random.default_rng([20260, seed])
    grid = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij", sparse=True)
    centre = [(n - 1) / 2 for n in shape]
    radii = [0.44 * n * rng.uniform(0.92, 1.0) for n in shape]
    head = (np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))) - 1.0) * min(radii)
    # the lesion: whole radius 6-9 voxels, well inside the head; the core inside the whole
    whole_r = rng.uniform(6.0, 9.0)
    room = [max(0.0, r - whole_r * 1.3 - 1.0) for r in radii]
    lesion_c = [c + rng.uniform(-0.6, 0.6) * m for c, m in zip(centre, room)]
    whole = _bumpy_distance(grid, lesion_c, whole_r, rng)
    core_r = whole_r * rng.uniform(0.5, 0.65)
    core_c = [c + rng.uniform(-0.25, 0.25) * (whole_r - core_r) for c in lesion_c]
    core = _bumpy_distance(grid, core_c, core_r, rng, amplitude=0.1)

    def occupancy(distance):  # partial volume: a linear ramp across one voxel
        return np.clip(0.5 - distance, 0.0, 1.0)

    brain_o, whole_o, core_o = occupancy(head), occupancy(whole) * occupancy(head), occupancy(core)
    core_o = np.minimum(core_o, whole_o)
    texture = _smooth_field(grid, [n / 3 for n in shape], rng, 0.05)  # grey/white-like variation
    bias = _smooth_field(grid, shape, rng, 0.08)
    image = np.empty((2, *shape), np.float32)
    for c in range(2):
        value = TUMOUR_INTENSITY["air"][c] + brain_o * (TUMOUR_INTENSITY["brain"][c] * texture
                                                        - TUMOUR_INTENSITY["air"][c])  # fmt: skip
        value = value + whole_o * (TUMOUR_INTENSITY["oedema"][c] - value)
        value = value + core_o * (TUMOUR_INTENSITY["core"][c] - value)
        value = value * bias + rng.normal(0.0, TUMOUR_NOISE[c], size=shape) * (brain_o > 0)
        image[c] = np.maximum(value, 0.0)
    labels = np.zeros(shape, np.uint8)
    labels[(whole < 0) & (head < 0)] = 1
    labels[(core < 0) & (whole < 0) & (head < 0)] = 2
    return image, labels
