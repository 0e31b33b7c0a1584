"""``workbench plan --data DIR`` and ``--plans FILE --mesh M`` on a tiny phantom dataset (XLA:CPU).

One 3-stage network (nnU-Net's rules on a 12x16x16 median volume), float32, compiled on one
device and on two; the figures are cached per process, so the later tests reuse them.
"""

from __future__ import annotations

import json

import pytest

from workbench import cli
from workbench.analysis.nnunet_memory import spec_memory, spec_plans
from workbench.errors import UserError
from workbench.model.nnunet_plans import load_plans_file

GIB = 2**30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from data_tools.synthetic.dataset import write_phantom_dataset

    root = tmp_path_factory.mktemp("plan") / "Dataset002_Tiny"
    return write_phantom_dataset(root, cases=3, test=0, layout="nnunet", shapes=[(12, 16, 16)])


def _plan(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def one_device(dataset, tmp_path_factory):
    """plan --data with a budget one device meets: (plans written, its JSON summary)."""
    out = tmp_path_factory.mktemp("plans") / "plans.json"
    argv = ["plan", "--data", str(dataset), "--budget-gib", "4", "--max-devices", "8", "--dtype", "float32"]
    assert cli.main([*argv, "--out", str(out), "--json"]) == 0
    return json.loads(out.read_text())


def test_plan_data_writes_nnunet_plans_with_the_workbench_block(one_device, dataset):
    plans = one_device
    wb, config = plans["workbench"], plans["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    assert plans["experiment_planner_used"] == "ExperimentPlanner" and wb["planner"] == "nnunet"
    assert wb["schema_version"] == 1 and wb["median_shape"] == [12, 16, 16] and config["patch_size"] == [12, 16, 16]
    assert arch["strides"] == [[1, 1, 1], [2, 2, 2], [1, 2, 2]] and arch["features_per_stage"] == [32, 64, 128]
    assert arch["n_conv_per_stage"] == [2, 2, 2] and arch["kernel_sizes"] == [[3, 3, 3]] * 3
    assert config["normalization_schemes"] == ["CTNormalization"] and config["use_mask_for_norm"] == [False]
    assert wb["dataset"]["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert wb["mesh"] == "1x1x1" and wb["devices"] == 1 and wb["tried"][0]["mesh"] == "1x1x1"
    assert 0 < wb["bytes_per_device"] <= 4 * GIB and wb["compiler"] == "cpu" and wb["dtype"] == "float32"
    assert wb["nnunet_patch_size"] == [12, 16, 16] and wb["nnunet_batch_size"] == 2
    stats = plans["foreground_intensity_properties_per_channel"]["0"]
    assert stats["percentile_00_5"] < stats["mean"] < stats["percentile_99_5"]
    # the file is nnU-Net's schema: load_plans_file reads it with the dataset.json inside it
    path = dataset.parent / "copy.json"
    path.write_text(json.dumps(plans))
    loaded = load_plans_file(path)
    assert loaded.spec.n_stages == 3 and loaded.spec.in_channels == 1 and loaded.spec.num_outputs == 3
    assert loaded.spec.num_params == wb["parameters"]


def test_plans_file_memory_agrees_with_what_plan_data_wrote(one_device, tmp_path, capsys):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(one_device))
    code, out, _ = _plan(capsys, "--plans", str(path), "--mesh", "1x1x1", "--dtype", "float32", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["bytes_per_device"] == one_device["workbench"]["bytes_per_device"]
    assert result["memory"] == one_device["workbench"]["memory"] and result["shape"] == [12, 16, 16]


def test_a_budget_one_device_misses_takes_the_next_mesh(dataset, tmp_path, capsys):
    """Inference (cheap compiles), budget just below the single-device figure: two devices, each
    under the budget, and the figure the plans file records is the one --plans reports."""
    first = tmp_path / "first.json"
    argv = ["--data", str(dataset), "--max-devices", "8", "--dtype", "float32", "--infer"]
    assert _plan(capsys, *argv, "--budget-gib", "4", "--out", str(first))[0] == 0
    single = json.loads(first.read_text())["workbench"]["bytes_per_device"]
    budget = (single - 1) / GIB
    out = tmp_path / "p.json"
    code, text, err = _plan(capsys, *argv, "--budget-gib", repr(budget), "--out", str(out))
    assert code == 0, err
    wb = json.loads(out.read_text())["workbench"]
    assert wb["train"] is False and wb["devices"] == 2 and wb["bytes_per_device"] <= budget * GIB < single
    assert [t["fits"] for t in wb["tried"]] == [False, True]
    assert "smallest mesh" in text and wb["mesh"] in text and "compiling the inference on" in err
    code, text, _ = _plan(capsys, "--plans", str(out), "--mesh", wb["mesh"], "--dtype", "float32", "--infer", "--json")
    assert code == 0 and json.loads(text)["bytes_per_device"] == wb["bytes_per_device"]


def test_nothing_fits_names_the_smallest_need_and_writes_nothing(one_device, dataset, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["--data", str(dataset), "--budget-gib", "0.001", "--max-devices", "1", "--dtype", "float32"]
    code, _, err = _plan(capsys, *argv, "--out", str(out))
    need = one_device["workbench"]["bytes_per_device"] / GIB
    assert code == 2 and not out.exists()
    lines = err.strip().splitlines()
    assert lines[-1].startswith("workbench: error: no mesh up to 1 device fits 0.001 GiB/device")
    assert f"the smallest need found is {need:.2f} GiB/device on 1x1x1 (1 device)" in lines[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--planner", "resenc-xxl"], "--planner 'resenc-xxl' is unknown; use one of nnunet, resenc-m, resenc-l"),
        (["--mesh", "2x2x2"], "--data DIR finds the mesh itself"),
        (["--budget-gib", "0"], "--budget-gib 0.0 must be a positive number"),
        (["--dtype", "float64"], "--dtype 'float64' is not planned for nnU-Net networks"),
    ],
)
def test_plan_data_errors(dataset, tmp_path, capsys, argv, message):
    code, _, err = _plan(capsys, "--data", str(dataset), "--out", str(tmp_path / "p.json"), *argv)
    assert code == 2 and not (tmp_path / "p.json").exists()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_not_a_dataset_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = _plan(capsys, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "p.json"))
    assert code == 2 and "has no dataset.json" in err and not (tmp_path / "p.json").exists()


def test_spec_plans_round_trip_for_regions():
    """The subprocess transport keeps the network: a region-output ResEnc spec comes back equal."""
    from workbench.model.nnunet_plans import from_nnunet_plans
    from workbench.model.spec import NetworkSpec

    spec = NetworkSpec.residual(
        in_channels=2, num_outputs=2, kernels=[(1, 3, 3), (3, 3, 3)], strides=[(1, 1, 1), (1, 2, 2)],
        features=[4, 8], blocks=[1, 2], output_kind="sigmoid", output_names=("whole", "core"),
        regions_class_order=(1, 2),
    )  # fmt: skip
    plans = spec_plans(spec)
    assert from_nnunet_plans(plans, plans["workbench"]["dataset"]) == spec
    with pytest.raises(UserError, match="--dtype 'float16' is not planned"):
        spec_memory(spec, (8, 16, 16), "1x1x1", dtype="float16")


def test_plan_data_of_a_two_channel_region_dataset(tmp_path, capsys):
    """nnU-Net regions and two channels: the plans embed the region labels and give the
    network one sigmoid head per region and two input channels (inference: a cheap compile)."""
    from data_tools.synthetic.dataset import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "Dataset003_Tumour", cases=3, test=0, task="tumour", layout="nnunet",
                                 shapes=[(16, 16, 16)])  # fmt: skip
    out = tmp_path / "p.json"
    code, _, err = _plan(capsys, "--data", str(root), "--infer", "--budget-gib", "1", "--out", str(out))
    assert code == 0, err
    plans = json.loads(out.read_text())
    dataset = plans["workbench"]["dataset"]
    assert dataset["labels"] == {"background": 0, "whole": [1, 2], "core": 2} and dataset["regions_class_order"] == [
        1,
        2,
    ]
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"] * 2
    assert sorted(plans["foreground_intensity_properties_per_channel"]) == ["0", "1"]
    spec = load_plans_file(out).spec
    assert (spec.in_channels, spec.num_outputs, spec.output_kind) == (2, 2, "sigmoid")
    assert spec.regions_class_order == (1, 2) and plans["workbench"]["dtype"] == "bfloat16"
