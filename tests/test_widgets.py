"""Widget panels without a browser: build, set ``.value``s, ``click()``, check calls and state.

One module-scoped panel does the real work (planner, partitioned run, reference) at
16³ on 2×2×2; everything else uses a fake planner so it needs no compile.
"""

import math
import subprocess
import sys
import threading

import matplotlib
import numpy as np
import pytest
from conftest import f32_tolerance

matplotlib.use("Agg")

from workbench.app.planning import (  # noqa: E402
    MemoryEstimator,
    PlanKey,
    fits_line,
    memory_table,
    smallest_fitting,
    table_text,
)
from workbench.mesh import (  # noqa: E402
    MeshSpec,
    ShardLayout,
    parse_resolution,  # noqa: E402
)
from workbench.ui.choices import mesh_choices, mesh_svg, padding_note, valid_resolutions  # noqa: E402
from workbench.ui.panel import WorkbenchPanel  # noqa: E402


def fake_planner(key: PlanKey) -> dict:
    """Bytes ∝ voxels per device (4 bytes × 10 channels), so expectations are exact."""
    voxels = math.prod(ShardLayout(key.shape, key.mesh, multiple=key.config.multiple).block_shape)
    peak = voxels * 40 * key.batch // key.mesh.data * (3 if key.train else 1)
    return {"argument": 0, "output": 0, "temp": peak, "alias": 0, "peak": peak}


@pytest.fixture
def fake_panel():
    estimator = MemoryEstimator(fake_planner)
    return WorkbenchPanel("phantom:32", mesh="2x2x2", estimate="sync", estimator=estimator)


# ---------------------------------------------------------------- pure helpers


def test_import_does_not_start_jax_or_napari():
    code = "import sys, workbench.ui.panel; print(sorted(m for m in ('jax', 'napari', 'PyQt6') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mesh_choices_are_exactly_the_meshes_of_the_devices():
    choices = mesh_choices(8)
    assert len(choices) == 10  # ordered factorizations of 8 into z·y·x
    assert all(spec.n_devices == 8 and spec.data == 1 for _, spec in choices)
    assert ("2×2×2", MeshSpec(2, 2, 2)) in choices
    data2 = mesh_choices(8, data=2)
    assert [label for label, _ in data2][:2] == ["1×1×4 (data 2)", "1×2×2 (data 2)"]
    assert all(spec.n_devices == 8 and spec.data == 2 for _, spec in data2)
    with pytest.raises(
        ValueError, match=r"data-parallel size 3 does not divide the 8 devices; choose one of \[1, 2, 4, 8\]"
    ):
        mesh_choices(8, data=3)


def test_mesh_svg_draws_one_cell_per_device():
    svg = mesh_svg(MeshSpec(2, 2, 2))
    assert svg.count("<rect") == 8 and "device 7: z1 y1 x1" in svg
    svg = mesh_svg(MeshSpec(1, 2, 2, data=2))
    assert svg.count("<rect") == 4 and "× 2 data-parallel copies" in svg


def test_resolutions_offered_split_evenly_and_others_show_padding():
    assert valid_resolutions(MeshSpec(2, 2, 2), 4, largest=128) == [16, 24, 32, 48, 64, 96, 128]
    assert valid_resolutions(MeshSpec(1, 1, 3), 8, largest=512) == [24, 48, 96, 192, 384]
    for n in valid_resolutions(MeshSpec(1, 2, 4), 8):
        assert ShardLayout((n,) * 3, MeshSpec(1, 2, 4), multiple=8).padded_shape == (n,) * 3
    assert padding_note((32, 32, 32), MeshSpec(2, 2, 2), 4) == "32³ splits evenly: 8 blocks of 16³"
    # 36 → 40 per axis: 40³/36³ − 1 = 37.2 %
    assert padding_note((36, 36, 36), MeshSpec(2, 2, 2), 4) == (
        "36³ is padded to 40³ on this mesh (+37% voxels, masked out): 8 blocks of 20³"
    )
    assert padding_note((47, 58, 49), MeshSpec(2, 2, 2), 4).startswith("47×58×49 is padded to 48×64×56")


def test_halo_choices_come_from_the_layer_spec():
    """overlap at the spec's receptive width (23 → 24, 51 → 56), narrower widths in steps of its size multiple."""
    from workbench.model.unet import UNetConfig
    from workbench.ui.choices import halo_options

    small = halo_options(UNetConfig.preset("small"))
    assert small[:5] == [("exact", "exact"), ("overlap (input halo 24, exact)", "overlap"), ("zero", "zero"),
                         ("reflect", "reflect"), ("replicate", "replicate")]  # fmt: skip
    assert [v for _, v in small[5:]] == [4, 8, 12, 16, 20]
    paper = halo_options(UNetConfig.preset("paper"))
    assert paper[1][0] == "overlap (input halo 56, exact)" and [v for _, v in paper[5:]] == [8, 16, 24, 32, 40, 48]


def test_parse_resolution_and_its_error():
    assert parse_resolution(" 64 ", allow_native=True) == (64, 64, 64)
    assert parse_resolution("Native", allow_native=True) == "native"
    assert parse_resolution("32x64x48") == (32, 64, 48)
    for bad in ("abc", "-3", "0", "6.5", "12x12"):
        with pytest.raises(ValueError, match=f"resolution '{bad}' is not a size; type a positive integer"):
            parse_resolution(bad, allow_native=True)
    with pytest.raises(ValueError, match="resolution 'native' is not a size"):
        parse_resolution("native")


def test_fits_line_against_the_budget():
    assert fits_line({"peak": 8 * 2**30}, 16) == (True, "8.00 GiB per device: fits 16 GiB (50%)")
    assert fits_line({"peak": 40 * 2**30}, 16) == (False, "40.00 GiB per device: does not fit 16 GiB (2.5× the budget)")
    assert fits_line({"peak": 3 * 2**20}, 0.5)[1] == "3.0 MiB per device: fits 0.5 GiB (1%)"


def test_estimator_caches_and_runs_in_a_background_thread():
    release, threads = threading.Event(), []

    def slow(key):
        threads.append(threading.current_thread().name)
        release.wait(10)
        return fake_planner(key)

    estimator = MemoryEstimator(slow)
    key = PlanKey(widgets_config(), (32, 32, 32), MeshSpec(2, 2, 2))
    future = estimator.submit(key)
    assert not future.done()  # the caller is not blocked
    assert estimator.submit(key) is future
    release.set()
    assert estimator.estimate(key)["peak"] == 16**3 * 40
    assert estimator.estimate(key) == future.result() and estimator.computed == 1
    assert threads == ["workbench-plan_0"]


def widgets_config():
    from workbench.model.unet import UNetConfig

    return UNetConfig.preset("small")


def test_memory_table_rows_and_efficiency():
    estimator = MemoryEstimator(fake_planner)
    rows = memory_table(
        widgets_config(),
        [32, 64],
        ["1x1x1", "2x2x2", "data=2,z=2,y=2,x=1"],
        estimator=estimator,
        budgets_gib=(0.002,),
        progress=False,
    )
    assert [(r["resolution"], r["mesh"]) for r in rows][:3] == [
        (32, "1x1x1"),
        (32, "2x2x2"),
        (32, "data=2,z=2,y=2,x=1"),
    ]
    one, eight, dp = rows[3:]
    assert one["bytes_per_device"] == 64**3 * 40 and eight["bytes_per_device"] == 32**3 * 40
    assert eight["efficiency"] == pytest.approx(1.0) and dp["efficiency"] == pytest.approx(1.0)
    assert (one["fits_0.002GiB"], eight["fits_0.002GiB"]) == (False, True)  # 10 MiB, 1.25 MiB vs 2.05 MiB
    assert estimator.computed == 6  # 1x1x1 is shared with the single-device column
    text = table_text(rows[3:], ["mesh", "bytes_per_device", "efficiency"])
    assert text.splitlines()[1].split() == ["1x1x1", "10.0", "MiB", "1"]


# ---------------------------------------------------------------- the panel, fake planner


def test_smallest_fitting_mesh_per_budget():
    gib = 2**30
    rows = [
        {"resolution": 512, "mesh": "1x1x1", "devices": 1, "bytes_per_device": 40 * gib},
        {"resolution": 512, "mesh": "2x2x2", "devices": 8, "bytes_per_device": 6 * gib},
        {"resolution": 512, "mesh": "1x2x2", "devices": 4, "bytes_per_device": 12 * gib},
        {"resolution": 1024, "mesh": "2x2x2", "devices": 8, "bytes_per_device": 48 * gib},
    ]
    best = {(r["budget_gib"], r["resolution"]): r["mesh"] for r in smallest_fitting(rows, (16, 80))}
    assert best == {(16, 512): "1x2x2", (16, 1024): None, (80, 512): "1x1x1", (80, 1024): "2x2x2"}


def test_panel_offers_valid_meshes_and_reacts_to_data_parallel(fake_panel):
    p = fake_panel
    assert p.n_devices == 8 and p.mesh.value == MeshSpec(2, 2, 2)
    assert [spec for _, spec in p.mesh.options] == [spec for _, spec in mesh_choices(8)]
    assert p.data.options == (1, 2, 4, 8)
    p.data.value = 2
    assert all(spec.data == 2 and spec.n_devices == 8 for _, spec in p.mesh.options)
    assert p.mesh.value == MeshSpec(2, 2, 1, data=2)  # the most cube-like of 4 devices
    assert "× 2 data-parallel copies" in p.mesh_picture.value
    assert p.plan_key().batch == 2
    p.data.value = 1
    p.mesh.value = MeshSpec(1, 2, 4)
    assert p.mesh_picture.value.count("<rect") == 8
    assert p.resolution.options[:4] == ("16", "32", "48", "64")  # multiples of lcm(1,2,4)·4 = 16


def test_panel_estimate_updates_and_budget_does_not_recompile(fake_panel):
    p = fake_panel
    assert p.wait_estimate()["peak"] == 16**3 * 40
    assert "inference: 0.2 MiB per device: fits 16 GiB" in p.estimate.value and p.fits is True
    computed = p.estimator.computed
    p.budget.value = 0.0001  # 107 kB < 160 kB
    assert p.fits is False and "does not fit 0.0001 GiB" in p.estimate.value
    assert p.estimator.computed == computed
    p.plan_for.value = "training"
    assert p.wait_estimate()["peak"] == 3 * 16**3 * 40 and "training step:" in p.estimate.value
    p.resolution.value = "36"
    assert "36³ is padded to 40³" in p.padding.value
    assert p.wait_estimate()["peak"] == 3 * 20**3 * 40


def test_panel_never_waits_for_the_planner():
    release = threading.Event()

    def blocked(key):
        release.wait(10)
        return fake_planner(key)

    p = WorkbenchPanel("phantom:32", mesh="2x2x2", estimator=MemoryEstimator(blocked))
    assert p.estimate.value.startswith("estimating per-device memory") and p.fits is None
    p.model.value = "paper"  # a change while the planner is busy: no freeze, new key queued
    assert p.plan_key().config.depth == 4 and p.estimate.value.startswith("estimating")
    release.set()
    assert p.wait_estimate(10)["peak"] == 16**3 * 40
    assert "fits 16 GiB" in p.estimate.value


def test_bad_resolution_shows_one_line_and_blocks_actions(fake_panel):
    p = fake_panel
    p.resolution.value = "big"
    assert "resolution &#x27;big&#x27; is not a size" in p.padding.value and p.estimate.value == ""
    with pytest.raises(ValueError, match="resolution 'big' is not a size"):
        p.wait_estimate()
    p.run_button.click()
    assert p.error.startswith("resolution 'big' is not a size") and p.result is None
    assert "color:#b00020" in p.status.value and not p.run_button.disabled
    p.resolution.value = "native"
    p.run_button.click()
    assert p.error == "a phantom has no native size; type a side such as 64"


def test_planner_errors_show_as_one_line():
    p = WorkbenchPanel("phantom:32", mesh="2x2x2", estimate="off")  # the real planner, later
    p.backend.value = "gspmd"
    p.halo.value = "zero"
    p.estimate_mode = "sync"
    p.refresh_estimate()
    assert p.estimate.value.startswith('<span style="color:#b00020">halo &#x27;zero&#x27; is only available')
    with pytest.raises(ValueError, match="only available with the explicit backend"):
        p.wait_estimate()


def test_panel_training_estimate_is_workbench_plan_train():
    """One answer: the panel's training estimate compiles the same step (loss, gradients,
    clipping, Adam state) as `workbench plan --train`, on a data-parallel mesh too."""
    from workbench.analysis.plan import plan

    p = WorkbenchPanel("phantom:16", mesh="data=2,z=2,y=2,x=1", estimate="sync", plan_for="training")
    assert p.plan_for.value == "training"
    for spec in (MeshSpec(2, 2, 1, data=2), MeshSpec(2, 2, 2)):
        p.data.value = spec.data
        p.mesh.value = spec
        estimate = p.wait_estimate()["peak"]
        planned = plan(p.config, 16, spec, train=True, reference=False)
        assert estimate == planned["bytes_per_device"] > 0, spec
        assert planned["train"] and planned["batch"] == spec.data


def test_data_parallel_inference_is_refused_in_the_panel(fake_panel):
    p = fake_panel
    p.data.value = 2
    p.run_button.click()
    assert p.error == (
        "mesh data=2,z=2,y=2,x=1 has a data-parallel axis of 2 but inference runs one "
        "volume; set data-parallel to 1 (it is for training and memory plans)"
    )
    p.compare_button.click()
    assert p.error.startswith("mesh data=2") and p.result is None


def test_train_button_calls_train_and_evaluate(fake_panel, monkeypatch, tmp_path):
    import workbench.training.loop as train

    calls = []

    def fake_train(config, workdir, **kwargs):
        calls.append((config, workdir, kwargs))
        rows = [{"step": i + 1, "loss": 1.0 / (i + 1), "dice_organ": 0.1 * i, "dice_lesion": None} for i in range(3)]
        return {"step": 3, "loop_seconds": 1.5, "history": {"train": rows, "eval": []}, "model": None}

    monkeypatch.setattr(train, "train_and_evaluate", fake_train)
    p = fake_panel
    p.steps.value = 3
    p.data.value = 2
    p.remat.value = True
    p.train_button.click()
    assert p.error is None
    ((config, workdir, kwargs),) = calls
    assert (config.data, config.resolution, config.mesh, config.data_parallel, config.batch) == (
        "phantom",
        32,
        "2x2x1",
        2,
        2,
    )
    assert config.steps == 3 and config.model == "small"
    assert config.model_overrides == {"dtype": "float32", "remat": True}
    assert kwargs["progress"] is True
    assert "trained 3 steps in 1.5 s; loss 1.000 → 0.333" in p.status.value
    fig = p.figures["curves"]
    assert [ax.get_title() for ax in fig.axes] == ["loss", "dice organ", "dice lesion"]
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), [1.0, 0.5, 1 / 3])


def test_napari_without_a_display_is_one_line(fake_panel, monkeypatch):
    import workbench.ui.napari.view as viewer

    monkeypatch.setattr(viewer, "display_available", lambda: (False, "no display (DISPLAY is unset)"))
    monkeypatch.setattr(WorkbenchPanel, "layers", lambda self: [])
    fake_panel.napari_button.click()
    assert fake_panel.error == "cannot open napari: no display (DISPLAY is unset)"
    assert fake_panel.viewer is None


def test_memory_vs_devices_plots_the_planner(fake_panel):
    p = fake_panel
    p.memory_button.click()
    assert p.error is None
    ax = p.figures["memory"].axes[0]
    assert list(ax.lines[0].get_xdata()) == [1, 2, 4, 8]
    # 32³ over 1, 2, 4, 8 devices: 40 bytes × 32768 / n
    assert np.allclose(ax.lines[0].get_ydata() * 2**30, [32**3 * 40 / n for n in (1, 2, 4, 8)])


def test_panel_rejects_a_mesh_for_other_devices():
    with pytest.raises(ValueError, match="mesh 2x2x4 needs 16 devices but 8 are available"):
        WorkbenchPanel("phantom:32", mesh="2x2x4", estimate="off")
    with pytest.raises(ValueError, match="write phantom, phantom:N or phantom:N:SEED"):
        WorkbenchPanel("phantom:big", estimate="off")


# ---------------------------------------------------------------- the panel, real runs


@pytest.fixture(scope="module")
def real_panel():
    return WorkbenchPanel("phantom:16", mesh="2x2x2", estimate="sync")


def test_run_and_compare_buttons_match_the_reference(real_panel):
    p = real_panel
    p.run_button.click()
    assert p.error is None and p.result.output.shape == (16, 16, 16, 3)
    assert p.summary.startswith("explicit on 2x2x2, halo exact:") and "measured peak" in p.summary
    assert "slices" in p.figures
    # the planner's estimate (before the run) is what the compiled run measured
    assert p.wait_estimate()["peak"] == p.result.memory["peak"] > 0 and p.fits is True
    p.compare_button.click()
    report = p.report
    assert report["max_abs_diff"] <= f32_tolerance(report["reference_scale"]) and report["argmax_disagreement"] == 0.0
    assert len(report["per_shard"]) == 8
    assert report["profile"]["distance"][0] == 0 and max(report["profile"]["max"]) == report["max_abs_diff"]
    # the same numbers from the arrays themselves
    assert report["max_abs_diff"] == pytest.approx(float(np.abs(p.result.output - p.reference.output).max()))


def test_zero_halo_shows_seams(real_panel):
    p = real_panel
    p.halo.value = "zero"
    report = p.compare()
    seam = report["profile"]
    assert report["max_abs_diff"] > 1e-2
    assert seam["distance"][0] == 0 and seam["max"][0] > 1e-2  # wrong right at the boundary
    assert p.summary.startswith("max |Δ| vs reference")
    assert [line.get_label() for line in p.figures["seam"].axes[0].lines][0] == "explicit, halo zero"
    p.halo.value = "exact"


def test_napari_layers_of_the_run(real_panel):
    p = real_panel
    p.compare()
    layers = {kwargs["name"]: kind for _, kwargs, kind in p.layers()}
    assert layers["image"] == "image" and layers["prediction"] == "labels"
    assert layers["|error|"] == "image" and layers["ground truth"] == "labels"
    assert list(layers.values())[-1] == "shapes"  # shard boundaries on top


def test_screenshot_falls_back_to_matplotlib_without_display(real_panel, monkeypatch, tmp_path):
    import workbench.ui.napari.view as viewer

    monkeypatch.setattr(viewer, "display_available", lambda: (False, "no display (DISPLAY is unset)"))
    path, how = real_panel.screenshot(tmp_path / "shards.png")
    assert how == "matplotlib"
    assert real_panel.controls.status.value.endswith("saved shards.png (matplotlib)")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
