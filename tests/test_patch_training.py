"""Patch training (nnU-Net's sampler) and the sliding-window prediction of a patch model."""

import csv
import json

import numpy as np
import pytest

from tests.conftest import f32_tolerance
from workbench.training.patches import PatchSource, forced_foreground, patch_box


class _Cases:
    """A training source of (24, 20, 16) cases whose one foreground blob sits in a corner."""

    shape = (24, 20, 16)
    num_classes, class_names, description = 3, ("background", "a", "b"), "toy"

    def case_block(self, step, index, box):
        z, y, x = np.meshgrid(*(np.arange(n) for n in self.shape), indexing="ij")
        labels = np.zeros(self.shape, np.uint8)
        labels[(z < 3) & (y < 3) & (x < 3)] = 1
        labels[(z == 23) & (y == 19) & (x == 15)] = 2
        image = (z * 1000 + y * 100 + x + step * 1e5 + index * 1e6).astype(np.float32)
        sl = tuple(slice(lo, hi) for lo, hi in box)
        return image[sl], labels[sl]

    def eval_cases(self, n):
        return []


@pytest.mark.parametrize("batch, forced", [(1, []), (2, [1]), (3, [2]), (8, [5, 6, 7])])
def test_the_last_third_of_a_batch_is_forced_to_hold_foreground(batch, forced):
    # nnU-Net's _oversample_last_XX_percent: not index < round(batch * (1 - 0.33))
    assert [i for i in range(batch) if forced_foreground(i, batch, 0.33)] == forced


def test_patches_like_nnunet_inside_the_case_foreground_forced_and_seeded():
    source = PatchSource(_Cases(), (8, 8, 8), batch=3, foreground=0.33)
    assert source.shape == (8, 8, 8) and source.case_shape == (24, 20, 16)
    random_hits, boxes = 0, []
    for step in range(40):
        for index in range(3):
            box = source.box(step, index, seed=5)
            boxes.append(box)
            image, labels = source.patch_of(step, index, seed=5, augment_data=False)
            assert image.shape == labels.shape == (8, 8, 8)
            if index == 2:  # forced: centred on a voxel of a class present, so the patch holds it
                assert labels.max() > 0
                assert all(lo >= 0 for lo, _ in box)  # lb = 0 on every axis: the case is larger than the patch
            else:  # random: wholly inside the case (the case is larger than the patch on every axis)
                assert all(0 <= lo and hi <= n for (lo, hi), n in zip(box, source.case_shape)), box
                random_hits += labels.max() > 0
                # the patch is the case's box: image values encode the voxel position
                z0, y0, x0 = (lo for lo, _ in box)
                assert image[0, 0, 0] == z0 * 1000 + y0 * 100 + x0 + step * 1e5 + index * 1e6
    assert random_hits < 40  # a corner blob of 27 voxels is seldom in a random patch
    again = [source.box(step, index, seed=5) for step in range(40) for index in range(3)]
    other = [source.box(step, index, seed=6) for step in range(40) for index in range(3)]
    assert again == boxes and other != boxes


def test_a_forced_patch_centres_a_foreground_voxel_and_pads_outside_the_case():
    rng = np.random.default_rng(0)
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[9, 9, 9] = 2
    box = patch_box(labels.shape, (6, 6, 6), rng, labels)
    assert box == ((6, 12), (6, 12), (6, 12))  # lo = max(lb, voxel - patch // 2): past the case, as nnU-Net
    # a case smaller than the patch: lb = -pad // 2 (Python's floor: -2 for pad 3), ub = size + pad // 2
    # + pad % 2 - patch = -1, so the case sits inside the patch, padded 1 or 2 voxels below
    boxes = {patch_box((4, 10, 10), (7, 6, 6), np.random.default_rng(s))[0] for s in range(60)}
    assert boxes == {(-2, 5), (-1, 6)}


@pytest.fixture(scope="module")
def window_case():
    return np.random.default_rng(3).normal(size=(16, 16, 12)).astype(np.float32)


def test_patch_model_prediction_is_monai_sliding_window_at_half_patch_gaussian(small_model, window_case):
    pytest.importorskip("monai")
    from workbench.analysis.baselines import monai_sliding_window
    from workbench.execute.windows import patch_logits

    patch = (8, 12, 8)  # 3 x 2 x 2 windows
    ours = patch_logits(small_model, window_case, patch)
    theirs = monai_sliding_window(small_model, window_case, roi=patch, overlap=0.5, mode="gaussian").output
    assert ours.shape == (*window_case.shape, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=f32_tolerance(theirs))
    # an axis shorter than the patch is zero-padded to it and cropped back
    short = patch_logits(small_model, window_case[:, :, :6], patch)
    padded = patch_logits(small_model, np.pad(window_case[:, :, :6], [(0, 0), (0, 0), (0, 2)]), patch)
    np.testing.assert_array_equal(short, padded[:, :, :6])


def test_nnunet_patch_model_window_equals_its_reference_run(tmp_path):
    from tests.nnunet_plans_helpers import tiny_plans
    from workbench.execute.nnunet import apply_nnunet
    from workbench.execute.windows import patch_logits
    from workbench.model.nnunet_plans import load_plans_file
    from workbench.training.models import init_model, nnunet_config

    model = init_model(nnunet_config(load_plans_file(tiny_plans(tmp_path), "3d_fullres")))
    image = np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32)
    # one window covering the case: the blend is the network's own output
    whole = apply_nnunet(model, image[None, ..., None], None, backend="reference")[0]
    np.testing.assert_allclose(patch_logits(model, image, (8, 16, 16)), whole, rtol=0, atol=f32_tolerance(whole))


def test_cli_train_patch_then_evaluate_by_sliding_windows(tmp_path, capsys):
    from data_tools.synthetic.dataset import write_phantom_dataset
    from workbench.cli import main

    data = write_phantom_dataset(tmp_path / "Task01_Sides", cases=3, test=0, shapes=16, task="laterality")
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--patch", "8x16x8", "--batch", "3", "--steps", "2", "--mesh", "1x1x1", "--backend", "reference",
            "--eval-cases", "0", "--no-augment", "--checkpoint-dir", str(run), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((run / "history.json").read_text())
    compute = history["compute"]
    assert compute["arm"] == "patch" and compute["input_shape"] == [8, 16, 8] and compute["case_shape"] == [16] * 3
    assert compute["steps"] == 2 and compute["voxels_seen"] == 2 * 3 * 8 * 16 * 8 and compute["devices"] == 1
    assert compute["device_seconds"] == pytest.approx(sum(r["seconds"] for r in history["train"]))
    assert json.loads((run / "config.json").read_text())["window"]["patch"] == [8, 16, 8]
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--mesh", "1x1x1",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prediction"] == {"sliding_window": {"patch": [8, 16, 8], "overlap": 0.5, "mode": "gaussian"}}
    with open(out / "cases.csv") as f:
        columns = next(csv.reader(f))
    assert {"dice_left", "dice_right", "hd95_mm_left", "pred_ml_right", "true_ml_left"} <= set(columns)
    # infer picks the window from the checkpoint too
    image = next((data / "imagesTr").iterdir())
    assert main(["infer", str(image), "--checkpoint", str(run), "--mesh", "1x1x1", "--out", str(tmp_path / "inf")]) == 0
    report = json.loads((tmp_path / "inf" / "report.json").read_text())
    assert report["sliding_window"] == {"patch": [8, 16, 8], "overlap": 0.5, "mode": "gaussian"}
    assert report["output_shape"] == [16, 16, 16]
