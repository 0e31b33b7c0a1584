"""The memory guard: a run that would not fit is refused before anything big is compiled or
allocated, naming what would fit; --force skips it; small runs are never planned."""

import subprocess
import sys

import pytest

import workbench.app.memory_guard as guard
from workbench.app import load_volume
from workbench.app.inference import infer
from workbench.mesh import MeshSpec
from workbench.model.unet import UNetConfig


def _no_planner(key):
    raise AssertionError("the planner ran for a run that obviously fits")


def test_small_runs_are_not_planned_and_big_ones_refused_without_compiling():
    small = UNetConfig.preset("small")
    got = guard.check_memory(small, (32, 32, 32), MeshSpec(), budget=2**30, planner=_no_planner)
    assert got["decided_by"] == "upper bound" and got["bytes"] < 2**29
    with pytest.raises(guard.MemoryRefused, match=r"needs at least .* per device but 1.00 GiB is available"):
        guard.check_memory(small, (512,) * 3, MeshSpec(), budget=2**30, planner=_no_planner)


def test_the_planner_decides_in_between_and_the_message_names_what_fits():
    cfg = UNetConfig.preset("small")
    calls = []

    def planner(key):
        calls.append(key)
        return {"peak": 3 * 2**30}

    with pytest.raises(guard.MemoryRefused) as info:
        guard.check_memory(cfg, (256,) * 3, MeshSpec(2, 2, 2), train=True, budget=2 * 2**30, planner=planner)
    msg = str(info.value)
    assert len(calls) == 1 and calls[0].train and calls[0].mesh == MeshSpec(2, 2, 2)
    assert "training run needs the planner's 3.00 GiB per device but 2.00 GiB is available" in msg
    assert "--dtype bfloat16" in msg and "--remat" in msg and "smaller volume (about" in msg
    assert msg.endswith("or pass --force to run anyway") and "\n" not in msg
    assert (
        guard.check_memory(cfg, (256,) * 3, MeshSpec(2, 2, 2), budget=4 * 2**30, planner=planner)["decided_by"]
        == "planner"
    )


def test_infer_refuses_and_force_runs(monkeypatch, small_model):
    monkeypatch.setattr(guard, "available_memory", lambda n: (2**16, "a test budget of 64 KiB"))
    loaded = load_volume("phantom:16")
    with pytest.raises(guard.MemoryRefused, match="0.1 MiB is available \\(a test budget of 64 KiB\\)"):
        infer(small_model, loaded, "1x1x1")
    assert infer(small_model, loaded, "1x1x1", force=True).logits.shape == (16, 16, 16, 3)


def test_train_refuses_before_compiling_and_force_skips_the_check(monkeypatch, tmp_path):
    from workbench.app import TrainConfig, train
    from workbench.training import loop

    monkeypatch.setattr(guard, "available_memory", lambda n: (2**20, "a test budget of 1 MiB"))
    compiled = []
    monkeypatch.setattr(loop, "build_train_step", lambda *a, **k: compiled.append(1))
    config = TrainConfig(data="phantom:16", mesh="1x1x1", steps=1)
    with pytest.raises(guard.MemoryRefused, match="training run needs"):
        train(config, tmp_path / "run", progress=False)
    assert not compiled and not (tmp_path / "run").exists()
    seen = {}
    monkeypatch.setattr(loop, "train_and_evaluate", lambda c, w, **kw: seen.update(kw))
    train(config, tmp_path / "run", force=True)
    assert "memory_check" not in seen


def test_cli_refuses_a_run_bigger_than_this_machine(tmp_path):
    """512³ with the paper model on one device needs ~50 GiB: refused, exit 2, one line,
    nothing written (the run itself would exceed the machine's RAM). Which check refuses
    depends on the RAM free at the time: the planner's compiled peak, or already the analytic
    lower bound (16 GiB) when less than that is free (a busy machine)."""
    out = tmp_path / "big"
    argv = ["infer", "phantom:512", "--model", "paper", "--mesh", "1x1x1", "--out", str(out), "--cpu-devices", "1"]
    proc = subprocess.run([sys.executable, "-m", "workbench", *argv], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    needs = ("this inference run needs the planner's", "this inference run needs at least")
    assert any(n in proc.stderr for n in needs) and "or pass --force" in proc.stderr
    assert not out.exists()


def test_refused_before_the_input_is_made_or_read(monkeypatch, tmp_path, capsys, small_model):
    """The guard takes the shape from the spec or headers: with a 4 KiB budget, `infer` on a
    phantom spec or a .npy file, `train` on a phantom or a dataset folder, and the Python
    `infer` on a spec are refused (CLI: exit 2, nothing written) while every loader fails
    the test if called."""
    import numpy as np

    import data_tools.datasets
    import data_tools.io
    import data_tools.synthetic
    import workbench.app
    import workbench.app.volumes
    from data_tools import write_phantom_dataset
    from workbench.cli import main

    np.save(tmp_path / "scan.npy", np.zeros((64, 64, 64), np.float32))
    dataset = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=3, test=0, shapes=32)

    def never(*args, **kwargs):
        raise AssertionError("the input was loaded before the memory guard refused the run")

    for module, name in [(data_tools.synthetic, "make_phantom"), (data_tools.io, "read_volume"),
                         (data_tools.io, "load_input"), (workbench.app.volumes, "load_volume"),
                         (data_tools.datasets, "check_case"), (data_tools.datasets, "read_case")]:  # fmt: skip
        monkeypatch.setattr(module, name, never)
    monkeypatch.setitem(vars(workbench.app), "load_volume", never)
    monkeypatch.setattr(guard, "available_memory", lambda n: (2**12, "a test budget of 4 KiB"))
    out = tmp_path / "out"
    infer_ = ["--mesh", "1x1x1", "--random-weights", "--out", str(out)]
    train_ = ["--mesh", "1x1x1", "--steps", "1", "--no-progress", "--checkpoint-dir", str(out)]
    for argv in (["infer", "phantom:64", *infer_], ["infer", str(tmp_path / "scan.npy"), *infer_],
                 ["train", "--data", "phantom:64", *train_], ["train", "--data", str(dataset), *train_]):  # fmt: skip
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "needs at least" in err and "is available (a test budget of 4 KiB)" in err, err
        assert not out.exists()
    with pytest.raises(guard.MemoryRefused, match="inference run needs at least"):
        infer(small_model, "phantom:64", "1x1x1")


def test_reference_that_would_not_fit_one_device_is_refused_before_running(monkeypatch, tmp_path, capsys):
    """A partitioned run that fits, whose whole-volume single-device reference would not: the
    CLI and the Python API refuse --reference (naming it and how to go on) before loading."""
    import workbench.app.planning
    from workbench.cli import main

    def planner(key):  # the partitioned run fits, the single-device reference does not
        return {"peak": 2**10 if key.mesh.n_devices > 1 else 2**30}

    monkeypatch.setattr(workbench.app.planning, "plan_bytes", planner)
    monkeypatch.setattr(guard, "available_memory", lambda n: (2**22, "a test budget of 4 MiB"))
    out = tmp_path / "out"
    argv = ["infer", "phantom:32", "--mesh", "2x2x2", "--random-weights", "--out", str(out)]
    assert main([*argv, "--reference"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reference: the single-device reference needs the planner's 1.00 GiB" in err
    assert "or drop --reference (the partitioned run alone fits), or pass --force" in err, err
    assert not out.exists()
    model = UNetConfig.preset("small")
    from workbench.model.unet import Model

    with pytest.raises(guard.MemoryRefused, match="--reference: the single-device reference"):
        infer(Model.init(model, seed=0), load_volume("phantom:32"), "2x2x2", reference=True)
    assert main(argv) == 0  # without --reference the same run goes ahead


def test_an_architecture_outside_the_fit_is_never_passed_on_the_fitted_bounds():
    """The presets' bounds were fitted on the presets: a one-level U-Net with 1 filter and 16
    classes, which the fitted rule (32·V·F·4 + 256 MiB = 2.25 GiB at 256³) would pass within
    5 GiB unchecked, is compiled instead (its logits alone are 1 GiB); with 128 classes its
    layer spec's lower bound (image + logits, 8.1 GiB) refuses it at once."""
    odd = UNetConfig.preset("small", depth=1, base_filters=1, convs_per_block=1, num_classes=16)
    assert not guard.fitted(odd) and guard.fitted(UNetConfig.preset("paper", num_classes=4, dtype="float32"))
    assert not guard.fitted(UNetConfig.preset("small", dtype="float64"))
    assert not guard.fitted(UNetConfig.preset("small", dropout=0.1), train=True)
    budget, voxels = 5 * 2**30, 256**3
    assert 32 * voxels * odd.base_filters * 4 + 2**28 <= budget / 2  # what the fitted rule would have passed
    got = guard.check_memory(odd, (256,) * 3, MeshSpec(), budget=budget)  # the real planner: compiled
    assert got["decided_by"] == "planner" and 16 * voxels * 4 < got["bytes"] <= budget
    with pytest.raises(guard.MemoryRefused, match="inference run needs at least 8.0"):
        guard.check_memory(odd.replace(num_classes=128), (256,) * 3, MeshSpec(), budget=budget, planner=_no_planner)


def test_the_layer_spec_bounds_hold_against_compiled_programs():
    """spec_lower_bound <= XLA's peak <= spec_upper_bound - 256 MiB (the bound holds without its
    fixed part) for networks no bound was fitted on: many classes, an nnU-Net network with
    anisotropic strides on a mesh (its forward compiled by the guard's own planner)."""
    from workbench.app.planning import PlanKey, plan_bytes
    from workbench.mesh import ShardLayout
    from workbench.model.spec import NetworkSpec

    wide = UNetConfig.preset("small", depth=1, base_filters=1, convs_per_block=1, num_classes=64)
    nnunet = NetworkSpec.plain(in_channels=2, num_outputs=3, kernels=[(1, 3, 3), 3, 3], strides=[1, (1, 2, 2), 2],
                               features=[4, 8, 16], blocks=[2, 2, 2])  # fmt: skip
    for net, shape, mesh in ((wide, (32,) * 3, MeshSpec()), (nnunet, (32, 64, 64), MeshSpec(2, 2, 2))):
        stats = (plan_bytes if net is not nnunet else guard._plan_network)(PlanKey(net, shape, mesh))
        spec = net if net is nnunet else net.spec()
        block = ShardLayout(shape, mesh, multiple=spec.multiple).block_shape
        assert guard.spec_lower_bound(spec, block) <= stats["peak"]
        assert stats["peak"] <= guard.spec_upper_bound(spec, block) - 2**28, (net, stats)
        got = guard.check_memory(net, shape, mesh, budget=2 * stats["peak"], planner=lambda key, s=stats: s)
        assert got["decided_by"] == "planner" and got["bytes"] == stats["peak"]
    assert guard.check_memory(nnunet, (32, 64, 64), MeshSpec(2, 2, 2), budget=2**30)["decided_by"] == "layer spec bound"
