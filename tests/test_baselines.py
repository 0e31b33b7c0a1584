"""The sliding-window peer: window grid, blending weights, MONAI parity, bad input."""

import numpy as np
import pytest

from workbench.analysis.baselines import (
    _window_predictor,
    importance_map,
    monai_sliding_window,
    scan_interval,
    sliding_window,
    window_starts,
)
from workbench.execute.run import apply


@pytest.fixture(scope="module")
def model(small_model):
    return small_model


ROI = (24, 20, 32)


@pytest.fixture(scope="module")
def predict(model):
    """One compiled window predictor (2 windows per call) shared by the tests."""
    return _window_predictor(model, ROI, 2)


@pytest.fixture(scope="module")
def volume():
    return np.random.default_rng(0).standard_normal((40, 36, 44)).astype(np.float32)


def test_window_grid_like_monai():
    # 128 with roi 64 and overlap 0.25: step 48, the last window moved back to end at 128
    assert scan_interval((128, 128, 128), (64, 64, 64), 0.25) == (48, 48, 48)
    starts = window_starts((128, 100, 64), (64, 64, 64), 0.25)
    assert sorted({s[0] for s in starts}) == [0, 48, 64]
    assert sorted({s[1] for s in starts}) == [0, 36]
    assert {s[2] for s in starts} == {0}  # roi covers the axis: one window
    assert starts[:3] == [(0, 0, 0), (0, 36, 0), (48, 0, 0)]  # z slowest
    assert window_starts((10, 10, 10), (3, 3, 3), 0.9) == window_starts((10, 10, 10), (3, 3, 3), 0.99)
    assert len(window_starts((10, 10, 10), (3, 3, 3), 0.9)) == 8**3  # step clamps to 1


def test_importance_map_values():
    w = importance_map((8, 6, 4), "gaussian", 0.125)
    assert w.shape == (8, 6, 4) and w.dtype == np.float32
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric
    x = 0.5  # the centre of an even window sits half a voxel from the peak
    expect = np.exp(-(x**2) / (2 * (8 * 0.125) ** 2)) * np.exp(-(x**2) / (2 * 0.75**2)) * np.exp(-(x**2) / (2 * 0.5**2))
    assert w[4, 3, 2] == pytest.approx(expect, rel=1e-6)
    assert w.min() == pytest.approx(1e-3)  # corners clamped like MONAI
    np.testing.assert_array_equal(importance_map(5, "constant"), np.ones((5, 5, 5), np.float32))


def test_single_window_equals_the_reference(model, volume):
    out = sliding_window(model, volume, roi=volume.shape, overlap=0.0)
    assert out.windows == 1 and out.output.shape == (*volume.shape, 3)
    np.testing.assert_allclose(out.output, apply(model, volume, backend="reference"), atol=1e-5)


def test_windows_differ_from_the_reference_near_window_faces(model, volume, predict):
    ref = apply(model, volume, backend="reference")
    out = sliding_window(model, volume, roi=ROI, overlap=0.25, batch_windows=2, predictor=predict)
    # z: starts 0, 16 (18 moved back); y: 0, 15, 16 (30 moved back); x: 0, 12 (24 moved back)
    assert out.windows == 2 * 3 * 2 and out.voxels_computed == 12 * 24 * 20 * 32
    err = np.abs(out.output - ref).max(-1)
    assert err.max() > 0.05  # truncated receptive field
    assert err.mean() < err.max() / 5  # but the error is concentrated


@pytest.mark.parametrize("mode,batch_windows", [("gaussian", 2), ("constant", 1)])
def test_matches_monai_sliding_window_inference(model, volume, predict, mode, batch_windows):
    pytest.importorskip("monai", reason="install the bench extra: pip install -e '.[bench]'")
    roi = ROI
    ours = sliding_window(
        model, volume, roi=roi, overlap=0.4, mode=mode, batch_windows=batch_windows, predictor=predict
    )
    theirs = monai_sliding_window(
        model, volume, roi=roi, overlap=0.4, mode=mode, batch_windows=batch_windows, predictor=predict
    )
    assert ours.windows == theirs.windows == 18
    assert np.abs(ours.output).max() > 1.0
    np.testing.assert_allclose(ours.output, theirs.output, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(roi=48), r"roi \(48, 48, 48\) is larger than the volume \(40, 36, 44\) along Z"),
        (dict(overlap=1.0), r"overlap=1.0 must be >= 0 and < 1"),
        (dict(overlap=-0.1), r"overlap=-0.1 must be >= 0 and < 1"),
        (dict(mode="median"), r"blending mode 'median' is unknown; use one of \('constant', 'gaussian'\)"),
        (dict(batch_windows=0), r"batch_windows=0 must be an integer >= 1"),
        (dict(roi=(8, 8)), r"roi=\(8, 8\) must be a positive integer or three of them"),
        (dict(sigma_scale=0), r"sigma_scale=0 must be > 0"),
    ],
)
def test_bad_input(model, volume, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sliding_window(model, volume, **{"roi": 16, **kwargs})
