"""Bad inputs end in one readable DataError naming the file, the problem and the fix;
writers leave nothing partial behind."""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from data_tools import DataError, MissingDataError, Volume, read_volume, write_dicom_series, write_volume
from data_tools import io as dio


def _one_line(exc: DataError, path) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    assert isinstance(exc, ValueError)
    return msg


def test_missing_file(tmp_path):
    (tmp_path / "scan.nii").write_bytes(b"x")
    with pytest.raises(MissingDataError) as info:
        read_volume(tmp_path / "scna.nii.gz")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, DataError)
    msg = _one_line(info.value, tmp_path / "scna.nii.gz")
    assert "no such file or folder; check the path" in msg and "['scan.nii']" in msg


def test_empty_folder_and_empty_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: the folder is empty; point to a DICOM series folder or a zarr store"):
        read_volume(tmp_path / "empty")
    (tmp_path / "zero.nii").write_bytes(b"")
    with pytest.raises(DataError, match=r"zero.nii: the file is empty \(0 bytes\); re-export"):
        read_volume(tmp_path / "zero.nii")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no DICOM files and no zarr metadata \(1 entries: \['a.txt'\]\)"):
        read_volume(tmp_path / "notes")


def test_truncated_nii_gz(tmp_path):
    data = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "full.nii.gz")
    raw = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "scan.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as info:
        read_volume(tmp_path / "scan.nii.gz")
    assert _one_line(info.value, tmp_path / "scan.nii.gz").endswith(
        "scan.nii.gz: truncated gzip stream (file is incomplete); re-export or re-download the file"
    )
    # an uncompressed file cut short
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "full.nii")
    raw = (tmp_path / "full.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[:-1000])
    with pytest.raises(DataError, match=r"cut.nii: the file is shorter than its header says"):
        read_volume(tmp_path / "cut.nii")


def test_nifti_with_four_dimensions(tmp_path):
    nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)).to_filename(tmp_path / "fmri.nii.gz")
    with pytest.raises(DataError) as info:
        read_volume(tmp_path / "fmri.nii.gz")
    msg = _one_line(info.value, tmp_path / "fmri.nii.gz")
    assert "has 4 dimensions (4, 5, 6, 3), expected one 3-D volume; pick a volume first" in msg
    nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)).to_filename(tmp_path / "slice.nii")
    with pytest.raises(DataError, match="has 2 dimensions"):
        read_volume(tmp_path / "slice.nii")


def test_dicom_folder_with_two_series(tmp_path):
    vol = Volume(np.zeros((3, 4, 5), np.float32))
    write_dicom_series(vol, tmp_path / "a", series_uid="1.2.826.0.1.1", description="arterial")
    write_dicom_series(vol, tmp_path / "b", series_uid="1.2.826.0.1.2", description="venous")
    both = tmp_path / "both"
    both.mkdir()
    for sub in ("a", "b"):
        for name in os.listdir(tmp_path / sub):
            shutil.copy(tmp_path / sub / name, both / f"{sub}-{name}")
    with pytest.raises(DataError) as info:
        read_volume(both)
    msg = _one_line(info.value, both)
    assert "contains 2 DICOM series: 1.2.826.0.1.1 (series 1, 'arterial', 3 slices); 1.2.826.0.1.2" in msg
    assert msg.endswith("pick one with read_volume(path, series=UID) (CLI: --series UID)")
    assert read_volume(both, series="1.2.826.0.1.2").metadata["series_description"] == "venous"
    with pytest.raises(DataError, match=r"has no series '9.9'; it holds: 1.2.826.0.1.1"):
        read_volume(both, series="9.9")


def test_dicom_missing_slice(tmp_path):
    write_dicom_series(Volume(np.zeros((5, 4, 4), np.float32)), tmp_path / "s")
    os.remove(sorted((tmp_path / "s").iterdir())[2])
    with pytest.raises(DataError, match=r"uneven slice gaps \(1 to 2 mm; missing slices\?\)"):
        read_volume(tmp_path / "s")


def test_non_finite_voxels(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    nib.Nifti1Image(data, np.eye(4)).to_filename(tmp_path / "nan.nii.gz")
    with pytest.raises(DataError) as info:
        read_volume(tmp_path / "nan.nii.gz")
    msg = _one_line(info.value, tmp_path / "nan.nii.gz")
    # NIfTI (i, j, k) = (1, 2, 3) is (z, y, x) = (3, 2, 1)
    assert "1 voxel(s) are NaN or infinite (first at z,y,x=(3, 2, 1)); replace them, e.g. np.nan_to_num" in msg


def test_label_map_with_unexpected_values(tmp_path):
    write_volume(Volume(np.zeros((3, 4, 5), np.float32)), tmp_path / "img.nii.gz")
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[0, 1, 2] = 9
    write_volume(Volume(labels), tmp_path / "seg.nii.gz")
    with pytest.raises(DataError) as info:
        read_volume(tmp_path / "img.nii.gz", labels=tmp_path / "seg.nii.gz", class_names=("background", "organ"))
    msg = _one_line(info.value, tmp_path / "seg.nii.gz")
    assert "label map has unexpected values [9], allowed 0..1 (background, organ); remap" in msg
    ok = read_volume(tmp_path / "img.nii.gz", labels=tmp_path / "seg.nii.gz")
    assert ok.labels[0, 1, 2] == 9


def test_zarr_without_expected_dimensions(tmp_path):
    import zarr

    zarr.create_array(str(tmp_path / "flat.zarr"), shape=(10, 12), dtype="float32", fill_value=0)
    with pytest.raises(DataError, match=r"flat.zarr: zarr array has shape \(10, 12\), expected 3 spatial"):
        read_volume(tmp_path / "flat.zarr")
    arr = zarr.create_array(str(tmp_path / "rgb.zarr"), shape=(2, 4, 5, 6), dtype="uint8", fill_value=0,
                            dimension_names=("c", "z", "y", "x"))  # fmt: skip
    del arr
    with pytest.raises(DataError, match=r"shape \(2, 4, 5, 6\) with axes \['c', 'z', 'y', 'x'\].*select a channel"):
        read_volume(tmp_path / "rgb.zarr")
    one = zarr.create_array(str(tmp_path / "one.zarr"), shape=(1, 4, 5, 6), dtype="uint8", fill_value=3,
                            dimension_names=("c", "z", "y", "x"))  # fmt: skip
    del one
    assert read_volume(tmp_path / "one.zarr").shape == (4, 5, 6)  # a singleton channel is dropped
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("a", shape=(2, 2, 2), dtype="f4")
    group.create_array("b", shape=(2, 2, 2), dtype="f4")
    with pytest.raises(DataError, match=r"without OME-Zarr multiscales metadata .*read_volume\('store.zarr/image'\)"):
        read_volume(tmp_path / "two.zarr")


def test_unknown_format(tmp_path):
    (tmp_path / "scan.vtk").write_bytes(b"# vtk DataFile Version 3.0\nvolume\nBINARY\n")
    with pytest.raises(DataError) as info:
        read_volume(tmp_path / "scan.vtk")
    msg = _one_line(info.value, tmp_path / "scan.vtk")
    assert "unknown format (file starts with b'# vtk Da'); supported: NIfTI (.nii, .nii.gz), DICOM" in msg
    with pytest.raises(DataError, match=r"cannot tell the output format from the name 'out.vtk'; end the name"):
        write_volume(Volume(np.zeros((2, 2, 2))), tmp_path / "out.vtk")


def test_npz_without_image_key_and_pickles(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((2, 2, 2)), b=np.ones((2, 2, 2)))
    with pytest.raises(DataError, match=r"holds arrays \['a', 'b'\] and none is named 'image'; save the volume"):
        read_volume(tmp_path / "x.npz")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="holds Python objects"):
        read_volume(tmp_path / "o.npy")


# -- atomic writes ----------------------------------------------------------------------
def _boom(*args, **kwargs):
    raise OSError("disk full (simulated)")


def _half_then_fail(real):
    """Call the real writer on a truncated array, then fail: something partial exists."""

    def writer(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("disk full (simulated)")

    return writer


@pytest.mark.parametrize("name", ["out.nii.gz", "out.nii", "out.tif", "out.zarr", "out.npy", "out.npz"])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, name):
    import tifffile

    from data_tools.formats import zarr as _zarr

    vol = Volume(np.ones((16, 8, 8), np.float32), labels=np.ones((16, 8, 8), np.uint8), class_names=("a", "b"))
    monkeypatch.setattr(nib.Nifti1Image, "to_filename", _half_then_fail(nib.Nifti1Image.to_filename))
    monkeypatch.setattr(tifffile, "imwrite", _half_then_fail(tifffile.imwrite))
    monkeypatch.setattr(_zarr.OmeZarrWriter, "write_block", _half_then_fail(_zarr.OmeZarrWriter.write_block))
    monkeypatch.setattr(np, "save", _half_then_fail(np.save))
    monkeypatch.setattr(np, "savez_compressed", _half_then_fail(np.savez_compressed))
    with pytest.raises(OSError, match="simulated"):
        write_volume(vol, tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_previous_output(tmp_path, monkeypatch):
    from data_tools.formats import zarr as _zarr

    old = Volume(np.full((4, 4, 4), 7, np.float32))
    for name in ("keep.npy", "keep.zarr"):
        write_volume(old, tmp_path / name)
    monkeypatch.setattr(np, "save", _boom)
    monkeypatch.setattr(_zarr.OmeZarrWriter, "write_block", _boom)
    for name in ("keep.npy", "keep.zarr"):
        with pytest.raises(OSError):
            write_volume(Volume(np.zeros((4, 4, 4), np.float32)), tmp_path / name)
        assert read_volume(tmp_path / name).array.max() == 7
    assert sorted(os.listdir(tmp_path)) == ["keep.npy", "keep.zarr"]
    monkeypatch.undo()
    write_volume(Volume(np.zeros((4, 4, 4), np.float32)), tmp_path / "keep.zarr")  # overwrite works
    assert read_volume(tmp_path / "keep.zarr").array.max() == 0
    assert sorted(os.listdir(tmp_path)) == ["keep.npy", "keep.zarr"]


def test_failed_prediction_and_dicom_write_leave_nothing(tmp_path, monkeypatch):
    like = dio.load_input("phantom:16")
    monkeypatch.setattr(np, "save", _half_then_fail(np.save))
    with pytest.raises(OSError):
        dio.write_prediction(like.labels, like, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []
    import pydicom

    calls = []

    def save_some(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real_save(self, *args, **kwargs)

    real_save = pydicom.Dataset.save_as
    monkeypatch.setattr(pydicom.Dataset, "save_as", save_some)
    with pytest.raises(OSError):
        write_dicom_series(Volume(np.zeros((5, 4, 4), np.float32)), tmp_path / "dcm")
    assert sorted(os.listdir(tmp_path)) == ["out"]
