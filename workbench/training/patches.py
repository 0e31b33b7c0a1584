"""Patch training: batches of patches cropped from whole cases, as nnU-Net samples them.

:class:`PatchSource` wraps a training :class:`~workbench.training.data.Source` (its
``shape`` becomes the patch) so that the training loop, the partitioned step and the batch
stream run unchanged on patches. Volume ``i`` of step ``s`` of a batch of ``B`` is a patch
of the source's case ``(s, i)``, its box drawn by :func:`patch_box` with nnU-Net's rule
(``nnunetv2/training/dataloading/data_loader.py``, ``nnUNetDataLoader.get_bbox``):

* the last ``B − round(B × (1 − f))`` patches of a batch are forced to hold foreground
  (``f`` = ``foreground_oversampling``, nnU-Net's ``oversample_foreground_percent``, 0.33);
* a random patch has its lower corner uniform in ``[lb, ub]`` per axis, where an axis
  shorter than the patch gets ``lb = −pad // 2`` and ``ub = size + pad // 2 + pad % 2 − patch``
  (``pad = patch − size``; else ``lb = 0, ub = size − patch``);
* a forced patch picks one foreground class present in the case (uniformly), one voxel of
  it (uniformly), and centres the patch on it: ``lo = max(lb, voxel − patch // 2)``; a case
  without foreground falls back to a random patch.

What lies outside the case is image 0 and label 0 (nnU-Net pads the data with 0 and the
segmentation with −1, which its transforms turn into background). Augmentation
(:class:`~workbench.training.augment.Augmentation`) is drawn per patch as per whole volume
and applied to the patch. Everything is deterministic in ``(seed, step, index)``.

Example
-------
>>> source = PatchSource(make_source("phantom:48"), (24, 24, 24), batch=3)   # doctest: +SKIP
>>> image, labels = source.train_block(0, 2, ((0, 24),) * 3)              # doctest: +SKIP
"""

from __future__ import annotations

import threading

import numpy as np

from workbench.errors import UserError

__all__ = [
    "FOREGROUND_OVERSAMPLING",
    "forced_foreground",
    "patch_box",
    "PatchSource",
    "patch_batch",
    "trained_window",
    "check_patch_multiple",
]

#: nnU-Net's ``oversample_foreground_percent``
FOREGROUND_OVERSAMPLING = 0.33


def forced_foreground(index: int, batch: int, fraction: float) -> bool:
    """Whether patch ``index`` of a batch of ``batch`` must hold foreground: nnU-Net's
    ``_oversample_last_XX_percent`` (the last ones, ``index >= round(batch × (1 − fraction))``)."""
    return not index < round(batch * (1 - fraction))


def patch_box(shape, patch, rng: np.random.Generator, labels: np.ndarray | None = None):
    """The patch's box ``((z0, z1), (y0, y1), (x0, x1))`` in a case of ``shape`` (it may reach
    outside the case where the case is smaller than the patch or a forced patch is centred
    near a face). ``labels`` (the case's label map) forces a foreground patch; None: random."""
    pad = [max(0, p - n) for n, p in zip(shape, patch)]
    lbs = [-d // 2 for d in pad]
    ubs = [n + d // 2 + d % 2 - p for n, d, p in zip(shape, pad, patch)]
    lo = None
    if labels is not None:
        present = [int(c) for c in np.unique(labels) if c > 0]
        if present:
            chosen = present[int(rng.integers(len(present)))]
            where = np.flatnonzero(labels == chosen)
            voxel = np.unravel_index(where[int(rng.integers(where.size))], labels.shape)
            lo = [max(lb, int(v) - p // 2) for lb, v, p in zip(lbs, voxel, patch)]
    if lo is None:
        lo = [int(rng.integers(lb, ub + 1)) for lb, ub in zip(lbs, ubs)]
    return tuple((a, a + p) for a, p in zip(lo, patch))


class PatchSource:
    """A training source whose volumes are patches of ``source``'s cases (see the module
    notes); held-out cases stay whole (a patch model is evaluated by sliding windows)."""

    def __init__(self, source, patch, *, batch: int, foreground: float = FOREGROUND_OVERSAMPLING):
        from workbench.execute.windows import triple

        self.source, self.patch, self.batch = source, triple(patch, "patch"), int(batch)
        if not 0.0 <= float(foreground) <= 1.0:
            raise UserError(f"foreground_oversampling={foreground!r} must be in [0, 1] (nnU-Net's default is 0.33)")
        self.foreground = float(foreground)
        self.shape = self.patch
        self.case_shape = tuple(source.shape)
        self.num_classes, self.class_names = source.num_classes, tuple(source.class_names)
        self.channels = getattr(source, "channels", 1)
        self.description = f"{source.description} in {'x'.join(map(str, self.patch))} patches"
        for name in ("regions", "regions_class_order", "meta", "prefetch_workers", "spacing"):
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))
        self._lock = threading.Lock()
        self._cache: dict = {}

    def eval_cases(self, n: int):
        return self.source.eval_cases(n)

    def box(self, step: int, index: int, *, seed: int = 0):
        """The patch box of volume ``index`` of ``step``'s batch (in the case's voxels)."""
        rng = np.random.default_rng([seed, step, index, 0x9A7C4])
        labels = None
        if forced_foreground(index, self.batch, self.foreground):
            labels = self.source.case_block(step, index, tuple((0, n) for n in self.case_shape))[1]
        return patch_box(self.case_shape, self.patch, rng, labels)

    def patch_of(self, step: int, index: int, *, seed: int = 0, augment_data: bool = True):
        """(image f32 (Z, Y, X[, C]), labels u8) of the whole patch ``(step, index)``, augmented."""
        key = (seed, step, index, augment_data)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        box = self.box(step, index, seed=seed)
        inside = tuple((max(lo, 0), min(hi, n)) for (lo, hi), n in zip(box, self.case_shape))
        tail = (self.channels,) if self.channels > 1 else ()
        image = np.zeros((*self.patch, *tail), np.float32)
        labels = np.zeros(self.patch, np.uint8)
        if all(hi > lo for lo, hi in inside):
            img, lab = self.source.case_block(step, index, inside)
            at = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(inside, box))
            image[at], labels[at] = img, lab
        if augment_data:
            from workbench.training.augment import Augmentation

            aug = Augmentation.draw(np.random.default_rng([seed, step, index]))
            image, labels = aug.apply(image, labels, tuple((0, p) for p in self.patch), self.patch)
        with self._lock:
            if len(self._cache) >= 4 * self.batch:
                self._cache.clear()
            self._cache[key] = (image, labels)
        return image, labels

    def train_block(self, step: int, index: int, box, *, seed: int = 0, augment_data: bool = True):
        """``box`` of patch ``(step, index)``: what one device holds of it."""
        image, labels = self.patch_of(step, index, seed=seed, augment_data=augment_data)
        sl = tuple(slice(lo, hi) for lo, hi in box)
        return image[sl], labels[sl]

    def train_batch(self, step: int, batch: int, *, seed: int = 0, augment_data: bool = True):
        """(images f32[B, pz, py, px, C], labels i32[B, pz, py, px]) of ``step``."""
        return patch_batch(self, step, batch, seed=seed, augment_data=augment_data)


def patch_batch(source: PatchSource, step: int, batch: int, *, seed: int = 0, augment_data: bool = True):
    """The whole batch of patches of ``step`` (what the stream's blocks tile)."""
    from workbench.training.data import channels_last

    parts = [source.patch_of(step, i, seed=seed, augment_data=augment_data) for i in range(batch)]
    images = np.stack([channels_last(p[0]) for p in parts]).astype(np.float32)
    return images, np.stack([p[1] for p in parts]).astype(np.int32)


def trained_window(meta: dict):
    """The patch a model was trained on (its checkpoint's ``window``, else its train config's
    ``patch``), or None for a whole-volume model: a patch model is predicted by Gaussian
    sliding windows of that size (:func:`workbench.execute.windows.patch_logits`)."""
    window = (meta or {}).get("window") or {}
    patch = window.get("patch") or ((meta or {}).get("train") or {}).get("patch")
    return tuple(int(v) for v in patch) if patch else None


def check_patch_multiple(patch, multiple) -> None:
    """One :class:`UserError` when a training patch is not a multiple of the network's per-axis
    size multiple (the product of its strides): the step would pad every patch (nnU-Net's
    planner never makes such a patch); the message names the nearest multiples. ``multiple``:
    one per axis, or one int for all three (the presets')."""
    multiple = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    bad = [(p, m) for p, m in zip(patch, multiple) if p % m]
    if bad:
        lower = [max(m, p // m * m) for p, m in zip(patch, multiple)]
        upper = [-(-p // m) * m for p, m in zip(patch, multiple)]
        raise UserError(
            f"--patch {'x'.join(map(str, patch))} is not a multiple of the network's size multiple "
            f"{'x'.join(map(str, multiple))} (the product of its strides per axis), so every patch would be padded; "
            f"use {'x'.join(map(str, lower))} or {'x'.join(map(str, upper))}"
        )
