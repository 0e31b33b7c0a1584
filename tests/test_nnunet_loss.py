"""nnU-Net's training loss (deep supervision, DC_and_CE / DC_and_BCE) against nnU-Net 2.8.1's own
values (tests/fixtures/nnunet_loss, made by nnU-Net's _build_loss and batchgeneratorsv2's transforms),
with padding garbage beyond the volume at every level that must not count."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workbench.training.nnunet_losses import LossSpec, deep_supervision_weights, downsample_labels, nnunet_loss

HERE = Path(__file__).parent / "fixtures" / "nnunet_loss"
GOLDEN = np.load(HERE / "losses.npz")
META = json.loads((HERE / "losses.json").read_text())


def _loss_spec(kind: str) -> LossSpec:
    k = META["kinds"][kind]
    scales = tuple(tuple(int(round(1 / s)) for s in scale) for scale in k["deep_supervision_scales"])
    regions = tuple(tuple(r) for r in k["foreground_regions"]) if k["foreground_regions"] else None
    return LossSpec("sigmoid" if regions else "softmax", scales, regions, batch_dice=META["batch_dice"])


def test_deep_supervision_weights_are_nnunets():
    for kind in META["kinds"].values():
        np.testing.assert_allclose(deep_supervision_weights(len(kind["weights"])), kind["weights"], rtol=1e-15)


@pytest.mark.parametrize("kind", ["softmax", "regions"])
def test_loss_and_gradients_equal_nnunets_with_padding_masked(kind):
    loss = _loss_spec(kind)
    labels = GOLDEN[f"{kind}_labels"]
    volume = labels.shape[1:]
    padded = (6, 12, 16)  # multiples of the lowest scale (2, 4, 4), beyond the volume on every axis
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, int(labels.max()) + 1, (labels.shape[0], *padded)).astype(np.int32)
    garbage[:, : volume[0], : volume[1], : volume[2]] = labels
    heads, inner = [], []
    for i, scale in enumerate(loss.scales):
        head = GOLDEN[f"{kind}_head{i}"]
        shape = tuple(p // f for p, f in zip(padded, scale))
        big = rng.normal(0, 50, (head.shape[0], *shape, head.shape[-1]))
        big[:, : head.shape[1], : head.shape[2], : head.shape[3]] = head
        heads.append(jnp.asarray(big))
        inner.append(head.shape[1:4])
    # the down-sampled labels inside the volume are nnU-Net's targets' positions
    assert downsample_labels(jnp.asarray(labels), loss.scales[1]).shape[1:] == inner[1]

    def f(hs):
        return nnunet_loss(hs, jnp.asarray(garbage), volume, loss)[0]

    with jax.enable_x64(True):
        value, grads = jax.value_and_grad(f)(tuple(jnp.asarray(h, jnp.float64) for h in heads))
    # nnU-Net's Dice sums in float32 (MemoryEfficientSoftDiceLoss: dtype=torch.float32)
    np.testing.assert_allclose(float(value), float(GOLDEN[f"{kind}_loss"]), rtol=2e-6)
    for i, g in enumerate(grads):
        z, y, x = inner[i]
        expected = GOLDEN[f"{kind}_grad{i}"]
        scale = np.max(np.abs(expected)) or 1.0
        np.testing.assert_allclose(np.asarray(g)[:, :z, :y, :x], expected, atol=1e-6 * scale, rtol=0)
        outside = np.asarray(g).copy()
        outside[:, :z, :y, :x] = 0
        assert np.all(outside == 0), f"head {i}: padded voxels get gradient"
