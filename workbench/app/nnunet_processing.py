"""nnU-Net's preprocessing and segmentation rule in numpy, for :mod:`workbench.app.nnunet`.

:func:`preprocess` does what nnU-Net 2.x's ``DefaultPreprocessor`` does to one case for a
configuration (transpose, crop to the non-zero region, per-channel normalisation from the
plans, resampling to the plan's spacing); :func:`postprocess` undoes it on the logits and
applies nnU-Net's segmentation rule (:func:`logits_to_segmentation`). What differs from
nnU-Net's own code is listed in docs/nnunet.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.app.nnunet import NNUNetFolder

__all__ = [
    "NORMALISATIONS",
    "Preprocessed",
    "normalise_channel",
    "crop_to_nonzero",
    "compute_new_shape",
    "preprocess",
    "logits_to_segmentation",
    "postprocess",
]

#: nnU-Net's normalisation schemes this module applies (others are refused by name).
NORMALISATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")


# -- preprocessing (nnU-Net's DefaultPreprocessor, numpy) -------------------------------------------
def normalise_channel(image: np.ndarray, scheme: str, *, properties: dict | None = None, use_mask=False, mask=None):
    """One channel as nnU-Net's normalisation ``scheme`` computes it (float32).

    ``CTNormalization``: clip to the plans' ``percentile_00_5`` / ``percentile_99_5`` of the
    foreground, then ``(x - mean) / max(std, 1e-8)`` with the plans' mean and std.
    ``ZScoreNormalization``: the image's own mean and std (numpy float32, as nnU-Net), or with
    ``use_mask`` (the plans' ``use_mask_for_norm``) those over ``mask`` (the non-zero region,
    nnU-Net's ``seg >= 0``), only the voxels inside changed. ``RescaleTo01Normalization``:
    ``(x - min) / max(max - min, 1e-8)``. ``NoNormalization``: float32 only.
    """
    image = np.array(image, dtype=np.float32)  # a copy: nnU-Net normalises its own copy in place
    if scheme == "CTNormalization":
        if not properties:
            raise UserError("CTNormalization needs the plans' foreground_intensity_properties_per_channel")
        np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
        image -= properties["mean"]
        image /= max(properties["std"], 1e-8)
        return image
    if scheme == "ZScoreNormalization":
        if use_mask and mask is not None:
            mask = np.asarray(mask, bool)
            values = image[mask]
            mean, std = values.mean(), values.std()
            image[mask] = (values - mean) / max(std, 1e-8)
            return image
        mean, std = image.mean(), image.std()
        image -= mean
        image /= max(std, 1e-8)
        return image
    if scheme == "RescaleTo01Normalization":
        lo, hi = image.min(), image.max()
        image -= lo
        image /= max(hi - lo, 1e-8)
        return image
    if scheme == "NoNormalization":
        return image
    raise UserError(f"normalisation {scheme!r} is not supported; supported: {', '.join(NORMALISATIONS)}")


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


# -- the segmentation (nnU-Net's LabelManager) -------------------------------------------------------
def logits_to_segmentation(logits: np.ndarray, output_kind: str, regions_class_order=None) -> np.ndarray:
    """nnU-Net's ``LabelManager.convert_logits_to_segmentation`` on (K, Z, Y, X) logits.

    Softmax outputs: the argmax of the probabilities. Region (sigmoid) outputs: a zero map on
    which each region ``i`` paints ``regions_class_order[i]`` where ``sigmoid > 0.5``, in
    order, so later regions overwrite earlier ones. uint8 (uint16 from 255 labels on).
    """
    logits = np.asarray(logits, np.float32)
    if output_kind == "sigmoid":
        order = list(regions_class_order or [])
        if len(order) != logits.shape[0]:
            raise UserError(f"{logits.shape[0]} region outputs but regions_class_order has {len(order)} entries")
        dtype = np.uint8 if max(order, default=0) < 255 else np.uint16
        seg = np.zeros(logits.shape[1:], dtype)
        for i, label in enumerate(order):
            prob = np.float32(1) / (np.float32(1) + np.exp(-logits[i]))
            seg[prob > 0.5] = label
        return seg
    shifted = logits - logits.max(0, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(0, keepdims=True)
    return probs.argmax(0).astype(np.uint8 if logits.shape[0] <= 255 else np.uint16)


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
