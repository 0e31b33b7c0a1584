"""One plan's network trained on its planned patch: the patch under a per-device budget
(:mod:`workbench.analysis.patch_budget`) and ``train --plans … --patch …`` predicted by
sliding windows in ``evaluate`` and ``infer``."""

import csv
import json

import numpy as np
import pytest

from tests.conftest import f32_tolerance


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from tests.nnunet_plans_helpers import tiny_plans
    from workbench.model.nnunet_plans import load_plans_file

    return load_plans_file(tiny_plans(tmp_path_factory.mktemp("plans")), "3d_fullres").spec


def test_the_planned_patch_fits_the_budget_and_one_multiple_more_does_not(tiny_spec):
    from workbench.analysis.patch_budget import compiled_step_bytes, plan_patch

    assert tiny_spec.multiple == (2, 4, 4)
    # the budget: what a 16x16x12 patch's compiled step (batch 2) needs (the search compiles 2 patches)
    budget = compiled_step_bytes(tiny_spec, (16, 16, 12), batch=2)
    plan = plan_patch(tiny_spec, (16, 16, 16), budget, batch=2)
    assert plan["start"] == [16, 16, 16]  # nnU-Net's 256³ start, clipped to the median volume
    assert [t["patch"] for t in plan["tried"]] == [[16, 16, 16], [16, 16, 12]]  # x first: ties go to the last axis
    assert [t["fits"] for t in plan["tried"]] == [False, True]
    assert plan["patch"] == [16, 16, 12] and plan["bytes_per_device"] == budget <= plan["budget_bytes"]
    assert plan["tried"][-2]["bytes_per_device"] > budget  # the next larger step (16x16x16) would not fit
    assert all(p % m == 0 for t in plan["tried"] for p, m in zip(t["patch"], tiny_spec.multiple))
    # a coarse z spacing: nnU-Net's start (256³ voxels shaped like 1/spacing) is flat in z, and the
    # axis largest relative to the median (x: ties to the last) shrinks first
    flat = plan_patch(tiny_spec, (256,) * 3, 1, spacing=(3.0, 1.0, 1.0), measure=lambda p: 1 + (p[2] == 256))
    assert flat["start"] == [124, 256, 256] and flat["patch"] == [124, 256, 252]


def test_a_budget_below_the_smallest_patch_is_one_user_error(tiny_spec):
    from workbench.analysis.patch_budget import PatchBudgetError, plan_patch

    sizes = []
    with pytest.raises(PatchBudgetError, match=r"not even the smallest patch .* \(--budget-gib\) to at least"):
        plan_patch(tiny_spec, (4, 8, 8), 100, measure=lambda p: sizes.append(p) or 2**20)
    # nnU-Net's order, one multiple a time: 4x8x8 → 4x8x4 → 4x4x4 (ties: the last axis) → 2x4x4, then nothing is left
    assert sizes == [(4, 8, 8), (4, 8, 4), (4, 4, 4), (2, 4, 4)]


def test_cli_train_plans_patch_predicts_by_sliding_windows_like_the_whole_arm(tmp_path):
    """``train --plans P --patch`` on the plan's network, then ``evaluate`` and ``infer`` by
    Gaussian sliding windows: the window is in the checkpoint, ``infer``'s logits are a direct
    ``patch_logits`` call on the same weights (float32 tolerance), and ``cases.csv`` has the
    columns of the same network trained on whole volumes."""
    from data_tools.synthetic.dataset import write_phantom_dataset
    from tests.nnunet_plans_helpers import tiny_plans
    from workbench.app.volumes import load_volume
    from workbench.cli import main
    from workbench.execute.windows import patch_logits
    from workbench.training.checkpoint import load_model

    data = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=5, test=0, shapes=16)
    plans = str(tiny_plans(tmp_path / "plans"))
    common = ["train", "--data", str(data), "--plans", plans, "--resolution", "16", "--eval-cases", "0", "--no-augment",
              "--no-progress", "--backend", "explicit", "--force"]  # fmt: skip
    assert main([*common, "--patch", "8x8x8", "--batch", "2", "--steps", "2", "--mesh", "1x1x1",
                 "--checkpoint-dir", str(tmp_path / "patch")]) == 0  # fmt: skip
    assert main([*common, "--steps", "1", "--mesh", "1x1x1", "--checkpoint-dir", str(tmp_path / "whole")]) == 0
    meta = json.loads((tmp_path / "patch" / "config.json").read_text())
    assert meta["model"]["kind"] == "nnunet"
    assert meta["window"] == {"patch": [8, 8, 8], "overlap": 0.5, "mode": "gaussian", "sigma_scale": 0.125}
    compute = json.loads((tmp_path / "patch" / "history.json").read_text())["compute"]
    assert compute["input_shape"] == [8, 8, 8] and compute["voxels_seen"] == 2 * 2 * 8**3
    columns = {}
    for arm in ("patch", "whole"):
        out = tmp_path / f"eval_{arm}"
        assert main(["evaluate", "--checkpoint", str(tmp_path / arm), "--data", str(data), "--mesh", "1x1x1",
                     "--out", str(out), "--no-progress"]) == 0  # fmt: skip
        with open(out / "cases.csv") as f:
            columns[arm] = next(csv.reader(f))
        summary = json.loads((out / "summary.json").read_text())
        assert ("sliding_window" in summary["prediction"]) == (arm == "patch")
    assert columns["patch"] == columns["whole"] and "dice_lesion" in columns["patch"]
    image = np.random.default_rng(4).normal(size=(16, 12, 20)).astype(np.float32)
    np.save(tmp_path / "case.npy", image)
    assert main(["infer", str(tmp_path / "case.npy"), "--checkpoint", str(tmp_path / "patch"), "--mesh", "1x1x1",
                 "--save-logits", "--out", str(tmp_path / "inf")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "inf" / "report.json").read_text())
    assert report["sliding_window"] == {"patch": [8, 8, 8], "overlap": 0.5, "mode": "gaussian"}
    logits = np.load(tmp_path / "inf" / "logits.npy")
    model, _ = load_model(tmp_path / "patch", log=lambda m: None)
    direct = patch_logits(model, load_volume(tmp_path / "case.npy").image, (8, 8, 8))  # the model input infer reads
    assert logits.shape == direct.shape == (16, 12, 20, 3)
    np.testing.assert_allclose(logits, direct, rtol=0, atol=f32_tolerance(direct))


def test_train_refuses_a_patch_that_is_not_a_multiple_of_the_network():
    from workbench.errors import UserError
    from workbench.training.patches import check_patch_multiple

    check_patch_multiple((8, 12, 16), (2, 4, 4))
    with pytest.raises(UserError, match=r"--patch 9x12x14 is not a multiple .* 2x4x4 .* use 8x12x12 or 10x12x16"):
        check_patch_multiple((9, 12, 14), (2, 4, 4))
