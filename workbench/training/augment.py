"""Training augmentation as data: which box a device reads, and per-voxel changes.

An :class:`Augmentation` is a flip or not per axis (a 180° rotation is two flips), an
intensity scale and shift, and noise hashed from the voxel's position
(:func:`hashed_noise`), so a block of an augmented volume is made from that block's data
alone and equals the same slice of the whole augmented volume (see
:mod:`workbench.training.data`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Augmentation", "augment", "hashed_noise"]


@dataclass(frozen=True)
class Augmentation:
    """One volume's random augmentation: random flips and a 180° rotation (together: a
    flip or not per axis), intensity scale and shift, and noise of level ``sigma``
    (approximately Gaussian: the mean of 4 uniforms hashed from ``noise_key`` and the
    voxel's position, scaled to unit variance)."""

    flips: tuple[bool, bool, bool] = (False, False, False)
    scale: float = 1.0
    shift: float = 0.0
    sigma: float = 0.0
    noise_key: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Augmentation:
        flips = [bool(rng.random() < 0.5) for _ in range(3)]
        if rng.random() < 0.5:  # a 180° rotation in a plane flips both of its axes
            for axis in [(0, 1), (0, 2), (1, 2)][int(rng.integers(3))]:
                flips[axis] = not flips[axis]
        scale, shift, sigma = rng.uniform(0.9, 1.1), rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.05)
        return cls(tuple(flips), float(scale), float(shift), float(sigma), int(rng.integers(1 << 62)))

    def source_box(self, box, shape):
        """The box of the unaugmented volume that ends up at ``box`` once flipped."""
        return tuple((n - hi, n - lo) if f else (lo, hi) for (lo, hi), n, f in zip(box, shape, self.flips))

    def apply(self, image: np.ndarray, labels: np.ndarray, box, shape):
        """Augment the block read at :meth:`source_box`; the result is ``box`` of the augmented volume.
        ``image`` is (Z, Y, X) or (Z, Y, X, C) (the same scale and shift, each channel its own noise).

        Written into one new float32 array, the noise added a slab at a time, so the
        transient memory is the block plus a bounded slab (not several block-sized
        temporaries): the same floats as ``image * scale + shift + sigma * noise``.
        """
        axes = tuple(a for a in range(3) if self.flips[a])
        if axes:
            image, labels = np.flip(image, axes), np.flip(labels, axes)
        if image.dtype != np.float32:
            image = image.astype(np.float32)
        out = np.multiply(image, np.float32(self.scale))
        out += np.float32(self.shift)
        (z0, z1), (y0, y1), (x0, x1) = box
        rows = max(1, _SLAB_VOXELS // max(1, (y1 - y0) * (x1 - x0)))
        for z in range(z0, z1, rows):
            slab = ((z, min(z + rows, z1)), (y0, y1), (x0, x1))
            if out.ndim == 3:
                out[z - z0 : slab[0][1] - z0] += np.float32(self.sigma) * hashed_noise(shape, slab, self.noise_key)
                continue
            for c in range(out.shape[-1]):  # channels (last axis): noise of their own, channel 0's as one channel's
                noise = hashed_noise(shape[:3], slab, self.noise_key + c)
                out[z - z0 : slab[0][1] - z0, ..., c] += np.float32(self.sigma) * noise
        return out, np.ascontiguousarray(labels)


_SLAB_VOXELS = 1 << 16  # noise made 64 Ki voxels at a time (about 2 MiB of uint64 temporaries)


def hashed_noise(shape, box, key: int) -> np.ndarray:
    """Zero-mean, unit-variance noise for ``box`` of a ``shape`` volume: a function of
    (``key``, voxel index) only, so any block equals the slice of the whole field."""
    (z0, z1), (y0, y1), (x0, x1) = box
    _, ny, nx = shape
    h = (
        np.arange(z0, z1, dtype=np.uint64)[:, None, None] * np.uint64(ny * nx)
        + np.arange(y0, y1, dtype=np.uint64)[None, :, None] * np.uint64(nx)
        + np.arange(x0, x1, dtype=np.uint64)[None, None, :]
    )
    h += np.uint64(key % (1 << 64))  # splitmix64
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    total = sum(((h >> np.uint64(16 * i)) & np.uint64(0xFFFF)).astype(np.float32) for i in range(4))
    # 4 uniforms on 0..65535: mean 4 * 32767.5, variance 4 * (65536² - 1) / 12
    return (total - np.float32(4 * 32767.5)) * np.float32(1.0 / np.sqrt(4 * (65536.0**2 - 1) / 12))


def augment(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Random flips, a 180° rotation, intensity scale/shift and noise (:class:`Augmentation`).

    The same ``rng`` state gives the same result: batches are identical on every mesh.
    """
    whole = tuple((0, n) for n in image.shape)
    return Augmentation.draw(rng).apply(image, labels, whole, image.shape)
