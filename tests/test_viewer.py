"""napari layer builders, result folders and `workbench view` errors, without Qt or a display."""

import json
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.analysis.compare import shard_stats, signed_error
from workbench.analysis.receptive import halo_width
from workbench.app import load_result
from workbench.cli import main
from workbench.mesh import ACTIVATION_SPEC, ShardLayout, build_mesh, parse_mesh
from workbench.model.halo import halo_pad
from workbench.ui.napari import layers as viewer


def _edges(path):
    """Unordered set of segments of a path, rounded (for comparing wireframes)."""
    return {tuple(sorted((tuple(a), tuple(b)))) for a, b in zip(path[:-1], path[1:])}


# -- boundaries -----------------------------------------------------------------------
def test_module_imports_no_qt_or_napari():
    import subprocess

    code = "import workbench.ui.napari.layers, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('napari', 'PyQt6', 'qtpy', 'jax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("shape, mesh, multiple", [((32, 32, 32), "2x2x2", 1), ((37, 53, 45), "1x2x4", 4)])
def test_boundary_paths_match_layout(shape, mesh, multiple):
    layout = ShardLayout(shape, mesh, multiple=multiple)
    paths, kwargs, kind = viewer.boundary_layer(layout, spacing=(2.0, 1.0, 0.5))
    shards = layout.shards()
    assert kind == "shapes" and kwargs["shape_type"] == "path" and len(paths) == len(shards)
    assert kwargs["scale"] == (2.0, 1.0, 0.5)
    feats = kwargs["features"]
    assert feats["index"] == [s.index for s in shards]
    assert [(z, y, x) for z, y, x in zip(feats["coord_z"], feats["coord_y"], feats["coord_x"])] == [
        s.coords for s in shards
    ]
    assert (
        feats["label"][-1]
        == f"{shards[-1].index} (z{shards[-1].coords[0]} y{shards[-1].coords[1]} x{shards[-1].coords[2]})"
    )
    segments = viewer.boundary_segments(layout)
    for shard, path in zip(shards, paths):
        assert path.shape == (16, 3)
        lo = [b[0] - 0.5 for b in shard.valid_box]
        hi = [b[1] - 0.5 for b in shard.valid_box]
        np.testing.assert_array_equal(path.min(0), lo)
        np.testing.assert_array_equal(path.max(0), hi)
        # the path walks exactly the 12 edges of the box, nothing else
        assert _edges(path) == {tuple(sorted(map(tuple, e))) for e in segments[shard.index]}
        assert len(_edges(path)) == 12
    colors = np.asarray(kwargs["edge_color"])
    assert colors.shape == (len(shards), 4) and len({tuple(c) for c in colors.round(3)}) == len(shards)
    assert kwargs["metadata"]["mesh"] == parse_mesh(mesh).as_dict() and kwargs["metadata"]["empty_shards"] == []


def test_shards_of_padding_only_are_left_out():
    layout = ShardLayout((5, 24, 24), "4x1x1", multiple=4)  # blocks of 4 along z: shards 2, 3 hold padding
    paths, kwargs, _ = viewer.boundary_layer(layout)
    assert len(paths) == 2 and kwargs["features"]["index"] == [0, 1]
    assert kwargs["metadata"]["empty_shards"] == [2, 3]
    np.testing.assert_array_equal(paths[1].max(0), [4.5, 23.5, 23.5])


def test_contour_layer_is_shard_ids():
    layout = ShardLayout((20, 24, 28), "2x1x2")
    data, kwargs, kind = viewer.contour_layer(layout, spacing=(1.5, 1, 1))
    assert kind == "labels" and kwargs["metadata"]["contour"] == 1
    np.testing.assert_array_equal(data, layout.shard_ids() + 1)
    assert kwargs["features"]["shard"] == [-1, 0, 1, 2, 3]
    assert kwargs["colormap"][3] == viewer.shard_colors(4)[2].tolist()


def test_large_volume_layers_are_lazy_or_views():
    """512³: computed maps are dask (evaluated per slice), images are strided views."""
    layout = ShardLayout((512, 512, 512), "2x2x2")
    levels, kwargs, _ = viewer.contour_layer(layout)
    assert kwargs["multiscale"] and [lv.shape for lv in levels] == [(512,) * 3, (256,) * 3]
    data = levels[0]
    assert type(data).__module__.startswith("dask")
    np.testing.assert_array_equal(np.asarray(levels[1][150]), layout.shard_ids()[300, ::2, ::2] + 1)
    np.testing.assert_array_equal(np.asarray(data[300]), layout.shard_ids()[300] + 1)
    (band, _), _, _ = viewer.halo_band_layer(layout, 1)
    assert type(band).__module__.startswith("dask")
    assert set(np.unique(np.asarray(band[100]))) == {0, 1, 2, 3, 4}  # far from the z seam: sent within z layer 0
    image = np.broadcast_to(np.float32(1.0), (512, 512, 512))  # no memory behind it
    levels, kwargs, _ = viewer.image_layer(image)
    assert kwargs["multiscale"] and [lv.shape for lv in levels] == [(512,) * 3, (256,) * 3]
    assert all(np.shares_memory(lv, image) for lv in levels)


def test_image_layer_contrast_and_scale():
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (32, 32, 32)).astype(np.float32)
    data, kwargs, kind = viewer.image_layer(image, spacing=(3, 1, 1))
    assert kind == "image" and data is image and kwargs["scale"] == (3.0, 1.0, 1.0)
    np.testing.assert_allclose(kwargs["contrast_limits"], np.percentile(image, [0.5, 99.5]), rtol=1e-6)
    with pytest.raises(ValueError, match=r"image has 2 dimensions \(4, 4\), expected 3 \(Z, Y, X\)"):
        viewer.image_layer(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing=.* must be 3 positive numbers"):
        viewer.image_layer(image, spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="dtype float32, expected integers"):
        viewer.labels_layer(image)


def test_probabilities_are_softmax():
    logits = np.random.default_rng(1).normal(size=(8, 8, 8, 3)).astype(np.float32)
    layers = viewer.probability_layers(logits, class_names=["bg", "liver", "vessel"])
    assert [k["name"] for _, k, _ in layers] == ["p(liver)", "p(vessel)"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(layers[1][0], (e / e.sum(-1, keepdims=True))[..., 2], rtol=1e-6, atol=1e-7)


# -- halo bands -----------------------------------------------------------------------
def test_halo_width_per_mode():
    model = {"depth": 3, "base_filters": 8, "convs_per_block": 2}
    assert halo_width("exact") == 1
    assert [halo_width(m) for m in ("zero", "reflect", "replicate", "0", 0)] == [0] * 5
    assert halo_width("8") == 8
    from workbench.execute.run import overlap_width
    from workbench.model.unet import UNetConfig

    assert halo_width("overlap", model=model) == overlap_width(UNetConfig(**model)) == 24
    # from the layer spec: the paper U-Net's 3×3×3 convs and an nnU-Net network's (report["model"])
    assert halo_width("exact", model=model) == 1
    from workbench.model.spec import NetworkSpec

    nnunet = NetworkSpec.plain(in_channels=1, num_outputs=2, kernels=[(1, 3, 3), 3], strides=[1, (1, 2, 2)],
                               features=[2, 4], blocks=[1, 1]).describe()  # fmt: skip
    assert halo_width("exact", model=nnunet) == 1
    with pytest.raises(ValueError, match="not available for nnU-Net networks"):
        halo_width("overlap", model=nnunet)
    with pytest.raises(ValueError, match="halo 'overlap' needs the model config"):
        halo_width("overlap")
    with pytest.raises(ValueError, match="unknown halo mode 'wide'"):
        halo_width("wide")


def test_halo_band_counts_and_receivers():
    layout = ShardLayout((32, 32, 32), "2x2x2")
    band = viewer.halo_band(layout, 1)
    assert int((band > 0).sum()) == 32**3 - 30**3  # slabs z,y,x in {15, 16}
    assert band[15, 5, 5] == 4 + 1  # shard 0's voxel at the z seam goes to shard (1,0,0) = 4
    assert band[16, 5, 20] == 1 + 1  # shard (1,0,1)=5 sends to (0,0,1)=1
    assert band[14, 5, 5] == 0
    shell = viewer.halo_band(layout, 2, shard=0)
    assert int((shell > 0).sum()) == 18**3 - 16**3 and set(np.unique(shell)) == {0, 1}
    assert shell[17, 0, 0] == 1 and shell[18, 0, 0] == 0 and shell[15, 15, 15] == 0
    with pytest.raises(ValueError, match="halo band width 0 must be an integer >= 1"):
        viewer.halo_band(layout, 0)
    with pytest.raises(ValueError, match="shard=8 is not a shard of mesh 2x2x2; use 0..7"):
        viewer.halo_band(layout, 1, shard=8)


@pytest.mark.parametrize("width", [1, 3])
def test_halo_shell_is_what_exact_exchange_delivers(width):
    """Run the real exchange on voxel ids: each shard's received voxels are its shell."""
    shape, spec = (12, 16, 8), parse_mesh("2x2x2")
    layout = ShardLayout(shape, spec)
    ids = (np.arange(np.prod(shape), dtype=np.float32) + 1).reshape(1, *shape, 1)
    mesh = build_mesh(spec)
    act = P(*ACTIVATION_SPEC)
    fn = jax.jit(
        jax.shard_map(
            lambda x: halo_pad(x, width=width, mesh_shape=spec.spatial, mode="exact"),
            mesh=mesh,
            in_specs=act,
            out_specs=act,
        )
    )
    out = np.asarray(fn(jax.device_put(ids, NamedSharding(mesh, act))))
    grown = [b + 2 * width for b in layout.block_shape]
    for shard in layout.shards():
        block = out[(0, *(slice(c * g, (c + 1) * g) for c, g in zip(shard.coords, grown)), 0)]
        got = set(block.ravel().astype(np.int64)) - {0}
        own = set(ids[0, ..., 0][tuple(slice(lo, hi) for lo, hi in shard.box)].ravel().astype(np.int64))
        shell = viewer.halo_band(layout, width, shard=shard.index) > 0
        assert got - own == set(ids[0, ..., 0][shell].astype(np.int64)), f"shard {shard.index}"


# -- error maps -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def seam_run(small_model):
    """32³ phantom, halo 'zero' (seam artifacts) vs the reference, small model."""
    from data_tools.io import load_input
    from workbench.execute.run import run
    from workbench.training.data import model_input as image_for_model

    model = small_model
    image = image_for_model(load_input("phantom:32"))
    out = run(model, image, "2x2x2", halo="zero").output
    ref = run(model, image, backend="reference").output
    return out, ref, ShardLayout(image.shape, "2x2x2", multiple=model.config.multiple)


def test_signed_error_and_layers(seam_run):
    out, ref, layout = seam_run
    signed = signed_error(out, ref)
    diff = out - ref
    np.testing.assert_array_equal(np.abs(signed), np.abs(diff).max(-1))
    k = np.abs(diff).argmax(-1)
    np.testing.assert_array_equal(signed, np.take_along_axis(diff, k[..., None], -1)[..., 0])
    (sdata, skw, _), (adata, akw, _) = viewer.error_layers(signed, layout, spacing=(2, 2, 2))
    worst = float(np.abs(diff).max())
    assert worst > 1e-3  # zero-padded seams really differ
    assert skw["contrast_limits"] == [-worst, worst] and akw["contrast_limits"] == [0.0, worst]
    assert akw["rendering"] == "mip" and skw["colormap"] == "berlin"
    np.testing.assert_array_equal(adata, np.abs(signed))
    meta = akw["metadata"]
    assert set(meta) >= {"max_abs_diff", "per_shard", "seam_profile", "tolerance", "mesh", "definition"}
    for row in meta["per_shard"]:
        box = tuple(slice(lo, hi) for lo, hi in row["box"])
        e = np.abs(diff[box]).max(-1)
        assert row["max_abs_diff"] == pytest.approx(float(e.max()), rel=1e-6)
        assert row["mean_abs_diff"] == pytest.approx(float(e.mean()), rel=1e-5)
        assert row["voxels_over_tolerance"] == int((e > 1e-5).sum())
    # seam profile: the error lives at the seam (distance 0) and decays away from it
    prof = meta["seam_profile"]
    assert prof["distance"][0] == 0 and prof["max"][0] == pytest.approx(worst, rel=1e-6)
    assert prof["max"][-1] < prof["max"][0]


def test_error_stats_exact_run_and_mismatch():
    layout = ShardLayout((16, 16, 16), "2x2x2")
    signed = np.zeros((16, 16, 16), np.float32)
    signed[7, 3, 3] = -0.25  # shard 0, touching the z seam
    layers = viewer.error_layers(signed, layout)
    meta = layers[1][1]["metadata"]
    assert [r["max_abs_diff"] for r in meta["per_shard"]] == [0.25] + [0.0] * 7
    assert meta["seam_profile"]["max"][0] == 0.25 and meta["seam_profile"]["distance"][:2] == [0, 1]
    zero = viewer.error_layers(np.zeros_like(signed), layout)
    assert zero[0][1]["contrast_limits"] == [-1e-5, 1e-5]
    with pytest.raises(ValueError, match=r"output shape \(2, 2, 2, 3\) does not match reference shape \(2, 2, 2, 2\)"):
        signed_error(np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"error map has shape \(8, 16, 16\) but the volume is \(16, 16, 16\)"):
        viewer.error_layers(signed[:8], layout)


# -- result folders -------------------------------------------------------------------
@pytest.fixture(scope="module")
def result_dir(tmp_path_factory):
    """`workbench infer phantom:32 --reference` (the real command)."""
    out = tmp_path_factory.mktemp("res") / "run"
    assert main(["infer", "phantom:32", "--mesh", "2x2x2", "--halo", "zero", "--reference", "--out", str(out)]) == 0
    return out


def test_infer_reference_writes_what_the_reader_needs(result_dir):
    names = sorted(p.name for p in result_dir.iterdir())
    assert names == ["error.npy", "image.npy", "prediction.npy", "reference_prediction.npy", "report.json"]
    result = load_result(result_dir)
    report = json.loads((result_dir / "report.json").read_text())
    assert result.spacing == tuple(report["spacing"]) and result.halo_band_width == 0
    assert result.class_names == report["class_names"]
    stats = shard_stats(result.signed, result.layout)
    assert [r["max_abs_diff"] for r in stats] == [r["max_abs_diff"] for r in report["per_shard"]]
    assert float(np.abs(result.signed).max()) == report["max_abs_diff"]
    layers = viewer.result_layers(result)
    names = [k["name"] for _, k, _ in layers]
    assert names == [
        "image",
        "reference prediction",
        "prediction",
        "error (partitioned − reference)",
        "|error|",
        "shard contours",
        "shard boundaries",
    ]  # halo zero: no band
    assert all(k["scale"] == result.spacing for _, k, _ in layers)
    assert isinstance(result.prediction, np.memmap)  # not loaded into memory


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_result_folders(result_dir, tmp_path):
    with pytest.raises(ValueError, match="report.json: is missing; pass the --out folder"):
        load_result(tmp_path)
    bad = _copy(result_dir, tmp_path / "a")
    (bad / "prediction.npy").unlink()
    with pytest.raises(ValueError, match=r"prediction.npy: is missing \(report.json names it\)"):
        load_result(bad)
    bad = _copy(result_dir, tmp_path / "b")
    np.save(bad / "prediction.npy", np.zeros((32, 32, 30), np.uint8))
    with pytest.raises(
        ValueError, match=r"prediction.npy: has shape \(32, 32, 30\) but report.json says the volume is \(32, 32, 32\)"
    ):
        load_result(bad)
    bad = _copy(result_dir, tmp_path / "c")
    np.save(bad / "image.npy", np.zeros((16, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"image.npy: has shape \(16, 32, 32\)"):
        load_result(bad)
    bad = _copy(result_dir, tmp_path / "d")
    np.save(bad / "error.npy", np.zeros((32, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"error.npy: gives max \|Δ\| 0 in shard 0 but report.json says"):
        load_result(bad)
    bad = _copy(result_dir, tmp_path / "e")
    report = json.loads((bad / "report.json").read_text())
    report["mesh"] = {"data": 1, "z": 1, "y": 2, "x": 4}
    (bad / "report.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="per_shard boxes do not match mesh 1x2x4"):
        load_result(bad)
    (bad / "report.json").write_text("{not json")
    with pytest.raises(ValueError, match="report.json: is not valid JSON"):
        load_result(bad)


def test_view_cli_errors(result_dir, tmp_path, capsys, monkeypatch):
    bad = _copy(result_dir, tmp_path / "a")
    np.save(bad / "prediction.npy", np.zeros((8, 8, 8), np.uint8))
    assert main(["view", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "prediction.npy: has shape (8, 8, 8)" in err[0] and err[0].startswith("workbench: error:")
    assert main(["view", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: is not a result folder" in capsys.readouterr().err
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main(["view", str(result_dir), "--screenshot", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "workbench: error: cannot open napari: no display (DISPLAY is unset); run under xvfb-run or on a desktop"
    ]
    assert not (tmp_path / "v.png").exists()


def test_demo_view_falls_back_to_matplotlib_without_display(tmp_path, monkeypatch):
    from workbench.cli.demo import save_view

    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    layout = ShardLayout((16, 16, 16), "2x2x2")
    image = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    view = save_view(tmp_path / "view.png", image, np.zeros((16, 16, 16), np.uint8), np.abs(image),
                     image, layout, (1.0, 1.0, 1.0))  # fmt: skip
    assert view == {
        "file": "view.png",
        "kind": "matplotlib",
        "reason": "no display (DISPLAY is unset); run under xvfb-run or on a desktop",
    }
    assert (tmp_path / "view.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
