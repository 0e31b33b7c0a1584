"""Held-out evaluation: Dice per class (per case and pooled), accuracy and HD95."""

from __future__ import annotations

import numpy as np

__all__ = ["evaluate"]


def evaluate(model, cases, mesh="1x1x1", *, backend: str = "explicit", class_names=None, hd95: bool = True) -> dict:
    """Dice per class per case and pooled, accuracy and HD95 (mm) of ``model`` on ``cases``.

    Runs the partitioned inference (running batch-norm statistics) at each case's full
    resolution on the spatial part of ``mesh``.
    """
    from workbench.execute.run import run
    from workbench.mesh import MeshSpec, parse_mesh
    from workbench.training.losses import accuracy, dice_per_class, hausdorff95

    spec = parse_mesh(mesh)
    spatial = MeshSpec(spec.z, spec.y, spec.x) if backend != "reference" else None
    k = model.config.num_classes
    names = tuple(class_names or [f"class{i}" for i in range(k)])
    per_case, inter, psum, tsum, accs, hds, case_names = [], np.zeros(k), np.zeros(k), np.zeros(k), [], [], []
    for case in cases:  # may be read lazily (a dataset's validation cases): iterated once
        case_names.append(case.name)
        logits = run(model, case.image, spatial, backend=backend).output
        pred = logits.argmax(-1)
        truth = case.labels
        per_case.append(dice_per_class(pred, truth, k))
        for c in range(k):
            p, t = pred == c, truth == c
            inter[c] += np.sum(p & t)
            psum[c] += p.sum()
            tsum[c] += t.sum()
        accs.append(accuracy(pred, truth))
        if hd95:
            hds.append([hausdorff95(pred == c, truth == c, case.spacing) for c in range(1, k)])
        del case, logits, pred, truth  # before the next case is read
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
    return out


def finite_or_none(v) -> float | None:
    """``float(v)``, or None for a missing or non-finite value (JSON has no NaN)."""
    return None if v is None or not np.isfinite(v) else float(v)


def _nanmean(values) -> float | None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None
