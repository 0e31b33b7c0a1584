"""nnU-Net's training losses on padded, partitioned heads: deep supervision, Dice + CE / BCE.

What nnU-Net 2.8's ``nnUNetTrainer._build_loss`` builds, reduced over the whole padded global
array with the padding masked at every level, so a partitioned step (per-shard sums, then
the partitioner's all-reduce) computes the single-device value:

* softmax outputs: ``DC_and_CE_loss``: cross-entropy (mean over voxels) + nnU-Net's
  ``MemoryEfficientSoftDiceLoss`` (softmax probabilities, background left out, smooth 1e-5,
  Dice over the whole batch when the plan's ``batch_dice``), weights 1 : 1. The Dice term is
  ``-mean Dice`` as in nnU-Net, so the loss may be negative.
* region outputs (dataset.json labels that are lists): ``DC_and_BCE_loss``: one sigmoid per
  region, binary cross-entropy with logits (mean over voxels and regions) + the same soft Dice
  on the sigmoids with every region counted; the region targets are made here from the
  integer labels (``isin(labels, region)``, nnU-Net's ``ConvertSegmentationToRegionsTransform``).
* deep supervision: one term per head (highest resolution first), the targets down-sampled to
  the head's cumulative scale as batchgeneratorsv2's ``DownsampleSegForDSTransform`` does
  (nearest-exact: voxel ``f·i + f // 2`` of each block of ``f``), the padding mask down-sampled
  the same way, weights ``1 / 2^i`` with the lowest resolution's set to 0, normalised to 1.

Example
-------
>>> deep_supervision_weights(3)
(0.6666666666666666, 0.3333333333333333, 0.0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "NNUNET_DICE_SMOOTH",
    "LossSpec",
    "deep_supervision_weights",
    "downsample_labels",
    "level_mask",
    "region_targets",
    "dc_and_ce_loss",
    "dc_and_bce_loss",
    "nnunet_loss",
    "nnunet_confusion_counts",
]

NNUNET_DICE_SMOOTH = 1e-5  # nnUNetTrainer._build_loss: soft_dice_kwargs smooth


@dataclass(frozen=True)
class LossSpec:
    """What the loss needs from the plan: the output kind, the label values of each region
    (region outputs), batch Dice, and each head's cumulative scale (highest resolution first)."""

    output_kind: str
    scales: tuple[tuple[int, int, int], ...]
    regions: tuple[tuple[int, ...], ...] | None = None
    batch_dice: bool = True

    @property
    def weights(self) -> tuple[float, ...]:
        return deep_supervision_weights(len(self.scales))


def deep_supervision_weights(n: int) -> tuple[float, ...]:
    """nnU-Net's deep-supervision weights for ``n`` heads: 1/2^i, the last 0, summing to 1
    (one head: (1.0,))."""
    if n == 1:
        return (1.0,)
    raw = [1.0 / 2**i for i in range(n)]
    raw[-1] = 0.0
    total = sum(raw)
    return tuple(w / total for w in raw)


def downsample_labels(labels, scale: Sequence[int]):
    """(N, Z, Y, X) labels at cumulative ``scale``: voxel ``f·i + f // 2`` per axis (PyTorch's
    ``nearest-exact`` for an integer factor, what nnU-Net's DownsampleSegForDSTransform uses)."""
    index = (slice(None), *(slice(f // 2, None, f) for f in scale))
    return labels[index] if any(f > 1 for f in scale) else labels


def level_mask(array_shape: Sequence[int], volume_shape: Sequence[int], scale: Sequence[int]):
    """(1, Z', Y', X') 0/1 mask of a level of grid ``array_shape``: 1 where the voxel the level
    samples (``f·i + f // 2``) lies inside the original ``volume_shape``."""
    import jax.numpy as jnp
    from jax import lax

    shape = (1, *array_shape)
    mask = None
    for dim in range(3):
        f = int(scale[dim])
        inside = lax.broadcasted_iota(jnp.int32, shape, dim + 1) * f + f // 2 < int(volume_shape[dim])
        mask = inside if mask is None else mask & inside
    return mask


def region_targets(labels, regions, dtype):
    """(N, Z, Y, X, R) 0/1 targets: region r is where the label is one of ``regions[r]``."""
    import jax.numpy as jnp

    return jnp.stack([jnp.isin(labels, jnp.asarray(r)) for r in regions], axis=-1).astype(dtype)


def _soft_dice(probs, target, mask, *, batch_dice: bool, first: int):
    """nnU-Net's MemoryEfficientSoftDiceLoss: ``-mean`` over channels ``first..`` (and cases
    unless ``batch_dice``) of ``(2 Σ p·g + s) / max(Σ g + Σ p + s, 1e-8)`` over masked voxels."""
    import jax.numpy as jnp

    m = mask[..., None]
    probs, target = probs[..., first:] * m, target[..., first:] * m
    axes = (0, 1, 2, 3) if batch_dice else (1, 2, 3)
    inter = jnp.sum(probs * target, axis=axes)
    denom = jnp.sum(target, axis=axes) + jnp.sum(probs, axis=axes) + NNUNET_DICE_SMOOTH
    dc = (2.0 * inter + NNUNET_DICE_SMOOTH) / jnp.maximum(denom, 1e-8)
    return -jnp.mean(dc)


def _dtype(logits):
    import jax.numpy as jnp

    return jnp.promote_types(logits.dtype, jnp.float32)  # float64 models keep float64


def dc_and_ce_loss(logits, labels, mask, *, batch_dice: bool = True):
    """``(CE + Dice loss, CE, Dice loss)`` of softmax ``logits`` (N, Z, Y, X, K) against integer
    ``labels`` (N, Z, Y, X) over the voxels where ``mask`` (broadcastable to the labels) is 1."""
    import jax
    import jax.numpy as jnp

    dtype = _dtype(logits)
    logits = logits.astype(dtype)
    mask = jnp.broadcast_to(mask, labels.shape).astype(dtype)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)
    ce = -jnp.sum(onehot * jax.nn.log_softmax(logits, axis=-1), axis=-1)
    ce = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    dice = _soft_dice(jax.nn.softmax(logits, axis=-1), onehot, mask, batch_dice=batch_dice, first=1)
    return ce + dice, ce, dice


def dc_and_bce_loss(logits, labels, mask, regions, *, batch_dice: bool = True):
    """``(BCE + Dice loss, BCE, Dice loss)`` of region ``logits`` (N, Z, Y, X, R), one sigmoid
    per region, against the region targets of integer ``labels`` (see :func:`region_targets`)."""
    import jax
    import jax.numpy as jnp

    dtype = _dtype(logits)
    logits = logits.astype(dtype)
    mask = jnp.broadcast_to(mask, labels.shape).astype(dtype)
    target = region_targets(labels, regions, dtype)
    # BCEWithLogits, the stable form: max(x, 0) - x·t + log(1 + exp(-|x|))
    bce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    bce = jnp.sum(bce * mask[..., None]) / jnp.maximum(jnp.sum(mask) * logits.shape[-1], 1.0)
    dice = _soft_dice(jax.nn.sigmoid(logits), target, mask, batch_dice=batch_dice, first=0)
    return bce + dice, bce, dice


def nnunet_loss(heads, labels, volume_shape: Sequence[int], loss: LossSpec):
    """``(total, {"ce": ..., "dice_loss": ...})``: the deep-supervision weighted sum over
    ``heads`` (highest resolution first, each padded beyond ``volume_shape`` / its scale) of
    :func:`dc_and_ce_loss` or :func:`dc_and_bce_loss`; ``ce`` and ``dice_loss`` are the
    full-resolution head's parts (what nnU-Net logs)."""
    if len(heads) != len(loss.scales):
        raise ValueError(f"{len(heads)} heads but {len(loss.scales)} deep-supervision scales")
    total, parts = 0.0, None
    for head, scale, weight in zip(heads, loss.scales, loss.weights):
        target = downsample_labels(labels, scale)
        if target.shape != head.shape[:4]:
            raise ValueError(f"head of shape {head.shape} at scale {scale} but labels down-sample to {target.shape}")
        mask = level_mask(head.shape[1:4], volume_shape, scale)
        if loss.output_kind == "sigmoid":
            value, ce, dice = dc_and_bce_loss(head, target, mask, loss.regions, batch_dice=loss.batch_dice)
        else:
            value, ce, dice = dc_and_ce_loss(head, target, mask, batch_dice=loss.batch_dice)
        if parts is None:
            parts = {"ce": ce, "dice_loss": dice}
        if weight:
            total = total + weight * value
    return total, parts


def nnunet_confusion_counts(logits, labels, volume_shape, loss: LossSpec):
    """Hard-prediction counts per case and output (intersection, predicted, true), each (N, K),
    of the full-resolution head: classes by argmax, or regions by sigmoid > 0.5 (logit > 0)
    against the region targets."""
    import jax
    import jax.numpy as jnp

    mask = level_mask(logits.shape[1:4], volume_shape, (1, 1, 1))[..., None].astype(jnp.float32)
    if loss.output_kind == "sigmoid":
        pred = (logits > 0).astype(jnp.float32) * mask
        gt = region_targets(labels, loss.regions, jnp.float32) * mask
    else:
        k = logits.shape[-1]
        pred = jax.nn.one_hot(jnp.argmax(logits, axis=-1), k, dtype=jnp.float32) * mask
        gt = jax.nn.one_hot(labels, k, dtype=jnp.float32) * mask
    axes = (1, 2, 3)
    return jnp.sum(pred * gt, axis=axes), jnp.sum(pred, axis=axes), jnp.sum(gt, axis=axes)
