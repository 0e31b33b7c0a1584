"""The notebook panel with a plans file's network: choices, memory estimate, runs, training.

A tiny plain nnU-Net network (3 stages, strides (1,2,2) then (2,2,2): per-axis size multiple
(2, 4, 4)) written as a plans file by :func:`workbench.analysis.nnunet_memory.spec_plans`,
on the one-channel phantom at 16³–20³.
"""

import json

import matplotlib
import numpy as np
import pytest
from conftest import f32_tolerance

matplotlib.use("Agg")

from workbench import cli  # noqa: E402
from workbench.analysis import nnunet_memory  # noqa: E402
from workbench.errors import UserError, one_line  # noqa: E402
from workbench.mesh import MeshSpec  # noqa: E402
from workbench.model.spec import NetworkSpec  # noqa: E402
from workbench.ui.panel import WorkbenchPanel  # noqa: E402


def tiny_spec(in_channels: int = 1) -> NetworkSpec:
    return NetworkSpec.plain(
        in_channels=in_channels, num_outputs=3, kernels=[(1, 3, 3), (3, 3, 3), (3, 3, 3)],
        strides=[(1, 1, 1), (1, 2, 2), (2, 2, 2)], features=[4, 8, 8], blocks=[1, 1, 1],
    )  # fmt: skip


@pytest.fixture(scope="module")
def plans_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plans") / "plans.json"
    path.write_text(json.dumps(nnunet_memory.spec_plans(tiny_spec())))
    return path


@pytest.fixture(scope="module")
def panel(plans_file):
    return WorkbenchPanel("phantom:16", mesh="1x2x4", model=str(plans_file), estimate="sync")


def _cli_plan(capsys, plans_file, mesh, shape, dtype, train) -> int:
    """What `workbench plan --plans FILE --mesh M --shape S --json` prints. spec_memory's cache is
    keyed on every argument (spec, shape, mesh, train, dtype, batch): the CLI reuses the panel's
    compile only when the panel asked the very same question; inference is compiled afresh."""
    if not train:
        nnunet_memory._measure.cache_clear()
    argv = ["plan", "--plans", str(plans_file), "--mesh", mesh, "--shape", shape, "--dtype", dtype, "--json"]
    assert cli.main(argv + ["--train" if train else "--infer"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mesh"] == mesh and out["train"] is train and out["dtype"] == dtype
    return out["bytes_per_device"]


def test_plans_network_choices_follow_its_spec(panel, plans_file):
    p = panel
    assert p.error is None and p.config.spec.stages == tiny_spec().stages and p.config.spec.multiple == (2, 4, 4)
    # cube sides with no padding: each axis a multiple of (mesh parts × stride product): lcm(2, 8, 16) = 16
    assert [int(s) for s in p.resolution.options] == [16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    assert [v for _, v in p.halo.options] == ["exact"] and p.backend.options == ("explicit",)
    assert p.remat.disabled and p.remat.value is False
    p.model.value = "small"  # back to a preset: its halo modes, backends and sizes return
    assert p.error is None and p.config.depth == 3 and not p.remat.disabled
    assert "zero" in [v for _, v in p.halo.options] and "gspmd" in p.backend.options
    assert p.resolution.options[:3] == ("16", "32", "48")  # multiples of lcm(1, 2, 4) × 4 on 1x2x4
    p.model.value = str(plans_file)
    assert p.error is None and p.halo.options == (("exact", "exact"),)


def test_estimate_is_workbench_plan_plans(panel, plans_file, capsys):
    """The panel's estimate is the very number `workbench plan --plans` prints: inference and
    training, float32 and bfloat16, an even split and a padded one (20³ → 20x24x24 blocks)."""
    p = panel
    p.model.value = str(plans_file)
    cases = [("inference", MeshSpec(1, 2, 4), "16", "float32"), ("training", MeshSpec(2, 2, 2), "20", "bfloat16")]
    for plan_for, mesh, resolution, dtype in cases:
        p.estimate_mode = "off"  # no estimate for the choices on the way
        p.plan_for.value, p.mesh.value, p.resolution.value, p.dtype.value = plan_for, mesh, resolution, dtype
        p.estimate_mode = "sync"
        assert p.error is None, p.error
        estimate = p.wait_estimate()["peak"]
        shape = "x".join([resolution] * 3)
        assert estimate == _cli_plan(capsys, plans_file, str(mesh), shape, dtype, plan_for == "training") > 0
    assert "padded to 20×24×24" in p.padding.value
    p.estimate_mode = "off"
    p.plan_for.value, p.mesh.value, p.resolution.value, p.dtype.value = "inference", MeshSpec(1, 2, 4), "16", "float32"
    p.estimate_mode = "sync"


def test_run_compare_and_view_a_plans_network(panel):
    p = panel
    p.model.value = str(p.config.plans["path"])
    p.compare_button.click()
    assert p.error is None, p.error
    r = p.report
    assert p.result.output.shape == (16, 16, 16, 3) and r["mesh"] == {"data": 1, "z": 1, "y": 2, "x": 4}
    assert r["max_abs_diff"] <= f32_tolerance(r["reference_scale"]) and r["argmax_disagreement"] == 0.0
    assert r["max_abs_diff"] == pytest.approx(float(np.abs(p.result.output - p.reference.output).max()))
    assert len(r["per_shard"]) == 8 and r["weights"] == "random (seed 0)" and r["plans"] == p.config.plans["path"]
    # the estimate the panel showed is what the compiled run measured
    assert p.wait_estimate()["peak"] == p.result.memory["peak"] > 0
    viewer = p.view()
    assert viewer is p.notebook_viewer and "error" in p.figures and "seam" in p.figures


def test_bad_plans_file_is_one_red_line_and_the_methods_raise_it(panel, tmp_path):
    p = panel
    good = p.model.value
    broken = tmp_path / "nnUNetPlans.json"
    broken.write_text(json.dumps({"configurations": {"3d_fullres": {}}}))  # no dataset.json beside it
    try:
        for value, expect in ((str(tmp_path / "missing.json"), "neither a preset"), (str(broken), "dataset.json")):
            p.model.value = value
            assert p.error is not None and expect in p.error and "\n" not in p.error
            assert p.estimate.value == "" and p.fits is None
            for method in (p.run_inference, p.compare, p.train):
                with pytest.raises(UserError) as err:
                    method()
                assert one_line(err.value) == p.error
            p.run_button.click()
            assert expect in p.error
    finally:
        p.model.value = good
    assert p.error is None


def test_channel_counts_that_disagree_name_both(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json.dumps(nnunet_memory.spec_plans(tiny_spec(in_channels=2))))
    p = WorkbenchPanel("phantom:16", mesh="1x2x4", model=str(path), estimate="off")
    p.run_button.click()
    assert "the volume has 1 channel but the plans network" in p.error and "takes 2" in p.error


def test_train_a_plans_network_from_the_panel(panel, tmp_path):
    """`Train` trains the plans network (workbench train --plans's loop); later runs use the weights."""
    p = panel
    p.mesh.value = MeshSpec(1, 2, 4)
    before = p.session.model(p.settings()).model.variables
    out = p.train(1, workdir=tmp_path / "run")
    assert p.error is None and out["step"] == 1 and out["model"].config.plans["path"] == p.config.plans["path"]
    assert np.isfinite(out["history"]["train"][0]["loss"])
    after = p.session.model(p.settings())
    assert after.source == "checkpoint" and after.model is out["model"]
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(before), _leaves(after.model.variables))]
    assert any(changed)
    p.run_inference()
    assert p.inference.report["weights"].startswith("trained 1 steps")


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]
