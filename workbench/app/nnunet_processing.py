"""nnU-Net's preprocessing and segmentation rule in numpy, for :mod:`workbench.app.nnunet`.

:func:`preprocess` does what nnU-Net 2.x's ``DefaultPreprocessor`` does to one case for a
configuration (transpose, crop to the non-zero region, per-channel normalisation from the
plans, resampling to the plan's spacing); :func:`postprocess` undoes it on the logits and
applies nnU-Net's segmentation rule (:func:`logits_to_segmentation`). The per-channel
normalisation and the segmentation rule live in :mod:`workbench.model.nnunet_rules` (the
training data and evaluation use them too) and are re-exported here. What differs from
nnU-Net's own code is listed in docs/nnunet.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from workbench.errors import UserError
from workbench.model.nnunet_rules import NORMALISATIONS, logits_to_segmentation, normalisation_scheme, normalise_channel

if TYPE_CHECKING:
    from workbench.app.nnunet import NNUNetFolder

__all__ = [
    "NORMALISATIONS",
    "Preprocessed",
    "normalisation_scheme",
    "normalise_channel",
    "crop_to_nonzero",
    "compute_new_shape",
    "preprocess",
    "logits_to_segmentation",
    "postprocess",
]


def crop_to_nonzero(data: np.ndarray):
    """nnU-Net's ``crop_to_nonzero``: ``(cropped data, non-zero mask inside the box, box)``.

    The mask is the voxels where any channel is non-zero, holes filled; the box is its
    bounding box ((lo, hi) per axis). An all-zero image keeps its whole extent.
    """
    from scipy.ndimage import binary_fill_holes

    mask = np.any(data != 0, axis=0)
    mask = binary_fill_holes(mask)
    where = np.argwhere(mask)
    if where.size == 0:
        box = tuple((0, n) for n in data.shape[1:])
    else:
        box = tuple((int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0)))
    sl = tuple(slice(lo, hi) for lo, hi in box)
    return data[(slice(None), *sl)], mask[sl], box


def compute_new_shape(old_shape, old_spacing, new_spacing) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: ``round(old_spacing / new_spacing * old_shape)`` per axis."""
    return tuple(int(round(s / t * n)) for n, s, t in zip(old_shape, old_spacing, new_spacing))


@dataclass
class Preprocessed:
    """The network's input and what is needed to undo the preprocessing."""

    data: np.ndarray  # (C, Z', Y', X') float32 on the plan's grid
    shape_before_cropping: tuple  # after the transpose
    box: tuple  # crop box in the transposed input, (lo, hi) per axis
    shape_after_cropping: tuple
    spacing: tuple  # the input's spacing, transposed
    target_spacing: tuple
    transpose_forward: tuple
    transpose_backward: tuple

    @property
    def resampled(self) -> bool:
        return tuple(self.data.shape[1:]) != tuple(self.shape_after_cropping)

    def describe(self) -> dict:
        return {
            "transpose_forward": list(self.transpose_forward),
            "crop_box": [list(b) for b in self.box],
            "shape_after_cropping": list(self.shape_after_cropping),
            "input_spacing": [float(s) for s in self.spacing],
            "target_spacing": [float(s) for s in self.target_spacing],
            "network_shape": list(self.data.shape[1:]),
            "resampled": self.resampled,
        }


def preprocess(data: np.ndarray, spacing, folder: NNUNetFolder) -> Preprocessed:
    """nnU-Net's ``DefaultPreprocessor.run_case_npy`` on ``data`` (C, Z, Y, X) with ``spacing``
    (z, y, x): transpose, crop to non-zero, normalise per channel, resample to the plan's spacing
    (only when nnU-Net's new shape differs; here with order-3 splines, see docs/nnunet.md)."""
    from data_tools.preprocess import resample_array

    config, plans = folder.config, folder.plans
    forward = tuple(plans.get("transpose_forward", (0, 1, 2)))
    backward = tuple(plans.get("transpose_backward", (0, 1, 2)))
    data = np.asarray(data).transpose(0, *(i + 1 for i in forward))
    spacing = tuple(float(spacing[i]) for i in forward)
    shape_before = tuple(data.shape[1:])
    data, mask, box = crop_to_nonzero(data)
    shape_after = tuple(data.shape[1:])
    target = tuple(float(s) for s in config.get("spacing", spacing))
    new_shape = compute_new_shape(shape_after, spacing, target)
    schemes = config.get("normalization_schemes") or ["ZScoreNormalization"] * data.shape[0]
    use_mask = config.get("use_mask_for_norm") or [False] * data.shape[0]
    props = plans.get("foreground_intensity_properties_per_channel") or {}
    out = np.empty((data.shape[0], *shape_after), np.float32)
    for c in range(data.shape[0]):
        out[c] = normalise_channel(data[c], schemes[c], properties=props.get(str(c)), use_mask=use_mask[c], mask=mask)
    if tuple(new_shape) != shape_after:
        if min(new_shape) < 1:
            raise UserError(f"resampling {shape_after} from spacing {spacing} to {target} leaves an empty axis")
        out = np.stack([resample_array(ch, new_shape, order=3) for ch in out]).astype(np.float32, copy=False)
    return Preprocessed(out, shape_before, box, shape_after, spacing, target, forward, backward)


def postprocess(logits: np.ndarray, pre: Preprocessed, spec) -> np.ndarray:
    """(Z', Y', X', K) network logits → the segmentation on the input's grid (Z, Y, X)."""
    from data_tools.preprocess import resample_array

    logits = np.moveaxis(np.asarray(logits, np.float32), -1, 0)
    if pre.resampled:
        logits = np.stack([resample_array(ch, pre.shape_after_cropping, order=1) for ch in logits])
    seg = logits_to_segmentation(logits, spec.output_kind, spec.regions_class_order)
    full = np.zeros(pre.shape_before_cropping, seg.dtype)
    full[tuple(slice(lo, hi) for lo, hi in pre.box)] = seg
    return np.ascontiguousarray(full.transpose(pre.transpose_backward))
