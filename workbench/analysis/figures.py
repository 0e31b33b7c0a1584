"""Matplotlib figures shared by the CLI, the notebook panel and the notebooks (no ipywidgets, no Qt).

Slices with shard boundaries, the seam profile, per-device memory against devices,
curves, and lesion detection by size (the resolution study).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.mesh import ShardLayout

__all__ = ["plot_slices", "plot_seam_profile", "plot_memory", "plot_curves", "plot_detection"]


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_slices(
    image: np.ndarray,
    labels: np.ndarray,
    layout: ShardLayout,
    *,
    error: np.ndarray | None = None,
    z: int | None = None,
    title: str = "",
):
    """Mid z-slice of image, predicted labels and (optionally) |error|, shard boundaries in red."""
    plt = _pyplot()
    z = image.shape[0] // 2 if z is None else z
    panels = [("image", image[z], "gray"), ("prediction", labels[z], "viridis")]
    if error is not None:
        panels.append(("|partitioned − reference|", error[z], "magma"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    ids = layout.shard_ids()[z]
    for ax, (name, data, cmap) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(data, cmap=cmap, interpolation="nearest")
        if ids.max() > ids.min():
            ax.contour(ids, levels=np.unique(ids)[:-1] + 0.5, colors="red", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
        if error is not None and name.startswith("|"):
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or f"slice z={z}; red: shard boundaries (mesh {layout.mesh})", fontsize=9)
    fig.tight_layout()
    return fig


def plot_seam_profile(
    profiles: dict[str, dict[str, np.ndarray]],
    *,
    path=None,
    predicted: dict | None = None,
    title: str = "",
    tol: float = 1e-4,
):
    """Max |Δ| against seam distance, one line per run (``{label: profile}``), log scale.

    ``predicted`` ({label: depth}) draws each run's predicted band edge as a dashed
    line. Saves to ``path`` when given; returns the figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, prof in profiles.items():
        (line,) = ax.semilogy(prof["distance"], np.maximum(prof["max"], 1e-9), marker=".", label=label)
        if predicted and label in predicted and predicted[label] > 0:
            ax.axvline(predicted[label] - 0.5, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.axhline(tol, color="gray", linewidth=0.6)
    ax.set_xlabel("distance to the nearest shard face (voxels)")
    ax.set_ylabel("max |partitioned − reference|")
    ax.set_title(title or "seam profile (dashed: receptive-field prediction)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig


def plot_memory(rows: list[dict], *, x: str = "devices", budgets_gib=(16, 80), title: str = ""):
    """Per-device peak memory (GiB) vs ``x`` (a key of ``rows``), one line per resolution."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    by_res: dict[Any, list[dict]] = {}
    for row in rows:
        by_res.setdefault(row["resolution"], []).append(row)
    for res, group in by_res.items():
        group = sorted(group, key=lambda r: r[x])
        ax.plot([r[x] for r in group], [r["bytes_per_device"] / 2**30 for r in group], marker="o", label=f"{res}³")
    for budget in budgets_gib:
        ax.axhline(budget, color="grey", ls="--", lw=0.8)
        ax.text(ax.get_xlim()[0], budget, f" {budget} GiB", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("peak GiB per device")
    ax.set_title(title or "per-device memory (planner)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(curves: dict[str, list[float]], *, xlabel: str = "step", title: str = ""):
    """Line plots of named series (loss, Dice ...), one axis each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_detection(rows: list[dict], *, title: str = "", ax=None):
    """Lesion detection rate by diameter (voxels at full resolution), one line per arm of
    the resolution study (rows of :func:`workbench.analysis.resolution.resolution_study`
    or :func:`~workbench.analysis.resolution.load_study`), the found/total count at each point."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.2))
    for row in rows:
        counts = {float(k): v for k, v in (row.get("detection_counts") or {}).items()}
        rates = {float(k): v for k, v in row["detection"].items()}
        sizes = sorted(rates)
        label = f"trained at {row['resolution']}³ (lesion Dice {row['lesion_dice']:.2f})"
        ax.plot(sizes, [rates[s] for s in sizes], marker="o", ms=4, label=label)
        for s in sizes:
            if s in counts:
                ax.annotate(
                    f"{counts[s][0]}/{counts[s][1]}",
                    (s, rates[s]),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(0, 4),
                    ha="center",
                )
    ax.set_xscale("log", base=2)
    diameters = [float(k) for row in rows for k in row["detection"]]
    if diameters:
        ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32) if min(diameters) <= t <= max(diameters)]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("lesion diameter (voxels at full resolution)")
    ax.set_ylabel("lesions found")
    ax.set_ylim(-0.05, 1.12)
    evaluated = {row.get("evaluated_at") for row in rows} - {None}
    ax.set_title(title or f"held-out phantoms at {'/'.join(f'{e}³' for e in evaluated)}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    if fig is not None:
        fig.tight_layout()
    return fig if fig is not None else ax.figure
