"""Volume: validation with readable errors, the (z, y, x) affine convention, cheap import."""

import subprocess
import sys

import numpy as np
import pytest

from data_tools import DataError, Volume
from data_tools.volume import default_affine, ijk_affine_from_zyx, zyx_affine_from_ijk


def test_defaults_and_fields():
    v = Volume(np.zeros((4, 5, 6), np.float32), spacing=(3.0, 2.0, 0.5))
    assert v.shape == (4, 5, 6)
    assert v.spacing == (3.0, 2.0, 0.5)
    assert v.source_format == "array" and v.labels is None and v.metadata == {}
    # no orientation known: world x = x*dx, y = y*dy, z = z*dz
    np.testing.assert_array_equal(v.voxel_to_world([1, 2, 3]), [1.5, 4.0, 3.0])
    assert not v.affine.flags.writeable


def test_affine_column_swap_is_its_own_inverse():
    ijk = np.array([[0.9, 0.1, 0, 5], [0, 1.1, 0.2, -3], [0.3, 0, 2.0, 7], [0, 0, 0, 1]])
    zyx = zyx_affine_from_ijk(ijk)
    np.testing.assert_array_equal(ijk_affine_from_zyx(zyx), ijk)
    # voxel (i, j, k) of the NIfTI array is voxel (k, j, i) of ours, same world point
    np.testing.assert_allclose(zyx @ [7, 2, 3, 1], ijk @ [3, 2, 7, 1])
    np.testing.assert_array_equal(default_affine((3, 2, 1))[:3, 3], [0, 0, 0])


def test_replace_revalidates():
    v = Volume(np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match="expected 3"):
        v.replace(array=np.zeros((2, 2)))
    assert v.replace(source_format="npy").source_format == "npy"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"array": np.zeros((3, 3))}, r"has 2 dimensions \(3, 3\), expected 3 \(Z, Y, X\); pass a single 3-D"),
        ({"array": np.zeros((2, 2, 2, 2))}, r"has 4 dimensions"),
        ({"array": np.zeros((2, 2, 2), complex)}, r"expected real numbers"),
        ({"array": np.zeros((0, 2, 2))}, r"empty"),
        ({"spacing": (1.0, -1.0, 1.0)}, r"spacing=.* not 3 positive"),
        ({"spacing": (2.0, 1.0, 1.0), "affine": np.eye(4)}, r"disagrees with the affine"),
        ({"affine": np.eye(3)}, r"4x4"),
    ],
)
def test_invalid_volume_messages(kwargs, message):
    args = {"array": np.zeros((2, 3, 4), np.float32), **kwargs}
    with pytest.raises(DataError, match=message):
        Volume(**args)


def test_non_finite_voxels_named_with_position_and_fix():
    a = np.zeros((3, 4, 5), np.float32)
    a[2, 1, 3] = np.nan
    a[2, 3, 0] = np.inf
    with pytest.raises(DataError) as info:
        Volume(a, path="scan.nii.gz")
    msg = str(info.value)
    assert msg.startswith("scan.nii.gz: 2 voxel(s) are NaN or infinite (first at z,y,x=(2, 1, 3))")
    assert "np.nan_to_num" in msg
    assert isinstance(info.value, ValueError) and "\n" not in msg


def test_labels_validated():
    a = np.zeros((2, 3, 4), np.float32)
    lab = np.zeros((2, 3, 4), np.uint8)
    lab[0, 0, 0], lab[1, 2, 3] = 5, 7
    with pytest.raises(DataError, match=r"unexpected values \[5, 7\], allowed 0..2 \(background, organ, lesion\)"):
        Volume(a, labels=lab, class_names=("background", "organ", "lesion"))
    with pytest.raises(DataError, match=r"unexpected values \[-1\]"):
        Volume(a, labels=-np.ones((2, 3, 4), np.int16))
    with pytest.raises(DataError, match="labels have shape"):
        Volume(a, labels=np.zeros((2, 3, 5), np.uint8))
    with pytest.raises(DataError, match="expected integers.*np.rint"):
        Volume(a, labels=np.zeros((2, 3, 4), np.float32))
    ok = Volume(a, labels=np.ones((2, 3, 4), bool), class_names=("bg", "fg"))
    assert ok.labels.dtype == np.uint8 and ok.labels.sum() == 24


def test_import_is_cheap_and_jax_free():
    code = (
        "import sys, data_tools; from data_tools import Volume, DataError;"
        "import data_tools.io, data_tools.synthetic, data_tools.formats, data_tools.preprocess, data_tools.samples;"
        "heavy = [m for m in ('jax', 'nibabel', 'pydicom', 'zarr', 'scipy', 'tifffile', 'nilearn')"
        " if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
