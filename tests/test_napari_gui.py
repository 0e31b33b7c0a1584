"""napari plugin under a real (virtual) display: rendering, dock widget, reader, samples.

Run under ``xvfb-run -a -s "-screen 0 1280x1024x24"`` (``make test`` does): a hidden
viewer renders black and ``QT_QPA_PLATFORM=offscreen`` crashes on image layers.
"""

import colorsys
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from workbench.cli import main
from workbench.mesh import ShardLayout
from workbench.ui.napari import layers as V
from workbench.ui.napari import view as napari_view

pytestmark = pytest.mark.skipif(
    not napari_view.display_available()[0],
    reason=f"needs a display: {napari_view.display_available()[1]} (make test runs xvfb-run)",
)
PLUGIN = "partitioned-unet-workbench"


def _colored(shot: np.ndarray, min_saturation: int = 80) -> np.ndarray:
    """Pixels of a saturated colour: the shard wireframes (the image is grey, the background black)."""
    rgb = shot[..., :3].astype(np.int32)
    return rgb.max(-1) - rgb.min(-1) > min_saturation


def _project(viewer, layer, points_zyx: np.ndarray) -> np.ndarray:
    """Canvas pixel (row, col) of data points of ``layer``, through vispy's own transform."""
    visual = viewer.window._qt_viewer.canvas.layer_to_visual[layer]
    mapped = visual.node.get_transform("visual", "canvas").map(points_zyx[:, ::-1])
    xy = mapped[:, :2] / mapped[:, 3:4]
    return xy[:, ::-1]


def _errors(records_before: int) -> list[str]:
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [str(n.message) for n in notification_manager.records[records_before:]
            if n.severity == NotificationSeverity.ERROR]  # fmt: skip


def _n_records() -> int:
    from napari.utils.notifications import notification_manager

    return len(notification_manager.records)


def test_manifest_validates():
    npe2 = Path(sys.executable).with_name("npe2")
    out = subprocess.run([str(npe2), "validate", PLUGIN], capture_output=True, text=True)
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr


def test_screenshot_shows_boundaries_where_they_project(make_napari_viewer):
    """3D oblique view: saturated pixels lie on the projected shard edges, cover them, and
    each shard's outer edges have that shard's colour."""
    viewer = make_napari_viewer(show=True)
    shape, spacing = (32, 40, 48), (2.0, 1.0, 1.0)
    layout = ShardLayout(shape, "2x2x2")
    image = np.random.default_rng(0).uniform(0.2, 0.6, shape).astype(np.float32)
    img, shapes = napari_view.add_layers(
        viewer, [V.image_layer(image, spacing=spacing), V.boundary_layer(layout, spacing=spacing)]
    )
    napari_view.show_view(viewer, ndisplay=3)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    h, w = shot.shape[:2]
    colored = _colored(shot)

    # Project every box edge through the *image* layer's transform (voxel faces at lo - 0.5).
    t = np.linspace(0, 1, 400)[:, None]
    expected = np.zeros((h, w), bool)
    for edges in V.boundary_segments(layout).values():
        for a, b in edges:
            rc = np.rint(_project(viewer, img, a + t * (b - a))).astype(int)
            inside = (rc[:, 0] >= 0) & (rc[:, 0] < h) & (rc[:, 1] >= 0) & (rc[:, 1] < w)
            assert inside.all(), "the fitted view must show the whole volume"
            expected[rc[:, 0], rc[:, 1]] = True
    to_expected = ndimage.distance_transform_edt(~expected)
    to_colored = ndimage.distance_transform_edt(~colored)
    assert colored.sum() > 1000
    assert to_expected[colored].max() <= 4.0, "boundary colour found away from every shard edge"
    assert np.mean(to_colored[expected] <= 2.0) > 0.97, "projected shard edges are not drawn"

    # One colour per shard: sample the edges that lie on the volume's own edges.
    colors = V.shard_colors(8)
    hsv = np.array([colorsys.rgb_to_hsv(*px) for px in shot[..., :3].reshape(-1, 3) / 255.0]).reshape(h, w, 3)
    for shard in layout.shards():
        want = colorsys.rgb_to_hsv(*colors[shard.index][:3])[0]
        votes = []
        for a, b in V.boundary_segments(layout)[shard.index]:
            on_hull = (
                sum(a[i] == b[i] and a[i] in (-0.5, shape[i] - 0.5) for i in range(3)) == 2
            )  # both fixed coordinates on the volume's faces
            if not on_hull:
                continue
            for f in (0.3, 0.4, 0.5, 0.6, 0.7):
                r, c = np.rint(_project(viewer, img, (a + f * (b - a))[None])[0]).astype(int)
                window = (slice(r - 1, r + 2), slice(c - 1, c + 2))
                if colored[window].any():
                    hue = hsv[window][colored[window]][:, 0]
                    votes.append(np.min(np.abs(((hue - want) + 0.5) % 1.0 - 0.5)) < 0.04)
        assert len(votes) >= 10 and np.mean(votes) > 0.8, f"shard {shard.index}: colour votes {votes}"


@pytest.fixture(scope="module")
def phantom32():
    from data_tools.io import load_input

    return load_input("phantom:32")


def test_dock_widget_runs_inference_and_adds_layers(make_napari_viewer, phantom32):
    viewer = make_napari_viewer(show=True)
    viewer.add_image(phantom32.array, scale=phantom32.spacing, name="phantom")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Partitioned inference")
    assert widget.image.value is viewer.layers["phantom"]
    assert "2x2x2" in widget.mesh.choices and "1x2x4" in widget.mesh.choices
    widget.mesh.value, widget.backend.value, widget.halo.value, widget.reference.value = (
        "2x2x2",
        "explicit",
        "exact",
        True,
    )
    added = widget.run()
    names = [layer.name for layer in added]
    probabilities = [f"p(class {k})" for k in range(1, widget.model().config.num_classes)]
    assert names == ["reference prediction", "prediction", *probabilities, "error (partitioned − reference)",
                     "|error|", "halo band (1 voxel)", "shard contours", "shard boundaries"]  # fmt: skip
    report = widget.last_report
    assert report["mesh"] == {"data": 1, "z": 2, "y": 2, "x": 2} and report["halo"] == "exact"
    err = viewer.layers["|error|"]
    assert err.metadata["max_abs_diff"] == pytest.approx(report["max_abs_diff"], rel=1e-6)
    assert report["max_abs_diff"] < 1e-4  # exact halos: partitioned == reference
    assert [r["max_abs_diff"] for r in err.metadata["per_shard"]] == pytest.approx(
        [r["max_abs_diff"] for r in report["per_shard"]], rel=1e-6
    )
    pred = viewer.layers["prediction"]
    assert pred.data.shape == (32, 32, 32) and tuple(pred.scale) == phantom32.spacing
    assert np.mean(pred.data != viewer.layers["reference prediction"].data) == report["argmax_disagreement"]
    assert len(viewer.layers["shard boundaries"].data) == 8 and viewer.layers["shard contours"].contour == 1

    # Re-running replaces its layers and drops those the new run does not produce.
    widget.reference.value = False
    again = widget.run()
    assert [layer.name for layer in viewer.layers] == ["phantom"] + [
        n for n in names if "reference" not in n and "error" not in n
    ]
    assert all(layer in viewer.layers for layer in again)


def test_dock_widget_bad_input_notifies(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Partitioned inference")
    before = _n_records()
    assert widget.run() is None
    assert _errors(before) == ["partitioned inference: no image layer selected; open or add a 3-D image layer first"]
    viewer.add_image(np.zeros((16, 16), np.float32), name="flat")
    assert widget.image.value is viewer.layers["flat"]
    before = _n_records()
    assert widget.run() is None and len(viewer.layers) == 1
    assert _errors(before) == ["partitioned inference: image layer 'flat' has 2 dimensions (16, 16); partitioned "
                               "inference needs a 3-D (Z, Y, X) volume, so pick a 3-D image layer"]  # fmt: skip
    viewer.add_image(np.zeros((16, 16, 16), np.float32), name="cube")
    widget.backend.value, widget.halo.value = "gspmd", "zero"
    before = _n_records()
    assert widget.run() is None and len(viewer.layers) == 2
    assert "only available with the explicit backend" in _errors(before)[0]


def test_dock_widget_runs_a_plans_network(make_napari_viewer, phantom32, tmp_path):
    """The model box picks a plans file; its network runs partitioned, exact against the reference."""
    from workbench.analysis.nnunet_memory import spec_plans
    from workbench.model.spec import NetworkSpec

    spec = NetworkSpec.plain(in_channels=1, num_outputs=3, kernels=[(1, 3, 3), (3, 3, 3)],
                             strides=[(1, 1, 1), (1, 2, 2)], features=[4, 8], blocks=[1, 1])  # fmt: skip
    plans = tmp_path / "plans.json"
    plans.write_text(json.dumps(spec_plans(spec)))
    viewer = make_napari_viewer(show=True)
    viewer.add_image(phantom32.array, scale=phantom32.spacing, name="phantom")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Partitioned inference")
    assert widget.network.choices == ("small", "paper", "plans file") and widget.plans.native.isHidden()
    widget.network.value = "plans file"
    assert not widget.plans.native.isHidden()  # the plans box shows only for "plans file"
    before = _n_records()
    widget.plans.value = tmp_path / "missing.json"
    assert widget.run() is None and "is neither a preset" in _errors(before)[0]
    widget.plans.value = plans
    widget.mesh.value, widget.halo.value, widget.reference.value = "1x2x4", "exact", True
    added = widget.run()
    assert added is not None, widget.status.value
    report = widget.last_report
    assert report["mesh"] == {"data": 1, "z": 1, "y": 2, "x": 4} and report["plans"] == str(plans.resolve())
    assert report["max_abs_diff"] <= 1e-4 * max(1.0, report["reference_scale"]) and report["argmax_disagreement"] == 0
    assert viewer.layers["prediction"].data.shape == (32, 32, 32)
    assert viewer.layers["halo band (1 voxel)"] is not None  # the spec's widest layer halo: 1 voxel
    widget.halo.value = "zero"
    before = _n_records()
    assert widget.run() is None and "exact halos only" in _errors(before)[0]


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gui") / "run"
    assert main(["infer", "phantom:32", "--mesh", "2x2x2", "--reference", "--out", str(out)]) == 0
    return out


def test_reader_opens_result_folder(make_napari_viewer, result_dir, tmp_path):
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(result_dir), plugin=PLUGIN)
    assert [layer.name for layer in layers] == [
        "image", "reference prediction", "prediction", "error (partitioned − reference)", "|error|",
        "halo band (1 voxel)", "shard contours", "shard boundaries"]  # fmt: skip
    report = json.loads((result_dir / "report.json").read_text())
    assert viewer.layers["|error|"].metadata["max_abs_diff"] == report["max_abs_diff"]
    assert tuple(viewer.layers["image"].scale) == tuple(report["spacing"])
    assert viewer.layers["shard contours"].contour == 1

    bad = tmp_path / "bad"
    shutil.copytree(result_dir, bad)
    np.save(bad / "reference_prediction.npy", np.zeros((32, 32, 31), np.uint8))
    before, n = _n_records(), len(viewer.layers)
    assert viewer.open(str(bad), plugin=PLUGIN) == []
    assert len(viewer.layers) == n
    (message,) = _errors(before)
    assert (
        message.startswith("cannot open result folder: ")
        and "reference_prediction.npy: has shape (32, 32, 31)" in message
    )


def test_reader_opens_an_nnunet_result_with_channels_and_regions(make_napari_viewer, nnunet_view_result):
    """A 2-channel region model's result folder: one image layer per channel (the first shown),
    one hidden labels layer per region, all valid napari layers."""
    _, out = nnunet_view_result
    viewer = make_napari_viewer(show=True)
    layers = viewer.open(str(out), plugin=PLUGIN)
    names = [layer.name for layer in layers]
    assert names[:6] == ["image: T2", "image: ADC", "reference prediction", "prediction", "region: whole",
                         "region: core"]  # fmt: skip
    assert viewer.layers["image: T2"].visible and not viewer.layers["image: ADC"].visible
    prediction = np.asarray(viewer.layers["prediction"].data)
    np.testing.assert_array_equal(viewer.layers["region: core"].data, (prediction == 2).astype(np.uint8))
    assert viewer.layers["image: ADC"].contrast_limits != viewer.layers["image: T2"].contrast_limits


def test_view_screenshot_and_demo_view(result_dir, tmp_path):
    """`workbench view DIR --screenshot` and the demo's view step write a napari PNG with wireframes."""
    from PIL import Image

    png = tmp_path / "view.png"
    # A fresh process, as a user runs it: in this process earlier tests' viewers have
    # already registered the plugin's commands with npe2's global registry.
    proc = subprocess.run(
        [sys.executable, "-m", "workbench", "view", str(result_dir), "--screenshot", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    shot = np.asarray(Image.open(png))
    assert shot.shape[:2] == (720, 720) and _colored(shot).sum() > 1000

    # The demo's view step, also in a fresh process (as `workbench demo` runs it).
    script = (
        "import json, sys, numpy as np\n"
        "from workbench.app import load_result\n"
        "from workbench.cli.demo import save_view\n"
        "r = load_result(sys.argv[1])\n"
        "view = save_view(__import__('pathlib').Path(sys.argv[2]), np.asarray(r.image), np.asarray(r.prediction),\n"
        "                 np.abs(r.signed), r.signed, r.layout, r.spacing)\n"
        "print(json.dumps(view))\n"
    )
    demo_png = tmp_path / "demo.png"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(result_dir), str(demo_png)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    view = json.loads(proc.stdout.strip().splitlines()[-1])
    assert view == {"file": "demo.png", "kind": "napari", "ndisplay": 3}
    assert _colored(np.asarray(Image.open(demo_png))).sum() > 1000


@pytest.mark.parametrize("key, spec", [("phantom64", "phantom:64"), ("phantom128", "phantom:128"), ("mni", "mni")])
def test_sample_data(make_napari_viewer, key, spec):
    from data_tools.io import load_input

    viewer = make_napari_viewer(show=True)
    viewer.open_sample(PLUGIN, key)
    volume = load_input(spec)
    image, labels = viewer.layers
    np.testing.assert_array_equal(image.data, volume.array)
    np.testing.assert_array_equal(labels.data, volume.labels)
    assert tuple(image.scale) == volume.spacing and tuple(labels.scale) == volume.spacing
    assert list(labels.features["class"]) == list(volume.class_names)
