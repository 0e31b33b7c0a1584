"""Reference comparison, seam profile and the receptive-field prediction of artifacts."""

import numpy as np
import pytest

from workbench.analysis.compare import artifact_depth, compare, seam_distance, seam_profile_table
from workbench.analysis.figures import plot_seam_profile
from workbench.analysis.receptive import predicted_artifact_depth, receptive_field
from workbench.execute.run import apply, overlap_width
from workbench.mesh import ShardLayout
from workbench.model.unet import UNetConfig

TOL = 1e-4  # partitioned vs reference agree to ~1e-6 where no halo is wrong


def test_receptive_field_of_the_presets():
    small = receptive_field(UNetConfig.preset("small"))
    assert (small["radius"], small["overlap_width"], small["seam_depth"]) == (23, 24, 22)
    names = [row["name"] for row in small["layers"]]
    assert names[:2] == ["down0/conv0", "down0/conv1"] and names[-1] == "dec0/conv1"
    assert len(names) == 10
    # radius grows layer by layer and the last conv's is the network's (the head is 1x1x1)
    radii = [row["radius"] for row in small["layers"]]
    assert radii == [1, 2, 4, 6, 10, 14, 18, 20, 22, 23]
    assert [row["halo_level0"] for row in small["layers"]] == [1, 1, 2, 2, 4, 4, 2, 2, 1, 1]
    paper = receptive_field(UNetConfig.preset("paper"))
    assert (paper["radius"], paper["overlap_width"], paper["seam_depth"]) == (51, 56, 46)
    assert paper["layers"][-1]["radius"] == max(UNetConfig.preset("paper").spec().receptive_radius()) == 51
    one_level = receptive_field(UNetConfig.preset("small", depth=1))
    assert (one_level["radius"], one_level["seam_depth"]) == (2, 2)  # two 3x3x3 convs


def test_predicted_depth_per_mode():
    cfg = UNetConfig.preset("small")
    assert overlap_width(cfg) == 24
    assert [predicted_artifact_depth(cfg, h) for h in ("exact", "overlap", "zero", "reflect", "replicate", 0)] == [
        0,
        0,
        22,
        22,
        22,
        22,
    ]
    assert [predicted_artifact_depth(cfg, w) for w in (4, 8, 16, 24)] == [18, 14, 6, 0]
    with pytest.raises(ValueError, match="unknown halo mode 'mirror'"):
        predicted_artifact_depth(cfg, "mirror")


def test_seam_distance_by_hand():
    layout = ShardLayout((8, 8, 4), "2x2x1")  # blocks 4x4x4: seams before z=4 and y=4
    d = seam_distance(layout)
    assert d.shape == (8, 8, 4)
    assert d[0, 0, 0] == 3 and d[3, 4, 0] == 0 and d[5, 1, 2] == 1 and d[7, 7, 3] == 3
    np.testing.assert_array_equal(seam_distance(layout, ((2, 6), (3, 5), (0, 4))), d[2:6, 3:5, 0:4])


def test_compare_counts_by_hand():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 6, 6, 3)).astype(np.float32)
    out = ref.copy()
    out[3, 2, 2, 0] += 5.0  # touches the seam between z=3 and z=4 (shard 0)
    out[6, 1, 1, :] += 0.5  # two voxels from the seam (shard 1)
    layout = ShardLayout((8, 6, 6), "2x1x1")
    c = compare(out, ref, layout)
    assert c.max_abs_diff == pytest.approx(5.0)
    assert c.mean_abs_diff == pytest.approx(5.5 / 288)
    assert [r["max_abs_diff"] for r in c.per_shard] == pytest.approx([5.0, 0.5])
    assert [r["voxels_over_tolerance"] for r in c.per_shard] == [1, 1]
    assert c.error.shape == (8, 6, 6) and c.error[3, 2, 2] == pytest.approx(5.0)
    prof = c.profile
    assert list(prof["distance"]) == [0, 1, 2, 3]
    assert list(prof["count"]) == [72, 72, 72, 72]
    assert prof["max"][0] == pytest.approx(5.0) and prof["max"][2] == pytest.approx(0.5)
    assert prof["max"][1] == 0 and prof["max"][3] == 0
    assert artifact_depth(prof) == 3
    changed = int(out[3, 2, 2].argmax() != ref[3, 2, 2].argmax()) + int(out[6, 1, 1].argmax() != ref[6, 1, 1].argmax())
    assert c.argmax_disagreement == pytest.approx(changed / 288)
    a, b = out.argmax(-1), ref.argmax(-1)
    for k in range(3):
        expect = 2 * np.sum((a == k) & (b == k)) / (np.sum(a == k) + np.sum(b == k))
        assert c.dice[k] == pytest.approx(expect)
    assert "distance" in seam_profile_table(prof) and len(seam_profile_table(prof).splitlines()) == 5


def test_compare_shard_by_shard_on_memmaps(tmp_path):
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((1, 12, 8, 8, 2)).astype(np.float32)
    out = ref + rng.normal(0, 1e-3, ref.shape).astype(np.float32)
    paths = []
    for name, a in (("out", out), ("ref", ref)):
        np.save(tmp_path / f"{name}.npy", a)
        paths.append(np.load(tmp_path / f"{name}.npy", mmap_mode="r"))
    layout = ShardLayout((12, 8, 8), "1x2x2")
    streamed = compare(*paths, layout, keep_error=False)
    full = compare(out, ref, layout)
    assert streamed.error is None and len(streamed.per_shard) == 4
    assert streamed.max_abs_diff == pytest.approx(float(np.abs(out - ref).max()))
    assert streamed.max_abs_diff == full.max_abs_diff
    np.testing.assert_allclose(streamed.profile["mean"], full.profile["mean"], rtol=1e-12)


def test_compare_rejects_mismatched_inputs():
    layout = ShardLayout((8, 6, 6), "2x1x1")
    a = np.zeros((8, 6, 6, 3), np.float32)
    with pytest.raises(ValueError, match=r"output shape \(8, 6, 6, 3\) differs from reference shape"):
        compare(a, np.zeros((8, 6, 6, 2), np.float32), layout)
    with pytest.raises(ValueError, match="build the ShardLayout from the volume's shape"):
        compare(a, a, ShardLayout((8, 6, 4), "2x1x1"))


# -- measured artifact depth == receptive-field prediction -------------------------------


@pytest.fixture(scope="module")
def seam_runs(make_model):
    """Small U-Net without normalisation (so errors stay local) on a 2x1x1 mesh."""
    model = make_model(UNetConfig.preset("small", norm="none"), 2)
    x = np.random.default_rng(4).standard_normal((96, 16, 16)).astype(np.float32)
    ref = apply(model, x, backend="reference")
    layout = ShardLayout(x.shape, "2x1x1", multiple=model.config.multiple)
    return model, x, ref, layout


@pytest.mark.parametrize("halo", ["zero", "reflect", "replicate", 0, 4, 8, 16])
def test_measured_artifact_depth_matches_prediction(seam_runs, halo):
    model, x, ref, layout = seam_runs
    c = compare(apply(model, x, "2x1x1", halo=halo), ref, layout)
    predicted = predicted_artifact_depth(model.config, halo)
    assert artifact_depth(c.profile, tol=TOL) == predicted
    assert c.profile["max"][0] > 100 * TOL  # a visible artifact at the seam itself
    if not isinstance(halo, int) or halo == 0:
        assert c.argmax_disagreement > 0  # per-layer errors flip labels; a wide overlap may not


def test_full_overlap_has_no_artifacts(seam_runs):
    model, x, ref, layout = seam_runs
    c = compare(apply(model, x, "2x1x1", halo="overlap"), ref, layout)
    assert c.max_abs_diff <= 1e-5 and artifact_depth(c.profile, tol=TOL) == 0
    assert c.argmax_disagreement == 0 and all(v == 1.0 for v in c.dice.values())


def test_exact_2x2x2_per_shard_and_plot(seam_runs, tmp_path):
    model, *_ = seam_runs
    x = np.random.default_rng(5).standard_normal((32, 24, 40)).astype(np.float32)
    ref = apply(model, x, backend="reference")
    zero = compare(apply(model, x, "2x2x2", halo="zero"), ref, ShardLayout(x.shape, "2x2x2", multiple=4))
    exact = compare(apply(model, x, "2x2x2"), ref, ShardLayout(x.shape, "2x2x2", multiple=4))
    assert len(exact.per_shard) == 8 and max(r["max_abs_diff"] for r in exact.per_shard) <= 1e-5
    assert exact.argmax_disagreement == 0 and artifact_depth(exact.profile) == 0
    assert min(r["max_abs_diff"] for r in zero.per_shard) > TOL  # every shard touches a seam
    fig = plot_seam_profile(
        {"zero": zero.profile, "exact": exact.profile},
        path=tmp_path / "seam.png",
        predicted={"zero": predicted_artifact_depth(model.config, "zero")},
    )
    assert (tmp_path / "seam.png").stat().st_size > 1000
    assert len(fig.axes[0].get_lines()) == 4  # two profiles, one prediction, the tolerance line
