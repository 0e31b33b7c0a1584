"""Killed runs leave nothing that looks complete (README, Reliability).

`workbench infer`, `train` and `evaluate` run in subprocesses that are SIGKILLed at chosen
points of their writing: a small bootstrap (:data:`BOOT`) wraps ``os.rename``/``os.replace``/
``numpy.save`` and kills its own process (SIGKILL: no handler, no cleanup) on the N-th call
whose arguments contain a given text, so each kill point is exact rather than timed. After
each kill: no result folder / ``report.json`` / ``summary.json`` / ``model.msgpack`` unless
complete, and ``--resume`` continues a killed training run to bitwise the parameters of an
uninterrupted one. ``workbench launch -- infer`` (two processes writing one staged NIfTI
in place) has process 1 killed through a ``sitecustomize`` hook (:data:`SITE_HOOK`): the
survivor says in one line that its peer is gone; the temporaries killed runs leave are
removed by the next run at the same output.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools import write_phantom_dataset
from data_tools.atomic import atomic_output, temp_sibling, writer_host
from data_tools.errors import DataError
from workbench.app.results import load_result, staged_output

ROOT = Path(__file__).resolve().parents[1]

# KILL_AT="name:TEXT:N": SIGKILL this process at the N-th call of ``name`` (rename | save)
# whose arguments contain TEXT, before the call does anything.
BOOT = r"""
import os, signal, sys
name, text, nth = os.environ["KILL_AT"].split(":")
seen = [0]
def hook(kind, fn):
    def wrapped(*args, **kwargs):
        if kind == name and any(text in str(a) for a in args[:2]):
            seen[0] += 1
            if seen[0] == int(nth):
                print(f"KILLED at {kind} {args[:2]}", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapped
import numpy
os.rename, os.replace = hook("rename", os.rename), hook("rename", os.replace)
numpy.save = hook("save", numpy.save)
from workbench.cli import main
sys.exit(main(sys.argv[1:]))
"""

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
TINY_MP = {"depth": 2, "base_filters": 4, "norm": "batch"}  # as tests/test_multiprocess.py
TRAIN = ["train", "--data", "phantom", "--resolution", "16", "--mesh", "1x1x2", "--cpu-devices", "2",
         "--steps", "3", "--checkpoint-every", "1", "--eval-cases", "0", "--no-progress"]  # fmt: skip


def workbench(argv, kill_at=None):
    """Run ``workbench ARGV`` (killed at ``kill_at``); (returncode, stdout + stderr)."""
    env = {**ENV, "KILL_AT": kill_at or "none:never:1"}
    proc = subprocess.run([sys.executable, "-c", BOOT, *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if kill_at is not None:
        assert proc.returncode == -signal.SIGKILL, f"not killed at {kill_at}: {proc.returncode}\n{proc.stderr[-2000:]}"
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.returncode, proc.stdout + proc.stderr


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".tmp-"))


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def test_folder_replaced_in_one_swap(tmp_path):
    out = tmp_path / "store"
    for text in ("old", "new"):
        with atomic_output(out) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text(text)
    assert (out / "a").read_text() == "new" and os.listdir(tmp_path) == ["store"]


def test_stale_temporaries_of_dead_writers_are_removed_and_no_others(tmp_path):
    """The next write of ``out`` removes its temporaries whose writer died on this host;
    a live writer's, another host's, an ``old-`` (a previous output moved aside), another
    output's and an unowned name stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: no process has this pid (unless reused: then it is kept)
    host, out = writer_host(), tmp_path / "out.zarr"
    names = {
        "dead": f".tmp-0123abcd~{host}~{dead_pid}-out.zarr",
        "live": f".tmp-0123abce~{host}~{os.getppid()}-out.zarr",
        "other host": f".tmp-0123abcf~elsewhere.1~{dead_pid}-out.zarr",
        "moved aside": f".tmp-old-0123abd0~{host}~{dead_pid}-out.zarr",
        "other output": f".tmp-0123abd1~{host}~{dead_pid}-other.zarr",
        "unowned": ".tmp-0123abd2-out.zarr",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "chunk").write_text("x")
    with atomic_output(out) as tmp:
        tmp.mkdir()
    assert hidden(tmp_path) == sorted(n for k, n in names.items() if k != "dead")
    assert temp_sibling(out).name.startswith(".tmp-") and f"~{host}~{os.getpid()}-out.zarr" in temp_sibling(out).name


# -- in-process: the replacement step of an --overwrite, interrupted ---------------------------
def test_overwrite_interrupted_midway_leaves_no_report(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with staged_output(out) as tmp:
        for name in ("a.npy", "b.npy", "report.json"):
            (tmp / name).write_text("old")
    calls = []
    real = os.replace

    def dies_second_time(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill between two replacements
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_second_time)
    with pytest.raises(KeyboardInterrupt), staged_output(out, overwrite=True) as tmp:
        for name in ("report.json", "a.npy", "b.npy"):
            (tmp / name).write_text("new")
    assert calls[-1] != "report.json" and "report.json" not in visible(out)  # the marker goes in last
    monkeypatch.undo()
    with staged_output(out, overwrite=True) as tmp:  # a rerun completes it
        for name in ("report.json", "a.npy", "b.npy"):
            (tmp / name).write_text("new")
    assert {p.name: p.read_text() for p in out.iterdir()} == dict.fromkeys(["a.npy", "b.npy", "report.json"], "new")


# -- workbench infer -----------------------------------------------------------------------------
def test_killed_infer_leaves_no_result(tmp_path):
    out = tmp_path / "out"
    argv = ["infer", "phantom:16", "--mesh", "1x1x2", "--cpu-devices", "2", "--random-weights", "--out", out]
    workbench([*argv, "--reference"], kill_at="save:prediction.npy:1")  # while the staged folder fills
    assert not out.exists()
    workbench([*argv, "--reference"], kill_at=f"rename:{out}:1")  # just before the folder is renamed in
    assert not out.exists()
    with pytest.raises(DataError, match="is not a result folder"):
        load_result(out)
    workbench([*argv, "--reference"])
    before = load_result(out).prediction.copy()
    # --overwrite of a complete folder, killed after its first file was replaced: no report.json
    workbench([*argv, "--overwrite", "--seed", "1"], kill_at=f"rename:{out}{os.sep}:2")
    assert "report.json" not in visible(out)
    with pytest.raises(DataError, match="report.json: is missing"):
        load_result(out)
    workbench([*argv, "--overwrite", "--seed", "1"])
    assert load_result(out).report["max_abs_diff"] is None and load_result(out).prediction.shape == before.shape


# -- workbench train -----------------------------------------------------------------------------
def _params(path: Path) -> dict:
    from flax import serialization
    from flax.traverse_util import flatten_dict

    return flatten_dict(serialization.msgpack_restore(path.read_bytes())["variables"])


def test_killed_train_leaves_no_weights_and_resume_is_exact(tmp_path):
    whole, run = tmp_path / "whole", tmp_path / "run"
    workbench([*TRAIN, "--checkpoint-dir", whole])
    # killed as checkpoint 2 is committed: step 2 is absent (not half there), no final weights
    workbench([*TRAIN, "--checkpoint-dir", run], kill_at="rename:checkpoints/2:3")
    assert not (run / "model.msgpack").exists() and not (run / "curves.png").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
    # resumed, then killed after the last checkpoint but before the final weights
    _, err = workbench([*TRAIN, "--checkpoint-dir", run, "--resume"], kill_at="rename:model.msgpack:1")
    assert "resumed from" in err and "step 1\n" in err
    assert not (run / "model.msgpack").exists()
    _, err = workbench([*TRAIN, "--checkpoint-dir", run, "--resume"])  # nothing left to train: writes the rest
    assert "step 3\n" in err
    a, b = _params(whole / "model.msgpack"), _params(run / "model.msgpack")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # bitwise, across 4 processes
    history = json.loads((run / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3]


# -- workbench evaluate --------------------------------------------------------------------------
def test_killed_evaluate_leaves_no_folder(tmp_path):
    ds = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=5, test=0, shapes=16)
    out = tmp_path / "ev"
    argv = ["evaluate", "--data", ds, "--fold", "0", "--mesh", "1x1x2", "--cpu-devices", "2", "--random-weights",
            "--no-progress", "--out", out]  # fmt: skip
    workbench(argv, kill_at=f"rename:{out}:1")  # every case done, the folder about to be renamed in
    assert not out.exists()
    workbench(argv)
    assert {"summary.json", "cases.csv", "predictions"} <= set(visible(out))
    workbench([*argv, "--overwrite"], kill_at=f"rename:{out}{os.sep}:1")  # first replacement of an overwrite
    assert "summary.json" not in visible(out)


# -- workbench launch -- infer: one of two processes killed --------------------------------------
# Written as sitecustomize.py into a folder put first on PYTHONPATH for the launch: every child
# runs it at start-up, and the one whose WORKBENCH_PROCESS_ID is KILL_RANK wraps
# MODULE.FUNCTION (KILL_AT="module:function:N") to SIGKILL itself at its N-th call, after
# writing the time of the kill to KILL_STAMP.
SITE_HOOK = r"""
import os
if os.environ.get("WORKBENCH_PROCESS_ID") == os.environ.get("KILL_RANK"):
    import importlib, signal, sys, time
    module_name, function, nth = os.environ["KILL_AT"].split(":")
    module = importlib.import_module(module_name)
    real, seen = getattr(module, function), [0]
    def wrapped(*args, **kwargs):
        seen[0] += 1
        if seen[0] == int(nth):
            with open(os.environ["KILL_STAMP"], "w") as f:
                f.write(repr(time.time()))
            print(f"KILLED at {function} call {nth}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, function, wrapped)
"""
LAUNCH_EXIT_BOUND_S = 60


def _launch_infer(argv, tmp_path, kill_at=None):
    """``workbench launch --processes 2 --devices-per-process 4 -- infer ARGV`` with process 1
    killed at ``kill_at``; (status, output, seconds from the kill to the launch's return)."""
    import io
    import time

    from workbench.cli.launch import launch

    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITE_HOOK)
    stamp = tmp_path / "killed-at"
    stamp.unlink(missing_ok=True)
    env = {"PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "KILL_RANK": "1" if kill_at else "none",
           "KILL_AT": kill_at or "none:none:1", "KILL_STAMP": str(stamp)}  # fmt: skip
    out = io.StringIO()
    # the survivor's time to end by itself before SIGTERM (default 5 s): more here, on a loaded
    # machine, since the test asserts its line (the launch returns as soon as it has ended)
    status = launch(["infer", *map(str, argv)], processes=2, devices_per_process=4, out=out, env=env, peer_wait=20)
    ended = time.time()
    took = ended - float(stamp.read_text()) if kill_at else None
    return status, out.getvalue(), took


def _no_bug_wording(text: str) -> None:
    for wording in ("a bug", "internal error", "Traceback", "JaxRuntimeError"):
        assert wording not in text, (wording, text)


def test_killed_process_of_a_multi_process_inference_leaves_no_result(tmp_path):
    """Process 1 of 2 SIGKILLed (a) between two of its block writes into the staged
    prediction (a NIfTI scan: ``prediction.nii`` filled in place, then gzipped) and (b) after
    writing, as it joins the summaries process 0 waits for before renaming the folder in (an
    --overwrite of a complete result): the launch ends non-zero within 60 s naming process 1
    and SIGKILL, the survivor says in one line that it lost process 1 and
    that the launcher reports why, with no "a bug" wording, no folder looks complete (none
    at (a); the previous one intact at (b)), and a rerun's ``prediction.nii.gz`` equals the
    one-process prediction in data, affine and header."""
    import nibabel as nib

    from data_tools import Volume
    from data_tools.io import load_input, read_volume, write_volume
    from workbench.cli import main
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import save_weights

    weights = save_weights(tmp_path / "tiny.msgpack", Model.init(UNetConfig.preset("small", **TINY_MP), seed=3))
    affine = np.array([[0, 0, -1.5, 90.0], [0, 1.0, 0, -120.0], [2.0, 0, 0, -40.0], [0, 0, 0, 1]])  # x flipped
    scan = write_volume(Volume(load_input("phantom:32").array, spacing=(2.0, 1.0, 1.5), affine=affine),
                        tmp_path / "scan.nii.gz")  # fmt: skip
    out, one = tmp_path / "mp", tmp_path / "one"
    argv = [scan, "--mesh", "2x2x2", "--checkpoint", weights, "--out", out]
    survivor = "[process 0] workbench: process 0 of 2: lost process 1"
    # (a) the 2nd of process 1's 4 block writes: its first block is in the staged file
    status, text, took = _launch_infer(argv, tmp_path, kill_at="data_tools.blockfile:write_file_block:2")
    assert status == 128 + signal.SIGKILL and "process 1 (pid" in text and "failed: killed by SIGKILL" in text, text
    assert took <= LAUNCH_EXIT_BOUND_S, (took, text)
    assert not out.exists() and "[process 1] KILLED at write_file_block call 2" in text
    lines = [line for line in text.splitlines() if line.startswith("[process 0]")]
    assert len(lines) == 1 and lines[0].startswith(survivor), text  # one line, naming the peer
    assert "the launcher (or the cluster scheduler) reports which process ended and why" in lines[0]
    _no_bug_wording(text)
    assert len(hidden(tmp_path)) == 1  # the dead run's staged folder
    status, text, _ = _launch_infer(argv, tmp_path)  # the rerun completes, and removes it
    assert status == 0, text
    assert hidden(tmp_path) == []
    assert main(["infer", str(scan), "--mesh", "2x2x2", "--checkpoint", str(weights), "--out", str(one)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["prediction.nii.gz", "report.json"]
    mine, theirs = read_volume(out / "prediction.nii.gz"), read_volume(one / "prediction.nii.gz")
    np.testing.assert_array_equal(mine.array, theirs.array)
    assert mine.array.dtype == theirs.array.dtype == np.uint8 and len(np.unique(mine.array)) > 1
    assert np.array_equal(mine.affine, theirs.affine) and np.array_equal(mine.affine, affine)
    assert mine.spacing == theirs.spacing == (2.0, 1.0, 1.5)
    header = nib.load(out / "prediction.nii.gz").header.binaryblock
    assert header == nib.load(one / "prediction.nii.gz").header.binaryblock  # codes, units, offsets: all of it
    report = (out / "report.json").read_bytes()
    # (b) an --overwrite, process 1 killed at its 3rd allgather (the summaries: every block written)
    status, text, took = _launch_infer(
        [*argv, "--overwrite"], tmp_path, kill_at="workbench.execute.distributed:allgather:3"
    )
    assert status == 128 + signal.SIGKILL and "process 1 (pid" in text and "failed: killed by SIGKILL" in text, text
    assert took <= LAUNCH_EXIT_BOUND_S, (took, text)
    assert survivor in text and "Gloo" in text, text
    _no_bug_wording(text)
    assert (out / "report.json").read_bytes() == report  # the previous result, untouched
    np.testing.assert_array_equal(read_volume(out / "prediction.nii.gz").array, theirs.array)
    assert visible(tmp_path) == ["hook", "killed-at", "mp", "one", "scan.nii.gz", "tiny.msgpack"]
