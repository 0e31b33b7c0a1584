"""What each process of a multi-process training run reads per step, per kind of source.

One process with 8 simulated CPU devices stands in for P processes: process p's blocks are
the keys :func:`workbench.training.step.batch_keys` gives for the devices p owns
(``jax.devices()[p·D:(p+1)·D]``, D = 8 / P, as ``jax.distributed`` numbers them), so the
real step's shardings decide what each process reads; no process is launched. Each
process's step is then made by :func:`workbench.training.data.batch_blocks` (augmentation
on, as training runs) while ``data_tools.io.read_box``, the OME-Zarr label reader and
``make_phantom_block`` are spied on. Per source and process:

* read/step: voxels read (image + labels; a phantom renders both in one call) as a
  fraction of the stored volume's voxels, so 1/P is a process's share;
* largest: the largest single read, as a fraction of the volume;
* decoded: voxels the format decodes for those reads, as a fraction (an estimate from the
  format: a compressed ``.npz`` member and a ``.nii.gz`` are decompressed from the start
  up to the box's last z row; OME-Zarr decodes every chunk the box touches; ``.npy``,
  stored ``.npz`` and phantoms: the box);
* peak ÷ case: the peak ``tracemalloc`` allocation of preparing the step's blocks, as a
  fraction of the whole prepared case (float32 image + uint8 labels on the training
  grid); "out ÷ case" is the blocks handed to the step (float32 + int32), the floor;
  "peak ÷ stored": the same peak against the stored volume's voxels × 5 bytes (a
  downsampled source reads native boxes, so its peak is large against the small grid);
* survey: the start-up statistics survey's reads (:func:`workbench.training.cases.survey`),
  all processes together and the most one process reads.

With ``--eval`` (default on) also what :func:`workbench.training.evaluation.evaluate_blocks`
reads per process for one held-out case (a tiny model; ``eval_block`` calls are attributed
to the process owning the device), plus the survey of a dataset's validation case (made
up front, its slabs shared among the processes, as the training loop does through
:func:`~workbench.training.evaluation.held_out_blocks`). Nothing passes or fails on time.

    python benchmarks/training_reads.py [--size 64] [--processes 2 4] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import _common
import numpy as np

READS: list = []  # (voxels read, voxels decoded) of each spied read


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="side of the .npz / zarr / phantom volumes (default 64)")
    p.add_argument("--resample", type=int, default=48, help="training grid of the resampled rows (default 48)")
    p.add_argument("--dataset-size", type=int, default=48, help="side of the dataset's cases (default 48)")
    p.add_argument("--dataset-cases", type=int, default=5)
    p.add_argument("--mni", type=int, default=64, help="training grid of the mni row (default 64)")
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="steps measured per source (mean and max reported)")
    p.add_argument("--no-eval", dest="eval", action="store_false", help="skip the held-out evaluation rows")
    p.add_argument("--quick", action="store_true", help="32³ volumes, 24³ grids, one step")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.resample, args.dataset_size, args.mni, args.steps = 32, 24, 24, 32, 1
    return args


# -- spies ------------------------------------------------------------------------------------


def _voxels(box) -> int:
    return int(np.prod([hi - lo for lo, hi in box]))


_NPZ_COMPRESSED: dict = {}


def _decoded(path, box, member=None) -> int:
    """Voxels the format decodes to read ``box`` (see the module notes)."""
    from data_tools.io import volume_info

    name = str(path)
    if name.endswith(".npz"):
        key = (name, member or "image")
        if key not in _NPZ_COMPRESSED:
            with zipfile.ZipFile(name) as zf:
                entry = zf.getinfo(f"{member or 'image'}.npy")
            _NPZ_COMPRESSED[key] = entry.compress_type != zipfile.ZIP_STORED
        if _NPZ_COMPRESSED[key]:
            shape = volume_info(name).shape
            return box[0][1] * shape[1] * shape[2]
        return _voxels(box)
    if name.endswith(".nii.gz"):
        shape = volume_info(name).shape
        return box[0][1] * shape[1] * shape[2]
    if Path(name).is_dir():  # OME-Zarr: the chunks the box touches
        from data_tools.formats import zarr as zarr_format

        chunks = zarr_format._Source(Path(name), zarr_format._open(Path(name))).array.chunks[-3:]
        return int(np.prod([(-(-hi // c) - lo // c) * c for (lo, hi), c in zip(box, chunks)]))
    return _voxels(box)


def _install_spies() -> None:
    import data_tools.io as dio
    import data_tools.synthetic as synthetic
    from data_tools.formats import zarr as zarr_format

    read_box, read_labels_box, make_block = dio.read_box, zarr_format.read_labels_box, synthetic.make_phantom_block

    def spy_read_box(path, box, **kw):
        READS.append((_voxels(box), _decoded(path, box, kw.get("member"))))
        return read_box(path, box, **kw)

    def spy_labels(path, box):
        READS.append((_voxels(box), _decoded(path, box)))
        return read_labels_box(path, box)

    def spy_block(shape, box, **kw):
        READS.append((_voxels(box), _voxels(box)))
        return make_block(shape, box, **kw)

    dio.read_box, zarr_format.read_labels_box, synthetic.make_phantom_block = spy_read_box, spy_labels, spy_block


# -- sources --------------------------------------------------------------------------------


def _sources(tmp: Path, args):
    """(label, make_source(), arrays per read, raw volume voxels of (step, index)) per source kind."""
    from data_tools import write_phantom_dataset
    from data_tools.formats import zarr as zarr_format
    from data_tools.synthetic import make_phantom
    from workbench.training.data import make_source
    from workbench.training.datasets import DatasetSource

    n, r = args.size, args.resample
    vol = make_phantom(n, seed=1, vessels=False)
    np.savez_compressed(tmp / "c.npz", image=vol.array, labels=vol.labels)
    np.savez(tmp / "s.npz", image=vol.array, labels=vol.labels)
    zarr_format.write(vol, tmp / "v.zarr")
    zarr_format.write(vol, tmp / "v16.zarr", chunks=max(8, n // 4))
    dataset = write_phantom_dataset(tmp / "Task01_Reads", cases=args.dataset_cases, test=0, shapes=args.dataset_size)

    def volume(src, step, index):
        return math.prod(src._reader(step, index).raw_shape)

    def phantom(src, step, index):
        return src.render**3

    def case(src, step, index):
        return math.prod(src.readers[src._pick(step, index)].raw_shape)

    yield f".npz compressed {n}³", lambda: make_source([str(tmp / "c.npz")]), 2, volume
    yield f".npz compressed {n}³ → {r}³", lambda: make_source([str(tmp / "c.npz")], r), 2, volume
    yield f".npz stored {n}³", lambda: make_source([str(tmp / "s.npz")]), 2, volume
    yield f".npz stored {n}³ → {r}³", lambda: make_source([str(tmp / "s.npz")], r), 2, volume
    yield f"OME-Zarr {n}³ (chunks {min(64, n)})", lambda: make_source([str(tmp / "v.zarr")]), 2, volume
    yield f"OME-Zarr {n}³ (chunks {max(8, n // 4)})", lambda: make_source([str(tmp / "v16.zarr")]), 2, volume
    yield f"phantom:{n}", lambda: make_source(f"phantom:{n}"), 1, phantom
    yield f"phantom:{n} → {r}³", lambda: make_source(f"phantom:{n}", r), 1, phantom
    yield (f"dataset {args.dataset_cases}×{args.dataset_size}³ .nii.gz",
           lambda: DatasetSource(dataset, fold=0, progress=False), 2, case)  # fmt: skip
    yield f"mni → {args.mni}³", lambda: make_source("mni", args.mni), 2, volume


def _survey_readers(source) -> list:
    """The CaseReaders a source surveys at start-up (none for phantoms)."""
    if hasattr(source, "readers"):
        return list(source.readers)
    if hasattr(source, "train"):
        return list(dict.fromkeys([*source.train, *source.held_out]))
    return []


# -- per-process keys -----------------------------------------------------------------------


class _ProcessView:
    """A sharding seen from process ``p`` of ``P``: its addressable devices are
    ``jax.devices()[p·D:(p+1)·D]`` (what jax.distributed gives process p)."""

    def __init__(self, sharding, devices):
        self.sharding, self.devices = sharding, set(devices)

    def addressable_devices_indices_map(self, shape):
        return {d: i for d, i in self.sharding.devices_indices_map(shape).items() if d in self.devices}


def _process_devices(processes: int) -> list:
    import jax

    devices = jax.devices()
    per = len(devices) // processes
    return [devices[p * per : (p + 1) * per] for p in range(processes)]


def _keys(ts, batch: int, processes: int) -> list:
    """Per process, :func:`batch_keys` of the train step as that process would compute it."""
    from workbench.mesh import process_blocks
    from workbench.training.step import batch_keys

    out = [batch_keys(dataclasses.replace(ts, label_sharding=_ProcessView(ts.label_sharding, devs)), batch)
           for devs in _process_devices(processes)]  # fmt: skip
    if ts.layout.mesh.data == 1:  # cross-check against the mesh's own account of each process's boxes
        blocks = process_blocks(ts.layout, processes, ts.layout.mesh.n_devices // processes)
        for keys, block in zip(out, blocks):
            assert sorted(tuple(k[1:]) for k in keys) == sorted(set(block.boxes)), (keys, block)
    return out


# -- measuring --------------------------------------------------------------------------------


def _step_reads(source, step, batch, keys, arrays, raw_voxels) -> dict:
    from workbench.training.data import batch_blocks

    READS.clear()
    tracemalloc.start()
    blocks = batch_blocks(source, step, batch, keys, seed=0, augment_data=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    whole = sum(raw_voxels(source, step, b) for b in range(batch))
    case = math.prod(source.shape) * (4 + 1) * batch
    out = sum(a.nbytes + b.nbytes for a, b in blocks)
    return {
        "read": sum(v for v, _ in READS) / (arrays * whole),
        "largest": max((v for v, _ in READS), default=0) / whole,
        "decoded": sum(d for _, d in READS) / (arrays * whole),
        "reads": len(READS),
        "peak_over_case": peak / case,
        "out_over_case": out / case,
        "peak_over_stored": peak / (whole * (4 + 1)),
    }


def _measure(label, make, arrays, raw_voxels, args, cfg_of) -> dict:
    from workbench.mesh import ShardLayout, parse_mesh
    from workbench.training import TrainConfig
    from workbench.training.cases import survey_rows
    from workbench.training.step import build_train_step

    READS.clear()
    t0 = time.perf_counter()
    source = make()
    setup_seconds = time.perf_counter() - t0
    readers = _survey_readers(source)
    survey_voxels = sum(math.prod(r.raw_shape) for r in readers) * 2
    survey_all = sum(v for v, _ in READS) / survey_voxels if readers else 0.0
    tc = TrainConfig(mesh=args.mesh, batch=args.batch)
    cfg = cfg_of(tc, source.num_classes)
    layout = ShardLayout(source.shape, parse_mesh(args.mesh), multiple=cfg.multiple)
    ts = build_train_step(cfg, tc, layout)
    row = {"source": label, "training_grid": list(source.shape), "raw_shape": None, "setup_seconds": setup_seconds,
           "survey_all_processes": survey_all, "by_processes": {}}  # fmt: skip
    if readers:
        row["raw_shape"] = list(readers[0].raw_shape)
    for processes in args.processes:
        per = []
        for p, keys in enumerate(_keys(ts, args.batch, processes)):
            steps = [_step_reads(source, s, args.batch, keys, arrays, raw_voxels) for s in range(args.steps)]
            READS.clear()
            if readers:
                survey_rows(readers, p, processes)
            mine = {k: [s[k] for s in steps] for k in steps[0]}
            per.append({
                "process": p,
                "keys": [list(map(list, k)) for k in keys],
                "read": float(np.mean(mine["read"])),
                "read_max": max(mine["read"]),
                "largest": max(mine["largest"]),
                "decoded": float(np.mean(mine["decoded"])),
                "decoded_max": max(mine["decoded"]),
                "reads": max(mine["reads"]),
                "peak_over_case": max(mine["peak_over_case"]),
                "out_over_case": max(mine["out_over_case"]),
                "peak_over_stored": max(mine["peak_over_stored"]),
                "survey": sum(v for v, _ in READS) / survey_voxels if readers else 0.0,
            })  # fmt: skip
        row["by_processes"][str(processes)] = per
    return row


def _evaluation(label, make, arrays, args) -> dict:
    """What evaluate_blocks reads per process of held-out case 0."""
    import jax

    from workbench.mesh import ShardLayout, parse_mesh
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.cases import survey
    from workbench.training.evaluation import evaluate_blocks

    source = make()
    first_use = 0
    if hasattr(source, "val_files"):  # a dataset's validation case: surveyed once, slabs shared among processes
        files = source.val_files[0]
        reader = source._reader(files, source._infos[files.name])
        READS.clear()
        survey([reader], gather=False)
        first_use = sum(v for v, _ in READS)
        source._val_readers[0] = reader
        raw = math.prod(reader.raw_shape)
    elif hasattr(source, "held_out"):
        raw = math.prod(source.held_out[0].raw_shape)
    else:
        raw = source.render**3
    cfg = UNetConfig.preset("small", num_classes=source.num_classes, base_filters=4)
    spec = parse_mesh(args.mesh)
    layout = ShardLayout(source.shape, spec, multiple=cfg.multiple)
    model = Model.init(cfg)
    calls = []
    real = source.eval_block

    def spy(i, box):
        READS.clear()
        out = real(i, box)
        calls.append((tuple(lo for lo, _ in box), sum(v for v, _ in READS), max((v for v, _ in READS), default=0)))
        return out

    source.eval_block = spy
    evaluate_blocks(model, source, 1, spec, class_names=source.class_names)
    shape = (spec.data, *layout.padded_shape, 1)
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[: spec.n_devices]).reshape(spec.data, *spec.spatial),
                          ("data", "z", "y", "x")), jax.sharding.PartitionSpec("data", "z", "y", "x"))  # fmt: skip
    corner = {tuple(s.indices(n)[0] for s, n in zip(idx[1:4], shape[1:4])): d
              for d, idx in sharding.devices_indices_map(shape).items()}  # fmt: skip
    row = {"source": label, "survey_all_processes": first_use / (2 * raw), "by_processes": {}}
    for processes in args.processes:
        owner = {d: p for p, devs in enumerate(_process_devices(processes)) for d in devs}
        per = [{"read": 0.0, "largest": 0.0} for _ in range(processes)]
        for lo, voxels, largest in calls:
            p = owner[corner[lo]]
            per[p]["read"] += voxels / (arrays * raw)
            per[p]["largest"] = max(per[p]["largest"], largest / raw)
        row["by_processes"][str(processes)] = per
    return row


def _fmt(values, f=".2f") -> str:
    return " ".join(format(v, f) for v in values)


def main(argv=None) -> int:
    args = _parse(argv)
    _common.start(8)
    from workbench.training.config import model_config

    _install_spies()
    rows, evals = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for label, make, arrays, raw_voxels in _sources(Path(tmp), args):
            rows.append(_measure(label, make, arrays, raw_voxels, args, model_config))
            if args.eval:
                evals.append(_evaluation(label, make, arrays, args))
    print(f"reads per process per training step: mesh {args.mesh}, batch {args.batch}, {args.steps} step(s), "
          "fractions of the stored volume (image + labels)")  # fmt: skip
    table = []
    for r in rows:
        for P, per in r["by_processes"].items():
            table.append([r["source"], int(P), _fmt([q["read"] for q in per]), max(q["largest"] for q in per),
                          max(q["decoded"] for q in per), max(q["peak_over_case"] for q in per),
                          max(q["out_over_case"] for q in per), max(q["peak_over_stored"] for q in per),
                          r["survey_all_processes"],
                          max(q["survey"] for q in per)])  # fmt: skip
    print(_common.table(["source", "P", "read/step per process", "largest", "decoded max", "peak÷case max",
                         "out÷case", "peak÷stored", "survey all", "survey max/proc"],
                        table, ["s", "d", "s", ".3f", ".3f", ".2f", ".2f", ".2f", ".2f", ".2f"]))  # fmt: skip
    if evals:
        print("\nheld-out evaluation (evaluate_blocks), one case: reads per process, fractions of the stored case")
        table = [[e["source"], int(P), _fmt([q["read"] for q in per]), max(q["largest"] for q in per),
                  e["survey_all_processes"]] for e in evals for P, per in e["by_processes"].items()]  # fmt: skip
        print(_common.table(["source", "P", "read per process", "largest", "survey, all processes"], table,
                            ["s", "d", "s", ".3f", ".2f"]))  # fmt: skip
    _common.write_json(args.json, {"machine": _common.machine(), "args": vars(args), "training": rows,
                                   "evaluation": evals})  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
