"""Training cases read box by box: no process holds or reads a whole volume to train.

A :class:`CaseReader` is one labelled case as its readers of boxes (a file through
:func:`data_tools.io.read_box`, an ``.npz`` image and ``labels`` member, a phantom
rendered by :func:`~data_tools.synthetic.make_phantom_block`, or arrays already in memory)
plus how it becomes the model's input: resampled (:func:`data_tools.preprocess.resample_block`,
image linear, labels nearest; a block reads only its source box plus the interpolation
margin and equals the same slice of the whole resampled case bitwise), normalised by
:func:`~workbench.training.data.model_input`'s rule with statistics of the whole prepared
case, and zero-padded (image: its normalised minimum) up to the training grid.

The statistics (count, mean, squared deviations, min, max, in float64) and the label-value
checks come from :func:`survey`: each case is cut into fixed z-slabs (at most
:data:`SLABS` per case, chosen from the case's shape alone); in a run of P processes
process p surveys slabs ``p, p+P, …`` of all cases together, the per-slab rows are
gathered once (:func:`workbench.execute.distributed.allgather`, in the main thread,
before any batch is made) and combined in slab order, so every process count gets the
same floats. A case not yet surveyed is surveyed alone on first use (one process: the
same rows, the same result). Each slab reads its own box; a ``.nii.gz`` is decompressed
up to the slab's end, so a case costs up to ``SLABS / 2`` decompressions in all.

Several channels: ``read_image`` is then a tuple of readers, one per channel; blocks are
(Z, Y, X, C) and ``normalisation`` gives each channel nnU-Net's scheme and properties
(:func:`workbench.model.nnunet_rules.normalise_channel`, with the channel's surveyed
whole-case statistics). :func:`foreground_properties` is the training set's foreground
intensities per channel (nnU-Net's ``CTNormalization`` numbers), surveyed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from workbench.errors import UserError

__all__ = [
    "SLABS",
    "CaseReader",
    "survey",
    "foreground_properties",
    "slab_statistics",
    "slab_boxes",
    "volume_reader",
    "labels_error",
    "is_ct_from",
    "ct_input",
    "CT_WINDOW",
]

CT_WINDOW = (40.0, 400.0)  # abdomen window (centre, width) in HU

#: z-slabs per case in :func:`survey` (fewer for thin cases).
SLABS = 8
_BAD = 8  # label values listed in an error


def slab_boxes(shape, slabs: int = SLABS) -> list:
    """The fixed z-slabs of a ``shape`` volume: a function of the shape only."""
    rows = max(1, math.ceil(shape[0] / slabs))
    return [((z, min(z + rows, shape[0])), (0, shape[1]), (0, shape[2])) for z in range(0, shape[0], rows)]


def _slice(box):
    return tuple(slice(lo, hi) for lo, hi in box)


@dataclass(eq=False)
class CaseReader:
    """One labelled case read by boxes (see the module notes).

    ``read_image(box)`` / ``read_labels(box)``: the stored voxels of a box of ``raw_shape``
    (``read_image`` a tuple of readers: one per channel, blocks (Z, Y, X, C));
    ``resampling``: ``(grid_shape, scale, offset)`` or None; ``shape``: the padded shape
    (default the grid); ``num_classes``: the declared classes (None: any value >= 0);
    ``label_error(lo, hi, bad, non_integer)``: the exception for bad label values;
    ``normalisation``: None (the workbench's rule, :func:`~workbench.training.data.model_input`)
    or nnU-Net's ``(scheme, properties)`` per channel.
    """

    name: str
    raw_shape: tuple
    read_image: Callable
    read_labels: Callable
    modality: str = ""
    source_format: str = ""
    resampling: tuple | None = None
    shape: tuple | None = None
    num_classes: int | None = None
    label_error: Callable | None = None
    labels_dtype: object = np.uint8
    stats: dict | None = field(default=None, repr=False)
    #: a box read decompresses the file from its start (a compressed ``.npz`` member, a
    #: ``.nii.gz``) or reads it whole (NRRD, compressed MetaImage): a process's blocks are then made by one read of the box they tile
    #: (:func:`workbench.training.data.batch_blocks`) rather than one per device block
    sequential: bool = False
    normalisation: tuple | None = None

    def __post_init__(self):
        self.raw_shape = tuple(int(n) for n in self.raw_shape)
        self.shape = tuple(self.shape or self.grid)

    @property
    def grid(self) -> tuple:
        """The shape after resampling (before padding)."""
        return tuple(int(n) for n in self.resampling[0]) if self.resampling else self.raw_shape

    @property
    def channels(self) -> int:
        """Input channels (1 for a single ``read_image``)."""
        return len(self.read_image) if isinstance(self.read_image, (tuple, list)) else 1

    def grid_channel(self, box, channel: int = 0) -> np.ndarray:
        """float32 voxels of one channel in ``box`` of the resampled grid (our own copy)."""
        read = self.read_image[channel] if isinstance(self.read_image, (tuple, list)) else self.read_image
        if self.resampling is None:
            return np.array(read(box), np.float32)
        from data_tools.preprocess import resample_block

        _, scale, offset = self.resampling
        return resample_block(lambda b: np.asarray(read(b), np.float32), self.raw_shape, scale, offset, box, 1)

    def grid_block(self, box, *, labels: bool = True):
        """(float32 image, labels or None) of ``box`` of the resampled grid, as stored
        (image (Z, Y, X), or (Z, Y, X, C) for a tuple of channel readers)."""
        if isinstance(self.read_image, (tuple, list)):
            image = np.stack([self.grid_channel(box, c) for c in range(self.channels)], axis=-1)
        else:
            image = self.grid_channel(box)
        if not labels:
            return image, None
        if self.resampling is None:
            return image, np.asarray(self.read_labels(box))
        from data_tools.preprocess import resample_block

        _, scale, offset = self.resampling
        return image, resample_block(self.read_labels, self.raw_shape, scale, offset, box, 0)

    def _info(self) -> dict:
        if self.stats is None:
            survey([self], gather=False)
        return self.stats

    @property
    def is_ct(self) -> bool:
        return is_ct_from(self.modality, self.source_format, lambda: (self._info()["min"], self._info()["max"]))

    def normalise(self, raw: np.ndarray, *, in_place: bool = False) -> np.ndarray:
        """The model input of raw (resampled) voxels of this case, with whole-case statistics
        (``in_place``: overwriting ``raw``, a float32 array of ours; the same values)."""
        from data_tools.preprocess import zscore

        if self.normalisation is not None:
            return normalise_channels(raw, self.normalisation, self._info()["channels"])
        in_place = in_place and raw.dtype == np.float32 and raw.flags.writeable
        if self.is_ct:
            return ct_input(raw, in_place=in_place)
        info = self._info()
        return zscore(np.asarray(raw, np.float32), mean=info["mean"], std=info["std"], in_place=in_place)

    def block(self, box):
        """(f32 model input, labels) of ``box`` of the padded case: only that box is read
        (plus the resampling margin); the padding is the normalised minimum and label 0."""
        inner = tuple((min(lo, n), min(hi, n)) for (lo, hi), n in zip(box, self.grid))
        size = tuple(hi - lo for lo, hi in box)
        if inner == tuple(box):
            image, labels = self.grid_block(box)  # fresh arrays: normalised in place
            return self.normalise(image, in_place=True), labels.astype(self.labels_dtype, copy=False)
        if isinstance(self.read_image, (tuple, list)):  # each channel padded with its normalised minimum
            lows = np.array([c["min"] for c in self._info()["channels"]], np.float32)
            pad = self.normalise(lows.reshape(1, 1, 1, -1))[0, 0, 0]
            size = (*size, len(lows))
        else:
            pad = self.normalise(np.full((1, 1, 1), self._info()["min"], np.float32))[0, 0, 0]
        image, labels = np.full(size, pad, np.float32), np.zeros(size[:3], self.labels_dtype)
        if all(hi > lo for lo, hi in inner):
            raw, lab = self.grid_block(inner)
            part = tuple(slice(0, hi - lo) for lo, hi in inner)
            image[part], labels[part] = self.normalise(raw, in_place=True), lab
        return image, labels


def normalise_channels(raw: np.ndarray, normalisation, stats) -> np.ndarray:
    """nnU-Net's normalisation of each channel of ``raw`` (Z, Y, X, C), or (Z, Y, X) for one
    channel: ``normalisation`` (scheme, properties) and ``stats`` (the whole case's moments)
    per channel (:func:`workbench.model.nnunet_rules.normalise_channel`)."""
    from workbench.model.nnunet_rules import normalise_channel

    if raw.ndim == 3:
        ((scheme, props),) = normalisation
        return normalise_channel(raw, scheme, properties=props, stats=stats[0])
    out = np.empty(raw.shape, np.float32)
    for c, ((scheme, props), st) in enumerate(zip(normalisation, stats)):
        out[..., c] = normalise_channel(raw[..., c], scheme, properties=props, stats=st)
    return out


def slab_statistics(array: np.ndarray) -> dict:
    """:func:`data_tools.preprocess.combine_moments` of a whole (Z, Y, X) array's
    :func:`slab_boxes`, combined as :func:`survey` combines them: the same floats."""
    from data_tools.preprocess import block_moments, combine_moments

    return combine_moments([block_moments(array[_slice(b)]) for b in slab_boxes(array.shape)])


def _image_row(case: CaseReader, box, channel: int = 0) -> list:
    from data_tools.preprocess import block_moments

    raw = case.grid_channel(box, channel)
    if not np.isfinite(raw).all():
        raise UserError(f"{case.name} holds NaN/inf voxels; replace them (e.g. np.nan_to_num) before training")
    return list(block_moments(raw))


def _label_row(case: CaseReader, box) -> list:
    labels = np.asarray(case.read_labels(box))
    non_integer = not np.issubdtype(labels.dtype, np.integer) and labels.dtype != bool
    non_integer = non_integer and not np.array_equal(labels, np.rint(labels))
    k = case.num_classes if case.num_classes is not None else np.inf
    bad = np.unique(labels[(labels < 0) | (labels >= k)])[:_BAD] if not non_integer else []
    row = [1.0, float(labels.min()), float(labels.max()), float(non_integer)]
    return row + [float(b) for b in bad] + [np.nan] * (_BAD - len(bad))


def survey(cases, *, gather: bool = True) -> None:
    """Statistics and label checks of ``cases`` not yet surveyed (see the module notes).

    ``gather``: share the slabs among this run's processes and gather the rows (every
    process must call it, in the main thread); False: this process surveys alone."""
    cases = [c for c in cases if c.stats is None]
    if not cases:
        return
    index, count = 0, 1
    if gather:
        import jax

        index, count = jax.process_index(), jax.process_count()
    jobs, rows = survey_rows(cases, index, count)
    if count > 1:
        from workbench.execute.distributed import allgather

        gathered = allgather(rows)
        rows = np.stack([gathered[k % count, k] for k in range(len(jobs))])
    _finish(jobs, rows)


def survey_rows(cases, index: int, count: int):
    """The survey's jobs (case, "image" or "labels", slab box) and this process's rows
    (process ``index`` of ``count`` fills rows ``index, index + count, …``; NaN elsewhere)."""
    jobs = [(c, kind, box) for c in cases
            for kind, shape in (("labels", c.raw_shape), *((ch, c.grid) for ch in range(c.channels)))
            for box in slab_boxes(shape)]  # fmt: skip
    rows = np.full((len(jobs), 5 + 4 + _BAD), np.nan)
    for k in range(index, len(jobs), count):
        case, kind, box = jobs[k]
        if kind == "labels":
            rows[k, 5:] = _label_row(case, box)
        else:
            rows[k, :5] = _image_row(case, box, kind)
    return jobs, rows


def _finish(jobs, rows) -> None:
    from data_tools.preprocess import combine_moments

    for case in dict.fromkeys(c for c, _, _ in jobs):
        mine = [(kind, row) for (c, kind, _), row in zip(jobs, rows) if c is case]
        labels = np.array([row[5:] for kind, row in mine if kind == "labels"])
        lo, hi, non_integer = float(labels[:, 1].min()), float(labels[:, 2].max()), bool(labels[:, 3].max())
        bad = sorted({float(v) for v in labels[:, 4:].ravel() if not np.isnan(v)})[:_BAD]
        if non_integer or bad:
            raise case.label_error(lo, hi, [int(b) for b in bad], non_integer)
        channels = [combine_moments([tuple(row[:5]) for kind, row in mine if kind == c]) for c in range(case.channels)]
        case.stats = {**channels[0], "label_min": int(lo), "label_max": int(hi), "channels": channels}


#: foreground voxels sampled per slab and channel by :func:`foreground_properties`
#: (nnU-Net samples 10,000 per case; here up to ``SLABS`` × 1250)
FOREGROUND_SAMPLES = 1250


def foreground_properties(cases, channels, *, gather: bool = True) -> dict:
    """nnU-Net's ``foreground_intensity_properties_per_channel`` of the training ``cases``
    for the channel indices ``channels``: ``{str(c): {mean, std, min, max, percentile_00_5,
    percentile_99_5}}`` of the voxels whose label is > 0, on the stored grid.

    Mean, SD, min and max are those of every foreground voxel (moments combined in slab
    order); the percentiles are of up to :data:`FOREGROUND_SAMPLES` voxels per slab, drawn
    with a seed of (case, job index, channel). Slabs are shared among the processes as in
    :func:`survey` (``gather``), so every process count gets the same numbers."""
    index, count = 0, 1
    if gather and cases:
        import jax

        index, count = jax.process_index(), jax.process_count()
    jobs, rows = foreground_rows(cases, channels, index, count)
    if count > 1:
        from workbench.execute.distributed import allgather

        gathered = allgather(rows)
        rows = np.stack([gathered[k % count, k] for k in range(len(jobs))])
    return foreground_finish(jobs, rows, channels)


def foreground_rows(cases, channels, index: int, count: int):
    """:func:`foreground_properties`' jobs (case index, channel, slab box) and this process's
    rows (process ``index`` of ``count`` fills rows ``index, index + count, …``)."""
    from data_tools.preprocess import block_moments

    jobs = [(i, c, box) for i, case in enumerate(cases) for c in channels for box in slab_boxes(case.raw_shape)]
    rows = np.full((len(jobs), 5 + FOREGROUND_SAMPLES), np.nan)
    for k in range(index, len(jobs), count):
        i, c, box = jobs[k]
        case = cases[i]
        read = case.read_image[c] if isinstance(case.read_image, (tuple, list)) else case.read_image
        values = np.asarray(read(box), np.float32)[np.asarray(case.read_labels(box)) > 0]
        rows[k, :5] = block_moments(values)
        rng = np.random.default_rng([i, k, c])
        picked = values if values.size <= FOREGROUND_SAMPLES else rng.choice(values, FOREGROUND_SAMPLES, replace=False)
        rows[k, 5 : 5 + picked.size] = picked
    return jobs, rows


def foreground_finish(jobs, rows, channels) -> dict:
    """The properties from every process's rows (see :func:`foreground_properties`)."""
    from data_tools.preprocess import combine_moments

    out = {}
    for c in channels:
        mine = [row for (_, ch, _), row in zip(jobs, rows) if ch == c]
        moments = combine_moments([tuple(row[:5]) for row in mine])
        samples = np.concatenate([row[5:][~np.isnan(row[5:])] for row in mine]) if mine else np.zeros(0)
        if not samples.size:
            raise UserError(
                f"channel {c} has no foreground voxel (label > 0) in the training cases, so its CT "
                "normalisation has no statistics; label some foreground or rename the channel"
            )
        low, high = np.percentile(samples, (0.5, 99.5))
        out[str(c)] = {"mean": moments["mean"], "std": moments["std"], "min": moments["min"], "max": moments["max"],
                       "percentile_00_5": float(low), "percentile_99_5": float(high)}  # fmt: skip
    return out


def is_ct_from(modality, source_format: str, value_range) -> bool:
    """:func:`is_ct` from its parts: the DICOM modality (or ""), the source format and
    ``value_range()`` → (min, max) of the intensities, called only when needed (a run
    that reads the volume block by block reduces it over blocks and processes)."""
    modality = str(modality or "").upper()
    if modality:
        return modality == "CT"
    if source_format == "phantom":
        return True
    low, high = value_range()
    return low <= -900.0 and high > 0.0


def ct_input(hounsfield: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """CT normalisation of :func:`model_input`: the abdomen window mapped to [-2, 2]
    (``in_place``: overwriting a float32 array, the same values)."""
    from data_tools.preprocess import window

    array = hounsfield if in_place else np.asarray(hounsfield, np.float32)
    out = window(array, center=CT_WINDOW[0], width=CT_WINDOW[1], in_place=in_place)
    out -= np.float32(0.5)
    out *= np.float32(4.0)
    return out


def _no_labels(name: str) -> UserError:
    return UserError(
        f"{name} has no labels; training needs (image, labels) pairs: pass a volume with a "
        "label map (e.g. an .npz holding 'image' and 'labels')"
    )


def labels_error(name: str, num_classes):
    def error(lo, hi, bad, non_integer):
        k = num_classes if num_classes is not None else int(hi) + 1
        return UserError(
            f"labels of {name} hold values {bad} outside the class range 0..{k - 1}; remap them "
            f"or train a model with num_classes > {int(hi)}"
        )

    return error


def volume_reader(item, name: str, resolution, target=None):
    """A :class:`~workbench.training.cases.CaseReader` of a path (headers only: an ``.npz``
    with ``image`` and ``labels``, or an OME-Zarr store with a label image) or an in-memory ``Volume``, resampled to ``resolution``³
    (or ``target``), and its class names (or None)."""
    from data_tools.preprocess import resample_grid
    from workbench.training.cases import CaseReader

    sequential = False
    if hasattr(item, "array"):
        if item.labels is None:
            raise _no_labels(name)
        image, labels = item.array, item.labels
        shape, spacing, dtype, names = item.shape, item.spacing, labels.dtype, item.class_names
        modality, fmt = item.metadata.get("modality", ""), item.source_format

        def read_image(b):
            return image[tuple(slice(*x) for x in b)]

        def read_labels(b):
            return labels[tuple(slice(*x) for x in b)]
    else:
        from data_tools.formats import zarr as zarr_format
        from data_tools.formats.numpy import npz_members
        from data_tools.io import read_box, volume_info

        path = item
        info = volume_info(path)
        shape, spacing, modality, fmt = info.shape, info.spacing, info.modality, info.source_format
        names = None
        if fmt == "zarr":  # an OME-Zarr label image
            found = zarr_format.labels_info(path)
            if found is None:
                raise _no_labels(name)
            dtype, names = found

            def read_labels(b):
                return zarr_format.read_labels_box(path, b)
        else:
            members = npz_members(path) if fmt == "npz" else {}
            if "labels" not in members:
                raise _no_labels(name)
            dtype = members["labels"][1]
            import zipfile

            with zipfile.ZipFile(path) as z:
                sequential = any(i.compress_type != zipfile.ZIP_STORED for i in z.infolist())
            if "class_names" in members:
                with np.load(path, allow_pickle=False) as npz:
                    names = tuple(str(n) for n in npz["class_names"])

            def read_labels(b):
                return read_box(path, b, member="labels")

        def read_image(b):
            return read_box(path, b)

    from workbench.training.losses import check_labels

    check_labels(np.zeros(1, dtype), 1 << 30, name=f"labels of {name}")  # the dtype (values: surveyed)
    if not np.prod(shape):
        raise UserError(f"labels of {name} are empty (shape {tuple(shape)}); pass a non-empty label map")
    if target is None and resolution is not None and tuple(shape) != (resolution,) * 3:
        target = resolution
    resampling = None if target is None else resample_grid(shape, spacing, shape=target)
    reader = CaseReader(name, shape, read_image, read_labels, modality=modality, source_format=fmt,
                        resampling=resampling, sequential=sequential)  # fmt: skip
    reader.spacing = (
        tuple(float(v) for v in spacing)
        if resampling is None
        else tuple(float(s * k) for s, k in zip(spacing, resampling[1]))
    )
    return reader, names
