"""Real sample data shipped inside nilearn: the MNI152 2009 T1 template with tissue labels.

nilearn installs ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz`` (a skull-stripped
T1, uint8) and the grey- and white-matter probability maps (``..._gm_...``,
``..._wm_...``, uint8 = probability x 255) in ``nilearn/datasets/data``: 197x233x189
voxels of 1 mm on disk, so ``(189, 233, 197)`` in this package's (Z, Y, X) order. No
network is needed.

Tissue labels (``class_names = ("background", "grey_matter", "white_matter", "csf")``):

- brain mask = T1 > 0 (the template is already brain-extracted);
- within the mask, p_csf = 1 - p_gm - p_wm (clipped at 0), and each voxel takes the
  class of the largest of (p_gm, p_wm, p_csf);
- a CSF vote only stands where the T1 is also dark, below the midpoint of the median T1
  of the CSF and grey-matter votes; brighter ones go to the larger of GM and WM.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from .errors import DataError
from .formats import nifti
from .preprocess import resample
from .volume import Volume

__all__ = ["MNI_CLASS_NAMES", "mni_files", "load_mni", "mni_native_files"]

MNI_CLASS_NAMES = ("background", "grey_matter", "white_matter", "csf")
_STEM = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def mni_files() -> dict[str, Path]:
    """Paths of the T1, GM and WM files inside the installed nilearn package."""
    import importlib.util

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mni", "the nilearn package is not installed", "pip install nilearn")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    files = {k: data / _STEM.format(k) for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DataError("mni", f"nilearn is installed without its MNI152 files {missing}",
                        "reinstall nilearn (pip install --force-reinstall nilearn)")  # fmt: skip
    return files


def _votes(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray):
    """(float32 image, uint8 votes 1 GM / 2 WM / 3 CSF / 0 outside the mask, gm, wm) per voxel."""
    gm = gm.astype(np.float32) / np.float32(255.0)
    wm = wm.astype(np.float32) / np.float32(255.0)
    image = t1.astype(np.float32)
    mask = image > 0
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    vote = np.argmax(np.stack([gm, wm, csf]), axis=0).astype(np.uint8) + 1  # 1 GM, 2 WM, 3 CSF
    vote[~mask] = 0
    return image, vote, gm, wm


def _median_of_counts(counts: np.ndarray) -> float:
    """``np.median`` of integer values 0..255 given their counts (the mean of the two middle)."""
    cumulative, n = np.cumsum(counts), int(counts.sum())
    lo = int(np.searchsorted(cumulative, (n - 1) // 2, side="right"))
    hi = int(np.searchsorted(cumulative, n // 2, side="right"))
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=1)
def mni_native_files() -> tuple[Path, Path]:
    """The native template's image (float32) and tissue labels (uint8) as ``.npy`` files in
    a temporary folder of this process (removed at exit), equal to :func:`load_mni` ``()``:
    built slab by slab (the three ``.nii.gz`` files decompressed once, the CSF threshold's
    medians from histograms of the uint8 T1), never holding the whole template, so a
    training block memory-maps only its box."""
    import atexit
    import shutil
    import tempfile

    files = mni_files()
    folder = Path(tempfile.mkdtemp(prefix="workbench-mni-"))
    atexit.register(shutil.rmtree, folder, True)
    shape = nifti.info(files["t1"])[0]
    image = np.lib.format.open_memmap(folder / "image.npy", mode="w+", dtype=np.float32, shape=shape)
    labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.uint8, shape=shape)
    counts = {1: np.zeros(256, np.int64), 3: np.zeros(256, np.int64)}
    step = max(1, -(-shape[0] // 8))
    for z in range(0, shape[0], step):
        box = ((z, min(z + step, shape[0])), (0, shape[1]), (0, shape[2]))
        t1 = nifti.read_box(files["t1"], box)
        slab, vote, gm, wm = _votes(t1, nifti.read_box(files["gm"], box), nifti.read_box(files["wm"], box))
        for k in counts:
            counts[k] += np.bincount(t1[vote == k].ravel(), minlength=256)[:256]
        vote[(vote == 3) & (wm > gm)] = 4  # a CSF vote whose brighter twin would be WM (below)
        image[box[0][0] : box[0][1]], labels[box[0][0] : box[0][1]] = slab, vote
    threshold = 0.5 * (_median_of_counts(counts[3]) + _median_of_counts(counts[1]))
    for z in range(0, shape[0], step):
        vote, bright = labels[z : z + step], image[z : z + step] >= threshold
        csf = vote >= 3
        vote[csf & bright] = np.where(vote[csf & bright] == 3, 1, 2).astype(np.uint8)
        vote[csf & ~bright] = 3
    image.flush(), labels.flush()
    del image, labels
    return folder / "image.npy", folder / "labels.npy"


@functools.lru_cache(maxsize=1)
def _native() -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    files = mni_files()
    t1 = nifti.read(files["t1"])
    gm = nifti.read(files["gm"]).array.astype(np.float32) / np.float32(255.0)
    wm = nifti.read(files["wm"]).array.astype(np.float32) / np.float32(255.0)
    image = t1.array.astype(np.float32)
    mask = image > 0
    csf = np.where(mask, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    vote = np.argmax(np.stack([gm, wm, csf]), axis=0).astype(np.uint8) + 1  # 1 GM, 2 WM, 3 CSF
    vote[~mask] = 0
    csf_vote = vote == 3
    threshold = 0.5 * (float(np.median(image[csf_vote])) + float(np.median(image[vote == 1])))
    bright_csf = csf_vote & (image >= threshold)
    vote[bright_csf] = np.where(gm[bright_csf] >= wm[bright_csf], 1, 2).astype(np.uint8)
    meta = {
        "files": {k: str(v) for k, v in files.items()},
        "nifti_shape": t1.metadata["nifti_shape"],
        "nifti_header": t1.metadata["nifti_header"],
        "csf_t1_threshold": threshold,
        "template": "MNI152 ICBM 2009a symmetric (nilearn)",
    }
    image.setflags(write=False)
    vote.setflags(write=False)
    return image, vote, t1.affine, meta


def load_mni(*, shape=None, order: int = 1) -> Volume:
    """The MNI152 T1 template with tissue labels, native or resampled to ``shape``.

    Parameters
    ----------
    shape : int or (Z, Y, X), optional
        Resample to this shape (image: spline ``order``, labels: nearest); the field of
        view is kept and the affine updated. ``None`` keeps the native (189, 233, 197).
    order : int
        Interpolation order for the image when resampling.

    Examples
    --------
    >>> v = load_mni()
    >>> v.shape, v.spacing, v.class_names[1]
    ((189, 233, 197), (1.0, 1.0, 1.0), 'grey_matter')
    """
    image, labels, affine, meta = _native()
    vol = Volume(image.copy(), spacing=(1.0, 1.0, 1.0), affine=affine, source_format="mni",
                 labels=labels.copy(), class_names=MNI_CLASS_NAMES, path="mni", metadata=dict(meta))  # fmt: skip
    if shape is None:
        return vol
    return resample(vol, shape=shape, order=order)
