"""What the training loop needs for nnU-Net's planned networks beyond the paper U-Net's:
the data checked against the plan, the imported weights of a fine-tune, the output names.

Example
-------
>>> check_source(config, source, several=False)          # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np

from workbench.errors import UserError
from workbench.training.models import NNUNetConfig

__all__ = ["source_channels", "check_source", "nnunet_weights", "output_names"]


def source_channels(source) -> int:
    """The input channels of a training source's images (1 unless it says otherwise)."""
    for name in ("num_channels", "channels", "in_channels"):
        value = getattr(source, name, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list)):
            return len(value)
    return 1


def check_source(config: NNUNetConfig, source, several: bool) -> None:
    """The data must fit the plan: its channels are the plan's input channels, and (softmax)
    its classes the plan's outputs. One :class:`UserError` naming both sides otherwise."""
    spec = config.spec
    where = spec.source or "the plans"
    channels = source_channels(source)
    if channels != spec.in_channels:
        raise UserError(
            f"the data {source.description} has {channels} channel(s) but the network planned by {where} takes "
            f"{spec.in_channels} (its dataset.json's channel_names); train with the plans made for this dataset"
        )
    if spec.output_kind == "softmax" and source.num_classes != spec.num_outputs:
        raise UserError(
            f"the data {source.description} has {source.num_classes} classes ({', '.join(source.class_names)}) but "
            f"the network planned by {where} predicts {spec.num_outputs} ({', '.join(config.output_names)}); "
            "train with the plans made for this dataset"
        )
    if config.regions is not None:
        theirs = tuple(tuple(int(v) for v in values) for _, values in (getattr(source, "regions", None) or ()))
        if theirs != config.regions:
            raise UserError(
                f"the network planned by {where} predicts the regions {_regions_text(config.output_names, config.regions)} "
                f"but the data {source.description} has {_regions_text([n for n, _ in source.regions], theirs) if theirs else 'none'}; "
                "train with the plans made for this dataset"
            )
    if several:
        raise UserError(
            "training an nnU-Net network runs in one process for now (its held-out evaluation reads whole "
            "cases); run workbench train without launch / WORKBENCH_DISTRIBUTED"
        )


def _regions_text(names, regions) -> str:
    return ", ".join(f"{n} {list(r)}" for n, r in zip(names, regions))


def nnunet_weights(tc, config: NNUNetConfig) -> dict:
    """The ``{"params": ...}`` of the nnU-Net training folder ``tc.init_checkpoint``
    (``fold_<tc.weights_fold>``), as numpy float32 (the state is placed by the loop)."""
    import jax

    from workbench.model.nnunet import load_nnunet_folder

    model = load_nnunet_folder(tc.init_checkpoint, fold=tc.weights_fold, configuration=None)
    if model.spec != config.spec:  # the same plans.json: only a changed folder gets here
        raise UserError(
            f"the weights of {tc.init_checkpoint} fold {tc.weights_fold} are not those of its plans.json's network; "
            "pass an unchanged nnU-Net training folder"
        )
    return {"params": jax.tree.map(lambda a: np.asarray(a, np.float32), model.variables["params"])}


def output_names(config, source) -> tuple[str, ...]:
    """The names of the model's outputs: the data's classes (paper U-Net), or the plan's
    classes / regions (nnU-Net)."""
    if isinstance(config, NNUNetConfig):
        return tuple(config.output_names)
    return tuple(source.class_names)
