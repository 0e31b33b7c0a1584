"""Readers and writers: round trips per format, DICOM series, box reads, CLI entry points."""

import gzip
import os
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from data_tools import (
    DataError,
    Volume,
    detect_format,
    load_input,
    read_box,
    read_volume,
    volume_info,
    write_dicom_series,
    write_prediction,
    write_volume,
)
from data_tools.volume import zyx_affine_from_ijk


def _rotation(axis, angle):
    c, s = np.cos(angle), np.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _oblique_affine(spacing_zyx=(2.5, 0.8, 0.7), angle=0.35, origin=(-20.0, 31.5, 15.25)):
    dz, dy, dx = spacing_zyx
    ijk = np.eye(4)
    ijk[:3, :3] = _rotation(1, angle) @ _rotation(2, angle / 2) @ np.diag([dx, dy, dz])
    ijk[:3, 3] = origin
    return zyx_affine_from_ijk(ijk)


@pytest.fixture(scope="module")
def sample():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 300, size=(9, 12, 14)).astype(np.float32)
    labels = rng.integers(0, 3, size=image.shape).astype(np.uint8)
    return Volume(image, spacing=(2.5, 0.8, 0.7), affine=_oblique_affine(), labels=labels,
                  class_names=("background", "a", "b"))  # fmt: skip


# -- round trips ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "dtype", "keeps_geometry", "keeps_labels"),
    [
        ("v.nii.gz", "float32", True, False),
        ("v.nii", "int16", True, False),
        ("v.nii.gz", "uint8", True, False),
        ("v.tif", "float32", True, False),
        ("v.tif", "int16", True, False),
        ("v.tif", "float64", True, False),  # not an ImageJ type: plain TIFF + JSON
        ("v.zarr", "float32", True, True),
        ("v.zarr", "int16", True, True),
        ("v.npz", "float32", True, True),
        ("v.nrrd", "float32", True, False),
        ("v.mha", "int16", True, False),
        ("v.npy", "float32", False, False),
        ("v.npy", "uint16", False, False),
    ],
)
def test_round_trip(tmp_path, sample, name, dtype, keeps_geometry, keeps_labels):
    image = (sample.array / 10 if np.dtype(dtype).kind in "iu" else sample.array).astype(dtype)
    if dtype in ("uint8", "uint16"):
        image = np.abs(image)
    vol = sample.replace(array=image)
    path = write_volume(vol, tmp_path / name)
    assert sorted(os.listdir(tmp_path)) == [name]  # no temporaries left
    back = read_volume(path)
    assert back.shape == vol.shape and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, image)
    if keeps_geometry:
        tol = 1e-5 if name.startswith("v.nii") else 0  # NIfTI stores the affine as float32
        tol = 1e-12 if name in ("v.nrrd", "v.mha") else tol  # ITK: direction x spacing, rounded
        np.testing.assert_allclose(back.affine, vol.affine, rtol=tol, atol=tol * 100)
        np.testing.assert_allclose(back.spacing, vol.spacing, rtol=max(tol, 1e-12))
    else:
        assert back.spacing == (1.0, 1.0, 1.0)
    if keeps_labels:
        np.testing.assert_array_equal(back.labels, vol.labels)
        assert back.class_names == vol.class_names
    assert back.source_format == detect_format(path)


def test_nifti_read_then_write_is_byte_identical(tmp_path):
    rng = np.random.default_rng(1)
    data_ijk = rng.integers(-1000, 2000, size=(11, 10, 9)).astype(np.int16)
    affine_ijk = np.eye(4)
    affine_ijk[:3, :3] = _rotation(2, 0.3) @ np.diag([0.9, 1.1, 2.0])
    affine_ijk[:3, 3] = [10, -20, 30]
    img = nib.Nifti1Image(data_ijk, affine_ijk)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine_ijk, code=1)
    img.set_sform(affine_ijk, code=2)
    for name in ("src.nii", "src.nii.gz"):
        img.to_filename(tmp_path / name)
        vol = read_volume(tmp_path / name)
        # (i, j, k) on disk is (k, j, i) here, and the affine follows
        assert vol.shape == (9, 10, 11)
        assert vol.array[4, 2, 7] == data_ijk[7, 2, 4]
        np.testing.assert_allclose(vol.voxel_to_world([4, 2, 7]), nib.affines.apply_affine(affine_ijk, [7, 2, 4]))
        np.testing.assert_allclose(vol.spacing, (2.0, 1.1, 0.9), rtol=1e-6)
        out = write_volume(vol, tmp_path / f"out-{name}")
        read = (lambda p: gzip.decompress(p.read_bytes())) if name.endswith(".gz") else (lambda p: p.read_bytes())
        assert read(out) == read(tmp_path / name)


def test_nifti_scaling_and_singleton_4d(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4, 1)
    img = nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0]))
    img.header.set_slope_inter(0.5, -10.0)
    img.to_filename(tmp_path / "s.nii")
    vol = read_volume(tmp_path / "s.nii")
    assert vol.shape == (4, 3, 2) and vol.dtype == np.float32
    np.testing.assert_array_equal(vol.array, data[..., 0].transpose(2, 1, 0) * 0.5 - 10.0)
    assert vol.spacing == (3.0, 2.0, 1.0)
    np.testing.assert_array_equal(read_box(tmp_path / "s.nii", ((1, 3), (0, 2), (1, 2))), vol.array[1:3, 0:2, 1:2])


def _oblique_series(tmp_path, name="series", **kwargs):
    rng = np.random.default_rng(2)
    hu = (rng.integers(-2048, 4000, size=(7, 10, 12)) * 0.5 - 1024).astype(np.float32)  # multiples of 0.5
    vol = Volume(hu, spacing=(2.5, 0.8, 0.7), affine=_oblique_affine())
    names = [f"IM{n:04d}" for n in rng.permutation(7)]  # file order unrelated to position
    write_dicom_series(vol, tmp_path / name, slope=0.5, intercept=-1024.0, file_names=names, **kwargs)
    return vol


def test_dicom_oblique_shuffled_rescaled(tmp_path):
    vol = _oblique_series(tmp_path)
    back = read_volume(tmp_path / "series")
    assert back.source_format == "dicom" and back.dtype == np.float32
    np.testing.assert_array_equal(back.array, vol.array)  # right order and HU
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-6)
    np.testing.assert_allclose(back.spacing, (2.5, 0.8, 0.7), rtol=1e-9)
    files = back.metadata["slice_files"]
    assert [os.path.basename(f) for f in files] != sorted(os.path.basename(f) for f in files)
    # a single file of the series reads the whole series
    assert read_volume(files[3]).shape == (7, 10, 12)
    box = ((2, 5), (1, 9), (3, 4))
    np.testing.assert_array_equal(read_box(tmp_path / "series", box), vol.array[2:5, 1:9, 3:4])
    assert volume_info(tmp_path / "series").shape == (7, 10, 12)


def test_dicom_sagittal(tmp_path):
    # sagittal slices: rows run along -z (feet), columns along +y (anterior), slices along x
    hu = np.arange(5 * 6 * 8, dtype=np.float32).reshape(5, 6, 8) - 100
    lps = np.array([[1.5, 0, 0, -40.0], [0, 0, 0.9, -60.0], [0, -0.8, 0, 70.0], [0, 0, 0, 1]])
    # the LPS column directions: z=+L (x), y=-S, x=-P; convert to RAS for the Volume
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    vol = Volume(hu, spacing=(1.5, 0.8, 0.9), affine=affine)
    write_dicom_series(vol, tmp_path / "sag", slope=1.0, intercept=-1024.0,
                       file_names=[f"{n}.dcm" for n in (3, 0, 4, 1, 2)])  # fmt: skip
    back = read_volume(tmp_path / "sag")
    # sorted along the normal row x column = (0,1,0) x (0,0,-1) = (-1,0,0): descending L
    np.testing.assert_array_equal(back.array, hu[::-1])
    for zyx in ([0, 0, 0], [4, 5, 7], [2, 3, 1]):
        orig = [4 - zyx[0], zyx[1], zyx[2]]
        np.testing.assert_allclose(back.voxel_to_world(zyx), vol.voxel_to_world(orig), atol=1e-6)


# -- box reads --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["v.zarr", "v.npy", "v.nii", "v.nii.gz", "v.tif", "v.npz", "v.nrrd", "v.mha"])
def test_read_box_equals_full_read_sliced(tmp_path, sample, name):
    path = write_volume(sample, tmp_path / name)
    full = read_volume(path).array
    for box in [((0, 9), (0, 12), (0, 14)), ((3, 8), (5, 6), (2, 13)), ((8, 9), (11, 12), (13, 14))]:
        got = read_box(path, box)
        np.testing.assert_array_equal(got, full[tuple(slice(a, b) for a, b in box)])
        assert got.flags.c_contiguous
    with pytest.raises(DataError, match="not inside the volume of shape"):
        read_box(path, ((0, 10), (0, 12), (0, 14)))


def _traced_peak(fn, *args, **kwargs):
    """(``fn(*args, **kwargs)``, the peak bytes it allocated, by tracemalloc)."""
    tracemalloc.start()
    try:
        out = fn(*args, **kwargs)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["big.npy", "big.nii", "big.zarr"])
def test_read_box_reads_only_the_box(tmp_path, name):
    vol = Volume(np.arange(160**3, dtype=np.float32).reshape((160,) * 3))  # 16 MiB
    path = write_volume(vol, tmp_path / name)
    box = ((64, 96), (32, 64), (100, 132))  # 32³ floats = 128 KiB
    got, peak = _traced_peak(read_box, path, box)
    np.testing.assert_array_equal(got, vol.array[64:96, 32:64, 100:132])
    assert peak < 4 * 2**20, f"{name}: peak {peak / 2**20:.1f} MiB for a 0.125 MiB box"


@pytest.mark.parametrize("spec", ["mni", "mni:40x50x44"])
def test_read_box_of_the_mni_spec_reads_only_the_box(spec):
    """``mni`` / ``mni:N`` boxes come from this process's memory-mapped native copy
    (resampled by block): bitwise the slice of the whole template, and a box of about 8 % of
    the volume holds well under the native template's bytes (float64 interpolation of the
    native box it reads)."""
    from data_tools.samples import mni_native_files

    whole = load_input(spec).array
    native = np.load(mni_native_files()[0], mmap_mode="r")  # built once per process, before the trace
    for box in (((3, 17), (5, 30), (20, 40)), tuple((0, n) for n in whole.shape)):
        got, peak = _traced_peak(read_box, spec, box)
        np.testing.assert_array_equal(got, whole[tuple(slice(a, b) for a, b in box)])
        if box[0] == (3, 17):
            assert peak < native.nbytes / 3, (spec, peak, native.nbytes)


# -- CLI entry points -------------------------------------------------------------------
def test_load_input_specs():
    v = load_input("phantom:32")
    assert v.shape == (32, 32, 32) and v.metadata["seed"] == 0 and v.source_format == "phantom"
    assert load_input("phantom:32:5").metadata["seed"] == 5
    assert load_input("phantom:16x24x32:2").shape == (16, 24, 32)
    assert volume_info("phantom:16x24x32").spacing == (25.0, 400 / 24, 12.5)
    for bad in ("phantom:", "phantom:12y", "phantom:1x2", "mni:big"):
        with pytest.raises(DataError, match=r"malformed .* spec; use"):
            load_input(bad)


@pytest.mark.parametrize(
    ("source", "suffix"),
    [("nifti", ".nii.gz"), ("dicom", ".nii.gz"), ("zarr", ".zarr"), ("tiff", ".tif"), ("npy", ".npy"),
     ("npz", ".npy"), ("phantom", ".npy"), ("mni", ".nii.gz"), ("nrrd", ".nrrd"), ("metaimage", ".mha")],
)  # fmt: skip
def test_write_prediction_format_family(tmp_path, sample, source, suffix):
    """One process writes the prediction in the input's family; several processes, each
    writing its own boxes into the same staged file (:mod:`data_tools.blockfile` through
    :class:`~workbench.app.prediction_output.PredictionOutput`), give the same file: name,
    data, affine and spacing (NIfTI: the header byte for byte)."""
    from data_tools.blockfile import prediction_geometry
    from workbench.app.prediction_output import PredictionOutput, choose_suffix

    inputs = {
        "nifti": lambda: write_volume(sample, tmp_path / "in.nii.gz"),
        "dicom": lambda: (_oblique_series(tmp_path), tmp_path / "series")[1],
        "zarr": lambda: write_volume(sample, tmp_path / "in.zarr"),
        "tiff": lambda: write_volume(sample, tmp_path / "in.tif"),
        "npy": lambda: write_volume(sample, tmp_path / "in.npy"),
        "npz": lambda: write_volume(sample, tmp_path / "in.npz"),
        "phantom": lambda: "phantom:24",
        "mni": lambda: "mni:24",
        "nrrd": lambda: write_volume(sample, tmp_path / "in.nrrd"),
        "metaimage": lambda: write_volume(sample, tmp_path / "in.mhd"),
    }
    path = inputs[source]()
    like = load_input(str(path))
    pred = (np.arange(np.prod(like.shape)) % 3).reshape(like.shape).astype(np.uint8)
    out = write_prediction(pred, like, tmp_path / "out")
    assert out == tmp_path / "out" / f"prediction{suffix}"
    assert os.listdir(tmp_path / "out") == [out.name]
    back = read_volume(out)
    np.testing.assert_array_equal(back.array, pred)
    if suffix != ".npy":
        np.testing.assert_allclose(back.affine, like.affine, atol=1e-4)
    # block by block, as the processes of a multi-process run write it
    info = volume_info(str(path))
    assert choose_suffix("auto", info.source_format, info.shape) == (suffix, None)
    staged = tmp_path / "staged"
    staged.mkdir()
    block = tuple(-(-n // 2) for n in like.shape)  # a 2x2x2 mesh's blocks, uneven at the far faces
    output = PredictionOutput(staged, suffix, like.shape, block, prediction_geometry(str(path), info))
    output.create()
    for z in (0, block[0]):
        for y in (0, block[1]):
            for x in (0, block[2]):
                box = tuple((a, min(a + b, n)) for a, b, n in zip((z, y, x), block, like.shape))
                output.write(box, pred[tuple(slice(a, b) for a, b in box)])
    assert output.finish() == out.name and os.listdir(staged) == [out.name]
    blocks = read_volume(staged / out.name)
    np.testing.assert_array_equal(blocks.array, back.array)
    assert blocks.array.dtype == back.array.dtype
    assert np.array_equal(blocks.affine, back.affine) and blocks.spacing == back.spacing
    if suffix == ".nii.gz":
        assert nib.load(staged / out.name).header.binaryblock == nib.load(out).header.binaryblock


def test_prediction_output_choices():
    """``--output-format``: auto follows the input's family up to ZARR_ABOVE_VOXELS, then zarr
    (and says so); a named format is written at any size."""
    from workbench.app.prediction_output import ZARR_ABOVE_VOXELS, choose_suffix

    assert choose_suffix("auto", "tiff", (1024, 1024, 1024)) == (".tif", None)
    assert ZARR_ABOVE_VOXELS == 1024**3
    suffix, note = choose_suffix("auto", "nifti", (1024, 1024, 1025))
    assert suffix == ".zarr" and "over 1,073,741,824): written as prediction.zarr" in note
    assert "--output-format nii.gz writes .nii.gz instead" in note
    assert choose_suffix("nii", "nifti", (2048,) * 3) == (".nii", None)
    assert choose_suffix("zarr", "tiff", (8, 8, 8)) == (".zarr", None)


def test_write_prediction_keeps_nifti_header_codes(tmp_path):
    img = nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), np.diag([1.5, 1.5, 3.0, 1.0]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=4)
    img.to_filename(tmp_path / "ct.nii.gz")
    like = read_volume(tmp_path / "ct.nii.gz")
    out = write_prediction(np.ones(like.shape, np.uint8), like, tmp_path, name="seg")
    h = nib.load(out).header
    assert out.name == "seg.nii.gz" and int(h["sform_code"]) == 4 and h.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(nib.load(out).affine, img.affine)
    with pytest.raises(DataError, match=r"prediction: has shape \(1, 2, 3\), the input \(7, 6, 5\); crop"):
        write_prediction(np.zeros((1, 2, 3)), like, tmp_path)


def test_foreign_ome_zarr_04_and_imagej_tiff(tmp_path):
    import tifffile
    import zarr

    # OME-Zarr 0.4 (zarr v2) as written by other tools: (t, c, z, y, x), micrometre units
    data = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(1, 1, 3, 4, 5)
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=data.shape, dtype="uint16", chunks=(1, 1, 3, 4, 5))[...] = data
    axes = [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"
    ]
    scale = [{"type": "scale", "scale": [1.0, 1.0, 2000.0, 500.0, 250.0]}]
    datasets = [{"path": "0", "coordinateTransformations": scale}]
    root.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": datasets}]
    vol = read_volume(tmp_path / "img.ome.zarr")
    assert vol.shape == (3, 4, 5) and vol.spacing == (2.0, 0.5, 0.25)
    np.testing.assert_array_equal(vol.array, data[0, 0])
    box = read_box(tmp_path / "img.ome.zarr", ((1, 3), (0, 2), (4, 5)))
    np.testing.assert_array_equal(box, data[0, 0, 1:3, 0:2, 4:5])
    # an ImageJ stack from Fiji: z spacing in metadata, x/y from resolution tags, microns
    tifffile.imwrite(tmp_path / "fiji.tif", data[0, 0], imagej=True, resolution=(1 / 0.5, 1 / 0.25),
                     metadata={"spacing": 2.0, "unit": "micron", "axes": "ZYX"})  # fmt: skip
    t = read_volume(tmp_path / "fiji.tif")
    np.testing.assert_allclose(t.spacing, (0.002, 0.00025, 0.0005))  # (z, y, x) mm
    assert t.metadata["spacing_source"] == "imagej"
    np.testing.assert_array_equal(t.array, data[0, 0])
    # a plain multi-page TIFF with no units: 1 mm, said so
    tifffile.imwrite(tmp_path / "plain.tif", data[0, 0], metadata=None, photometric="minisblack")
    p = read_volume(tmp_path / "plain.tif")
    assert p.spacing == (1.0, 1.0, 1.0) and p.metadata["spacing_source"] == "default"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiff_with_three_slices_is_not_rgb(tmp_path, dtype):
    vol = Volume(np.arange(3 * 4 * 5, dtype=dtype).reshape(3, 4, 5), spacing=(3.0, 1.0, 1.0))
    back = read_volume(write_volume(vol, tmp_path / "three.tif"))
    np.testing.assert_array_equal(back.array, vol.array)
    assert back.spacing == (3.0, 1.0, 1.0)


@pytest.mark.parametrize("compressed", [True, False])
def test_npz_member_box_reads_only_the_box(tmp_path, compressed):
    """An .npz member by box equals the slice (image and labels, compressed or stored); a
    compressed member keeps only the z slab (tracemalloc peak well below the volume)."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(128, 64, 64)).astype(np.float32)
    labels = rng.integers(0, 4, image.shape).astype(np.uint8)
    path = tmp_path / "case.npz"
    (np.savez_compressed if compressed else np.savez)(path, image=image, labels=labels)
    for box in [((0, 128), (0, 64), (0, 64)), ((5, 9), (3, 31), (7, 8)), ((127, 128), (63, 64), (0, 64))]:
        sl = tuple(slice(*b) for b in box)
        assert np.array_equal(read_box(path, box), image[sl])
        assert np.array_equal(read_box(path, box, member="labels"), labels[sl])
    assert volume_info(path).shape == image.shape
    block, peak = _traced_peak(read_box, path, ((100, 104), (0, 64), (0, 64)))
    assert np.array_equal(block, image[100:104])
    assert peak < image.nbytes / 4, peak
    with pytest.raises(DataError, match="holds no array named 'weights'"):
        read_box(path, ((0, 1),) * 3, member="weights")
