"""Train step: one and several steps equal the single-device reference; data pipeline; bad input."""

import jax
import numpy as np
import pytest

from data_tools import Volume
from workbench.training.data import augment, make_source, place
from workbench.mesh import ShardLayout, parse_mesh
from workbench.training import TrainConfig, build_train_step, create_train_state, model_config, put_batch

# float32: the CT window clips air to one exact value, so max-pool meets exact and near
# ties whose winner can flip with summation order (explicit and gspmd agree with each
# other); the float64 test below shows the partitioned step itself is exact.
PARAM_RTOL = 5e-4
PARAM_RTOL_F64 = 1e-6
TINY = {"depth": 2, "base_filters": 4, "norm": "batch"}  # batch statistics must match too
CONFIG = TrainConfig(data="phantom", resolution=32, batch=2, steps=3, learning_rate=1e-2,
                     model_overrides=TINY, schedule="constant")
WEIGHTS = (1.0, 8.0, 16.0)


@pytest.fixture(scope="module")
def source():
    return make_source("phantom", 32)


def _trajectory(source, backend, mesh, steps=3, config=CONFIG):
    """Parameters and batch statistics after each of ``steps`` steps, plus the losses."""
    cfg = model_config(config, 3)
    layout = ShardLayout(source.shape, parse_mesh(mesh), multiple=cfg.multiple)
    ts = build_train_step(cfg, config, layout, backend=backend, class_weights=WEIGHTS)
    state = jax.device_put(create_train_state(cfg, config), ts.state_sharding)
    out = []
    for s in range(steps):
        x, y = put_batch(ts, *source.train_batch(s, CONFIG.batch))
        state, metrics = ts.fn(state, x, y)
        out.append((jax.device_get(state["params"]), jax.device_get(state["batch_stats"]), float(metrics["loss"])))
    return out


@pytest.fixture(scope="module")
def reference(source):
    return _trajectory(source, "reference", "1x1x1")


def _max_rel_error(tree, ref_tree):
    worst = 0.0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref_tree)):
        scale = float(np.abs(b).max())
        err = float(np.abs(a - b).max())
        if scale == 0.0:  # the frozen conv biases: exactly zero on every backend
            assert err == 0.0, jax.tree_util.keystr(path)
            continue
        worst = max(worst, err / scale)
    return worst


@pytest.mark.parametrize("backend,mesh", [("explicit", "2x2x2"), ("gspmd", "2x2x2"),
                                          ("explicit", "data=2,z=2,y=2,x=1")])
def test_steps_match_single_device_reference(source, reference, backend, mesh):
    out = _trajectory(source, backend, mesh)
    assert reference[0][2] > reference[-1][2], "the reference loss does not decrease"
    for step, ((params, stats, loss), (rp, rs, rl)) in enumerate(zip(out, reference), start=1):
        assert loss == pytest.approx(rl, rel=1e-5), f"step {step}"
        assert _max_rel_error(params, rp) <= PARAM_RTOL, f"params after step {step}"
        assert _max_rel_error(stats, rs) <= PARAM_RTOL, f"batch stats after step {step}"
    # the parameters moved: the comparison is not between initial values
    init = create_train_state(model_config(CONFIG, 3), CONFIG)["params"]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[-1][0]), jax.tree.leaves(init)))
    assert moved > 1e-3


@pytest.mark.parametrize("backend,mesh", [("explicit", "2x2x2"), ("gspmd", "1x2x4")])
def test_steps_match_single_device_reference_float64(source, backend, mesh):
    """Float64 compute: no rounding to flip max-pool winners, the trajectories agree to 1e-6."""
    config = CONFIG.replace(model_overrides={**TINY, "dtype": "float64"})
    with jax.enable_x64(True):
        ref = _trajectory(source, "reference", "1x1x1", config=config)
        out = _trajectory(source, backend, mesh, config=config)
    for step, ((params, stats, loss), (rp, rs, rl)) in enumerate(zip(out, ref), start=1):
        assert loss == pytest.approx(rl, rel=1e-6), f"step {step}"  # the loss is reduced in float32
        assert _max_rel_error(params, rp) <= PARAM_RTOL_F64, f"params after step {step}"
        assert _max_rel_error(stats, rs) <= PARAM_RTOL_F64, f"batch stats after step {step}"


def test_batches_are_deterministic_and_fresh(source):
    a_img, a_lab = source.train_batch(5, 2)
    b_img, b_lab = source.train_batch(5, 2)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, _ = source.train_batch(6, 2)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (2, 32, 32, 32, 1) and a_lab.dtype == np.int32
    assert set(np.unique(a_lab)) <= {0, 1, 2} and (a_lab == 1).any()
    held = source.eval_cases(2)
    assert [c.name for c in held] == ["phantom seed 0", "phantom seed 1"]


def test_augment_keeps_image_and_labels_aligned():
    labels = np.zeros((16, 12, 8), np.uint8)
    labels[2:6, 1:4, 5:8] = 1
    image = labels.astype(np.float32) * 10.0
    seen = set()
    for seed in range(12):
        img, lab = augment(image, labels, np.random.default_rng(seed))
        assert img.shape == lab.shape == labels.shape
        np.testing.assert_array_equal(img > 5.0, lab == 1)
        seen.add(lab.tobytes())
        again = augment(image, labels, np.random.default_rng(seed))
        np.testing.assert_array_equal(again[0], img)
    assert len(seen) > 4  # flips and rotations vary


def test_place_puts_each_block_on_its_device():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from workbench.mesh import build_mesh

    mesh = build_mesh("2x2x2")
    array = np.arange(2 * 8 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 8, 1)
    placed = place(array, NamedSharding(mesh, P("data", "z", "y", "x", None)))
    assert len(placed.addressable_shards) == 8
    for shard in placed.addressable_shards:
        assert shard.data.shape == (2, 4, 4, 4, 1)
        np.testing.assert_array_equal(np.asarray(shard.data), array[shard.index])


def _vol(shape, labels=None, names=None):
    image = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return Volume(image, labels=labels, class_names=names)


def test_bad_training_data_messages():
    with pytest.raises(ValueError, match="no training data"):
        make_source([])
    with pytest.raises(ValueError, match="has no labels"):
        make_source([_vol((8, 8, 8))])
    with pytest.raises(ValueError, match=r"different shapes .* --resolution"):
        make_source([_vol((8, 8, 8), np.zeros((8, 8, 8), np.uint8)), _vol((8, 8, 12), np.zeros((8, 8, 12), np.uint8))])
    bad = np.zeros((8, 8, 8), np.uint8)
    bad[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"values \[5\] outside the class range 0..2"):
        make_source([_vol((8, 8, 8), np.zeros((8, 8, 8), np.uint8), ("bg", "a", "b")), _vol((8, 8, 8), bad)])
    with pytest.raises(ValueError, match="labels have shape"):  # a mismatched pair fails at the boundary
        _vol((8, 8, 8), np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="phantom:N"):
        make_source("phantom:abc")


def test_bad_config_messages():
    with pytest.raises(ValueError, match="does not split over data-parallel 2"):
        TrainConfig(batch=3, data_parallel=2)
    with pytest.raises(ValueError, match="optimizer='lion'"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)


def test_model_input_windows_ct_and_zscores_the_rest():
    from data_tools.synthetic import make_phantom
    from workbench.training.data import is_ct, model_input

    phantom = make_phantom(32, seed=0, vessels=False)
    assert is_ct(phantom)
    x = model_input(phantom)
    assert x.dtype == np.float32 and float(x.min()) == -2.0 and float(x.max()) == 2.0  # air and bone clip
    liver = float(np.median(x[phantom.labels == 1]))
    assert abs(liver - (100 - 40) / 400 * 4) < 0.15  # ~100 HU → 0.6 in the abdomen window
    air = np.full((8, 8, 8), -1000.0, np.float32)
    air[2:6, 2:6, 2:6] = 60.0
    hu = Volume(air, spacing=(1, 1, 1))
    assert is_ct(hu)  # reaches air and goes above water: Hounsfield units
    mri = Volume(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32) * 800, spacing=(1, 1, 1))
    assert not is_ct(mri)
    z = model_input(mri)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4
    tagged = hu.replace(metadata={"modality": "MR"})
    assert not is_ct(tagged)  # DICOM Modality wins over the intensity heuristic
