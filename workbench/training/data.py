"""Training data: batches of (image, labels) from phantoms, MNI or any labelled volumes.

Everything here is numpy on the host and deterministic in ``(seed, step)``: the batch
for step ``s`` (sample choice, augmentation, noise) is the same whichever mesh or
backend trains on it, however many processes share the mesh and whether the run was
resumed, so a partitioned run sees exactly what the single-device reference sees.

Batches are built block by block (:func:`batch_blocks`): each process makes only the
blocks of its own devices. An :class:`Augmentation` is data, not a whole-volume copy: a
flip or a 180° rotation (two flips) changes which box a device reads and flips that
block, the intensity change is per voxel, and the noise is hashed from the voxel's
position, so a block equals the same slice of the augmented whole volume. Phantoms are
rendered block by block (resampled ones: only the render box the block's interpolation
reads); labelled paths, ``mni`` and dataset folders are
:class:`~workbench.training.cases.CaseReader`s that read only the block's box (plus the
resampling margin) and normalise it with whole-case statistics surveyed once when the
source is made (:func:`make_source` must then run in every process's main thread). Held-out
cases are prepared whole by ``eval_cases`` (what one process evaluates, HD95 included) and
read by box by ``eval_block`` (what a multi-process run evaluates:
:func:`workbench.training.evaluation.evaluate_blocks`). Only a source without its own
:meth:`Source.case_block` slices a cached whole case.

Sources (see :func:`make_source`):

* ``phantom`` / ``phantom:N``: synthetic CT phantoms rendered at N³ (default 64), fresh
  seeds every step (seed ``1_000_000 + step·B + i``), held-out evaluation seeds
  ``0, 1, …`` (``workbench demo`` shows seed 0, never trained on). Labels: 0 background,
  1 organ, 2 lesion; hepatic vessels are folded into the organ (they lie inside it) and
  the aorta into background (``make_phantom(vessels=False)``).
* ``mni`` / ``mni:N``: the MNI152 T1 with 4 tissue classes. There is one subject, so
  evaluation is on the training volume (augmentations differ): it measures fit, not
  generalisation.
  Its native template (189×233×197) is written once per process to a temporary ``.npy``
  pair slab by slab (:func:`data_tools.samples.mni_native_files`; its tissue labels need
  global medians, taken from histograms) and memory-mapped: blocks read only their boxes.
* paths: ``.npz`` files holding ``image`` and ``labels`` (or in-memory ``Volume``s with
  labels); the last ``max(1, n // 5)`` are held out when n ≥ 2.

Dataset folders (MSD / nnU-Net layout) are read lazily by
:class:`workbench.training.datasets.DatasetSource`; :func:`workbench.training.datasets.make_source`
is this module's :func:`make_source` plus those (what ``workbench train`` calls).

With ``resolution`` set, every volume is resampled to resolution³ (image linear, labels
nearest, :func:`data_tools.preprocess.resample_block`): ``phantom:128`` at resolution 64
is a down-sampled copy of 128³ phantoms.
Images go through :func:`model_input` (as ``workbench infer`` does): CT in Hounsfield
units gets the abdomen window, everything else a per-volume z-score.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError
from workbench.training.augment import Augmentation, augment
from workbench.training.cases import CT_WINDOW, ct_input, is_ct_from, labels_error, volume_reader

__all__ = [
    "Case",
    "Source",
    "make_source",
    "augment",
    "Augmentation",
    "batch_blocks",
    "place",
    "BatchStream",
    "TRAIN_SEED_BASE",
    "model_input",
    "ct_input",
    "is_ct",
    "is_ct_from",
    "whole_case",
    "channels_last",
    "model_batch",
    "CT_WINDOW",
]

TRAIN_SEED_BASE = 1_000_000


def is_ct(volume) -> bool:
    """Whether ``volume`` holds Hounsfield units: a DICOM ``Modality`` of CT, a phantom, or,
    without that metadata, intensities that reach air (min ≤ -900) and go above water."""
    array = np.asarray(volume.array)
    if not array.size:
        return False
    return is_ct_from(
        volume.metadata.get("modality", ""), volume.source_format, lambda: (float(array.min()), float(array.max()))
    )


def model_input(volume) -> np.ndarray:
    """The float32 image a workbench model sees, the same for training and inference.

    CT (see :func:`is_ct`): the abdomen window (40 ± 200 HU) mapped to [-2, 2], so the
    60 HU between liver and soft tissue is 0.6 units, not the ~0.1 a whole-volume z-score
    leaves once air and bone set the spread. Anything else (MRI, microscopy): z-score over
    the volume.
    """
    from data_tools.preprocess import zscore

    array = np.asarray(volume.array, np.float32)
    return ct_input(array) if is_ct(volume) else zscore(array).astype(np.float32)


@dataclass
class Case:
    """One normalised volume: image (Z,Y,X) float32 ((Z,Y,X,C) with several channels),
    labels (Z,Y,X) uint8, spacing, name."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    name: str
    metadata: dict


def _case_from_volume(volume, resolution: int | None, name: str, num_classes: int | None = None) -> Case:
    from data_tools.preprocess import resample
    from workbench.training.losses import check_labels

    if volume.labels is None:
        raise UserError(
            f"{name} has no labels; training needs (image, labels) pairs: pass a volume with a "
            "label map (e.g. an .npz holding 'image' and 'labels')"
        )
    if resolution is not None and volume.shape != (resolution,) * 3:
        volume = resample(volume, shape=resolution)
    labels = np.asarray(volume.labels)
    if num_classes is not None:
        check_labels(labels, num_classes, name=f"labels of {name}")
    image = model_input(volume)
    return Case(image, labels.astype(np.uint8), tuple(volume.spacing), name, dict(volume.metadata))


class Source:
    """Train batches by step and held-out evaluation cases."""

    num_classes: int
    class_names: tuple[str, ...]
    shape: tuple[int, int, int]
    description: str
    #: input channels: blocks are (Z, Y, X) for 1, (Z, Y, X, C) for more; batches always (N, Z, Y, X, C)
    channels: int = 1

    def train_case(self, step: int, index: int) -> Case:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_cases(self, n: int) -> list[Case]:  # pragma: no cover - interface
        """The first ``n`` held-out cases, each prepared whole (what one process evaluates;
        a source may also offer ``eval_block(i, box)`` and ``eval_name(i)``, which a
        multi-process run evaluates by, see :func:`workbench.training.evaluation.held_out_blocks`)."""
        raise NotImplementedError

    def train_batch(self, step: int, batch: int, *, seed: int = 0, augment_data: bool = True):
        """(images f32[B, Z, Y, X, C], labels i32[B, Z, Y, X]) for ``step``, deterministic."""
        whole = tuple((0, n) for n in self.shape)
        blocks = [self.train_block(step, i, whole, seed=seed, augment_data=augment_data) for i in range(batch)]
        images = np.stack([channels_last(b[0]) for b in blocks]).astype(np.float32)
        return images, np.stack([b[1] for b in blocks]).astype(np.int32)

    def train_block(self, step: int, index: int, box, *, seed: int = 0, augment_data: bool = True):
        """(image f32, labels u8) of ``box`` of volume ``index`` of ``step``'s batch, augmented:
        the same slice of the whole augmented volume, made from that box's data only."""
        aug = Augmentation.draw(np.random.default_rng([seed, step, index])) if augment_data else None
        source_box = box if aug is None else aug.source_box(box, self.shape)
        image, labels = self.case_block(step, index, source_box)
        if aug is not None:
            image, labels = aug.apply(image, labels, box, self.shape)
        return image, labels

    def case_block(self, step: int, index: int, box):
        """(image, labels) of ``box`` of the unaugmented case. Here: a slice of
        :meth:`train_case` (the last case is cached, so the blocks of one process share it);
        a source that can read a box alone (phantoms) overrides this."""
        cached = getattr(self, "_cached", None)  # a local reference: BatchStream's threads share it
        if cached is None or cached[0] != (step, index):
            cached = self._cached = ((step, index), self.train_case(step, index))
        case = cached[1]
        sl = tuple(slice(lo, hi) for lo, hi in box)
        return case.image[sl], case.labels[sl]


class PhantomSource(Source):
    def __init__(self, render: int, resolution: int | None = None):
        from data_tools.synthetic import CLASS_NAMES

        self.render, self.resolution = int(render), resolution
        n = resolution or self.render
        self.shape = (n, n, n)
        self.num_classes, self.class_names = 3, tuple(CLASS_NAMES[:3])
        self.description = f"phantom:{self.render}" + (f" at {n}³" if resolution else "")

    def _case(self, seed: int) -> Case:
        from data_tools.synthetic import make_phantom

        volume = make_phantom(self.render, seed=seed, vessels=False)
        return _case_from_volume(volume, self.resolution, f"phantom seed {seed}")

    def train_case(self, step: int, index: int) -> Case:
        return self._case(TRAIN_SEED_BASE + step * 64 + index)

    def case_block(self, step: int, index: int, box):
        """Rendered block by block: at the phantom's own grid only ``box``; resampled, only
        the box of the render grid that the block's interpolation reads (rendered once)."""
        return self._block(TRAIN_SEED_BASE + step * 64 + index, box)

    def eval_block(self, i: int, box):
        """``box`` of held-out case ``i`` (seed ``i``), rendered as :meth:`case_block` does."""
        return self._block(i, box)

    def eval_name(self, i: int) -> str:
        return f"phantom seed {i}"

    def eval_spacing(self, i: int) -> tuple:
        """Held-out case ``i``'s spacing (mm) as :meth:`eval_cases` prepares it (from the geometry alone)."""
        from data_tools.preprocess import resampled_spacing
        from data_tools.synthetic import phantom_geometry

        spacing, affine = phantom_geometry((self.render,) * 3)
        if self.resolution in (None, self.render):
            return tuple(float(s) for s in spacing)
        return resampled_spacing(affine, (self.render,) * 3, spacing, shape=self.resolution)

    def _block(self, seed: int, box):
        from data_tools.preprocess import resample_block, resample_grid, resample_source_box
        from data_tools.synthetic import make_phantom_block

        if self.resolution in (None, self.render):
            image, labels = make_phantom_block(self.render, box, seed=seed, vessels=False)
            return ct_input(image), labels
        grid, scale, offset = resample_grid((self.render,) * 3, None, shape=self.resolution)
        outer = resample_source_box(box, (self.render,) * 3, scale, offset, 1)  # covers order 0's too
        image, labels = make_phantom_block(self.render, outer, seed=seed, vessels=False)

        def within(array):
            return lambda b: array[tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(b, outer))]

        raw = resample_block(within(image), (self.render,) * 3, scale, offset, box, 1)
        return ct_input(raw), resample_block(within(labels), (self.render,) * 3, scale, offset, box, 0)

    def eval_cases(self, n: int) -> list[Case]:
        return [self._case(seed) for seed in range(n)]


class VolumeSource(Source):
    """Labelled volumes (paths, ``mni``, in-memory ``Volume``s) as :class:`CaseReader`s:
    a training block reads only its box (see :mod:`workbench.training.cases`). Held-out
    cases are made whole by :meth:`eval_cases` (one process evaluates whole cases) and
    read by box by :meth:`eval_block` (what a multi-process run evaluates)."""

    def __init__(self, train, held_out, class_names, description: str):
        self.train, self.held_out = list(train), list(held_out)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.shape = tuple(self.train[0].shape)
        self.description = description

    def _reader(self, step: int, index: int):
        order = np.random.default_rng([7, step]).permutation(len(self.train))
        return self.train[order[index % len(self.train)]]

    def train_case(self, step: int, index: int) -> Case:
        return whole_case(self._reader(step, index))

    def case_block(self, step: int, index: int, box):
        return self._reader(step, index).block(box)

    def sequential_reads(self, step: int, index: int) -> bool:
        return self._reader(step, index).sequential

    def eval_cases(self, n: int) -> list[Case]:
        return [whole_case(r) for r in self.held_out[:n]]

    def eval_block(self, i: int, box):
        return self.held_out[i].block(box)

    def eval_name(self, i: int) -> str:
        return self.held_out[i].name

    def eval_spacing(self, i: int) -> tuple:
        """Held-out case ``i``'s spacing (mm), as :func:`whole_case` gives it."""
        return tuple(getattr(self.held_out[i], "spacing", (1.0, 1.0, 1.0)))


def channels_last(image: np.ndarray) -> np.ndarray:
    """A block (Z, Y, X) of a one-channel source as (Z, Y, X, 1); (Z, Y, X, C) unchanged."""
    return image[..., None] if image.ndim == 3 else image


def model_batch(image: np.ndarray) -> np.ndarray:
    """A prepared case's image, (Z, Y, X) or (Z, Y, X, C), as the batch (1, Z, Y, X, C) a model runs on."""
    return channels_last(np.asarray(image))[None]


def whole_case(reader) -> Case:
    """The whole prepared :class:`Case` of a :class:`~workbench.training.cases.CaseReader`
    (for evaluation: this reads the whole volume)."""
    image, labels = reader.block(tuple((0, n) for n in reader.shape))
    return Case(image, labels, tuple(getattr(reader, "spacing", (1.0, 1.0, 1.0))), reader.name, {})


def _mni_reader(target):
    """The MNI template as a :class:`~workbench.training.cases.CaseReader`: its native image
    and labels memory-mapped from this process's copy (:func:`data_tools.samples.mni_native_files`,
    built slab by slab), resampled to ``target`` (N or (Z, Y, X); None: native)."""
    from data_tools.io import read_box, volume_info
    from data_tools.preprocess import resample_grid
    from data_tools.samples import mni_native_files
    from workbench.training.cases import CaseReader

    image, labels = mni_native_files()
    shape = volume_info(image).shape
    if target is not None and not np.isscalar(target) and tuple(target) == shape:
        target = None
    resampling = None if target is None else resample_grid(shape, (1.0, 1.0, 1.0), shape=target)
    reader = CaseReader("mni", shape, lambda b: read_box(image, b), lambda b: read_box(labels, b),
                        source_format="mni", resampling=resampling)  # fmt: skip
    reader.spacing = tuple(float(s) for s in resampling[1]) if resampling else (1.0, 1.0, 1.0)
    return reader


def make_source(data: str | Sequence, resolution: int | None = None) -> Source:
    """A :class:`Source` from ``phantom[:N]``, ``mni[:N]``, a list of paths or of ``Volume``s.

    Labelled volumes are opened by their headers; their statistics and label checks are
    surveyed here (:func:`workbench.training.cases.survey`: every process must call this,
    in its main thread), and training reads only the boxes it needs."""
    from data_tools.io import _parse_spec
    from data_tools.samples import MNI_CLASS_NAMES
    from workbench.training.cases import survey

    if resolution is not None and (not isinstance(resolution, int) or resolution < 8):
        raise UserError(f"resolution={resolution!r} must be an integer >= 8 (voxels per side)")
    items = [data] if isinstance(data, str) else list(data)
    if not items:
        raise UserError("no training data given; pass phantom, phantom:N, mni or labelled volume paths")
    if len(items) == 1 and isinstance(items[0], str):
        spec = items[0].strip().lower()
        if spec == "phantom" or spec.startswith("phantom:"):
            parts = spec.split(":")
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                raise UserError(f"--data {items[0]!r}: write phantom or phantom:N (render side N, e.g. phantom:128)")
            render = int(parts[1]) if len(parts) == 2 else (resolution or 64)
            if render < 8:
                raise UserError(f"--data {items[0]!r}: the phantom side must be >= 8")
            return PhantomSource(render, resolution)
        if spec == "mni" or spec.startswith("mni:"):
            if resolution is None and spec == "mni":
                resolution = 64
            reader = _mni_reader(resolution if resolution is not None else _parse_spec(spec)[1])
            survey([reader])
            return VolumeSource([reader], [reader], MNI_CLASS_NAMES, f"mni at {reader.shape}")
    pairs = [volume_reader(v, str(getattr(v, "path", None) or (v if isinstance(v, str) else f"volume {i}")),
                            resolution) for i, v in enumerate(items)]  # fmt: skip
    readers = [r for r, _ in pairs]
    class_names = next((names for _, names in pairs if names), None)
    shapes = {r.shape for r in readers}
    if len(shapes) > 1:
        raise UserError(
            f"training volumes have different shapes {sorted(shapes)}; pass --resolution N to resample them all to N³"
        )
    for r in readers:
        r.num_classes = len(class_names) if class_names else None
        r.label_error = labels_error(f"{r.name}", r.num_classes)
    survey(readers)
    num_classes = len(class_names) if class_names else max(r.stats["label_max"] for r in readers) + 1
    if class_names is None:
        class_names = ("background",) + tuple(f"class{k}" for k in range(1, num_classes))
    held = max(1, len(readers) // 5) if len(readers) >= 2 else 0
    train = readers[: len(readers) - held]
    return VolumeSource(
        train, readers[len(readers) - held :] or train, class_names, f"{len(readers)} volume(s) at {readers[0].shape}"
    )


def pad_to(array: np.ndarray, spatial: Sequence[int]) -> np.ndarray:
    """Zero-pad the spatial axes (1..3) of a batch array at their high ends."""
    widths = [(0, 0)] * array.ndim
    for d in range(3):
        widths[1 + d] = (0, int(spatial[d]) - array.shape[1 + d])
    return np.pad(array, widths)


def place(array: np.ndarray, sharding):
    """A global jax.Array from a host array; each device receives only its own block
    (:func:`workbench.execute.distributed.put`, so it also works across processes)."""
    from workbench.execute.distributed import put

    return put(array, sharding)


def batch_blocks(source, step: int, batch: int, keys, *, seed: int, augment_data: bool = True) -> list:
    """The blocks ``keys`` of ``step``'s batch, zero-padded beyond the volume.

    A key is ``((b0, b1), (z0, z1), (y0, y1), (x0, x1))``: a range of the batch and a box of
    the padded volume, what one device holds. Returns one (images f32[b, z, y, x, 1],
    labels i32[b, z, y, x]) per key, equal to that slice of the whole padded batch, made from
    the blocks' own data when the source can (:meth:`Source.train_block`); with
    ``source.channels`` C > 1 the images are f32[b, z, y, x, C]. Where a box read
    decompresses the file from its start (``source.sequential_reads(step, b)``: a compressed
    ``.npz``, a ``.nii.gz``), blocks of one volume that tile a box (this process's part) are
    made by one call for that box and sliced (a block equals the slice of any larger
    block): the file is decompressed once per step rather than once per device block, at
    the cost of that box's transients; elsewhere each block is read alone.
    """
    whole = None
    out, parts = [], []
    channels = getattr(source, "channels", 1)
    for (b0, b1), *box in keys:
        valid = tuple((min(lo, n), min(hi, n)) for (lo, hi), n in zip(box, source.shape))
        size = tuple(hi - lo for lo, hi in box)
        out.append((np.zeros((b1 - b0, *size, channels), np.float32), np.zeros((b1 - b0, *size), np.int32)))
        parts.append((b0, b1, valid))
    # volume by volume, so a source that loads whole cases loads each once per step
    for b in sorted({b for b0, b1, _ in parts for b in range(b0, b1)}):
        mine = [v for b0, b1, v in parts if b0 <= b < b1 and all(hi > lo for lo, hi in v)]
        sequential = getattr(source, "sequential_reads", lambda s, i: False)(step, b)
        joint = _tiled_box(mine) if sequential and hasattr(source, "train_block") and len(set(mine)) > 1 else None
        if joint is not None:  # one read of the box they tile: the file is decompressed once
            tile = source.train_block(step, b, joint, seed=seed, augment_data=augment_data)
        for (images, labels), (b0, b1, valid) in zip(out, parts):
            if not (b0 <= b < b1 and all(hi > lo for lo, hi in valid)):
                continue
            if joint is not None:
                sl = tuple(slice(lo - j, hi - j) for (lo, hi), (j, _) in zip(valid, joint))
                image, label = tile[0][sl], tile[1][sl]
            elif hasattr(source, "train_block"):
                image, label = source.train_block(step, b, valid, seed=seed, augment_data=augment_data)
            else:  # a source that only makes whole batches
                if whole is None:
                    whole = source.train_batch(step, batch, seed=seed, augment_data=augment_data)
                sl = tuple(slice(lo, hi) for lo, hi in valid)
                image, label = whole[0][(b, *sl)], whole[1][(b, *sl)]
            inner = tuple(slice(0, hi - lo) for lo, hi in valid)
            images[(b - b0, *inner)] = channels_last(image)
            labels[(b - b0, *inner)] = label
    if getattr(source, "_cached", None) is not None:
        source._cached = None  # the last whole case (see Source.case_block): released with the batch
    return out


def _tiled_box(boxes):
    """The bounding box of ``boxes`` if they tile it exactly (a process's devices usually
    hold one contiguous part of the volume), else None."""
    boxes = set(boxes)
    joint = tuple((min(b[d][0] for b in boxes), max(b[d][1] for b in boxes)) for d in range(3))
    volume = int(np.prod([hi - lo for lo, hi in joint]))
    return joint if volume == sum(int(np.prod([hi - lo for lo, hi in b])) for b in boxes) else None


class BatchStream:
    """Host batches for steps ``start, start+1, …``, the next ``workers`` prepared in threads.

    Batches are deterministic in the step, so preparing several at once changes nothing but
    the time: on a many-core host (a GPU server) rendering or reading is no longer the
    bottleneck of a fast step. Default: one worker per four cores, at most four.

    With ``keys``, each item is :func:`batch_blocks` of those keys (the blocks of this
    process's devices); without, the whole batch (``Source.train_batch``).
    """

    def __init__(
        self,
        source: Source,
        batch: int,
        *,
        start: int,
        seed: int,
        augment_data: bool = True,
        workers: int | None = None,
        keys=None,
    ):
        import os

        self.source, self.batch, self.seed, self.augment_data = source, batch, seed, augment_data
        self.keys = keys
        self.step = start
        self.workers = workers or min(4, max(1, (os.cpu_count() or 1) // 4))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers)
        self._queue = [self._pool.submit(self._make, start + i) for i in range(self.workers)]

    def _make(self, step):
        if self.keys is not None:
            return batch_blocks(
                self.source, step, self.batch, self.keys, seed=self.seed, augment_data=self.augment_data
            )
        return self.source.train_batch(step, self.batch, seed=self.seed, augment_data=self.augment_data)

    def next(self):
        item = self._queue.pop(0).result()
        self.step += 1
        self._queue.append(self._pool.submit(self._make, self.step + self.workers - 1))
        return item

    def close(self):
        for future in self._queue:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
