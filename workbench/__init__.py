"""Partitioned U-Net Workbench: 3D U-Nets on full-resolution volumes, partitioned over a
JAX device mesh with exact halo exchange.

The small public API, imported lazily (``import workbench`` starts no JAX)::

    import workbench as wb
    model = wb.Model.init("small")
    logits = wb.apply(model, volume, "2x2x2")             # == wb.apply(model, volume, backend="reference")
    run = wb.infer(wb.resolve_model("small"), wb.load_volume("phantom:64"), "2x2x2", reference=True)
    run.report["max_abs_diff"]
    wb.viewer(run)                                        # in a notebook: the slices, overlays and shards

Layers (imports flow one way): ``mesh``/``options``/``errors`` → ``model`` → ``execute`` →
``training`` / ``analysis`` → ``app`` → ``ui`` / ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MeshSpec": "workbench.mesh",
    "ShardLayout": "workbench.mesh",
    "parse_mesh": "workbench.mesh",
    "UserError": "workbench.errors",
    "Model": "workbench.model.unet",
    "UNetConfig": "workbench.model.unet",
    "apply": "workbench.execute.run",
    "run": "workbench.execute.run",
    "plan": "workbench.analysis.plan",
    "compare": "workbench.analysis.compare",
    "resolve_model": "workbench.app",
    "load_volume": "workbench.app",
    "infer": "workbench.app",
    "load_result": "workbench.app",
    "write_result": "workbench.app",
    "train": "workbench.app",
    "TrainConfig": "workbench.app",
    "predict_nnunet": "workbench.app",
    "write_nnunet_result": "workbench.app",
    "viewer": "workbench.ui.notebook_viewer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
