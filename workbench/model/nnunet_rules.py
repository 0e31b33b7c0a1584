"""nnU-Net's per-channel normalisation and segmentation rule, in numpy (no JAX).

Shared by the inference of nnU-Net training folders (:mod:`workbench.app.nnunet_processing`)
and the training data and evaluation of datasets with several channels or region labels
(:mod:`workbench.training.cases`, :mod:`workbench.training.evaluation`):

* :func:`normalisation_scheme`: the scheme nnU-Net's planner picks for a ``channel_names`` entry;
* :func:`normalise_channel`: one channel as that scheme computes it (nnU-Net's
  ``ImageNormalization`` classes), optionally with a whole image's statistics for a block of it;
* :func:`logits_to_segmentation`: nnU-Net's ``LabelManager.convert_logits_to_segmentation``
  (softmax argmax, or regions painted in ``regions_class_order``).
"""

from __future__ import annotations

import numpy as np

from workbench.errors import UserError

__all__ = ["NORMALISATIONS", "normalisation_scheme", "normalise_channel", "logits_to_segmentation"]

#: nnU-Net's normalisation schemes this module applies (others are refused by name).
NORMALISATIONS = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization")


#: nnU-Net's ``channel_name_to_normalization_mapping`` (keys casefolded; any other name: z-score).
_SCHEME_OF_CHANNEL = {"ct": "CTNormalization", "nonorm": "NoNormalization", "zscore": "ZScoreNormalization",
                      "rescale_to_0_1": "RescaleTo01Normalization"}  # fmt: skip


def normalisation_scheme(channel_name: str) -> str:
    """nnU-Net's ``get_normalization_scheme``: the scheme its planner picks for a
    ``channel_names`` entry (``CT`` → ``CTNormalization``, ``noNorm``, ``zscore``,
    ``rescale_to_0_1``, case-insensitive; anything else → ``ZScoreNormalization``)."""
    return _SCHEME_OF_CHANNEL.get(str(channel_name).casefold(), "ZScoreNormalization")


def normalise_channel(image: np.ndarray, scheme: str, *, properties: dict | None = None, use_mask=False, mask=None,
                      stats: dict | None = None):  # fmt: skip
    """One channel as nnU-Net's normalisation ``scheme`` computes it (float32).

    ``CTNormalization``: clip to the plans' ``percentile_00_5`` / ``percentile_99_5`` of the
    foreground, then ``(x - mean) / max(std, 1e-8)`` with the plans' mean and std.
    ``ZScoreNormalization``: the image's own mean and std (numpy float32, as nnU-Net), or with
    ``use_mask`` (the plans' ``use_mask_for_norm``) those over ``mask`` (the non-zero region,
    nnU-Net's ``seg >= 0``), only the voxels inside changed. ``RescaleTo01Normalization``:
    ``(x - min) / max(max - min, 1e-8)``. ``NoNormalization``: float32 only.

    ``stats`` (``mean``, ``std``, ``min``, ``max`` of the whole image): normalise ``image``,
    a block of it, with the whole image's numbers (z-score and rescale), so that blocks
    equal the slices of the normalised image (the training data's block-by-block reading).
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
        mean, std = (image.mean(), image.std()) if stats is None else (stats["mean"], stats["std"])
        image -= np.float32(mean)
        image /= np.float32(max(std, 1e-8))
        return image
    if scheme == "RescaleTo01Normalization":
        lo, hi = (image.min(), image.max()) if stats is None else (stats["min"], stats["max"])
        image -= np.float32(lo)
        image /= np.float32(max(hi - lo, 1e-8))
        return image
    if scheme == "NoNormalization":
        return image
    raise UserError(f"normalisation {scheme!r} is not supported; supported: {', '.join(NORMALISATIONS)}")


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
