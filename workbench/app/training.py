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

    A run that would not fit in memory is refused (:func:`workbench.app.memory_guard.check_memory`)
    unless ``force``: before any volume is generated or read where the data's shape is told
    by its spec or headers (:func:`~workbench.app.memory_guard.training_shape`), and in any
    case before the step compiles (a check already made is not repeated).
    """
    if not force:
        checked = _check_before_loading(config) if "source" not in kwargs else None
        kwargs.setdefault("memory_check", lambda cfg, layout, tc: _memory_check(cfg, layout, tc, checked))
    return loop.train_and_evaluate(config, workdir, **kwargs)


def _spec(tc):
    """The mesh the loop will use, or None where the loop will refuse it (with its own message)."""
    import jax

    from workbench.errors import UserError
    from workbench.mesh import parse_mesh

    try:
        spec = tc.mesh_spec if tc.backend != "reference" else parse_mesh("1x1x1")
    except UserError:
        return None
    if spec.n_devices > len(jax.devices()) or tc.batch % spec.data:
        return None
    return spec


def _key(cfg, shape, spec, tc) -> tuple:
    return cfg, tuple(shape), spec, tc.batch, tc.backend


def _check_before_loading(tc):
    """The guard from the data's spec or headers, before the source loads anything; the key
    of what was checked, or None."""
    from workbench.app.memory_guard import MemoryRefused, check_memory, training_shape
    from workbench.errors import UserError
    from workbench.training.config import model_config

    if tc.plans or tc.init_checkpoint:
        return None  # nnU-Net networks: checked by compiling the step, once the data is known (below)
    spec = _spec(tc)
    known = training_shape(tc) if spec is not None else None
    if known is None:
        return None
    shape, num_classes = known
    if tc.patch is not None:  # patch training: a step holds batch × patch, whatever the volume
        shape = tuple(tc.patch)
    if num_classes is None:  # volume files: their classes are known once loaded; the preset's meanwhile
        from workbench.model.unet import UNetConfig

        num_classes = UNetConfig.preset(tc.model).num_classes
    try:
        cfg = model_config(tc, num_classes)
        check_memory(cfg, shape, spec, train=True, batch=tc.batch, backend=tc.backend)
    except MemoryRefused:
        raise
    except UserError:  # a config or shape the loop refuses: it names the problem in its own order
        return None
    return _key(cfg, shape, spec, tc)


def _memory_check(cfg, layout, tc, checked=None) -> None:
    from workbench.app.memory_guard import check_memory
    from workbench.training.models import NNUNetConfig

    if isinstance(cfg, NNUNetConfig):
        return _compiled_memory_check(cfg, layout, tc)
    if checked is not None and _key(cfg, layout.volume_shape, layout.mesh, tc) == checked:
        return  # the same run was checked before loading
    check_memory(cfg, layout.volume_shape, layout.mesh, train=True, batch=tc.batch, backend=tc.backend)


def _compiled_memory_check(cfg, layout, tc) -> None:
    """An nnU-Net network: no analytic bound was fitted on it, so the train step is compiled
    and its per-device peak compared with the memory available."""
    from workbench.app.memory_guard import MemoryRefused, available_memory
    from workbench.app.planning import PlanKey, format_bytes, plan_bytes

    peak = plan_bytes(PlanKey(cfg, tuple(layout.volume_shape), layout.mesh, tc.backend, "exact", True, tc.batch))[
        "peak"
    ]
    budget, where = available_memory(layout.mesh.n_devices)
    if peak > budget:
        raise MemoryRefused(
            f"this training run needs {format_bytes(peak)} per device (the compiled step) but {format_bytes(budget)} "
            f"is available ({where}); use a mesh with more devices, a smaller --resolution or --spacing, or pass "
            "--force to run anyway"
        )
