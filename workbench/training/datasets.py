"""Training on a dataset folder (MSD / nnU-Net layout), one case in memory at a time.

:func:`make_source` is what the training loop calls: a dataset folder gives a
:class:`DatasetSource`, anything else :func:`workbench.training.data.make_source`.
:class:`DatasetSource` is the :class:`~workbench.training.data.Source` of ``workbench
train --data DATASET_DIR --fold K``: :mod:`data_tools.datasets` reads ``dataset.json``,
pairs and checks the cases (headers and label values, before anything is written) and
splits them into nnU-Net's 5 folds. Training never reads a whole case: each training
case is a :class:`~workbench.training.cases.CaseReader` whose statistics (for the
z-score, or the CT test and padding) and label values are surveyed once, slab by slab and
shared among the run's processes, when the source is made; a step then reads only the
boxes of this process's devices from the image and label files (plus the resampling
margin), so a dataset larger than host memory trains and no process holds a whole volume.
Validation cases are read, resampled and normalised whole when one process evaluates them
(:meth:`DatasetSource.eval_cases`, then dropped); a multi-process run evaluates them by
box (:meth:`DatasetSource.eval_block`). :data:`LIVE_CASES` counts the whole prepared cases
alive at any moment (its ``peak`` is what the tests and ``benchmarks/dataset_memory.py`` check).

:class:`Preprocessing` is how a case becomes the model's input, the same in training and
in ``workbench evaluate``: resampled to a target ``spacing`` (mm; default the per-axis median
spacing of the training cases, as nnU-Net does) or to ``resolution``³, normalised by
:func:`~workbench.training.data.model_input` (the ``CT`` channel name selects the CT
window) and padded at the high end up to the training grid (the largest resampled case).
Each :class:`~workbench.training.data.Case` keeps the grid it was resampled to and its
original shape and affine in ``metadata``, so a prediction goes back onto the original grid
(:func:`data_tools.datasets.resample_onto`).

Several channels (``channel_names`` with C > 1; or ``normalisation="nnunet"``): images are
(Z, Y, X, C) float32 and each channel is normalised as nnU-Net does for the scheme its
planner picks from the channel's name (:func:`workbench.model.nnunet_rules.normalisation_scheme`:
``CT`` → ``CTNormalization`` with the training cases' foreground mean, SD and 0.5 / 99.5
percentiles, :func:`~workbench.training.cases.foreground_properties`; anything else a z-score
over the case). The schemes and numbers are part of :class:`Preprocessing` (so of the
checkpoint), and evaluation applies the training set's numbers. A one-channel dataset keeps
the workbench's rule unless ``normalisation="nnunet"``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError
from workbench.training.cases import CaseReader, foreground_properties, normalise_channels, slab_statistics, survey
from workbench.training.data import Case, Source, model_input

__all__ = [
    "LIVE_CASES",
    "LiveCases",
    "Preprocessing",
    "plan_preprocessing",
    "prepare_case",
    "DatasetSource",
    "make_source",
    "case_reader",
]


class LiveCases:
    """Thread-safe count of the prepared cases alive (tracked objects not yet collected)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.live = self.peak = self.loaded = 0

    def track(self, case):
        with self._lock:
            self.live += 1
            self.loaded += 1
            self.peak = max(self.peak, self.live)
        weakref.finalize(case, self._release)
        return case

    def _release(self):
        with self._lock:
            self.live -= 1

    def reset(self):
        """Start a new measurement: ``peak`` becomes the current count, ``loaded`` 0."""
        with self._lock:
            self.peak, self.loaded = self.live, 0


LIVE_CASES = LiveCases()


@dataclass(frozen=True)
class Preprocessing:
    """Target ``spacing`` (mm, z y x) or ``resolution`` (N³), and the training ``shape``."""

    spacing: tuple[float, float, float] | None
    resolution: int | None
    shape: tuple[int, int, int]
    #: nnU-Net's normalisation: (scheme, properties or None) per channel; () the workbench's rule
    normalisation: tuple = ()

    def as_dict(self) -> dict:
        out = {
            "spacing": None if self.spacing is None else list(self.spacing),
            "resolution": self.resolution,
            "shape": list(self.shape),
        }
        if self.normalisation:
            out["normalisation"] = [{"scheme": s, "properties": p} for s, p in self.normalisation]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        spacing = d.get("spacing")
        norm = tuple((str(n["scheme"]), n.get("properties")) for n in d.get("normalisation") or ())
        return cls(None if spacing is None else tuple(float(s) for s in spacing), d.get("resolution"),
                   tuple(int(s) for s in d["shape"]), norm)  # fmt: skip

    @property
    def channels(self) -> int | None:
        """Input channels of nnU-Net's normalisation (None: the workbench's one-channel rule)."""
        return len(self.normalisation) or None

    def grid_shape(self, shape, spacing) -> tuple[int, int, int]:
        """The shape a case of ``shape`` / ``spacing`` is resampled to (as
        :func:`data_tools.preprocess.resample` rounds it)."""
        if self.resolution is not None:
            return (self.resolution,) * 3
        if self.spacing is None:
            return tuple(int(s) for s in shape)
        new = np.asarray(shape) * np.asarray(spacing) / np.asarray(self.spacing)
        return tuple(max(1, int(round(n))) for n in new)

    def describe(self) -> str:
        if self.resolution is not None:
            return f"resampled to {self.resolution}³"
        grid = "x".join(map(str, self.shape))
        if self.spacing is None:
            return f"native grid {grid}"
        return f"spacing {'x'.join(f'{s:.3g}' for s in self.spacing)} mm, padded to {grid}"


def _spacing3(spacing) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    values = (float(spacing),) * 3 if np.isscalar(spacing) else tuple(float(s) for s in spacing)
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"spacing {spacing!r} is not one or three positive numbers (mm); pass e.g. 1.5 or 2.5,1,1")
    return values  # type: ignore[return-value]


def plan_preprocessing(infos, *, spacing=None, resolution: int | None = None) -> Preprocessing:
    """The :class:`Preprocessing` of cases with headers ``infos`` (``VolumeInfo``s).

    ``resolution``: every case to N³. Else ``spacing`` (default: the per-axis median of the
    cases' spacings; none when they all share one grid) and the training shape is the
    largest resampled case.
    """
    infos = list(infos)
    if not infos and resolution is None:
        raise UserError("no cases to plan the preprocessing from; pass a dataset with cases")
    if spacing is not None and resolution is not None:
        raise UserError("pass --spacing or --resolution, not both (a target voxel size in mm, or N³ voxels)")
    if resolution is not None:
        if not isinstance(resolution, (int, np.integer)) or resolution < 8:
            raise UserError(f"resolution={resolution!r} must be an integer >= 8 (voxels per side)")
        return Preprocessing(None, int(resolution), (int(resolution),) * 3)
    target = _spacing3(spacing)
    if target is None:
        grids = {(i.shape, tuple(np.round(i.spacing, 6))) for i in infos}
        if len(grids) > 1:
            target = tuple(float(np.median([i.spacing[d] for i in infos])) for d in range(3))
    plan = Preprocessing(target, None, (1, 1, 1))
    shapes = [plan.grid_shape(i.shape, i.spacing) for i in infos]
    shape = tuple(max(s[d] for s in shapes) for d in range(3))
    if min(shape) < 4:
        raise UserError(f"the cases resampled to spacing {target} mm are only {shape} voxels; pass a finer --spacing")
    return Preprocessing(target, None, shape)  # type: ignore[arg-type]


def _resampled(volume, plan: Preprocessing):
    from data_tools.preprocess import resample

    if plan.resolution is not None and volume.shape != plan.shape:
        return resample(volume, shape=plan.resolution)
    if plan.spacing is not None and not np.allclose(volume.spacing, plan.spacing, rtol=1e-6):
        return resample(volume, spacing=plan.spacing)
    return volume


def prepare_case(volume, plan: Preprocessing, *, name: str | None = None, shape=None) -> Case:
    """``volume`` resampled, normalised and padded (high end) to ``shape`` (default the
    training shape; never smaller than the resampled case), as a tracked :class:`Case`.

    ``volume``: one ``Volume``, or a list of them, one per channel (the first with the
    labels; :func:`data_tools.datasets.read_case_channels`): the image is then (Z, Y, X, C),
    normalised per channel by ``plan.normalisation`` with the case's statistics combined as
    :func:`~workbench.training.cases.survey` combines them (the blocks of
    :class:`DatasetSource` equal its slices).

    ``metadata``: ``grid_shape`` / ``grid_affine`` (the resampled case before padding) and
    ``original_shape`` / ``original_affine``.
    """
    channels = list(volume) if isinstance(volume, (list, tuple)) else None
    if channels is not None and len(channels) != (plan.channels or 1):
        raise UserError(f"the case has {len(channels)} channel(s) but the preprocessing normalises "
                        f"{plan.channels or 1}; evaluate with the dataset the model was trained on")  # fmt: skip
    volume = channels[0] if channels else volume
    original_shape, original_affine = tuple(volume.shape), np.array(volume.affine)
    volume = _resampled(volume, plan)
    grid = tuple(volume.shape)
    target = tuple(max(a, b) for a, b in zip(grid, shape or plan.shape))
    pads = [(0, t - g) for t, g in zip(target, grid)]
    if plan.normalisation:
        arrays = [np.asarray(volume.array, np.float32)] + [np.asarray(_resampled(v, plan).array, np.float32)
                                                           for v in (channels or [])[1:]]  # fmt: skip
        stats = [slab_statistics(a) for a in arrays]
        image = normalise_channels(np.stack(arrays, axis=-1), plan.normalisation, stats)
        lows = np.array([st["min"] for st in stats], np.float32).reshape(1, 1, 1, -1)
        low = normalise_channels(lows, plan.normalisation, stats)[0, 0, 0]
        if any(p for _, p in pads):
            image = np.concatenate([np.pad(image[..., c : c + 1], pads + [(0, 0)], constant_values=float(low[c]))
                                    for c in range(image.shape[-1])], axis=-1)  # fmt: skip
        if not channels:
            image = image[..., 0]
    else:
        image = model_input(volume)
        if any(p for _, p in pads):
            image = np.pad(image, pads, constant_values=float(image.min()))
    labels = None if volume.labels is None else np.pad(np.asarray(volume.labels, np.uint8), pads)
    meta = {
        "case": name,
        "grid_shape": grid,
        "grid_affine": np.array(volume.affine),
        "original_shape": original_shape,
        "original_affine": original_affine,
    }
    case = Case(image, labels, tuple(volume.spacing), name or str(volume.path), meta)
    return LIVE_CASES.track(case)


class _LazyCases:
    """Held-out cases read when iterated (one at a time), never kept."""

    def __init__(self, source: DatasetSource, files):
        self.source, self.files = source, list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        return self.source.load(self.files[i])

    def __iter__(self):
        for files in self.files:
            yield self.source.load(files)


class DatasetSource(Source):
    """Cases of a dataset folder's fold ``fold`` (training) and its validation cases."""

    # Batches are prepared one at a time, whatever the host's cores: with one batch being
    # trained on and the next being read, at most two cases are in host memory.
    prefetch_workers = 1

    def __init__(self, path, *, fold: int = 0, spacing=None, resolution: int | None = None, progress: bool = True,
                 normalisation: str = "auto"):  # fmt: skip
        from data_tools.datasets import check_dataset, open_dataset

        dataset = open_dataset(path)
        if normalisation not in ("auto", "nnunet", "workbench"):
            raise UserError(f"normalisation={normalisation!r}: use auto, nnunet or workbench")
        if normalisation == "workbench" and len(dataset.channel_names) > 1:
            raise UserError(f"{dataset.root} has {len(dataset.channel_names)} channels {list(dataset.channel_names)}; "
                            "the workbench's normalisation is for one channel: use nnU-Net's (normalisation='nnunet')")  # fmt: skip
        nnunet = normalisation == "nnunet" or (normalisation == "auto" and len(dataset.channel_names) > 1)
        self.dataset, self.fold = dataset, int(fold)
        self.channels = len(dataset.channel_names)
        self.train_files, self.val_files = dataset.split(fold)
        # headers and grids of every case; the label values of the training cases are
        # checked block by block below (validation cases: whole, as they are evaluated)
        infos = check_dataset(dataset, self.train_files, labels=False, progress=progress)
        infos.update(check_dataset(dataset, self.val_files, progress=progress))
        self.plan = plan_preprocessing(infos.values(), spacing=spacing, resolution=resolution)
        self.shape = self.plan.shape
        self.readers = [self._reader(f, infos[f.name]) for f in self.train_files]
        self._infos = infos
        self._val_readers: dict = {}
        survey(self.readers)
        if nnunet:  # nnU-Net's scheme per channel name; CT's numbers from the training cases' foreground
            from workbench.model.nnunet_rules import normalisation_scheme

            schemes = [normalisation_scheme(n) for n in dataset.channel_names]
            ct = [c for c, s in enumerate(schemes) if s == "CTNormalization"]
            props = foreground_properties(self.readers, ct) if ct else {}
            norm = tuple((s, props.get(str(c))) for c, s in enumerate(schemes))
            self.plan = dataclasses.replace(self.plan, normalisation=norm)
            for reader in self.readers:
                reader.normalisation = norm
        self.class_names = dataset.class_names
        self.num_classes = len(self.class_names)
        self.regions, self.regions_class_order = dataset.regions, dataset.regions_class_order
        self.description = (
            f"{dataset.name} fold {self.fold} ({len(self.train_files)} training, {len(self.val_files)} "
            f"validation cases; {self.plan.describe()})"
        )
        self.meta = {
            "dataset": {"path": str(dataset.root), "name": dataset.name, "layout": dataset.layout,
                        "fold": self.fold, "channel_names": list(dataset.channel_names),
                        "train": [c.name for c in self.train_files], "val": [c.name for c in self.val_files]},
            "preprocessing": self.plan.as_dict(),
        }  # fmt: skip
        if dataset.regions:  # nnU-Net's region-based labels: what a region model predicts
            self.meta["dataset"].update(regions=[[n, list(v)] for n, v in dataset.regions],
                                        regions_class_order=list(dataset.regions_class_order))  # fmt: skip

    def load(self, files) -> Case:
        """One case read, resampled, normalised and padded to the training grid."""
        from data_tools.datasets import read_case, read_case_channels

        if self.plan.normalisation:
            volumes = read_case_channels(self.dataset, files, check=False)
            return prepare_case(volumes if len(volumes) > 1 else volumes[0], self.plan, name=files.name)
        return prepare_case(read_case(self.dataset, files, check=False), self.plan, name=files.name)

    def _reader(self, files, info) -> CaseReader:
        """The :class:`~workbench.training.cases.CaseReader` of a case (:func:`case_reader`)."""
        return case_reader(self.dataset, self.plan, files, info)

    def _pick(self, step: int, index: int) -> int:
        order = np.random.default_rng([7, step]).permutation(len(self.train_files))
        return int(order[index % len(order)])

    def train_case(self, step: int, index: int) -> Case:
        """The whole prepared case (reads it whole; training uses :meth:`case_block`)."""
        return self.load(self.train_files[self._pick(step, index)])

    def case_block(self, step: int, index: int, box):
        """Only ``box`` of the prepared case (its source box plus the resampling margin is read)."""
        return self.readers[self._pick(step, index)].block(box)

    def sequential_reads(self, step: int, index: int) -> bool:
        return self.readers[self._pick(step, index)].sequential

    def eval_cases(self, n: int):
        """The first ``n`` validation cases, each read and prepared whole when iterated (one
        at a time; one process evaluates whole cases)."""
        return _LazyCases(self, self.val_files[:n])

    def survey_held_out(self, n: int) -> None:
        """Survey the first ``n`` validation cases' statistics, their slabs shared among the
        run's processes (every process calls this, in the main thread, before
        :meth:`eval_block`; see :func:`workbench.training.cases.survey`)."""
        survey([self._val_reader(i) for i in range(min(n, len(self.val_files)))])

    def eval_block(self, i: int, box):
        """``box`` of validation case ``i``, prepared as :meth:`eval_cases` prepares it whole
        (what a multi-process run evaluates; surveyed by :meth:`survey_held_out`, or alone
        on first use)."""
        return self._val_reader(i).block(box)

    def _val_reader(self, i: int) -> CaseReader:
        if i not in self._val_readers:
            files = self.val_files[i]
            self._val_readers[i] = self._reader(files, self._infos[files.name])
        return self._val_readers[i]

    def eval_name(self, i: int) -> str:
        return self.val_files[i].name

    def eval_spacing(self, i: int) -> tuple:
        """Validation case ``i``'s spacing (mm) as :meth:`eval_cases` prepares it (from its header)."""
        from data_tools.preprocess import resampled_spacing

        info, plan = self._infos[self.val_files[i].name], self.plan
        if plan.resolution is not None and tuple(info.shape) != plan.shape:
            return resampled_spacing(info.affine, info.shape, info.spacing, shape=plan.resolution)
        if plan.spacing is not None and not np.allclose(info.spacing, plan.spacing, rtol=1e-6):
            return resampled_spacing(info.affine, info.shape, info.spacing, spacing=plan.spacing)
        return tuple(float(s) for s in info.spacing)


def case_reader(dataset, plan: Preprocessing, files, info) -> CaseReader:
    """The :class:`~workbench.training.cases.CaseReader` of a dataset's case (``info``: its
    headers' ``VolumeInfo``): its image and label files read by box, resampled as
    :func:`prepare_case` does, padded to the plan's grid (training, and ``workbench evaluate``
    across processes)."""
    from data_tools.errors import DataError
    from data_tools.formats.itk import reads_whole
    from data_tools.io import read_box
    from data_tools.preprocess import resample_grid

    root = dataset.root
    shape, spacing = tuple(info.shape), tuple(info.spacing)
    resampling = None
    if plan.resolution is not None and shape != plan.shape:
        resampling = resample_grid(shape, spacing, shape=plan.resolution)
    elif plan.spacing is not None and not np.allclose(spacing, plan.spacing, rtol=1e-6):
        resampling = resample_grid(shape, spacing, spacing=plan.spacing)
    grid = resampling[0] if resampling else shape
    k = len(dataset.class_names)
    rel = os.path.relpath(files.label, root) if files.label is not None else None

    def label_error(lo, hi, bad, non_integer):  # the messages of data_tools.datasets' checks
        if non_integer:
            return DataError(root, f"case {files.name}: {rel} holds non-integer values",
                             "write integer labels (resample label maps with nearest neighbour)")  # fmt: skip
        return DataError(root, f"case {files.name}: {rel} holds label values {bad} outside the {k} declared "
                         f"classes 0..{k - 1} {list(dataset.class_names)}", "remap the label map or "
                         "declare the classes in dataset.json \"labels\"")  # fmt: skip

    readers = tuple((lambda b, f=f: read_box(f, b)) for f in files.images)
    if files.label is not None:
        read_labels = lambda b: read_box(files.label, b)  # noqa: E731
    else:  # an unlabelled test case: background everywhere (nothing is scored)
        read_labels = lambda b: np.zeros(tuple(hi - lo for lo, hi in b), np.uint8)  # noqa: E731
    return CaseReader(
        files.name, shape, readers if len(readers) > 1 else readers[0], read_labels,
        modality=dataset.channel_names[0], source_format=info.source_format, resampling=resampling,
        normalisation=plan.normalisation or None,
        shape=tuple(max(a, b) for a, b in zip(grid, plan.shape)), num_classes=k, label_error=label_error,
        labels_dtype=np.uint8 if k <= 256 else np.int32,
        sequential=any(str(f).endswith(".gz") or reads_whole(f) for f in (*files.images, files.label) if f is not None),
    )  # fmt: skip


def make_source(data: str | Sequence, resolution: int | None = None, *, fold: int = 0, spacing=None,
                normalisation: str = "auto") -> Source:  # fmt: skip
    """The :class:`~workbench.training.data.Source` of ``workbench train --data``: a
    :class:`DatasetSource` for a dataset folder (``fold``, ``spacing``, ``normalisation``:
    ``auto`` nnU-Net's per channel for several channels, ``nnunet`` always, ``workbench``
    the one-channel rule), else :func:`workbench.training.data.make_source` (phantoms,
    ``mni``, volume paths)."""
    from data_tools.datasets import is_dataset
    from workbench.training import data as sources

    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if len(items) == 1 and isinstance(items[0], (str, os.PathLike)) and is_dataset(items[0]):
        return DatasetSource(items[0], fold=fold, spacing=spacing, resolution=resolution, normalisation=normalisation)
    if fold or spacing is not None:
        raise UserError(
            "--fold and --spacing apply to a dataset folder (dataset.json, imagesTr/, labelsTr/); "
            "for other data use --resolution"
        )
    return sources.make_source(data, resolution)
