"""Synthetic phantoms: determinism, resolution consistency, labels, lesions, chunking, memory."""

import tracemalloc

import numpy as np
import pytest

from data_tools import DataError, make_phantom, make_phantom_block, phantom_lesions, read_box, write_phantom
from data_tools.synthetic import CLASS_NAMES, phantom_geometry


@pytest.fixture(scope="module")
def p128():
    return make_phantom(128, seed=0)


@pytest.fixture(scope="module")
def p256():
    return make_phantom(256, seed=0)


def _class_mm3(vol):
    return np.bincount(vol.labels.ravel(), minlength=4) * float(np.prod(vol.spacing))


def _lesion_voxels(vol, lesion):
    """Label-2 voxels whose centres lie within the lesion's radius (+ half a voxel)."""
    s = np.asarray(vol.spacing)
    c = np.asarray(lesion["centre_mm"])
    r = lesion["radius_mm"] + 0.5 * s.max()
    lo = np.maximum(np.floor((c - r) / s - 0.5).astype(int), 0)
    hi = np.minimum(np.ceil((c + r) / s + 0.5).astype(int), vol.shape)
    grids = np.meshgrid(*[(np.arange(a, b) + 0.5) * sp for a, b, sp in zip(lo, hi, s)], indexing="ij")
    inside = sum((g - ci) ** 2 for g, ci in zip(grids, c)) <= r**2
    sub = vol.labels[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return int(((sub == 2) & inside).sum())


def test_volume_fields(p128):
    assert p128.shape == (128, 128, 128)
    assert p128.array.dtype == np.float32 and p128.labels.dtype == np.uint8
    assert p128.spacing == (3.125, 3.125, 3.125)
    assert p128.class_names == CLASS_NAMES == ("background", "organ", "lesion", "vessel")
    assert p128.source_format == "phantom" and p128.metadata["seed"] == 0
    # the field of view (400 mm) is centred on world 0
    np.testing.assert_allclose(p128.voxel_to_world([63.5, 63.5, 63.5]), [0, 0, 0], atol=1e-9)


def test_deterministic_per_seed():
    a, b, c = make_phantom(48, seed=7), make_phantom(48, seed=7), make_phantom(48, seed=8)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_same_anatomy_at_128_and_256(p128, p256):
    v128, v256 = _class_mm3(p128), _class_mm3(p256)
    organ128, organ256 = v128[1] + v128[2], v256[1] + v256[2]
    assert organ128 > 1.0e6  # a liver of more than 1 litre
    assert abs(organ256 / organ128 - 1) < 0.02
    assert abs(v256[2] / v128[2] - 1) < 0.02  # lesions
    assert abs(v256[3] / v128[3] - 1) < 0.05  # thin vessels: coarser sampling, wider tolerance
    # organ centroid in mm agrees to well under a 128³ voxel (3.125 mm)
    cents = []
    for vol in (p128, p256):
        idx = np.argwhere(vol.labels == 1).mean(axis=0)
        cents.append((idx + 0.5) * np.asarray(vol.spacing))
    assert np.abs(cents[0] - cents[1]).max() < 0.5


def test_label_statistics_and_intensities(p128):
    counts = np.bincount(p128.labels.ravel(), minlength=4)
    assert (counts > 0).all() and counts.size == 4
    img, lab = p128.array, p128.labels
    assert abs(float(np.median(img[lab == 1])) - 100) < 10  # liver ~ 100 HU
    corner = img[:4, :4, :4]
    assert abs(float(corner.mean()) + 1000) < 10 and 8 < float(corner.std()) < 16  # air + 12 HU noise
    assert float(np.median(img[lab == 3])) > 150  # contrast-filled vessels
    assert img.min() > -1100 and img.max() < 1000


def test_lesions_span_sizes_and_are_lost_when_coarse(p128):
    lesions = phantom_lesions(128, seed=0)
    assert p128.metadata["lesions"] == lesions
    diam = sorted(les["diameter_voxels"] for les in lesions)
    assert len(diam) == 10 and diam[0] == pytest.approx(2.0) and diam[1] <= 3.0 and diam[-1] >= 12.0
    assert lesions[0]["radius_mm"] == pytest.approx(8 * 3.125)
    found = [_lesion_voxels(p128, les) for les in lesions]
    assert all(n > 0 for n in found), found  # every lesion visible at 128³
    for les, n in zip(lesions, found):  # voxel counts near the analytic sphere volume
        assert abs(n - les["expected_voxels"]) <= max(6, 0.25 * les["expected_voxels"]), (les, n)
    # at 32³ (12.5 mm voxels) lesions no wider than one voxel can vanish; those >= 2 voxels stay
    coarse = make_phantom(32, seed=0)
    found32 = {les["index"]: _lesion_voxels(coarse, les) for les in coarse.metadata["lesions"]}
    lost = [les for les in coarse.metadata["lesions"] if found32[les["index"]] == 0]
    assert lost and all(les["diameter_mm"] <= 12.5 for les in lost)
    assert all(found32[les["index"]] > 0 for les in coarse.metadata["lesions"] if les["diameter_mm"] >= 25)


def test_block_equals_slice_of_whole():
    shape = (40, 56, 48)
    whole = make_phantom(shape, seed=3)
    for box in [((0, 40), (0, 56), (0, 48)), ((7, 23), (13, 50), (0, 31)), ((39, 40), (55, 56), (47, 48))]:
        img, lab = make_phantom_block(shape, box, seed=3)
        sl = tuple(slice(a, b) for a, b in box)
        np.testing.assert_array_equal(img, whole.array[sl])
        np.testing.assert_array_equal(lab, whole.labels[sl])
    # uneven tiling reassembles the whole exactly
    out = np.empty(shape, np.float32)
    for z in ((0, 13), (13, 40)):
        for y in ((0, 30), (30, 56)):
            for x in ((0, 5), (5, 48)):
                out[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = make_phantom_block(shape, (z, y, x), seed=3)[0]
    np.testing.assert_array_equal(out, whole.array)
    np.testing.assert_array_equal(read_box(f"phantom:{shape[0]}x{shape[1]}x{shape[2]}:3", ((7, 23), (13, 50), (0, 31))),
                                  whole.array[7:23, 13:50, 0:31])  # fmt: skip


def test_anisotropic_shape_and_vessels_off():
    v = make_phantom((32, 64, 48), seed=1, vessels=False)
    assert v.spacing == (12.5, 6.25, 400 / 48)
    assert v.class_names == ("background", "organ", "lesion") and v.labels.max() == 2
    spacing, affine = phantom_geometry((32, 64, 48))
    np.testing.assert_array_equal(v.affine, affine)


def test_bad_shape_and_box():
    with pytest.raises(DataError, match="shape=.* not 3 sizes"):
        make_phantom((0, 10, 10))
    with pytest.raises(DataError, match=r"box=.*clip the box"):
        make_phantom_block(32, ((0, 40), (0, 32), (0, 32)))


@pytest.mark.slow
def test_512_chunked_to_zarr_peak_memory(tmp_path):
    tracemalloc.start()
    try:
        path = write_phantom(tmp_path / "p512.zarr", 512, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * 2**30, f"peak {peak / 2**20:.0f} MiB"
    print(f"512³ phantom to zarr: traced peak {peak / 2**20:.0f} MiB")
    box = ((192, 256), (256, 320), (128, 192))
    img, _ = make_phantom_block(512, box, seed=0)
    np.testing.assert_array_equal(read_box(path, box), img)
    import zarr

    root = zarr.open(str(path), mode="r")
    assert [root[str(k)].shape for k in range(5)] == [(512,) * 3, (256,) * 3, (128,) * 3, (64,) * 3, (32,) * 3]
    assert root["labels/tissue/0"][256, 256, 256] in range(4)
