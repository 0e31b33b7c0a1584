"""A phantom dataset in the MSD / nnU-Net raw layout (read by :mod:`data_tools.datasets`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["PHANTOM_SHAPES", "TASKS", "write_phantom_dataset"]

PHANTOM_SHAPES = ((20, 32, 28), (24, 36, 32), (16, 32, 32), (28, 28, 36), (24, 40, 32), (32, 24, 28))
#: what :func:`write_phantom_dataset` can write: CT phantoms (one channel, classes), the
#: two-channel brain-tumour-like phantom with region labels (:mod:`.tumour`), or a task
#: where context decides the label (:mod:`.context`: laterality, connection, counting)
TASKS = ("ct", "tumour", "laterality", "connection", "counting")


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

    ``task`` ``laterality`` | ``connection`` | ``counting``: the context tasks of
    :mod:`data_tools.synthetic.context` (one ``MR`` channel, 1 mm voxels, the classes of
    :data:`~data_tools.synthetic.context.CONTEXT_CLASSES`), case ``i`` drawn with seed
    ``seed + i`` at ``shapes[i % len(shapes)]`` (default 48³), stored unflipped (the
    laterality labels name the stored x axis).
    """
    if layout not in ("msd", "nnunet"):
        raise DataError("layout", f"layout={layout!r}", "use 'msd' or 'nnunet'")
    if task not in TASKS:
        raise DataError("task", f"task={task!r}", f"use one of {', '.join(TASKS)}")
    if isinstance(shapes, (int, np.integer)):
        shapes = [(int(shapes),) * 3]
    maker = {"ct": _ct_cases, "tumour": _tumour_cases}.get(task, _context_cases)
    kind = maker(task, [tuple(s) for s in shapes] if shapes else None, seed)
    return _write_cases(Path(path), kind, cases=cases, test=test, layout=layout, test_labels=test_labels,
                        file_ending=str(file_ending))  # fmt: skip


def _ct_cases(task, shapes, seed) -> dict:
    """The CT phantoms: case ``i`` as (channels, labels, spacing, affine)."""
    from .anatomy import CLASS_NAMES
    from .raster import make_phantom

    shapes = shapes or list(PHANTOM_SHAPES)

    def case(i):
        shape = shapes[i % len(shapes)]
        cut = i % 3  # rendered with `cut` more slices, the top ones cut: fields of view differ too
        phantom = make_phantom((shape[0] + cut, *shape[1:]), seed=seed + i, vessels=False)
        image, labels, affine = phantom.array[: shape[0]], phantom.labels[: shape[0]], phantom.affine.copy()
        if i % 2:  # stored x-flipped: same anatomy in the world, another affine
            image, labels, affine = _flip_x(image, labels, affine)
        affine[:3, 3] += (7.5 * i, -3.0 * i, 2.0 * i)
        return [np.rint(image).astype(np.int16)], labels, phantom.spacing, affine

    names = CLASS_NAMES[:3]
    return {"prefix": "phantom", "case": case, "channels": ("CT",), "msd_labels": names,
            "nnunet_labels": {n: k for k, n in enumerate(names)},
            "description": "CT phantoms of data_tools.synthetic (different shapes and spacings)",
            "reference": "data_tools.synthetic"}  # fmt: skip


def _flip_x(image, labels, affine):
    """A case stored with its x axis flipped: the same world, another affine."""
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, image.shape[-1] - 1
    return image[..., ::-1], labels[..., ::-1], affine @ flip


def _tumour_cases(task, shapes, seed) -> dict:
    """The two-channel tumour phantoms (see :func:`write_phantom_dataset`)."""
    from ..volume import default_affine
    from .tumour import (
        TUMOUR_CHANNELS,
        TUMOUR_LABELS,
        TUMOUR_REGIONS_CLASS_ORDER,
        TUMOUR_SHAPES,
        TUMOUR_SPACING,
        make_tumour_phantom,
    )

    shapes = shapes or list(TUMOUR_SHAPES)

    def case(i):
        image, labels = make_tumour_phantom(shapes[i % len(shapes)], seed=seed + i)
        affine = default_affine(TUMOUR_SPACING)
        if i % 2:  # stored x-flipped, as the CT phantoms: another affine
            image, labels, affine = _flip_x(image, labels, affine)
        affine[:3, 3] += (4.5 * i, -3.0 * i, 1.5 * i)
        return [np.rint(c).astype(np.int16) for c in image], labels, TUMOUR_SPACING, affine

    return {"prefix": "tumour", "case": case, "channels": TUMOUR_CHANNELS,
            "msd_labels": ("background", "oedema", "core"), "nnunet_labels": TUMOUR_LABELS,
            "regions_class_order": TUMOUR_REGIONS_CLASS_ORDER,
            "description": "two-channel brain-tumour-like phantoms of data_tools.synthetic.tumour (T2 shows the "
                           "whole lesion, ADC only its core)",
            "reference": "data_tools.synthetic.tumour"}  # fmt: skip


def _context_cases(task, shapes, seed) -> dict:
    """A context task of :mod:`.context` (see :func:`write_phantom_dataset`)."""
    from ..volume import default_affine
    from .context import CONTEXT_CLASSES, make_context_case

    shapes = shapes or [(48, 48, 48)]

    def case(i):
        image, labels = make_context_case(task, shapes[i % len(shapes)], seed=seed + i)
        return [np.rint(image).astype(np.int16)], labels, (1.0, 1.0, 1.0), default_affine((1.0, 1.0, 1.0))

    names = CONTEXT_CLASSES[task]
    return {"prefix": task, "case": case, "channels": ("MR",), "msd_labels": names,
            "nnunet_labels": {n: k for k, n in enumerate(names)},
            "description": f"the {task} task of data_tools.synthetic.context (context decides the label)",
            "reference": "data_tools.synthetic.context"}  # fmt: skip


def _write_cases(path: Path, kind: dict, *, cases, test, layout, test_labels, file_ending):
    """Write ``cases + test`` cases of ``kind`` (``case(i)`` → (int16 channel arrays, labels,
    spacing, affine), its names and labels) as a dataset folder, atomically."""
    from ..atomic import atomic_output
    from ..io import write_volume
    from ..volume import Volume

    ending = file_ending
    channels = {str(c): n for c, n in enumerate(kind["channels"])}
    entries, test_entries = [], []
    with atomic_output(path) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs") + (("labelsTs",) if test_labels and test else ()):
            (tmp / sub).mkdir(parents=True)
        for i in range(cases + test):
            held = i >= cases
            name = f"{kind['prefix']}_{i:03d}"
            arrays, labels, spacing, affine = kind["case"](i)
            images_dir, labels_dir = ("imagesTs", "labelsTs") if held else ("imagesTr", "labelsTr")
            for c, array in enumerate(arrays):
                suffix = f"_{c:04d}" if layout == "nnunet" or len(arrays) > 1 else ""
                write_volume(Volume(np.ascontiguousarray(array), spacing=spacing, affine=affine),
                             tmp / images_dir / f"{name}{suffix}{ending}")  # fmt: skip
            if not held or test_labels:
                write_volume(Volume(np.ascontiguousarray(labels), spacing=spacing, affine=affine),
                             tmp / labels_dir / f"{name}{ending}")  # fmt: skip
            entry = {"image": f"./{images_dir}/{name}{ending}", "label": f"./{labels_dir}/{name}{ending}"}
            (test_entries if held else entries).append(entry["image"] if held else entry)
        spec = {"name": path.name, "description": kind["description"], "reference": kind["reference"],
                "licence": "CC0", "tensorImageSize": "3D"}  # fmt: skip
        if layout == "msd":
            spec.update(modality=channels, labels={str(k): n for k, n in enumerate(kind["msd_labels"])},
                        numTraining=cases, numTest=test, training=entries, test=test_entries)  # fmt: skip
            if ending != ".nii.gz":
                spec["file_ending"] = ending
        else:
            spec.update(channel_names=channels, labels=kind["nnunet_labels"], numTraining=cases, file_ending=ending)
            if "regions_class_order" in kind:
                spec["regions_class_order"] = kind["regions_class_order"]
        (tmp / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return path
