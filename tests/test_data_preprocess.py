"""Preprocessing: windowing and normalisation values, resampling geometry, exact round trips."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from data_tools import DataError, Volume
from data_tools.preprocess import (
    crop_padding,
    pad_to_multiple,
    pad_volume,
    percentile_normalise,
    resample,
    resample_array,
    window,
    zscore,
)

shapes = st.tuples(*[st.integers(1, 13)] * 3)
multiples = st.one_of(st.integers(1, 9), st.tuples(*[st.integers(1, 9)] * 3))


@settings(max_examples=150, deadline=None)
@given(
    array=arrays(np.float32, shapes, elements=st.floats(-1e3, 1e3, width=32)),
    multiple=multiples,
    side=st.sampled_from(["end", "both"]),
    mode=st.sampled_from(["constant", "edge", "reflect"]),
)
def test_pad_crop_round_trip(array, multiple, side, mode):
    padded, pads = pad_to_multiple(array, multiple, side=side, mode=mode, value=-5)
    m = (multiple,) * 3 if isinstance(multiple, int) else multiple
    assert all(n % k == 0 and 0 <= n - s < k for n, s, k in zip(padded.shape, array.shape, m))
    if side == "end":
        assert all(before == 0 for before, _ in pads)
    else:
        assert all(0 <= after - before <= 1 for before, after in pads)
    np.testing.assert_array_equal(crop_padding(padded, pads), array)
    # the same pads crop a channels-last-free batch (N, Z, Y, X) too
    np.testing.assert_array_equal(crop_padding(padded[None], pads)[0], array)


@settings(max_examples=60, deadline=None)
@given(
    labels=arrays(np.uint8, st.tuples(*[st.integers(1, 7)] * 3), elements=st.integers(0, 4)),
    factor=st.sampled_from([2, 3]),
)
def test_labels_nearest_up_then_down_is_exact(labels, factor):
    up = resample_array(labels, tuple(n * factor for n in labels.shape), order=0)
    assert up.dtype == np.uint8
    np.testing.assert_array_equal(up[::factor, ::factor, ::factor], labels)
    np.testing.assert_array_equal(resample_array(up, labels.shape, order=0), labels)


def test_resample_to_own_shape_is_identity():
    a = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    v = Volume(a, spacing=(2, 1, 1), labels=(a > 0).astype(np.uint8))
    r = resample(v, shape=(5, 6, 7), order=3)
    np.testing.assert_array_equal(r.array, a)
    np.testing.assert_array_equal(r.affine, v.affine)


def test_resample_geometry_and_linear_exactness():
    z, y, x = np.meshgrid(np.arange(10), np.arange(12), np.arange(14), indexing="ij")
    ramp = (2.0 * z + 3.0 * y - 1.0 * x).astype(np.float32)
    affine = np.array([[0, 0, 0.5, -3], [0, 1.0, 0, 4], [2.0, 0, 0, 10], [0, 0, 0, 1]])
    v = Volume(ramp, spacing=(2.0, 1.0, 0.5), affine=affine, labels=(ramp > 10).astype(np.uint8))
    r = resample(v, spacing=(1.0, 1.0, 1.0), order=1)
    assert r.shape == (20, 12, 7) and r.spacing == (1.0, 1.0, 1.0)
    # the grid stays centred: the world centre of the field of view is unchanged
    centre = lambda vol: vol.voxel_to_world((np.asarray(vol.shape) - 1) / 2)  # noqa: E731
    np.testing.assert_allclose(centre(r), centre(v), atol=1e-9)
    # linear interpolation reproduces a linear ramp away from the clamped edges
    coords = np.argwhere(np.ones(r.shape, bool)) * [0.5, 1.0, 2.0] + [-0.25, 0.0, 0.5]
    expected = (2.0 * coords[:, 0] + 3.0 * coords[:, 1] - coords[:, 2]).reshape(r.shape)
    inner = (slice(1, -1), slice(None), slice(0, -1))
    np.testing.assert_allclose(r.array[inner], expected[inner], atol=1e-4)
    assert r.labels.dtype == np.uint8 and set(np.unique(r.labels)) <= {0, 1}
    s = resample(v, shape=(5, 24, 7), order=3)
    assert s.shape == (5, 24, 7) and s.array.dtype == np.float32
    np.testing.assert_allclose(s.spacing, (4.0, 0.5, 1.0))
    with pytest.raises(DataError, match="exactly one of shape= or spacing="):
        resample(v)


def test_pad_volume_keeps_world_positions():
    v = Volume(np.ones((5, 6, 7), np.float32), spacing=(2, 1, 1), labels=np.ones((5, 6, 7), np.uint8))
    p, pads = pad_volume(v, 4, side="both")
    assert p.shape == (8, 8, 8) and pads == ((1, 2), (1, 1), (0, 1))
    np.testing.assert_allclose(p.voxel_to_world([1, 1, 0]), v.voxel_to_world([0, 0, 0]))
    assert p.labels.sum() == v.labels.sum() and p.array.sum() == v.array.sum()
    np.testing.assert_array_equal(crop_padding(p.array, pads), v.array)


def test_intensity_normalisation_values():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0], np.float32).reshape(1, 1, 5)
    np.testing.assert_allclose(window(hu, preset="abdomen").ravel(), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(window(hu, center=0, width=2000).ravel(), [0, 0.42, 0.52, 0.62, 1], atol=1e-6)
    rng = np.random.default_rng(0)
    a = rng.normal(50, 10, size=(8, 8, 8)).astype(np.float32)
    mask = np.zeros(a.shape, bool)
    mask[2:6] = True
    a[~mask] = 1e4  # outliers outside the mask must not matter
    z = zscore(a, mask=mask)
    assert z.dtype == np.float32
    assert abs(float(z[mask].mean())) < 1e-5 and abs(float(z[mask].std()) - 1) < 1e-5
    p = percentile_normalise(a, lower=1, upper=99, mask=mask)
    assert p.min() == 0 and p.max() == 1 and 0.4 < float(np.median(p[mask])) < 0.6
    with pytest.raises(DataError, match="mask: selects no voxels"):
        zscore(a, mask=np.zeros(a.shape, bool))
    with pytest.raises(DataError, match="unknown window 'liverish'"):
        window(a, preset="liverish")
