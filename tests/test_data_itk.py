"""NRRD and MetaImage through SimpleITK: geometry as ITK itself reads it, NIfTI agreement, box
reads, predictions in the input's family, dataset folders, `workbench infer`, bad files."""

import json
import os

import numpy as np
import pytest

from data_tools import DataError, Volume, read_box, read_volume, volume_info, write_prediction, write_volume
from data_tools.datasets import check_dataset, open_dataset, read_case, write_phantom_dataset
from data_tools.formats import itk

sitk = pytest.importorskip("SimpleITK")

SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
# a 90° rotation about z and a flip of z (det -1), anisotropic spacing, an origin off zero
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SPACING = (0.7, 0.9, 2.5)  # (x, y, z) mm
ORIGIN = (12.5, -31.25, 40.0)  # LPS mm


def _image(array, spacing=SPACING, origin=ORIGIN, direction=DIRECTION):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def _geometry(image):
    return image.GetOrigin(), image.GetSpacing(), image.GetDirection()


@pytest.fixture(scope="module")
def array():
    return np.random.default_rng(0).normal(0, 100, size=(7, 9, 11)).astype(np.float32)  # (z, y, x)


@pytest.fixture(scope="module")
def files(tmp_path_factory, array):
    """Each suffix written by SimpleITK itself, uncompressed and compressed (own folders:
    ``.nhdr`` and ``.mhd`` both name a ``.raw`` data file)."""
    out = {}
    for suffix in SUFFIXES:
        for compress in (False, True):
            folder = tmp_path_factory.mktemp(f"{suffix[1:]}{int(compress)}")
            path = folder / f"scan{suffix}"
            sitk.WriteImage(_image(array), str(path), compress)
            out[suffix, compress] = path
    return out


def _ras(point_lps):
    return np.array([-point_lps[0], -point_lps[1], point_lps[2]])


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("compress", [False, True])
def test_read_matches_simpleitks_own_reading(files, array, suffix, compress, tmp_path):
    path = files[suffix, compress]
    vol = read_volume(path)
    assert vol.source_format == ("nrrd" if suffix in (".nrrd", ".nhdr") else "metaimage")
    own = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(own))
    np.testing.assert_array_equal(vol.array, array)
    assert vol.spacing == pytest.approx(SPACING[::-1])
    for xyz in ([0, 0, 0], [10, 8, 6], [3, 1, 4]):  # ITK's index -> LPS, ours (z, y, x) -> RAS
        world = _ras(own.TransformIndexToPhysicalPoint(xyz))
        np.testing.assert_allclose(vol.voxel_to_world(xyz[::-1]), world, atol=1e-9)
    info = volume_info(path)
    assert info.shape == (7, 9, 11) and info.dtype == np.float32 and np.array_equal(info.affine, vol.affine)
    # written back (any suffix): ITK reads the very same origin, spacing and direction
    for out_suffix in SUFFIXES:
        out = write_volume(vol, tmp_path / f"back{out_suffix}")
        again = sitk.ReadImage(str(out))
        assert _geometry(again) == _geometry(own), out_suffix
        np.testing.assert_array_equal(sitk.GetArrayFromImage(again), array)


def test_detached_files_and_what_a_write_leaves(tmp_path, array):
    vol = read_volume(write_volume(Volume(array), tmp_path / "a.mhd"))
    write_volume(vol, tmp_path / "b.nhdr")
    assert sorted(os.listdir(tmp_path)) == ["a.mhd", "a.zraw", "b.nhdr", "b.raw.gz"]
    assert "ElementDataFile = a.zraw" in (tmp_path / "a.mhd").read_text()
    np.testing.assert_array_equal(read_volume(tmp_path / "b.nhdr").array, array)
    itk.write(vol, tmp_path / "u.mhd", compress=False)
    assert (tmp_path / "u.raw").stat().st_size == array.nbytes
    assert not itk.reads_whole(tmp_path / "u.mhd") and itk.reads_whole(tmp_path / "a.mhd")  # ITK streams u.raw
    assert itk.reads_whole(tmp_path / "b.nhdr") and not itk.reads_whole(tmp_path / "x.nii")


def test_nrrd_and_nifti_of_one_geometry_give_one_affine(tmp_path, array):
    """The same oblique geometry as NIfTI (nibabel) and NRRD (SimpleITK) reads back with one
    affine, and a NRRD that ITK converted from the NIfTI (its own RAS -> LPS) reads the same."""
    angle = 0.3
    c, s = np.cos(angle), np.sin(angle)
    ijk = np.array([[c, -s, 0, -20.0], [s, c, 0, 31.5], [0, 0, 1, 15.25], [0, 0, 0, 1]])
    ijk[:3, :3] = ijk[:3, :3] @ np.diag(SPACING) @ np.diag([1, -1, 1])  # a flip too
    from data_tools.volume import zyx_affine_from_ijk

    vol = Volume(array, spacing=SPACING[::-1], affine=zyx_affine_from_ijk(ijk))
    nifti = read_volume(write_volume(vol, tmp_path / "v.nii.gz"))
    nrrd = read_volume(write_volume(vol, tmp_path / "v.nrrd"))
    np.testing.assert_allclose(nrrd.affine, vol.affine, atol=1e-12)
    np.testing.assert_allclose(nifti.affine, nrrd.affine, atol=1e-5)  # NIfTI stores float32
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "v.nii.gz")), str(tmp_path / "by_itk.nrrd"))
    by_itk = read_volume(tmp_path / "by_itk.nrrd")
    np.testing.assert_allclose(by_itk.affine, nifti.affine, atol=1e-5)
    np.testing.assert_array_equal(by_itk.array, nifti.array)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("compress", [False, True])
def test_read_box_equals_the_slice_of_the_whole(files, array, suffix, compress):
    path = files[suffix, compress]
    for box in (((0, 7), (0, 9), (0, 11)), ((2, 5), (3, 4), (1, 10)), ((6, 7), (8, 9), (10, 11))):
        got = read_box(path, box)
        np.testing.assert_array_equal(got, array[tuple(slice(a, b) for a, b in box)])
        assert got.flags.c_contiguous and got.dtype == np.float32
    with pytest.raises(DataError, match="not inside the volume of shape"):
        read_box(path, ((0, 8), (0, 9), (0, 11)))


def test_a_4d_image_of_one_volume_reads_as_3d(tmp_path, array):
    image = sitk.JoinSeries([_image(array)])  # (x, y, z, 1)
    sitk.WriteImage(image, str(tmp_path / "one.nrrd"))
    vol = read_volume(tmp_path / "one.nrrd")
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_array_equal(read_box(tmp_path / "one.nrrd", ((1, 3), (2, 4), (5, 9))), array[1:3, 2:4, 5:9])
    assert volume_info(tmp_path / "one.nrrd").shape == array.shape


@pytest.mark.parametrize(("suffix", "family"), [(".nrrd", ".nrrd"), (".nhdr", ".nrrd"), (".mha", ".mha"),
                                                 (".mhd", ".mha")])  # fmt: skip
def test_write_prediction_keeps_origin_spacing_direction(files, suffix, family, tmp_path):
    like = read_volume(files[suffix, False])
    pred = (np.arange(like.array.size) % 3).reshape(like.shape).astype(np.uint8)
    out = write_prediction(pred, like, tmp_path / "out")
    assert out == tmp_path / "out" / f"prediction{family}" and os.listdir(tmp_path / "out") == [out.name]
    written = sitk.ReadImage(str(out))
    assert _geometry(written) == _geometry(sitk.ReadImage(str(files[suffix, False])))
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), pred)


def test_metaimage_modality_and_dtypes(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, (4, 5, 6))
    write_volume(Volume(labels.astype(bool)), tmp_path / "b.mha")
    assert read_volume(tmp_path / "b.mha").dtype == np.uint8
    for dtype in (np.int16, np.uint16, np.int64, np.float64):
        back = read_volume(write_volume(Volume(labels.astype(dtype)), tmp_path / "d.nrrd"))
        assert back.dtype == dtype and np.array_equal(back.array, labels)
    sitk.WriteImage(_image(np.zeros((4, 5, 6), np.int16)), str(tmp_path / "ct.mha"))  # ITK writes no Modality
    raw = (tmp_path / "ct.mha").read_bytes()
    (tmp_path / "ct.mha").write_bytes(raw.replace(b"ElementSpacing", b"Modality = MET_MOD_CT\nElementSpacing", 1))
    assert read_volume(tmp_path / "ct.mha").metadata["modality"] == "CT"
    assert volume_info(tmp_path / "ct.mha").modality == "CT"


def test_a_dataset_with_file_ending_nrrd_reads_like_its_nifti_twin(tmp_path):
    nifti = open_dataset(write_phantom_dataset(tmp_path / "nii", cases=2, test=1, layout="nnunet"))
    nrrd = open_dataset(write_phantom_dataset(tmp_path / "nrrd", cases=2, test=1, layout="nnunet",
                                              file_ending=".nrrd"))  # fmt: skip
    assert nrrd.file_ending == ".nrrd" and json.loads((tmp_path / "nrrd" / "dataset.json").read_text())[
        "file_ending"] == ".nrrd"  # fmt: skip
    assert nrrd.names == nifti.names and [c.name for c in nrrd.test] == [c.name for c in nifti.test]
    assert nrrd.case("phantom_001").images[0].name == "phantom_001_0000.nrrd"
    infos = check_dataset(nrrd)
    for name in nrrd.names:
        a, b = read_case(nifti, name), read_case(nrrd, name)
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
        assert infos[name].source_format == "nrrd" and b.metadata["modality"] == "CT"
    from workbench.training.data import batch_blocks
    from workbench.training.datasets import DatasetSource  # training reads the same batches

    sources = [DatasetSource(d.root, fold=0, progress=False) for d in (nifti, nrrd)]
    batches = [source.train_batch(1, 1, seed=3) for source in sources]
    np.testing.assert_allclose(batches[0][0], batches[1][0], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(batches[0][1], batches[1][1])
    assert sources[1].sequential_reads(1, 0)  # ITK reads a NRRD whole: one read per tiled box
    halves = [((0, n // 2), (n // 2, n)) for n in sources[1].shape]
    keys = [((0, 1), z, y, x) for z in halves[0] for y in halves[1] for x in halves[2]]
    for key, (image, label) in zip(keys, batch_blocks(sources[1], 1, 1, keys, seed=3)):
        index = tuple(slice(lo, hi) for lo, hi in key)
        np.testing.assert_array_equal(image, batches[1][0][index])
        np.testing.assert_array_equal(label, batches[1][1][index])
    msd = open_dataset(write_phantom_dataset(tmp_path / "mha", cases=2, test=0, file_ending=".mha"))
    assert (
        msd.layout == "msd" and msd.file_ending == ".mha" and read_case(msd, "phantom_000").source_format == "metaimage"
    )


def _geometry_of_file(path):
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r.GetOrigin(), r.GetSpacing(), r.GetDirection(), r.GetSize()


def test_workbench_infer_writes_nrrd_with_the_inputs_geometry(tmp_path, capsys):
    from workbench.cli import main

    volume = np.random.default_rng(2).normal(0, 1, (16, 20, 24)).astype(np.float32)  # the dataset's shape below
    sitk.WriteImage(_image(volume), str(tmp_path / "scan.nrrd"))
    out = tmp_path / "run"
    assert main(["infer", str(tmp_path / "scan.nrrd"), "--mesh", "2x2x2", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["prediction.nrrd", "report.json"]
    assert _geometry_of_file(out / "prediction.nrrd") == _geometry_of_file(tmp_path / "scan.nrrd")
    capsys.readouterr()


def test_workbench_evaluate_on_a_metaimage_dataset_writes_mha(tmp_path, capsys):
    from workbench.cli import main

    data = write_phantom_dataset(tmp_path / "Dataset001_Phantom", cases=2, test=1, layout="nnunet",
                                 shapes=[(16, 20, 24)], file_ending=".mha")  # fmt: skip
    ev = tmp_path / "eval"
    argv = ["evaluate", "--data", str(data), "--test", "--mesh", "2x2x2", "--out", str(ev), "--random-weights"]
    assert main(argv) == 0
    image = data / "imagesTs" / "phantom_002_0000.mha"
    assert os.listdir(ev / "predictions") == ["phantom_002.mha"]
    assert _geometry_of_file(ev / "predictions" / "phantom_002.mha") == _geometry_of_file(image)
    capsys.readouterr()


# -- bad files ---------------------------------------------------------------------------
def _written(tmp_path, name, image, compress=False):
    sitk.WriteImage(image, str(tmp_path / name), compress)
    return tmp_path / name


def _cut(path, keep):
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)] if keep < 1 else raw[: len(raw) - int(keep)])
    return path


BAD = {
    "nrrd-empty": (lambda t: ((t / "s.nrrd").write_bytes(b""), t / "s.nrrd")[1], "the file is empty (0 bytes)"),
    "nrrd-truncated": (lambda t: _cut(_written(t, "s.nrrd", _image(np.ones((8, 8, 8), np.float32))), 0.6),
                       "the file is shorter than its header says (truncated or damaged)"),
    "nrrd-gzip-truncated": (lambda t: _cut(_written(t, "s.nrrd", _image(np.ones((8, 8, 8), np.float32)), True), 20),
                            "the compressed NRRD data are truncated or damaged"),
    "nrrd-header-only": (lambda t: _cut(_written(t, "s.nrrd", _image(np.ones((8, 8, 8), np.float32))), 0.1),
                         "the NRRD header is incomplete or damaged (hit end of header"),
    "mha-truncated": (lambda t: _cut(_written(t, "s.mha", _image(np.ones((8, 8, 8), np.float32))), 0.6),
                      "the file is shorter than its header says (truncated or damaged)"),
    "mha-header-damaged": (lambda t: _cut(_written(t, "s.mha", _image(np.ones((8, 8, 8), np.float32))), 0.03),
                           "the MetaImage header is incomplete or damaged (DimSize required and not defined)"),
    "mhd-no-data-file": (lambda t: (_written(t, "s.mhd", _image(np.ones((4, 4, 4), np.int16))),
                                    (t / "s.raw").unlink())[0],
                         "the MetaImage header names the data file 's.raw', which does not exist beside it"),
    "nrrd-2d": (lambda t: _written(t, "s.nrrd", sitk.GetImageFromArray(np.ones((8, 8), np.float32))),
                "the image has 2 dimensions (x, y) = (8, 8), expected 3"),
    "mha-4d": (lambda t: _written(t, "s.mha", sitk.JoinSeries([_image(np.ones((3, 4, 5), np.float32))] * 2)),
               "the image has 4 dimensions (x, y, z, ...) = (5, 4, 3, 2), expected one 3-D volume"),
    "nrrd-vector": (lambda t: _written(t, "s.nrrd", sitk.GetImageFromArray(np.ones((3, 4, 5, 3), np.uint8),
                                                                           isVector=True)),
                    "holds 3 values per voxel (vector of 8-bit unsigned integer), expected one"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_are_one_data_error_and_nothing_on_stderr(name, tmp_path, capfd):
    build, expected = BAD[name]
    path = build(tmp_path)
    capfd.readouterr()
    readers = [read_volume, lambda p: read_box(p, ((0, 2), (0, 2), (0, 2)))]
    if "truncated" not in name:  # the header reads: the body is read only for voxels
        readers.append(volume_info)
    else:  # the whole image, or a box at its end
        readers[1] = lambda p: read_box(p, tuple((n - 1, n) for n in volume_info(p).shape))
    for reader in readers:
        with pytest.raises(DataError) as info:
            reader(path)
        assert expected in str(info.value) and str(info.value).startswith(str(path))
        assert "\n" not in str(info.value) and "ITK ERROR" not in str(info.value) and "itk::" not in str(info.value)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, array):
    def half_then_fail(image, name, *args):
        real(image[:, :, :2], name, *args)
        raise OSError("disk full (simulated)")

    real = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", half_then_fail)
    for name in ("out.nrrd", "out.mha", "out.mhd", "out.nhdr"):
        with pytest.raises(OSError, match="simulated"):
            write_volume(Volume(array), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_concurrent_reads_share_the_stderr_hold(files, tmp_path, capfd):
    """Reads in several threads (training's prefetch) hold stderr once and give it back."""
    from concurrent.futures import ThreadPoolExecutor

    bad = BAD["mha-header-damaged"][0](tmp_path)
    paths = [files[".mha", False], files[".nrrd", True], bad] * 8

    def one(path):
        try:
            return read_volume(path).shape
        except DataError as err:
            return str(err)

    capfd.readouterr()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, paths))
    assert got[:2] == [(7, 9, 11)] * 2 and "MetaImage header is incomplete" in got[2]
    os.write(2, b"still here\n")
    assert capfd.readouterr().err == "still here\n"
