"""Training: config, train state, partitioned step, loop, evaluation, checkpoints.

The public names, imported on first use (so ``workbench.training.config`` stays light):

=====================================================================  =====================================
``TrainConfig``, ``NonFiniteLossError``, ``PAPER_CLASS_WEIGHTS``,      :mod:`workbench.training.config`
``model_config``, ``add_train_flags``, ``train_config_from_flags``
``make_optimizer``, ``create_train_state``, ``abstract_train_state``,  :mod:`workbench.training.state`
``variables_of``
``TrainStep``, ``build_train_step``, ``compile_train_step``,           :mod:`workbench.training.step`
``put_batch``
``evaluate``                                                           :mod:`workbench.training.evaluation`
``plot_history``                                                       :mod:`workbench.training.history`
``train_and_evaluate``                                                 :mod:`workbench.training.loop`
``Checkpoints``, ``restore_model``, ``load_model``, ``save_weights``,  :mod:`workbench.training.checkpoint`
``load_weights``, ``pretrained``
``NNUNetConfig``, ``describe_model``, ``parse_model``,                 :mod:`workbench.training.models`
``check_same_model``, ``MODEL_SCHEMA``
``nnunet_loss``, ``LossSpec``, ``deep_supervision_weights``            :mod:`workbench.training.nnunet_losses`
=====================================================================  =====================================
"""

from __future__ import annotations

import importlib

_MODULES = {
    "config": (
        "TrainConfig",
        "NonFiniteLossError",
        "PAPER_CLASS_WEIGHTS",
        "model_config",
        "add_train_flags",
        "train_config_from_flags",
    ),
    "state": ("make_optimizer", "create_train_state", "abstract_train_state", "variables_of"),
    "step": ("TrainStep", "build_train_step", "compile_train_step", "put_batch"),
    "evaluation": ("evaluate",),
    "history": ("plot_history",),
    "loop": ("train_and_evaluate",),
    "checkpoint": ("Checkpoints", "restore_model", "load_model", "save_weights", "load_weights", "pretrained"),
    "models": ("NNUNetConfig", "describe_model", "parse_model", "check_same_model", "MODEL_SCHEMA"),
    "nnunet_losses": ("nnunet_loss", "LossSpec", "deep_supervision_weights"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'workbench.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"workbench.training.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
