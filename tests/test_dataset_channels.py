"""Datasets with several channels and region labels: the two-channel tumour phantom, nnU-Net's
per-channel normalisation in the block-by-block training data, and evaluation of every channel."""

import json
import shutil

import numpy as np
import pytest

from data_tools import DataError
from data_tools.datasets import open_dataset, read_case_channels, write_phantom_dataset
from data_tools.synthetic.tumour import TUMOUR_INTENSITY, TUMOUR_NOISE
from workbench.cli import main


@pytest.fixture(scope="module")
def tumour(tmp_path_factory):
    """6 two-channel tumour phantoms (32–40 voxels per side), nnU-Net layout with regions."""
    return write_phantom_dataset(tmp_path_factory.mktemp("tumour") / "Dataset002_Tumour", task="tumour",
                                 layout="nnunet", test=1)  # fmt: skip


@pytest.fixture(scope="module")
def source(tumour):
    from workbench.training.datasets import DatasetSource

    return DatasetSource(tumour, fold=0, progress=False)


def test_tumour_phantom_ground_truth_encodes_what_it_claims(tumour):
    """dataset.json declares nnU-Net's regions; in every case the core lies inside the whole
    lesion, T2 (channel 0) marks the whole lesion and not the core within it, ADC (channel 1)
    marks the core and not the oedema: differences of at least 5 noise SDs where a channel
    shows something, at most 1.5 where it must not."""
    spec = json.loads((tumour / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "T2", "1": "ADC"}
    assert spec["labels"] == {"background": 0, "whole": [1, 2], "core": 2} and spec["regions_class_order"] == [1, 2]
    ds = open_dataset(tumour)
    assert ds.regions == (("whole", (1, 2)), ("core", (2,))) and ds.regions_class_order == (1, 2)
    assert ds.class_names == ("background", "label1", "core") and ds.channel_names == ("T2", "ADC")
    assert [f.name for f in ds.training[1].images] == ["tumour_001_0000.nii.gz", "tumour_001_0001.nii.gz"]
    from scipy.ndimage import binary_dilation, binary_erosion

    t2_sd, adc_sd = TUMOUR_NOISE
    for files in ds.training:
        t2, adc = (v.array.astype(np.float64) for v in read_case_channels(ds, files))
        labels = read_case_channels(ds, files)[0].labels
        whole, core = np.isin(labels, (1, 2)), labels == 2
        assert core.sum() >= 50 and (whole & ~core).sum() >= 200, files.name  # both learnable at this size
        assert not (core & ~whole).any()  # the core inside the whole, by the label values themselves
        # voxels away from the edges (no partial volume): oedema and core eroded, brain away from both
        oedema = binary_erosion(whole & ~core)
        core_in = binary_erosion(core) if binary_erosion(core).sum() >= 8 else core
        brain = binary_erosion(t2 > 150, iterations=2) & ~binary_dilation(whole, iterations=2)
        assert brain.sum() > 1000
        assert t2[oedema].mean() - t2[brain].mean() > 5 * t2_sd  # T2 shows the whole lesion ...
        assert t2[core_in].mean() - t2[brain].mean() > 5 * t2_sd
        assert abs(t2[core_in].mean() - t2[oedema].mean()) < 1.5 * t2_sd  # ... but not where the core is
        assert adc[oedema].mean() - adc[core_in].mean() > 5 * adc_sd  # ADC shows the core ...
        assert abs(adc[oedema].mean() - adc[brain].mean()) < 1.5 * adc_sd + 0.1 * TUMOUR_INTENSITY["brain"][1]
    assert (tumour / "imagesTs" / "tumour_006_0001.nii.gz").is_file()


def test_msd_layout_declares_classes_not_regions(tmp_path):
    ds = open_dataset(write_phantom_dataset(tmp_path / "Task02_Tumour", task="tumour", cases=2, test=0))
    assert ds.layout == "msd" and ds.regions == () and ds.class_names == ("background", "oedema", "core")
    assert len(ds.training[0].images) == 2


def test_two_channel_batches_blocks_and_normalisation(source):
    """Batches are (N, Z, Y, X, 2) float32; each channel is nnU-Net's z-score of the case
    (normalise_channel with the case's statistics); the blocks of a 2x2x2 split equal the
    batch's slices bitwise, and a validation case read by box equals the whole case."""
    from workbench.model.nnunet_rules import normalise_channel
    from workbench.training.data import batch_blocks

    assert source.channels == 2 and source.plan.channels == 2
    assert source.plan.normalisation == (("ZScoreNormalization", None), ("ZScoreNormalization", None))
    images, labels = source.train_batch(1, 2, seed=3)
    assert images.shape == (2, *source.shape, 2) and images.dtype == np.float32 and labels.dtype == np.int32
    halves = [((0, n // 2), (n // 2, n)) for n in source.shape]
    keys = [((0, 2), z, y, x) for z in halves[0] for y in halves[1] for x in halves[2]]
    for key, (image, label) in zip(keys, batch_blocks(source, 1, 2, keys, seed=3)):
        index = tuple(slice(lo, hi) for lo, hi in key)
        np.testing.assert_array_equal(image, images[index])
        np.testing.assert_array_equal(label, labels[index])
    # unaugmented: the case's channels, z-scored each with its own mean and SD
    plain, truth = source.train_batch(1, 1, seed=3, augment_data=False)
    files = source.train_files[source._pick(1, 0)]
    volumes = read_case_channels(source.dataset, files)
    grid = volumes[0].shape
    for c, volume in enumerate(volumes):
        expected = normalise_channel(volume.array, "ZScoreNormalization")
        np.testing.assert_allclose(plain[0, : grid[0], : grid[1], : grid[2], c], expected, rtol=0, atol=2e-5)
    np.testing.assert_array_equal(truth[0, : grid[0], : grid[1], : grid[2]], volumes[0].labels)
    for i, case in enumerate(source.eval_cases(2)):
        image, lab = source.eval_block(i, tuple((0, n) for n in source.shape))
        np.testing.assert_array_equal(image, case.image)
        np.testing.assert_array_equal(lab, case.labels)
    assert source.meta["dataset"]["regions"] == [["whole", [1, 2]], ["core", [2]]]
    assert source.meta["preprocessing"]["normalisation"][1] == {"scheme": "ZScoreNormalization", "properties": None}


def test_ct_channel_gets_the_training_foregrounds_numbers(tumour, tmp_path):
    """A channel named CT: CTNormalization with the training cases' foreground (label > 0)
    mean, SD and 0.5/99.5 percentiles (every foreground voxel: under 1250 per slab here),
    equal to numpy's over those voxels; channel 1 keeps its z-score."""
    from workbench.model.nnunet_rules import normalise_channel
    from workbench.training.datasets import DatasetSource

    copy = shutil.copytree(tumour, tmp_path / tumour.name)
    spec = json.loads((copy / "dataset.json").read_text())
    spec["channel_names"] = {"0": "ct", "1": "ADC"}  # nnU-Net casefolds the name
    (copy / "dataset.json").write_text(json.dumps(spec))
    source = DatasetSource(copy, fold=1, progress=False)
    (scheme, props), second = source.plan.normalisation
    assert scheme == "CTNormalization" and second == ("ZScoreNormalization", None)
    values = np.concatenate([
        v[0].array[v[0].labels > 0].astype(np.float64)
        for v in (read_case_channels(source.dataset, f) for f in source.train_files)
    ])  # fmt: skip
    assert props["mean"] == pytest.approx(values.mean(), rel=1e-9)
    assert props["std"] == pytest.approx(values.std(), rel=1e-9)
    assert (props["percentile_00_5"], props["percentile_99_5"]) == pytest.approx(np.percentile(values, (0.5, 99.5)))
    plain, _ = source.train_batch(0, 1, seed=0, augment_data=False)
    files = source.train_files[source._pick(0, 0)]
    t2 = read_case_channels(source.dataset, files)[0].array
    expected = normalise_channel(t2, "CTNormalization", properties=props)
    np.testing.assert_allclose(plain[0, : t2.shape[0], : t2.shape[1], : t2.shape[2], 0], expected, atol=2e-5)


def test_one_channel_dataset_keeps_the_workbench_rule_unless_asked(tmp_path):
    """A one-channel CT dataset: the abdomen window as before (no normalisation in the plan);
    ``normalisation="nnunet"`` gives CTNormalization with its foreground's numbers instead."""
    from workbench.training.datasets import DatasetSource

    ct = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=5, test=0, shapes=20)
    default = DatasetSource(ct, fold=0, progress=False)
    assert default.plan.normalisation == () and "normalisation" not in default.meta["preprocessing"]
    nnunet = DatasetSource(ct, fold=0, progress=False, normalisation="nnunet")
    assert nnunet.plan.normalisation[0][0] == "CTNormalization"
    a = default.train_batch(0, 1, seed=0, augment_data=False)[0]
    b = nnunet.train_batch(0, 1, seed=0, augment_data=False)[0]
    assert a.shape == b.shape == (1, *default.shape, 1) and a.min() == pytest.approx(-2.0) and not np.allclose(a, b)


def test_channel_survey_and_foreground_are_the_same_for_any_process_count(tumour):
    """P processes each survey slabs p, p+P, … of every channel (and of the CT foreground
    sampling); combined in slab order the statistics are bitwise those of one process."""
    from workbench.training.cases import _finish, foreground_finish, foreground_rows, survey_rows
    from workbench.training.datasets import DatasetSource

    source = DatasetSource(tumour, fold=2, progress=False)
    readers = source.readers
    expected = [dict(r.stats) for r in readers]
    means = [c["mean"] for c in expected[0]["channels"]]
    assert len(means) == 2 and means[1] > 2 * means[0]  # ADC (brain 800) and T2 (brain 300) apart
    fg_one = foreground_finish(*foreground_rows(readers, [0, 1], 0, 1), [0, 1])
    for count in (2, 3):
        for r in readers:
            r.stats = None
        parts = [survey_rows(readers, p, count) for p in range(count)]
        jobs = parts[0][0]
        _finish(jobs, np.stack([parts[k % count][1][k] for k in range(len(jobs))]))
        assert [r.stats for r in readers] == expected
        parts = [foreground_rows(readers, [0, 1], p, count) for p in range(count)]
        jobs = parts[0][0]
        rows = np.stack([parts[k % count][1][k] for k in range(len(jobs))])
        assert foreground_finish(jobs, rows, [0, 1]) == fg_one


def _broken(tumour, tmp_path, how):
    copy = shutil.copytree(tumour, tmp_path / tumour.name)
    how(copy)
    return copy


BAD = {
    "missing channel": (lambda d: (d / "imagesTr" / "tumour_002_0001.nii.gz").unlink(),
                        "case tumour_002: channel file imagesTr/tumour_002_0001.nii.gz is missing"),
    "extra channel": (lambda d: shutil.copy(d / "imagesTr" / "tumour_002_0001.nii.gz",
                                            d / "imagesTr" / "tumour_002_0002.nii.gz"),
                      "imagesTr/tumour_002_0002.nii.gz is channel 2 but dataset.json declares 2 channel(s)"),
    "channel shapes differ": (lambda d: shutil.copy(d / "imagesTr" / "tumour_000_0001.nii.gz",
                                                    d / "imagesTr" / "tumour_001_0001.nii.gz"),
                              "case tumour_001: channel file imagesTr/tumour_001_0001.nii.gz has shape (32, 36, 32)"),
    "regions without order": (lambda d: d.joinpath("dataset.json").write_text(
        json.dumps({k: v for k, v in json.loads(d.joinpath("dataset.json").read_text()).items()
                    if k != "regions_class_order"})),
                              "declares region-based labels ['whole', 'core'] but \"regions_class_order\" is None"),
}  # fmt: skip


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_channels_are_one_error(tumour, tmp_path, problem):
    from data_tools.datasets import check_dataset

    how, expect = BAD[problem]
    copy = _broken(tumour, tmp_path, how)
    with pytest.raises(DataError) as err:
        check_dataset(open_dataset(copy))
    assert expect in str(err.value)


def test_one_4d_msd_file_for_two_channels_is_refused(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=2, test=0)
    spec = json.loads((ds / "dataset.json").read_text())
    spec["modality"] = {"0": "FLAIR", "1": "T1w"}
    (ds / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match="one image file imagesTr/phantom_000.nii.gz for the 2 channels"):
        open_dataset(ds)


def test_evaluation_fills_every_channel_and_scores_regions(source, make_model):
    """A 2-channel model (paper U-Net, tiny) evaluated whole and by blocks on a 2x2x2 mesh:
    the same Dice per class and per region; the region Dice equals Dice of isin(seg, region)
    computed here, and the model sees channel 1 (zeroing it changes the logits)."""
    from workbench.execute.run import run
    from workbench.model.unet import UNetConfig
    from workbench.training.data import model_batch
    from workbench.training.evaluation import evaluate, evaluate_blocks, held_out_blocks

    model = make_model(UNetConfig(depth=2, base_filters=4, num_classes=3, in_channels=2), 0, perturbed_model=True)
    regions = source.dataset.regions
    whole = evaluate(model, source.eval_cases(2), "2x2x2", regions=regions, hd95=False)
    blocks = evaluate_blocks(model, held_out_blocks(source, 2), 2, "2x2x2", regions=regions)
    for key in ("dice_per_case", "pooled_dice", "region_dice_per_case", "pooled_region_dice"):
        assert whole[key].keys() == blocks[key].keys(), key
        for name in whole[key]:
            assert np.allclose(np.array(whole[key][name], float), np.array(blocks[key][name], float), atol=1e-12,
                               equal_nan=True), (key, name)  # fmt: skip
    case = next(iter(source.eval_cases(1)))
    logits = run(model, model_batch(case.image), "2x2x2").output[0]
    pred = logits.argmax(-1)
    for (name, values), got in zip(regions, whole["region_dice_per_case"].values()):
        p, t = np.isin(pred, values), np.isin(case.labels, values)
        expected = 2 * (p & t).sum() / (p.sum() + t.sum()) if p.sum() + t.sum() else None
        assert got[0] == (pytest.approx(expected, abs=1e-12) if expected is not None else None), name
    blind = case.image.copy()
    blind[..., 1] = 0
    assert np.abs(run(model, model_batch(blind), "2x2x2").output[0] - logits).max() > 1e-3


def test_region_outputs_are_painted_in_order():
    """predicted_labels of a sigmoid model (numpy) and evaluate_blocks' jitted painter agree
    with nnU-Net's rule (logits_to_segmentation): later regions overwrite earlier ones."""
    from types import SimpleNamespace

    from workbench.model.nnunet_rules import logits_to_segmentation
    from workbench.training.evaluation import _labels_fn, predicted_labels, region_dice

    model = SimpleNamespace(spec=SimpleNamespace(output_kind="sigmoid", regions_class_order=(1, 2)))
    logits = np.random.default_rng(0).normal(0, 2, (6, 5, 4, 2)).astype(np.float32)
    expected = logits_to_segmentation(np.moveaxis(logits, -1, 0), "sigmoid", (1, 2))
    np.testing.assert_array_equal(predicted_labels(logits, model), expected)
    np.testing.assert_array_equal(np.asarray(_labels_fn(model)(logits)), expected)
    assert set(np.unique(expected)) == {0, 1, 2}
    assert (expected[(logits[..., 1] > 0)] == 2).all()  # the core paints over the whole
    # region Dice: of isin(seg, values); whole {1, 2}: 2·3/(4+3), core {2}: 2·1/(2+2), none: NaN
    truth = np.array([0, 1, 2, 2, 0, 0])
    pred = np.array([0, 2, 2, 1, 1, 0])
    dice = region_dice(pred, truth, (("whole", (1, 2)), ("core", (2,)), ("none", (3,))))
    np.testing.assert_allclose(dice[:2], [6 / 7, 2 / 4], rtol=1e-12)
    assert np.isnan(dice[2])


def test_workbench_evaluate_reads_every_channel_and_scores_regions(tumour, source, make_model, tmp_path):
    """`workbench evaluate` of a 2-channel weights file on the tumour dataset: each case is read
    with both channels and normalised with the weights' preprocessing; cases.csv's region Dice
    equals that of the written prediction against the labels; a 1-channel model is refused."""
    import csv

    from data_tools.io import read_volume
    from workbench.model.unet import UNetConfig
    from workbench.training.checkpoint import save_weights
    from workbench.training.evaluation import region_dice

    model = make_model(UNetConfig(depth=2, base_filters=4, num_classes=3, in_channels=2), 0, perturbed_model=True)
    weights = save_weights(tmp_path / "two.msgpack", model, source.meta)
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(weights), "--data", str(tumour), "--mesh", "2x2x2",
                 "--out", str(out)]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(out / "cases.csv")))
    assert [r["case"] for r in rows] == source.meta["dataset"]["val"]
    ds = open_dataset(tumour)
    for row in rows:
        pred = read_volume(out / row["prediction"]).array
        truth = read_case_channels(ds, row["case"])[0].labels
        dice = region_dice(pred, truth, ds.regions)
        for (name, _), d in zip(ds.regions, dice):
            assert float(row[f"region_dice_{name}"]) == pytest.approx(d, abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["mean_region_dice"]) == {"whole", "core"}
    assert summary["preprocessing"]["normalisation"] == source.meta["preprocessing"]["normalisation"]
    one = save_weights(tmp_path / "one.msgpack", make_model(UNetConfig(depth=2, base_filters=4, num_classes=3), 0))
    argv = [
        "evaluate",
        "--checkpoint",
        str(one),
        "--data",
        str(tumour),
        "--mesh",
        "2x2x2",
        "--out",
        str(tmp_path / "e1"),
    ]
    assert main(argv) == 2
    assert not (tmp_path / "e1").exists()


def test_a_preset_takes_the_datasets_input_channels(source):
    """`workbench train --data TUMOUR --model small`: the loop builds the preset with the
    dataset's 2 channels (it crashed in JAX with 1), and keeps 1 for one-channel data."""
    from workbench.training.config import TrainConfig, model_config

    tc = TrainConfig(data="tumour", model="small")
    assert source.channels == 2 and model_config(tc, source.num_classes, source.channels).in_channels == 2
    assert model_config(tc, 3).in_channels == 1
