"""One case's prediction on its own grid and its row of scores (``workbench evaluate``).

Shared by the one-process evaluation (:mod:`workbench.app.evaluation`) and the per-process
one (:mod:`workbench.app.evaluation_blocks`, for cases whose prediction needs whole logits).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["_prediction", "_score", "_finite", "_mean"]


def _prediction(logits: np.ndarray, meta: dict, order=None) -> np.ndarray:
    """uint8 labels on the case's original grid from logits on its resampled grid (``meta``:
    a prepared case's metadata): the softmax probabilities resampled (linear) onto the
    original grid, then argmax. Region outputs (``order``: nnU-Net's regions_class_order):
    each region's sigmoid resampled, then painted in order where > 0.5 (later regions win)."""
    from data_tools.datasets import resample_onto

    grid = tuple(meta["grid_shape"])
    logits = logits[: grid[0], : grid[1], : grid[2]]
    same = grid == tuple(meta["original_shape"]) and np.allclose(meta["grid_affine"], meta["original_affine"])
    if order is not None:
        seg = None
        for i, label in enumerate(order):
            prob = (1.0 / (1.0 + np.exp(-logits[..., i]))).astype(np.float32)
            if not same:
                prob = resample_onto(np.ascontiguousarray(prob), meta["grid_affine"], meta["original_shape"],
                                     meta["original_affine"], order=1)  # fmt: skip
            seg = np.zeros(prob.shape, np.uint8) if seg is None else seg
            seg[prob > 0.5] = label
        return seg
    if same:
        return logits.argmax(-1).astype(np.uint8)
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted, dtype=np.float32)
    probs /= probs.sum(-1, keepdims=True)
    best = labels = None
    for k in range(probs.shape[-1]):
        p = resample_onto(np.ascontiguousarray(probs[..., k]), meta["grid_affine"], meta["original_shape"],
                          meta["original_affine"], order=1)  # fmt: skip
        if best is None:
            best, labels = p, np.zeros(p.shape, np.uint8)
        else:
            better = p > best
            labels[better] = k
            np.maximum(best, p, out=best)
    return labels


def _score(pred, truth, spacing, class_names) -> dict:
    from workbench.training.losses import dice_per_class, hausdorff95

    ml = float(np.prod(spacing)) / 1000.0
    dice = dice_per_class(pred, truth, len(class_names))
    row = {}
    for k, name in enumerate(class_names[1:], start=1):
        p, t = pred == k, truth == k
        row[f"dice_{name}"] = _finite(dice[k])
        row[f"hd95_mm_{name}"] = _finite(hausdorff95(p, t, spacing))
        row[f"pred_ml_{name}"] = float(p.sum()) * ml
        row[f"true_ml_{name}"] = float(t.sum()) * ml
    return row


def _finite(v):
    return None if v is None or not math.isfinite(v) else float(v)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None
