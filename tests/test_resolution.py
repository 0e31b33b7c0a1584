"""The resolution study (workbench.analysis.resolution): one recipe per arm, every arm
evaluated at the full render resolution; benchmarks/resolution_study.py and notebook 03 call it."""

import numpy as np
import pytest

from workbench.analysis import resolution
from workbench.app import TrainConfig

TINY = {"depth": 2, "base_filters": 4}


def test_study_config_is_the_benchmarks_recipe():
    assert resolution.study_config(64, render=128, steps=100) == TrainConfig(
        data="phantom:128",
        resolution=64,
        mesh="2x2x2",
        steps=100,
        learning_rate=3e-3,
        schedule="cosine",
        checkpoint_every=10,
        backend="explicit",
        augment=False,
        class_weights=(1.0, 8.0, 16.0),
        dice_classes=(2,),
        eval_every=0,
        eval_cases=4,
    )
    assert resolution.RECIPES["paper"] == {
        "class_weights": (1.0, 8.0, 16.0),
        "dice_classes": (2,),
        "learning_rate": 3e-3,
    }
    full = resolution.study_config(128, render=128, steps=100, class_weights=(1, 1, 1), dice_classes=None, augment=True)
    assert (
        full.eval_every == 50 and full.class_weights == (1.0, 1.0, 1.0) and full.dice_classes is None and full.augment
    )


def test_two_resolution_study(tmp_path, monkeypatch):
    seen = []
    predict_full = resolution.predict_full

    def spy(model, image_full, res, mesh):
        labels = predict_full(model, image_full, res, mesh)
        seen.append((res, image_full.shape, labels.shape))
        return labels

    monkeypatch.setattr(resolution, "predict_full", spy)
    rows = resolution.resolution_study(
        [16, 32],
        render=32,
        steps=2,
        workdir=tmp_path,
        model_overrides=TINY,
        eval_cases=1,
        train_eval_cases=0,
        progress=False,
        log=lambda *a: None,
    )
    assert [r["resolution"] for r in rows] == [16, 32]
    for row in rows:
        assert set(row) == {
            "resolution",
            "steps",
            "final_loss",
            "seconds_per_step",
            "train_seconds",
            "interrupted",
            "evaluated_at",
            "organ_dice",
            "lesion_dice",
            "organ_dice_sd",
            "lesion_dice_sd",
            "organ_dice_cases",
            "lesion_dice_cases",
            "detection",
            "detection_counts",
            "large_lesions_found",
            "seeds",
        }
        assert row["steps"] == 2 and row["evaluated_at"] == 32 and not row["interrupted"]
        assert np.isfinite(row["final_loss"]) and row["train_seconds"] >= row["seconds_per_step"] > 0
        assert 0 <= row["organ_dice"] <= 1
        assert set(row["detection"]) <= set(resolution.lesion_sizes(32))
        assert all(0 <= v <= 1 for v in row["detection"].values())
        # the rates are the counts' ratios; ≥ 4-voxel lesions pooled over sizes
        for size, (found, total) in row["detection_counts"].items():
            assert row["detection"][size] == pytest.approx(found / total)
        big = [c for s, c in row["detection_counts"].items() if s >= 4]
        assert row["large_lesions_found"] == pytest.approx(sum(f for f, _ in big) / sum(t for _, t in big))
        assert row["organ_dice"] == pytest.approx(np.mean(row["organ_dice_cases"])) and row["seeds"] == [0, 0]
    # each arm ran at its own resolution and was scored on the 32³ phantom at 32³
    assert seen == [(16, (32,) * 3, (32,) * 3), (32, (32,) * 3, (32,) * 3)]
    assert (tmp_path / "train16" / "history.json").is_file() and (tmp_path / "train32").is_dir()

    # finished arms are reused: training only, nothing new
    again = resolution.resolution_study(
        [16],
        render=32,
        steps=2,
        workdir=tmp_path,
        model_overrides=TINY,
        train_eval_cases=0,
        evaluate=False,
        progress=False,
        log=lambda *a: None,
    )
    assert again == [{k: rows[0][k] for k in again[0]}]


def test_lesion_hits_counts_overlap():
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[7:10, 7:10, 7:10] = 2
    lesion = {"centre_voxel": (8, 8, 8), "radius_voxels": (1.5, 1.5, 1.5), "diameter_voxels": 3.0}
    tiny = {"centre_voxel": (2, 2, 2), "radius_voxels": (0.2, 0.2, 0.2), "diameter_voxels": 0.4}  # not rasterised
    pred = np.zeros_like(truth)
    assert resolution.lesion_hits(pred, truth, [lesion, tiny]) == [(3.0, False)]
    pred[9, 9, 9] = 2
    assert resolution.lesion_hits(pred, truth, [lesion, tiny]) == [(3.0, True)]


def test_load_study_and_detection_plot(tmp_path):
    """The rows the benchmark writes come back in order, and the figure draws one line per arm."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    from workbench.analysis.figures import plot_detection

    table = {
        "64": {
            "organ_dice": 0.9,
            "lesion_dice": 0.6,
            "detection": {"2.0": 0.0, "4.0": 0.5},
            "detection_counts": {"2.0": [0, 2], "4.0": [1, 2]},
        },
        "32": {
            "organ_dice": 0.8,
            "lesion_dice": 0.3,
            "detection": {"2.0": 0.0, "4.0": 0.0},
            "detection_counts": {"2.0": [0, 2], "4.0": [0, 2]},
        },
    }
    path = tmp_path / "resolution_study.json"
    path.write_text(json.dumps({"render": 64, "steps": 5, "table": table}))
    rows = resolution.load_study(path)
    assert [(r["resolution"], r["evaluated_at"], r["steps"]) for r in rows] == [(32, 64, 5), (64, 64, 5)]
    fig = plot_detection(rows)
    lines = fig.axes[0].get_lines()
    assert [list(line.get_ydata()) for line in lines] == [[0.0, 0.0], [0.0, 0.5]]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][0].startswith("trained at 32³")
