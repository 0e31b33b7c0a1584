"""`workbench infer` / `workbench demo`: outputs, report keys, and bad input (exit 2)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import f32_tolerance

from workbench.cli import main

REPORT_KEYS = {
    "input_shape",
    "output_shape",
    "mesh",
    "backend",
    "halo",
    "seconds",
    "max_abs_diff",
    "per_shard",
    "peak_bytes_per_device",
}


@pytest.fixture(scope="module")
def npy_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "volume.npy"
    np.save(path, np.random.default_rng(0).standard_normal((20, 28, 24)).astype(np.float32))
    return path


def test_infer_npy_with_reference(npy_input, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["infer", str(npy_input), "--mesh", "2x2x2", "--reference", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["input_shape"] == [20, 28, 24] and report["output_shape"] == [20, 28, 24]
    assert report["mesh"] == {"data": 1, "z": 2, "y": 2, "x": 2}
    tol = f32_tolerance(report["reference_scale"])  # the shipped phantom weights: logits ~13
    assert 1.0 < report["reference_scale"] < 100 and report["max_abs_diff"] <= tol
    assert len(report["per_shard"]) == 8
    assert all(s["max_abs_diff"] <= tol for s in report["per_shard"])
    assert report["peak_bytes_per_device"] > 0
    prediction = np.load(out / "prediction.npy")
    assert prediction.shape == (20, 28, 24) and prediction.max() < 3
    assert "max |Δ| vs reference" in capsys.readouterr().out


def test_infer_nifti_keeps_affine(tmp_path):
    import nibabel as nib

    affine = np.array([[0.8, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.0, 30], [0, 0, 0, 1]])
    data = np.random.default_rng(1).random((24, 20, 12)).astype(np.float32)  # (X, Y, Z) on disk
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "scan.nii.gz")
    out = tmp_path / "run"
    assert (
        main(["infer", str(tmp_path / "scan.nii.gz"), "--mesh", "1x2x2", "--backend", "gspmd", "--out", str(out)]) == 0
    )
    written = nib.load(out / "prediction.nii.gz")
    np.testing.assert_allclose(written.affine, affine)
    assert written.shape == data.shape
    assert json.loads((out / "report.json").read_text())["max_abs_diff"] is None


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--mesh", "2x2"], "invalid mesh '2x2'; write the mesh as ZxYxX"),
        (["--mesh", "4x4x2"], "needs 32 devices but 8 are available"),
        (["--mesh", "2x2x2", "--halo", "-1"], "halo width -1 must be >= 0"),
        (["--mesh", "2x2x2", "--halo", "mirror"], "unknown halo mode 'mirror'"),
        (["--mesh", "2x2x2", "--backend", "tpu"], "--backend 'tpu' is unknown"),
        (["--mesh", "2x2x2", "--halo", "6"], "must be a multiple of 4"),
        (["--mesh", "2x2x2", "--backend", "gspmd", "--halo", "zero"], "only available with the explicit backend"),
        (["--mesh", "2x2x2", "--model", "huge"], "unknown model preset 'huge'"),
    ],
)
def test_bad_options_exit_2_without_output(npy_input, tmp_path, capsys, argv, fragment):
    out = tmp_path / "run"
    assert main(["infer", str(npy_input), *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".run.tmp-*"))  # no staging leftovers


@pytest.mark.parametrize(
    "content, fragment",
    [
        (np.full((8, 8, 8), np.nan, np.float32), "NaN or infinit"),
        (np.zeros((8, 8), np.float32), "3"),
    ],
    ids=["nan", "2d"],
)
def test_bad_volumes_exit_2(tmp_path, capsys, content, fragment):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    assert main(["infer", str(path), "--mesh", "2x2x2", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "bad.npy" in err and fragment in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_existing_output_is_kept(npy_input, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["infer", str(npy_input), "--mesh", "2x2x2", "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main(["infer", str(npy_input), "--mesh", "2x2x2", "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "report.json").exists()


def test_missing_input_subprocess_exit_2(tmp_path):
    """The installed entry point: exit 2, one line, no traceback, nothing written."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench",
            "infer",
            str(tmp_path / "nope.nii.gz"),
            "--mesh",
            "2x2x2",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("workbench: error: ") and proc.stderr.count("\n") == 1
    assert "nope.nii.gz" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--resolution", "32", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "explicit (ours)" in text and "gspmd (XLA)" in text
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    tol = f32_tolerance(report["reference_scale"])
    assert report["max_abs_diff"] <= tol and report["gspmd"]["max_abs_diff"] <= tol
    assert (out / "view.png").stat().st_size > 10_000
    assert np.load(out / "prediction.npy").shape == (32, 32, 32)


# -- `workbench train`'s flags are TrainConfig's fields -------------------------------------------
def _train_parser():
    import argparse

    from workbench.cli import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser


def test_train_flags_are_derived_from_train_config():
    import dataclasses

    from workbench.training.config import FLAGLESS_FIELDS, TrainConfig

    actions = {a.dest: a for a in _train_parser()._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(FLAGLESS_FIELDS) == {"model_overrides"}
    for name, f in fields.items():
        if name in FLAGLESS_FIELDS:
            assert name not in actions
            continue
        # --model defaults to None on the command line (the preset "small" when not given), so that
        # --model together with --plans / --checkpoint can be refused
        assert actions[name].default == (None if name == "model" else f.default), name
        assert actions[name].help, name
    # everything else is the model overrides (into model_overrides) or this command's own
    assert set(actions) - set(fields) == {
        "norm",
        "dtype",
        "remat",
        "checkpoint_dir",
        "resume",
        "no_progress",
        "force",
        "cpu_devices",
    }
    flags = {a.option_strings[0]: a.dest for a in actions.values()}
    assert {
        flags[f]
        for f in (
            "--lr",
            "--clip",
            "--no-augment",
            "--class-weights",
            "--checkpoint-every",
            "--keep",
            "--eval-every",
            "--eval-cases",
            "--seed",
            "--data-parallel",
            "--steps",
            "--batch",
            "--optimizer",
            "--schedule",
            "--dice-weight",
            "--dice-classes",
            "--backend",
            "--comm-overlap",
            "--model",
            "--mesh",
            "--resolution",
            "--spacing",
            "--fold",
            "--data",
            "--plans",
            "--configuration",
            "--checkpoint",
            "--weights-fold",
            "--patch",
            "--foreground-oversampling",
        )
    } == set(fields) - {"model_overrides", "warmup_steps"}
    assert "adam | adafactor | sgd (default adam)" == actions["optimizer"].help
    assert "explicit | gspmd | reference (default explicit)" == actions["backend"].help
    assert "auto | on | off (default auto" in actions["comm_overlap"].help
    assert "model preset: small | paper (default small)" == actions["model"].help


def test_train_flags_round_trip_to_train_config():
    from workbench.training.config import TrainConfig, train_config_from_flags

    parse = lambda *argv: train_config_from_flags(_train_parser().parse_args([*argv, "--checkpoint-dir", "x"]))  # noqa: E731
    assert parse() == TrainConfig()
    config = parse(
        "--data",
        "a.nii",
        "b.nii",
        "--lr",
        "0.01",
        "--clip",
        "0",
        "--no-augment",
        "--class-weights",
        "1,8,16",
        "--norm",
        "batch",
        "--remat",
        "--steps",
        "7",
        "--batch",
        "2",
        "--data-parallel",
        "2",
        "--schedule",
        "warmup_cosine",
        "--warmup-steps",
        "3",
    )
    assert config == TrainConfig(
        data=("a.nii", "b.nii"),
        learning_rate=0.01,
        clip_norm=0.0,
        augment=False,
        class_weights=(1.0, 8.0, 16.0),
        model_overrides={"norm": "batch", "remat": True},
        steps=7,
        batch=2,
        data_parallel=2,
        schedule="warmup_cosine",
        warmup_steps=3,
    )
    assert parse("--data", "mni:32", "--dtype", "bfloat16").model_overrides == {"dtype": "bfloat16"}
    assert parse("--data", "mni:32").data == "mni:32"
    assert parse("--comm-overlap", "on").comm_overlap == "on"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--optimizer", "lion"], "optimizer='lion'; use one of ('adam', 'adafactor', 'sgd')"),
        (["--model", "huge"], "model='huge' is not a preset; use one of small, paper"),
        (["--backend", "tpu"], "backend='tpu'; use explicit, gspmd or reference"),
        (["--comm-overlap", "yes"], "comm_overlap='yes'; use one of ('auto', 'on', 'off')"),
    ],
)
def test_train_bad_choices_exit_2_one_line(tmp_path, capsys, argv, fragment):
    assert main(["train", *argv, "--checkpoint-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_bug_is_an_internal_error_with_its_traceback_kept(npy_input, tmp_path, capsys, monkeypatch):
    """A ValueError from deep inside (not a user error) is not turned into 'bad input'."""
    import workbench.app.inference as inference

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # what numpy says on a bug

    monkeypatch.setattr(inference, "infer", broken)
    monkeypatch.setattr("workbench.app.infer", broken, raising=False)
    out = tmp_path / "out"
    assert main(["infer", str(npy_input), "--mesh", "2x2x2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("workbench: internal error: ValueError: operands could not")
    assert "rerun with --debug" in err[0]
    log = err[0].split("traceback written to ")[1].split(";")[0]
    text = open(log).read()
    assert "Traceback (most recent call last)" in text and "in broken" in text
    assert not out.exists()
    assert main(["--debug", "infer", str(npy_input), "--mesh", "2x2x2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].startswith("workbench: internal error: ValueError")


def test_a_lost_peer_is_one_line_and_status_75_not_a_bug(npy_input, tmp_path, capsys, monkeypatch):
    """In a multi-process run (stood in for: the distributed state marked started, and two
    processes), gloo's error for a peer that died is one line naming the peer, status 75
    (the process ends at once: os._exit), the traceback in a file; any other error stays a bug."""
    import jax

    import workbench.cli as cli
    import workbench.cli.infer as infer_command
    import workbench.execute.distributed as distributed

    def peer_died(*args, **kwargs):  # what jax raises in process 0 when process 1 was SIGKILLed
        raise RuntimeError("UNKNOWN: Gloo collective permute failed: [external/gloo/gloo/transport/tcp/pair.cc:589] "
                           "Connection reset by peer [10.1.2.3]:41234")  # fmt: skip

    def exit_now(status):
        raise SystemExit(status)

    monkeypatch.setattr(infer_command, "run", peer_died)
    monkeypatch.setitem(distributed._STATE, "initialized", True)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ended:
        main(["infer", str(npy_input), "--mesh", "2x2x2", "--out", str(out)])
    assert ended.value.code == distributed.PEER_LOST_STATUS == 75
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "workbench: process 0 of 2: lost process 1 (10.1.2.3:41234) during a collective (Gloo: Connection reset by "
        "peer): it ended or its connection dropped; the launcher (or the cluster scheduler) reports which process "
        "ended and why; traceback written to "
    ), err[0]
    assert "a bug" not in err[0] and "internal error" not in err[0]
    log = err[0].split("traceback written to ")[1]
    assert "Traceback (most recent call last)" in open(log).read()
    os.unlink(log)
    assert not out.exists()
    monkeypatch.setitem(distributed._STATE, "initialized", False)  # one process: the same error is a bug
    assert main(["infer", str(npy_input), "--mesh", "2x2x2", "--out", str(out)]) == 1
    assert "internal error" in capsys.readouterr().err
