"""Datasets in the MSD / nnU-Net layout: reading, checks, folds, lazy training and `workbench evaluate`."""

import csv
import json
import shutil

import numpy as np
import pytest

from data_tools import DataError, Volume, read_volume, write_volume
from data_tools.datasets import (
    check_dataset,
    crossval_folds,
    open_dataset,
    read_case,
    resample_onto,
    write_phantom_dataset,
)
from workbench.cli import main

TINY_OVERRIDES = {"depth": 2, "base_filters": 4}


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    """6 training + 2 test phantoms of different shapes and anisotropic spacings (MSD layout)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("ds") / "Task01_Phantom", cases=6, test=2, test_labels=True)


def _copy(msd, tmp_path):
    return shutil.copytree(msd, tmp_path / msd.name)


# -- reading -----------------------------------------------------------------------------------
def test_msd_and_nnunet_layouts_read_the_same_cases(msd, tmp_path):
    nnunet = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=6, test=2, layout="nnunet")
    a, b = open_dataset(msd), open_dataset(nnunet)
    assert (a.layout, b.layout) == ("msd", "nnunet")
    assert a.class_names == b.class_names == ("background", "organ", "lesion")
    assert a.channel_names == b.channel_names == ("CT",)
    assert a.names == b.names == [f"phantom_{i:03d}" for i in range(6)]
    assert [c.name for c in a.test] == [c.name for c in b.test] == ["phantom_006", "phantom_007"]
    assert b.case("phantom_001").images[0].name == "phantom_001_0000.nii.gz"
    va, vb = read_case(a, "phantom_001"), read_case(b, "phantom_001")
    np.testing.assert_array_equal(va.array, vb.array)
    np.testing.assert_array_equal(va.labels, vb.labels)
    assert va.metadata["modality"] == "CT" and va.class_names == a.class_names
    # every case keeps its own grid: shapes and spacings differ, odd cases are stored x-flipped
    infos = check_dataset(a)
    assert len({i.shape for i in infos.values()}) == 6
    assert len({i.spacing for i in infos.values()}) >= 5
    assert infos["phantom_001"].affine[0, 2] < 0 < infos["phantom_000"].affine[0, 2]


def test_folds_are_nnunets():
    """KFold(5, shuffle=True, random_state=12345) over the sorted names, without scikit-learn."""
    KFold = pytest.importorskip("sklearn.model_selection").KFold
    for n in (5, 6, 7, 13, 20, 131):
        names = [f"liver_{i}" for i in range(n)]
        ref_names = sorted(names)
        ref = [
            ([ref_names[i] for i in tr], [ref_names[i] for i in te])
            for tr, te in KFold(5, shuffle=True, random_state=12345).split(ref_names)
        ]
        assert crossval_folds(names[::-1]) == ref
    folds = crossval_folds([f"c{i}" for i in range(20)])
    assert sorted(n for _, val in folds for n in val) == sorted(f"c{i}" for i in range(20))


def test_splits_final_json_takes_precedence(msd, tmp_path):
    ds = _copy(msd, tmp_path)
    (ds / "splits_final.json").write_text(
        json.dumps([{"train": ["phantom_000", "phantom_001"], "val": ["phantom_002"]}])
    )
    train, val = open_dataset(ds).split(0)
    assert [c.name for c in train] == ["phantom_000", "phantom_001"] and [c.name for c in val] == ["phantom_002"]


def test_resample_onto_puts_a_coarse_map_back_on_the_original_grid(msd):
    """Labels resampled to a coarser spacing and back agree with the original (x-flipped case
    with its own origin: the geometry goes through the affines)."""
    from workbench.training.datasets import Preprocessing, prepare_case

    ds = open_dataset(msd)
    volume = read_case(ds, "phantom_001")
    case = prepare_case(volume, Preprocessing((20.0, 15.0, 15.0), None, (1, 1, 1)), name="phantom_001")
    meta = case.metadata
    assert tuple(meta["grid_shape"]) == case.labels.shape != volume.shape
    back = resample_onto(case.labels, meta["grid_affine"], volume.shape, volume.affine, order=0)
    organ = lambda a: a == 1  # noqa: E731
    dice = 2 * np.sum(organ(back) & organ(volume.labels)) / (organ(back).sum() + organ(volume.labels).sum())
    assert back.shape == volume.shape and dice > 0.85


# -- bad datasets: one line naming the case and the fix, nothing written --------------------------
def _set_label(ds, name, array=None, affine_shift=None, shape=None):
    path = ds / "labelsTr" / f"{name}.nii.gz"
    label = read_volume(path)
    data = label.array if array is None else array(label.array)
    affine = label.affine.copy()
    if affine_shift is not None:
        affine[:3, 3] += affine_shift
    if shape is not None:
        data = np.zeros(shape, np.uint8)
    write_volume(Volume(data, spacing=label.spacing, affine=affine), path)


BAD = {
    "no dataset.json": (lambda ds: (ds / "dataset.json").unlink(), [], "has no dataset.json", "add one"),
    "image without its label": (
        lambda ds: (ds / "labelsTr" / "phantom_003.nii.gz").unlink(),
        [],
        "case phantom_003: image imagesTr/phantom_003.nii.gz has no label",
        "add the label map",
    ),
    "shapes differ": (
        lambda ds: _set_label(ds, "phantom_002", shape=(16, 32, 30)),
        [],
        "case phantom_002: labelsTr/phantom_002.nii.gz has shape (16, 32, 30) (z, y, x) but the image has (16, 32, 32)",
        "resample the label map",
    ),
    "affines differ": (
        lambda ds: _set_label(ds, "phantom_004", affine_shift=(0.0, 5.0, 0.0)),
        [],
        "case phantom_004: labelsTr/phantom_004.nii.gz has another affine",
        "write the label map with the image's header",
    ),
    "label outside the classes": (
        lambda ds: _set_label(ds, "phantom_005", array=_with_seven),
        [],
        "case phantom_005: labelsTr/phantom_005.nii.gz holds label values [7] outside the 3 declared classes",
        "declare the classes",
    ),
    "empty fold": (
        lambda ds: (
            [(ds / d / f"phantom_00{i}.nii.gz").unlink() for d in ("imagesTr", "labelsTr") for i in (3, 4, 5)]
            + [_drop_entries(ds, 3)]
        ),
        ["--fold", "4"],
        "fold 4 is empty: 3 training case(s) fill only folds [0, 1, 2]",
        "pass --fold 0",
    ),
}


def _with_seven(labels):
    labels = labels.copy()
    labels[0, 0, 0] = 7
    return labels


def _drop_entries(ds, keep):
    spec = json.loads((ds / "dataset.json").read_text())
    spec["training"], spec["numTraining"] = spec["training"][:keep], keep
    (ds / "dataset.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_dataset_is_one_line_and_writes_nothing(msd, tmp_path, capsys, problem):
    """`workbench train` checks every case of the fold; `workbench evaluate` those it scores
    (here: the fold holding the broken case)."""
    break_it, flags, what, fix = BAD[problem]
    ds = _copy(msd, tmp_path)
    break_it(ds)
    run, out = tmp_path / "run", tmp_path / "eval"
    assert main(["train", "--data", str(ds), *flags, "--steps", "1", "--checkpoint-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and what in err and fix in err, err
    assert not run.exists()
    broken = what.split("case ")[1].split(":")[0] if "case " in what else None
    if not flags and broken:
        folds = crossval_folds(f"phantom_{i:03d}" for i in range(6))
        flags = ["--fold", str(next(k for k, (_, val) in enumerate(folds) if broken in val))]
    argv = ["evaluate", "--data", str(ds), *flags, "--mesh", "2x2x2", "--out", str(out), "--random-weights"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and what in err, err
    assert not out.exists()


def test_nnunet_image_without_label_and_declared_counts(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Dataset002", cases=5, test=0, layout="nnunet")
    (ds / "labelsTr" / "phantom_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case phantom_001: image imagesTr/phantom_001_0000.nii.gz has no label"):
        open_dataset(ds)
    shutil.move(ds / "imagesTr" / "phantom_001_0000.nii.gz", tmp_path / "aside.nii.gz")
    with pytest.raises(DataError, match=r"numTraining=5 but 4 labelled case\(s\)"):
        open_dataset(ds)


# -- training lazily, evaluating in each case's own geometry --------------------------------------
def test_dataset_trains_partitioned_and_evaluates_in_each_cases_geometry(msd, tmp_path, capsys):
    """6 cases of 16–40 voxels per side, 2x2x2 mesh, 4 steps with held-out evaluation on the
    way; never more than two prepared cases alive; then `workbench evaluate` on the fold
    and on the test cases: each prediction has its case's shape and affine, and the CSV's
    Dice is the prediction file's."""
    from workbench.training import TrainConfig
    from workbench.training.datasets import LIVE_CASES
    from workbench.training.loop import train_and_evaluate

    run = tmp_path / "run"
    config = TrainConfig(data=str(msd), fold=0, steps=4, mesh="2x2x2", eval_every=2, eval_cases=2,
                         checkpoint_every=4, model_overrides=TINY_OVERRIDES)  # fmt: skip
    LIVE_CASES.reset()
    result = train_and_evaluate(config, run, progress=False)
    assert LIVE_CASES.peak <= 1 and LIVE_CASES.loaded == 2 * 2  # training reads boxes; evaluation whole cases
    assert result["step"] == 4 and result["eval"]["cases"] == ["phantom_003", "phantom_005"]
    meta = json.loads((run / "config.json").read_text())
    assert meta["dataset"]["val"] == ["phantom_003", "phantom_005"] and meta["train"]["fold"] == 0
    infos = check_dataset(open_dataset(msd))
    median = [float(np.median([i.spacing[d] for i in infos.values()])) for d in range(3)]
    grids = [[round(n * s / m) for n, s, m in zip(i.shape, i.spacing, median)] for i in infos.values()]
    assert meta["preprocessing"]["spacing"] == pytest.approx(median)
    assert meta["preprocessing"]["shape"] == np.max(grids, axis=0).tolist()  # the largest resampled case
    assert len({tuple(g) for g in grids}) > 1  # so the others are padded

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(msd), "--mesh", "2x2x2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 case(s)" in text and "worst: " in text
    rows = list(csv.DictReader(open(out / "cases.csv")))
    assert [r["case"] for r in rows] == ["phantom_003", "phantom_005"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "fold 0" and summary["preprocessing"] == meta["preprocessing"]
    assert summary["worst_cases"][0]["case"] in {"phantom_003", "phantom_005"}
    ds = open_dataset(msd)
    for row in rows:
        image = read_volume(ds.case(row["case"]).images[0])
        pred = read_volume(out / row["prediction"])
        truth = read_case(ds, row["case"]).labels
        assert pred.shape == image.shape and np.allclose(pred.affine, image.affine, atol=1e-5)
        organ = 2 * np.sum((pred.array == 1) & (truth == 1)) / (np.sum(pred.array == 1) + np.sum(truth == 1))
        assert float(row["dice_organ"]) == pytest.approx(organ, abs=1e-9)
        voxel_ml = np.prod(image.spacing) / 1000
        assert float(row["true_ml_organ"]) == pytest.approx(np.sum(truth == 1) * voxel_ml)

    test_out = tmp_path / "test"
    argv = [
        "evaluate",
        "--checkpoint",
        str(run),
        "--data",
        str(msd),
        "--test",
        "--mesh",
        "2x2x2",
        "--out",
        str(test_out),
    ]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(test_out / "cases.csv")))
    assert [r["case"] for r in rows] == ["phantom_006", "phantom_007"] and all(r["dice_organ"] for r in rows)


def test_evaluate_failing_midway_leaves_nothing(msd, tmp_path, capsys):
    """The second test case's voxels are truncated (its header still reads): the first
    prediction was made, but no output folder appears."""
    ds = _copy(msd, tmp_path)
    path = ds / "imagesTs" / "phantom_007.nii.gz"
    path.write_bytes(path.read_bytes()[:2000])
    out = tmp_path / "eval"
    argv = ["evaluate", "--data", str(ds), "--test", "--mesh", "2x2x2", "--out", str(out), "--random-weights"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "phantom_007.nii.gz" in err and "truncated" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_train_config_fields_and_flags():
    import argparse

    from workbench.cli import train
    from workbench.training.config import TrainConfig, train_config_from_flags

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--data", "ds", "--fold", "2", "--spacing", "2.5,1,1", "--checkpoint-dir", "x"])
    config = train_config_from_flags(args)
    assert config == TrainConfig(data="ds", fold=2, spacing=(2.5, 1.0, 1.0))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.as_dict()))) == config
    assert parser.parse_args(["--spacing", "1.5", "--checkpoint-dir", "x"]).spacing == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(spacing=(1.0, 1.0, 1.0), resolution=32)
    from workbench.training.datasets import make_source

    with pytest.raises(ValueError, match="--fold and --spacing apply to a dataset folder"):
        make_source("phantom", 32, fold=1)


def test_the_panel_takes_a_dataset_folder_and_switches_cases(msd):
    """The panel lists the cases (name, grid, spacing); choosing one makes it the input at
    its own shape; training from the panel trains on the dataset; CT cases get the CT model."""
    from workbench.app.models import task_for_input
    from workbench.ui.panel import WorkbenchPanel

    panel = WorkbenchPanel(str(msd), mesh="2x2x2", estimate="off")
    labels = [label for label, _ in panel.case.options]
    assert len(labels) == 8 and labels[0] == "phantom_000: 20x32x28, 20x12.5x14.3 mm"
    assert panel.volume_shape == (20, 32, 28) and panel.resolution.value == "native"
    panel.case.value = "phantom_003"
    assert panel.error is None and panel.volume_shape == (28, 28, 36)
    assert panel.session.volume.labels is not None and task_for_input(panel.session.volume) == "phantom"
    assert panel.session.train_config(panel.settings(), 2).data == str(msd)
    assert panel.case in panel.widget.children[1].children


def test_dataset_blocks_equal_slices_of_the_whole_batch(msd):
    """A dataset case (resampled to the median spacing, padded to the grid): the blocks of a
    2x2x2 split equal the whole batch's slices bitwise, read only their boxes, and the whole
    equals the whole-case preparation (``prepare_case``) within float32 rounding."""
    from data_tools.datasets import read_case
    from workbench.training.data import batch_blocks
    from workbench.training.datasets import DatasetSource, prepare_case

    source = DatasetSource(msd, fold=0, progress=False)
    shape = source.shape
    halves = [((0, n // 2), (n // 2, n)) for n in shape]
    keys = [((0, 2), z, y, x) for z in halves[0] for y in halves[1] for x in halves[2]]
    images, labels = source.train_batch(1, 2, seed=3)
    for key, (image, label) in zip(keys, batch_blocks(source, 1, 2, keys, seed=3)):
        index = tuple(slice(lo, hi) for lo, hi in key)
        np.testing.assert_array_equal(image, images[index])
        np.testing.assert_array_equal(label, labels[index])
    plain, truth = source.train_batch(1, 1, seed=3, augment_data=False)
    files = source.train_files[source._pick(1, 0)]
    whole = prepare_case(read_case(source.dataset, files), source.plan, name=files.name)
    np.testing.assert_allclose(plain[0, ..., 0], whole.image, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(truth[0], whole.labels)
