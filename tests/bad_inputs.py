"""The catalogue of bad inputs: one table, run by ``tests/test_bad_inputs.py`` and written
to ``docs/errors.md`` by ``python -m tests.bad_inputs --write docs/errors.md``.

Each :class:`Case` builds its input in a fresh folder (``setup``), then either runs the
``workbench`` command line in this process (``argv``; outputs go to ``{tmp}/out``) or
calls the Python API, the notebook panel or the napari reader (``call``: raises a user
error, or returns the one line the front end shows). ``expect`` is a substring of the
message; ``RUNS`` marks an input that is valid and must run exactly (``check`` then
checks the result).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RUNS = "runs"
TINY = '{"depth": 2, "base_filters": 4, "num_classes": 3}'


@dataclass(frozen=True)
class Case:
    id: str
    surface: str  # cli | python | panel | napari | dataset | checkpoint | result folder | multi-process
    what: str
    expect: str
    argv: tuple = ()
    setup: Callable | None = None
    call: Callable | None = None
    env: tuple = ()
    check: Callable | None = None


@dataclass
class Outcome:
    status: int | str  # exit status (CLI), "raised"/"shown" (Python), "runs"
    message: str  # the one line (CLI: the last stderr line)
    stderr: str = ""


CASES: list[Case] = []


def case(id, surface, what, expect, *argv, **kw) -> None:
    CASES.append(Case(id, surface, what, expect, tuple(argv), **kw))


# -- builders ----------------------------------------------------------------------------------
def _npy(array, name="scan.npy"):
    return lambda tmp: np.save(tmp / name, array)


def _bytes(name, data):
    return lambda tmp: (tmp / name).write_bytes(data)


def _cut(writer, name, keep=0.5, flip=False):
    """Write a valid file with ``writer(path)``, then cut it (or flip bytes in its body)."""

    def build(tmp):
        full = tmp / f"full-{name}"
        writer(full)
        raw = bytearray(full.read_bytes())
        full.unlink() if full.is_file() else shutil.rmtree(full)
        if flip:
            start = len(raw) // 2
            raw[start : start + 64] = bytes(64)
            raw[start + 100 : start + 164] = b"\xff" * 64
        else:
            raw = raw[: int(len(raw) * keep)]
        (tmp / name).write_bytes(bytes(raw))

    return build


def _volume(shape=(20, 20, 20), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _nifti(array):
    import nibabel as nib

    return lambda path: nib.Nifti1Image(array, np.eye(4)).to_filename(path)


def _tiff(array):
    import tifffile

    return lambda path: tifffile.imwrite(path, array)


def _itk(array, *, vector=False, series=1, compress=False):
    """A writer of ``array`` as NRRD / MetaImage (by the path's suffix) through SimpleITK;
    ``series`` > 1: a 4-D image of that many copies."""

    def write(path):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(array, isVector=vector)
        if series > 1:
            image = sitk.JoinSeries([image] * series)
        sitk.WriteImage(image, str(path), compress)

    return write


def _mhd_without_data(tmp):
    _itk(_volume((4, 4, 4)))(tmp / "scan.mhd")
    (tmp / "scan.raw").unlink()


def _zarr(array, name="scan.zarr"):
    def build(tmp):
        import zarr

        zarr.save_array(str(tmp / name), array)

    return build


def _dicom_missing_slice(tmp):
    from data_tools import Volume, write_dicom_series

    write_dicom_series(Volume(_volume((6, 8, 8))), tmp / "dicom", series_uid="1.2.826.0.1.1")
    files = sorted((tmp / "dicom").iterdir())
    files[3].unlink()


def _dicom_corrupt(tmp):
    from data_tools import Volume, write_dicom_series

    write_dicom_series(Volume(_volume((4, 8, 8))), tmp / "dicom")
    victim = sorted((tmp / "dicom").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:-40])


def _weights(tmp, preset=TINY, name="weights.msgpack"):
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import save_weights

    config = UNetConfig(**json.loads(preset)) if preset.startswith("{") else UNetConfig.preset(preset)
    save_weights(tmp / name, Model.init(config, seed=0))


def _truncated_weights(tmp):
    _weights(tmp)
    raw = (tmp / "weights.msgpack").read_bytes()
    (tmp / "weights.msgpack").write_bytes(raw[: len(raw) // 3])


def _relabelled_weights(tmp):
    """A weights file whose config says depth 3 but whose arrays are of depth 2."""
    from flax import serialization

    _weights(tmp)
    payload = serialization.msgpack_restore((tmp / "weights.msgpack").read_bytes())
    entry = json.loads(payload["config"])  # {"schema", "kind": "unet", "config": UNetConfig fields}
    entry["config"]["depth"] = 3
    payload["config"] = json.dumps(entry)
    (tmp / "weights.msgpack").write_bytes(serialization.msgpack_serialize(payload))


def _result(tmp, *, report=None, prediction=None):
    """A small hand-made result folder: report.json and prediction.npy."""
    from workbench.mesh import ShardLayout

    out = tmp / "result"
    out.mkdir()
    layout = ShardLayout((8, 8, 8), "2x1x1", multiple=2)
    boxes = [[list(b) for b in s.valid_box] for s in layout.shards()]
    base = {
        "input_shape": [8, 8, 8],
        "mesh": "2x1x1",
        "halo": "exact",
        "model": {"depth": 2},
        "prediction": "prediction.npy",
        "per_shard": [{"box": b} for b in boxes],
    }
    (out / "report.json").write_text(report if isinstance(report, str) else json.dumps({**base, **(report or {})}))
    np.save(out / "prediction.npy", np.zeros((8, 8, 8), np.uint8) if prediction is None else prediction)


def _dataset(problem):
    """A copy of the MSD phantom dataset broken as tests/test_datasets.py's BAD[problem]."""

    def build(tmp):
        from test_datasets import BAD

        from data_tools.datasets import write_phantom_dataset

        ds = write_phantom_dataset(tmp / "Task01_Phantom", cases=6, test=0)
        BAD[problem][0](ds)

    return build


def _load_result(tmp):
    from workbench.app import load_result

    load_result(tmp / "result")


def _napari_read(tmp):
    from napari.utils.notifications import notification_manager

    from workbench.ui.napari.reader import read_result_folder

    seen = []
    notification_manager.notification_ready.connect(lambda n: seen.append(n.message))
    read_result_folder(str(tmp / "result"))
    return seen[-1]


def _bytes_at(tmp, name, data) -> str:
    path = Path(tmp) / name
    path.write_bytes(data)
    return str(path)


def _two_channel_plans(tmp) -> str:
    from workbench.analysis.nnunet_memory import spec_plans
    from workbench.model.spec import NetworkSpec

    spec = NetworkSpec.plain(in_channels=2, num_outputs=3, kernels=[(3, 3, 3)] * 2, strides=[(1, 1, 1), (2, 2, 2)],
                             features=[4, 8], blocks=[1, 1])  # fmt: skip
    return _bytes_at(tmp, "two_channels.json", json.dumps(spec_plans(spec)).encode())


def _panel(**values):
    """Set the panel's controls (a value may be ``{tmp}``-templated or a ``tmp -> value`` builder) and click Run."""

    def call(tmp):
        from workbench.app.planning import MemoryEstimator
        from workbench.ui.panel import WorkbenchPanel

        p = WorkbenchPanel(
            "phantom:16", mesh="2x2x2", estimate="off", estimator=MemoryEstimator(lambda key: {"peak": 0})
        )
        for name, value in values.items():
            value = value(tmp) if callable(value) else value
            getattr(p, name).value = value.format(tmp=tmp) if isinstance(value, str) else value
        p.run_button.click()
        return p.error

    return call


def _settings(**env):
    def call(tmp):
        from workbench.execute.distributed import settings_from_env

        settings_from_env({f"WORKBENCH_{k.upper()}": v for k, v in env.items()})

    return call


IN = "{tmp}/scan.npy"
INFER = ("infer", "--mesh", "2x2x2", "--out", "{tmp}/out")
TINY_ARGS = ("--random-weights",)

# -- data files of every format ----------------------------------------------------------------
F = "cli"
case("npy-empty", F, ".npy of 0 bytes", "the file is empty (0 bytes)", *INFER, IN, setup=_bytes("scan.npy", b""))
case(
    "npy-truncated",
    F,
    ".npy cut in half",
    "not a readable numpy file (Failed to read all data",
    *INFER,
    IN,
    setup=_cut(lambda p: np.save(p, _volume()), "scan.npy"),
)
case("npy-bad-header", F, ".npy whose header is garbage", "has a damaged .npy header", *INFER, IN,
     setup=_bytes("scan.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz!', }\n" + bytes(64)))  # fmt: skip
case(
    "npy-2d",
    F,
    "a 2-D .npy",
    "the image has 2 dimensions (8, 8), expected 3 (Z, Y, X)",
    *INFER,
    IN,
    setup=_npy(np.zeros((8, 8), np.float32)),
)
case(
    "npy-4d",
    F,
    "a 4-D .npy",
    "the image has 4 dimensions (2, 8, 8, 8), expected 3",
    *INFER,
    IN,
    setup=_npy(np.zeros((2, 8, 8, 8), np.float32)),
)
case(
    "npy-complex",
    F,
    "complex64 voxels",
    "the image has dtype complex64, expected real numbers",
    *INFER,
    IN,
    setup=_npy(np.zeros((8, 8, 8), np.complex64)),
)
case(
    "npy-object",
    F,
    "an object array (pickled)",
    "holds Python objects (a pickled array), not numbers",
    *INFER,
    IN,
    setup=_npy(np.empty((2, 2, 2), object)),
)
case(
    "npy-string",
    F,
    "a string array",
    "the image has dtype <U1, expected real numbers",
    *INFER,
    IN,
    setup=_npy(np.full((4, 4, 4), "a")),
)
case(
    "npy-nan",
    F,
    "NaN voxels",
    "512 voxel(s) are NaN or infinite",
    *INFER,
    IN,
    setup=_npy(np.full((8, 8, 8), np.nan, np.float32)),
)
case(
    "npy-inf",
    F,
    "an infinite voxel",
    "64 voxel(s) are NaN or infinite",
    *INFER,
    IN,
    setup=_npy(np.where(np.eye(8)[None] > 0, np.inf, 0) + np.zeros((8, 8, 8))),
)
case(
    "npy-zero-size",
    F,
    "a (0, 8, 8) array",
    "the image is empty, shape (0, 8, 8)",
    *INFER,
    IN,
    setup=_npy(np.zeros((0, 8, 8), np.float32)),
)
case("npz-no-image", F, ".npz without an image array", "none is named 'image'", *INFER, "{tmp}/scan.npz",
     setup=lambda tmp: np.savez(tmp / "scan.npz", foo=np.zeros((8, 8, 8)), bar=np.ones(3)))  # fmt: skip
case("npz-truncated", F, ".npz cut short", "not a readable numpy file, truncated?", *INFER, "{tmp}/scan.npz",
     setup=_cut(lambda p: np.savez(p, image=_volume()), "scan.npz", keep=0.6))  # fmt: skip
case(
    "nii-empty",
    F,
    ".nii.gz of 0 bytes",
    "the file is empty (0 bytes)",
    *INFER,
    "{tmp}/scan.nii.gz",
    setup=_bytes("scan.nii.gz", b""),
)
case("nii-truncated", F, ".nii.gz cut in half", "truncated gzip stream", *INFER, "{tmp}/scan.nii.gz",
     setup=_cut(_nifti(_volume()), "scan.nii.gz"))  # fmt: skip
case("nii-corrupt-body", F, ".nii.gz with damaged compressed bytes", "truncated gzip stream", *INFER, "{tmp}/scan.nii.gz",
     setup=_cut(_nifti(_volume((40, 40, 40))), "scan.nii.gz", flip=True))  # fmt: skip
case("nii-header-only", F, ".nii cut after its header", "shorter than its header says", *INFER, "{tmp}/scan.nii",
     setup=_cut(_nifti(_volume()), "scan.nii", keep=0.05))  # fmt: skip
case("nii-4d", F, "a 4-D NIfTI (time series)", "has 4 dimensions", *INFER, "{tmp}/scan.nii.gz",
     setup=lambda tmp: _nifti(np.zeros((4, 5, 6, 3), np.float32))(tmp / "scan.nii.gz"))  # fmt: skip
case("nii-complex", F, "a complex NIfTI", "the image has dtype complex64, expected real numbers", *INFER, "{tmp}/scan.nii.gz",
     setup=lambda tmp: _nifti(np.zeros((6, 6, 6), np.complex64))(tmp / "scan.nii.gz"))  # fmt: skip
case("nii-random", F, "random bytes named .nii", "unknown format (file starts with", *INFER, "{tmp}/scan.nii",
     setup=_bytes("scan.nii", np.random.default_rng(0).bytes(2000)))  # fmt: skip
case(
    "tif-empty",
    F,
    ".tif of 0 bytes",
    "the file is empty (0 bytes)",
    *INFER,
    "{tmp}/scan.tif",
    setup=_bytes("scan.tif", b""),
)
case(
    "tif-truncated",
    F,
    ".tif cut in half",
    "the TIFF body is incomplete or damaged",
    *INFER,
    "{tmp}/scan.tif",
    setup=_cut(_tiff(_volume()), "scan.tif"),
)
case("tif-corrupt", F, "random bytes after a TIFF magic", "the TIFF body is incomplete or damaged", *INFER, "{tmp}/scan.tif",
     setup=_bytes("scan.tif", b"II*\x00" + np.random.default_rng(1).bytes(500)))  # fmt: skip
case("tif-2d", F, "a single 2-D TIFF page", "expected a 3-D stack (Z, Y, X)", *INFER, "{tmp}/scan.tif",
     setup=lambda tmp: _tiff(np.zeros((16, 16), np.float32))(tmp / "scan.tif"))  # fmt: skip
case("nrrd-empty", F, ".nrrd of 0 bytes", "the file is empty (0 bytes)", *INFER, "{tmp}/scan.nrrd",
     setup=_bytes("scan.nrrd", b""))  # fmt: skip
case("nrrd-truncated", F, ".nrrd cut in half", "the file is shorter than its header says (truncated or damaged)",
     *INFER, "{tmp}/scan.nrrd", setup=_cut(_itk(_volume()), "scan.nrrd"))  # fmt: skip
case("nrrd-gzip-truncated", F, "a gzip-encoded .nrrd cut short", "the compressed NRRD data are truncated or damaged",
     *INFER, "{tmp}/scan.nrrd", setup=_cut(_itk(_volume(), compress=True), "scan.nrrd", keep=0.9))  # fmt: skip
case("nrrd-header-cut", F, ".nrrd cut inside its header", "the NRRD header is incomplete or damaged", *INFER,
     "{tmp}/scan.nrrd", setup=_cut(_itk(_volume((4, 4, 4))), "scan.nrrd", keep=0.1))  # fmt: skip
case("nrrd-2d", F, "a 2-D NRRD", "the image has 2 dimensions (x, y) = (16, 16), expected 3", *INFER,
     "{tmp}/scan.nrrd", setup=lambda tmp: _itk(np.zeros((16, 16), np.float32))(tmp / "scan.nrrd"))  # fmt: skip
case("nrrd-vector", F, "a NRRD of RGB voxels", "holds 3 values per voxel (vector of 8-bit unsigned integer)", *INFER,
     "{tmp}/scan.nrrd", setup=lambda tmp: _itk(np.zeros((8, 8, 8, 3), np.uint8), vector=True)(tmp / "scan.nrrd"))  # fmt: skip
case("mha-truncated", F, ".mha cut in half", "the file is shorter than its header says (truncated or damaged)",
     *INFER, "{tmp}/scan.mha", setup=_cut(_itk(_volume()), "scan.mha"))  # fmt: skip
case("mha-header-cut", F, ".mha cut inside its header", "the MetaImage header is incomplete or damaged", *INFER,
     "{tmp}/scan.mha", setup=_cut(_itk(_volume((4, 4, 4))), "scan.mha", keep=0.1))  # fmt: skip
case("mha-4d", F, "a 4-D MetaImage (time series)", "the image has 4 dimensions (x, y, z, ...) = (8, 8, 8, 2)",
     *INFER, "{tmp}/scan.mha", setup=lambda tmp: _itk(_volume((8, 8, 8)), series=2)(tmp / "scan.mha"))  # fmt: skip
case("mhd-no-data", F, "an .mhd header whose .raw is missing", "names the data file 'scan.raw', which does not exist",
     *INFER, "{tmp}/scan.mhd", setup=_mhd_without_data)  # fmt: skip
case(
    "zarr-empty",
    F,
    "an empty .zarr folder",
    "the folder is empty",
    *INFER,
    "{tmp}/scan.zarr",
    setup=lambda tmp: (tmp / "scan.zarr").mkdir(),
)
case(
    "zarr-2d",
    F,
    "a 2-D zarr array",
    "zarr array has shape (8, 8), expected 3 spatial dimensions",
    *INFER,
    "{tmp}/scan.zarr",
    setup=_zarr(np.zeros((8, 8), np.float32)),
)
case(
    "dicom-missing-slice",
    F,
    "a DICOM series missing a slice",
    "has uneven slice gaps (1 to 2 mm; missing slices?)",
    *INFER,
    "{tmp}/dicom",
    setup=_dicom_missing_slice,
)
case(
    "dicom-corrupt",
    F,
    "a DICOM file cut short",
    "slice0001.dcm: cannot decode pixel data (The number of bytes of pixel data is less than expected",
    *INFER,
    "{tmp}/dicom",
    setup=_dicom_corrupt,
)
case(
    "unknown-format",
    F,
    "a .txt file",
    "scan.txt: unknown format",
    *INFER,
    "{tmp}/scan.txt",
    setup=_bytes("scan.txt", b"hello"),
)
case("missing-file", F, "a path that does not exist", "no such file or folder", *INFER, "{tmp}/nope.nii.gz")
case("phantom-spec", F, "a malformed phantom spec", "write phantom, phantom:N", *INFER, "phantom:big")
case("prime-sized", F, "a 7×11×13 volume (prime sides: padded, cropped back)", RUNS,
     "infer", "--mesh", "1x1x1", "--out", "{tmp}/out", IN, *TINY_ARGS, setup=_npy(_volume((7, 11, 13))),
     check=lambda tmp: np.load(tmp / "out" / "prediction.npy").shape == (7, 11, 13))  # fmt: skip
case("one-voxel-thick", F, "a 1×12×12 volume (one slice thick)", RUNS,
     "infer", "--mesh", "1x1x1", "--out", "{tmp}/out", IN, *TINY_ARGS, setup=_npy(_volume((1, 12, 12))),
     check=lambda tmp: np.load(tmp / "out" / "prediction.npy").shape == (1, 12, 12))  # fmt: skip

# -- mesh specs, halo, backend, resolutions, model configs ---------------------------------------
V = ("infer", IN, "--out", "{tmp}/out")
VOL = _npy(_volume((8, 8, 8)))
case("mesh-2-axes", F, "--mesh 2x2", "invalid mesh '2x2'", *V, "--mesh", "2x2", setup=VOL)
case("mesh-zero", F, "--mesh 0x1x1", "invalid mesh '0x1x1': sizes must be >= 1", *V, "--mesh", "0x1x1", setup=VOL)
case("mesh-words", F, "--mesh banana", "invalid mesh 'banana'", *V, "--mesh", "banana", setup=VOL)
case(
    "mesh-too-big",
    F,
    "--mesh 4x4x2 on 8 devices",
    "needs 32 devices but 8 are available",
    *V,
    "--mesh",
    "4x4x2",
    setup=VOL,
)
case(
    "mesh-data-infer",
    F,
    "a data-parallel mesh for inference",
    "batch of 1 does not split over data=2",
    *V,
    "--mesh",
    "data=2,z=2,y=2,x=1",
    setup=VOL,
)
case("halo-negative", F, "--halo -1", "halo width -1 must be >= 0", *V, "--mesh", "2x2x2", "--halo", "-1", setup=VOL)
case(
    "halo-odd",
    F,
    "--halo 6 (not a multiple of 4)",
    "must be a multiple of 4",
    *V,
    "--mesh",
    "2x2x2",
    "--halo",
    "6",
    setup=VOL,
)
case(
    "halo-unknown",
    F,
    "--halo mirror",
    "unknown halo mode 'mirror'",
    *V,
    "--mesh",
    "2x2x2",
    "--halo",
    "mirror",
    setup=VOL,
)
case(
    "comm-overlap-unknown",
    F,
    "infer --comm-overlap yes",
    "--comm-overlap 'yes' is unknown; use one of auto, on, off",
    *V,
    "--mesh",
    "2x2x2",
    "--comm-overlap",
    "yes",
    setup=VOL,
)
case("train-comm-overlap", F, "train --comm-overlap yes", "comm_overlap='yes'; use one of ('auto', 'on', 'off')",
     "train", "--data", "phantom", "--comm-overlap", "yes", "--checkpoint-dir", "{tmp}/out")  # fmt: skip
case(
    "backend-unknown",
    F,
    "--backend tpu",
    "--backend 'tpu' is unknown",
    *V,
    "--mesh",
    "2x2x2",
    "--backend",
    "tpu",
    setup=VOL,
)
case(
    "model-unknown",
    F,
    "--model huge",
    "unknown model preset 'huge'",
    *V,
    "--mesh",
    "2x2x2",
    "--model",
    "huge",
    setup=VOL,
)
P = ("plan", "--mesh", "2x2x2")
case("resolution-zero", F, "plan --resolution 0", "resolution '0' is not a size", *P, "--resolution", "0")
case("resolution-2d", F, "plan --resolution 64x64", "resolution '64x64' is not a size", *P, "--resolution", "64x64")
case("resolution-words", F, "plan --resolution big", "resolution 'big' is not a size", *P, "--resolution", "big")
case(
    "resolution-uneven",
    F,
    "plan --resolution 30 on 2x2x2 (odd shards)",
    "does not split evenly over mesh 2x2x2",
    *P,
    "--resolution",
    "30",
)
case("train-resolution", F, "train --resolution -8", "argument --resolution: -8 must be >= 1", "train", "--data", "phantom", "--resolution", "-8",
     "--checkpoint-dir", "{tmp}/out")  # fmt: skip
case(
    "model-config-json",
    F,
    "--model-config with broken JSON",
    "--model-config is not valid JSON",
    *P,
    "--resolution",
    "32",
    "--model-config",
    "{depth: 2",
)
case("model-config-field", F, "--model-config with an unknown field", "unknown UNetConfig field 'colour'", *P, "--resolution", "32",
     "--model-config", '{"depth": 2, "colour": "red"}')  # fmt: skip
case(
    "model-config-value",
    F,
    "--model-config depth 0",
    "depth=0 must be an integer in 1..7",
    *P,
    "--resolution",
    "32",
    "--model-config",
    '{"depth": 0}',
)
case(
    "model-config-list",
    F,
    "--model-config that is a list",
    "a model config is a JSON object of UNetConfig fields, not list",
    *P,
    "--resolution",
    "32",
    "--model-config",
    "[2, 4]",
)
case(
    "train-steps",
    F,
    "train --steps 0",
    "argument --steps: 0 must be >= 1",
    "train",
    "--steps",
    "0",
    "--checkpoint-dir",
    "{tmp}/out",
)
case("train-patch", F, "train --patch that is not ZxYxX", "argument --patch: '24x24': give one or three positive voxel counts",
     "train", "--patch", "24x24", "--checkpoint-dir", "{tmp}/out")  # fmt: skip
case("train-foreground", F, "train --patch with --foreground-oversampling 1.5",
     "foreground_oversampling=1.5 must be in [0, 1]", "train", "--patch", "16", "--foreground-oversampling", "1.5",
     "--checkpoint-dir", "{tmp}/out")  # fmt: skip
case("train-data", F, "train --data on a missing folder", "nowhere: no such file or folder", "train", "--data", "{tmp}/nowhere", "--steps", "1",
     "--checkpoint-dir", "{tmp}/out")  # fmt: skip
case("out-is-file", F, "--out names an existing file", "out.txt is a file; choose a folder path", *INFER[:-1], "{tmp}/out.txt", IN,
     setup=lambda tmp: (VOL(tmp), (tmp / "out.txt").write_text("mine")))  # fmt: skip
case("out-not-empty", F, "--out holds files (no --overwrite)", "already holds files", *INFER, IN,
     setup=lambda tmp: (VOL(tmp), (tmp / "out").mkdir(), (tmp / "out" / "notes.txt").write_text("mine")))  # fmt: skip

# -- checkpoints -------------------------------------------------------------------------------
C = "checkpoint"
CK = ("infer", IN, "--mesh", "2x2x2", "--out", "{tmp}/out", "--checkpoint")
case(
    "weights-missing",
    C,
    "--checkpoint that does not exist",
    "nope.msgpack does not exist",
    *CK,
    "{tmp}/nope.msgpack",
    setup=VOL,
)
case("weights-truncated", C, "a .msgpack cut short", "is not readable (ValueError: Unpack failed: incomplete input)", *CK, "{tmp}/weights.msgpack",
     setup=lambda tmp: (VOL(tmp), _truncated_weights(tmp)))  # fmt: skip
case("weights-garbage", C, "a .msgpack of random bytes", "weights.msgpack is not readable", *CK, "{tmp}/weights.msgpack",
     setup=lambda tmp: (VOL(tmp), _bytes("weights.msgpack", np.random.default_rng(2).bytes(300))(tmp)))  # fmt: skip
case("weights-other-model", C, "weights whose arrays belong to another model than their config", "does not match its own config", *CK, "{tmp}/weights.msgpack",
     setup=lambda tmp: (VOL(tmp), _relabelled_weights(tmp)))  # fmt: skip
case("checkpoint-empty-dir", C, "a training folder without checkpoints", "holds no checkpoint; pass a folder written by workbench train", *CK, "{tmp}/run",
     setup=lambda tmp: (VOL(tmp), (tmp / "run" / "checkpoints").mkdir(parents=True)))  # fmt: skip
case("checkpoint-other-preset", C, "--model paper with a checkpoint of another architecture",
     "--model paper (depth 4, base_filters 32, activation leaky_relu) is not the model in --checkpoint",
     *CK[:-1], "--model", "paper", "--checkpoint", "{tmp}/weights.msgpack",
     setup=lambda tmp: (VOL(tmp), _weights(tmp)))  # fmt: skip

# -- dataset folders (the breakages of tests/test_datasets.py) ------------------------------------
DATASET = {
    "no dataset.json": "has no dataset.json",
    "image without its label": "case phantom_003: image imagesTr/phantom_003.nii.gz has no label",
    "shapes differ": "has shape (16, 32, 30) (z, y, x) but the image has (16, 32, 32)",
    "label outside the classes": "holds label values [7] outside the 3 declared classes",
}
for problem in ("no dataset.json", "image without its label", "shapes differ", "label outside the classes"):
    case(f"dataset-{problem.replace(' ', '-').replace('.', '')}", "dataset", f"dataset folder: {problem}", DATASET[problem],
         "train", "--data", "{tmp}/Task01_Phantom", "--steps", "1", "--checkpoint-dir", "{tmp}/out",
         setup=_dataset(problem))  # fmt: skip


def _channels_dataset(problem):
    """The two-channel tumour phantom dataset broken as tests/test_dataset_channels.py's BAD[problem]."""

    def build(tmp):
        from test_dataset_channels import BAD as CHANNELS_BAD

        from data_tools.datasets import write_phantom_dataset

        ds = write_phantom_dataset(tmp / "Dataset002_Tumour", task="tumour", layout="nnunet", cases=5, test=0)
        CHANNELS_BAD[problem][0](ds)

    return build


for problem, expect in (
    ("missing channel", "case tumour_002: channel file imagesTr/tumour_002_0001.nii.gz is missing"),
    ("extra channel", "imagesTr/tumour_002_0002.nii.gz is channel 2 but dataset.json declares 2 channel(s)"),
    ("channel shapes differ", "case tumour_001: channel file imagesTr/tumour_001_0001.nii.gz has shape (32, 36, 32)"),
    ("regions without order", "declares region-based labels ['whole', 'core'] but \"regions_class_order\" is None"),
):
    case(f"dataset-{problem.replace(' ', '-')}", "dataset", f"2-channel dataset folder: {problem}", expect,
         "train", "--data", "{tmp}/Dataset002_Tumour", "--steps", "1", "--checkpoint-dir", "{tmp}/out",
         setup=_channels_dataset(problem))  # fmt: skip

# -- widget values: the notebook panel shows one red line ----------------------------------------
case("panel-resolution-words", "panel", "resolution box: 'big'", "resolution 'big' is not a size",
     call=_panel(resolution="big"))  # fmt: skip
case(
    "panel-resolution-zero", "panel", "resolution box: '0'", "resolution '0' is not a size", call=_panel(resolution="0")
)
case("panel-native-phantom", "panel", "resolution 'native' for a phantom", "a phantom has no native size",
     call=_panel(resolution="native"))  # fmt: skip
case("panel-data-parallel", "panel", "data-parallel 2 for inference", "data-parallel axis of 2", call=_panel(data=2))
case("panel-plans-missing", "panel", "model box: a plans file that does not exist",
     "is neither a preset (small, paper) nor an existing plans file", call=_panel(model="{tmp}/nnUNetPlans.json"))  # fmt: skip
case("panel-plans-no-dataset", "panel", "model box: nnUNetPlans.json without dataset.json beside it",
     "has no dataset.json beside it", call=_panel(model=lambda tmp: _bytes_at(tmp, "nnUNetPlans.json", b"{}")))  # fmt: skip
case("panel-plans-channels", "panel", "model box: a 2-channel plans network on the 1-channel phantom",
     "the volume has 1 channel but the plans network (PlainConvUNet of two_channels.json) takes 2", call=_panel(model=_two_channel_plans))  # fmt: skip

# -- result folders: workbench view, load_result, the napari reader --------------------------------
R = "result folder"
case("view-missing", R, "workbench view on a missing folder", "is not a result folder", "view", "{tmp}/result")
case("view-no-report", R, "a folder without report.json", "report.json: is missing", "view", "{tmp}/result",
     setup=lambda tmp: (tmp / "result").mkdir())  # fmt: skip
case("view-bad-json", R, "report.json that is not JSON", "is not valid JSON", "view", "{tmp}/result",
     setup=lambda tmp: _result(tmp, report="{not json"))  # fmt: skip
case("view-json-number", R, "report.json holding a number", "report.json: holds a JSON int, not an object", "view", "{tmp}/result",
     setup=lambda tmp: _result(tmp, report="3"))  # fmt: skip
case("view-wrong-shape", R, "a prediction of the wrong shape", "prediction.npy: has shape (4, 4, 4) but report.json says the volume is (8, 8, 8)", "view", "{tmp}/result",
     setup=lambda tmp: _result(tmp, prediction=np.zeros((4, 4, 4), np.uint8)))  # fmt: skip
case("load-result-boxes", "python", "load_result: per-shard boxes that do not match the mesh", "per_shard boxes do not match mesh 1x2x1",
     setup=lambda tmp: _result(tmp, report={"mesh": "1x2x1"}), call=_load_result)  # fmt: skip
case("napari-reader-prediction", "napari", "napari reader: a corrupt prediction.npy", "prediction.npy: is not a readable .npy file",
     setup=lambda tmp: (_result(tmp), (tmp / "result" / "prediction.npy").write_bytes(b"\x93NUMPY")),
     call=_napari_read)  # fmt: skip

# -- nnU-Net training folders: workbench infer CASE_0000 CASE_0001 --checkpoint FOLDER ---------------
NNUNET_RESULTS = (Path(__file__).parent / "fixtures" / "nnunet" / "results" / "Dataset903_ThickMRI"
                  / "nnUNetTrainer__nnUNetPlans__3d_fullres")  # fmt: skip
NN = "{tmp}/Dataset903_ThickMRI/nnUNetTrainer__nnUNetPlans__3d_fullres"
NN_CASE = ("{tmp}/imagesTs/case_0000.nii.gz", "{tmp}/imagesTs/case_0001.nii.gz")


def _nnunet(tmp, *, shape=(6, 24, 32), network_class=None, keep=None):
    """The fixture's training folder copied into ``tmp`` (plans edited, or only ``keep`` kept),
    and a 2-channel case of ``shape`` at the plan's spacing in ``tmp/imagesTs``."""
    from data_tools import Volume, write_volume

    folder = Path(_fill(NN, tmp))
    shutil.copytree(NNUNET_RESULTS, folder)
    if network_class is not None:
        plans = json.loads((folder / "plans.json").read_text())
        plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = network_class
        (folder / "plans.json").write_text(json.dumps(plans))
    if keep is not None:
        for item in folder.iterdir():
            if item.name not in keep:
                item.unlink() if item.is_file() else shutil.rmtree(item)
    (tmp / "imagesTs").mkdir()
    for c in range(2):
        image = np.random.default_rng(c).normal(300 + 600 * c, 50, shape).astype(np.float32)
        write_volume(Volume(image, spacing=(4.0, 0.6, 0.6)), tmp / "imagesTs" / f"case_{c:04d}.nii.gz")


N = "nnU-Net"
NNI = ("infer", *NN_CASE, "--mesh", "2x2x2", "--out", "{tmp}/out", "--checkpoint", NN)
case("nnunet-not-a-training-folder", N, "--checkpoint: a Trainer__Plans__Configuration folder without plans.json and dataset.json",
     "is not an nnU-Net training folder: it lacks plans.json and dataset.json", *NNI,
     setup=lambda tmp: _nnunet(tmp, keep={"fold_0"}))  # fmt: skip
case("nnunet-missing-fold", N, "--fold 3 of a folder trained on fold 0 only", "has no fold_3; use --fold with one of 0",
     *NNI, "--fold", "3", setup=_nnunet)  # fmt: skip
case("nnunet-unknown-network", N, "plans.json of a network class the workbench does not build",
     "plans network class 'dynamic_network_architectures.architectures.unet.ResidualDecoderUNet', which is not supported",
     *NNI, setup=lambda tmp: _nnunet(tmp, network_class="dynamic_network_architectures.architectures.unet.ResidualDecoderUNet"))  # fmt: skip
case("nnunet-channel-count", N, "one channel file for a 2-channel network",
     "1 input channel file(s) given (case_0000.nii.gz) but the network expects 2 (dataset.json's channel_names: 0 T2, 1 ADC)",
     "infer", NN_CASE[0], *NNI[3:], setup=_nnunet)  # fmt: skip
case("nnunet-mesh-split", N, "a mesh with more shards on x than the volume has voxels at the coarsest stride",
     "mesh x=8 cannot split the x axis", "infer", *NN_CASE, "--mesh", "1x1x8", *NNI[5:],
     setup=lambda tmp: _nnunet(tmp, shape=(6, 24, 16)))  # fmt: skip


# -- training nnU-Net networks: workbench train --plans PLANS | --checkpoint NNUNET_FOLDER ---------------
def _tiny_plans(tmp, dataset="iso_ct", dataset_json=None):
    """A shrunk nnU-Net plans file of the fixture's ``dataset`` in ``tmp/plans`` (tests/nnunet_plans_helpers.py)."""
    from importlib import import_module

    package = __name__.rpartition(".")[0]
    helpers = import_module(f"{package}.nnunet_plans_helpers" if package else "nnunet_plans_helpers")
    helpers.tiny_plans(tmp / "plans", dataset, dataset_json=dataset_json)


def _regions_without_order(tmp):
    dataset = json.loads((Path(__file__).parent / "fixtures" / "nnunet" / "iso_ct" / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "whole": [1, 2], "lesion": 2}
    _tiny_plans(tmp, dataset_json=dataset)


def _finetune_mismatch(tmp):
    """The fixture's training folder, its plans.json edited to wider features than its weights."""
    _nnunet(tmp)
    path = Path(_fill(NN, tmp)) / "plans.json"
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [6, 8, 16, 16]
    path.write_text(json.dumps(plans))


NT = ("train", "--data", "phantom", "--resolution", "16", "--steps", "1", "--checkpoint-dir", "{tmp}/out")
PLANS = "{tmp}/plans/nnUNetPlans.json"
case("train-plans-and-model", N, "train --plans with --model (both choose the network)",
     "--model small and --plans both choose the network; pass one of them", *NT, "--plans", PLANS, "--model", "small",
     setup=_tiny_plans)  # fmt: skip
case("train-plans-channels", N, "train --plans of a 2-channel dataset on 1-channel data",
     "has 1 channel(s) but the network planned by", *NT, "--plans", PLANS,
     setup=lambda tmp: _tiny_plans(tmp, "thick_mri"))  # fmt: skip
case("train-plans-regions-order", N, "train --plans whose dataset.json has region labels but no regions_class_order",
     "has 2 region labels (whole, lesion) but regions_class_order is None", *NT, "--plans", PLANS,
     setup=_regions_without_order)  # fmt: skip
case("train-finetune-tensors", N, "train --checkpoint NNUNET_FOLDER whose weights do not match its plans",
     "has shape (4, 2, 1, 3, 3) but the network planned by", *NT, "--checkpoint", NN,
     setup=_finetune_mismatch)  # fmt: skip
case("train-plans-patch-multiple", N, "train --plans with a --patch that is not a multiple of the network's strides",
     "--patch 9x16x16 is not a multiple of the network's size multiple 2x4x4", *NT, "--plans", PLANS,
     "--patch", "9x16x16", setup=_tiny_plans)  # fmt: skip


def _patch_budget(tmp):
    """``plan_patch`` of the tiny plans' network with a budget below its smallest patch's compiled step."""
    from workbench.analysis.patch_budget import plan_patch
    from workbench.model.nnunet_plans import load_plans_file

    _tiny_plans(tmp)
    plan_patch(load_plans_file(tmp / "plans" / "nnUNetPlans.json").spec, (2, 4, 4), 100_000)


case("patch-budget-too-small", N, "plan_patch (the patch study's --budget-gib): a budget below the smallest patch",
     "not even the smallest patch of this network (2x4x4, one size multiple per axis) fits the budget",
     call=_patch_budget)  # fmt: skip


def _nnunet_labels(tmp, shape=(6, 24, 32), dtype=np.uint8, value=1):
    """The nnU-Net case of :func:`_nnunet` and a label file ``{tmp}/nnunet_seg.nii.gz`` of ``shape``."""
    from data_tools import Volume, write_volume

    _nnunet(tmp)
    write_volume(Volume(np.full(shape, value, dtype), spacing=(4.0, 0.6, 0.6)), tmp / "nnunet_seg.nii.gz")


NNC = (*NNI, "--compare-with", "{tmp}/nnunet_seg.nii.gz")
case("nnunet-compare-missing", N, "--compare-with a file that does not exist",
     "nnunet_seg.nii.gz does not exist; pass nnU-Net's segmentation of the case", *NNC, setup=_nnunet)  # fmt: skip
case("nnunet-compare-shape", N, "--compare-with a segmentation of another shape than the case",
     "has shape (6, 24, 30) but the prediction of the case has (6, 24, 32)", *NNC,
     setup=lambda tmp: _nnunet_labels(tmp, shape=(6, 24, 30)))  # fmt: skip
case("nnunet-compare-not-labels", N, "--compare-with a volume of non-integer values (an image, not labels)",
     "is not a label map", *NNC, setup=lambda tmp: _nnunet_labels(tmp, dtype=np.float32, value=0.5))  # fmt: skip
case("nnunet-compare-reference", N, "--compare-with together with --reference",
     "--compare-with and --reference both fill the viewers' comparison; pass one of them", *NNC, "--reference",
     setup=_nnunet_labels)  # fmt: skip
case("nnunet-output-format", N, "--output-format with an nnU-Net training folder as --checkpoint",
     "--output-format applies to workbench's own models", *NNI, "--output-format", "tif", setup=_nnunet)  # fmt: skip
case("compare-with-not-nnunet", "cli", "--compare-with without an nnU-Net training folder as --checkpoint",
     "--compare-with applies to an nnU-Net training folder as --checkpoint; drop it", "infer", "phantom:8", "--mesh",
     "1x1x1", "--out", "{tmp}/out", "--compare-with", "{tmp}/seg.nii.gz")  # fmt: skip


def _tiny_dataset(tmp):
    from data_tools.synthetic.dataset import write_phantom_dataset

    write_phantom_dataset(tmp / "Dataset002_Tiny", cases=3, test=0, layout="nnunet", shapes=[(12, 16, 16)])


NP = ("plan", "--out", "{tmp}/out/plans.json")
case("nnunet-plan-not-a-dataset", N, "plan --data: a folder without dataset.json",
     "has no dataset.json (the MSD / nnU-Net description of the dataset)", *NP, "--data", "{tmp}")  # fmt: skip
case("nnunet-plan-planner", N, "plan --data --planner resenc-xxl", "--planner 'resenc-xxl' is unknown; use one of nnunet",
     *NP, "--data", "{tmp}", "--planner", "resenc-xxl")  # fmt: skip
case("nnunet-plan-nothing-fits", N, "plan --data with a budget no mesh up to --max-devices meets (--json: no progress lines)",
     "no mesh up to 1 device fits 0.0001 GiB/device: the smallest need found is", *NP, "--data", "{tmp}/Dataset002_Tiny",
     "--budget-gib", "0.0001", "--max-devices", "1", "--infer", "--dtype", "float32", "--json",
     setup=_tiny_dataset)  # fmt: skip
case("nnunet-plan-plans-mesh", N, "plan --plans FILE without --mesh", "--plans FILE needs --mesh M", "plan", "--plans",
     "{tmp}/plans.json")  # fmt: skip


# -- multi-process settings ---------------------------------------------------------------------
M = "multi-process"
MP = ("infer", "phantom:8", "--mesh", "1x1x1", "--out", "{tmp}/out")
case("env-processes", M, "WORKBENCH_NUM_PROCESSES=two", "must be an integer >= 1", *MP,
     env=(("WORKBENCH_COORDINATOR", "localhost:1"), ("WORKBENCH_NUM_PROCESSES", "two")))  # fmt: skip
case("env-coordinator", M, "WORKBENCH_COORDINATOR without a port", "must be host:port", *MP,
     env=(("WORKBENCH_COORDINATOR", "localhost"),))  # fmt: skip
case("env-startup-timeout", M, "WORKBENCH_STARTUP_TIMEOUT_SECONDS=soon", "must be a number of seconds > 0", *MP,
     env=(("WORKBENCH_COORDINATOR", "localhost:1"), ("WORKBENCH_NUM_PROCESSES", "2"), ("WORKBENCH_PROCESS_ID", "0"),
          ("WORKBENCH_LOCAL_DEVICES", "1"), ("WORKBENCH_STARTUP_TIMEOUT_SECONDS", "soon")))  # fmt: skip
case("env-process-id", M, "WORKBENCH_PROCESS_ID >= WORKBENCH_NUM_PROCESSES", "must be below", call=_settings(
     coordinator="localhost:1", num_processes="2", process_id="2", local_devices="1"))  # fmt: skip
case("launch-processes", M, "workbench launch --processes 0", "argument --processes: 0 must be >= 1", "launch", "--processes", "0", "--",
     "infer", "phantom:8", "--mesh", "1x1x1", "--out", "{tmp}/out")  # fmt: skip
case("launch-no-command", M, "workbench launch without a command", "no command given", "launch", "--processes", "2")
case(
    "launch-itself",
    M,
    "workbench launch launching itself",
    "'launch' cannot run as several processes",
    "launch",
    "--",
    "launch",
    "--",
    "plan",
)


def _evaluate_processes(backend):
    """What ``workbench launch -- evaluate`` checks before a case is read (in this one
    process: the check every process of a launch makes)."""

    def call(tmp):
        from workbench.app.evaluation_blocks import check_processes
        from workbench.app.models import ModelChoice
        from workbench.model.unet import Model, UNetConfig

        model = Model.init(UNetConfig.preset("small", depth=2, base_filters=4))
        check_processes(ModelChoice(model, "random", "tiny"), None, "auto", backend)

    return call


case("evaluate-processes-reference", M, "workbench launch -- evaluate --backend reference",
     "backend 'reference' runs on one device; run it as one process", call=_evaluate_processes("reference"))  # fmt: skip


# -- the runner ------------------------------------------------------------------------------------
def _fill(arg: str, tmp: Path) -> str:
    return arg.replace("{tmp}", str(tmp))


def _snapshot(tmp: Path) -> dict:
    return {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _as_a_fresh_process():
    """Logging as a fresh ``workbench`` process has it: no handler on the root logger (pytest
    installs its capturing ones), so a library's log record that is not held by the CLI
    would reach stderr through logging's last resort, and the case would see it."""
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = []
    try:
        yield
    finally:
        root.handlers[:] = saved


def run_case(c: Case, tmp: Path) -> Outcome:
    """Build ``c``'s input in ``tmp`` and run it; checks nothing (the test does)."""
    from workbench.errors import USER_ERRORS, one_line

    if c.setup is not None:
        c.setup(tmp)
    saved = {k: os.environ.get(k) for k, _ in c.env}
    os.environ.update(dict(c.env))
    try:
        if c.call is not None:
            try:
                shown = c.call(tmp)
            except USER_ERRORS as err:
                return Outcome("raised", one_line(err), str(err))
            return Outcome("shown" if shown else RUNS, shown or "", shown or "")
        from workbench.cli import main

        err = io.StringIO()
        with _as_a_fresh_process(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                status = main([_fill(a, tmp) for a in c.argv])
            except SystemExit as stop:  # argparse
                status = stop.code
        text = err.getvalue()
        lines = text.strip().splitlines()
        return Outcome(status, lines[-1] if lines else "", text)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def shown(message: str, tmp: Path) -> str:
    """The message as the docs show it: the case's folder written as ``…``."""
    return message.replace(str(tmp.resolve()), "…").replace(str(tmp), "…")


def markdown(outcomes: dict[str, str]) -> str:
    """docs/errors.md from ``{case id: message}``."""
    surfaces = list(dict.fromkeys(c.surface for c in CASES))
    lines = [
        "# Bad inputs and what the workbench answers",
        "",
        "Generated by `python -m tests.bad_inputs --write docs/errors.md` from the table in",
        "`tests/bad_inputs.py`; `tests/test_bad_inputs.py` runs every case through the real entry",
        "point and checks this file is up to date. On the command line each error is exit status 2",
        "and one line on stderr (after argparse's usage line for a malformed flag), no traceback,",
        "and no output folder; `…` is the folder the case was built in.",
        "",
        f"{len(CASES)} cases; {sum(c.expect == RUNS for c in CASES)} of them are valid inputs that must run.",
    ]
    for surface in surfaces:
        lines += ["", f"## {surface}", "", "| case | input | message |", "|---|---|---|"]
        for c in (c for c in CASES if c.surface == surface):
            text = outcomes[c.id].replace("|", "\\|")
            lines.append(f"| `{c.id}` | {c.what} | {'runs' if c.expect == RUNS else '`' + text + '`'} |")
    return "\n".join(lines) + "\n"


def collect(ids=None) -> dict[str, str]:
    outcomes = {}
    for c in CASES:
        if ids and c.id not in ids:
            continue
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            got = run_case(c, tmp)
            outcomes[c.id] = shown(got.message, tmp)
            print(f"{c.id:28s} {got.status!s:7s} {outcomes[c.id]}", file=sys.__stderr__)
    return outcomes


def _setup_jax() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from workbench.execute.devices import configure_cpu_devices

    configure_cpu_devices(8)
    sys.path.insert(0, str(Path(__file__).parent))  # test_datasets, as pytest imports it


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="MD", help="write the catalogue (docs/errors.md)")
    parser.add_argument("ids", nargs="*", help="only these cases (printed, not written)")
    args = parser.parse_args()
    _setup_jax()
    results = collect(set(args.ids))
    if args.write and not args.ids:
        Path(args.write).write_text(markdown(results))
        print(f"wrote {args.write} ({len(results)} cases)")
