"""Training runs, as the front ends start them.

:func:`train` is :func:`workbench.training.loop.train_and_evaluate` (checkpoints, resume,
history, curves, held-out evaluation); :class:`TrainConfig` is the one schema of a run,
from which the CLI flags and the panel's training choices are derived.
"""

from __future__ import annotations

from workbench.training import loop
from workbench.training.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, workdir, **kwargs) -> dict:
    """Train ``config`` into ``workdir`` (see :func:`workbench.training.loop.train_and_evaluate`)."""
    return loop.train_and_evaluate(config, workdir, **kwargs)
