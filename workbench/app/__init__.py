"""The application layer: what the CLI, the notebook panel, the napari plugin, the
benchmarks and the notebooks call.

* :func:`resolve_model` (:mod:`~workbench.app.models`): a preset, the shipped weights, a
  weights file or a training folder, with where the weights came from.
* :func:`load_volume` (:mod:`~workbench.app.volumes`): a volume and the image the model reads.
* :func:`infer` (:mod:`~workbench.app.inference`): a partitioned run, optionally compared
  with the single-device reference.
* :func:`write_result` / :func:`load_result` (:mod:`~workbench.app.results`): result
  folders and the one ``report.json`` schema.
* :class:`MemoryEstimator`, :func:`plan_bytes`, :func:`memory_table`
  (:mod:`~workbench.app.planning`): per-device memory before anything runs.
* :func:`train` and :class:`TrainConfig`: training runs (:mod:`workbench.training`).
* :func:`predict_nnunet`, :func:`write_nnunet_result` (:mod:`~workbench.app.nnunet`): an
  nnU-Net training folder's model on one case, with nnU-Net's pre- and post-processing.
* :func:`evaluate_dataset`, :func:`dataset_cases` (:mod:`~workbench.app.evaluation`): a
  model scored on a dataset folder's validation fold or test cases.

Imported lazily: ``import workbench.app`` starts no JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelChoice": "models",
    "resolve_model": "models",
    "task_for_input": "models",
    "LoadedVolume": "volumes",
    "load_volume": "volumes",
    "Inference": "inference",
    "infer": "inference",
    "check_run_options": "inference",
    "guard_input": "inference",
    "build_report": "results",
    "summary_line": "results",
    "staged_output": "results",
    "check_output_folder": "results",
    "write_result": "results",
    "write_result_files": "results",
    "write_report": "results",
    "ResultFolder": "results",
    "load_result": "results",
    "REPORT_KEYS": "results",
    "PlanKey": "planning",
    "plan_bytes": "planning",
    "MemoryEstimator": "planning",
    "memory_table": "planning",
    "memory_vs_devices": "planning",
    "smallest_fitting": "planning",
    "table_text": "planning",
    "format_bytes": "planning",
    "fits_line": "planning",
    "train": "training",
    "evaluate_dataset": "evaluation",
    "dataset_cases": "evaluation",
    "TrainConfig": "training",
    "predict_nnunet": "nnunet",
    "write_nnunet_result": "nnunet",
    "NNUNetPrediction": "nnunet",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workbench.app' has no attribute {name!r}")
    module = importlib.import_module(f"workbench.app.{_EXPORTS[name]}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
