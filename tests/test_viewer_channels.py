"""Viewers of several input channels and region outputs: the result folder of an nnU-Net model
with two channels and region labels (the fixture's Dataset903_ThickMRI, ``workbench infer
--reference``) read by ``load_result``, turned into napari layers (one per channel, one per
region) and into the notebook viewer's scene (a channel selector, one overlay per region)."""

import json

import numpy as np
import pytest

from data_tools import read_volume
from workbench.app.results import load_result


def write_nnunet_result_folder(tmp):
    """``workbench infer`` of the fixture's 2-channel region model on a 6×24×32 case
    (2x2x2, --reference): (channel files, result folder)."""
    from test_nnunet_infer import RESULTS, _case, _infer, _write_case

    files = _write_case(tmp / "imagesTs", "case_001", _case((6, 24, 32)))
    out = tmp / "out"
    assert _infer([*files, "--checkpoint", RESULTS, "--mesh", "2x2x2", "--out", out, "--reference"]) == 0
    return files, out


@pytest.fixture(scope="module")
def nnunet_result(nnunet_view_result):
    return nnunet_view_result  # conftest's, made once per session


def test_result_folder_holds_every_channel_and_the_regions(nnunet_result):
    files, out = nnunet_result
    report = json.loads((out / "report.json").read_text())
    assert report["channel_names"] == ["T2", "ADC"]
    assert report["regions"] == [["whole", [1, 2]], ["core", [2]]]
    result = load_result(out)
    assert result.image.shape == (6, 24, 32, 2) and result.channel_names == ["T2", "ADC"]
    for (_, channel), path in zip(result.channels(), files):
        np.testing.assert_array_equal(channel, read_volume(path).array)
    assert [n for n, _ in result.channels()] == ["T2", "ADC"]
    assert result.regions == [("whole", (1, 2)), ("core", (2,))]
    masks = dict(result.region_masks())
    prediction = np.asarray(result.prediction)
    np.testing.assert_array_equal(masks["whole"], (prediction >= 1).astype(np.uint8))
    np.testing.assert_array_equal(masks["core"], (prediction == 2).astype(np.uint8))
    assert masks["whole"].sum() > masks["core"].sum() > 0  # both regions present, the core inside
    # the shards are those of the network's grid, here the input's: the boxes are checked
    assert report["network_shape"] == report["input_shape"] and len(result.layout.shards()) == 8


def test_napari_layers_one_per_channel_and_per_region(nnunet_result):
    from workbench.ui.napari.layers import result_layers

    _, out = nnunet_result
    result = load_result(out)
    layers = result_layers(result)
    names = [kwargs["name"] for _, kwargs, _ in layers]
    assert names[:5] == ["image: T2", "image: ADC", "reference prediction", "prediction", "region: whole"]
    assert names[5] == "region: core" and names[-2:] == ["shard contours", "shard boundaries"]
    by_name = {kwargs["name"]: (data, kwargs, kind) for data, kwargs, kind in layers}
    for c, name in enumerate(("T2", "ADC")):
        data, kwargs, kind = by_name[f"image: {name}"]
        assert kind == "image" and kwargs["visible"] == (c == 0)
        np.testing.assert_array_equal(data, result.image[..., c])
    for name, mask in result.region_masks():
        data, kwargs, kind = by_name[f"region: {name}"]
        assert kind == "labels" and kwargs["visible"] is False
        np.testing.assert_array_equal(data, mask)
        assert kwargs["metadata"]["region_values"] == list(dict(result.regions)[name])


def test_notebook_viewer_selects_channels_and_shows_regions(nnunet_result):
    from workbench.ui.notebook_viewer import SliceViewer
    from workbench.ui.notebook_viewer.scene import quantise_image
    from workbench.ui.notebook_viewer.sources import scene_from

    _, out = nnunet_result
    result = load_result(out)
    scene = scene_from(result)
    channels = {c.name: c for c in scene.channels}
    assert [c.name for c in scene.channels][:2] == ["image: T2", "image: ADC"]
    assert channels["image: T2"].visible and not channels["image: ADC"].visible
    assert not channels["region: whole"].visible and channels["region: core"].extra["region"] == [2]
    adc = result.image[..., 1]
    np.testing.assert_array_equal(scene.slice("image: ADC", 0, 3),
                                  quantise_image(adc[3], channels["image: ADC"].limits))  # fmt: skip
    assert channels["image: ADC"].limits != channels["image: T2"].limits  # each channel its own contrast
    viewer = SliceViewer(scene)
    header, buffers = viewer.slice_message(1, 10, channels=["region: whole", "region: core"])
    import zlib

    planes = {n: np.frombuffer(zlib.decompress(b), np.uint8).reshape(header["rows"], header["cols"])
              for n, b in zip(header["channels"], buffers)}  # fmt: skip
    prediction = np.asarray(result.prediction)
    np.testing.assert_array_equal(planes["region: whole"], np.isin(prediction[:, 10], (1, 2)))
    np.testing.assert_array_equal(planes["region: core"], prediction[:, 10] == 2)
    manifest = {c["name"]: c for c in viewer.manifest["channels"]}
    assert manifest["region: whole"]["region"] == [1, 2] and manifest["region: whole"]["lut"][4 * 1 + 3] == 255


def test_one_channel_results_keep_their_single_image_layer(tmp_path):
    """A (Z, Y, X) image stays one layer named "image" (napari) and one channel "image"
    (notebook); a (Z, Y, X, C) image with the wrong number of names is one user error."""
    from workbench.errors import UserError
    from workbench.mesh import ShardLayout
    from workbench.ui.napari.layers import build_layers
    from workbench.ui.notebook_viewer.scene import Scene

    layout = ShardLayout((8, 12, 10), "2x1x1")
    image = np.random.default_rng(0).normal(size=(8, 12, 10)).astype(np.float32)
    assert build_layers(layout, image=image)[0][1]["name"] == "image"
    assert Scene(layout, image=image).channels[0].name == "image"
    stack = np.stack([image, 2 * image], axis=-1)
    assert [k["name"] for _, k, _ in build_layers(layout, image=stack)[:2]] == ["image: channel 0", "image: channel 1"]
    with pytest.raises(UserError, match="2 channels but 3 channel names"):
        build_layers(layout, image=stack, channel_names=["a", "b", "c"])
    with pytest.raises(UserError, match="2 channels but 1 channel names"):
        Scene(layout, image=stack, channel_names=["a"])
