"""The application layer: inputs named every way front ends name them; the report schema."""

import numpy as np
import pytest

from data_tools import Volume, write_volume
from workbench.app import REPORT_KEYS, infer, load_result, load_volume, resolve_model, write_result
from workbench.app.volumes import parse_phantom_spec


def test_phantom_specs_and_paths_that_merely_start_with_phantom(tmp_path):
    assert parse_phantom_spec("phantom") == (None, 0)
    assert parse_phantom_spec("Phantom:24:3") == ((24, 24, 24), 3)
    assert parse_phantom_spec("phantom:8x16x12") == ((8, 16, 12), 0)
    assert parse_phantom_spec("phantom_64.npy") is None and parse_phantom_spec("mni") is None
    with pytest.raises(ValueError, match="write phantom, phantom:N or phantom:N:SEED"):
        parse_phantom_spec("phantom:big")
    assert load_volume("phantom:8x16x12:1").shape == (8, 16, 12)
    assert load_volume("phantom:16", shape=(8, 12, 16)).shape == (8, 12, 16)  # rendered at the shape asked
    path = tmp_path / "phantom_scan.npy"
    np.save(path, np.zeros((6, 7, 8), np.float32))
    loaded = load_volume(str(path))
    assert loaded.shape == (6, 7, 8) and loaded.image.dtype == np.float32
    assert load_volume(loaded.volume, shape=(4, 4, 4)).shape == (4, 4, 4)  # resampled


def test_an_inference_writes_and_reads_back_one_report_schema(tmp_path, small_model):
    volume = Volume(np.random.default_rng(0).normal(size=(12, 20, 16)).astype(np.float32), spacing=(2.0, 1.0, 1.5))
    write_volume(volume, tmp_path / "scan.nii.gz")
    loaded = load_volume(str(tmp_path / "scan.nii.gz"))
    run = infer(small_model, loaded, "2x2x1", reference=True)
    assert set(REPORT_KEYS) <= set(run.report) and run.report["max_abs_diff"] <= 1e-5
    assert [r["max_abs_diff"] is not None for r in run.report["per_shard"]] == [True] * 4
    report = write_result(tmp_path / "out", run, input_name="scan.nii.gz")
    assert report["prediction"] == "prediction.nii.gz"  # NIfTI in, NIfTI out
    back = load_result(tmp_path / "out")
    assert back.report == report and back.spacing == (2.0, 1.0, 1.5)
    assert [r["max_abs_diff"] for r in back.stats] == [r["max_abs_diff"] for r in report["per_shard"]]


def test_models_say_where_their_weights_came_from():
    assert resolve_model("small").description == "shipped phantom weights (phantom_small.msgpack)"
    assert resolve_model("small", random_weights=True, seed=4).description == "random (seed 4)"
    assert resolve_model("small", dtype="bfloat16").config.dtype == "bfloat16"  # computes differently, same weights
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        resolve_model("huge")
