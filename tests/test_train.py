"""Train step: one and several steps equal the single-device reference; data pipeline; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_tools import Volume
from workbench.execute.run import make_forward
from workbench.mesh import ShardLayout, parse_mesh
from workbench.training import TrainConfig, build_train_step, create_train_state, model_config, put_batch
from workbench.training.data import augment, make_source, place
from workbench.training.losses import segmentation_loss

# What "partitioned step == single-device step" can mean on any x86-64 CPU:
#
# * The trajectory (parameters and batch statistics after each step) is pinned in float64.
#   In float32 it is CPU-dependent: Adam divides each gradient entry by its own size, so
#   an entry within float32 rounding of zero (the first-step gradient here has one of
#   1.4e-7 beside rounding errors up to 1.9e-7) gets a full-size update of either sign,
#   and summation order differs by CPU (vector width, threading) as it does by mesh. The
#   float32 trajectory test failed that way on an AMD EPYC (3.5e-3 after step 3).
# * In float32 the train step's loss is pinned at step 1 only, to the forward contract
#   (1e-5): it is a forward pass on identical parameters (measured: equal to the last bit,
#   7.6e-8 with --xla_cpu_max_isa=SSE4_2). Later float32 losses inherit the trajectory's
#   CPU dependence: turning the Adam step of the 2 trainable entries with |g| < 2e-6 the
#   other way moves the step-2 loss by 9.9e-6, and the step-3 loss measured 1.2e-5 from
#   the reference with SSE4_2 code and 1.9e-5 with fast math. The float64 test pins them.
# * The first-step gradient (before Adam amplifies anything) is pinned in float32 at
#   GRAD_RTOL_F32 of each leaf's scale, derived below.
PARAM_RTOL_F64 = 1e-6
LOSS_RTOL_F32 = 1e-5
# Rounding: an entry of a kernel gradient sums N = 2·32³ = 65536 voxel terms; float32
# summation in any order errs by ~sqrt(N)·eps = 256 · 1.19e-7 = 3e-5 of the sum of their
# sizes, which the leaf's largest entry bounds from below (measured: 1.8e-6 at most, over
# all cases with default, SSE4_2, single-threaded Eigen and fast-math code and with the
# reference's parameters moved by one ulp).
GRAD_ROUNDING_F32 = 3e-5
# Max-pool near-ties: a gradient entry is a subgradient choice where a 2×2×2 window's two
# largest values are closer than the float32 error of the 108-term convolution feeding the
# pool (worst case 108·2⁻²⁴ = 6.4e-6 of the layer's scale), and another summation order may
# pick the other winner. 68 of the 32768 windows of step 1 are closer than 1e-5; forcing
# every one of them to the other winner (in float64) moves a leaf by at most 2.9e-4 of its
# scale (13 windows closer than 1e-6: 2.6e-5). GRAD_RTOL_F32 ≥ 3 × (2.9e-4 + 3e-5). Any
# partitioning error (a wrong or missing halo, an unsummed shard, unmasked padding) moves
# gradients by 1e-2 or more; the float64 test pins them to 1e-6 through the trajectory.
GRAD_RTOL_F32 = 1e-3
TINY = {"depth": 2, "base_filters": 4, "norm": "batch"}  # batch statistics must match too
CONFIG = TrainConfig(
    data="phantom", resolution=32, batch=2, steps=3, learning_rate=1e-2, model_overrides=TINY, schedule="constant"
)
CONFIG_F64 = CONFIG.replace(model_overrides={**TINY, "dtype": "float64"})
WEIGHTS = (1.0, 8.0, 16.0)
CASES = [("explicit", "2x2x2"), ("gspmd", "2x2x2"), ("explicit", "data=2,z=2,y=2,x=1")]
# float32's own rounding is checked on the explicit backend; GSPMD's float32 training step is
# checked in test_partition (data=2,z=2,y=2,x=1), and its trajectory here in float64.
CASES_F32 = [case for case in CASES if case[0] == "explicit"]


@pytest.fixture(scope="module")
def source():
    return make_source("phantom", 32)


def _train_step(source, backend, mesh, config):
    cfg = model_config(config, 3)
    layout = ShardLayout(source.shape, parse_mesh(mesh), multiple=cfg.multiple)
    return cfg, build_train_step(cfg, config, layout, backend=backend, class_weights=WEIGHTS)


_INITIAL: dict = {}


def _initial_state(config):
    """``create_train_state`` (an eager model init: seconds) once per config, on the host."""
    key = repr(config)
    if key not in _INITIAL:
        _INITIAL[key] = jax.device_get(create_train_state(model_config(config, 3), config))
    return _INITIAL[key]


def _trajectory(source, backend, mesh, steps=3, config=CONFIG):
    """Parameters and batch statistics after each of ``steps`` steps, plus the losses."""
    cfg, ts = _train_step(source, backend, mesh, config)
    state = jax.device_put(_initial_state(config), ts.state_sharding)
    out = []
    for s in range(steps):
        x, y = put_batch(ts, *source.train_batch(s, CONFIG.batch))
        state, metrics = ts.fn(state, x, y)
        out.append((jax.device_get(state["params"]), jax.device_get(state["batch_stats"]), float(metrics["loss"])))
    return out


def _first_step(source, backend, mesh, config=CONFIG):
    """(loss, gradient) of the first train step, and the step's own loss and gradient norm.

    The gradient is taken of the loss the train step differentiates (workbench.training.step's
    ``loss_fn``), rebuilt from the public pieces it is made of: the training forward of
    :func:`make_forward`, :func:`segmentation_loss` with the class weights and Dice weight,
    and the step's dropout key. Before the optimizer: no clipping, no Adam.
    """
    cfg, ts = _train_step(source, backend, mesh, config)
    forward = make_forward(cfg, ts.layout, backend=backend, train=True)[0]
    state = jax.device_put(_initial_state(config), ts.state_sharding)
    images, labels = put_batch(ts, *source.train_batch(0, config.batch))
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss_fn(params):
        logits, _ = forward({"params": params, "batch_stats": state["batch_stats"]}, images, rng)
        return segmentation_loss(
            logits, labels, ts.layout.volume_shape, class_weights=WEIGHTS, dice_weight=config.dice_weight
        )[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(state["params"])
    loss, grads = float(loss), jax.device_get(grads)
    _, metrics = ts.fn(state, images, labels)  # donates state: last
    return loss, grads, float(metrics["loss"]), float(metrics["grad_norm"])


@pytest.fixture(scope="module")
def reference_first_step(source):
    return _first_step(source, "reference", "1x1x1")


@pytest.fixture(scope="module")
def reference_f64(source):
    with jax.enable_x64(True):
        return _trajectory(source, "reference", "1x1x1", config=CONFIG_F64)


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


def _frozen(path) -> bool:
    """A convolution bias the optimizer freezes (it feeds a norm layer): zero gradient in exact arithmetic."""
    keys = [getattr(k, "key", str(k)) for k in path]
    return keys[-1] == "bias" and keys[-2].startswith("conv")


def _gradient_errors(grads, ref_grads):
    """{leaf: max |g - g_ref| / max |g_ref|}; the frozen conv biases (zero in exact arithmetic,
    rounding noise in float32) are checked against the largest gradient of the model."""
    pairs = [
        (path, np.asarray(g), np.asarray(r))
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads))
    ]
    overall = max(float(np.abs(r).max()) for _, _, r in pairs)
    errors = {}
    for path, g, r in pairs:
        name = jax.tree_util.keystr(path)
        if _frozen(path):
            noise = max(float(np.abs(g).max()), float(np.abs(r).max())) / overall
            assert noise <= GRAD_ROUNDING_F32, f"{name}: {noise:.1e} of the largest gradient, should be ~0"
            continue
        errors[name] = float(np.abs(g - r).max()) / float(np.abs(r).max())
    assert len(errors) >= len(pairs) // 2
    return errors


@pytest.mark.parametrize("backend,mesh", CASES_F32)
def test_first_step_matches_single_device_reference(source, reference_first_step, backend, mesh):
    """float32: the step's loss and the gradient it takes equal the reference's (see the top)."""
    loss, grads, step_loss, step_grad_norm = _first_step(source, backend, mesh)
    ref_loss, ref_grads, ref_step_loss, _ = reference_first_step
    # the gradient below is the one the train step takes
    assert loss == pytest.approx(step_loss, rel=LOSS_RTOL_F32)
    assert float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))) == pytest.approx(
        step_grad_norm, rel=LOSS_RTOL_F32
    )
    assert step_loss == pytest.approx(ref_step_loss, rel=LOSS_RTOL_F32)
    errors = _gradient_errors(grads, ref_grads)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL_F32, f"{worst}: relative error {errors[worst]:.2e} > {GRAD_RTOL_F32}"


@pytest.mark.parametrize("backend,mesh", CASES + [("gspmd", "1x2x4")])
def test_steps_match_single_device_reference_float64(source, reference_f64, backend, mesh):
    """Float64 compute: no rounding to flip max-pool winners or Adam's near-zero steps, the
    trajectories agree to 1e-6 (explicit and gspmd on 2x2x2, explicit with a data axis, gspmd on 1x2x4)."""
    with jax.enable_x64(True):
        out = _trajectory(source, backend, mesh, config=CONFIG_F64)
        init = _initial_state(CONFIG_F64)["params"]
    ref = reference_f64
    assert ref[0][2] > ref[-1][2], "the reference loss does not decrease"
    for step, ((params, stats, loss), (rp, rs, rl)) in enumerate(zip(out, ref), start=1):
        assert loss == pytest.approx(rl, rel=1e-6), f"step {step}"  # the loss is reduced in float32
        assert _max_rel_error(params, rp) <= PARAM_RTOL_F64, f"params after step {step}"
        assert _max_rel_error(stats, rs) <= PARAM_RTOL_F64, f"batch stats after step {step}"
    # the parameters moved: the comparison is not between initial values
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(out[-1][0]), jax.tree.leaves(init)))
    assert moved > 1e-3


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


def test_batch_stream_order_does_not_depend_on_workers(source):
    """Batches prepared by several threads come in step order, equal to the one-thread stream."""
    from workbench.training.data import BatchStream

    streams = [BatchStream(source, 1, start=3, seed=0, augment_data=True, workers=w) for w in (1, 3)]
    try:
        for step in range(3, 7):
            (a_img, a_lab), (b_img, b_lab) = (s.next() for s in streams)
            expected = source.train_batch(step, 1, seed=0, augment_data=True)
            np.testing.assert_array_equal(a_img, expected[0])
            np.testing.assert_array_equal(b_img, expected[0])
            np.testing.assert_array_equal(b_lab, a_lab)
    finally:
        for s in streams:
            s.close()


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


def test_batch_blocks_equal_slices_of_the_whole_batch(source):
    """A device's block, made from its own box only (phantoms rendered block by block; a flip or
    rotation changes which box is read; noise hashed by position), equals that slice of the whole
    augmented batch, zero-padded where the box reaches past the volume."""
    from workbench.training.data import batch_blocks, pad_to

    images, labels = source.train_batch(3, 2, seed=5)
    images, labels = pad_to(images, (40, 32, 32)), pad_to(labels, (40, 32, 32))
    keys = [
        ((0, 1), (0, 16), (16, 32), (8, 24)),
        ((1, 2), (24, 40), (0, 32), (0, 32)),
        ((0, 2), (32, 40), (0, 8), (0, 8)),
    ]
    for key, (image, label) in zip(keys, batch_blocks(source, 3, 2, keys, seed=5)):
        index = tuple(slice(lo, hi) for lo, hi in key)
        np.testing.assert_array_equal(image, images[index])
        np.testing.assert_array_equal(label, labels[index])
    assert not hasattr(source, "_cached")  # rendered per block, never as a whole case


def test_place_puts_each_block_on_its_device():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

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
    from workbench.training.config import parse_dice_classes

    assert parse_dice_classes("2") == (2,) and parse_dice_classes("1,2") == (1, 2)
    for bad in ("0", "x", "2,2"):
        with pytest.raises(Exception, match="Dice classes|class indices"):
            parse_dice_classes(bad)
    cfg = TrainConfig(dice_classes=(2,))
    assert TrainConfig.from_dict(cfg.as_dict()) == cfg


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


# -- every source reads only its blocks ---------------------------------------------------
def _labelled_npz(tmp_path, n=2, shape=(20, 18, 22), *, compressed=True, classes=3):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        image = rng.normal(100, 30, shape).astype(np.float32)
        labels = rng.integers(0, classes, shape).astype(np.uint8)
        path = tmp_path / f"case{i}.{'zarr' if compressed == 'zarr' else 'npz'}"
        if compressed == "zarr":  # an OME-Zarr store with a label image
            from data_tools import write_volume

            write_volume(Volume(image, labels=labels, class_names=("bg", "a", "b")), path)
        else:
            (np.savez_compressed if compressed else np.savez)(path, image=image, labels=labels)
        paths.append(str(path))
    return paths


def _octants(shape, batch=2):
    halves = [((0, n // 2), (n // 2, n)) for n in shape]
    return [((0, batch), z, y, x) for z in halves[0] for y in halves[1] for x in halves[2]]


@pytest.mark.parametrize(
    ("kind", "resolution"),
    [("npz", None), ("npz", 16), ("stored-npz", 24), ("zarr", 16), ("mni:16", None), ("phantom:24", 16)],
)
def test_every_source_blocks_equal_slices_of_the_whole_batch(tmp_path, kind, resolution):
    """Labelled .npz paths (compressed or stored, native or resampled), OME-Zarr, mni and resampled
    phantoms: the 2x2x2 split's blocks equal the slices of the whole batch bitwise, and the
    whole batch is the old whole-volume preparation (resample + model_input) within float32
    rounding."""
    from data_tools.io import load_input
    from workbench.training.data import _case_from_volume, batch_blocks

    compressed = "zarr" if kind == "zarr" else kind == "npz"
    data = _labelled_npz(tmp_path, compressed=compressed) if kind.endswith(("npz", "zarr")) else kind
    source = make_source(data, resolution)
    images, labels = source.train_batch(2, 2, seed=4)
    for key, (image, label) in zip(_octants(source.shape), batch_blocks(source, 2, 2, _octants(source.shape), seed=4)):
        index = tuple(slice(lo, hi) for lo, hi in key)
        np.testing.assert_array_equal(image, images[index])
        np.testing.assert_array_equal(label, labels[index])
    plain, _ = source.train_batch(2, 1, seed=4, augment_data=False)
    if kind.startswith("phantom"):
        volume, name = __import__("data_tools").make_phantom(24, seed=1_000_000 + 2 * 64, vessels=False), "p"
    elif kind.startswith("mni"):
        volume, name, resolution = load_input("mni"), "mni", 16
    else:
        order = np.random.default_rng([7, 2]).permutation(len(source.train))
        volume, name = load_input(data[order[0]]), "v"
    old = _case_from_volume(volume, resolution, name)
    np.testing.assert_allclose(plain[0, ..., 0], old.image, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(source.train_batch(2, 1, seed=4, augment_data=False)[1][0], old.labels)
    assert not hasattr(source, "_cached")  # never a whole case


def test_a_process_reads_only_its_boxes(tmp_path, monkeypatch):
    """Counting the voxels read (data_tools.io.read_box) for one octant of a 2x2x2 mesh: the
    image and labels each read at most the octant plus the interpolation margin, never the
    whole volume; the survey when the source is made reads each voxel about once."""
    import data_tools.io as dio

    read = []
    real = dio.read_box

    def spy(path, box, **kw):
        read.append((kw.get("member"), int(np.prod([hi - lo for lo, hi in box]))))
        return real(path, box, **kw)

    monkeypatch.setattr(dio, "read_box", spy)
    paths = _labelled_npz(tmp_path, n=1, shape=(32, 32, 32))
    from workbench.training.data import batch_blocks

    source = make_source(paths, 24)
    whole = 32**3
    assert sum(n for m, n in read if m is None) <= 1.2 * whole and sum(n for m, n in read if m) == whole  # survey
    read.clear()
    key = [((0, 1), (0, 12), (12, 24), (0, 12))]
    batch_blocks(source, 0, 1, key, seed=0, augment_data=False)
    image = [n for m, n in read if m is None]
    labels = [n for m, n in read if m == "labels"]
    assert len(image) == len(labels) == 1
    assert max(image + labels) <= 18**3 < whole / 5, read  # (16 + 2)³ of 32³ around one 12³ octant


def test_survey_is_the_same_for_any_process_count(tmp_path):
    """P processes each survey slabs p, p+P, …; combined in slab order the statistics are
    bitwise those of one process."""
    from workbench.training.cases import _finish, survey_rows

    paths = _labelled_npz(tmp_path, n=2, shape=(24, 16, 16))
    one = make_source(paths, 16)
    expected = [dict(r.stats) for r in one.train + one.held_out]
    for count in (2, 3):
        source = make_source(paths, 16)
        readers = source.train + source.held_out
        for r in readers:
            r.stats = None
        parts = [survey_rows(readers, p, count) for p in range(count)]
        jobs = parts[0][0]
        rows = np.stack([parts[k % count][1][k] for k in range(len(jobs))])
        _finish(jobs, rows)
        assert [r.stats for r in readers] == expected


def test_bad_labels_in_files_fail_with_the_same_message(tmp_path):
    bad = np.zeros((8, 8, 8), np.uint8)
    bad[5, 6, 7] = 9
    good = tmp_path / "good.npz"
    np.savez(good, image=np.ones((8, 8, 8), np.float32), labels=np.zeros((8, 8, 8), np.uint8),
             class_names=np.array(["bg", "a", "b"]))  # fmt: skip
    np.savez_compressed(tmp_path / "bad.npz", image=np.ones((8, 8, 8), np.float32), labels=bad)
    with pytest.raises(ValueError, match=r"labels of .*bad.npz hold values \[9\] outside the class range 0..2"):
        make_source([str(good), str(tmp_path / "bad.npz")])
    np.savez(tmp_path / "float.npz", image=np.ones((8, 8, 8), np.float32), labels=bad.astype(np.float32))
    with pytest.raises(ValueError, match="have dtype float32; pass integer class labels"):
        make_source([str(tmp_path / "float.npz")])
    np.save(tmp_path / "plain.npy", np.ones((8, 8, 8), np.float32))
    with pytest.raises(ValueError, match="has no labels"):
        make_source([str(tmp_path / "plain.npy")])


class _WholeOnly:
    """A source that gives whole held-out cases only (no ``eval_block``)."""

    def __init__(self, source):
        self.shape, self.eval_cases = source.shape, source.eval_cases


@pytest.mark.parametrize(
    ("kind", "mesh"),
    [
        ("phantom", "2x2x2"),
        ("phantom", "data=2,z=2,y=2,x=1"),
        ("whole-only", "2x2x2"),
        ("npz", "2x2x2"),
        ("dataset", "2x2x2"),
    ],  # fmt: skip
)
def test_held_out_evaluation_by_blocks_equals_the_whole_case_evaluation(kind, mesh, make_model, tmp_path):
    """What a multi-process run evaluates (each process reads its own blocks of each held-out
    case and counts on them; the counts are summed) equals the whole-case evaluation: Dice per
    case and pooled, accuracy and HD95 (from the blocks' surfaces), to the last bit. Phantoms (3 cases: with data=2 the last
    batch holds one empty case), a source without box reads, resampled .npz files and a
    resampled dataset's validation case."""
    from data_tools import write_phantom_dataset
    from workbench.training.datasets import make_source as make_any_source
    from workbench.training.evaluation import _WholeHeldOut, evaluate, evaluate_blocks, held_out_blocks

    model = make_model("small", 0, perturbed_model=True)
    if kind in ("phantom", "whole-only"):
        source, n = make_source("phantom:24"), 3
    elif kind == "npz":
        source, n = make_source(_labelled_npz(tmp_path, n=5), resolution=16), 1
    else:
        data = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=5, test=0, shapes=24)
        source, n = make_any_source(str(data), resolution=16), 1
    whole = evaluate(model, source.eval_cases(n), mesh, class_names=source.class_names)
    assert any(v is not None for v in whole["hd95_mm"].values())  # an HD95 to compare
    held = held_out_blocks(_WholeOnly(source) if kind == "whole-only" else source, n)
    assert isinstance(held, _WholeHeldOut) == (kind == "whole-only")
    assert evaluate_blocks(model, held, n, mesh, class_names=source.class_names) == whole
    if kind == "phantom":  # not trivial
        assert len(set(whole["dice_per_case"]["organ"])) == 3 and 0 < whole["accuracy"] < 1
