"""Refuse a run that would not fit in memory, before anything big is allocated or compiled.

Rule (README, Reliability): with ``V`` voxels per device (padded shards × batch per data
slice), ``F`` the first level's filters and ``b`` bytes per value,

* a run whose quick upper bound ``(32 · V·F·4 + 256 MiB)`` for inference, ``128 · V·F·4 +
  256 MiB`` for training) is below half the memory it may use runs unchecked: no compile;
* one whose lower bound (two full-resolution feature maps, ``2·V·F·b``; four for training)
  already exceeds it is refused at once;
* otherwise the planner (:func:`workbench.app.planning.plan_bytes`: the same program,
  compiled abstractly) gives the per-device peak.

The memory a run may use: on accelerators ``device.memory_stats()["bytes_limit"]`` per
device; on CPU the host's available RAM (``psutil``), shared by every device the mesh
uses. The bounds come from the planner's peaks (14× and 48× ``V·F·4`` at 32³–64³ for the
small and paper presets). ``force=True`` (``--force``) skips the guard.

The guard runs before the input is generated or read: :func:`input_shape` and
:func:`training_shape` tell the shape from the spec (``phantom:N``, ``mni:N``) or from
headers only (:func:`data_tools.io.volume_info`), so a ``phantom:512`` is refused before
its 0.5 GiB are made.
"""

from __future__ import annotations

import math
import os
import re

from workbench.errors import UserError

__all__ = ["MemoryRefused", "available_memory", "check_memory", "input_shape", "training_shape"]

_MNI = re.compile(r"mni:(\d+)(?:x(\d+)x(\d+))?")

_FIXED = 256 * 2**20


class MemoryRefused(UserError):
    """The run would not fit; the message names what would."""


def available_memory(n_used: int) -> tuple[int, str]:
    """(bytes one device may use, where they come from) for a run over ``n_used`` devices."""
    import jax

    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    import psutil

    free = psutil.virtual_memory().available
    n_used = min(n_used, jax.local_device_count())  # several processes: only this one's devices share its RAM
    share = f", shared by {n_used} CPU devices" if n_used > 1 else ""
    return free // max(1, n_used), f"{free / 2**30:.1f} GiB of available host RAM{share}"


def _voxels(shape, spec, multiple: int, batch: int) -> int:
    from workbench.mesh import ShardLayout

    layout = ShardLayout(tuple(shape), spec, multiple=multiple)
    return math.prod(layout.padded_shape) // max(1, spec.n_spatial) * max(1, batch // spec.data)


def check_memory(config, shape, spec, *, train=False, batch=1, backend="explicit", halo="exact", budget=None,
                 planner=None) -> dict:  # fmt: skip
    """Raise :class:`MemoryRefused` if the run would not fit; returns how it was decided.

    ``budget``: bytes per device (default :func:`available_memory`); ``planner``: a
    :class:`~workbench.app.planning.PlanKey` → stats function (default ``plan_bytes``).
    """
    from workbench.app.planning import PlanKey, format_bytes, plan_bytes

    spec = spec if spec is not None else _default_spec()
    where = "the given budget"
    if budget is None:
        budget, where = available_memory(spec.n_devices)
    item = 2 if str(config.dtype) == "bfloat16" else 4
    v = _voxels(shape, spec, config.multiple, batch)
    feature = v * config.base_filters
    upper = (128 if train else 32) * feature * 4 + _FIXED
    lower = (4 if train else 2) * feature * item
    if upper <= budget / 2:
        return {"decided_by": "upper bound", "bytes": upper, "budget": budget}
    if lower > budget:
        need, how = lower, "at least"
    else:
        need = planner_bytes = (planner or plan_bytes)(
            PlanKey(config, tuple(shape), spec, backend, halo, train, batch)
        )["peak"]
        how = "the planner's"
        if planner_bytes <= budget:
            return {"decided_by": "planner", "bytes": need, "budget": budget}
    raise MemoryRefused(
        f"this {'training' if train else 'inference'} run needs {how} {format_bytes(need)} per device "
        f"but {format_bytes(budget)} is available ({where}); {_what_fits(config, shape, spec, train, need, budget)}"
        ", or pass --force to run anyway"
    )


def _default_spec():
    from workbench.mesh import MeshSpec

    return MeshSpec()


def _what_fits(config, shape, spec, train, need, budget) -> str:
    """The cheapest changes that would fit, by the planner's scaling (memory ∝ voxels per device)."""
    import jax

    ratio = need / budget
    options = []
    if jax.local_devices()[0].platform != "cpu":
        devices = spec.n_spatial * 2 ** math.ceil(math.log2(ratio))
        options.append(f"a mesh of {devices} or more devices (`workbench plan --budget-gib` names the smallest)")
    if str(config.dtype) != "bfloat16" and ratio <= 2:
        options.append("--dtype bfloat16")
    if train and not config.remat and ratio <= 2:
        options.append("--remat")
    side = int(min(shape) / ratio ** (1 / 3)) // config.multiple * config.multiple
    if side >= config.multiple:
        options.append(f"a smaller volume (about {side}³)")
    return "use " + " or ".join(options) if options else "use a smaller volume or more devices"


# -- shapes known before anything is read --------------------------------------------------------
def input_shape(source, *, series: str | None = None) -> tuple[int, int, int] | None:
    """The (Z, Y, X) shape :func:`workbench.app.load_volume` would give ``source`` (a spec or
    path), from the spec or the file's headers only; None when that cannot tell it (an
    array, a file whose headers do not read: loading it then names the problem)."""
    from data_tools.errors import DataError
    from workbench.app.volumes import parse_phantom_spec

    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        phantom = parse_phantom_spec(source) if isinstance(source, str) else None
        if phantom is not None:
            return phantom[0] or (32, 32, 32)  # load_volume's default phantom
        mni = _MNI.fullmatch(str(source).strip().lower()) if isinstance(source, str) else None
        if mni is not None:  # resampled: the native MNI is not read to know it
            n = int(mni.group(1))
            return (n, n, n) if mni.group(2) is None else (n, int(mni.group(2)), int(mni.group(3)))
        from data_tools.io import volume_info

        shape = tuple(int(s) for s in volume_info(source, series=series).shape)  # mni: the native template, 35 MB
        return shape if len(shape) == 3 and min(shape) > 0 else None
    except (DataError, UserError, OSError, ValueError):
        return None


def training_shape(tc) -> tuple[tuple[int, int, int], int | None] | None:
    """(volume shape, number of classes or None) that ``workbench train`` config ``tc`` will
    train on, from its ``--data`` spec, a dataset's headers, or volume files' headers (as
    :func:`workbench.training.datasets.make_source` will make them); None when that cannot
    tell (the source then reports its own problem when it loads)."""
    from data_tools.errors import DataError

    data, n = tc.data, tc.resolution
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    try:
        if len(items) == 1 and isinstance(items[0], str):
            spec = items[0].strip().lower()
            if spec == "phantom" or spec.startswith("phantom:"):
                render = int(spec.split(":")[1]) if ":" in spec else (n or 64)
                return ((n or render),) * 3, 3
            if spec == "mni" or spec.startswith("mni:"):
                from data_tools.samples import MNI_CLASS_NAMES

                shape = (n,) * 3 if n else ((64,) * 3 if spec == "mni" else input_shape(spec))
                return (shape, len(MNI_CLASS_NAMES)) if shape else None
        if not all(isinstance(i, (str, os.PathLike)) for i in items):
            return None
        from data_tools.datasets import is_dataset

        if len(items) == 1 and is_dataset(items[0]):
            return _dataset_shape(items[0], tc)
        shapes = {input_shape(i) for i in items}
        if None in shapes or (len(shapes) != 1 and not n):
            return None
        return ((n,) * 3 if n else shapes.pop()), None
    except (DataError, UserError, OSError, ValueError, IndexError):
        return None


def _dataset_shape(path, tc):
    """A dataset's training grid from its images' headers (the plan of
    :func:`workbench.training.datasets.plan_preprocessing`), and its number of classes."""
    from data_tools.datasets import open_dataset
    from data_tools.io import volume_info
    from workbench.training.datasets import plan_preprocessing

    dataset = open_dataset(path)
    train, val = dataset.split(tc.fold)
    infos = [volume_info(case.images[0]) for case in train + val]
    plan = plan_preprocessing(infos, spacing=tc.spacing, resolution=tc.resolution)
    return tuple(plan.shape), len(dataset.class_names)
