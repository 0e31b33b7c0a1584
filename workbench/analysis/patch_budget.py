"""The training patch of one plan's network under a per-device memory budget.

nnU-Net picks its patch and its network together: it starts from a box of 256³ voxels
shaped like the target spacing, clipped to the median shape, and shrinks the axis that is
largest relative to the median shape until its static estimate fits the GPU's reference
(:func:`~workbench.analysis.nnunet_rules.nnunet_configuration`). Here the network is fixed
(the plan's, the one the whole-volume arm trains), so :func:`plan_patch` keeps that rule and
changes two things:

* the patch stays a multiple of the network's per-axis size multiple (``spec.multiple``:
  the product of the strides), so it shrinks by one multiple at a time and the network is
  the same on a patch as on the volume;
* "fits" is the **compiled** training step's per-device memory (XLA's ``memory_analysis``
  of ``workbench train --plans``'s step with ``batch`` patches on one device,
  :func:`~workbench.analysis.nnunet_memory.spec_memory`), not nnU-Net's estimate, against
  a budget in bytes: e.g. what the whole-volume arm's step needs per device on its mesh.

The start is nnU-Net's initial patch (256³ voxels shaped by the inverse spacing, clipped to
the median shape) rounded up to the multiple; each round takes the axis with the largest
``patch / median`` (ties: the last axis, as nnU-Net's ``argsort(...)[-1]``) among those
still above one multiple, and removes one multiple from it. The result is the first patch
that fits; the one before it (one multiple larger on the axis last shrunk) did not. A budget
that not even the smallest patch (one multiple per axis) meets is one
:class:`PatchBudgetError`.

Example
-------
>>> spec = NetworkSpec.from_nnunet_arch(...)                                   # doctest: +SKIP
>>> p = plan_patch(spec, (32, 32, 32), budget_bytes=40 * 2**20, batch=2)     # doctest: +SKIP
>>> p["patch"], p["tried"][-2]["fits"]                                       # doctest: +SKIP
([16, 16, 16], False)
"""

from __future__ import annotations

import numpy as np

from workbench.analysis.nnunet_rules import initial_patch_shape
from workbench.errors import UserError

__all__ = ["PatchBudgetError", "initial_patch", "shrink_axis", "plan_patch", "compiled_step_bytes"]


class PatchBudgetError(UserError):
    """Not even the smallest patch of the network (one size multiple per axis) fits the budget."""


def _round_up(n: float, m: int) -> int:
    return int(-(-int(np.ceil(n)) // m) * m)


def initial_patch(shape, multiple, spacing=None) -> list[int]:
    """nnU-Net's initial patch: 256³ voxels shaped like the inverse ``spacing`` (isotropic
    when None), clipped to ``shape`` (the median volume), rounded up to ``multiple``."""
    spacing = [1.0] * 3 if spacing is None else [float(s) for s in spacing]
    return [_round_up(n, m) for n, m in zip(initial_patch_shape(spacing, shape), multiple)]


def shrink_axis(patch, shape, multiple) -> int | None:
    """The axis nnU-Net shrinks next: the largest ``patch / shape`` among the axes still
    above one ``multiple`` (ties: the last); None when every axis is at one multiple."""
    ratios = [p / n if p > m else -1.0 for p, n, m in zip(patch, shape, multiple)]
    if max(ratios) < 0:
        return None
    return int(np.argsort(ratios, kind="stable")[-1])


def compiled_step_bytes(spec, patch, *, batch: int, dtype: str = "float32") -> int:
    """Per-device bytes of the compiled ``workbench train --plans`` step of ``spec`` on
    ``batch`` patches of ``patch`` on one device (XLA's ``memory_analysis``)."""
    from workbench.analysis.nnunet_memory import spec_memory

    return int(spec_memory(spec, tuple(patch), "1x1x1", train=True, dtype=dtype, batch=batch)["bytes_per_device"])


def plan_patch(spec, shape, budget_bytes: int, *, spacing=None, batch: int = 2, dtype: str = "float32",
               measure=None, log=None) -> dict:  # fmt: skip
    """The largest patch of ``spec`` (nnU-Net's shrinking order, multiples of ``spec.multiple``)
    whose compiled training step with ``batch`` patches fits ``budget_bytes`` on one device.

    ``shape`` is the median volume (Z, Y, X, after the plan's transposition), ``spacing`` its
    target spacing. ``measure(patch) -> bytes`` replaces the compiled figure (default
    :func:`compiled_step_bytes`). Returns ``{"patch", "batch", "bytes_per_device",
    "budget_bytes", "multiple", "start", "tried": [{"patch", "bytes_per_device", "fits"}, ...]}``
    (``tried`` in order: every entry but the last is over the budget)."""
    multiple = tuple(int(m) for m in spec.multiple)
    shape = tuple(int(n) for n in shape)
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float, np.integer)) or budget_bytes <= 0:
        raise UserError(f"budget {budget_bytes!r} must be a positive number of bytes per device (e.g. 2**30 for 1 GiB)")
    if int(batch) < 1:
        raise UserError(f"batch {batch!r} must be >= 1 patch per step")
    if measure is None:
        measure = lambda p: compiled_step_bytes(spec, p, batch=int(batch), dtype=dtype)  # noqa: E731
    patch = initial_patch(shape, multiple, spacing)
    start, tried = list(patch), []
    while True:
        need = int(measure(tuple(patch)))
        tried.append({"patch": list(patch), "bytes_per_device": need, "fits": need <= budget_bytes})
        if log:
            log(f"  patch {'x'.join(map(str, patch))} x {batch}: {need / 2**20:.1f} MiB/device")
        if need <= budget_bytes:
            break
        axis = shrink_axis(patch, shape, multiple)
        if axis is None:
            raise PatchBudgetError(
                f"not even the smallest patch of this network ({'x'.join(map(str, patch))}, one size multiple per "
                f"axis) fits the budget: its training step with batch {batch} needs {need / 2**20:.1f} MiB per "
                f"device against {budget_bytes / 2**20:.1f} MiB; raise the budget (--budget-gib) to at least "
                f"{need / 2**30:.3g} GiB or lower the batch"
            )
        patch[axis] -= multiple[axis]
    return {"patch": list(patch), "batch": int(batch), "bytes_per_device": tried[-1]["bytes_per_device"],
            "budget_bytes": int(budget_bytes), "multiple": list(multiple), "start": start, "tried": tried}  # fmt: skip
