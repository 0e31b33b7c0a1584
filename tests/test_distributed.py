"""Multi-process runs: `workbench launch` (2 processes × 4 CPU devices over gloo) equals one process.

The launched runs start fresh Python processes joined by ``jax.distributed``; the mesh
spans both processes, so the halo exchange crosses process boundaries.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import f32_tolerance

from workbench.execute.distributed import settings_from_env
from workbench.execute.run import apply


def _launch(*argv, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    return subprocess.run(
        [sys.executable, "-m", "workbench", "launch", *argv], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def uneven_input(tmp_path_factory):
    path = tmp_path_factory.mktemp("mp") / "volume.npy"
    np.save(path, np.random.default_rng(3).standard_normal((37, 45, 29)).astype(np.float32))
    return path


def test_settings_from_env():
    assert settings_from_env({}) is None
    assert settings_from_env({"WORKBENCH_DISTRIBUTED": "auto"}) == {"auto": True}
    env = {
        "WORKBENCH_COORDINATOR": "localhost:1234",
        "WORKBENCH_NUM_PROCESSES": "2",
        "WORKBENCH_PROCESS_ID": "1",
        "WORKBENCH_LOCAL_DEVICES": "4",
    }
    assert settings_from_env(env) == {
        "auto": False,
        "coordinator": "localhost:1234",
        "num_processes": 2,
        "process_id": 1,
        "local_devices": 4,
    }


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"WORKBENCH_COORDINATOR": "localhost"}, "must be host:port"),
        ({"WORKBENCH_NUM_PROCESSES": "two"}, "WORKBENCH_NUM_PROCESSES='two' must be an integer >= 1"),
        ({"WORKBENCH_PROCESS_ID": "2"}, "WORKBENCH_PROCESS_ID=2 must be below WORKBENCH_NUM_PROCESSES=2"),
        ({"WORKBENCH_LOCAL_DEVICES": "0"}, "WORKBENCH_LOCAL_DEVICES=0 must be an integer >= 1"),
    ],
)
def test_settings_from_env_errors(change, fragment):
    env = {
        "WORKBENCH_COORDINATOR": "localhost:1234",
        "WORKBENCH_NUM_PROCESSES": "2",
        "WORKBENCH_PROCESS_ID": "0",
        "WORKBENCH_LOCAL_DEVICES": "4",
        **change,
    }
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        settings_from_env(env)


def test_two_processes_equal_one(uneven_input, tmp_path):
    """1x2x4 over 2 processes × 4 devices on an uneven volume: the same logits as one process."""
    from workbench.training.checkpoint import pretrained

    out = tmp_path / "mp"
    done = _launch(
        "--processes",
        "2",
        "--devices-per-process",
        "4",
        "--",
        "infer",
        str(uneven_input),
        "--mesh",
        "1x2x4",
        "--reference",
        "--save-logits",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[process 0] explicit on z=1,y=2,x=4" in done.stdout
    assert "[Gloo]" not in done.stdout  # connection chatter is filtered
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["processes"] == 2 and report["machine"]["devices"] == 8
    tol = f32_tolerance(report["reference_scale"])  # shipped phantom weights
    assert report["max_abs_diff"] <= tol  # against the reference each process also ran
    assert report["reference_mode"] == "whole"  # instance norm: statistics over the whole volume
    import zarr

    logits = np.asarray(zarr.open_array(str(out / "logits.zarr"), mode="r")[:])  # written by both processes
    assert logits.shape == (37, 45, 29, 3)
    from data_tools.io import load_input
    from workbench.training.data import model_input

    model = pretrained("phantom")
    image = model_input(load_input(str(uneven_input)))  # as `workbench infer` normalises it
    single = apply(model, image, "1x2x4")  # this process: 8 devices in one process
    reference = apply(model, image, backend="reference")
    np.testing.assert_allclose(logits, single, atol=tol, rtol=0)
    np.testing.assert_allclose(logits, reference, atol=tol, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp"]  # process 1 wrote nothing beside it


def test_launch_failure_stops_all_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    done = _launch(
        "--processes",
        "2",
        "--devices-per-process",
        "2",
        "--",
        "infer",
        "phantom:16",
        "--mesh",
        "2x2x2",
        "--out",
        str(out),
    )
    assert done.returncode == 2
    assert "needs 8 devices but 4 are available" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--", "demo"], "'demo' cannot run as several processes; use one of: evaluate, infer, train"),
        ([], "no command given"),
        (
            ["--", "infer", "phantom:16", "--mesh", "2x2x2", "--out", "x", "--cpu-devices", "4"],
            "--cpu-devices does not apply under launch; use --devices-per-process",
        ),
        (["--port", "70000", "--", "infer", "phantom:16", "--mesh", "2x2x2", "--out", "x"], "is not a TCP port"),
    ],
)
def test_launch_bad_input(argv, fragment, capsys):
    from workbench.cli import main

    assert main(["launch", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_a_coordinator_that_never_comes_is_one_line(tmp_path):
    """Process 1 of 2 started alone (its coordinator, process 0, never comes) with a 2 s
    start-up time-out: one line on stderr naming the coordinator's address and what to check,
    exit status 75 (PEER_LOST_STATUS), nothing on stdout, nothing written; jax's native log
    (which would otherwise end in an abort and a stack trace) is in the file the line names."""
    import re
    import socket

    from workbench.execute.distributed import PEER_LOST_STATUS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free: nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKBENCH_")}
    env.update(WORKBENCH_COORDINATOR=f"localhost:{port}", WORKBENCH_NUM_PROCESSES="2", WORKBENCH_PROCESS_ID="1",
               WORKBENCH_LOCAL_DEVICES="4", WORKBENCH_STARTUP_TIMEOUT_SECONDS="2")  # fmt: skip
    out = tmp_path / "never"
    done = subprocess.run(
        [sys.executable, "-m", "workbench", "infer", "phantom:16", "--mesh", "2x2x2", "--random-weights", "--out",
         str(out)], capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == PEER_LOST_STATUS, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and done.stdout == "", done.stdout + done.stderr
    assert lines[0].startswith(
        f"workbench: process 1 of 2: not every process of the run joined the coordinator at localhost:{port} "
        "within 2 s; check that every process was started"
    ), lines[0]
    assert "reachable from this host" in lines[0] and "WORKBENCH_STARTUP_TIMEOUT_SECONDS waits longer" in lines[0]
    assert "a bug" not in lines[0] and "internal error" not in lines[0]
    log = Path(re.search(r"native log in (\S+)$", lines[0]).group(1))
    assert log.is_file() and "no start within 2 s" in log.read_text()
    log.unlink()
    assert not out.exists() and list(tmp_path.iterdir()) == []  # status 75, not jax's abort (134): the watchdog's
