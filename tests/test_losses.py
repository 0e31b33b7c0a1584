"""Losses and metrics: exact values, masking of padding, host metrics, label checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workbench.errors import UserError
from workbench.training.losses import (
    check_labels,
    confusion_counts,
    dice_from_counts,
    dice_per_class,
    hausdorff95,
    segmentation_loss,
    soft_dice_loss,
    weighted_cross_entropy,
)

WEIGHTS = (1.0, 8.0, 16.0)


def _case(seed=0, shape=(2, 6, 5, 4)):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((*shape, 3)).astype(np.float32)
    labels = rng.integers(0, 3, shape).astype(np.int32)
    return logits, labels


def test_weighted_cross_entropy_matches_numpy():
    logits, labels = _case()
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    w = np.asarray(WEIGHTS)[labels]
    expected = (w * ce).sum() / w.sum()
    got = float(weighted_cross_entropy(logits, labels, labels.shape[1:], WEIGHTS))
    assert got == pytest.approx(expected, rel=1e-6)


def test_padding_does_not_count():
    """Padding with arbitrary logits and labels changes no loss or count (partitioned == reference)."""
    logits, labels = _case(1)
    rng = np.random.default_rng(2)
    big_logits = rng.standard_normal((2, 8, 8, 8, 3)).astype(np.float32) * 10
    big_labels = rng.integers(0, 3, (2, 8, 8, 8)).astype(np.int32)
    big_logits[:, :6, :5, :4] = logits
    big_labels[:, :6, :5, :4] = labels
    shape = (6, 5, 4)
    a = segmentation_loss(logits, labels, shape, class_weights=WEIGHTS, dice_weight=0.2)
    b = segmentation_loss(big_logits, big_labels, shape, class_weights=WEIGHTS, dice_weight=0.2)
    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-6)
    for x, y in zip(confusion_counts(logits, labels, shape), confusion_counts(big_logits, big_labels, shape)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_soft_dice_perfect_and_value():
    _, labels = _case(3)
    perfect = jax.nn.one_hot(labels, 3) * 50.0
    assert float(soft_dice_loss(perfect, labels, labels.shape[1:])) == pytest.approx(0.0, abs=1e-6)
    uniform = jnp.zeros((*labels.shape, 3))
    # p = 1/3 everywhere: dice_c = (2·g/3 + 1) / (n/3 + g + 1) per case and class
    n = np.prod(labels.shape[1:])
    expected = []
    for i in range(labels.shape[0]):
        for c in (1, 2):
            g = (labels[i] == c).sum()
            expected.append((2 * g / 3 + 1) / (n / 3 + g + 1))
    assert float(soft_dice_loss(uniform, labels, labels.shape[1:])) == pytest.approx(1 - np.mean(expected), rel=1e-5)


def test_dice_on_chosen_classes():
    """``classes`` restricts the Dice loss to those foreground classes (the paper: lesion only)."""
    logits, labels = _case(4)
    shape = labels.shape[1:]
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    onehot = np.asarray(jax.nn.one_hot(labels, 3), np.float64)
    inter = (probs * onehot).sum(axis=(1, 2, 3))
    dice = (2 * inter + 1) / (probs.sum(axis=(1, 2, 3)) + onehot.sum(axis=(1, 2, 3)) + 1)  # (N, K)
    lesion = float(soft_dice_loss(logits, labels, shape, classes=(2,)))
    assert lesion == pytest.approx(1 - dice[:, 2].mean(), rel=1e-5)
    both = float(soft_dice_loss(logits, labels, shape, classes=(1, 2)))
    assert both == pytest.approx(float(soft_dice_loss(logits, labels, shape)), rel=1e-6)
    total, parts = segmentation_loss(logits, labels, shape, class_weights=WEIGHTS, dice_weight=0.2, dice_classes=(2,))
    assert float(parts["dice_loss"]) == pytest.approx(lesion, rel=1e-6)
    with pytest.raises(UserError, match="foreground classes 1..2"):
        soft_dice_loss(logits, labels, shape, classes=(3,))


def test_total_is_ce_plus_weighted_dice():
    logits, labels = _case(4)
    total, parts = segmentation_loss(logits, labels, labels.shape[1:], class_weights=WEIGHTS, dice_weight=0.2)
    assert float(total) == pytest.approx(float(parts["ce"]) + 0.2 * float(parts["dice_loss"]), rel=1e-6)


def test_dice_counts_and_host_dice_agree():
    logits, labels = _case(5)
    counts = confusion_counts(logits, labels, labels.shape[1:])
    d = dice_from_counts(*counts)
    pred = logits.argmax(-1)
    for i in range(2):
        np.testing.assert_allclose(d["per_case"][i], dice_per_class(pred[i], labels[i], 3), rtol=1e-6)
    inter = sum(((pred == c) & (labels == c)).sum() for c in [1])
    assert d["pooled"][1] == pytest.approx(2 * inter / ((pred == 1).sum() + (labels == 1).sum()))


def test_dice_absent_class_is_nan():
    pred = np.zeros((4, 4, 4), int)
    out = dice_per_class(pred, pred, 3)
    assert out[0] == 1.0 and np.isnan(out[1]) and np.isnan(out[2])


def test_hausdorff95_known_shift():
    a = np.zeros((20, 20, 20), bool)
    a[5:12, 5:12, 5:12] = True
    b = np.roll(a, 2, axis=0)
    assert hausdorff95(a, a) == 0.0
    assert hausdorff95(a, b) == pytest.approx(2.0)
    assert hausdorff95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert np.isnan(hausdorff95(a, np.zeros_like(a)))


def test_check_labels_messages():
    with pytest.raises(ValueError, match=r"values \[3, 7\] outside the class range 0..2"):
        check_labels(np.array([0, 1, 3, 7]), 3)
    with pytest.raises(ValueError, match="empty"):
        check_labels(np.zeros((0,), np.uint8), 3)
    with pytest.raises(ValueError, match="dtype float32"):
        check_labels(np.zeros(3, np.float32), 3)
