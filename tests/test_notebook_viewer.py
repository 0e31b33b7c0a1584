"""The in-notebook viewer without a browser: what it is given equals the ShardLayout, the
napari layers and the comparison; slices decode to the arrays; start-up stays in budget.

(In a real browser: tests/test_browser.py, which runs notebook 01 and reads the viewer's pixels.)
"""

import json
import subprocess
import sys
import zlib

import numpy as np
import pytest

from workbench.analysis.compare import shard_stats
from workbench.errors import UserError
from workbench.mesh import ShardLayout
from workbench.ui.napari import layers as napari_layers
from workbench.ui.notebook_viewer import START_BUDGET_FRACTION, Scene, SliceViewer, viewer
from workbench.ui.notebook_viewer.scene import quantise_error, quantise_image


def _arrays(shape, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 20.0, shape).astype(np.float32)
    labels = (image > 105).astype(np.uint8) + (image > 130)
    signed = np.zeros(shape, np.float32)
    signed[shape[0] // 2 - 1 : shape[0] // 2 + 1] = rng.normal(0, 1e-3, (2, *shape[1:]))
    return image, labels, signed


def _decode(header, buffers):
    planes = {}
    for name, buf in zip(header["channels"], buffers):
        raw = zlib.decompress(buf) if header["codec"] == "deflate" else buf
        planes[name] = np.frombuffer(raw, np.uint8).reshape(header["rows"], header["cols"])
    return planes


def test_import_starts_no_jax_qt_or_napari():
    code = (
        "import sys, workbench.ui.notebook_viewer; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'napari', 'PyQt6', 'qtpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("shape, mesh, multiple", [((32, 32, 32), "2x2x2", 1), ((37, 53, 45), "1x2x4", 4)])
def test_scene_equals_the_layout_the_napari_layers_and_the_statistics(shape, mesh, multiple):
    layout = ShardLayout(shape, mesh, multiple=multiple)
    image, labels, signed = _arrays(shape)
    scene = Scene(layout, spacing=(2.0, 1.0, 0.5), image=image, prediction=labels, ground_truth=labels,
                  signed=signed, halo_width=2)  # fmt: skip
    napari = {kw["name"]: (data, kw) for data, kw, _ in napari_layers.build_layers(
        layout, spacing=(2.0, 1.0, 0.5), image=image, prediction=labels, ground_truth=labels, signed=signed,
        halo_band_width=2)}  # fmt: skip
    # shard boxes and colours: the layout's, in napari's colours
    shards = scene.shards
    assert [s["box"] for s in shards] == [[list(b) for b in s.valid_box] for s in layout.shards()]
    assert [s["coords"] for s in shards] == [list(s.coords) for s in layout.shards()]
    edge = napari["shard boundaries"][1]["edge_color"]
    drawn = [s for s in shards if not s["empty"]]
    assert np.array_equal(np.array([s["rgb"] for s in drawn]), np.rint(np.asarray(edge)[:, :3] * 255))
    assert [s["empty"] for s in shards] == [s.is_empty for s in layout.shards()]
    # per-shard errors: shard_stats of the error map, as the napari boundary features carry them
    stats = shard_stats(signed, layout, tolerance=1e-5)
    assert [{k: s[k] for k in ("max_abs_diff", "mean_abs_diff", "voxels_over_tolerance")} for s in shards] == [
        {k: r[k] for k in ("max_abs_diff", "mean_abs_diff", "voxels_over_tolerance")} for r in stats
    ]
    assert napari["shard boundaries"][1]["features"]["max_abs_diff"] == [s["max_abs_diff"] for s in drawn]
    # contrast window and error limit: napari's
    assert list(scene.image_limits) == napari["image"][1]["contrast_limits"]
    assert [0.0, scene.error_limit] == napari["|error|"][1]["contrast_limits"]
    # every channel's slices along every axis
    halo = napari["halo band (2 voxels)"][0]
    for axis in range(3):
        for index in (0, shape[axis] // 2, shape[axis] - 1):
            cut = (slice(None),) * axis + (index,)
            np.testing.assert_array_equal(scene.slice("prediction", axis, index), labels[cut])
            np.testing.assert_array_equal(scene.slice("halo band", axis, index), halo[cut])
            np.testing.assert_array_equal(scene.slice("image", axis, index),
                                          quantise_image(image[cut], scene.image_limits))  # fmt: skip
            decoded = (scene.slice("error", axis, index).astype(np.float64) - 128) / 127 * scene.error_limit
            assert np.abs(decoded - np.clip(signed[cut], -scene.error_limit, scene.error_limit)).max() <= (
                scene.error_limit / 254 + 1e-12
            )


def test_quantisation_ends_and_zero():
    assert quantise_error(np.array([-1.0, -0.5, 0.0, 0.5, 2.0]), 1.0).tolist() == [
        1,
        64,
        128,
        192,
        255,
    ]  # ±63.5: half to even
    assert quantise_image(np.array([-5.0, 0.0, 5.0, 10.0, 50.0]), (0.0, 10.0)).tolist() == [0, 0, 128, 255, 255]


def test_messages_decode_to_the_slices_and_are_counted():
    layout = ShardLayout((16, 24, 20), "2x2x1")
    image, labels, signed = _arrays((16, 24, 20), seed=3)
    v = SliceViewer(Scene(layout, image=image, prediction=labels, signed=signed, halo_width=1))
    assert v.position == [8, 12, 10]
    manifest_bytes = v.bytes_sent
    assert manifest_bytes == len(json.dumps(v.manifest, separators=(",", ":")))
    header, buffers = v.slice_message(1, 5, seq=7)
    assert (header["axis"], header["index"], header["seq"], header["rows"], header["cols"]) == (1, 5, 7, 16, 20)
    planes = _decode(header, buffers)
    for name in ("image", "prediction", "error", "halo band"):
        np.testing.assert_array_equal(planes[name], v.scene.slice(name, 1, 5))
    v._on_message(v, {"type": "slice", "axis": 2, "index": 99, "seq": 1}, [])  # clipped to the last slice
    assert v.slices_sent == 1 and v.bytes_sent > manifest_bytes
    v._on_message(v, {"type": "something else"}, [])
    assert v.slices_sent == 1


def test_start_up_of_a_512_cube_stays_within_the_budget():
    """512³ without 512³ arrays in memory: broadcast views (z slices are incompressible noise)."""
    n = 512
    layout = ShardLayout((n, n, n), "2x2x2")
    rng = np.random.default_rng(0)
    image = np.broadcast_to(rng.normal(0, 1, (1, n, n)).astype(np.float32), (n, n, n))
    labels = np.broadcast_to((rng.random((1, n, n)) > 0.5).astype(np.uint8), (n, n, n))
    signed = np.broadcast_to(rng.normal(0, 1e-3, (1, n, n)).astype(np.float32), (n, n, n))
    stats = [{"index": s.index, "max_abs_diff": 5e-3, "mean_abs_diff": 1e-3, "voxels_over_tolerance": 1}
             for s in layout.shards()]  # fmt: skip
    v = SliceViewer(Scene(layout, image=image, prediction=labels, ground_truth=labels, signed=signed, stats=stats,
                          halo_width=4))  # fmt: skip
    start = v.startup_bytes()
    float32 = 4 * n**3
    assert start <= START_BUDGET_FRACTION * float32
    # the manifest and three slices of five uint8 channels, whatever they compress to
    assert start <= len(json.dumps(v.manifest)) + 3 * 5 * n * n + 4096
    assert start < 4 * 2**20  # under 4 MiB: the figure docs/viewer.md states


def test_bad_input_is_one_user_error():
    layout = ShardLayout((8, 8, 8), "2x1x1")
    image, labels, signed = _arrays((8, 8, 8))
    with pytest.raises(UserError, match="nothing to show"):
        Scene(layout)
    with pytest.raises(UserError, match=r"has shape \(8, 8, 4\) but the volume is \(8, 8, 8\)"):
        Scene(layout, image=image[..., :4])
    with pytest.raises(UserError, match="expected integer labels"):
        Scene(layout, prediction=image)
    with pytest.raises(UserError, match="cannot view a dict"):
        viewer({})
    v = SliceViewer(Scene(layout, image=image, prediction=labels))
    with pytest.raises(UserError, match=r"position \(8, 0, 0\) is outside the volume"):
        v.position = [8, 0, 0]
    with pytest.raises(UserError, match="no overlay 'error'"):
        v.show(error=True)
    assert v.show(prediction=False).visible["prediction"] is False
    with pytest.raises(UserError, match="z = 8 is outside the volume"):
        v.scene.slice("image", 0, 8)


# -- real results: a result folder, an Inference, a RunResult pair, the panel ------------------------
@pytest.fixture(scope="module")
def run(small_model):
    from workbench.app import infer, load_volume

    return infer(small_model, load_volume("phantom:16"), "2x2x2", halo="zero", reference=True)


def test_viewer_of_an_inference_and_its_result_folder(run, tmp_path):
    import workbench as wb
    from workbench.app import write_result

    assert wb.viewer is viewer
    v = viewer(run)
    scene = v.scene
    assert [c.name for c in scene.channels] == ["image", "ground truth", "reference prediction", "prediction", "error"]
    assert [s["max_abs_diff"] for s in scene.shards] == [r["max_abs_diff"] for r in run.comparison.per_shard]
    assert scene.max_abs_diff == pytest.approx(run.report["max_abs_diff"])
    np.testing.assert_array_equal(scene.slice("prediction", 0, 3), run.labels[3])
    write_result(tmp_path / "out", run, images=True)
    folder = viewer(tmp_path / "out").scene
    assert [s["box"] for s in folder.shards] == [s["box"] for s in scene.shards]
    assert [s["max_abs_diff"] for s in folder.shards] == pytest.approx([s["max_abs_diff"] for s in scene.shards])
    assert [c.name for c in folder.channels] == ["image", "reference prediction", "prediction", "error"]
    for axis in range(3):
        np.testing.assert_array_equal(folder.slice("error", axis, 7), scene.slice("error", axis, 7))
    assert (
        folder.summary()
        == "viewer: 16×16×16 voxels, mesh 2x2x2, 8 shards; image, reference prediction, prediction, error"
    )


def test_viewer_of_a_run_and_its_reference(run):
    v = viewer(run.result, reference=run.reference, image=run.loaded.image)
    stats = shard_stats(run.signed_error(), run.layout)
    assert [s["max_abs_diff"] for s in v.scene.shards] == [r["max_abs_diff"] for r in stats]
    assert v.scene.halo_width == 0  # zero halo: nothing received, no band
    with pytest.raises(UserError, match="keep_error=True"):
        viewer(run.comparison)


def test_the_panel_view_button_opens_the_viewer_below_the_panel():
    from workbench.ui.panel import WorkbenchPanel

    panel = WorkbenchPanel("phantom:16", mesh="2x2x2", estimate="off")
    with pytest.raises(UserError, match="no result yet"):
        viewer(panel)
    panel.view_button.click()
    assert panel.error is None
    v = panel.notebook_viewer
    assert isinstance(v, SliceViewer) and v.scene.shape == (16, 16, 16)
    assert [s["box"] for s in v.scene.shards] == [[list(b) for b in s.valid_box] for s in panel.result.layout.shards()]
    assert panel.status.value.startswith("viewer: 16×16×16 voxels, mesh 2x2x2, 8 shards")
    assert v.scene.halo_width == 1 and v.visible["halo band"] is False
