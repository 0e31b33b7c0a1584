"""Losses and metrics for segmentation, reduced over the whole volume and batch.

Device side (inside a jitted step, on global arrays): every reduction is a sum over
the whole (batch, Z, Y, X) array followed by one division, and voxels outside the
original volume are masked out, so a partitioned run (whose arrays carry extra padding
and are split over devices) computes the same value as the single-device reference.

* :func:`weighted_cross_entropy`: ``sum(w[label] * CE) / sum(w[label])`` over valid voxels
  (the paper weighted organ ×8 and lesion ×16).
* :func:`soft_dice_loss`: ``1 - mean`` over cases and foreground classes of
  ``(2 Σ p·g + s) / (Σ p + Σ g + s)`` with softmax probabilities ``p``.
* :func:`segmentation_loss`: ``CE + dice_weight × Dice`` (paper: 0.2).
* :func:`confusion_counts`: hard (argmax) intersection / predicted / true voxel counts
  per case and class, from which :func:`dice_from_counts` gives per-case and pooled Dice.

Host side (numpy, for evaluation): :func:`dice_per_class`, :func:`accuracy`,
:func:`hausdorff95`.

Example
-------
>>> logits = jnp.zeros((1, 4, 4, 4, 3)); labels = jnp.zeros((1, 4, 4, 4), jnp.int32)
>>> round(float(weighted_cross_entropy(logits, labels, (4, 4, 4), (1.0, 8.0, 16.0))), 4)
1.0986
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from workbench.errors import UserError

__all__ = [
    "valid_mask",
    "weighted_cross_entropy",
    "soft_dice_loss",
    "segmentation_loss",
    "confusion_counts",
    "dice_from_counts",
    "dice_per_class",
    "accuracy",
    "hausdorff95",
    "check_labels",
]

DICE_SMOOTH = 1.0


def valid_mask(array_shape: Sequence[int], volume_shape: Sequence[int]):
    """(1, Z', Y', X') float32: 1 inside the original ``volume_shape``, 0 in the padding."""
    import jax.numpy as jnp
    from jax import lax

    shape = (1, *array_shape)
    mask = None
    for dim in range(3):
        inside = lax.broadcasted_iota(jnp.int32, shape, dim + 1) < int(volume_shape[dim])
        mask = inside if mask is None else mask & inside
    return mask.astype(jnp.float32)


def _prepare(logits, labels, volume_shape):
    import jax
    import jax.numpy as jnp

    # float32 at least (bfloat16 logits are promoted); a float64 model (verification) keeps
    # float64, so its loss does not round the trajectory the float64 tests pin.
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits = logits.astype(dtype)
    num_classes = logits.shape[-1]
    mask = valid_mask(logits.shape[1:4], volume_shape).astype(dtype)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    return logits, mask, onehot


def weighted_cross_entropy(logits, labels, volume_shape, class_weights):
    """Class-weighted softmax cross-entropy, weighted mean over the valid voxels.

    ``logits`` (N, Z', Y', X', K) and integer ``labels`` (N, Z', Y', X') may be padded
    beyond ``volume_shape`` (Z, Y, X); padded voxels do not count.
    """
    import jax
    import jax.numpy as jnp

    logits, mask, onehot = _prepare(logits, labels, volume_shape)
    weights = jnp.asarray(class_weights, logits.dtype)
    w = jnp.sum(onehot * weights, axis=-1) * mask
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    return jnp.sum(w * ce) / jnp.sum(w)


def soft_dice_loss(logits, labels, volume_shape, *, smooth: float = DICE_SMOOTH, classes=None):
    """1 − mean soft Dice over cases and foreground classes (class 0 excluded), or over
    ``classes`` only (the paper: the lesion class)."""
    import jax
    import jax.numpy as jnp

    logits, mask, onehot = _prepare(logits, labels, volume_shape)
    m = mask[..., None]
    probs = jax.nn.softmax(logits, axis=-1) * m
    gt = onehot * m
    axes = (1, 2, 3)
    inter = jnp.sum(probs * gt, axis=axes)  # (N, K)
    denom = jnp.sum(probs, axis=axes) + jnp.sum(gt, axis=axes)
    dice = (2.0 * inter + smooth) / (denom + smooth)
    if classes is not None:
        if not all(1 <= int(c) < dice.shape[-1] for c in classes):
            raise UserError(f"Dice classes {tuple(classes)} must be foreground classes 1..{dice.shape[-1] - 1}")
        return 1.0 - jnp.mean(dice[:, [int(c) for c in classes]])
    return 1.0 - jnp.mean(dice[:, 1:]) if dice.shape[-1] > 1 else 1.0 - jnp.mean(dice)


def segmentation_loss(logits, labels, volume_shape, *, class_weights, dice_weight: float, dice_classes=None):
    """``(total, {"ce": ..., "dice_loss": ...})`` with total = CE + dice_weight × Dice loss
    (Dice over ``dice_classes``, default every foreground class)."""
    ce = weighted_cross_entropy(logits, labels, volume_shape, class_weights)
    dice = soft_dice_loss(logits, labels, volume_shape, classes=dice_classes)
    return ce + dice_weight * dice, {"ce": ce, "dice_loss": dice}


def confusion_counts(logits, labels, volume_shape):
    """Hard-prediction counts per case and class: (intersection, predicted, true), each (N, K)."""
    import jax
    import jax.numpy as jnp

    num_classes = logits.shape[-1]
    mask = valid_mask(logits.shape[1:4], volume_shape)[..., None]
    pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), num_classes, dtype=jnp.float32) * mask
    gt = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask
    axes = (1, 2, 3)
    return jnp.sum(pred * gt, axis=axes), jnp.sum(pred, axis=axes), jnp.sum(gt, axis=axes)


def dice_from_counts(inter, pred, true) -> dict:
    """Per-case Dice (N, K) and pooled Dice (K,) from :func:`confusion_counts` (numpy).

    A class absent from both prediction and truth scores NaN for that case (undefined),
    and is left out of means; pooled Dice sums the counts over cases first.
    """
    inter, pred, true = (np.asarray(a, np.float64) for a in (inter, pred, true))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_case = np.where(pred + true > 0, 2 * inter / (pred + true), np.nan)
        tot = pred.sum(0) + true.sum(0)
        pooled = np.where(tot > 0, 2 * inter.sum(0) / tot, np.nan)
    return {"per_case": per_case, "pooled": pooled}


# -- host metrics -------------------------------------------------------------------------
def check_labels(labels: np.ndarray, num_classes: int, *, name: str = "labels") -> np.ndarray:
    """Integer labels in ``0..num_classes-1`` or a ValueError naming the bad values."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise UserError(f"{name} are empty (shape {labels.shape}); pass a non-empty label map")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool:
        raise UserError(f"{name} have dtype {labels.dtype}; pass integer class labels (e.g. uint8)")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        bad = np.unique(labels[(labels < 0) | (labels >= num_classes)])[:8].tolist()
        raise UserError(
            f"{name} hold values {bad} outside the class range 0..{num_classes - 1}; remap them "
            f"or train a model with num_classes > {hi}"
        )
    return labels


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) hard Dice of one case; NaN for a class absent from both."""
    if pred.shape != truth.shape:
        raise UserError(f"prediction shape {pred.shape} differs from the truth shape {truth.shape}")
    out = np.full(num_classes, np.nan)
    for k in range(num_classes):
        p, t = pred == k, truth == k
        s = int(p.sum()) + int(t.sum())
        if s:
            out[k] = 2.0 * int((p & t).sum()) / s
    return out


def accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of voxels whose predicted class is right."""
    return float(np.mean(np.asarray(pred) == np.asarray(truth)))


def hausdorff95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th percentile symmetric surface distance (mm) between two boolean masks.

    NaN when either mask is empty (undefined); 0 when they are equal.
    """
    from scipy import ndimage

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        return float("nan")
    if np.array_equal(pred, truth):
        return 0.0

    def surface(mask):
        return mask & ~ndimage.binary_erosion(mask, border_value=0)

    sp, st = surface(pred), surface(truth)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    distances = np.concatenate([dist_to_t[sp], dist_to_p[st]])
    return float(np.percentile(distances, 95))
