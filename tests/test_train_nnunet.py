"""Training nnU-Net's planned networks: the partitioned train step equals the single-device
reference (float64 gradients within 1e-6), on uneven shapes and anisotropic strides, plain and
residual-encoder networks, softmax and region outputs, deep supervision on, both backends."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workbench.mesh import ShardLayout, parse_mesh
from workbench.model.spec import NetworkSpec
from workbench.training import TrainConfig
from workbench.training.models import NNUNetConfig
from workbench.training.state import create_train_state
from workbench.training.step import build_train_step, put_batch

VOLUME = (5, 11, 13)  # uneven on every axis; the multiple is (2, 4, 4)
ANISO = dict(kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3)], strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)], features=[4, 8, 8])
PLAIN = NNUNetConfig(
    NetworkSpec.plain(in_channels=1, num_outputs=3, blocks=[2, 2, 2], output_names=("background", "a", "b"), **ANISO),
    "float64",
)
REGIONS = NNUNetConfig(
    NetworkSpec.residual(
        in_channels=2,
        num_outputs=2,
        blocks=[1, 2, 2],
        output_kind="sigmoid",
        output_names=("whole", "core"),
        regions_class_order=(1, 2),
        **ANISO,
    ),
    "float64",
    regions=((1, 2), (2,)),
)
# (backend, mesh): uneven splits (3 over z, data=2), anisotropic strides, both partitioned backends
CASES = {
    "plain": [("explicit", "data=2,z=3,y=1,x=1")],
    "regions": [("explicit", "2x2x2"), ("gspmd", "data=2,z=1,y=2,x=2")],
}
TC = TrainConfig(steps=1, batch=2, optimizer="sgd", learning_rate=1.0, clip_norm=0.0)


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 1, (2, *VOLUME, config.in_channels))
    labels = rng.integers(0, 3, (2, *VOLUME)).astype(np.int32)
    labels[:, :2, :4] = 0  # some structure: a background block
    return images, labels


def _step(config, backend, mesh):
    """(loss, gradient) of the first train step on ``backend``/``mesh``: with SGD at learning
    rate 1 and no clipping the first update is minus the gradient (the conv biases feeding an
    InstanceNorm are frozen: zero gradient in exact arithmetic, and no update)."""
    with jax.enable_x64(True):
        spec = parse_mesh(mesh) if backend != "reference" else parse_mesh("1x1x1")
        layout = ShardLayout(VOLUME, spec, multiple=config.multiple)
        tc = TC.replace(backend=backend, mesh=mesh if backend != "reference" else "1x1x1", data_parallel=spec.data)
        ts = build_train_step(config, tc, layout)
        params = jax.tree.map(lambda a: np.asarray(a, np.float64), create_train_state(config, tc)["params"])
        state = jax.device_put(create_train_state(config, tc, variables={"params": params}), ts.state_sharding)
        images, labels = put_batch(ts, *_batch(config))
        new, metrics = ts.fn(state, images, labels)
        grads = jax.device_get(jax.tree.map(lambda a, b: a - b, params, new["params"]))
        norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads))))
        assert norm == pytest.approx(float(metrics["grad_norm"]), rel=1e-9)  # only frozen leaves are left out
        return float(metrics["loss"]), grads


@pytest.fixture(scope="module", params=["plain", "regions"])
def case(request):
    config = PLAIN if request.param == "plain" else REGIONS
    return request.param, config, _step(config, "reference", "1x1x1")


def test_partitioned_step_equals_reference_float64(case):
    name, config, (ref_loss, ref_grads) = case
    largest = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(ref_grads))
    assert largest > 1e-3
    for backend, mesh in CASES[name]:
        loss, grads = _step(config, backend, mesh)
        assert loss == pytest.approx(ref_loss, rel=1e-9), (backend, mesh)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            err = float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
            assert err <= 1e-6, f"{backend} {mesh} {jax.tree_util.keystr(path)}: {err:.2e}"


FOLDER = (
    Path(__file__).parent
    / "fixtures"
    / "nnunet"
    / "results"
    / "Dataset903_ThickMRI"
    / "nnUNetTrainer__nnUNetPlans__3d_fullres"
)


def test_finetune_step_starts_from_the_imported_nnunet_weights_and_changes_them():
    """``--checkpoint NNUNET_FOLDER``: the first step's loss is nnU-Net's loss of the imported model
    (its logits are nnU-Net's, tests/test_nnunet.py), and the step moves its weights."""
    from workbench.execute.nnunet import apply_nnunet
    from workbench.model.nnunet import load_nnunet_folder
    from workbench.training.config import model_config
    from workbench.training.nnunet_losses import nnunet_loss
    from workbench.training.nnunet_train import nnunet_weights

    tc = TrainConfig(init_checkpoint=str(FOLDER), steps=1, mesh="2x1x1", backend="gspmd", learning_rate=1e-3)
    config = model_config(tc, 3)
    assert config.spec.in_channels == 2 and config.regions == ((1, 2), (2,)) and config.batch_dice is False
    imported = load_nnunet_folder(FOLDER)
    volume = (6, 24, 16)  # multiples of the plan's (2, 8, 8); 2x1x1 pads z to 8
    rng = np.random.default_rng(5)
    images = rng.normal(0, 1, (1, *volume, 2)).astype(np.float32)
    labels = rng.integers(0, 3, (1, *volume)).astype(np.int32)
    heads = apply_nnunet(imported, images, backend="reference", deep_supervision=True)
    expected = float(nnunet_loss([jnp.asarray(h) for h in heads], jnp.asarray(labels), volume, config.loss_spec())[0])
    layout = ShardLayout(volume, parse_mesh("2x1x1"), multiple=config.multiple)
    ts = build_train_step(config, tc, layout)
    start = nnunet_weights(tc, config)
    state = jax.device_put(create_train_state(config, tc, variables=start), ts.state_sharding)
    new, metrics = ts.fn(state, *put_batch(ts, images, labels))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
    for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(imported.variables["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    moved = [
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(start["params"]))
    ]
    assert max(moved) > 1e-4  # Adam at 1e-3: about 1e-3 per trained leaf
