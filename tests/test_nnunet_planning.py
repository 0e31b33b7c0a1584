"""nnU-Net's planning rules against the plans nnU-Net 2.8.1 wrote (tests/fixtures/nnunet), no compiles.

For the three fixture geometries and the four planners: the target spacing, transposition and
median shape from the fingerprint, the topology (kernels, strides) for nnU-Net's own patch,
features and blocks give nnU-Net's ``architecture`` block exactly, and the whole patch search
gives nnU-Net's patch and batch size. The fingerprint of a dataset folder equals nnU-Net's
``dataset_fingerprint.json``: the fixture's raw cases are regenerated with its own generator
(``make_fixture.synth_case``, numpy only) and written as NIfTI.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from workbench.analysis import nnunet_rules as rules
from workbench.analysis.nnunet_mesh import mesh_for
from workbench.errors import UserError
from workbench.mesh import MeshSpec

FIXTURE = Path(__file__).parent / "fixtures" / "nnunet"
GEOMETRIES = ("iso_ct", "aniso_ct", "thick_mri")
PLANS = ("nnUNetPlans", "nnUNetResEncUNetMPlans", "nnUNetResEncUNetLPlans", "nnUNetResEncUNetXLPlans")
BY_CLASS = {p.name: key for key, p in rules.PLANNERS.items()}


def _load(geometry, name):
    return json.loads((FIXTURE / geometry / f"{name}.json").read_text())


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("plans_name", PLANS)
def test_rules_reproduce_nnunet_plans(geometry, plans_name):
    fingerprint = _load(geometry, "dataset_fingerprint")
    dataset = _load(geometry, "dataset")
    plans = _load(geometry, plans_name)
    nn = plans["configurations"]["3d_fullres"]
    planner = rules.PLANNERS[BY_CLASS[plans["experiment_planner_used"]]]
    assert planner.plans_name == plans["plans_name"]

    spacing = rules.target_spacing(fingerprint["spacings"], fingerprint["shapes_after_crop"])
    forward, backward = rules.transpose(spacing)
    assert [forward, backward] == [tuple(plans["transpose_forward"]), tuple(plans["transpose_backward"])]
    spacing_t = [spacing[i] for i in forward]
    assert spacing_t == nn["spacing"]  # exact floats
    median = rules.resampled_median_shape(fingerprint["spacings"], fingerprint["shapes_after_crop"], spacing)
    assert [median[i] for i in forward] == nn["median_image_size_in_voxels"]

    # the topology for nnU-Net's own patch: kernels, strides, features, blocks, everything in arch_kwargs
    topology = rules.pool_and_conv_props(spacing_t, nn["patch_size"])
    assert list(topology.shape) == nn["patch_size"]
    ours = rules.architecture(planner, topology)
    theirs = nn["architecture"]
    assert ours["network_class_name"] == theirs["network_class_name"]
    assert ours["arch_kwargs"] == theirs["arch_kwargs"]
    assert ours["_kw_requires_import"] == theirs["_kw_requires_import"]

    # the whole 3d_fullres search from the median shape: nnU-Net's patch and batch size
    found = rules.nnunet_configuration(
        planner, spacing_t, nn["median_image_size_in_voxels"], num_classes=len(dataset["labels"]),
        n_cases=dataset["numTraining"],
    )  # fmt: skip
    assert found["patch_size"] == nn["patch_size"]
    assert found["batch_size"] == nn["batch_size"]
    assert found["architecture"]["arch_kwargs"] == theirs["arch_kwargs"]


def test_feature_map_estimate_equals_nnunets_number():
    """nnU-Net's residual planner documents compute_conv_feature_map_size((128,)*3) = 558319104
    for ResidualEncoderUNet(6 stages, 32..320 features, blocks 1,3,4,6,6,6, 3 classes, deep supervision)."""
    topology = rules.pool_and_conv_props((1.0, 1.0, 1.0), (128, 128, 128))
    assert topology.strides == ((1, 1, 1),) + ((2, 2, 2),) * 5
    resenc = rules.PLANNERS["resenc-m"]
    assert rules.feature_map_size(resenc, topology, (128,) * 3, 3, deep_supervision=True) == 558319104
    # without deep supervision (as the planners estimate) the four lower heads drop out
    heads = 3 * sum((128 // 2**i) ** 3 for i in range(1, 5))
    assert rules.feature_map_size(resenc, topology, (128,) * 3, 3) == 558319104 - heads


def test_shrinking_patch_search_on_a_large_ct():
    """A 128x512x512 CT at 2.5x0.8x0.8 mm: the search must shrink (the fixture's never does);
    each result is a valid topology whose estimate fits the reference, and one step larger does not."""
    spacing, median = (2.5, 0.8, 0.8), (128, 512, 512)
    for name in ("nnunet", "resenc-l"):
        plan = rules.PLANNERS[name]
        found = rules.nnunet_configuration(plan, spacing, median, num_classes=3, n_cases=100)
        patch = found["patch_size"]
        topology = rules.pool_and_conv_props(spacing, patch)
        assert list(topology.shape) == patch and all(p % m == 0 for p, m in zip(patch, topology.multiple))
        assert found["estimate"] == rules.feature_map_size(plan, topology, patch, 3) <= found["reference"]
        assert all(p <= 512 for p in patch) and np.prod(patch) < np.prod(median)
        bigger = [p + m for p, m in zip(patch, topology.multiple)]
        big_topology = rules.pool_and_conv_props(spacing, bigger)
        assert rules.feature_map_size(plan, big_topology, big_topology.shape, 3) > found["reference"]


def test_whole_volume_topology_pools_down_to_the_minimum_edge():
    topology = rules.pool_and_conv_props((2.5, 0.8, 0.8), (128, 512, 512))
    assert topology.strides[1] == (1, 2, 2)  # z is 3x coarser: in-plane first
    assert topology.kernels[0] == (1, 3, 3) and topology.kernels[-1] == (3, 3, 3)
    bottom = [n // m for n, m in zip(topology.shape, topology.multiple)]
    assert all(4 <= b < 8 for b in bottom), bottom
    assert rules.features_per_stage(topology.n_stages) == (32, 64, 128, 256, 320, 320, 320, 320)


def test_anisotropic_target_spacing_takes_the_10th_percentile():
    """Thick slices with few voxels on that axis: the 10th percentile of that axis's spacing."""
    spacings = [[5.0, 0.7, 0.7], [4.0, 0.7, 0.7], [6.0, 0.7, 0.7], [1.5, 0.7, 0.7]]
    shapes = [[20, 300, 300]] * 4
    assert rules.target_spacing(spacings, shapes)[0] == pytest.approx(np.percentile([5, 4, 6, 1.5], 10))
    # never below the finest other axis
    fine = [[5.0, 1.0, 1.0], [0.4, 1.0, 1.0], [0.5, 1.0, 1.0], [6.0, 1.0, 1.0], [5.5, 1.0, 1.0]]
    assert rules.target_spacing(fine, [[20, 300, 300]] * 5)[0] == pytest.approx(1.0 + 1e-5)
    assert rules.transpose((0.8, 0.8, 2.5)) == ((2, 0, 1), (1, 2, 0))


def test_unknown_planner_is_one_error():
    with pytest.raises(UserError, match="--planner 'resenc-xxl' is unknown; use one of nnunet, resenc-m"):
        rules.planner("resenc-xxl")


@pytest.mark.parametrize(
    "shape, multiple, n, expected",
    [
        ((128, 512, 512), (8, 32, 32), 16, MeshSpec(1, 4, 4)),  # no padding beats a cube of devices
        ((512, 512, 512), (128, 128, 128), 8, MeshSpec(2, 2, 2)),
        ((19, 32, 32), (4, 8, 8), 8, MeshSpec(1, 2, 4)),  # 2x2x2 would pad z to 24
        ((5, 64, 64), (4, 8, 8), 2, MeshSpec(1, 1, 2)),  # z=2 would leave a shard of padding only
    ],
)
def test_mesh_for_pads_least_then_cube_like(shape, multiple, n, expected):
    assert mesh_for(shape, multiple, n) == expected


def test_mesh_for_refuses_splits_of_padding_only():
    assert mesh_for((4, 4, 4), (4, 4, 4), 2) is None


@pytest.fixture(scope="module")
def fixture_raw_datasets(tmp_path_factory):
    """The fixture's raw CT datasets rebuilt with its own generator (numpy only), as NIfTI."""
    from data_tools.io import write_volume
    from data_tools.volume import Volume

    sys.path.insert(0, str(FIXTURE))
    try:
        import make_fixture
    finally:
        sys.path.remove(str(FIXTURE))
    out = {}
    for ds in make_fixture.DATASETS:
        if ds["folder"] not in ("iso_ct", "aniso_ct"):  # thick_mri has region labels (data_tools refuses them)
            continue
        root = tmp_path_factory.mktemp("raw") / ds["name"]
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        for i, shape in enumerate(ds["shapes"]):
            images, seg = make_fixture.synth_case(
                shape, ds["spacing"], ds["channel_names"], np.random.RandomState(1000 * ds["id"] + i)
            )
            case = f"{ds['name'].split('_', 1)[1].lower()}_{i:03d}"
            for c, image in enumerate(images):
                write_volume(Volume(image, spacing=ds["spacing"]), root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
            write_volume(Volume(seg, spacing=ds["spacing"]), root / "labelsTr" / f"{case}.nii.gz")
        description = {"channel_names": ds["channel_names"], "labels": ds["labels"], "numTraining": 3}
        (root / "dataset.json").write_text(json.dumps({**description, "file_ending": ".nii.gz"}))
        out[ds["folder"]] = root
    return out


@pytest.mark.parametrize("geometry", ["iso_ct", "aniso_ct"])
def test_fingerprint_equals_nnunets(fixture_raw_datasets, geometry):
    """Shapes, spacings and relative sizes exactly; the foreground statistics of the same draws
    (nnU-Net's RandomState(1234).choice, 1e6 voxels as the fixture was made): percentiles, median,
    min and max exactly, mean and SD within 1e-6 relative (nnU-Net accumulates in float32)."""
    from workbench.analysis.nnunet_planning import dataset_fingerprint

    ours, _ = dataset_fingerprint(fixture_raw_datasets[geometry], samples=1e6)
    theirs = _load(geometry, "dataset_fingerprint")
    for key in ("shapes_after_crop", "spacings", "median_relative_size_after_cropping"):
        assert ours[key] == theirs[key], key
    stats, expected = (
        ours["foreground_intensity_properties_per_channel"],
        theirs["foreground_intensity_properties_per_channel"],
    )
    assert stats.keys() == expected.keys()
    for channel, values in expected.items():
        for name, value in values.items():
            tolerance = 1e-6 * abs(value) if name in ("mean", "std") else 0.0
            assert abs(stats[channel][name] - value) <= tolerance, (channel, name, stats[channel][name], value)
