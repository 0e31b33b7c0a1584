"""Matplotlib figures shared by the CLI and the notebook panels (no ipywidgets, no Qt)."""

from __future__ import annotations

import numpy as np

from workbench.mesh import ShardLayout

__all__ = ["plot_slices"]


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def plot_slices(image: np.ndarray, labels: np.ndarray, layout: ShardLayout, *,
                error: np.ndarray | None = None, z: int | None = None, title: str = ""):
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
