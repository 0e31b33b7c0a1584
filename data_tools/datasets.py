"""Labelled datasets in the Medical Segmentation Decathlon / nnU-Net raw layout (no JAX).

A dataset is a folder::

    Task03_Liver/                       (MSD)             Dataset003_Liver/        (nnU-Net v2)
        dataset.json                                          dataset.json
        imagesTr/liver_0.nii.gz                               imagesTr/liver_0_0000.nii.gz
        labelsTr/liver_0.nii.gz                               labelsTr/liver_0.nii.gz
        imagesTs/liver_132.nii.gz                             imagesTs/liver_132_0000.nii.gz

``dataset.json`` is read in both styles: MSD (``"modality": {"0": "CT"}``, ``"labels":
{"0": "background", "1": "liver"}``, ``"training": [{"image": ..., "label": ...}]``,
``"test": [...]``) and nnU-Net v2 (``"channel_names": {"0": "CT"}``, ``"labels":
{"background": 0, "liver": 1}``, ``"file_ending": ".nii.gz"``, ``"numTraining"``; images
``CASE_0000<ending>``, one file per channel, labels ``CASE<ending>``).

* :func:`open_dataset` reads ``dataset.json`` and pairs images with labels (files only);
  :func:`check_case` / :func:`check_dataset` compare their headers (same shape and
  affine) and read each label map once, one at a time, to check its values lie within the
  declared classes. Every problem is one :class:`~data_tools.errors.DataError` naming the
  case and the fix.
* :meth:`Dataset.split` is nnU-Net's 5-fold cross-validation: scikit-learn's
  ``KFold(n_splits=5, shuffle=True, random_state=12345)`` over the sorted case names,
  reproduced with numpy (the same folds, tested against scikit-learn). A
  ``splits_final.json`` in the dataset folder (nnU-Net's format) takes precedence.
* :func:`read_case` reads one case as a :class:`~data_tools.volume.Volume` with its labels.
* :func:`resample_onto` puts an array back on a case's original grid (predictions).
* :func:`write_phantom_dataset` (:mod:`data_tools.synthetic.dataset`) generates a small
  phantom dataset in either layout, for tests, docs and notebooks.

Example
-------
>>> import tempfile
>>> ds = open_dataset(write_phantom_dataset(Path(tempfile.mkdtemp()) / "Task01_Phantom", cases=5))
>>> ds.layout, ds.class_names, len(ds.training), [len(v) for v in ds.split(0)]
('msd', ('background', 'organ', 'lesion'), 5, [4, 1])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, MissingDataError
from .folds import N_FOLDS, SPLIT_SEED, crossval_folds
from .synthetic.dataset import write_phantom_dataset

__all__ = [
    "DATASET_JSON",
    "N_FOLDS",
    "SPLIT_SEED",
    "CaseFiles",
    "Dataset",
    "is_dataset",
    "open_dataset",
    "crossval_folds",
    "check_case",
    "check_dataset",
    "read_case",
    "read_case_channels",
    "resample_onto",
    "write_phantom_dataset",
]


DATASET_JSON = "dataset.json"
_EXAMPLE_JSON = (
    'add one, e.g. {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1}, '
    '"numTraining": N, "file_ending": ".nii.gz"} (see docs/data_formats.md)'
)


@dataclass(frozen=True)
class CaseFiles:
    """One case: its name, one image file per channel, and its label map (None: unlabelled)."""

    name: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset folder as :func:`open_dataset` read it (files paired, nothing loaded)."""

    root: Path
    name: str
    layout: str  # "msd" | "nnunet"
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    file_ending: str
    training: tuple[CaseFiles, ...]
    test: tuple[CaseFiles, ...] = ()
    #: region-based labels: (name, label values) per foreground region, in ``labels``' order
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: the label value each region paints, in order (nnU-Net's ``regions_class_order``)
    regions_class_order: tuple[int, ...] | None = None

    @property
    def names(self) -> list[str]:
        """Sorted names of the training cases."""
        return sorted(c.name for c in self.training)

    def case(self, name: str) -> CaseFiles:
        for c in (*self.training, *self.test):
            if c.name == name:
                return c
        raise DataError(self.root, f"has no case {name!r}", f"use one of {self.names[:8]}")

    def folds(self) -> list[tuple[list[str], list[str]]]:
        """(training names, validation names) of each fold: ``splits_final.json`` if the
        folder holds one, else :func:`crossval_folds` of the training cases."""
        path = self.root / "splits_final.json"
        if not path.is_file():
            return crossval_folds(self.names)
        try:
            splits = json.loads(path.read_text())
            folds = [(sorted(s["train"]), sorted(s["val"])) for s in splits]
        except (ValueError, TypeError, KeyError) as err:
            raise DataError(path, f"is not a list of {{'train': [...], 'val': [...]}} ({err})",
                            "fix it or delete it to use the 5-fold split of the sorted case names") from None  # fmt: skip
        known = set(self.names)
        for k, (train, val) in enumerate(folds):
            unknown = sorted(set(train + val) - known)
            if unknown:
                raise DataError(path, f"fold {k} names cases {unknown[:5]} that are not in labelsTr",
                                "fix the names or delete the file")  # fmt: skip
        return folds

    def split(self, fold: int) -> tuple[list[CaseFiles], list[CaseFiles]]:
        """(training cases, validation cases) of ``fold``; an empty fold is a DataError."""
        folds = self.folds()
        if not isinstance(fold, (int, np.integer)) or not 0 <= fold < len(folds):
            raise DataError(self.root, f"fold {fold!r} does not exist; the dataset has {len(folds)} folds",
                            f"pass --fold 0..{len(folds) - 1}")  # fmt: skip
        train, val = folds[int(fold)]
        if not val:
            filled = [k for k, f in enumerate(folds) if f[1] and f[0]]
            raise DataError(self.root, f"fold {fold} is empty: {len(self.training)} training case(s) fill only "
                            f"folds {filled}", f"pass --fold {filled[0] if filled else 0} or add cases "
                            f"({N_FOLDS} or more fill every fold)")  # fmt: skip
        if not train:
            raise DataError(self.root, f"fold {fold} leaves no case to train on ({len(self.training)} case(s))",
                            "add labelled cases to imagesTr/ and labelsTr/")  # fmt: skip
        by_name = {c.name: c for c in self.training}
        return [by_name[n] for n in train], [by_name[n] for n in val]


# -- reading dataset.json ------------------------------------------------------------------
def is_dataset(path) -> bool:
    """Whether ``path`` is a folder laid out as a dataset (``dataset.json``, ``imagesTr/``
    or ``labelsTr/``), so :func:`open_dataset` is the reader to use (and explains what is missing)."""
    path = Path(path)
    return path.is_dir() and any((path / n).exists() for n in (DATASET_JSON, "imagesTr", "labelsTr"))


def _ordered(where, mapping, what: str) -> tuple[str, ...]:
    """Values of ``{"0": a, "1": b}`` in key order; the keys must be 0..n-1."""
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(where, f"has no {what}", _EXAMPLE_JSON)
    try:
        items = sorted((int(k), str(v)) for k, v in mapping.items())
    except (TypeError, ValueError):
        items = []
    if [k for k, _ in items] != list(range(len(mapping))):
        raise DataError(where, f"{what} {mapping} are not numbered 0..{len(mapping) - 1}",
                        'number them "0", "1", ... in order')  # fmt: skip
    return tuple(v for _, v in items)


def _class_names(where: Path, labels, order=None):
    """(class names by label value, regions, regions_class_order) of ``"labels"``.

    Regions (nnU-Net's region-based labels, ``{"background": 0, "whole": [1, 2], "core": 2}``):
    the label values are the union of the regions' values (0..n-1); a value gets the name of
    the entry that is exactly that value, else ``labelV``; the regions are the foreground
    entries in ``labels``' order, each with its values, painted back in ``order``."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(where, 'has no "labels"', _EXAMPLE_JSON)
    if all(str(k).strip().isdigit() for k in labels):  # MSD: {"0": "background", ...}
        return _ordered(where, labels, '"labels"'), (), None
    is_region = any(isinstance(v, (list, tuple)) for v in labels.values())
    try:
        values = {str(k): tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)
                  for k, v in labels.items()}  # fmt: skip
    except (TypeError, ValueError):
        raise DataError(where, f'"labels" {labels} are neither {{"0": "background"}} nor {{"background": 0}}',
                        _EXAMPLE_JSON) from None  # fmt: skip
    used = sorted({x for v in values.values() for x in v})
    if used != list(range(len(used))) or (not is_region and len(used) != len(labels)):
        raise DataError(where, f'"labels" {labels} are not the consecutive values 0..{len(labels) - 1}',
                        "renumber the label maps and dataset.json to 0..n-1 (0 = background)")  # fmt: skip
    by_value = {v[0]: k for k, v in reversed(values.items()) if len(v) == 1}
    names = tuple(by_value.get(v, f"label{v}") for v in used)
    if not is_region:
        return names, (), None
    regions = tuple((k, v) for k, v in values.items() if v != (0,))
    example = f'"regions_class_order": {[max(v) for _, v in regions]}'
    if not isinstance(order, (list, tuple)) or len(order) != len(regions):
        raise DataError(where, f"declares region-based labels {[k for k, _ in regions]} but \"regions_class_order\" "
                        f"is {order!r} (one label value per region is needed)", f"add e.g. {example}, the value "
                        "each region paints, in order (later regions overwrite earlier ones)")  # fmt: skip
    try:
        order = tuple(int(v) for v in order)
    except (TypeError, ValueError):
        raise DataError(where, f'"regions_class_order" {order} holds non-integers', f"write e.g. {example}") from None
    if not all(0 < v < len(used) for v in order):
        raise DataError(where, f'"regions_class_order" {list(order)} names values outside the labels 1..'
                        f"{len(used) - 1}", f"write e.g. {example}")  # fmt: skip
    return names, regions, order


def _strip(name: str, ending: str) -> str | None:
    return name[: -len(ending)] if name.endswith(ending) and not name.startswith(".") else None


def _files(folder: Path, ending: str) -> dict[str, Path]:
    """{name without ending: path} of the visible files of ``folder`` (MSD archives hold ``._x`` files)."""
    if not folder.is_dir():
        return {}
    return {n: p for p in sorted(folder.iterdir()) if (n := _strip(p.name, ending)) is not None}


def _channel_files(root: Path, listed: Path, n_channels: int, ending: str, case: str) -> tuple[Path, ...]:
    """The image files of a case listed as ``listed``: itself, or ``NAME_0000<ending>...``
    (nnU-Net v1 lists the case without the channel suffix)."""
    if listed.is_file() and n_channels == 1:
        return (listed,)
    stem = listed.name[: -len(ending)] if listed.name.endswith(ending) else listed.stem
    files = tuple(listed.with_name(f"{stem}_{c:04d}{ending}") for c in range(n_channels))
    if all(f.is_file() for f in files):
        return files
    if listed.is_file() and n_channels > 1:
        raise DataError(root, f"case {case}: one image file {os.path.relpath(listed, root)} for the {n_channels} "
                        "channels dataset.json declares", f"split it into {stem}_0000{ending} .. "
                        f"{stem}_{n_channels - 1:04d}{ending}, one 3-D file per channel (a 4-D MSD image: one "
                        "file per volume of its last axis)")  # fmt: skip
    if listed.is_file():
        return (listed,)
    raise MissingDataError(root, f"case {case}: image {os.path.relpath(listed, root)} does not exist",
                           "fix the path in dataset.json or add the file")  # fmt: skip


def _relative(root: Path, text) -> Path:
    path = Path(str(text))
    return path if path.is_absolute() else root / path


def _listed_cases(root, entries, n_channels, ending, *, labelled: bool) -> list[CaseFiles]:
    """Cases of an MSD ``"training"`` / ``"test"`` list."""
    out = []
    for entry in entries:
        entry = entry if isinstance(entry, dict) else {"image": entry}
        image = entry.get("image")
        if not isinstance(image, str):
            raise DataError(root / DATASET_JSON, f"entry {entry!r} names no image",
                            'write {"image": "./imagesTr/X.nii.gz", "label": "./labelsTr/X.nii.gz"}')  # fmt: skip
        path = _relative(root, image)
        name = _strip(path.name, ending) or path.name.split(".")[0]
        images = _channel_files(root, path, n_channels, ending, name)
        label = None
        if labelled or entry.get("label"):
            label = _relative(root, entry.get("label") or f"labelsTr/{name}{ending}")
            if not label.is_file():
                raise MissingDataError(root, f"case {name}: image {os.path.relpath(path, root)} has no label "
                                       f"({Path(entry.get('label') or label).as_posix()} does not exist)",
                                       "add the label map or remove the case from dataset.json")  # fmt: skip
        out.append(CaseFiles(name, images, label))
    return out


def _scanned_cases(root: Path, images_dir: str, labels_dir: str, channels, ending, *, labelled: bool):
    """nnU-Net v2: images ``CASE_0000<ending>`` paired with labels ``CASE<ending>``."""
    images = _files(root / images_dir, ending)
    labels = _files(root / labels_dir, ending)
    names = sorted({n[:-5] for n in images if len(n) > 5 and n[-5] == "_" and n[-4:].isdigit()})
    unsuffixed = sorted(n for n in images if not (len(n) > 5 and n[-5] == "_" and n[-4:].isdigit()))
    if unsuffixed:
        raise DataError(root / images_dir, f"{unsuffixed[0]}{ending} has no channel suffix _0000 (nnU-Net v2 "
                        "names images CASE_0000" + ending + ")", "rename the images or list them in dataset.json "
                        '"training" (MSD style)')  # fmt: skip
    extra = sorted(n for n in images if n[-5] == "_" and n[-4:].isdigit() and int(n[-4:]) >= len(channels))
    if extra:
        raise DataError(root, f"{images_dir}/{extra[0]}{ending} is channel {int(extra[0][-4:])} but dataset.json "
                        f"declares {len(channels)} channel(s) {list(channels)} (channel_names)", "add the channel to "
                        "channel_names or move its files out of " + images_dir)  # fmt: skip
    out = []
    for name in names:
        files = tuple(root / images_dir / f"{name}_{c:04d}{ending}" for c in range(len(channels)))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MissingDataError(root, f"case {name}: channel file {images_dir}/{missing[0]} is missing "
                                   f"(dataset.json declares {len(channels)} channel(s) {list(channels)})",
                                   "add the file or fix channel_names")  # fmt: skip
        label = labels.get(name)
        if labelled and label is None:
            raise MissingDataError(root, f"case {name}: image {images_dir}/{files[0].name} has no label "
                                   f"{labels_dir}/{name}{ending}", f"add the label map or move the image out "
                                   f"of {images_dir}/")  # fmt: skip
        out.append(CaseFiles(name, files, label))
    orphans = sorted(set(labels) - set(names))
    if orphans:
        raise MissingDataError(root, f"case {orphans[0]}: label {labels_dir}/{orphans[0]}{ending} has no image "
                               f"{images_dir}/{orphans[0]}_0000{ending}", "add the image or remove the label")  # fmt: skip
    return out


def open_dataset(path) -> Dataset:
    """Read ``path/dataset.json`` and pair the images and labels (no voxels are read).

    Raises :class:`~data_tools.errors.DataError` naming the case and the fix for a missing
    ``dataset.json``, an image without its label (or a label without its image), a missing
    channel file or a malformed ``dataset.json``.
    """
    root = Path(path)
    if not root.exists():
        raise MissingDataError(root, "no such dataset folder", "pass the folder that holds dataset.json")
    if not root.is_dir():
        raise DataError(root, "is a file, not a dataset folder", "pass the folder holding dataset.json and imagesTr/")
    where = root / DATASET_JSON
    if not where.is_file():
        raise MissingDataError(
            root, "has no dataset.json (the MSD / nnU-Net description of the dataset)", _EXAMPLE_JSON
        )
    try:
        spec = json.loads(where.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(where, f"is not valid JSON ({err})", "fix the file") from None
    if not isinstance(spec, dict):
        raise DataError(where, "does not hold a JSON object", _EXAMPLE_JSON)
    class_names, regions, order = _class_names(where, spec.get("labels"), spec.get("regions_class_order"))
    nnunet = "channel_names" in spec
    channels = _ordered(where, spec.get("channel_names" if nnunet else "modality"),
                        '"channel_names"' if nnunet else '"modality"')  # fmt: skip
    ending = str(spec.get("file_ending") or ".nii.gz")
    if isinstance(spec.get("training"), list):
        training = _listed_cases(root, spec["training"], len(channels), ending, labelled=True)
    elif isinstance(spec.get("dataset"), dict):  # nnU-Net v2 with an explicit list of files
        training = [CaseFiles(str(n), tuple(_relative(root, p) for p in e["images"]), _relative(root, e["label"]))
                    for n, e in sorted(spec["dataset"].items())]  # fmt: skip
    else:
        training = _scanned_cases(root, "imagesTr", "labelsTr", channels, ending, labelled=True)
    if isinstance(spec.get("test"), list) and not nnunet:
        test = _listed_cases(root, spec["test"], len(channels), ending, labelled=False)
    elif not nnunet:  # MSD without a "test" list: the files of imagesTs/
        test = [CaseFiles(n, (f,)) for n, f in _files(root / "imagesTs", ending).items()]
    else:
        test = _scanned_cases(root, "imagesTs", "labelsTs", channels, ending, labelled=False)
    if not training:
        raise DataError(root, "holds no labelled training case (imagesTr/ and labelsTr/ are empty or missing)",
                        "add image/label pairs, or point to the dataset folder itself")  # fmt: skip
    declared = spec.get("numTraining")
    if isinstance(declared, int) and declared != len(training):
        raise DataError(where, f"says numTraining={declared} but {len(training)} labelled case(s) are present",
                        "fix numTraining or add the missing cases")  # fmt: skip
    seen: set[str] = set()
    for c in training:
        if c.name in seen:
            raise DataError(root, f"case {c.name} is listed twice", "list each case once in dataset.json")
        seen.add(c.name)
    test = [  # MSD test entries pair with labelsTs/ when the dataset has them
        c if c.label is not None or not (root / "labelsTs" / f"{c.name}{ending}").is_file()
        else CaseFiles(c.name, c.images, root / "labelsTs" / f"{c.name}{ending}")
        for c in test
    ]  # fmt: skip
    name = str(spec.get("name") or root.name)
    return Dataset(root, name, "nnunet" if nnunet else "msd", channels, class_names, ending,
                   tuple(training), tuple(test), regions, order)  # fmt: skip


# -- checking and reading cases --------------------------------------------------------------
def _same_affine(a, b, spacing) -> bool:
    return bool(np.allclose(a, b, rtol=1e-5, atol=1e-3 * max(1.0, float(min(spacing)))))


def check_case(dataset: Dataset, case: CaseFiles, *, labels: bool = True):
    """The case's :class:`~data_tools.io.VolumeInfo` (of its first channel), after checking
    that every channel and the label map share its shape and affine and (``labels``) that
    the label values lie in ``0..len(class_names)-1`` (reads the label map)."""
    from .io import volume_info

    first = volume_info(case.images[0])
    others = [(p, volume_info(p)) for p in case.images[1:]]
    if case.label is not None:
        others.append((case.label, volume_info(case.label)))
    for path, info in others:
        rel = os.path.relpath(path, dataset.root)
        if info.shape != first.shape and path != case.label:
            raise DataError(dataset.root, f"case {case.name}: channel file {rel} has shape {info.shape} (z, y, x) "
                            f"but channel 0 ({os.path.relpath(case.images[0], dataset.root)}) has {first.shape}",
                            "write every channel of a case on one grid (resample the channels onto channel 0's)")  # fmt: skip
        if info.shape != first.shape:
            raise DataError(dataset.root, f"case {case.name}: {rel} has shape {info.shape} (z, y, x) but the "
                            f"image has {first.shape}", "resample the label map onto the image grid (nearest "
                            "neighbour) or pair the right files")  # fmt: skip
        if not _same_affine(info.affine, first.affine, first.spacing):
            raise DataError(dataset.root, f"case {case.name}: {rel} has another affine (spacing "
                            f"{_mm(info.spacing)}, origin {_mm(info.affine[:3, 3])}) than the image (spacing "
                            f"{_mm(first.spacing)}, origin {_mm(first.affine[:3, 3])})", "write the label map "
                            "with the image's header (same spacing, origin and orientation)")  # fmt: skip
    if labels and case.label is not None:
        _label_values(dataset, case)
    return first


def _mm(values) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


def _label_values(dataset: Dataset, case: CaseFiles) -> np.ndarray:
    """The case's label map as uint8 (or int32 for > 256 classes), values checked."""
    from .io import read_volume

    array = read_volume(case.label).array
    k = len(dataset.class_names)
    rel = os.path.relpath(case.label, dataset.root)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.rint(array)):
            raise DataError(dataset.root, f"case {case.name}: {rel} holds non-integer values",
                            "write integer labels (resample label maps with nearest neighbour)")  # fmt: skip
    lo, hi = float(array.min()), float(array.max())
    if lo < 0 or hi >= k:
        bad = np.unique(array[(array < 0) | (array >= k)])[:8].tolist()
        raise DataError(dataset.root, f"case {case.name}: {rel} holds label values {bad} outside the {k} "
                        f"declared classes 0..{k - 1} {list(dataset.class_names)}", "remap the label map or "
                        "declare the classes in dataset.json \"labels\"")  # fmt: skip
    return array.astype(np.uint8 if k <= 256 else np.int32, copy=False)


def check_dataset(dataset: Dataset, cases=None, *, labels: bool = True, progress: bool = False) -> dict:
    """:func:`check_case` of ``cases`` (default: every training case), one at a time
    (``progress``: a bar from 20 cases on); returns ``{name: VolumeInfo}``."""
    cases = list(dataset.training if cases is None else cases)
    if progress and len(cases) >= 20:
        from tqdm.auto import tqdm

        cases = tqdm(cases, desc=f"checking {dataset.name}", unit="case", leave=False)
    return {c.name: check_case(dataset, c, labels=labels) for c in cases}


def read_case(dataset: Dataset, case: CaseFiles | str, *, check: bool = True):
    """One case as a :class:`~data_tools.volume.Volume` (first channel) with its labels,
    ``class_names`` and ``metadata["modality"]`` from the channel name (``"CT"`` selects the
    CT normalisation); the image's own geometry and NIfTI header are kept."""
    from .io import read_volume

    case = dataset.case(case) if isinstance(case, str) else case
    if check:
        check_case(dataset, case, labels=False)
    volume = read_volume(case.images[0])
    meta = {**volume.metadata, "modality": dataset.channel_names[0], "case": case.name}
    labels = None if case.label is None else _label_values(dataset, case)
    return volume.replace(labels=labels, class_names=dataset.class_names if labels is not None else None,
                          metadata=meta)  # fmt: skip


def read_case_channels(dataset: Dataset, case: CaseFiles | str, *, check: bool = True) -> list:
    """Every channel of a case, one :class:`~data_tools.volume.Volume` each in
    ``channel_names``' order: the first is :func:`read_case`'s (with the labels), each one's
    ``metadata["modality"]`` its channel name (checked: one grid for all)."""
    from .io import read_volume

    case = dataset.case(case) if isinstance(case, str) else case
    first = read_case(dataset, case, check=check)
    others = [read_volume(p) for p in case.images[1:]]
    return [first] + [v.replace(metadata={**v.metadata, "modality": n, "case": case.name})
                      for v, n in zip(others, dataset.channel_names[1:])]  # fmt: skip


def resample_onto(array: np.ndarray, affine, shape, target_affine, *, order: int = 1) -> np.ndarray:
    """``array`` (Z, Y, X) on the grid of ``affine`` resampled onto the grid ``shape`` /
    ``target_affine`` (both voxel (z, y, x) → world mm): a prediction back on its case's
    original grid. ``order`` 0 for labels, 1 for probabilities; edges are extended."""
    from scipy import ndimage

    index = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(target_affine, np.float64)
    array = np.asarray(array)
    out_dtype = array.dtype if order == 0 else np.float32
    source = array if order == 0 or array.dtype == np.float32 else array.astype(np.float32)
    return ndimage.affine_transform(source, index[:3, :3], offset=index[:3, 3], output_shape=tuple(shape),
                                    output=out_dtype, order=order, mode="nearest")  # fmt: skip
