"""``workbench infer … --checkpoint NNUNET_FOLDER --compare-with SEG`` against nnU-Net's own
output (workbench.app.nnunet_compare), without torch.

The fixture ``tests/fixtures/nnunet_window`` was made by nnU-Net 2.8.1's code
(``benchmarks/nnunet_whole_vs_window.py _torch-fixture``, in .venv-nnunet) with the golden
fixture's model (2-channel MRI, region labels, patch 8×32×32, random weights) on two cases:
``single`` (8×32×32: one tile) and ``window`` (16×64×48: 3×3×2 tiles). Per case it holds
nnU-Net's ``nnUNetPredictor`` segmentation (tile_step_size 0.5, Gaussian, no mirroring:
``*_nnunet.nii.gz``), nnU-Net's network run on the whole preprocessed volume at once with
nnU-Net's export (``*_nnunet_whole.nii.gz``), and nnU-Net's tile starts (``meta.json``).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from data_tools import read_volume
from workbench.app.nnunet import predict_nnunet
from workbench.app.nnunet_compare import (
    compare_labels,
    comparison_for,
    dice_per_class,
    sliding_window_starts,
    tile_borders,
)
from workbench.cli import main

FIX = Path(__file__).parent / "fixtures" / "nnunet_window"
RESULTS = Path(__file__).parent / "fixtures" / "nnunet" / "results" / "Dataset903_ThickMRI"
RESULTS = RESULTS / "nnUNetTrainer__nnUNetPlans__3d_fullres"
META = json.loads((FIX / "meta.json").read_text())
NAMES = ["background", "whole", "core"]


def _labels(path) -> np.ndarray:
    return np.asarray(read_volume(path).array).astype(np.uint8)


def _files(case):
    return [FIX / f"{case}_0000.nii.gz", FIX / f"{case}_0001.nii.gz"]


def test_tile_starts_equal_nnunets():
    """sliding_window_starts against nnU-Net's compute_steps_for_sliding_window (recorded)."""
    for row in META["steps"]:
        assert sliding_window_starts(row["size"], row["patch"], 0.5) == row["starts"], row
    for case in META["cases"].values():
        assert sliding_window_starts(case["shape"], [8, 32, 32], 0.5) == case["steps"]
    assert tile_borders((16, 64, 48), (8, 32, 32)) == [[4, 8, 12], [16, 32, 48], [16, 32]]
    assert tile_borders((8, 32, 32), (8, 32, 32)) == [[], [], []]  # one tile: no inner border


def test_compare_labels_by_hand():
    """Dice, the differing fraction and where, on a hand-made pair (numbers worked out by hand)."""
    a = np.zeros((8, 8, 8), np.uint8)
    a[2:6, 2:6, 2:6] = 1
    b = a.copy()
    b[0, 0, 0] = 2  # a corner: at the volume's faces, far from the cube
    b[4, 4, 4] = 0  # inside the cube, 2 voxels from its faces
    r = compare_labels(a, b, ["bg", "one", "two"], tiles=[[4], [], []], band=1)
    assert r["differ_voxels"] == 2 and r["differ_fraction"] == 2 / 512
    assert r["dice_between"] == {"one": pytest.approx(2 * 63 / 127), "two": 0.0}
    tile = r["where"]["tile_border"]  # planes z=4 (between slices 3 and 4): slices 3 and 4 are within 1
    assert tile["differ_fraction_within"] == 0.5 and tile["volume_fraction_within"] == 2 / 8
    assert tile["differ_rate_within"] == 1 / 128 and tile["differ_rate_elsewhere"] == 1 / 384
    face = r["where"]["volume_face"]  # band 1: the outer shell of 8³ - 6³ = 296 voxels
    assert face["differ_fraction_within"] == 0.5 and face["volume_fraction_within"] == 296 / 512
    edge = r["where"]["label_edge"]  # both differing voxels have a neighbour of another label (b's edges)
    assert edge["differ_fraction_within"] == 1.0
    assert dice_per_class(a, a, ["bg", "one", "two"]) == {"one": 1.0, "two": None}


@pytest.fixture(scope="module")
def window_run(tmp_path_factory):
    """The command on the 16×64×48 case (2x2x2), compared with nnU-Net's sliding window."""
    out = tmp_path_factory.mktemp("window") / "out"
    argv = ["infer", *_files("window"), "--checkpoint", RESULTS, "--mesh", "2x2x2"]
    assert main([*map(str, argv), "--compare-with", str(FIX / "window_nnunet.nii.gz"), "--out", str(out)]) == 0
    return out


def test_compare_with_report_and_folder(window_run):
    """report.json's compare_with equals the numbers recomputed from the files; the folder
    holds nnU-Net's labels as the viewers' comparison and the disagreement map."""
    out = window_run
    report = json.loads((out / "report.json").read_text())
    ours = _labels(out / report["prediction"])
    theirs = _labels(FIX / "window_nnunet.nii.gz")
    r = report["compare_with"]
    differ = ours != theirs
    assert r["differ_voxels"] == int(differ.sum()) > 0 and r["voxels"] == ours.size
    assert r["label_agreement"] == pytest.approx(1 - differ.mean(), abs=1e-12)
    for k, name in enumerate(NAMES[1:], start=1):
        x, y = ours == k, theirs == k
        assert r["dice_between"][name] == pytest.approx(2 * (x & y).sum() / (x.sum() + y.sum()), abs=1e-12)
    assert r["where"]["tile_border"]["borders"] == [[4, 8, 12], [16, 32, 48], [16, 32]]  # nnU-Net's tiles
    assert r["patch_size"] == [8, 32, 32] and r["tile_step_size"] == 0.5
    np.testing.assert_array_equal(np.load(out / "reference_prediction.npy"), theirs)
    np.testing.assert_array_equal(np.load(out / "disagreement.npy"), differ.astype(np.uint8))
    assert np.load(out / "image.npy").shape == (*ours.shape, 2)  # every input channel, (Z, Y, X, C)

    from workbench.app.results import load_result

    folder = load_result(out)  # what workbench view, the notebook viewer and napari open
    np.testing.assert_array_equal(folder.reference_prediction, theirs)
    assert folder.image is not None and folder.class_names == NAMES


def test_whole_volume_labels_equal_nnunets_network_on_the_whole_volume(window_run):
    """The partitioned whole-volume labels equal nnU-Net's own network run on the whole volume
    (torch, float32) on all but at most 2 of 49,152 voxels (a logit within float32 rounding of 0
    may flip a region); nnU-Net's sliding window differs far more (patch-sized InstanceNorm
    statistics and tile seams, on random weights)."""
    report = json.loads((window_run / "report.json").read_text())
    ours = _labels(window_run / report["prediction"])
    whole = _labels(FIX / "window_nnunet_whole.nii.gz")
    assert int((ours != whole).sum()) <= 2
    assert report["compare_with"]["differ_fraction"] > 0.1  # the sliding window: measured 35 %


def test_one_tile_differs_only_by_nnunets_float16_accumulation():
    """On a case of exactly one patch the sliding window is one forward pass, but nnU-Net 2.8
    accumulates the Gaussian-weighted logits in float16: its labels equal the whole-volume
    network's on ≥ 98 % of voxels (measured 98.9 %), ours equal the whole-volume network's on
    every voxel, and no tile border exists."""
    run = predict_nnunet(RESULTS, _files("single"), "2x2x2")
    whole = comparison_for(run, _labels(FIX / "single_nnunet_whole.nii.gz"), "whole")
    assert whole["differ_voxels"] == 0
    window = comparison_for(run, _labels(FIX / "single_nnunet.nii.gz"), "window")
    assert 0 < window["differ_fraction"] <= 0.02
    assert window["where"]["tile_border"]["borders"] == [[], [], []]
    assert window["where"]["tile_border"]["differ_fraction_within"] == 0.0


def test_a_trained_checkpoint_with_numpy_scalars_loads_through_torch(tmp_path):
    """nnU-Net's trainer stores numpy float32 scalars in a checkpoint's ``logging`` and
    ``_best_ema`` after a real training; torch.load(weights_only=True) refused those until they
    were allowed (found on the model trained by benchmarks/nnunet_whole_vs_window.py)."""
    torch = pytest.importorskip("torch")
    from workbench.model.nnunet import read_checkpoint_weights

    with np.load(RESULTS / "fold_0" / "checkpoint_final_network_weights.npz") as data:
        weights = {k: torch.from_numpy(data[k]) for k in data.files}
    logging = {"ema_fg_dice": [np.float32(0.25), np.float32(0.5)], "train_losses": [0.5, np.float32(0.25)]}
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": weights, "logging": logging, "_best_ema": np.float32(0.5)}, path)
    read, source = read_checkpoint_weights(path)
    assert source.endswith("(torch)") and read.keys() == weights.keys()
    for k, v in weights.items():
        np.testing.assert_array_equal(read[k], v.numpy())
