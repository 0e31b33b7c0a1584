"""Training runs, as the front ends start them.

:func:`train` is :func:`workbench.training.loop.train_and_evaluate` (checkpoints, resume,
history, curves, held-out evaluation); :class:`TrainConfig` is the one schema of a run,
from which the CLI flags and the panel's training choices are derived.
"""

from __future__ import annotations

from workbench.training import loop
from workbench.training.config import TrainConfig

__all__ = ["TrainConfig", "train"]


def train(config: TrainConfig, workdir, *, force: bool = False, **kwargs) -> dict:
    """Train ``config`` into ``workdir`` (see :func:`workbench.training.loop.train_and_evaluate`).

    A run that would not fit in memory is refused before its step compiles
    (:func:`workbench.app.memory_guard.check_memory`) unless ``force``.
    """
    if not force:
        kwargs.setdefault("memory_check", _memory_check)
    return loop.train_and_evaluate(config, workdir, **kwargs)


def _memory_check(cfg, layout, tc) -> None:
    from workbench.app.memory_guard import check_memory

    check_memory(cfg, layout.volume_shape, layout.mesh, train=True, batch=tc.batch, backend=tc.backend)
