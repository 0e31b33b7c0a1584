"""Resolve the model a run uses, and say where its weights came from.

One function answers "which weights?" for every front end: a preset with random weights,
the shipped trained weights of the ``small`` preset (phantom or MNI task), a ``.msgpack``
weights file, or a training folder / its checkpoints. The answer carries a one-line
description for reports and status lines (``report.json``'s ``weights``).

Example
-------
>>> choice = resolve_model("small", task="phantom")
>>> choice.description
'shipped phantom weights (phantom_small.msgpack)'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from workbench.errors import UserError
from workbench.options import PRESETS

__all__ = ["ModelChoice", "resolve_model", "task_for_input", "check_preset_matches"]


@dataclass(frozen=True)
class ModelChoice:
    """A model and the provenance of its weights."""

    model: Any  # workbench.model.unet.Model
    source: str  # "random" | "shipped" | "checkpoint"
    description: str  # one line for reports: where the weights came from
    window: tuple | None = None  # the patch a patch-trained checkpoint is predicted with (sliding windows)

    @property
    def config(self):
        return self.model.config


def task_for_input(source) -> str:
    """The shipped model's task that suits an input: ``mni`` for brain MRI (``mni``, NIfTI
    volumes), else ``phantom`` (also for a volume whose ``metadata["modality"]`` is CT, such
    as a dataset's CT case). ``source`` is an input spec string or a ``Volume``."""
    if hasattr(source, "source_format"):
        if str(source.metadata.get("modality", "")).upper() == "CT":
            return "phantom"
        return "mni" if source.source_format in ("mni", "nifti") else "phantom"
    return "mni" if str(source).strip().lower().startswith("mni") else "phantom"


def resolve_model(
    preset: str = "small",
    *,
    checkpoint: str | os.PathLike | None = None,
    task: str = "phantom",
    random_weights: bool = False,
    seed: int = 0,
    dtype: str | None = None,
    remat: bool | None = None,
    log=print,
) -> ModelChoice:
    """The model a run uses: ``checkpoint`` if given, else the shipped weights of the
    ``small`` preset for ``task``, else random weights of ``preset`` from ``seed``.

    ``dtype`` and ``remat`` change how the model computes, not its parameters, so they
    apply to trained weights too.
    """
    from workbench.model.unet import Model, UNetConfig
    from workbench.training.checkpoint import PRETRAINED, WEIGHTS_DIR, load_model, pretrained

    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; use one of {sorted(PRESETS)}")
    overrides = {k: v for k, v in (("dtype", dtype), ("remat", remat)) if v is not None}
    if checkpoint:
        from workbench.training.patches import trained_window

        model, meta = load_model(checkpoint, log=log)
        step = meta.get("step")
        description = f"checkpoint {checkpoint}" + (f" (step {step})" if step is not None else "")
        return ModelChoice(_with(model, overrides), "checkpoint", description, trained_window(meta))
    if preset == "small" and not random_weights and (WEIGHTS_DIR / PRETRAINED[task]).is_file():
        return ModelChoice(
            _with(pretrained(task), overrides), "shipped", f"shipped {task} weights ({PRETRAINED[task]})"
        )
    config = UNetConfig.preset(preset, **overrides)
    return ModelChoice(Model.init(config, seed=seed), "random", f"random (seed {seed})")


# The fields of a preset that define the architecture (dtype computes, num_classes follows the data).
_ARCHITECTURE = ("depth", "base_filters", "convs_per_block", "norm", "activation")


def check_preset_matches(preset: str, config, checkpoint) -> None:
    """Raise one :class:`UserError` when ``--model preset`` names another architecture than
    the model in ``--checkpoint`` (whose own configuration is what runs)."""
    from workbench.model.unet import PRESETS

    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; use one of {sorted(PRESETS)}")
    differ = [f for f in _ARCHITECTURE if f in PRESETS[preset] and PRESETS[preset][f] != getattr(config, f)]
    if differ:
        theirs = ", ".join(f"{f} {PRESETS[preset][f]}" for f in differ)
        ours = ", ".join(f"{f} {getattr(config, f)}" for f in differ)
        raise UserError(
            f"--model {preset} ({theirs}) is not the model in --checkpoint {checkpoint} ({ours}); "
            "drop --model: a checkpoint carries its own configuration"
        )


def _with(model, overrides: dict):
    if not overrides:
        return model
    return type(model)(model.config.replace(**overrides), model.variables)
