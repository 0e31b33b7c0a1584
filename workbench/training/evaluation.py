"""Held-out evaluation: Dice per class (per case and pooled), accuracy and HD95.

Images may have several channels (a case's (Z, Y, X, C) image, every channel filled into
the model's input). A model with region outputs (nnU-Net's sigmoid heads, ``model.spec``'s
``output_kind == "sigmoid"``) is scored on its painted segmentation
(:func:`predicted_labels`: regions painted in ``regions_class_order``); ``regions``
((name, label values) pairs, a dataset's :attr:`~data_tools.datasets.Dataset.regions`) adds
the Dice of each region (:func:`region_dice`: Dice of ``isin(seg, values)``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate", "evaluate_blocks", "held_out_blocks", "predicted_labels", "region_dice", "model_logits"]


def predicted_labels(logits: np.ndarray, model=None) -> np.ndarray:
    """Integer labels of channels-last ``logits`` (..., K): the argmax, or for a model with
    region outputs nnU-Net's painting (:func:`workbench.model.nnunet_rules.logits_to_segmentation`)."""
    spec = getattr(model, "spec", None)
    if spec is not None and getattr(spec, "output_kind", "softmax") == "sigmoid":
        from workbench.model.nnunet_rules import logits_to_segmentation

        return logits_to_segmentation(np.moveaxis(np.asarray(logits), -1, 0), "sigmoid", spec.regions_class_order)
    return np.asarray(logits).argmax(-1)


def region_dice(pred: np.ndarray, truth: np.ndarray, regions) -> np.ndarray:
    """(R,) hard Dice of each region ``(name, label values)``: of ``isin(pred, values)``
    against ``isin(truth, values)`` (:func:`workbench.training.losses.dice_per_class` of the
    two masks); NaN for a region absent from both."""
    from workbench.training.losses import dice_per_class

    return np.array([dice_per_class(np.isin(pred, values), np.isin(truth, values), 2)[1] for _, values in regions])


def evaluate(model, cases, mesh="1x1x1", *, backend: str = "explicit", class_names=None, hd95: bool = True,
             regions=(), window=None) -> dict:  # fmt: skip
    """Dice per class per case and pooled, accuracy and HD95 (mm) of ``model`` on ``cases``
    (and with ``regions``: ``region_dice``, ``region_dice_per_case``, ``pooled_region_dice``).

    Runs the partitioned inference (running batch-norm statistics) at each case's full
    resolution on the spatial part of ``mesh``; a model trained on patches (``window``: the
    patch) is run by Gaussian sliding windows instead (:func:`model_logits`).
    """
    from workbench.mesh import MeshSpec, parse_mesh
    from workbench.training.losses import accuracy, dice_per_class, hausdorff95

    spec = parse_mesh(mesh)
    spatial = MeshSpec(spec.z, spec.y, spec.x) if backend != "reference" else None
    k = _label_count(model, class_names)
    names = tuple(class_names or [f"class{i}" for i in range(k)])
    per_case, inter, psum, tsum, accs, hds, case_names = [], np.zeros(k), np.zeros(k), np.zeros(k), [], [], []
    regions = tuple(regions or ())
    per_region, region_counts = [], np.zeros((3, len(regions)))
    for case in cases:  # may be read lazily (a dataset's validation cases): iterated once
        case_names.append(case.name)
        pred = predicted_labels(model_logits(model, case.image, spatial, backend, window=window), model)
        truth = case.labels
        per_case.append(dice_per_class(pred, truth, k))
        if regions:
            per_region.append(region_dice(pred, truth, regions))
            for r, (_, values) in enumerate(regions):
                p, t = np.isin(pred, values), np.isin(truth, values)
                region_counts[:, r] += (np.sum(p & t), p.sum(), t.sum())
        for c in range(k):
            p, t = pred == c, truth == c
            inter[c] += np.sum(p & t)
            psum[c] += p.sum()
            tsum[c] += t.sum()
        accs.append(accuracy(pred, truth))
        if hd95:
            hds.append([hausdorff95(pred == c, truth == c, case.spacing) for c in range(1, k)])
        del case, pred, truth  # before the next case is read
    per_case = np.asarray(per_case)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(psum + tsum > 0, 2 * inter / (psum + tsum), np.nan)
    out = {
        "cases": case_names,
        "dice": {n: _nanmean(per_case[:, i]) for i, n in enumerate(names)},
        "dice_per_case": {n: [finite_or_none(v) for v in per_case[:, i]] for i, n in enumerate(names)},
        "pooled_dice": {n: finite_or_none(pooled[i]) for i, n in enumerate(names)},
        "accuracy": float(np.mean(accs)) if accs else None,
    }
    if hd95 and hds:
        hds = np.asarray(hds)
        out["hd95_mm"] = {n: _nanmean(hds[:, i - 1]) for i, n in enumerate(names) if i > 0}
    if regions:
        out.update(_region_scores(regions, np.asarray(per_region).reshape(-1, len(regions)), region_counts))
    return out


def _label_count(model, class_names) -> int:
    """Classes of the label maps scored: the model's outputs, or for region outputs (scored on
    the painted map) the dataset's labels (``class_names``, else up to the largest painted label)."""
    spec = getattr(model, "spec", None)
    if spec is None or spec.output_kind != "sigmoid":
        return model.config.num_classes
    return len(class_names) if class_names else max(spec.regions_class_order) + 1


def model_logits(model, image, spatial, backend: str, *, window=None) -> np.ndarray:
    """(Z, Y, X, K) logits of one case's image ((Z, Y, X) or (Z, Y, X, C)): the paper U-Net's
    partitioned run, or an nnU-Net network's full-resolution head (:func:`workbench.execute.nnunet.apply_nnunet`).
    ``window`` (the patch a model was trained on): Gaussian-weighted sliding windows of that
    size, step half a patch (:func:`workbench.execute.windows.patch_logits`), on one device."""
    from workbench.training.data import model_batch

    if window is not None:
        from workbench.execute.windows import patch_logits

        return patch_logits(model, image, window)

    if getattr(model, "spec", None) is None:
        from workbench.execute.run import run

        return run(model, model_batch(image), spatial, backend=backend).output[0]
    from workbench.execute.nnunet import apply_nnunet

    return apply_nnunet(model, model_batch(image), spatial, backend=backend)[0]


def _region_scores(regions, per_case: np.ndarray, counts: np.ndarray) -> dict:
    """The region entries of :func:`evaluate`: ``per_case`` (cases, R) Dice, ``counts``
    (intersection, predicted, true) × R summed over the cases."""
    inter, psum, tsum = counts
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(psum + tsum > 0, 2 * inter / (psum + tsum), np.nan)
    names = [n for n, _ in regions]
    return {
        "region_dice": {n: _nanmean(per_case[:, i]) for i, n in enumerate(names)},
        "region_dice_per_case": {n: [finite_or_none(v) for v in per_case[:, i]] for i, n in enumerate(names)},
        "pooled_region_dice": {n: finite_or_none(pooled[i]) for i, n in enumerate(names)},
    }


def finite_or_none(v) -> float | None:
    """``float(v)``, or None for a missing or non-finite value (JSON has no NaN)."""
    return None if v is None or not np.isfinite(v) else float(v)


def _nanmean(values) -> float | None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def evaluate_blocks(model, source, n: int, mesh, *, backend: str = "explicit", class_names=None, regions=()) -> dict:
    """:func:`evaluate` of ``source``'s first ``n`` held-out cases, computed where the shards
    are: each process reads only its devices' blocks of each case
    (``source.eval_block(i, box)`` → (image, labels)), runs the partitioned forward pass,
    and counts per class on its own blocks; the counts are summed over processes. What a
    multi-process training run evaluates, so that no process holds a whole held-out case.

    Cases go through the mesh ``data`` at a time (one per data slice; the last batch is
    filled with empty cases that count nothing), so every device of every process takes
    part. Dice per case and pooled and accuracy equal :func:`evaluate`'s exactly (the same
    compiled program and integer counts). HD95 (``hd95_mm``) comes from each block's surface
    voxels (a one-voxel label halo exchanged on the devices, the surface points gathered,
    distances exact: :mod:`workbench.execute.surface`) and equals :func:`evaluate`'s, for a
    source that tells each held-out case's spacing (``source.eval_spacing(i)``; without it
    the result has no ``hd95_mm``). Every channel of a block is filled; ``regions`` as :func:`evaluate`.
    """
    import jax

    from workbench.execute.distributed import allgather, local_blocks, put_blocks, put_tree
    from workbench.execute.run import compile_forward
    from workbench.execute.surface import block_points
    from workbench.mesh import ShardLayout, parse_mesh
    from workbench.training.data import channels_last

    spec = parse_mesh(mesh)
    cfg = model.config
    k = cfg.num_classes
    names = tuple(class_names or [f"class{i}" for i in range(k)])
    layout = ShardLayout(tuple(source.shape), spec, multiple=cfg.multiple)
    compiled = compile_forward(cfg, layout, backend=backend, batch=spec.data)
    shape = (spec.data, *layout.padded_shape, cfg.in_channels)
    labels_of = jax.jit(_labels_fn(model))
    regions = tuple(regions or ())
    variables = put_tree(model.variables, compiled.variables_sharding)
    # per case: intersection, predicted and true voxels of each class, and correct voxels
    counts = np.zeros((n, 3, k + len(regions)), np.int64)
    correct = np.zeros(n, np.int64)
    spacings = [source.eval_spacing(i) for i in range(n)] if hasattr(source, "eval_spacing") else None
    surfaces = {"pred": [[] for _ in range(n)], "truth": [[] for _ in range(n)]}  # this process's surface rows
    for first in range(0, n, spec.data):
        truth: dict = {}

        def read_block(index, first=first, truth=truth):
            (b0, b1), *box = (s.indices(size)[:2] for s, size in zip(index, shape))
            box = box[:3]
            valid = tuple((min(lo, size), min(hi, size)) for (lo, hi), size in zip(box, source.shape))
            image = np.zeros((b1 - b0, *(hi - lo for lo, hi in box), cfg.in_channels), np.float32)
            labels = np.full(image.shape[:4], 255, np.uint8)  # 255: padding or an empty case
            inner = tuple(slice(0, hi - lo) for lo, hi in valid)
            for j in range(b0, b1):
                if first + j < n and all(hi > lo for lo, hi in valid):
                    img, lab = source.eval_block(first + j, valid)
                    image[(j - b0, *inner)] = channels_last(img)
                    labels[(j - b0, *inner)] = lab
            truth[(b0, b1, *box)] = labels
            return image

        x = put_blocks(shape, compiled.input_sharding, read_block)
        pred = labels_of(compiled.fn(variables, x))
        edges = _edges(pred, truth, compiled.mesh, source.shape) if spacings is not None else {}
        for index, block in local_blocks(pred):
            (b0, b1), *box = (s.indices(size)[:2] for s, size in zip(index, pred.shape))
            labels = truth[(b0, b1, *box[:3])]
            for j in range(b0, b1):
                if first + j >= n:
                    continue
                if edges:
                    k0 = (b0, b1, *box[:3])
                    origin = [lo for lo, _ in box[:3]]
                    surfaces["pred"][first + j].append(block_points(block[j - b0], edges["pred"][k0][j - b0], origin))
                    surfaces["truth"][first + j].append(
                        block_points(labels[j - b0], edges["truth"][k0][j - b0], origin)
                    )
                t, p = labels[j - b0], block[j - b0]
                inside = t != 255
                t, p = t[inside], p[inside]
                correct[first + j] += int(np.sum(p == t))
                for c in range(k):
                    pc, tc = p == c, t == c
                    counts[first + j, :, c] += (int(np.sum(pc & tc)), int(pc.sum()), int(tc.sum()))
                for r, (_, values) in enumerate(regions):
                    pc, tc = np.isin(p, values), np.isin(t, values)
                    counts[first + j, :, k + r] += (int(np.sum(pc & tc)), int(pc.sum()), int(tc.sum()))
        del x, pred, truth
        if hasattr(source, "release"):
            source.release(first + spec.data)
    totals = allgather(np.concatenate([counts.reshape(n, -1), correct[:, None]], axis=1)).sum(0)
    counts, correct = totals[:, :-1].reshape(n, 3, k + len(regions)), totals[:, -1]
    counts, region_counts = counts[..., :k], counts[..., k:]
    voxels = int(np.prod(source.shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_case = np.where(counts[:, 1] + counts[:, 2] > 0, 2.0 * counts[:, 0] / (counts[:, 1] + counts[:, 2]), np.nan)
        inter, psum, tsum = counts.sum(0)
        pooled = np.where(psum + tsum > 0, 2 * inter / (psum + tsum), np.nan)
    out = {
        "cases": [source.eval_name(i) for i in range(n)],
        "dice": {name: _nanmean(per_case[:, i]) for i, name in enumerate(names)},
        "dice_per_case": {name: [finite_or_none(v) for v in per_case[:, i]] for i, name in enumerate(names)},
        "pooled_dice": {name: finite_or_none(pooled[i]) for i, name in enumerate(names)},
        "accuracy": float(np.mean(correct / voxels)) if n else None,
    }
    if spacings is not None and n:
        from workbench.execute.surface import hd95_from_points

        hds = np.array([hd95_from_points(_rows(surfaces["pred"][i]), _rows(surfaces["truth"][i]), counts[i],
                                         spacings[i])[1:] for i in range(n)])  # fmt: skip
        out["hd95_mm"] = {name: _nanmean(hds[:, i - 1]) for i, name in enumerate(names) if i > 0}
    if regions:
        with np.errstate(invalid="ignore", divide="ignore"):
            s = region_counts[:, 1] + region_counts[:, 2]
            per_region = np.where(s > 0, 2.0 * region_counts[:, 0] / np.maximum(s, 1), np.nan)
        out.update(_region_scores(regions, per_region, region_counts.sum(0)))
    return out


def _edges(pred, truth: dict, mesh, shape) -> dict:
    """{"pred" / "truth": {(b0, b1, box...): edge block}}: the surface voxels of this
    process's blocks of the predicted labels and of ``truth`` (its blocks by the same keys)."""
    from workbench.execute.distributed import local_blocks, put_blocks
    from workbench.execute.surface import surface_fn

    def key(index):
        (b0, b1), *box = (s.indices(size)[:2] for s, size in zip(index, pred.shape))
        return (b0, b1, *box[:3])

    truth_array = put_blocks(pred.shape, pred.sharding, lambda index: truth[key(index)])
    edges = surface_fn(mesh)
    return {name: {key(i): b for i, b in local_blocks(edges(labels, shape))}
            for name, labels in (("pred", pred), ("truth", truth_array))}  # fmt: skip


def _rows(parts) -> np.ndarray:
    """The (M, 4) surface rows of one case's blocks on this process."""
    return np.concatenate(parts) if parts else np.zeros((0, 4), np.int32)


def _labels_fn(model):
    """The jittable channels-last logits → uint8 labels of :func:`predicted_labels` (argmax,
    or regions painted where ``sigmoid > 0.5``, later regions over earlier ones)."""
    import jax.numpy as jnp

    spec = getattr(model, "spec", None)
    if spec is None or getattr(spec, "output_kind", "softmax") != "sigmoid":
        return lambda y: jnp.argmax(y, axis=-1).astype(jnp.uint8)
    order = tuple(int(v) for v in spec.regions_class_order)

    def paint(y):
        y = y.astype(jnp.float32)
        seg = jnp.zeros(y.shape[:-1], jnp.uint8)
        for i, label in enumerate(order):
            seg = jnp.where(1.0 / (1.0 + jnp.exp(-y[..., i])) > 0.5, jnp.uint8(label), seg)
        return seg

    return paint


def held_out_blocks(source, n: int):
    """What :func:`evaluate_blocks` reads: ``source`` itself when it reads blocks of its
    held-out cases (``eval_block``), else :class:`_WholeHeldOut` over its whole cases.
    Every process calls it in the main thread: a source's ``survey_held_out(n)`` (the
    held-out cases' statistics, their slabs shared among the processes) runs here."""
    if not hasattr(source, "eval_block"):
        return _WholeHeldOut(source, n)
    if hasattr(source, "survey_held_out"):
        source.survey_held_out(n)
    return source


class _WholeHeldOut:
    """``eval_block`` as slices of whole held-out cases (for a source that cannot read a
    held-out box): ``source.eval_cases(n)`` is iterated once, in order, and a case is kept
    only until :meth:`release` passes it (one batch of the mesh's data axis at a time)."""

    def __init__(self, source, n: int):
        self.n, self.shape = n, tuple(source.shape)
        self._cases = iter(source.eval_cases(n))
        self._kept: dict = {}
        self._names: dict = {}
        self._next = 0

    def __len__(self) -> int:
        return self.n

    def _get(self, i: int):
        while i not in self._kept:
            case = next(self._cases)
            self._kept[self._next], self._names[self._next] = case, case.name
            self._next += 1
        return self._kept[i]

    def eval_block(self, i: int, box):
        case = self._get(i)
        sl = tuple(slice(lo, hi) for lo, hi in box)
        return case.image[sl], case.labels[sl]

    def release(self, upto: int) -> None:
        """Drop the cases before ``upto``."""
        for i in [i for i in self._kept if i < upto]:
            del self._kept[i]

    def eval_name(self, i: int) -> str:
        return self._names[i] if i in self._names else self._get(i).name

    def eval_spacing(self, i: int):
        """Held-out case ``i``'s spacing (mm), as :func:`evaluate` scores its HD95 with."""
        return tuple(self._get(i).spacing)
