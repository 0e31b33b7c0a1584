"""Held-out evaluation: Dice per class (per case and pooled), accuracy and HD95."""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate", "evaluate_blocks", "held_out_blocks"]


def evaluate(model, cases, mesh="1x1x1", *, backend: str = "explicit", class_names=None, hd95: bool = True) -> dict:
    """Dice per class (per region for an nnU-Net region model) per case and pooled, accuracy
    and HD95 (mm) of ``model`` on ``cases``.

    Runs the partitioned inference (running batch-norm statistics) at each case's full
    resolution on the spatial part of ``mesh``.
    """
    from workbench.mesh import MeshSpec, parse_mesh
    from workbench.training.losses import hausdorff95

    spec = parse_mesh(mesh)
    spatial = MeshSpec(spec.z, spec.y, spec.x) if backend != "reference" else None
    k = model.config.num_classes
    names = tuple(class_names or [f"class{i}" for i in range(k)])
    first = 0 if _regions(model) is not None else 1  # HD95 of the foreground classes, or of every region
    per_case, inter, psum, tsum, accs, hds, case_names = [], np.zeros(k), np.zeros(k), np.zeros(k), [], [], []
    for case in cases:  # may be read lazily (a dataset's validation cases): iterated once
        case_names.append(case.name)
        pairs, correct = _output_masks(model, case, spatial, backend)
        dice = np.full(k, np.nan)
        for c, (p, t) in enumerate(pairs):
            inter[c] += np.sum(p & t)
            psum[c] += p.sum()
            tsum[c] += t.sum()
            if p.any() or t.any():
                dice[c] = 2.0 * int((p & t).sum()) / (int(p.sum()) + int(t.sum()))
        per_case.append(dice)
        accs.append(correct)
        if hd95:
            hds.append([hausdorff95(p, t, case.spacing) for p, t in pairs[first:]])
        del case, pairs  # before the next case is read
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
        out["hd95_mm"] = {n: _nanmean(hds[:, i - first]) for i, n in enumerate(names) if i >= first}
    return out


def _regions(model):
    config = model.config
    return getattr(config, "regions", None) if getattr(config, "spec", None) is not None else None


def _output_masks(model, case, spatial, backend):
    """([(predicted, true) boolean masks per output], accuracy) of one case: classes by argmax,
    or (nnU-Net region models) each region by sigmoid > 0.5 against ``isin(labels, region)``."""
    truth = case.labels
    if getattr(model.config, "spec", None) is None:  # the paper U-Net
        from workbench.execute.run import run

        pred = run(model, case.image, spatial, backend=backend).output.argmax(-1)
        pairs = [(pred == c, truth == c) for c in range(model.config.num_classes)]
        return pairs, float(np.mean(pred == truth))
    from workbench.execute.nnunet import apply_nnunet

    image = case.image if case.image.ndim == 4 else case.image[..., None]
    logits = apply_nnunet(model, image[None], spatial, backend=backend)[0]
    regions = _regions(model)
    if regions is None:
        pred = logits.argmax(-1)
        pairs = [(pred == c, truth == c) for c in range(logits.shape[-1])]
        return pairs, float(np.mean(pred == truth))
    pairs = [(logits[..., r] > 0, np.isin(truth, region)) for r, region in enumerate(regions)]
    right = np.logical_and.reduce([p == t for p, t in pairs])
    return pairs, float(np.mean(right))


def finite_or_none(v) -> float | None:
    """``float(v)``, or None for a missing or non-finite value (JSON has no NaN)."""
    return None if v is None or not np.isfinite(v) else float(v)


def _nanmean(values) -> float | None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def evaluate_blocks(model, source, n: int, mesh, *, backend: str = "explicit", class_names=None) -> dict:
    """:func:`evaluate` of ``source``'s first ``n`` held-out cases, computed where the shards
    are: each process reads only its devices' blocks of each case
    (``source.eval_block(i, box)`` → (image, labels)), runs the partitioned forward pass,
    and counts per class on its own blocks; the counts are summed over processes. What a
    multi-process training run evaluates, so that no process holds a whole held-out case.

    Cases go through the mesh ``data`` at a time (one per data slice; the last batch is
    filled with empty cases that count nothing), so every device of every process takes
    part. Dice per case and pooled and accuracy equal :func:`evaluate`'s exactly (the same
    compiled program and integer counts); HD95 needs whole masks and is left out (the
    result has no ``hd95_mm``).
    """
    import jax
    import jax.numpy as jnp

    from workbench.execute.distributed import allgather, local_blocks, put_blocks, put_tree
    from workbench.execute.run import compile_forward
    from workbench.mesh import ShardLayout, parse_mesh

    spec = parse_mesh(mesh)
    cfg = model.config
    k = cfg.num_classes
    names = tuple(class_names or [f"class{i}" for i in range(k)])
    layout = ShardLayout(tuple(source.shape), spec, multiple=cfg.multiple)
    compiled = compile_forward(cfg, layout, backend=backend, batch=spec.data)
    shape = (spec.data, *layout.padded_shape, cfg.in_channels)
    labels_of = jax.jit(lambda y: jnp.argmax(y, axis=-1).astype(jnp.uint8))
    variables = put_tree(model.variables, compiled.variables_sharding)
    # per case: intersection, predicted and true voxels of each class, and correct voxels
    counts = np.zeros((n, 3, k), np.int64)
    correct = np.zeros(n, np.int64)
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
                    image[(j - b0, *inner, 0)] = img
                    labels[(j - b0, *inner)] = lab
            truth[(b0, b1, *box)] = labels
            return image

        x = put_blocks(shape, compiled.input_sharding, read_block)
        pred = labels_of(compiled.fn(variables, x))
        for index, block in local_blocks(pred):
            (b0, b1), *box = (s.indices(size)[:2] for s, size in zip(index, pred.shape))
            labels = truth[(b0, b1, *box[:3])]
            for j in range(b0, b1):
                if first + j >= n:
                    continue
                t, p = labels[j - b0], block[j - b0]
                inside = t != 255
                t, p = t[inside], p[inside]
                correct[first + j] += int(np.sum(p == t))
                for c in range(k):
                    pc, tc = p == c, t == c
                    counts[first + j, :, c] += (int(np.sum(pc & tc)), int(pc.sum()), int(tc.sum()))
        del x, pred, truth
        if hasattr(source, "release"):
            source.release(first + spec.data)
    totals = allgather(np.concatenate([counts.reshape(n, -1), correct[:, None]], axis=1)).sum(0)
    counts, correct = totals[:, :-1].reshape(n, 3, k), totals[:, -1]
    voxels = int(np.prod(source.shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_case = np.where(counts[:, 1] + counts[:, 2] > 0, 2.0 * counts[:, 0] / (counts[:, 1] + counts[:, 2]), np.nan)
        inter, psum, tsum = counts.sum(0)
        pooled = np.where(psum + tsum > 0, 2 * inter / (psum + tsum), np.nan)
    return {
        "cases": [source.eval_name(i) for i in range(n)],
        "dice": {name: _nanmean(per_case[:, i]) for i, name in enumerate(names)},
        "dice_per_case": {name: [finite_or_none(v) for v in per_case[:, i]] for i, name in enumerate(names)},
        "pooled_dice": {name: finite_or_none(pooled[i]) for i, name in enumerate(names)},
        "accuracy": float(np.mean(correct / voxels)) if n else None,
    }


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
