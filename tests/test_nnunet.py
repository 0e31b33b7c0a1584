"""nnU-Net's planned networks: the layer spec against nnU-Net's own builder (the committed
golden fixture, tests/fixtures/nnunet/README.md), weight import and logits against nnU-Net's
outputs, and the partitioned forward and gradients against the single-device reference.

No torch here: everything is read from the fixture's .json and .npz files.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from workbench.errors import InputNotFoundError, UserError
from workbench.execute.nnunet import apply_nnunet, crop_heads, make_nnunet_forward, nnunet_layout
from workbench.mesh import ACTIVATION_SPEC, build_mesh, parse_mesh
from workbench.model.halo import halo_pad
from workbench.model.layers import CONV3_HALO, CONV3_KERNEL
from workbench.model.nnunet import NNUNet, NNUNetModel, load_nnunet_folder, load_nnunet_weights
from workbench.model.nnunet_plans import from_nnunet_arch, from_nnunet_plans, load_plans_file
from workbench.model.spec import NetworkSpec, conv_halo
from workbench.model.unet import PRESETS, UNet3D, UNetConfig

FIXTURE = Path(__file__).parent / "fixtures" / "nnunet"
NETWORKS = json.loads((FIXTURE / "networks.json").read_text())["networks"]
BY_FILE = {n["plans_file"]: n for n in NETWORKS}


GOLDENS = ("plain_thick_mri", "resenc_aniso_ct")
RESULTS = FIXTURE / "results" / "Dataset903_ThickMRI" / "nnUNetTrainer__nnUNetPlans__3d_fullres"


def _plans_spec(entry) -> NetworkSpec:
    return from_nnunet_plans(FIXTURE / entry["plans_file"], FIXTURE / entry["folder"] / "dataset.json")


# -- 1. the layer spec ---------------------------------------------------------------------------


@pytest.mark.parametrize("entry", NETWORKS, ids=[n["plans_file"] for n in NETWORKS])
def test_spec_matches_nnunet_builder(entry):
    """Parameter count, every state_dict key (aliases included), its shape and nnU-Net's order."""
    spec = _plans_spec(entry)
    ref = BY_FILE[entry["same_network_as"]] if entry.get("same_network_as") else entry
    assert spec.network_class == entry["network_class"]
    assert (spec.in_channels, spec.num_outputs) == (entry["input_channels"], entry["num_segmentation_heads"])
    assert spec.num_params == entry["total_params"]
    mine = [[key, list(shape)] + ([alias] if alias else []) for key, shape, alias in spec.state_dict()]
    assert mine == ref["state_dict"]
    assert len(spec.state_dict(aliases=False)) == entry["n_distinct_tensors"]
    # deep-supervision heads: highest resolution first, at the plan's patch size
    patch = entry["patch_size"]
    shapes = [[1, spec.num_outputs, *(p // s for p, s in zip(patch, head.scale))] for head in spec.outputs]
    assert shapes == entry["ds_output_shapes_for_patch"]


@pytest.mark.parametrize("entry", [n for n in NETWORKS if not n.get("same_network_as")], ids=lambda n: n["plans_file"])
def test_flax_parameters_of_the_planned_networks(entry):
    """The Flax module's parameters (shapes only, nothing allocated) are nnU-Net's tensors mapped by
    load_nnunet_weights: same tree, same shapes, nnU-Net's parameter count (up to 101,858,479)."""
    spec = _plans_spec(entry)
    x = jax.ShapeDtypeStruct((1, *spec.multiple, spec.in_channels), jnp.float32)
    shapes = jax.eval_shape(NNUNet(spec).init, jax.random.key(0), x)["params"]
    fake = {key: np.broadcast_to(np.float32(0), shape) for key, shape, _ in spec.state_dict(aliases=False)}
    mapped = load_nnunet_weights(spec, fake)
    assert jax.tree.structure(mapped) == jax.tree.structure(shapes)
    assert jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape, mapped, shapes)) == [True] * len(
        jax.tree.leaves(shapes)
    )
    assert sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == entry["total_params"]


def test_spec_of_the_anisotropic_plan():
    spec = _plans_spec(BY_FILE["aniso_ct/nnUNetPlans.json"])
    assert spec.multiple == (8, 32, 32)
    assert [s.kernel for s in spec.stages][:2] == [(1, 3, 3), (3, 3, 3)]
    first, strided = spec.layers[0], spec.layers[2]
    assert (first.kernel, first.padding, first.halo) == ((1, 3, 3), ((0, 0), (1, 1), (1, 1)), ((0, 0), (1, 1), (1, 1)))
    # the (1,2,2)-strided conv: symmetric k//2 padding (nnU-Net), halo (1, 0) on the strided axes
    assert strided.name == "encoder.stages.1.0.convs.0" and strided.stride == (1, 2, 2)
    assert strided.padding == ((1, 1), (1, 1), (1, 1)) and strided.halo == ((1, 1), (1, 0), (1, 0))
    assert strided.scale == (1, 2, 2)
    ups = [la for la in spec.layers if la.op == "transposed_conv"]
    assert all(la.halo == ((0, 0),) * 3 and la.kernel == la.stride for la in ups)
    assert spec.layers[-1].name == "decoder.seg_layers.4" and spec.layers[-1].output == 0


def test_halo_rule():
    assert conv_halo(3, 1, 1) == (1, 1)
    assert conv_halo(3, 2, 1) == (1, 0)
    assert conv_halo(1, 1, 0) == (0, 0)
    assert conv_halo(5, 2, 2) == (2, 1)
    assert conv_halo(3, 2, 0) == (0, 1)  # what JAX 'SAME' pads at stride 2 on even sizes


def test_regions_and_channels_come_from_dataset_json():
    spec = _plans_spec(BY_FILE["thick_mri/nnUNetPlans.json"])
    assert spec.in_channels == 2 and spec.output_kind == "sigmoid"
    assert spec.output_names == ("whole", "core") and spec.regions_class_order == (1, 2)
    ct = _plans_spec(BY_FILE["iso_ct/nnUNetPlans.json"])
    assert ct.output_kind == "softmax" and ct.num_outputs == 3


def test_receptive_radius_is_one_walk():
    """Two stride-1 3×3×3 convs see 2 voxels; a strided level doubles what lies below it."""
    spec = NetworkSpec.plain(
        in_channels=1, num_outputs=1, kernels=[3, 3], strides=[1, 2], features=[2, 2], blocks=[1, 1]
    )
    # output 0 <- decoder conv [-1, 1] <- up: transposed conv i <- i // 2 -> strided conv [2i - 1, 2i + 1]
    # -> first conv: [-4, 2] for an even output voxel, [-2, 4] for an odd one
    assert spec.receptive_radius() == (4, 4, 4)
    aniso = NetworkSpec.plain(
        in_channels=1, num_outputs=1, kernels=[(1, 3, 3)] * 2, strides=[1, (1, 2, 2)], features=[2, 2], blocks=[1, 1]
    )
    assert aniso.receptive_radius() == (0, 4, 4)


def _forward_reach(spec, axis, q, length):
    """Which outputs of head 0 a change of input voxel ``q`` reaches along ``axis``: the layers'
    dependency rules run forwards on boolean arrays (the spec's walk runs backwards on intervals)."""
    reach = {"input": np.arange(length) == q}
    for la in spec.layers:
        parts = [reach[name] for name in la.inputs]
        x = np.logical_or.reduce(parts) if len(parts) > 1 else parts[0]
        k, s = la.kernel[axis], la.stride[axis]
        if la.op == "conv":
            pad = la.padding[axis][0]
            n = (len(x) + 2 * pad - k) // s + 1
            xp = np.pad(x, (pad, pad))
            x = np.array([xp[i * s : i * s + k].any() for i in range(n)])
        elif la.op == "transposed_conv":
            x = np.repeat(x, s)
        elif la.op in ("avg_pool", "max_pool"):
            x = x.reshape(-1, s).any(axis=1)
        reach[la.name] = x
    return np.flatnonzero(reach[spec.outputs[0].name])


@pytest.mark.parametrize("name", ["resenc_aniso_ct", "plain_thick_mri", "paper", "small"])
def test_receptive_radius_agrees_with_a_forward_reach(name):
    if name in PRESETS:  # the paper U-Net's spec: 51 and 23 voxels (docs/design.md)
        spec = UNetConfig.preset(name).spec()
        assert spec.receptive_radius() == {"paper": (51,) * 3, "small": (23,) * 3}[name]
    else:
        call = json.loads((FIXTURE / "golden" / name / "network.json").read_text())["builder_call"]
        spec = from_nnunet_arch(call["arch_class_name"], call["arch_kwargs"], call["input_channels"], 1)
    radius = spec.receptive_radius()
    for axis in range(3):
        length = 8 * spec.multiple[axis] * (radius[axis] // spec.multiple[axis] + 2)
        centre = length // 2 // spec.multiple[axis] * spec.multiple[axis]
        reach = 0
        for q in range(centre, centre + spec.multiple[axis]):  # every alignment to the stride grid
            hit = _forward_reach(spec, axis, q, length)
            reach = max(reach, int(np.abs(hit - q).max()))
        assert reach == radius[axis], (axis, reach, radius)


@pytest.mark.parametrize("name", ["small", "paper"])
def test_paper_spec_is_the_flax_unet(name):
    """The paper U-Net's layer spec has the Flax model's parameters (85,355 and 5,602,595),
    layer by layer, and the geometry its layers use: 3×3×3 kernels with a (1, 1) halo
    (layers.CONV3_KERNEL / CONV3_HALO), 2×2×2 pooling and up-sampling, size multiple 2^(depth-1)."""
    config = UNetConfig.preset(name)
    spec = config.spec()
    dummy = jax.ShapeDtypeStruct((1, *config.multiples, 1), jnp.float32)
    params = jax.eval_shape(UNet3D(config).init, jax.random.key(0), dummy)["params"]
    flax_count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert spec.num_params == flax_count == {"small": 85_355, "paper": 5_602_595}[name]
    assert spec.multiple == (2 ** (config.depth - 1),) * 3 == config.multiples
    weighted = [la for la in spec.layers if la.weight_shape is not None]
    kernels = {"/".join(k.key for k in path[:-1]) for path, _ in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key == "kernel"}  # fmt: skip
    assert {la.name for la in weighted} == kernels
    for la in weighted:
        module = params
        for key in la.name.split("/"):
            module = module[key]
        flax = module["kernel"].shape  # (*kernel, in, out); the head: (in, out)
        if la.op == "transposed_conv":  # spec: nnU-Net's (in, out, *stride)
            assert (*flax[-2:], *flax[:-2]) == la.weight_shape
        else:  # spec: (out, in, *kernel)
            assert (flax[-1], flax[-2], *(flax[:-2] or (1, 1, 1))) == la.weight_shape
        assert module["bias"].shape == (la.out_channels,) and la.bias
        if la.op == "conv" and la.name != "head":
            assert la.kernel == CONV3_KERNEL and la.halo == ((CONV3_HALO, CONV3_HALO),) * 3
            block, conv = la.name.split("/")
            assert params[block][conv.replace("conv", "norm")]["scale"].shape == (la.out_channels,)
    pools = [la for la in spec.layers if la.op == "max_pool"]
    assert [la.stride for la in pools] == [(2, 2, 2)] * (config.depth - 1)
    assert config.replace(norm="none").spec().num_params == spec.num_params - 2 * sum(
        la.out_channels for la in weighted if la.norm
    )


def _bad_plans(tmp_path, edit, dataset_edit=None):
    plans = json.loads((FIXTURE / "aniso_ct" / "nnUNetPlans.json").read_text())
    dataset = json.loads((FIXTURE / "aniso_ct" / "dataset.json").read_text())
    edit(plans)
    if dataset_edit:
        dataset_edit(dataset)
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    return from_nnunet_plans(tmp_path / "plans.json", tmp_path / "dataset.json")


def test_unknown_network_class_is_one_user_error(tmp_path):
    def edit(plans):
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "my.nets.FancyUNet"

    with pytest.raises(
        UserError,
        match=r"plans network class 'my\.nets\.FancyUNet', which is not supported; supported: .*PlainConvUNet.*ResidualEncoderUNet",
    ):
        _bad_plans(tmp_path, edit)


def test_unknown_planner_is_one_user_error(tmp_path):
    def edit(plans):
        plans["experiment_planner_used"] = "MyPlanner"

    with pytest.raises(
        UserError, match=r"made by planner 'MyPlanner', which is not supported; use plans from one of ExperimentPlanner"
    ):
        _bad_plans(tmp_path, edit)


def test_channel_names_disagreeing_with_the_plans_is_one_user_error(tmp_path):
    def dataset_edit(dataset):
        dataset["channel_names"] = {"0": "CT", "1": "PET"}

    with pytest.raises(
        UserError, match=r"channel_names lists 2 channels \(CT, PET\) but .* normalises 1 \(CTNormalization\)"
    ):
        _bad_plans(tmp_path, lambda plans: None, dataset_edit)


def test_unknown_configuration_is_one_user_error():
    entry = BY_FILE["iso_ct/nnUNetPlans.json"]
    with pytest.raises(UserError, match=r"has no configuration '3d_lowres'; use one of \['2d', '3d_fullres'\]"):
        from_nnunet_plans(FIXTURE / entry["plans_file"], FIXTURE / "iso_ct" / "dataset.json", "3d_lowres")


def test_a_plans_file_finds_its_dataset_json_beside_it_or_inside_it(tmp_path):
    entry = BY_FILE["thick_mri/nnUNetResEncUNetLPlans.json"]
    beside = load_plans_file(FIXTURE / entry["plans_file"])
    assert beside.spec == _plans_spec(entry) and beside.workbench == {}
    assert beside.configuration["patch_size"] == [20, 192, 192]
    plans = json.loads((FIXTURE / entry["plans_file"]).read_text())
    plans["workbench"] = {"dataset": json.loads((FIXTURE / "thick_mri" / "dataset.json").read_text())}
    (tmp_path / "alone.json").write_text(json.dumps(plans))
    assert load_plans_file(tmp_path / "alone.json").spec == beside.spec
    (tmp_path / "bare.json").write_text((FIXTURE / entry["plans_file"]).read_text())
    with pytest.raises(
        InputNotFoundError, match=r"has no dataset\.json beside it .* and none inside it; put the dataset\.json"
    ):
        load_plans_file(tmp_path / "bare.json")


def test_mesh_that_cannot_split_a_stride_level_is_one_user_error():
    spec = _plans_spec(BY_FILE["aniso_ct/nnUNetPlans.json"])  # z strides 1,1,2,2,2,1: multiple 8
    assert spec.check_blocks((32, 64, 64), (2, 2, 1)) == (16, 32, 64)
    with pytest.raises(
        UserError,
        match=r"mesh 4x1x1 cannot split stage 2 along z: blocks of 3 voxels do not start at multiples of its "
        r"cumulative stride 2; use blocks that are multiples of 8 along z \(e\.g\. 8\)",
    ):
        spec.check_blocks((12, 32, 32), (4, 1, 1))


# -- 2. nnU-Net's weights and logits -------------------------------------------------------------


class Golden:
    """One golden network: its spec (from nnU-Net's own builder call), weights, input and outputs."""

    def __init__(self, name):
        folder = FIXTURE / "golden" / name
        self.meta = json.loads((folder / "network.json").read_text())
        call = self.meta["builder_call"]
        self.spec = from_nnunet_arch(
            call["arch_class_name"], call["arch_kwargs"], call["input_channels"], call["output_channels"]
        )
        with np.load(folder / "weights.npz") as data:
            self.weights = {k: data[k] for k in data.files}
        with np.load(folder / "io.npz") as data:
            self.io = {k: data[k] for k in data.files}
        self.x = self.io["input"].transpose(0, 2, 3, 4, 1)  # NCDHW -> NDHWC
        self.params = load_nnunet_weights(self.spec, self.weights)

    def expected(self, i, dtype):
        return self.io[f"output_{i}_{dtype}"].transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def goldens():
    return {name: Golden(name) for name in GOLDENS}


def _cast(tree, dtype):
    return jax.tree.map(lambda a: np.asarray(a, dtype), tree)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", GOLDENS)
def test_imported_weights_reproduce_nnunet_logits(goldens, name, dtype):
    """Every deep-supervision output, against nnU-Net's own (torch) outputs."""
    golden = goldens[name]
    assert golden.spec.num_params == golden.meta["total_params"]
    with jax.enable_x64(dtype == "float64"):
        outputs = jax.jit(NNUNet(golden.spec, dtype=dtype).apply)(
            {"params": _cast(golden.params, dtype)}, golden.x.astype(dtype)
        )
        outputs = [np.asarray(o) for o in outputs]
    assert [list(o.transpose(0, 4, 1, 2, 3).shape) for o in outputs] == golden.meta["output_shapes"]
    bound = 1e-4 if dtype == "float32" else 1e-9
    for i, out in enumerate(outputs):
        expected = golden.expected(i, dtype)
        error = float(np.abs(out - expected).max()) / float(np.abs(expected).max())
        print(f"{name} {dtype} output {i}: max error / scale = {error:.1e}")
        assert error <= bound, (i, error)


def test_training_folder_loads_and_reproduces_its_golden(goldens):
    """nnU-Net's results folder (plans.json, dataset.json, fold_0): the weights are read without
    torch (the .npz beside the .pth) and give the golden's full-resolution logits, partitioned."""
    golden = goldens["plain_thick_mri"]
    model = load_nnunet_folder(RESULTS, fold=0, use_torch=False)
    assert model.spec.output_kind == "sigmoid" and model.spec.output_names == ("whole", "core")
    assert model.spec.stages == golden.spec.stages and model.num_params == golden.meta["total_params"]
    assert model.source.endswith("checkpoint_final_network_weights.npz")
    jax.tree.map(np.testing.assert_array_equal, model.variables["params"], golden.params)
    # nnU-Net's checkpoint, partitioned over 2x2x2, gives nnU-Net's full-resolution logits
    logits = apply_nnunet(model, golden.x, "2x2x2")
    expected = golden.expected(0, "float32")
    assert float(np.abs(logits - expected).max()) <= 1e-4 * float(np.abs(expected).max())


def test_checkpoint_without_torch_or_npz_is_one_user_error(tmp_path):
    folder = tmp_path / RESULTS.name
    shutil.copytree(RESULTS, folder, ignore=shutil.ignore_patterns("*.npz"))
    with pytest.raises(
        UserError,
        match=r"reading .*fold_0/checkpoint_final\.pth needs torch, which is not installed \(or use_torch=False\); "
        r"install torch, or save the checkpoint's network_weights as numpy arrays in .*checkpoint_final_network_weights\.npz",
    ):
        load_nnunet_folder(folder, use_torch=False)
    with pytest.raises(UserError, match=r"has no fold_3; use one of \['fold_0'\]"):
        load_nnunet_folder(folder, fold=3, use_torch=False)


def test_weights_that_do_not_match_the_plan_are_one_user_error(goldens):
    golden = goldens["resenc_aniso_ct"]
    key = "encoder.stages.1.blocks.0.conv1.conv.weight"
    wrong = {**golden.weights, key: np.zeros((8, 4, 1, 3, 3), np.float32)}
    with pytest.raises(
        UserError,
        match=r"tensor 'encoder\.stages\.1\.blocks\.0\.conv1\.conv\.weight' has shape \(8, 4, 1, 3, 3\) but the "
        r"network planned by ResidualEncoderUNet needs \(8, 4, 3, 3, 3\)",
    ):
        load_nnunet_weights(golden.spec, wrong)
    extra = {**golden.weights, "decoder.seg_layers.3.weight": np.zeros((3, 4, 1, 1, 1), np.float32)}
    with pytest.raises(
        UserError, match=r"tensor 'decoder\.seg_layers\.3\.weight' of the weights is not in the network"
    ):
        load_nnunet_weights(golden.spec, extra)
    missing = {k: v for k, v in golden.weights.items() if k != "decoder.transpconvs.1.bias"}
    with pytest.raises(UserError, match=r"the weights lack tensor 'decoder\.transpconvs\.1\.bias' \(8,\)"):
        load_nnunet_weights(golden.spec, missing)
    # aliases (.all_modules.0, decoder.encoder.) and DDP's "module." prefix are accepted
    aliased = {"module." + k.replace(".conv.", ".all_modules.0."): v for k, v in golden.weights.items()}
    jax.tree.map(np.testing.assert_array_equal, load_nnunet_weights(golden.spec, aliased), golden.params)


# -- 3. partitioned, exact -----------------------------------------------------------------------


def _window_blocks(global_x, mesh_shape, widths):
    """What halo_pad must give each shard: its block grown by (lo, hi) per axis, cut from the
    globally zero-padded array, laid out as shard_map's output (blocks side by side)."""
    padded = jnp.pad(global_x, [(0, 0), *widths, (0, 0)])
    block = [s // m for s, m in zip(global_x.shape[1:4], mesh_shape)]
    grown = [b + lo + hi for b, (lo, hi) in zip(block, widths)]
    # per axis, the window of each shard in the padded array: its block start, grown extent
    windows = [[slice(c * b, c * b + g) for c in range(m)] for b, g, m in zip(block, grown, mesh_shape)]
    return jnp.concatenate(
        [
            jnp.concatenate(
                [jnp.concatenate([padded[:, sz, sy, sx] for sx in windows[2]], axis=3) for sy in windows[1]],
                axis=2,
            )
            for sz in windows[0]
        ],
        axis=1,
    )


@pytest.mark.parametrize(
    "mesh_text, widths",
    [
        ("2x2x2", ((1, 0), (0, 1), (1, 1))),  # strided (1, 0), a zero side, symmetric
        ("1x2x4", ((0, 0), (1, 0), (2, 1))),
        ("8x1x1", ((3, 0), (0, 0), (1, 0))),  # 3 voxels over blocks of 2: two hops
        ("8x1x1", ((1, 3), (0, 1), (0, 0))),  # two hops on the high side
    ],
)
def test_asymmetric_halo_pad_and_its_adjoint(mesh_text, widths):
    """Per-axis (lo, hi) halos equal the global zero-padded neighbourhood, and their hand-written
    gradient equals the gradient of that global cut (edges, corners, multi-hop, outer faces)."""
    spec = parse_mesh(mesh_text)
    shape = (1, 16, 8, 8, 2)
    global_x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    act = P(*ACTIVATION_SPEC)
    fn = jax.shard_map(
        lambda x: halo_pad(x, width=widths, mesh_shape=spec.spatial), mesh=build_mesh(spec), in_specs=act, out_specs=act
    )
    expected, vjp_expected = jax.vjp(lambda x: _window_blocks(x, spec.spatial, widths), global_x)
    got, vjp_got = jax.vjp(jax.jit(fn), global_x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(expected.shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(vjp_got(cotangent)[0]), np.asarray(vjp_expected(cotangent)[0]), atol=1e-6)


@pytest.mark.parametrize("mode", ["zero", "replicate"])
def test_asymmetric_self_padding_modes(mode):
    """The seam-showing modes pad (lo, hi) per axis from the shard's own voxels, the volume's
    outer faces stay zero."""
    spec = parse_mesh("2x1x1")
    x = jnp.asarray(np.random.default_rng(2).random((1, 8, 4, 4, 1)), jnp.float32)
    act = P(*ACTIVATION_SPEC)
    widths = ((1, 2), (0, 1), (1, 0))
    fn = jax.shard_map(
        lambda b: halo_pad(b, width=widths, mesh_shape=spec.spatial, mode=mode),
        mesh=build_mesh(spec),
        in_specs=act,
        out_specs=act,
    )
    out = np.asarray(jax.jit(fn)(x))
    low, high = out[:, :7], out[:, 7:]  # each shard: 4 + 1 + 2 along z, 4 + 1 along y, 4 + 1 along x
    assert low.shape == (1, 7, 5, 5, 1) and high.shape == (1, 7, 5, 5, 1)
    assert low[:, 0].max() == 0 and high[:, -2:].max() == 0  # outer faces of the volume
    assert out[:, :, -1].max() == 0 and out[:, :, :, 0].max() == 0  # y and x are not split: zeros
    seam = np.asarray(x[:, 3]) if mode == "replicate" else np.zeros_like(np.asarray(x[:, 3]))
    np.testing.assert_array_equal(low[:, 5, :4, 1:], seam)  # the low shard's high side, at the seam
    np.testing.assert_array_equal(low[:, 6, :4, 1:], seam)


def _random_model(spec, seed):
    """Random weights drawn in nnU-Net's layout and imported (no compilation): He-scaled kernels,
    norm scales in [0.5, 1.5], biases N(0, 0.1), so no layer is an identity."""
    rng = np.random.default_rng(seed)
    weights = {}
    for key, shape, _ in spec.state_dict(aliases=False):
        if key.endswith("norm.weight"):
            weights[key] = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 1:
            weights[key] = rng.normal(0, 0.1, shape)
        else:
            fan_in = np.prod(shape[1:]) if "transpconvs" not in key else shape[0]
            weights[key] = rng.normal(0, np.sqrt(2 / fan_in), shape)
    params = load_nnunet_weights(spec, {k: v.astype(np.float32) for k, v in weights.items()})
    return NNUNetModel(spec, {"params": params}, f"random (seed {seed})")


# An anisotropic 3-stage PlainConvUNet (features <= 8) with two region outputs (sigmoid).
ANISO3 = NetworkSpec.plain(
    in_channels=1,
    num_outputs=2,
    kernels=[(1, 3, 3), (1, 3, 3), (3, 3, 3)],
    strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)],
    features=[4, 8, 8],
    blocks=[2, 1, 1],
    decoder_convs=[1, 1],
    output_kind="sigmoid",
    output_names=("whole", "core"),
    regions_class_order=(1, 2),
)
# A 3-stage ResidualEncoderUNet whose strided blocks have both skips: avg-pool + 1x1 conv (4 -> 8)
# and avg-pool alone (8 -> 8). Small layer counts: each gradient program compiles in seconds.
RESENC3 = NetworkSpec.residual(
    in_channels=2,
    num_outputs=3,
    kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3)],
    strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)],
    features=[4, 8, 8],
    blocks=[1, 1, 1],
)


@pytest.fixture(scope="module")
def models(goldens):
    out = {name: NNUNetModel(g.spec, {"params": g.params}) for name, g in goldens.items()}
    out["aniso3"] = _random_model(ANISO3, 3)
    out["resenc3"] = _random_model(RESENC3, 4)
    return out


_REFERENCES: dict = {}


def _input(spec, shape, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *shape, spec.in_channels)).astype(np.float32)


EVEN, UNEVEN = (8, 32, 32), (11, 37, 29)
FORWARD_CASES = [
    # network, mesh, volume shape, backend: every mesh on two or more networks, even and uneven
    # shapes, both backends (8x1x1 on an 8-slice volume pads z to 16: blocks of 2, the z stride
    # multiple). The float64 gradient cases below run 2x2x2 (uneven) and data=2,z=2,y=2,x=1 too.
    ("plain_thick_mri", "2x2x2", UNEVEN, "explicit"),
    ("plain_thick_mri", "1x2x4", EVEN, "explicit"),
    ("plain_thick_mri", "data=2,z=2,y=2,x=1", UNEVEN, "explicit"),
    ("resenc_aniso_ct", "2x2x2", EVEN, "explicit"),
    ("resenc_aniso_ct", "8x1x1", UNEVEN, "explicit"),
    ("resenc_aniso_ct", "1x2x4", UNEVEN, "gspmd"),
    ("aniso3", "1x2x4", UNEVEN, "explicit"),
    ("aniso3", "8x1x1", (16, 16, 24), "explicit"),
]


@pytest.mark.parametrize("name, mesh, shape, backend", FORWARD_CASES)
def test_partitioned_forward_equals_reference(models, name, mesh, shape, backend):
    """Every deep-supervision head, within 1e-5 × max(1, |logit|) in float32."""
    model = models[name]
    x = _input(model.spec, shape)
    key = (name, shape)
    if key not in _REFERENCES:
        _REFERENCES[key] = apply_nnunet(model, x, backend="reference", deep_supervision=True)
    reference = _REFERENCES[key]
    heads = apply_nnunet(model, x, mesh, backend=backend, deep_supervision=True)
    for i, (head, ref) in enumerate(zip(heads, reference)):
        assert head.shape == ref.shape
        error = float(np.abs(head - ref).max())
        bound = 1e-5 * max(1.0, float(np.abs(ref).max()))
        print(f"{name} {mesh} {shape} {backend} head {i}: max |diff| = {error:.1e} (bound {bound:.1e})")
        assert error <= bound, (i, error, bound)


def _loss(spec, heads, target):
    """nnU-Net's deep-supervision loss shape: per head (weights 1/2^i, the lowest 0, normalised)
    CE + soft Dice (softmax), or BCE + soft Dice per region (sigmoid)."""
    weights = np.array([0.5**i for i in range(len(heads))])
    weights[-1] = 0
    weights = weights / weights.sum()
    total = 0.0
    for w, head, layer in zip(weights, heads, spec.outputs):
        sz, sy, sx = layer.scale
        t = target[:, ::sz, ::sy, ::sx][:, : head.shape[1], : head.shape[2], : head.shape[3]]
        if spec.output_kind == "sigmoid":
            regions = jnp.stack([t >= r for r in (spec.regions_class_order or range(1, spec.num_outputs + 1))], -1)
            y = regions.astype(head.dtype)
            prob = jax.nn.sigmoid(head)
            data = jnp.mean(jnp.maximum(head, 0) - head * y + jnp.log1p(jnp.exp(-jnp.abs(head))))
        else:
            y = jax.nn.one_hot(t, spec.num_outputs, dtype=head.dtype)
            prob = jax.nn.softmax(head, axis=-1)
            data = -jnp.mean(jnp.sum(y * jax.nn.log_softmax(head, axis=-1), axis=-1))
        axes = (0, 1, 2, 3)
        dice = (2 * jnp.sum(prob * y, axes) + 1e-5) / (jnp.sum(prob, axes) + jnp.sum(y, axes) + 1e-5)
        total = total + w * (data + 1 - jnp.mean(dice))
    return total


def _gradient(model, x, target, mesh, backend, comm_overlap="auto"):
    spec = model.spec
    layout = nnunet_layout(spec, x.shape[1:4], mesh)
    shape = layout.reference_shape if backend == "reference" else layout.padded_shape
    fn, *_ = make_nnunet_forward(spec, layout, backend=backend, dtype="float64", jit=False, comm_overlap=comm_overlap)
    padded = np.pad(x, [(0, 0), *((0, t - s) for t, s in zip(shape, x.shape[1:4])), (0, 0)])

    def loss(params):
        heads = crop_heads(spec, fn({"params": params}, padded), layout.volume_shape)
        return _loss(spec, heads, target)

    params = _cast(model.variables["params"], np.float64)
    return jax.jit(jax.value_and_grad(loss))(params)


_GRADIENT_REFERENCES: dict = {}
GRADIENT_CASES = [
    # comm overlap "on": every convolution with an interior as interior + boundary shells
    # (workbench.model.interior): strided (1, 0) halos, (1, 3, 3) kernels, residual blocks
    ("resenc3", "2x2x2", UNEVEN, "off"),
    ("resenc3", "2x2x2", UNEVEN, "on"),
    ("aniso3", "data=2,z=2,y=2,x=1", (8, 24, 40), "off"),
]


@pytest.mark.parametrize("name, mesh, shape, comm_overlap", GRADIENT_CASES)
def test_partitioned_float64_gradients_equal_reference(models, name, mesh, shape, comm_overlap):
    """Gradients of a deep-supervision Dice + CE (BCE for regions) loss w.r.t. every parameter."""
    model = models[name]
    x = _input(model.spec, shape, seed=5).astype(np.float64)
    target = np.random.default_rng(6).integers(0, 3, (2, *shape))
    with jax.enable_x64(True):
        if (name, shape) not in _GRADIENT_REFERENCES:  # shared by the cases of one network and shape
            ref_loss, ref_grad = _gradient(model, x, target, "1x1x1", "reference")
            _GRADIENT_REFERENCES[name, shape] = float(ref_loss), jax.tree.map(np.asarray, ref_grad)
        ref_loss, ref_grad = _GRADIENT_REFERENCES[name, shape]
        loss, grad = _gradient(model, x, target, mesh, "explicit", comm_overlap)
        grad = jax.tree.map(np.asarray, grad)
    assert abs(float(loss) - float(ref_loss)) <= 1e-9 * abs(float(ref_loss))
    leaves = jax.tree_util.tree_leaves_with_path(ref_grad)
    scale = max(float(np.abs(g).max()) for _, g in leaves)
    worst = 0.0
    for (path, r), g in zip(leaves, jax.tree.leaves(grad)):
        error = float(np.abs(g - r).max()) / scale
        worst = max(worst, error)
        assert error <= 1e-6, (jax.tree_util.keystr(path), error)
    print(f"{name} {mesh} {shape}: max |grad diff| / max |grad| = {worst:.1e}")


def test_partitioned_forward_refuses_blocks_off_the_stride_grid(models):
    """A layout whose blocks do not start at every stage's cumulative stride: one UserError."""
    spec = models["resenc_aniso_ct"].spec  # z strides 1, 1, 2, 1: blocks must be even along z
    layout = nnunet_layout(spec, (12, 32, 32), "4x1x1")
    assert layout.padded_shape == (16, 32, 32) and spec.check_blocks(layout.padded_shape, (4, 1, 1)) == (4, 32, 32)
    layout.padded_shape = (12, 32, 32)  # as if the caller had not padded for the mesh
    with pytest.raises(
        UserError, match=r"mesh 4x1x1 cannot split stage 2 along z: blocks of 3 voxels .* multiples of 2"
    ):
        make_nnunet_forward(spec, layout)


def test_unpadded_input_is_one_user_error(models):
    spec = models["resenc_aniso_ct"].spec  # multiple (2, 8, 8)
    x = jax.ShapeDtypeStruct((1, 7, 32, 32, 1), jnp.float32)
    with pytest.raises(
        UserError, match=r"input \(block\) shape \(1, 7, 32, 32, 1\) must be .* multiples of \(2, 8, 8\)"
    ):
        jax.eval_shape(NNUNet(spec).init, jax.random.key(0), x)


def test_input_channels_must_match_channel_names(models):
    model = models["plain_thick_mri"]  # 2 channels (T2, ADC)
    with pytest.raises(
        UserError, match=r"input has 1 channels but the network .* expects 2 \(dataset\.json's channel_names\)"
    ):
        apply_nnunet(model, np.zeros((1, 8, 32, 32, 1), np.float32), "2x2x2")


def test_random_init_has_the_plan_s_parameters():
    model = NNUNetModel.init(ANISO3, seed=0)
    assert model.num_params == ANISO3.num_params == _random_model(ANISO3, 0).num_params
