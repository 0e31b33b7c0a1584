"""``workbench evaluate`` as one of several processes: each process scores its own blocks.

In a multi-process run (``workbench launch -- evaluate ...``, or one process per host with
``WORKBENCH_DISTRIBUTED=auto``) :func:`~workbench.app.evaluation.evaluate_dataset` hands
each case to :func:`score_case`, which every process calls:

1. **Input.** The case is a :class:`~workbench.training.cases.CaseReader`
   (:func:`workbench.training.datasets.case_reader`): each process reads only its devices'
   boxes of the image and label files (resampled block-exactly where the plan resamples);
   the normalisation's statistics are surveyed slab by slab, the slabs shared among the
   processes (:func:`workbench.training.cases.survey`, which also checks the label values),
   so the model input equals the one-process :func:`~workbench.training.datasets.prepare_case`.
2. **Run.** The partitioned forward pass on the global mesh; the argmax is taken on the
   devices.
3. **Scores on the blocks** (a case whose spacing is the plan's, so its prediction is the
   argmax on its own grid): per block, the intersection, predicted and true voxels of each
   class (Dice and volumes: integer counts, summed over the processes) and the surface
   voxels of prediction and truth (:mod:`workbench.execute.surface`: a one-voxel label halo
   exchanged on the devices, the surface points gathered, distances exact), whose HD95
   equals :func:`~workbench.training.losses.hausdorff95` of the whole masks. The uint8
   label map is then gathered for process 0 to write ``predictions/CASE...`` in the case's
   format with its geometry (the only whole-volume array of the case on a process: one
   byte per voxel).
4. **A resampled case** (its spacing differs from the plan's): the prediction is the
   class probabilities resampled back onto the original grid, which needs neighbouring
   blocks' logits, so the logits (float32 per class) are gathered and process 0 predicts,
   scores and writes as one process does (the truth read whole there). Say so per run.

Only process 0 writes (the staged output folder, as one process writes it); ``cases.csv`` and
``summary.json`` equal the one-process run's but for the ``seconds`` entries.
"""

from __future__ import annotations

import time

import numpy as np

from workbench.errors import UserError

__all__ = ["check_processes", "score_case"]


def check_processes(choice, order, mesh, backend: str) -> object:
    """The mesh over every device of every process, after checking that ``choice``'s model
    runs across processes (a paper U-Net, softmax outputs) on ``backend``."""
    import jax

    from workbench.mesh import auto_mesh, parse_mesh

    if getattr(choice.model, "spec", None) is not None or order is not None:
        raise UserError(
            "nnU-Net networks evaluate in one process so far; drop workbench launch / WORKBENCH_DISTRIBUTED"
        )
    n = jax.device_count()
    auto = mesh is None or (isinstance(mesh, str) and mesh.strip().lower() == "auto")
    spec = auto_mesh(n) if auto else parse_mesh(mesh)
    if spec.n_devices != n:
        parse_mesh(spec, n_devices=n)  # the helpful error: every device of every process takes part
    if backend == "reference":
        raise UserError("backend 'reference' runs on one device; run it as one process, or use explicit or gspmd")
    return spec


def score_case(choice, dataset, files, info, reader, spec, backend: str, folder, cache: dict) -> dict | None:
    """The ``cases.csv`` row of one case (process 0; None on the others), its prediction
    written into ``folder`` by process 0 (see the module notes). Every process calls it;
    ``reader``: the case's surveyed :class:`~workbench.training.cases.CaseReader`; ``cache``:
    a dict kept from case to case (the compiled programs per padded shape)."""
    from workbench.execute.distributed import is_main, put_tree
    from workbench.execute.run import compile_forward
    from workbench.mesh import ShardLayout

    t0 = time.perf_counter()
    cfg = choice.model.config
    programs = cache.get(tuple(reader.shape))
    if programs is None:  # every case of a dataset is padded to the plan's shape: compiled once
        compiled = compile_forward(cfg, ShardLayout(reader.shape, spec, multiple=cfg.multiple), backend=backend)
        variables = put_tree(choice.model.variables, compiled.variables_sharding)
        programs = cache[tuple(reader.shape)] = _Programs(compiled, variables)
    compiled, variables = programs.compiled, programs.variables
    labelled = files.label is not None
    blocks = reader.resampling is None
    truth_blocks: dict = {}
    x = _model_input(reader, compiled, cfg.in_channels, truth_blocks if blocks and labelled else None)
    logits = compiled.fn(variables, x)
    del x
    row = {"case": files.name, "shape": "x".join(map(str, info.shape)),
           "spacing_mm": "x".join(f"{s:.4g}" for s in info.spacing)}  # fmt: skip
    names = dataset.class_names
    if blocks:
        pred, scores = _scores_on_blocks(logits, truth_blocks if labelled else None, programs, reader.grid, info,
                                         names, dataset.regions)  # fmt: skip
    else:
        pred, scores = _scores_gathered(logits, reader, info, files, names, dataset.regions)
    del logits
    if not is_main():
        return None
    written = _write_prediction(pred, files, info, folder)
    row.update(scores)
    row["prediction"] = f"predictions/{written.name}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _write_prediction(pred, files, info, folder):
    """``pred`` written as :func:`data_tools.io.write_prediction` writes it next to the case's
    image: a NIfTI image's header comes from its header alone; other formats read the image
    (process 0, once per case) for their geometry metadata."""
    from data_tools.io import read_volume, write_prediction
    from data_tools.volume import Volume

    if info.source_format == "nifti":
        from data_tools.formats.nifti import _load

        like = Volume(np.broadcast_to(np.uint8(0), tuple(info.shape)), spacing=info.spacing, affine=info.affine,
                      source_format="nifti", metadata={"nifti_header": _load(files.images[0]).header.copy()})  # fmt: skip
    else:
        like = read_volume(files.images[0])
    return write_prediction(pred, like, folder, name=files.name)


class _Programs:
    """The compiled forward pass of one padded shape, the weights on its devices, and the
    argmax and surface programs on its mesh (made on first use)."""

    def __init__(self, compiled, variables):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from workbench.execute.surface import surface_fn
        from workbench.mesh import ACTIVATION_SPEC

        self.compiled, self.variables, self.mesh = compiled, variables, compiled.mesh
        self.sharding = NamedSharding(compiled.mesh, P(*ACTIVATION_SPEC[:4]))
        self.labels = jax.jit(lambda y: jnp.argmax(y, axis=-1).astype(jnp.uint8), out_shardings=self.sharding)
        self.edges = surface_fn(compiled.mesh)


def _key(index, shape):
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _model_input(reader, compiled, channels: int, truth: dict | None):
    """The global model input, each process reading its blocks (zeros in the layout's
    padding, as :func:`workbench.execute.run.run` pads); with ``truth``, each block's labels
    (255 beyond the case's grid) are kept there by box."""
    from workbench.execute.distributed import put_blocks
    from workbench.training.data import channels_last

    layout = compiled.layout
    shape = (1, *layout.padded_shape, channels)
    grid = reader.grid

    def read_block(index):
        _, *box = _key(index, shape)
        box = tuple(box[:3])
        valid = tuple((min(lo, n), min(hi, n)) for (lo, hi), n in zip(box, reader.shape))
        image = np.zeros((1, *(hi - lo for lo, hi in box), channels), np.float32)
        labels = np.full(image.shape[1:4], 255, np.uint8)
        if all(hi > lo for lo, hi in valid):
            img, lab = reader.block(valid)
            inner = tuple(slice(0, hi - lo) for lo, hi in valid)
            image[(0, *inner)] = channels_last(img)
            on_grid = tuple(slice(0, max(0, min(hi, n) - lo)) for (lo, hi), n in zip(valid, grid))
            labels[on_grid] = lab[on_grid]
        if truth is not None:
            truth[box] = labels
        return image

    return put_blocks(shape, compiled.input_sharding, read_block)


def _scores_on_blocks(logits, truth_blocks, programs, grid, info, names, regions):
    """(uint8 prediction on process 0 / None, row entries): the scores counted per block."""
    from workbench.execute.distributed import allgather, is_main, local_blocks, put_blocks, to_host
    from workbench.execute.surface import block_points, hd95_from_points

    k = len(names)
    sharding = programs.sharding
    labels = programs.labels(logits)
    counts = np.zeros((3, k + len(regions)), np.int64)  # intersection, predicted, true voxels
    pred_rows, truth_rows = [np.zeros((0, 4), np.int32)], [np.zeros((0, 4), np.int32)]
    if truth_blocks is not None:
        truth = put_blocks(
            labels.shape, sharding, lambda index: truth_blocks[tuple(_key(index, labels.shape)[1:4])][None]
        )
        pred_edge, truth_edge = (
            {_key(i, labels.shape): b for i, b in local_blocks(programs.edges(a, grid))} for a in (labels, truth)
        )
        truth_local = {_key(i, labels.shape): b for i, b in local_blocks(truth)}
    for index, block in local_blocks(labels):
        key = _key(index, labels.shape)
        origin = [lo for lo, _ in key[1:4]]
        inside = tuple(slice(0, max(0, min(hi, n) - lo)) for (lo, hi), n in zip(key[1:4], grid))
        p = block[0][inside]
        t = truth_local[key][0][inside] if truth_blocks is not None else np.full(p.shape, 255, np.uint8)
        for c in range(k):
            pc, tc = p == c, t == c
            counts[:, c] += (int(np.sum(pc & tc)), int(pc.sum()), int(tc.sum()))
        for r, (_, values) in enumerate(regions):
            pc, tc = np.isin(p, values), np.isin(t, values)
            counts[:, k + r] += (int(np.sum(pc & tc)), int(pc.sum()), int(tc.sum()))
        if truth_blocks is not None:
            pred_rows.append(block_points(block[0], pred_edge[key][0], origin))
            truth_rows.append(block_points(truth_local[key][0], truth_edge[key][0], origin))
    # int64 counts as uint32 pairs: JAX's host gather would narrow int64 to int32 (without x64)
    counts = allgather(np.ascontiguousarray(counts).view(np.uint32)).view(np.int64).sum(0)
    hd = None
    if truth_blocks is not None:
        hd = hd95_from_points(np.concatenate(pred_rows), np.concatenate(truth_rows), counts[:, :k], info.spacing)
    whole = to_host(labels)  # every process: the write below is process 0's
    pred = np.ascontiguousarray(whole[0, : grid[0], : grid[1], : grid[2]]) if is_main() else None
    del whole
    return pred, _row(counts, hd, info.spacing, names, regions, truth_blocks is not None)


def _row(counts, hd, spacing, names, regions, labelled: bool) -> dict:
    """The score entries of a row from the summed counts, as the one-process row has them."""
    from workbench.app.case_scores import _finite, _mean

    ml = float(np.prod(spacing)) / 1000.0
    k = len(names)
    if not labelled:
        return {f"pred_ml_{n}": float(counts[1, c]) * ml for c, n in enumerate(names) if c}
    row = {}
    for c, name in enumerate(names[1:], start=1):
        inter, p, t = (int(v) for v in counts[:, c])
        row[f"dice_{name}"] = 2.0 * inter / (p + t) if p + t else None
        row[f"hd95_mm_{name}"] = _finite(hd[c])
        row[f"pred_ml_{name}"] = float(p) * ml
        row[f"true_ml_{name}"] = float(t) * ml
    row["mean_dice"] = _mean([row[f"dice_{n}"] for n in names[1:]])
    for r, (name, _) in enumerate(regions):
        inter, p, t = (int(v) for v in counts[:, k + r])
        row[f"region_dice_{name}"] = 2.0 * inter / (p + t) if p + t else None
    return row


def _scores_gathered(logits, reader, info, files, names, regions):
    """A resampled case: the logits gathered; process 0 predicts on the original grid and
    scores the whole masks, as one process does."""
    from data_tools.io import read_box
    from workbench.app.case_scores import _finite, _mean, _prediction, _score
    from workbench.execute.distributed import is_main, to_host
    from workbench.training.evaluation import region_dice

    whole = to_host(logits)[0]
    if not is_main():
        return None, {}
    grid, (_, scale, offset) = reader.grid, reader.resampling
    step = np.eye(4)
    step[:3, :3], step[:3, 3] = np.diag(scale), offset
    meta = {"grid_shape": grid, "grid_affine": np.asarray(info.affine) @ step,
            "original_shape": tuple(info.shape), "original_affine": np.asarray(info.affine)}  # fmt: skip
    pred = _prediction(whole, meta)
    del whole
    if files.label is None:
        ml = float(np.prod(info.spacing)) / 1000.0
        return pred, {f"pred_ml_{n}": float((pred == c).sum()) * ml for c, n in enumerate(names) if c}
    truth = np.asarray(read_box(files.label, tuple((0, n) for n in info.shape)))
    row = _score(pred, truth, info.spacing, names)
    row["mean_dice"] = _mean([row[f"dice_{n}"] for n in names[1:]])
    if regions:
        row.update({f"region_dice_{n}": _finite(d) for (n, _), d in zip(regions, region_dice(pred, truth, regions))})
    return pred, row
