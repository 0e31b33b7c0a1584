"""nnU-Net's planned networks: the layer spec against nnU-Net's own builder (the committed
golden fixture, tests/fixtures/nnunet/README.md), weight import and logits against nnU-Net's
outputs, and the partitioned forward and gradients against the single-device reference.

No torch here: everything is read from the fixture's .json and .npz files.
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from workbench.errors import UserError
from workbench.model.nnunet import NNUNet, load_nnunet_folder, load_nnunet_weights
from workbench.model.spec import NetworkSpec, conv_halo, from_nnunet_arch, from_nnunet_plans

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
    torch (the .npz beside the .pth) and give the golden's full-resolution logits."""
    golden = goldens["plain_thick_mri"]
    model = load_nnunet_folder(RESULTS, fold=0, use_torch=False)
    assert model.spec.output_kind == "sigmoid" and model.spec.output_names == ("whole", "core")
    assert model.spec.stages == golden.spec.stages and model.num_params == golden.meta["total_params"]
    assert model.source.endswith("checkpoint_final_network_weights.npz")
    jax.tree.map(np.testing.assert_array_equal, model.variables["params"], golden.params)
    logits = jax.jit(model.module(deep_supervision=False).apply)(model.variables, golden.x)
    expected = golden.expected(0, "float32")
    assert float(np.abs(np.asarray(logits) - expected).max()) <= 1e-4 * float(np.abs(expected).max())


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
