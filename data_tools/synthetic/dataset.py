"""A phantom dataset in the MSD / nnU-Net raw layout (read by :mod:`data_tools.datasets`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["PHANTOM_SHAPES", "TASKS", "write_phantom_dataset"]

PHANTOM_SHAPES = ((20, 32, 28), (24, 36, 32), (16, 32, 32), (28, 28, 36), (24, 40, 32), (32, 24, 28))
#: what :func:`write_phantom_dataset` can write: CT phantoms (one channel, classes) or
#: the two-channel brain-tumour-like phantom with region labels (:mod:`.tumour`)
TASKS = ("ct", "tumour")


def write_phantom_dataset(path, *, cases: int = 6, test: int = 1, shapes=None, layout: str = "msd",
                          seed: int = 0, test_labels: bool = False, file_ending: str = ".nii.gz",
                          task: str = "ct"):  # fmt: skip
    """Generate a dataset of CT phantoms (:mod:`data_tools.synthetic`) in MSD or nnU-Net v2
    layout, atomically; returns its path.

    Case ``i`` is phantom seed ``seed + i`` of ``shapes[i % len(shapes)]`` (default
    :data:`PHANTOM_SHAPES`: 16–40 voxels per side, so spacings differ per axis and case,
    e.g. 20 × 12.5 × 14.3 mm), stored as int16 Hounsfield units with its labels (0
    background, 1 organ, 2 lesion) in NIfTI. Case ``i`` is rendered with ``i % 3`` more
    slices whose top ones are cut, so fields of view differ; odd cases are stored with the x
    axis flipped and every case has its own origin, so each has its own affine. ``test`` more cases go to
    ``imagesTs/`` (and ``labelsTs/`` with ``test_labels``). ``shapes`` may be one int (cubes).
    ``file_ending`` picks the file format by its suffix (``.nii.gz``, ``.nrrd``, ``.mha``, ...;
    written in ``dataset.json``'s ``file_ending`` unless it is MSD's ``.nii.gz``).

    ``task="tumour"``: the two-channel phantom of :mod:`data_tools.synthetic.tumour`
    (``CASE_0000`` T2, ``CASE_0001`` ADC, int16) with labels 0 background, 1 oedema, 2 core,
    default shapes :data:`~data_tools.synthetic.tumour.TUMOUR_SHAPES` (32–40 voxels per side,
    1.5 mm); in the nnU-Net layout ``dataset.json`` declares them as nnU-Net's regions
    (``"labels": {"background": 0, "whole": [1, 2], "core": 2}``, ``"regions_class_order": [1, 2]``),
    in the MSD layout as the classes background, oedema, core.
    """
    from ..atomic import atomic_output
    from ..io import write_volume
    from ..volume import Volume
    from .anatomy import CLASS_NAMES
    from .raster import make_phantom

    if layout not in ("msd", "nnunet"):
        raise DataError("layout", f"layout={layout!r}", "use 'msd' or 'nnunet'")
    if task not in TASKS:
        raise DataError("task", f"task={task!r}", f"use one of {', '.join(TASKS)}")
    if task == "tumour":
        return _write_tumour_dataset(path, cases=cases, test=test, shapes=shapes, layout=layout, seed=seed,
                                     test_labels=test_labels, file_ending=file_ending)  # fmt: skip
    if isinstance(shapes, (int, np.integer)):
        shapes = [(int(shapes),) * 3]
    shapes = [tuple(s) for s in (shapes or PHANTOM_SHAPES)]
    names = CLASS_NAMES[:3]
    path = Path(path)
    ending = str(file_ending)
    suffix = "_0000" if layout == "nnunet" else ""
    entries, test_entries = [], []
    with atomic_output(path) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if test_labels and test else ()):
            (tmp / sub).mkdir(parents=True)
        for i in range(cases + test):
            held = i >= cases
            name = f"phantom_{i:03d}"
            shape = shapes[i % len(shapes)]
            cut = i % 3  # rendered with `cut` more slices, the top ones cut: fields of view differ too
            phantom = make_phantom((shape[0] + cut, *shape[1:]), seed=seed + i, vessels=False)
            image, labels, affine = phantom.array[: shape[0]], phantom.labels[: shape[0]], phantom.affine.copy()
            if i % 2:  # stored x-flipped: same anatomy in the world, another affine
                flip = np.eye(4)
                flip[2, 2], flip[2, 3] = -1.0, image.shape[2] - 1
                image, labels, affine = image[..., ::-1], labels[..., ::-1], affine @ flip
            affine[:3, 3] += (7.5 * i, -3.0 * i, 2.0 * i)
            hu = np.rint(image).astype(np.int16)
            images_dir, labels_dir = ("imagesTs", "labelsTs") if held else ("imagesTr", "labelsTr")
            write_volume(
                Volume(hu, spacing=phantom.spacing, affine=affine), tmp / images_dir / f"{name}{suffix}{ending}"
            )
            if not held or test_labels:
                write_volume(Volume(np.ascontiguousarray(labels), spacing=phantom.spacing, affine=affine),
                             tmp / labels_dir / f"{name}{ending}")  # fmt: skip
            entry = {"image": f"./{images_dir}/{name}{ending}", "label": f"./{labels_dir}/{name}{ending}"}
            (test_entries if held else entries).append(entry["image"] if held else entry)
        spec = {"name": path.name, "description": "CT phantoms of data_tools.synthetic (different shapes and "
                "spacings)", "reference": "data_tools.synthetic", "licence": "CC0", "tensorImageSize": "3D"}  # fmt: skip
        if layout == "msd":
            spec.update(modality={"0": "CT"}, labels={str(k): n for k, n in enumerate(names)}, numTraining=cases,
                        numTest=test, training=entries, test=test_entries)  # fmt: skip
            if ending != ".nii.gz":
                spec["file_ending"] = ending
        else:
            spec.update(channel_names={"0": "CT"}, labels={n: k for k, n in enumerate(names)}, numTraining=cases,
                        file_ending=ending)  # fmt: skip
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path


def _write_tumour_dataset(path, *, cases, test, shapes, layout, seed, test_labels, file_ending):
    """:func:`write_phantom_dataset` of ``task="tumour"`` (see there)."""
    from ..atomic import atomic_output
    from ..io import write_volume
    from ..volume import Volume, default_affine
    from .tumour import (
        TUMOUR_CHANNELS,
        TUMOUR_LABELS,
        TUMOUR_REGIONS_CLASS_ORDER,
        TUMOUR_SHAPES,
        TUMOUR_SPACING,
        make_tumour_phantom,
    )

    if isinstance(shapes, (int, np.integer)):
        shapes = [(int(shapes),) * 3]
    shapes = [tuple(s) for s in (shapes or TUMOUR_SHAPES)]
    path, ending = Path(path), str(file_ending)
    channels = {str(c): n for c, n in enumerate(TUMOUR_CHANNELS)}
    entries, test_entries = [], []
    with atomic_output(path) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if test_labels and test else ()):
            (tmp / sub).mkdir(parents=True)
        for i in range(cases + test):
            held = i >= cases
            name = f"tumour_{i:03d}"
            image, labels = make_tumour_phantom(shapes[i % len(shapes)], seed=seed + i)
            affine = default_affine(TUMOUR_SPACING)
            if i % 2:  # stored x-flipped, as the CT phantoms: another affine
                flip = np.eye(4)
                flip[2, 2], flip[2, 3] = -1.0, image.shape[3] - 1
                image, labels, affine = image[..., ::-1], labels[..., ::-1], affine @ flip
            affine[:3, 3] += (4.5 * i, -3.0 * i, 1.5 * i)
            images_dir, labels_dir = ("imagesTs", "labelsTs") if held else ("imagesTr", "labelsTr")
            for c in range(image.shape[0]):
                array = np.rint(image[c]).astype(np.int16)
                write_volume(Volume(array, spacing=TUMOUR_SPACING, affine=affine),
                             tmp / images_dir / f"{name}_{c:04d}{ending}")  # fmt: skip
            if not held or test_labels:
                write_volume(Volume(np.ascontiguousarray(labels), spacing=TUMOUR_SPACING, affine=affine),
                             tmp / labels_dir / f"{name}{ending}")  # fmt: skip
            entry = {"image": f"./{images_dir}/{name}{ending}", "label": f"./{labels_dir}/{name}{ending}"}
            (test_entries if held else entries).append(entry["image"] if held else entry)
        spec = {"name": path.name, "description": "two-channel brain-tumour-like phantoms of "
                "data_tools.synthetic.tumour (T2 shows the whole lesion, ADC only its core)",
                "reference": "data_tools.synthetic.tumour", "licence": "CC0", "tensorImageSize": "3D"}  # fmt: skip
        if layout == "msd":
            spec.update(modality=channels, labels={"0": "background", "1": "oedema", "2": "core"},
                        numTraining=cases, numTest=test, training=entries, test=test_entries)  # fmt: skip
            if ending != ".nii.gz":
                spec["file_ending"] = ending
        else:
            spec.update(channel_names=channels, labels=TUMOUR_LABELS, regions_class_order=TUMOUR_REGIONS_CLASS_ORDER,
                        numTraining=cases, file_ending=ending)  # fmt: skip
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path
