"""Inference as one of several processes: each reads, runs and writes only its own blocks.

In a multi-process run (``workbench launch -- infer``, or one process per host with
``WORKBENCH_DISTRIBUTED=auto``) :func:`infer_per_process` replaces the whole-volume path
(:func:`~workbench.app.inference.infer` then :func:`~workbench.app.results.write_result`):

1. **Input.** Each process reads the boxes of its own devices' shards
   (:func:`data_tools.read_box`: the chunks of a zarr store, memory-mapped ``.npy`` and
   ``.nii``, the z-slices of TIFF and DICOM, phantom blocks rendered alone; ``.nii.gz`` is
   streamed up to the block; an ``.npz`` image is memory-mapped when stored and streamed
   up to the block when compressed; ``mni`` / ``mni:N`` from a memory-mapped copy of the
   native template, resampled by block). The
   statistics the model input needs (min and max for the CT test, mean and variance for
   the z-score) are reduced over the shards of every process in shard order, so the
   image equals :func:`workbench.training.data.model_input` of the whole volume.
2. **Run.** The forward pass on the global mesh; the prediction (argmax) is taken on the
   devices, so only uint8 labels come back to the host.
3. **Output.** Process 0 creates a hidden temporary result folder with zarr stores whose
   chunks are the shard blocks; every process writes its own shards (prediction, and on
   request logits, the reference's prediction and the error map). Small per-process
   summaries are then gathered (which also means every process has finished writing),
   and process 0 writes ``report.json`` and renames the folder into place. A run that
   fails or loses a process leaves only the hidden temporary folder, named after process
   0's host and pid: the next run at the same ``out`` on that host removes it once
   process 0 is dead (:func:`data_tools.atomic.sweep_stale`).
4. **Reference** (:func:`reference_mode`). For a model whose output depends only on a
   neighbourhood (no norm, or batch norm: running statistics in inference) ``--reference``
   compares shard by shard and no process holds the whole volume: the single-device
   reference runs on each shard's box plus a margin of the receptive field rounded to the
   pooling grid (:func:`~workbench.execute.run.overlap_width`), whose inner part equals the
   whole-volume reference. Instance and group norm take statistics over the whole volume,
   so there each process runs the whole-volume reference on one of its devices (the user
   asked for it: it reads the whole volume) when it fits one device, and otherwise says so
   and reports no comparison. The per-shard comparisons merge into the report's
   (:func:`~workbench.analysis.compare.merge_shards`).

With ``WORKBENCH_TRACE_MEMORY=1`` each process measures its peak host allocation
(``tracemalloc``) from reading the input to writing the output; the report lists it
per process beside the boxes it read.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.atomic import sweep_stale, temp_sibling
from workbench.errors import UserError

__all__ = ["BlockInput", "open_input", "infer_per_process", "reference_mode", "TRACE_ENV"]

TRACE_ENV = "WORKBENCH_TRACE_MEMORY"
_MOMENTS = ("present", "count", "mean", "m2", "min", "max")


@dataclass
class BlockInput:
    """An input read box by box: a path or spec and what its headers say."""

    source: str
    series: str | None
    info: object  # data_tools.io.VolumeInfo

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.info.shape)

    def read(self, box) -> np.ndarray:
        """float32 voxels of ``box`` as stored (Hounsfield units, MRI intensities, ...), in an
        array of its own (normalised in place later)."""
        from data_tools.io import read_box

        block = np.asarray(read_box(self.source, box, series=self.series))
        if block.dtype != np.float32 or not block.flags.writeable or not block.flags.owndata:
            block = block.astype(np.float32)  # a copy: not a view of a memory-mapped file
        return block


def open_input(source, series: str | None = None) -> BlockInput:
    """A :class:`BlockInput` for a path or spec; only headers are read."""
    from data_tools.io import volume_info

    if not isinstance(source, (str, os.PathLike)):
        raise UserError("a multi-process run reads its input from a path or spec (a file, folder, phantom:N or mni)")
    return BlockInput(str(source), series, volume_info(source, series=series))


class _Normaliser:
    """The model input of a block, from statistics of the whole volume (see module notes)."""

    def __init__(self, info, moments: dict):
        from workbench.training.data import is_ct_from

        self.moments = moments
        self.ct = is_ct_from(info.modality, info.source_format, lambda: (moments["min"], moments["max"]))

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """The model input of ``raw`` (float32, overwritten)."""
        from data_tools.preprocess import zscore
        from workbench.training.data import ct_input

        if not np.isfinite(raw).all():
            raise UserError("the input holds NaN/inf voxels; replace them (e.g. np.nan_to_num) before running")
        if self.ct:  # in place: a block's only copy is the one read
            return ct_input(raw, in_place=True)
        return zscore(raw, mean=self.moments["mean"], std=self.moments["std"], in_place=True)


def _moments_row(raw: np.ndarray) -> list[float]:
    """[1 (present), count, mean, sum of squared deviations, min, max] of a block, in float64
    (:func:`data_tools.preprocess.block_moments`)."""
    from data_tools.preprocess import block_moments

    return [1.0, *block_moments(raw)]


def _combine(rows: np.ndarray) -> dict:
    """Whole-volume moments from per-shard rows, in shard order (:func:`data_tools.preprocess.combine_moments`)."""
    from data_tools.preprocess import combine_moments

    return combine_moments(row[1:] for row in rows)


def _key(index, shape) -> tuple:
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def infer_per_process(
    choice,
    source,
    mesh,
    *,
    out,
    backend: str = "explicit",
    halo="exact",
    reference: bool = False,
    save_logits: bool = False,
    overwrite: bool = False,
    series: str | None = None,
    input_name: str | None = None,
    tolerance: float = 1e-5,
    force: bool = False,
    log=print,
    comm_overlap: str = "auto",
) -> dict | None:
    """Run ``choice`` (a ModelChoice or Model) on ``source`` (a path or spec) in this process
    and the others of the run, each on its own blocks, into the result folder ``out``.

    Every process calls it; process 0 returns the report, the others None. A run that
    would not fit in memory is refused first unless ``force``
    (:func:`workbench.app.memory_guard.check_memory`).
    """
    import jax

    from data_tools.formats.zarr import write_ome_block
    from workbench.analysis.compare import compare_shards, merge_shards
    from workbench.app.results import finish_staged, write_report
    from workbench.execute.distributed import allgather, barrier, is_main, local_blocks, put_blocks, put_tree
    from workbench.execute.run import compile_forward
    from workbench.mesh import ShardLayout, auto_mesh, parse_mesh

    model = getattr(choice, "model", choice)
    config = model.config
    if backend == "reference":
        raise UserError("backend 'reference' runs on one device; run it as one process, or use explicit or gspmd")
    if config.in_channels != 1:
        raise UserError(f"a multi-process run reads one-channel volumes; this model takes {config.in_channels}")
    n_devices = jax.device_count()
    auto = mesh is None or (isinstance(mesh, str) and mesh.strip().lower() == "auto")
    spec = auto_mesh(n_devices) if auto else parse_mesh(mesh)
    if spec.n_devices != n_devices:
        parse_mesh(spec, n_devices=n_devices)  # the helpful error: every device of every process takes part
    inp = open_input(source, series)
    if not force:
        from workbench.app.memory_guard import check_memory

        check_memory(config, inp.shape, spec, backend=backend, halo=halo)
    layout = ShardLayout(inp.shape, spec, multiple=config.multiple)
    shards = {s.box: s for s in layout.shards()}
    out = Path(out)
    main = is_main()

    # -- compile (before any voxel is read: the memory trace below sees data, not compilers) --
    t0 = time.perf_counter()
    compiled = compile_forward(config, layout, backend=backend, halo=halo, comm_overlap=comm_overlap)
    shape = (1, *layout.padded_shape, config.in_channels)
    labels_of = _labels_fn(compiled, (*shape[:4], config.num_classes))
    compile_seconds = time.perf_counter() - t0
    variables = put_tree(model.variables, compiled.variables_sharding)
    tracing = os.environ.get(TRACE_ENV, "") not in ("", "0")
    if tracing:
        import tracemalloc

        inp.read(((0, 1), (0, 1), (0, 1)))  # the reader's imports and caches, before the trace starts
        tracemalloc.start()
    boxes_read: list = []

    # -- input: this process's blocks, normalised with whole-volume statistics ---------------
    t0 = time.perf_counter()
    raw = {}
    for index in compiled.input_sharding.addressable_devices_indices_map(shape).values():
        shard = shards[_key(index, shape)[1:4]]
        if shard.box not in raw and not shard.is_empty:
            raw[shard.box] = inp.read(shard.valid_box)
            boxes_read.append(shard.valid_box)
    rows = np.full((len(shards), len(_MOMENTS)), np.nan)
    for box, block in raw.items():
        rows[shards[box].index] = _moments_row(block)
    gathered = allgather(rows)
    rows = np.array([next(r for r in gathered[:, i] if r[0] == 1.0) for i in range(len(shards))
                     if not layout.shards()[i].is_empty])  # fmt: skip
    normalise = _Normaliser(inp.info, _combine(rows))

    def read_block(index):
        box = _key(index, shape)[1:4]
        size = tuple(hi - lo for lo, hi in box)
        image = normalise(raw.pop(box)) if box in raw else np.zeros(0, np.float32)
        if image.shape != size:  # the shard reaches into the padding (or holds only padding)
            block = np.zeros(size, np.float32)
            block[tuple(slice(0, n) for n in image.shape)] = image
            image = block
        return image[None, ..., None]

    x = put_blocks(shape, compiled.input_sharding, read_block)
    read_seconds = time.perf_counter() - t0

    # -- run -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    logits = compiled.fn(variables, x)
    labels = jax.block_until_ready(labels_of(logits))
    seconds = time.perf_counter() - t0
    del x

    # -- output: a staged folder every process writes its shards into ------------------------
    mode = None
    if reference:
        mode, note = reference_mode(config, layout)
        if main:
            log(note)
    tmp = _staged_name(out)
    if main:
        sweep_stale(out)  # the staged folders of dead runs on this host (never a live one's)
        _create_outputs(tmp, inp, layout, config.num_classes, mode in ("per-shard", "whole"), save_logits)
    barrier("workbench-outputs-created")
    t0 = time.perf_counter()
    for index, block in local_blocks(labels):
        shard = shards[_key(index, labels.shape)[1:4]]
        if not shard.is_empty:
            write_ome_block(tmp / "prediction.zarr", shard.valid_box, _crop(block[0], shard))
    compared = None
    outputs = _ShardOutputs(logits, shards, tmp, inp, normalise, model, reference=mode,
                            save_logits=save_logits, boxes_read=boxes_read)  # fmt: skip
    if mode in ("per-shard", "whole"):
        compared = compare_shards(outputs, layout, config.num_classes, tol=tolerance)
    elif save_logits:
        for _ in outputs:
            pass
    write_seconds = time.perf_counter() - t0
    peak = -1
    if tracing:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    # -- summaries from every process (gathering them also means: every process has written) --
    voxels = sum(math.prod(b - a for a, b in box) for box in boxes_read)
    mine = np.array([jax.process_index(), jax.local_device_count(), read_seconds, seconds, write_seconds,
                     compile_seconds, peak, outputs.reference_seconds, voxels])  # fmt: skip
    boxes = np.full((2 * len(shards) + 1, 6), -1, np.int64)
    boxes[: len(boxes_read)] = [[v for pair in box for v in pair] for box in boxes_read]
    numbers, all_boxes = allgather(mine), allgather(boxes)
    comparison = None
    if compared is not None:
        comparison = merge_shards(allgather(compared), layout, config.num_classes)
    if not main:
        return None
    report = _report(
        choice, model, inp, layout, compiled, numbers, all_boxes, comparison, input_name or str(source), mode
    )
    write_report(tmp, report)
    finish_staged(tmp, out)
    return report


def _staged_name(out: Path) -> Path:
    """The staged folder every process writes into: named by process 0
    (:func:`data_tools.atomic.temp_sibling`: its host and pid, so a later run on its host
    removes it once process 0 is dead) and sent to the others."""
    from workbench.execute.distributed import allgather

    name = np.zeros(1024, np.uint8)
    mine = os.fsencode(temp_sibling(out).name)[: len(name)]
    name[: len(mine)] = np.frombuffer(mine, np.uint8)
    first = bytes(allgather(name)[0].astype(np.uint8)).rstrip(b"\0")
    return out.parent / os.fsdecode(first)


def _labels_fn(compiled, logits_shape):
    """Argmax on the devices (uint8 labels, sharded like the logits), compiled ahead."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from workbench.mesh import ACTIVATION_SPEC

    sharding = NamedSharding(compiled.mesh, P(*ACTIVATION_SPEC[:4]))
    fn = jax.jit(lambda y: jnp.argmax(y, axis=-1).astype(jnp.uint8), out_shardings=sharding)
    return fn.lower(jax.ShapeDtypeStruct(logits_shape, jnp.float32, sharding=compiled.input_sharding)).compile()


def _crop(block: np.ndarray, shard) -> np.ndarray:
    """The part of a (padded) shard block inside the volume."""
    return block[tuple(slice(0, hi - lo) for lo, hi in shard.valid_box)]


def reference_mode(config, layout) -> tuple[str, str]:
    """How a multi-process run compares with the single-device reference: ``per-shard``,
    ``whole`` or ``none``, and the line that says so (see the module notes)."""
    import jax

    from workbench.execute.run import compile_forward, overlap_width

    if config.norm in ("none", "batch"):
        margin = overlap_width(config)
        return "per-shard", (
            "--reference: compared shard by shard (no process holds the whole volume): the single-device "
            f"reference of each shard's box plus a {margin}-voxel margin (the receptive field on the pooling "
            "grid) is exact inside the shard"
        )
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    need = None if limit is None else compile_forward(config, layout, backend="reference").memory.get("peak")
    if need is None or need <= limit:
        return "whole", (
            f"--reference: {config.norm} norm takes statistics over the whole volume, so each process reads the "
            "whole volume and runs the single-device reference on one of its devices, then compares its own shards"
        )
    return "none", (
        f"--reference: the single-device reference needs {need / 2**30:.1f} GiB on one device, which has "
        f"{limit / 2**30:.1f} GiB, and {config.norm} norm takes statistics over the whole volume, so no "
        "shard-by-shard comparison is exact; the report has no comparison"
    )


def _create_outputs(tmp: Path, inp: BlockInput, layout, num_classes: int, reference: bool, save_logits: bool):
    """The staged folder and its empty zarr stores, chunked like the shards (process 0)."""
    import zarr

    from data_tools.formats.zarr import create_ome_zarr

    tmp.mkdir(parents=True)
    geometry = {"spacing": inp.info.spacing, "affine": inp.info.affine, "block": layout.block_shape}
    create_ome_zarr(tmp / "prediction.zarr", inp.shape, dtype=np.uint8, **geometry)
    if reference:
        create_ome_zarr(tmp / "reference_prediction.zarr", inp.shape, dtype=np.uint8, **geometry)
        create_ome_zarr(tmp / "error.zarr", inp.shape, dtype=np.float32, **geometry)
    if save_logits:
        zarr.create_array(str(tmp / "logits.zarr"), shape=(*inp.shape, num_classes), dtype=np.float32,
                          chunks=(*layout.block_shape, num_classes), fill_value=0,
                          dimension_names=("z", "y", "x", "class"))  # fmt: skip


class _ShardOutputs:
    """This process's shards' logits: written to ``logits.zarr`` on request; with a
    ``reference`` mode (:func:`reference_mode`), compared with the reference (its
    prediction and the error map written). Iterating yields (shard, logits, reference
    logits) per shard compared."""

    def __init__(self, logits, shards, tmp, inp, normalise, model, *, reference: str | None, save_logits, boxes_read):
        self.logits, self.shards, self.tmp, self.inp = logits, shards, tmp, inp
        self.normalise, self.model = normalise, model
        self.reference, self.save_logits, self.boxes_read = reference, save_logits, boxes_read
        self.reference_seconds = 0.0
        self._whole = None

    def __iter__(self):
        import zarr

        from data_tools.formats.zarr import write_ome_block
        from workbench.analysis.compare import signed_error
        from workbench.execute.distributed import local_blocks
        from workbench.execute.run import overlap_width, run

        margin = overlap_width(self.model.config)
        store = zarr.open_array(str(self.tmp / "logits.zarr"), mode="r+") if self.save_logits else None
        for index, block in local_blocks(self.logits):
            shard = self.shards[_key(index, self.logits.shape)[1:4]]
            if shard.is_empty:
                continue
            out_b = _crop(block[0], shard)
            if store is not None:
                store[tuple(slice(lo, hi) for lo, hi in shard.valid_box)] = out_b
            if self.reference not in ("per-shard", "whole"):
                continue
            shape = self.inp.shape
            if self.reference == "per-shard":
                crop = tuple((max(0, lo - margin), min(n, hi + margin)) for (lo, hi), n in zip(shard.valid_box, shape))
            else:
                crop = tuple((0, n) for n in shape)
            t0 = time.perf_counter()
            if self.reference == "per-shard" or self._whole is None:
                self.boxes_read.append(crop)
                self._whole = run(self.model, self.normalise(self.inp.read(crop)), backend="reference").output
            self.reference_seconds += time.perf_counter() - t0
            ref_b = self._whole[tuple(slice(lo - c0, hi - c0) for (lo, hi), (c0, _) in zip(shard.valid_box, crop))]
            write_ome_block(self.tmp / "reference_prediction.zarr", shard.valid_box, ref_b.argmax(-1).astype(np.uint8))
            write_ome_block(self.tmp / "error.zarr", shard.valid_box, signed_error(out_b, ref_b))
            yield shard, out_b, ref_b


def _report(choice, model, inp, layout, compiled, numbers, boxes, comparison, input_name, mode) -> dict:
    """The report.json of the run (the one schema of :mod:`workbench.app.results`)."""
    from workbench.analysis.compare import _ROW
    from workbench.app.results import REPORT_KEYS
    from workbench.execute.devices import device_summary
    from workbench.mesh import parse_mesh

    memory = compiled.memory
    report = dict.fromkeys(REPORT_KEYS)
    report |= {
        "input_shape": list(layout.volume_shape),
        "output_shape": list(layout.volume_shape),
        "num_classes": int(model.config.num_classes),
        "mesh": parse_mesh(layout.mesh).as_dict(),
        "padded_shape": list(layout.padded_shape),
        "backend": compiled.backend,
        "halo": compiled.halo,
        "seconds": float(numbers[:, 3].max()),
        "compile_seconds": float(numbers[:, 5].max()),
        "peak_bytes_per_device": memory.get("peak"),
        "memory": dict(memory),
        "model": model.config.as_dict(),
        "weights": getattr(choice, "description", None),
        "max_abs_diff": None,
        "mean_abs_diff": None,
        "argmax_disagreement": None,
        "dice": None,
        "reference_seconds": float(numbers[:, 7].sum()) if comparison is not None else None,
        "reference_peak_bytes": None,
        "per_shard": [
            {"index": s.index, "coords": list(s.coords), "box": [list(b) for b in s.valid_box], **dict.fromkeys(_ROW)}
            for s in layout.shards()
        ],  # fmt: skip
        "profile": None,
        "reference_mode": mode,
        "input": input_name,
        "prediction": "prediction.zarr",
        "machine": device_summary(),
        "spacing": [float(s) for s in inp.info.spacing],
        "class_names": None,
        "volume_bytes": int(math.prod(layout.volume_shape)) * 4,
        "processes": [
            {
                "process": int(row[0]),
                "devices": int(row[1]),
                "read_seconds": float(row[2]),
                "seconds": float(row[3]),
                "write_seconds": float(row[4]),
                "host_peak_bytes": None if row[6] < 0 else int(row[6]),
                "voxels_read": int(row[8]),
                "boxes_read": [
                    [[int(b[0]), int(b[1])], [int(b[2]), int(b[3])], [int(b[4]), int(b[5])]] for b in rows if b[0] >= 0
                ],  # fmt: skip
            }
            for row, rows in zip(numbers, boxes)
        ],
    }
    if comparison is not None:
        summary = comparison.as_dict()
        for key in ("max_abs_diff", "mean_abs_diff", "reference_scale", "argmax_disagreement", "dice", "per_shard",
                    "profile"):  # fmt: skip
            report[key] = summary[key]
    return report
