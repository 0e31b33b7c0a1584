"""The phantom tasks of the patch-versus-whole study: their ground truth encodes what it claims."""

import numpy as np
import pytest
from scipy import ndimage

from data_tools.synthetic.context import CONTEXT_CLASSES, CONTEXT_INTENSITY, VERTEBRAE, make_context_case

SHAPE = (32, 32, 32)


@pytest.mark.parametrize("seed", [0, 1])
def test_laterality_organs_are_mirror_images_with_different_labels(seed):
    image, labels, parts = make_context_case("laterality", SHAPE, seed=seed, parts=True)
    left, right = labels == 1, labels == 2
    assert left.sum() > 50 and left.sum() == right.sum()
    np.testing.assert_array_equal(np.flip(left, axis=2), right)  # exact mirror about the x mid-plane
    x = np.arange(SHAPE[2])
    assert x[left.any(axis=(0, 1))].max() < SHAPE[2] / 2 <= x[right.any(axis=(0, 1))].min()
    # they look alike: the same mean intensity up to the noise
    assert abs(image[left].mean() - image[right].mean()) < 8.0
    assert abs(image[left].mean() - CONTEXT_INTENSITY[1]) < 8.0


@pytest.mark.parametrize("seed", [0, 3])
def test_connection_tube_label_is_the_anchor_it_meets(seed):
    image, labels, parts = make_context_case("connection", SHAPE, seed=seed, parts=True)
    ball, shell = parts["ball"], parts["shell"]
    for label, mine, other in ((1, ball, shell), (2, shell, ball)):
        tube = labels == label
        assert ndimage.label(tube | mine)[1] == 1  # the tube touches its own anchor ...
        assert ndimage.label(tube | other)[1] == 2  # ... and not the other one
        z = np.flatnonzero(tube.any(axis=(1, 2)))
        assert z.max() - z.min() + 1 >= 0.7 * SHAPE[0]  # longer than a half-volume patch
    assert not (labels[ball | shell]).any()  # anchors are background
    # along the tubes both look the same: equal mean intensity below the anchors
    below = np.zeros(SHAPE, bool)
    below[SHAPE[0] // 2 :] = True
    assert abs(image[(labels == 1) & below].mean() - image[(labels == 2) & below].mean()) < 8.0


def test_counting_labels_follow_the_order_along_z_and_need_counting():
    starts = []
    for seed in range(6):
        image, labels, parts = make_context_case("counting", SHAPE, seed=seed, parts=True)
        components, n = ndimage.label(labels > 0)
        assert n == VERTEBRAE
        order = sorted(range(1, n + 1), key=lambda c: np.argwhere(components == c)[:, 0].mean())
        assert [int(np.unique(labels[components == c])[0]) for c in order] == list(range(1, VERTEBRAE + 1))
        assert all(len(np.unique(labels[components == c])) == 1 for c in order)
        sizes = {int((labels == k).sum()) for k in range(1, VERTEBRAE + 1)}
        assert len(sizes) == 1  # identical blocks: only the order tells them apart
        starts.append(parts["start"])
    # the column's start moves by more than one block period: a slice's index is not its z
    assert max(starts) - min(starts) > parts["period"]


def test_small_lesions_phantom_holds_lesions_of_a_few_voxels_inside_the_organ():
    from data_tools.synthetic import make_phantom

    labels = make_phantom(48, seed=0, vessels=False).labels
    lesions, n = ndimage.label(labels == 2)
    sizes = np.bincount(lesions.ravel())[1:]
    assert n >= 4 and sizes.min() <= 20  # lesions of a few voxels at 48³
    shell = ndimage.binary_dilation(labels == 2) & (labels != 2)
    assert np.isin(labels[shell], (1,)).mean() > 0.9  # surrounded by the organ


def test_context_dataset_folder_reads_back_its_cases(tmp_path):
    from data_tools.datasets import open_dataset, read_case
    from data_tools.synthetic.dataset import write_phantom_dataset

    path = write_phantom_dataset(tmp_path / "Task09_Count", cases=2, test=1, shapes=16, task="counting")
    dataset = open_dataset(path)
    assert tuple(dataset.class_names) == CONTEXT_CLASSES["counting"]
    volume = read_case(dataset, dataset.training[1])
    image, labels = make_context_case("counting", (16, 16, 16), seed=1)
    np.testing.assert_array_equal(volume.labels, labels)
    np.testing.assert_array_equal(volume.array, np.rint(image).astype(np.int16))


def test_study_measures_on_known_predictions():
    from workbench.analysis.patch_study import confusion_rate, grid_error_rates, grid_planes, lesion_detection

    truth = np.zeros((16, 16, 16), np.uint8)
    truth[1, 1, 1] = 2  # a 1-voxel lesion, found
    truth[5:7, 5:7, 5:7] = 2  # 8 voxels, missed
    truth[10:13, 10:13, 10:13] = 2  # 27 voxels, found by one voxel
    pred = np.zeros_like(truth)
    pred[1, 1, 1] = pred[12, 12, 12] = 2
    found = lesion_detection(pred, truth, 2, bins=(8, 64))
    assert found["bins"] == ["1-8", "9-64", ">64"]
    assert found["total"] == [2, 1, 0] and found["found"] == [1, 1, 0] and sorted(found["sizes"]) == [1, 8, 27]
    # mirror organs of 8 voxels each: one missed (not counted), one of the other 15 given the other side's label
    sides = np.zeros((2, 2, 4), np.uint8)
    sides[..., :2], sides[..., 2:] = 1, 2
    guess = sides.copy()
    guess[0, 0, 0] = 2
    guess[1, 1, 3] = 0  # missed, not confused
    assert confusion_rate(guess, sides, (1, 2)) == pytest.approx(1 / 15)
    assert confusion_rate(np.zeros_like(sides), sides, (1, 2)) is None
    # the tile borders of 8-voxel windows at half-patch steps over 16: windows at 0, 4, 8
    assert grid_planes((16, 16, 16), (8, 8, 8)) == [[4, 8, 12]] * 3
    rates = grid_error_rates(truth, truth, (8, 8, 8), band=1)
    assert rates["error_rate_near"] == rates["error_rate_elsewhere"] == 0.0
    assert rates["volume_fraction_near"] == pytest.approx(
        1 - (10 / 16) ** 3
    )  # voxels 3, 4, 7, 8, 11, 12 of each axis touch a border
