"""MNI152 sample from the installed nilearn package: grid, geometry and tissue labels."""

import numpy as np
import pytest

from data_tools import load_input, load_mni
from data_tools.samples import MNI_CLASS_NAMES, mni_files


@pytest.fixture(scope="module")
def mni():
    return load_mni()


def _cm3(vol):
    return np.bincount(vol.labels.ravel(), minlength=4) * float(np.prod(vol.spacing)) / 1000.0


def test_files_come_from_nilearn():
    files = mni_files()
    assert set(files) == {"t1", "gm", "wm"}
    assert all("nilearn" in str(p) and p.name.endswith("_09a_converted.nii.gz") for p in files.values())


def test_native_grid_and_geometry(mni):
    # 197 x 233 x 189 on disk (i, j, k) is (189, 233, 197) in (z, y, x)
    assert mni.metadata["nifti_shape"] == (197, 233, 189)
    assert mni.shape == (189, 233, 197)
    assert mni.spacing == (1.0, 1.0, 1.0)
    assert mni.source_format == "mni" and mni.class_names == MNI_CLASS_NAMES
    assert mni.array.dtype == np.float32 and 0 <= mni.array.min() and mni.array.max() <= 255
    # the template's origin: voxel (i, j, k) = (98, 134, 72) is MNI (0, 0, 0)
    np.testing.assert_allclose(mni.voxel_to_world([72, 134, 98]), [0, 0, 0])
    assert mni.array[72, 134, 98] > 0  # inside the brain


def test_tissue_volumes_are_plausible(mni):
    bg, gm, wm, csf = _cm3(mni)
    # the MNI152 brain (mask 1.89 L) is larger than an average adult brain
    assert 900 < gm < 1300, gm
    assert 500 < wm < 800, wm
    assert 50 < csf < 300, csf
    assert gm + wm + csf == pytest.approx(float((mni.array > 0).sum()) / 1000.0)
    # T1 contrast: CSF dark < grey matter < white matter bright
    t1 = [float(mni.array[mni.labels == k].mean()) for k in (3, 1, 2)]
    assert t1[0] + 40 < t1[1] < t1[2] - 30, t1
    assert float(mni.array[mni.labels == 0].max()) == 0.0


def test_resampled(mni):
    small = load_mni(shape=64)
    assert small.shape == (64, 64, 64)
    np.testing.assert_allclose(small.spacing, (189 / 64, 233 / 64, 197 / 64))
    np.testing.assert_allclose(_cm3(small)[1:], _cm3(mni)[1:], rtol=0.1)
    # same field of view: the world corner of voxel 0's edge is preserved
    np.testing.assert_allclose(small.voxel_to_world([-0.5] * 3), mni.voxel_to_world([-0.5] * 3), atol=1e-9)
    assert load_input("mni:32x40x48").shape == (32, 40, 48)
    native = load_input("mni")
    np.testing.assert_array_equal(native.labels, mni.labels)
    native.array[...] = 0  # callers get their own copy
    assert load_mni().array.max() > 0


def test_mni_native_files_equal_the_template_built_slab_by_slab():
    """The per-process .npy copy (built slab by slab, threshold from histograms) is the template."""
    from data_tools.samples import load_mni, mni_native_files

    image, labels = mni_native_files()
    volume = load_mni()
    assert np.array_equal(np.load(image, mmap_mode="r"), volume.array)
    assert np.array_equal(np.load(labels, mmap_mode="r"), volume.labels)
