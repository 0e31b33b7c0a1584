"""Flags several commands share, and the figure the CLI writes where napari cannot draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.options import PRESETS
from workbench.training.config import positive_int

__all__ = ["positive_int", "add_common", "model_choice", "write_figure"]


def add_common(p) -> None:
    """Options every JAX-running command takes: devices, model preset, weights (checkpoint or seed)."""
    p.add_argument(
        "--cpu-devices",
        type=positive_int,
        default=8,
        help="simulated CPU devices when no accelerator is present (default 8)",
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"model preset: {' | '.join(PRESETS)} (default small; with --checkpoint, the checkpoint's own)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="trained weights: a workbench train folder, its checkpoints/ or a .msgpack file "
        "(default: the shipped weights of --model small)",
    )
    p.add_argument(
        "--random-weights", action="store_true", help="use random weights (--seed) instead of the shipped ones"
    )


def model_choice(args, task: str = "phantom"):
    """The model of ``--model/--checkpoint/--random-weights/--seed`` (see :func:`workbench.app.resolve_model`);
    ``--model`` given with ``--checkpoint`` must name the checkpoint's architecture."""
    from workbench.app.models import check_preset_matches, resolve_model

    choice = resolve_model(
        args.model or "small", checkpoint=args.checkpoint, task=task, random_weights=args.random_weights, seed=args.seed
    )
    if args.checkpoint and args.model is not None:
        check_preset_matches(args.model, choice.config, args.checkpoint)
    return choice


def write_figure(
    path, image: np.ndarray, labels: np.ndarray, error: np.ndarray | None, layout, title: str = ""
) -> Path:
    """Mid-slices of image, prediction and |error| with shard boundaries (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from workbench.analysis.figures import plot_slices

    fig = plot_slices(image, labels, layout, error=error, title=title)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
