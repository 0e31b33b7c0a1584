"""A run's history: one row per step and per evaluation, written as JSON, CSV and a plot."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from data_tools.atomic import atomic_output, write_text_atomic
from workbench.training.evaluation import finite_or_none

__all__ = ["train_row", "eval_row", "write_history", "plot_history", "training_curves"]


def train_row(step: int, metrics: dict, class_names, seconds: float, lr: float, *, first: int = 1) -> dict:
    """The history row of one step's metrics (loss parts, gradient norm, batch Dice of the
    outputs from ``first`` on: 1 leaves the background out, 0 for region outputs)."""
    from workbench.training.losses import dice_from_counts

    dice = dice_from_counts(metrics["inter"], metrics["pred"], metrics["true"])["pooled"]
    row = {
        "step": step,
        "loss": float(metrics["loss"]),
        "ce": float(metrics["ce"]),
        "dice_loss": float(metrics["dice_loss"]),
        "grad_norm": float(metrics["grad_norm"]),
        "lr": lr,
        "seconds": seconds,
    }
    for i, n in enumerate(class_names):
        if i >= first:
            row[f"dice_{n}"] = finite_or_none(dice[i])
    return row


def eval_row(step: int, result: dict) -> dict:
    """The history row of one :func:`workbench.training.evaluation.evaluate` result."""
    row = {"step": step, "accuracy": result["accuracy"]}
    for n, v in result["dice"].items():
        row[f"dice_{n}"] = v
    for n, v in result["pooled_dice"].items():
        row[f"pooled_dice_{n}"] = v
    for n, v in result.get("hd95_mm", {}).items():
        row[f"hd95_{n}"] = v
    for n, v in result.get("region_dice", {}).items():
        row[f"region_dice_{n}"] = v
    return row


def write_history(workdir: Path, history: dict) -> None:
    """``history.json`` and ``history.csv`` (one row per step, evaluations joined), atomically."""
    workdir = Path(workdir)
    write_text_atomic(workdir / "history.json", json.dumps(history, indent=1) + "\n")
    rows = history["train"]
    evals = {e["step"]: e for e in history["eval"]}
    keys = list(rows[0]) if rows else ["step"]
    ekeys = sorted({k for e in history["eval"] for k in e if k != "step"})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(keys + [f"eval_{k}" for k in ekeys])
    for row in rows:
        e = evals.get(row["step"], {})
        writer.writerow([row.get(k) for k in keys] + [e.get(k) for k in ekeys])
    write_text_atomic(workdir / "history.csv", buf.getvalue())


def plot_history(history: dict, path) -> Path:
    """Loss and Dice curves (train batches and held-out evaluations) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, evals = history["train"], history["eval"]
    names = history.get("scored_names") or history.get("class_names", [])[1:]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["loss"] for r in rows], lw=0.8, label="loss")
    ax1.set_yscale("log" if all(r["loss"] > 0 for r in rows) else "symlog")  # nnU-Net's loss may be < 0
    ax1.set_xlabel("step")
    ax1.set_title("training loss (CE + w·Dice)")
    for n in names:
        ax2.plot(steps, [r.get(f"dice_{n}") for r in rows], lw=0.6, alpha=0.6, label=f"train batch {n}")
        pts = [(e["step"], e.get(f"dice_{n}")) for e in evals if e.get(f"dice_{n}") is not None]
        if pts:
            ax2.plot(*zip(*pts), "o-", label=f"held-out {n}")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_title("Dice")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(path)


def training_curves(history: dict) -> dict[str, list[float]]:
    """Per-step curves of a history: ``loss`` and each ``dice <class>`` (NaN where a batch
    had none of the class), for :func:`workbench.analysis.figures.plot_curves`."""
    rows = history["train"]
    curves = {"loss": [r["loss"] for r in rows]}
    for name in [k for k in (rows[-1] if rows else {}) if k.startswith("dice_")]:
        curves[name.replace("_", " ")] = [float("nan") if r[name] is None else r[name] for r in rows]
    return curves
