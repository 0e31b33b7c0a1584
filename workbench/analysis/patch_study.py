"""The measures of the patch-versus-whole study, on one case's prediction and ground truth.

- :func:`lesion_detection`: each connected component of a class in the truth (a lesion) is
  found when a predicted voxel of that class overlaps it; counted per size bin (voxels).
- :func:`confusion_rate`: of the voxels of a group of classes (two mirror organs, the
  vertebrae) that the model puts in the group, the fraction given another member's label:
  the laterality or index confusion, apart from missing the structure.
- :func:`grid_error_rates`: the error rate (prediction ≠ truth) of the voxels within ``band``
  voxels of an inner border of the sliding-window tiles of ``patch`` (MONAI's positions at
  half-patch steps, :func:`workbench.execute.windows.window_starts`) and elsewhere. Both
  arms are scored on the same grid, so the whole-volume model is the control.

Example
-------
>>> truth = np.zeros((8, 8, 8), np.uint8); truth[2:4, 2:4, 2:4] = 2
>>> lesion_detection(truth, truth, 2, bins=(8, 64))["found"]
[1, 0]
"""

from __future__ import annotations

import numpy as np

__all__ = ["SIZE_BINS", "lesion_detection", "confusion_rate", "grid_planes", "grid_error_rates", "study_rows",
           "study_table", "plot_study"]  # fmt: skip

#: upper edges (voxels) of the lesion size bins: 1–8, 9–64, 65–512, larger
SIZE_BINS = (8, 64, 512)


def lesion_detection(pred: np.ndarray, truth: np.ndarray, label: int, *, bins=SIZE_BINS) -> dict:
    """Lesions (connected components of ``truth == label``, face-connected) found by ``pred``
    (any voxel of ``label`` inside), per size bin: ``{"bins", "total", "found", "sizes"}``;
    the last bin holds every lesion above ``bins[-1]``."""
    from scipy import ndimage

    components, n = ndimage.label(truth == label)
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    hit = np.bincount(components[(pred == label) & (components > 0)], minlength=n + 1)[1:] > 0
    edges = list(bins) + [np.inf]
    which = np.searchsorted(np.asarray(edges), sizes, side="left")  # bin i holds sizes <= edges[i]
    total = [int(np.sum(which == i)) for i in range(len(edges))]
    found = [int(np.sum((which == i) & hit)) for i in range(len(edges))]
    names = [f"{lo + 1}-{hi}" for lo, hi in zip((0, *bins[:-1]), bins)] + [f">{bins[-1]}"]
    return {"bins": names, "total": total, "found": found, "sizes": [int(s) for s in sizes]}


def confusion_rate(pred: np.ndarray, truth: np.ndarray, group) -> float | None:
    """Of the voxels whose true label is in ``group`` and whose predicted label is in
    ``group`` too, the fraction predicted as another member; None when there is none."""
    group = np.asarray(list(group))
    both = np.isin(truth, group) & np.isin(pred, group)
    if not both.any():
        return None
    return float(np.mean(pred[both] != truth[both]))


def grid_planes(shape, patch) -> list[list[int]]:
    """Per axis, the inner borders of the sliding-window tiles of ``patch`` over ``shape``
    (each window's first voxel and the voxel after its last, without 0 and the size)."""
    from workbench.execute.windows import PATCH_OVERLAP, window_starts

    starts = window_starts(shape, patch, PATCH_OVERLAP)
    planes = []
    for axis, (n, p) in enumerate(zip(shape, patch)):
        axis_starts = {s[axis] for s in starts}
        borders = axis_starts | {s + min(p, n) for s in axis_starts}
        planes.append(sorted(b for b in borders if 0 < b < n))
    return planes


def _near_planes(shape, planes, band: int) -> np.ndarray:
    near = np.zeros(shape, bool)
    for axis, (n, axis_planes) in enumerate(zip(shape, planes)):
        if not axis_planes:
            continue
        i = np.arange(n)[:, None]
        b = np.asarray(axis_planes)[None, :]
        distance = np.where(i >= b, i - b, b - 1 - i).min(axis=1)  # 0: the voxel touches the plane
        view = [1, 1, 1]
        view[axis] = n
        near |= (distance < band).reshape(view)
    return near


def grid_error_rates(pred: np.ndarray, truth: np.ndarray, patch, *, band: int = 2) -> dict:
    """Error rates (prediction ≠ truth) within ``band`` voxels of the tile borders of
    ``patch`` and elsewhere, with the fraction of the volume that lies near them."""
    near = _near_planes(truth.shape, grid_planes(truth.shape, patch), band)
    wrong = pred != truth
    return {
        "band": band,
        "volume_fraction_near": float(near.mean()),
        "error_rate_near": float(wrong[near].mean()) if near.any() else None,
        "error_rate_elsewhere": float(wrong[~near].mean()) if (~near).any() else None,
    }


def study_rows(results: dict) -> list[dict]:
    """One row per task and arm of a study's results (``benchmarks/patch_vs_whole.py``'s
    JSON): mean and SD over seeds of the per-seed mean Dice per class, the confusion rate,
    the lesions found / total per size bin, the grid error rates, and the compute spent."""
    rows = []
    for task, entry in results["tasks"].items():
        for arm, runs in entry["arms"].items():
            if not runs:
                continue
            classes = list(runs[0]["dice"])
            row = {"task": task, "arm": arm, "seeds": len(runs)}
            for c in classes:
                values = [r["dice"][c] for r in runs if r["dice"][c] is not None]
                row[f"dice_{c}"] = _mean_sd(values)
                row[f"dice_{c}_case_sd"] = float(np.mean([r["dice_case_sd"][c] for r in runs]))
            confusion = [r["confusion"] for r in runs if r.get("confusion") is not None]
            row["confusion"] = _mean_sd(confusion) if confusion else None
            if runs[0].get("lesions"):
                total = np.sum([r["lesions"]["total"] for r in runs], axis=0)
                found = np.sum([r["lesions"]["found"] for r in runs], axis=0)
                row["lesions"] = {"bins": runs[0]["lesions"]["bins"], "found": found.tolist(), "total": total.tolist()}
            for key in ("error_rate_near", "error_rate_elsewhere"):
                row[key] = _mean_sd([r["grid"][key] for r in runs])
            for key in ("steps", "voxels_seen", "device_seconds"):
                row[key] = float(np.mean([r["compute"][key] for r in runs]))
            cpu = [r["train_cpu_seconds"] for r in runs if r.get("train_cpu_seconds") is not None]
            row["train_cpu_seconds"] = float(np.mean(cpu)) if cpu else None
            planned = (entry.get("plan") or {}).get(arm) or {}
            row["train_bytes_per_device"] = planned.get("bytes_per_device")
            row["input_shape"] = runs[0]["compute"].get("input_shape")
            row["batch"] = runs[0]["compute"].get("batch")
            row["devices"] = runs[0]["compute"].get("devices")
            cost = (entry.get("inference") or {}).get(arm) or {}
            row["inference_seconds"] = cost.get("seconds_per_case")
            row["forward_bytes"] = cost.get("forward_bytes")
            rows.append(row)
    return rows


def _mean_sd(values) -> list[float]:
    values = np.asarray(values, float)
    return [float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0]


def plot_study(results: dict, path=None):
    """The study's figure: per task, Dice per class by arm (mean ± SD over seeds, each seed a
    dot), the task's context measure (lesions found per size bin, or the confusion rate) and
    the error rate near the patch grid and elsewhere. Returns the figure (saved at ``path``)."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    arms = ("whole", "patch")
    colours = {"whole": "tab:blue", "patch": "tab:orange"}
    fig, axes = plt.subplots(len(tasks), 3, figsize=(12, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        by_arm = results["tasks"][task]["arms"]
        classes = list(next(runs for runs in by_arm.values() if runs)[0]["dice"]) if any(by_arm.values()) else []
        for k, arm in enumerate(arms):
            runs = by_arm.get(arm) or []
            for i, c in enumerate(classes):
                values = [r["dice"][c] for r in runs if r["dice"][c] is not None]
                if not values:
                    continue
                x = i + (k - 0.5) * 0.35
                row[0].bar(x, np.mean(values), 0.35, color=colours[arm], alpha=0.5, label=arm if i == 0 else None)
                row[0].plot([x] * len(values), values, "k.", ms=4)
        row[0].set_xticks(range(len(classes)), classes, fontsize=8)
        row[0].set_ylim(0, 1)
        row[0].set_title(f"{task}: held-out Dice per class", fontsize=9)
        row[0].legend(fontsize=7)
        _context_panel(row[1], by_arm, arms, colours)
        for k, arm in enumerate(arms):
            runs = by_arm.get(arm) or []
            for j, key in enumerate(("error_rate_near", "error_rate_elsewhere")):
                values = [r["grid"][key] for r in runs if r["grid"][key] is not None]
                if values:
                    row[2].bar(j + (k - 0.5) * 0.35, np.mean(values), 0.35, color=colours[arm], alpha=0.5)
                    row[2].plot([j + (k - 0.5) * 0.35] * len(values), values, "k.", ms=4)
        row[2].set_xticks([0, 1], ["near tile borders", "elsewhere"], fontsize=8)
        row[2].set_title("voxel error rate", fontsize=9)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _context_panel(ax, by_arm, arms, colours) -> None:
    first = next((runs[0] for runs in by_arm.values() if runs), {})
    if first.get("lesions"):
        bins = first["lesions"]["bins"]
        for k, arm in enumerate(arms):
            runs = by_arm.get(arm) or []
            if not runs:
                continue
            total = np.sum([r["lesions"]["total"] for r in runs], axis=0)
            found = np.sum([r["lesions"]["found"] for r in runs], axis=0)
            rate = np.where(total > 0, found / np.maximum(total, 1), np.nan)
            ax.bar(np.arange(len(bins)) + (k - 0.5) * 0.35, rate, 0.35, color=colours[arm], alpha=0.5, label=arm)
        ax.set_xticks(range(len(bins)), [f"{b} vox" for b in bins], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("lesions found, by size", fontsize=9)
        return
    for k, arm in enumerate(arms):
        values = [r["confusion"] for r in by_arm.get(arm) or [] if r.get("confusion") is not None]
        if values:
            ax.bar(k, np.mean(values), 0.6, color=colours[arm], alpha=0.5)
            ax.plot([k] * len(values), values, "k.", ms=4)
    ax.set_xticks([0, 1], list(arms), fontsize=8)
    ax.set_ylim(0, 0.6)
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_title("label confusion (0.5 = chance)", fontsize=9)


def study_table(results: dict) -> str:
    """The study as a text table (Markdown pipes): one row per task and arm, mean ± SD over
    seeds of the held-out Dice per class, the confusion rate, lesions found (all seeds and
    cases), the error rates near the tile grid and elsewhere, and the compute per run."""
    rows = study_rows(results)
    header = ["task", "arm", "seeds", "Dice per class", "confusion", "lesions found", "error near grid / elsewhere",
              "input x batch", "steps", "voxels seen", "device-s", "train CPU-s", "train MiB/device",
              "inference s/case", "forward MiB"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        dice = ", ".join(f"{k[5:]} {_pm(v)}" for k, v in r.items() if k.startswith("dice_") and "_case_sd" not in k)
        lesions = r.get("lesions") or {"bins": [], "found": [], "total": []}
        found = ", ".join(f"{b}: {f}/{t}" for b, f, t in zip(lesions["bins"], lesions["found"], lesions["total"]) if t)
        cells = [r["task"], r["arm"], str(r["seeds"]), dice, _pm(r["confusion"]), found or "-",
                 f"{_pm(r['error_rate_near'], 3)} / {_pm(r['error_rate_elsewhere'], 3)}", _shape(r),
                 f"{r['steps']:.0f}", f"{r['voxels_seen']:.3g}", f"{r['device_seconds']:.0f}",
                 _num(r.get("train_cpu_seconds"), ".0f"),
                 _num(None if r.get("train_bytes_per_device") is None else r["train_bytes_per_device"] / 2**20, ".1f"),
                 _num(r["inference_seconds"], ".2f"),
                 _num(None if r["forward_bytes"] is None else r["forward_bytes"] / 2**20, ".1f")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shape(row) -> str:
    shape = row.get("input_shape")
    if not shape:
        return "-"
    devices = row.get("devices") or 1
    return f"{'x'.join(map(str, shape))} x {row.get('batch') or 1}" + (f" on {devices} devices" if devices > 1 else "")


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pm(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"
