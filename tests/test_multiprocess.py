"""Several processes (jax.distributed over loopback, gloo CPU collectives): training equals one
process, per-process data and outputs, checkpoints across process counts, a killed process.

Every run here is a real launch (``workbench.cli.launch.launch``): fresh Python processes, one
mesh over all of their devices. Training runs go through ``tests/multiprocess_worker.py`` so they
can be float64 (x64 must be on before anything is traced); the tiny model and 16³ phantoms keep
each launch to seconds of compute (most of a launch is start-up and compilation).
"""

import io
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from workbench.cli.launch import launch
from workbench.training import TrainConfig, abstract_train_state, model_config, train_and_evaluate
from workbench.training.checkpoint import Checkpoints

WORKER = Path(__file__).with_name("multiprocess_worker.py")
TINY = {"depth": 2, "base_filters": 4, "norm": "batch"}  # batch statistics are reduced over processes too
F64 = {**TINY, "dtype": "float64"}
BASE = TrainConfig(
    data="phantom:16",
    batch=1,
    steps=3,
    learning_rate=1e-2,
    schedule="constant",
    model_overrides=F64,
    mesh="2x2x2",  # 2 processes × 4 devices: process 0 holds z = 0, process 1 z = 1; z halos cross
    checkpoint_every=1,
    keep=10,
    eval_cases=0,
)
# As tests/test_train.py: the float64 trajectory to 1e-6; in float32, step 1's loss to the forward
# contract and the parameters at the gradient tolerance (Adam can turn float32 summation order
# into full-size steps of entries near zero).
PARAM_RTOL_F64, LOSS_RTOL_F32, PARAM_RTOL_F32 = 1e-6, 1e-5, 1e-3
DEAD_PROCESS_BOUND_S = 60


def _launch(config, workdir, *, processes=2, resume=False, background=False):
    """Train ``config`` into ``workdir`` as ``processes`` processes; (status, output) or a running thread."""
    spec = json.dumps(
        {
            "config": config.as_dict(),
            "workdir": str(workdir),
            "resume": resume,
            "x64": "float64" in str(config.model_overrides),
        }
    )
    out = io.StringIO()
    kwargs = dict(
        processes=processes, devices_per_process=8 // processes, program=[sys.executable, str(WORKER)], out=out
    )
    if not background:
        return launch([spec], **kwargs), out.getvalue()
    result = {}
    thread = threading.Thread(target=lambda: result.update(status=launch([spec], **kwargs)), daemon=True)
    thread.start()
    return thread, out, result


_REFERENCE: dict = {}


def _reference(config, tmp_path_factory):
    """One process with 8 devices (this one): history and final parameters, once per config."""
    key = repr(config)
    if key not in _REFERENCE:
        work = tmp_path_factory.mktemp("reference")
        with jax.enable_x64("float64" in str(config.model_overrides)):
            train_and_evaluate(config, work, progress=False, log=lambda m: None)
        _REFERENCE[key] = (_losses(work), _params(work))
        _REFERENCE_EVAL[key] = _evals(work)
    return _REFERENCE[key]


_REFERENCE_EVAL: dict = {}


def _evals(work) -> list[dict]:
    """The evaluation rows of a run's history (Dice, accuracy and HD95)."""
    return json.loads((Path(work) / "history.json").read_text())["eval"]


def _losses(work) -> list[float]:
    return [row["loss"] for row in json.loads((Path(work) / "history.json").read_text())["train"]]


def _params(work):
    """The final parameters a run wrote (model.msgpack), as numpy in their own dtype."""
    from flax import serialization

    payload = serialization.msgpack_restore((Path(work) / "model.msgpack").read_bytes())
    return {k: v for k, v in payload["variables"].items()}


def _max_rel_error(tree, ref_tree) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree)):
        a, b = np.asarray(a), np.asarray(b)
        scale = float(np.abs(b).max())
        if scale:
            worst = max(worst, float(np.abs(a - b).max()) / scale)
    return worst


# -- 1. training: two processes equal one ------------------------------------------------------
@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Three float64 steps on 2 × 4 devices, a checkpoint after each: used by several tests."""
    work = tmp_path_factory.mktemp("two") / "run"
    status, out = _launch(BASE, work)
    assert status == 0, out
    return work


@pytest.mark.parametrize(
    "mesh, batch",
    [("2x2x2", 1), ("data=2,z=2,y=2,x=1", 2)],  # with data=2, process p is data replica p
    ids=["spatial", "data-axis"],
)
def test_training_two_processes_equal_one_float64(mesh, batch, two_process_run, tmp_path_factory):
    """... and with the data axis, the held-out evaluation each process makes of its own
    blocks (three cases: process 1 holds none of the third) equals one process's whole-case
    evaluation, HD95 included (from the blocks' surfaces)."""
    config = BASE.replace(mesh=mesh, batch=batch, eval_cases=0 if mesh == BASE.mesh else 3)
    if mesh == BASE.mesh:
        work = two_process_run
    else:
        work = tmp_path_factory.mktemp("two-data") / "run"
        status, out = _launch(config, work)
        assert status == 0, out
    ref_losses, ref_params = _reference(config, tmp_path_factory)
    params = _params(work)
    assert any(np.asarray(a).dtype == np.float64 for a in jax.tree.leaves(params))
    assert _max_rel_error(params, ref_params) <= PARAM_RTOL_F64
    assert _losses(work) == pytest.approx(ref_losses, rel=PARAM_RTOL_F64)
    assert ref_losses[-1] < ref_losses[0]  # it trained: the comparison is not of initial values
    assert _evals(work) == _REFERENCE_EVAL[repr(config)] and len(_evals(work)) == (config.eval_cases > 0)
    assert all(any(k.startswith("hd95") and v is not None for k, v in row.items()) for row in _evals(work))
    assert sorted(p.name for p in Path(work).iterdir()) == [
        "checkpoints", "config.json", "curves.png", "history.csv", "history.json", "model.msgpack",
    ]  # fmt: skip


def _labelled_files(folder) -> list[str]:
    """Two 20³ phantoms as labelled .npz files, shifted off Hounsfield units (so z-scored) and
    resampled to 16³ in training: every process reads only its boxes and the z-score's
    statistics are surveyed across the processes."""
    from data_tools.synthetic import make_phantom

    paths = []
    for seed in (1, 2):
        volume = make_phantom(20, seed=seed, vessels=False)
        path = folder / f"case{seed}.npz"
        np.savez_compressed(path, image=volume.array + np.float32(1000), labels=volume.labels)
        paths.append(str(path))
    return paths


def test_training_two_processes_equal_one_float32(tmp_path_factory):
    """Labelled .npz files (resampled, z-scored), not phantoms: 2 × 4 equals 1 × 8."""
    files = _labelled_files(tmp_path_factory.mktemp("npz"))
    config = BASE.replace(model_overrides=TINY, checkpoint_every=3, data=files, resolution=16)
    work = tmp_path_factory.mktemp("two-f32") / "run"
    status, out = _launch(config, work)
    assert status == 0, out
    ref_losses, ref_params = _reference(config, tmp_path_factory)
    assert _losses(work)[0] == pytest.approx(ref_losses[0], rel=LOSS_RTOL_F32)
    assert _max_rel_error(_params(work), ref_params) <= PARAM_RTOL_F32
    assert "[process 1]" not in out and "[Gloo]" not in out  # only process 0 prints, gloo's native log is dropped


# -- 3. checkpoints written by 2 processes continue under 1 and under 4 ---------------------------
@pytest.mark.parametrize("processes, mesh", [(1, "2x2x2"), (4, "1x2x4")], ids=["1x8", "4x2"])
def test_checkpoint_of_two_processes_resumes_under_another_count(processes, mesh, two_process_run, tmp_path):
    """The step-2 checkpoint of the 2 × 4 run, continued for one step as 1 × 8 (this process)
    and as 4 × 2 on another mesh, gives the step-3 parameters of the uninterrupted run."""
    work = tmp_path / "run"
    shutil.copytree(two_process_run / "checkpoints" / "2", work / "checkpoints" / "2")
    shutil.copy(two_process_run / "history.json", work / "history.json")
    config = BASE.replace(mesh=mesh)
    if processes == 1:
        with jax.enable_x64(True):
            result = train_and_evaluate(config, work, resume=True, progress=False, log=lambda m: None)
        assert result["step"] == 3
    else:
        status, out = _launch(config, work, processes=processes, resume=True)
        assert status == 0, out
        assert "[process 0] resumed from" in out and "step 2" in out
    assert _max_rel_error(_params(work), _params(two_process_run)) <= PARAM_RTOL_F64
    assert _losses(work) == pytest.approx(_losses(two_process_run), rel=PARAM_RTOL_F64)
    assert Checkpoints(work / "checkpoints").steps() == [2, 3]


# -- 5. a process killed mid-training -------------------------------------------------------------
def test_killed_process_ends_the_launch_and_resume_continues(two_process_run, tmp_path):
    import os
    import re
    import signal

    work = tmp_path / "run"
    config = BASE.replace(steps=200)
    thread, out, result = _launch(config, work, background=True)
    deadline = time.monotonic() + 300
    pid = None
    while time.monotonic() < deadline and thread.is_alive():
        found = re.search(r"process 1 is pid (\d+)", out.getvalue())
        pid = int(found.group(1)) if found else None
        steps = [int(p.name) for p in (work / "checkpoints").glob("*") if p.name.isdigit()]
        if pid and steps and max(steps) >= 2:
            break
        time.sleep(0.05)
    assert thread.is_alive() and pid, out.getvalue()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    thread.join(timeout=DEAD_PROCESS_BOUND_S + 30)
    took = time.monotonic() - killed
    text = out.getvalue()
    assert not thread.is_alive() and took <= DEAD_PROCESS_BOUND_S, (took, text)
    assert result["status"] == 128 + signal.SIGKILL
    assert f"process 1 (pid {pid}) failed: killed by SIGKILL" in text
    assert not (work / "model.msgpack").exists()  # the run's final output was never marked complete
    # the newest finished checkpoint loads
    ckpts = Checkpoints(work / "checkpoints")
    last = max(ckpts.steps())
    cfg = model_config(config, 3)
    with jax.enable_x64(True):
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state, _, step = ckpts.restore(abstract_train_state(cfg, config, one_device), log=lambda m: None)
    ckpts.close()
    assert step == last >= 2 and int(state["step"]) == last
    # resume continues the same loss curve: the uninterrupted run's (here in this process,
    # 1 × 8 devices: resuming under other process counts is tested above)
    with jax.enable_x64(True):
        result = train_and_evaluate(
            config.replace(steps=last + 1), work, resume=True, progress=False, log=lambda m: None
        )
    assert result["step"] == last + 1 and (work / "model.msgpack").is_file()
    reference = _reference_losses(two_process_run, last + 1, tmp_path)
    assert _losses(work) == pytest.approx(reference, rel=PARAM_RTOL_F64)


def _reference_losses(two_process_run, steps, tmp_path):
    """The uninterrupted trajectory's first ``steps`` losses (continued in this process when
    the three-step run is shorter)."""
    losses = _losses(two_process_run)
    if steps <= len(losses):
        return losses[:steps]
    work = tmp_path / "longer"
    shutil.copytree(two_process_run, work)
    with jax.enable_x64(True):
        train_and_evaluate(BASE.replace(steps=steps), work, resume=True, progress=False, log=lambda m: None)
    return _losses(work)


# -- 2. per-process data and outputs in inference -------------------------------------------------
def test_per_process_inference_reads_only_its_blocks(tmp_path):
    """2 × 4 devices on a 128³ zarr volume: each process reads exactly its four shard boxes, its
    peak host allocation (tracemalloc, input blocks to written output) stays below the volume's
    bytes, and the zarr it writes with the other process equals the one-process prediction."""
    from data_tools.io import read_volume
    from data_tools.synthetic import write_phantom
    from workbench.cli import main
    from workbench.mesh import ShardLayout
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import save_weights

    volume = write_phantom(tmp_path / "input.zarr", 128, seed=2)
    weights = save_weights(tmp_path / "tiny.msgpack", Model.init(UNetConfig.preset("small", **TINY), seed=3))
    argv = ["infer", str(volume), "--mesh", "2x2x2", "--checkpoint", str(weights)]
    out = io.StringIO()
    status = launch(
        [*argv, "--out", str(tmp_path / "mp")], processes=2, devices_per_process=4, out=out,
        env={"WORKBENCH_TRACE_MEMORY": "1"},
    )  # fmt: skip
    assert status == 0, out.getvalue()
    report = json.loads((tmp_path / "mp" / "report.json").read_text())
    layout = ShardLayout((128,) * 3, "2x2x2", multiple=2)
    whole = 128**3 * 4
    assert report["volume_bytes"] == whole
    for row in report["processes"]:
        p = row["process"]
        mine = [[list(b) for b in s.valid_box] for s in layout.shards()[4 * p : 4 * p + 4]]
        assert row["boxes_read"] == mine and row["voxels_read"] == 128**3 // 2
        assert 0 < row["host_peak_bytes"] < whole, row
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    np.testing.assert_array_equal(
        read_volume(tmp_path / "mp" / "prediction.zarr").array, read_volume(tmp_path / "one" / "prediction.zarr").array
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.zarr", "mp", "one", "tiny.msgpack"]


def test_multi_process_inference_writes_the_input_format_like_one_process(tmp_path):
    """A TIFF stack (uneven 35 x 40 x 42, anisotropic, its affine in the stack's metadata) in,
    2 x 4 devices: the prediction is ``prediction.tif`` (filled in place by both processes)
    equal in data, spacing and affine to the one-process ``prediction.tif``."""
    from data_tools import Volume
    from data_tools.io import load_input, read_volume, write_volume
    from workbench.cli import main
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import save_weights

    affine = np.array([[0, 0, 0.8, -20.0], [0, -0.8, 0, 30.0], [2.0, 0, 0, 5.0], [0, 0, 0, 1]])
    image = load_input("phantom:35x40x42:4").array
    stack = write_volume(Volume(image, spacing=(2.0, 0.8, 0.8), affine=affine), tmp_path / "stack.tif")
    weights = save_weights(tmp_path / "tiny.msgpack", Model.init(UNetConfig.preset("small", **TINY), seed=3))
    argv = ["infer", str(stack), "--mesh", "2x2x2", "--checkpoint", str(weights)]
    out = io.StringIO()
    status = launch([*argv, "--out", str(tmp_path / "mp")], processes=2, devices_per_process=4, out=out)
    assert status == 0, out.getvalue()
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "mp").iterdir()) == ["prediction.tif", "report.json"]
    mine, theirs = read_volume(tmp_path / "mp" / "prediction.tif"), read_volume(tmp_path / "one" / "prediction.tif")
    np.testing.assert_array_equal(mine.array, theirs.array)
    assert mine.array.dtype == np.uint8 and mine.shape == (35, 40, 42) and len(np.unique(mine.array)) > 1
    assert np.array_equal(mine.affine, theirs.affine) and np.array_equal(mine.affine, affine)
    assert mine.spacing == theirs.spacing == (2.0, 0.8, 0.8) and mine.metadata["spacing_source"] == "data_tools"
    assert json.loads((tmp_path / "mp" / "report.json").read_text())["prediction"] == "prediction.tif"


# -- 6. `workbench evaluate` as two processes ----------------------------------------------------
def test_evaluate_two_processes_equals_one(tmp_path):
    """2 × 4 devices, two labelled test cases of uneven shapes (18×22×20 and 19×21×17, padded
    shards on 2x2x2): the first on the model's spacing (scored block by block: Dice, volumes
    and HD95 from each process's blocks), the second resampled (its logits gathered, process 0
    scores it). cases.csv and summary.json equal the one-process run's but for the seconds,
    and the predictions are the same files."""
    from data_tools.io import volume_info
    from data_tools.synthetic.dataset import write_phantom_dataset
    from workbench.cli import main
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import save_weights

    data = write_phantom_dataset(tmp_path / "Task09_Tiny", cases=1, test=2, test_labels=True,
                                 shapes=[(19, 21, 17), (18, 22, 20), (19, 21, 17)])  # fmt: skip
    weights = save_weights(tmp_path / "tiny.msgpack", Model.init(UNetConfig.preset("small", **TINY), seed=3))
    spacing = volume_info(data / "imagesTs" / "phantom_001.nii.gz").spacing
    argv = ["evaluate", "--data", str(data), "--test", "--mesh", "2x2x2", "--checkpoint", str(weights),
            "--spacing", ",".join(repr(float(s)) for s in spacing), "--no-progress"]  # fmt: skip
    out = io.StringIO()
    assert launch([*argv, "--out", str(tmp_path / "mp")], processes=2, devices_per_process=4, out=out) == 0, (
        out.getvalue()
    )
    assert "1 case(s) (phantom_002) are resampled" in out.getvalue() and "[process 1]" not in out.getvalue()
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0

    def table(run):
        text = (tmp_path / run / "cases.csv").read_text().splitlines()
        seconds = text[0].split(",").index("seconds")
        return [",".join(v for i, v in enumerate(line.split(",")) if i != seconds) for line in text]

    def summary(run):
        return {k: v for k, v in json.loads((tmp_path / run / "summary.json").read_text()).items() if k != "seconds"}

    assert table("mp") == table("one")
    assert summary("mp") == summary("one")
    rows = table("one")
    assert len(rows) == 3 and "hd95_mm_organ" in rows[0] and rows[1].split(",")[4] not in ("", "0.0")  # an HD95
    for name in ("phantom_001.nii.gz", "phantom_002.nii.gz"):
        assert (tmp_path / "mp" / "predictions" / name).read_bytes() == (
            tmp_path / "one" / "predictions" / name
        ).read_bytes()
    assert sorted(p.name for p in (tmp_path / "mp").iterdir()) == ["cases.csv", "predictions", "summary.json"]
