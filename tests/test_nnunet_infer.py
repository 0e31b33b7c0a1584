"""An nnU-Net-trained model on a whole volume, partitioned (workbench.app.nnunet and
``workbench infer … --checkpoint NNUNET_TRAINING_FOLDER``): the fixture's results folder
(2-channel MRI, region labels) on small synthetic cases. The command's labels equal the
single-device reference's exactly; normalisation equals a hand computation from the plans'
numbers; region painting and argmax on hand-made logits; bad inputs refused before anything
is written (the command-line ones are in tests/bad_inputs.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools import Volume, read_volume, write_volume
from workbench.app.nnunet import (
    channel_files,
    crop_to_nonzero,
    logits_to_segmentation,
    normalise_channel,
    open_nnunet_folder,
    predict_nnunet,
    preprocess,
)
from workbench.cli import main
from workbench.errors import UserError

RESULTS = (
    Path(__file__).parent
    / "fixtures"
    / "nnunet"
    / "results"
    / "Dataset903_ThickMRI"
    / "nnUNetTrainer__nnUNetPlans__3d_fullres"
)
PLANS = json.loads((RESULTS / "plans.json").read_text())
PROPS = PLANS["foreground_intensity_properties_per_channel"]
SPACING = (4.0, 0.6000000238418579, 0.6000000238418579)  # the plan's (float32 in NIfTI)


def _case(shape, seed=0):
    """Two channels like the fixture's MRI (T2 ~ 318 ± 38, ADC ~ 900 ± 77) with a bright,
    low-ADC ellipsoid, so the network sees structure."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    blob = (z**2 + (y / 0.7) ** 2 + (x / 0.6) ** 2) < 0.5
    t2 = rng.normal(318, 38, shape) + 150 * blob
    adc = rng.normal(900, 77, shape) - 400 * blob
    return np.stack([t2, adc]).astype(np.float32)


def _write_case(folder: Path, name: str, data, spacing=SPACING):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, channel in enumerate(data):
        path = folder / f"{name}_{c:04d}.nii.gz"
        write_volume(Volume(channel, spacing=spacing), path)
        paths.append(path)
    return paths


def _infer(argv) -> int:
    return main(["infer", *map(str, argv)])


@pytest.fixture(scope="module")
def even_run(tmp_path_factory):
    """The command on an even case (6×24×32, channel files) on 2x2x2, with --reference."""
    tmp = tmp_path_factory.mktemp("even")
    files = _write_case(tmp / "imagesTs", "case_001", _case((6, 24, 32)))
    out = tmp / "out"
    assert _infer([*files[::-1], "--checkpoint", RESULTS, "--mesh", "2x2x2", "--out", out, "--reference"]) == 0
    return files, out


@pytest.fixture(scope="module")
def uneven_run(tmp_path_factory):
    """The command on an uneven case (5×19×27, named by its case id) on 1x2x4, with --reference
    and --mirror (nnU-Net's test-time mirroring, the reference mirrored too)."""
    tmp = tmp_path_factory.mktemp("uneven")
    files = _write_case(tmp / "imagesTs", "case_002", _case((5, 19, 27), seed=1))
    out = tmp / "out"
    argv = [tmp / "imagesTs" / "case_002", "--checkpoint", RESULTS, "--fold", "0", "--mesh", "1x2x4"]
    assert _infer([*argv, "--out", out, "--reference", "--save-logits", "--mirror"]) == 0
    return files, out


@pytest.mark.parametrize("which", ["even_run", "uneven_run"])
def test_the_command_equals_the_single_device_reference(which, request):
    files, out = request.getfixturevalue(which)
    report = json.loads((out / "report.json").read_text())
    written = read_volume(out / report["prediction"])
    source = read_volume(files[0])
    assert report["prediction"] == "prediction.nii.gz"
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    labels = np.asarray(written.array)
    reference = np.load(out / "reference_prediction.npy")
    np.testing.assert_array_equal(labels, reference)  # exactly, on every voxel
    assert report["label_agreement"] == 1.0
    assert report["max_abs_diff"] <= 1e-5 * max(1.0, report["reference_scale"])
    assert set(np.unique(labels)) <= {0, 1, 2} and len(np.unique(labels)) >= 2  # painted regions, not all one
    for key in ("mesh", "backend", "input_shape", "output_shape", "seconds", "peak_bytes_per_device", "per_shard"):
        assert report[key] is not None, key
    assert report["input_shape"] == list(source.shape) and report["nnunet"]["fold"] == "0"
    assert report["class_names"] == ["background", "whole", "core"]  # the value each region paints
    assert report["nnunet"]["preprocessing"]["resampled"] is False


def test_the_python_api_gives_the_commands_labels(uneven_run):
    """predict_nnunet on the reference backend (1x1x1) equals the command's partitioned file."""
    files, out = uneven_run
    run = predict_nnunet(RESULTS, files, "1x1x1", backend="reference", mirror=True)
    plain = predict_nnunet(RESULTS, files, "1x1x1", backend="reference")
    assert run.report["nnunet"]["mirror_axes"] == [0, 1, 2] and plain.report["nnunet"]["mirror_axes"] is None
    assert not np.allclose(run.logits, plain.logits)  # mirroring changes the logits (and was applied)
    from workbench.app.nnunet import _run
    from workbench.mesh import MeshSpec

    x, ref = np.moveaxis(plain.preprocessed.data, 0, -1), MeshSpec()
    by_hand = (
        _run(plain.model, x, ref, "reference").output
        + np.flip(_run(plain.model, x[:, ::-1], ref, "reference").output, 1)
    ) / 2
    np.testing.assert_allclose(_run(plain.model, x, ref, "reference", (1,)).output, by_hand, rtol=0, atol=1e-6)
    written = np.asarray(read_volume(out / "prediction.nii.gz").array)
    np.testing.assert_array_equal(run.segmentation, written)
    assert np.load(out / "logits.npy").shape == (*run.preprocessed.data.shape[1:], 2)


def test_normalisation_equals_the_plans_numbers_by_hand():
    rng = np.random.default_rng(3)
    image = rng.normal(330, 60, (4, 5, 6)).astype(np.float32)
    p = PROPS["0"]
    ct = normalise_channel(image, "CTNormalization", properties=p)
    by_hand = (np.clip(image.astype(np.float64), p["percentile_00_5"], p["percentile_99_5"]) - p["mean"]) / p["std"]
    np.testing.assert_allclose(ct, by_hand, rtol=0, atol=1e-5)
    assert ct.dtype == np.float32 and ct.min() >= (281 - p["mean"]) / p["std"] - 1e-6
    z = normalise_channel(image, "ZScoreNormalization")
    x64 = image.astype(np.float64)
    np.testing.assert_allclose(z, (x64 - x64.mean()) / x64.std(), atol=1e-5)
    mask = np.zeros(image.shape, bool)
    mask[1:3] = True  # use_mask_for_norm: statistics inside, the outside untouched
    zm = normalise_channel(image, "ZScoreNormalization", use_mask=True, mask=mask)
    inside = x64[mask]
    np.testing.assert_allclose(zm[mask], (inside - inside.mean()) / inside.std(), atol=1e-5)
    np.testing.assert_array_equal(zm[~mask], image[~mask])
    r = normalise_channel(image, "RescaleTo01Normalization")
    assert r.min() == 0 and abs(r.max() - 1) < 1e-6
    with pytest.raises(UserError, match="not supported"):
        normalise_channel(image, "RGBTo01Normalization")


def test_preprocess_crops_to_nonzero_and_normalises_per_channel():
    data = _case((6, 16, 16))
    data[:, :1] = 0  # a zero slab: nnU-Net crops it off and labels it background
    data[:, :, -3:] = 0
    folder = open_nnunet_folder(RESULTS)
    pre = preprocess(data, SPACING, folder)
    assert pre.box == ((1, 6), (0, 13), (0, 16)) and not pre.resampled
    cropped = data[:, 1:, :13].astype(np.float64)
    for c in range(2):  # the fixture's plan: ZScoreNormalization, use_mask_for_norm false
        want = (cropped[c] - cropped[c].mean()) / cropped[c].std()
        np.testing.assert_allclose(pre.data[c], want, atol=1e-5)
    cut, mask, box = crop_to_nonzero(np.zeros((1, 3, 3, 3)))
    assert box == ((0, 3), (0, 3), (0, 3)) and cut.shape == (1, 3, 3, 3)


def test_region_painting_and_argmax_on_hand_made_logits():
    # voxels: both regions on, whole only, core only, neither, a logit of exactly 0 (sigmoid 0.5: off)
    whole = np.array([3.0, 2.0, -2.0, -1.0, 0.0])
    core = np.array([1.0, -4.0, 5.0, -1.0, 0.0])
    logits = np.stack([whole, core]).reshape(2, 1, 1, 5)
    seg = logits_to_segmentation(logits, "sigmoid", (1, 2))
    assert seg.ravel().tolist() == [2, 1, 2, 0, 0]  # later regions overwrite; core alone still paints 2
    assert logits_to_segmentation(logits, "sigmoid", (2, 1)).ravel().tolist() == [1, 2, 1, 0, 0]
    three = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, -3.0], [0.2, 1.0, 4.0]]).reshape(3, 1, 1, 3)
    assert logits_to_segmentation(three, "softmax").ravel().tolist() == [0, 1, 2]
    assert seg.dtype == np.uint8


def test_channel_files_by_case_id_and_bad_channel_counts(tmp_path):
    files = _write_case(tmp_path / "imagesTs", "case_9", np.zeros((2, 2, 3, 4), np.float32))
    names = ["T2", "ADC"]
    assert channel_files(tmp_path / "imagesTs" / "case_9", names) == files
    assert channel_files(files[::-1], names) == files
    with pytest.raises(UserError, match=r"1 input channel file\(s\) given .* the network expects 2"):
        channel_files(files[:1], names)
    with pytest.raises(UserError, match="no channel files case_8_0000"):
        channel_files(tmp_path / "imagesTs" / "case_8", names)
    with pytest.raises(UserError, match="expects 2 channel"):
        predict_nnunet(RESULTS, _case((4, 8, 8))[:1], "1x1x1")


def test_a_mesh_that_cannot_split_a_stride_level_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"mesh x=8 cannot split the x axis.*use x <= 2"):
        predict_nnunet(RESULTS, _case((4, 8, 16)), "1x1x8")


def test_folders_that_are_not_a_complete_training_folder(tmp_path):
    partial = tmp_path / "Dataset1__nnUNetPlans__3d_fullres"
    (partial / "fold_0").mkdir(parents=True)
    shutil.copy(RESULTS / "plans.json", partial)
    with pytest.raises(UserError, match="lacks dataset.json"):
        open_nnunet_folder(partial)
    with pytest.raises(UserError, match="has no fold_4; use --fold with one of 0"):
        open_nnunet_folder(RESULTS, fold=4)


def test_transpose_and_resampling_are_undone_on_the_input_grid():
    """A plan that transposes (z, y, x) → (x, z, y) and a spacing that needs resampling: the
    segmentation comes back on the input's grid, equal to the rule applied there directly."""
    import dataclasses

    folder = open_nnunet_folder(RESULTS)
    plans = {**folder.plans, "transpose_forward": [2, 0, 1], "transpose_backward": [1, 2, 0]}
    config = {**folder.config, "spacing": [0.6, 4.0, 0.6], "normalization_schemes": ["NoNormalization"] * 2}
    moved = dataclasses.replace(folder, plans=plans, config=config)
    rng = np.random.default_rng(5)
    data = rng.normal(0, 1, (2, 3, 5, 7)).astype(np.float32)
    data[data == 0] = 1  # no zeros: no crop
    pre = preprocess(data, (4.0, 0.6, 0.6), moved)
    assert pre.data.shape == (2, 7, 3, 5) and not pre.resampled
    from workbench.app.nnunet import postprocess

    class Spec:
        output_kind, regions_class_order = "sigmoid", (1, 2)

    seg = postprocess(np.moveaxis(pre.data, 0, -1), pre, Spec)
    np.testing.assert_array_equal(seg, logits_to_segmentation(data, "sigmoid", (1, 2)))
    coarse = preprocess(data, (4.0, 1.2, 0.6), moved)  # y twice as coarse as the plan: resampled to 10
    assert coarse.resampled and coarse.data.shape == (2, 7, 3, 10)
    assert postprocess(np.moveaxis(coarse.data, 0, -1), coarse, Spec).shape == data.shape[1:]


def test_the_memory_guard_covers_nnunet_networks(even_run, monkeypatch, tmp_path, capsys):
    """Compile-only: the guard reads the forward compiled for the run itself (no second compile);
    too little memory: exit 2, one line, nothing written; --force runs anyway."""
    import workbench.app.memory_guard as guard

    files, _ = even_run
    monkeypatch.setattr(guard, "available_memory", lambda n: (2**16, "a test budget of 64 KiB"))
    out = tmp_path / "out"
    argv = [*files, "--checkpoint", RESULTS, "--mesh", "2x2x2", "--out", out]
    assert _infer(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this inference run needs the planner's" in err, err
    assert "is available (a test budget of 64 KiB)" in err and err.rstrip().endswith("or pass --force to run anyway")
    assert not out.exists()
    assert _infer([*argv, "--force"]) == 0 and (out / "report.json").is_file()
