"""What a training run is: :class:`TrainConfig`, the one schema of its options.

Each field carries its command-line flag in its metadata (``flag``, ``help``, ``type``,
``choices``); :func:`add_train_flags` turns the fields into ``workbench train``'s
flags (defaults are the dataclass defaults) and :func:`train_config_from_flags` builds
the config back from the parsed arguments, so the CLI cannot drift from the schema.
Choices come from :mod:`workbench.options`. Nothing here imports JAX.

Example
-------
>>> tc = TrainConfig(data="phantom", resolution=32, steps=4, model_overrides={"depth": 2})
>>> TrainConfig.from_dict(tc.as_dict()) == tc
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from workbench.errors import UserError
from workbench.options import BACKENDS, COMM_OVERLAP, DTYPES, NORMS, OPTIMIZERS, PRESETS, SCHEDULES

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "PAPER_CLASS_WEIGHTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "model_config",
    "add_train_flags",
    "train_config_from_flags",
    "FLAGLESS_FIELDS",
]

PAPER_CLASS_WEIGHTS = (1.0, 8.0, 16.0)  # background, organ, lesion (Hou et al.)


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


# -- argparse types of the flags (plain functions: argparse is imported only by the CLI) --------
def _argument_error(message: str):
    import argparse

    return argparse.ArgumentTypeError(message)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise _argument_error(f"{text!r} is not an integer") from None
    if value < 1:
        raise _argument_error(f"{value} must be >= 1")
    return value


def positive_float(text: str) -> float:
    """A number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise _argument_error(f"{text!r} is not a number") from None
    if not value > 0:
        raise _argument_error(f"{value} must be > 0")
    return value


def parse_class_weights(text: str) -> tuple:
    """``1,8,16``: one cross-entropy weight per class, >= 0 and not all zero."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise _argument_error(f"{text!r} is not a comma-separated list of numbers, e.g. 1,8,16") from None
    if not all(v >= 0 for v in values) or not any(v > 0 for v in values):
        raise _argument_error(f"{text!r}: class weights must be >= 0 and not all zero")
    return values


def parse_dice_classes(text: str) -> tuple:
    """``2`` or ``1,2``: the foreground classes the Dice loss averages over (>= 1)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise _argument_error(f"{text!r} is not a comma-separated list of class indices, e.g. 2 or 1,2") from None
    if not values or not all(v >= 1 for v in values) or len(set(values)) != len(values):
        raise _argument_error(f"{text!r}: Dice classes must be distinct foreground classes (>= 1), e.g. 2 or 1,2")
    return values


def parse_spacing(text: str) -> tuple:
    """``1.5`` or ``2.5,1,1``: a target voxel spacing in mm (dz, dy, dx), each > 0."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise _argument_error(f"{text!r} is not a spacing in mm, e.g. 1.5 or 2.5,1,1") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) and v > 0 for v in values):
        raise _argument_error(f"{text!r}: give one or three positive numbers (mm), e.g. 1.5 or 2.5,1,1")
    return values * 3 if len(values) == 1 else values


def parse_patch(text: str) -> tuple:
    """``24x24x24`` (or ``24``): a training patch ZxYxX in voxels, each >= 1."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        raise _argument_error(f"{text!r} is not a patch size; write ZxYxX in voxels, e.g. 24x32x32") from None
    if len(values) not in (1, 3) or not all(v >= 1 for v in values):
        raise _argument_error(f"{text!r}: give one or three positive voxel counts, e.g. 24 or 24x32x32")
    return values * 3 if len(values) == 1 else values


def _option(default, help: str, *, flag: str | None = None, type=None, choices=None, **more):
    """A field with its flag: ``help`` may say ``{choices}`` (joined by `` | ``)."""
    metadata = {"help": help, "flag": flag, "type": type, "choices": choices, **more}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=dict, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    """One training run (JSON-able via :meth:`as_dict`). Derived values are properties."""

    data: Any = _option(
        "phantom",
        "phantom[:N] (fresh synthetic phantoms rendered at N³), mni[:N], a dataset folder (MSD / nnU-Net: "
        "dataset.json, imagesTr/, labelsTr/) or labelled volume paths (default phantom)",
        nargs="+",
    )
    resolution: int | None = _option(
        None, "resample every volume to N³ (default: the data's own size; phantom: 64)", type=positive_int
    )
    spacing: tuple | None = _option(
        None,
        "dataset folder: resample every case to this spacing in mm, S or DZ,DY,DX (default: the median spacing)",
        type=parse_spacing,
    )
    fold: int = _option(0, "dataset folder: cross-validation fold 0..4 to hold out (default 0)", type=int)
    mesh: str = _option("2x2x2", "ZxYxX or data=D,z=Z,y=Y,x=X (default 2x2x2)")
    data_parallel: int = _option(1, "size of the data axis (default 1)", type=positive_int)
    backend: str = _option("explicit", "{choices} (default explicit)", choices=BACKENDS)
    comm_overlap: str = _option(
        "auto",
        "explicit backend: compute each convolution's interior while its halos travel, then the boundary "
        "shells: {choices} (default auto: off until a GPU measurement shows the split pays; see README)",
        choices=COMM_OVERLAP,
    )
    model: str = _option("small", "model preset: {choices} (default small)", choices=PRESETS)
    plans: str | None = _option(
        None,
        "train nnU-Net's planned network of this plans file instead of a preset (nnUNetPlans.json with its "
        "dataset.json beside it, or one written by workbench plan)",
    )
    configuration: str = _option("3d_fullres", "the plans' configuration (default 3d_fullres)")
    init_checkpoint: str | None = _option(
        None,
        "fine-tune an nnU-Net model: its training folder (…/Trainer__Plans__3d_fullres: plans, dataset.json, "
        "fold_K/checkpoint_final.pth)",
        flag="--checkpoint",
    )
    weights_fold: str = _option("0", "with --checkpoint: the fold whose weights to start from (default 0)")
    # Fields of the preset to change; set by the flags in _MODEL_OVERRIDE_FLAGS.
    model_overrides: dict = _option({}, "", flag=False)
    steps: int = _option(100, "training steps (default 100)", type=positive_int)
    batch: int = _option(1, "volumes per step (default 1)", type=positive_int)
    optimizer: str = _option("adam", "{choices} (default adam)", choices=OPTIMIZERS)
    learning_rate: float = _option(3e-3, "peak learning rate (default 3e-3)", flag="--lr", type=positive_float)
    schedule: str = _option("constant", "{choices} (default constant)", choices=SCHEDULES)
    warmup_steps: int = _option(0, "warmup steps of warmup_cosine (default 0: steps / 20)", type=int)
    clip_norm: float = _option(1.0, "global-norm gradient clip, 0 = off (default 1)", flag="--clip", type=float)
    class_weights: tuple | None = _option(
        None,
        "cross-entropy weight per class, e.g. 1,8,16 (default: 1,8,16 for phantoms as the paper, else all 1)",
        type=parse_class_weights,
    )
    dice_weight: float = _option(0.2, "loss = CE + w × Dice loss (default 0.2)", type=float)
    dice_classes: tuple | None = _option(
        None,
        "foreground classes the Dice loss averages over, e.g. 2 (the paper: lesion only; default: all)",
        type=parse_dice_classes,
    )
    patch: tuple | None = _option(
        None,
        "train on patches ZxYxX cropped from the cases as nnU-Net does (predicted by Gaussian sliding "
        "windows, step half a patch; default: whole volumes)",
        type=parse_patch,
    )
    foreground_oversampling: float = _option(
        0.33, "with --patch: the fraction of each batch forced to hold foreground (nnU-Net's 0.33)", type=float
    )
    augment: bool = _option(True, "turn flips/rotations/intensity/noise off", flag="--no-augment", action="store_false")
    checkpoint_every: int = _option(50, "steps between checkpoints", type=positive_int)
    keep: int = _option(3, "checkpoints to keep (default 3)", type=positive_int)
    eval_every: int = _option(0, "evaluate on held-out cases every E steps", type=int)
    eval_cases: int = _option(4, "held-out cases to evaluate (default 4)", type=int)
    seed: int = _option(0, "seed of weights, dropout and augmentation", type=int)

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise UserError(msg)

        check(isinstance(self.steps, int) and self.steps >= 1, f"steps={self.steps!r} must be an integer >= 1")
        check(isinstance(self.batch, int) and 1 <= self.batch <= 64, f"batch={self.batch!r} must be in 1..64")
        check(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}; use one of {OPTIMIZERS}")
        check(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; use one of {SCHEDULES}")
        check(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            f"learning_rate={self.learning_rate!r} must be a positive number",
        )
        check(self.backend in BACKENDS, f"backend={self.backend!r}; use {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
        check(self.comm_overlap in COMM_OVERLAP, f"comm_overlap={self.comm_overlap!r}; use one of {COMM_OVERLAP}")
        check(self.model in PRESETS, f"model={self.model!r} is not a preset; use one of {', '.join(PRESETS)}")
        check(
            isinstance(self.data_parallel, int) and self.data_parallel >= 1,
            f"data_parallel={self.data_parallel!r} must be an integer >= 1",
        )
        check(
            self.batch % self.data_parallel == 0,
            f"batch {self.batch} does not split over data-parallel {self.data_parallel}; "
            f"use a batch that is a multiple of {self.data_parallel}",
        )
        check(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"warmup_steps={self.warmup_steps!r} must be an integer >= 0",
        )
        check(self.checkpoint_every >= 1 and self.keep >= 1, "checkpoint_every and keep must be >= 1")
        check(self.eval_every >= 0 and self.eval_cases >= 0, "eval_every and eval_cases must be >= 0")
        check(self.dice_weight >= 0 and self.clip_norm >= 0, "dice_weight and clip_norm must be >= 0")
        check(isinstance(self.fold, int) and self.fold >= 0, f"fold={self.fold!r} must be an integer >= 0")
        nnunet = "--plans" if self.plans else "--checkpoint" if self.init_checkpoint else None
        check(
            not (self.plans and self.init_checkpoint),
            "pass --plans or --checkpoint, not both: an nnU-Net training folder has its own plans",
        )
        if nnunet:
            check(
                self.model == "small" and set(self.model_overrides) <= {"dtype"},
                f"{nnunet} chooses the network: drop --model and the preset options "
                f"({', '.join(sorted(set(self.model_overrides) - {'dtype'})) or '--model'}), or drop {nnunet}",
            )
            check(
                self.class_weights is None and self.dice_classes is None,
                f"{nnunet} trains with nnU-Net's loss (Dice + cross-entropy, 1:1): drop --class-weights and "
                "--dice-classes, which weigh the paper U-Net's loss",
            )
        check(
            self.spacing is None or self.resolution is None,
            "pass spacing or resolution, not both (a target voxel size in mm, or N³ voxels)",
        )
        if self.patch is not None:
            patch = tuple(self.patch) if not isinstance(self.patch, int) else (self.patch,) * 3
            check(
                len(patch) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in patch),
                f"patch={self.patch!r} must be three positive voxel counts (Z, Y, X), e.g. (24, 32, 32)",
            )
            object.__setattr__(self, "patch", patch)
        check(
            isinstance(self.foreground_oversampling, (int, float)) and 0 <= self.foreground_oversampling <= 1,
            f"foreground_oversampling={self.foreground_oversampling!r} must be in [0, 1] (nnU-Net's default is 0.33)",
        )
        if self.spacing is not None:
            spacing = tuple(self.spacing)
            check(
                len(spacing) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in spacing),
                f"spacing={self.spacing!r} must be three positive numbers (mm), e.g. (2.5, 1.0, 1.0)",
            )
            object.__setattr__(self, "spacing", tuple(float(v) for v in spacing))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = self.data if isinstance(self.data, str) else [str(getattr(v, "path", v)) for v in self.data]
        d["class_weights"] = None if self.class_weights is None else list(self.class_weights)
        d["dice_classes"] = None if self.dice_classes is None else list(self.dice_classes)
        d["spacing"] = None if self.spacing is None else list(self.spacing)
        d["patch"] = None if self.patch is None else list(self.patch)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config :meth:`as_dict` wrote (a checkpoint's meta); keys of other versions are ignored."""
        d = dict(d)
        if d.get("class_weights") is not None:
            d["class_weights"] = tuple(d["class_weights"])
        if d.get("dice_classes") is not None:
            d["dice_classes"] = tuple(int(c) for c in d["dice_classes"])
        if d.get("spacing") is not None:
            d["spacing"] = tuple(d["spacing"])
        if d.get("patch") is not None:
            d["patch"] = tuple(int(v) for v in d["patch"])
        if isinstance(d.get("data"), list):
            d["data"] = tuple(d["data"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def mesh_spec(self):
        from workbench.mesh import MeshSpec, parse_mesh

        spec = parse_mesh(self.mesh)
        if self.data_parallel > 1:
            if spec.data not in (1, self.data_parallel):
                raise UserError(f"mesh {self.mesh} has data={spec.data} but data_parallel={self.data_parallel}")
            spec = MeshSpec(spec.z, spec.y, spec.x, data=self.data_parallel)
        return spec


def model_config(tc: TrainConfig, num_classes: int, in_channels: int = 1):
    """The model config of ``tc`` for data with ``num_classes`` and ``in_channels``: the preset's
    :class:`~workbench.model.unet.UNetConfig`, or with ``plans`` / ``init_checkpoint`` the
    :class:`~workbench.training.models.NNUNetConfig` of nnU-Net's plans (its outputs are the
    plans' dataset.json's, checked against the data by the loop)."""
    if tc.plans or tc.init_checkpoint:
        from workbench.training.models import nnunet_config

        return nnunet_config(nnunet_plans_file(tc), dtype=tc.model_overrides.get("dtype", "float32"))
    from workbench.model.unet import UNetConfig

    return UNetConfig.preset(tc.model, **{"num_classes": num_classes, "in_channels": in_channels, **tc.model_overrides})


def nnunet_plans_file(tc: TrainConfig):
    """The :class:`~workbench.model.nnunet_plans.PlansFile` of ``--plans`` or of the
    ``--checkpoint`` training folder (its ``plans.json`` with its ``dataset.json``)."""
    import os

    from workbench.model.nnunet_plans import load_plans_file

    if tc.plans:
        return load_plans_file(tc.plans, tc.configuration)
    from workbench.errors import InputNotFoundError

    folder = tc.init_checkpoint
    missing = [n for n in ("plans.json", "dataset.json") if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise InputNotFoundError(
            f"--checkpoint {folder} is not an nnU-Net training folder (it lacks {' and '.join(missing)}); pass the "
            "folder nnU-Net trained into (…/DatasetXXX/Trainer__Plans__3d_fullres), or --plans to train from scratch"
        )
    return load_plans_file(os.path.join(tc.init_checkpoint, "plans.json"), _folder_configuration(tc))


def _folder_configuration(tc: TrainConfig) -> str:
    """An nnU-Net training folder's configuration: the last part of ``Trainer__Plans__Configuration``."""
    import os
    import re

    match = re.fullmatch(r".+__.+__(.+)", os.path.basename(os.path.normpath(tc.init_checkpoint)))
    return match.group(1) if match else tc.configuration


# -- the command-line flags, derived from the fields ---------------------------------------------
# Fields without a flag of their own: model_overrides is set by the flags below.
FLAGLESS_FIELDS = ("model_overrides",)
# Flags that change one field of the preset (model_overrides); None = the preset's value.
_MODEL_OVERRIDE_FLAGS = (
    ("--norm", "norm", dict(default=None, choices=NORMS, help="{choices} (default: the preset's)")),
    ("--dtype", "dtype", dict(default=None, choices=DTYPES[:2], help="{choices} compute (default: the preset's)")),
    ("--remat", "remat", dict(action="store_true", help="rematerialise activations per U-Net level")),
)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _help(text: str, choices) -> str:
    return text.format(choices=" | ".join(choices)) if choices else text


def train_flags() -> dict[str, str]:
    """{field name: flag} of every field that has one (``learning_rate`` → ``--lr`` ...)."""
    return {f.name: _flag(f) for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag") is not False}


def add_train_flags(parser) -> None:
    """One flag per :class:`TrainConfig` field (its default, type and help) and the
    ``--norm/--dtype/--remat`` model overrides. Choices are named in the help and
    checked by the config, so a bad value is one line, not a usage message."""
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta.get("flag") is False:
            continue
        kwargs = {"dest": f.name, "help": _help(meta["help"], meta.get("choices"))}
        if meta.get("action"):
            kwargs["action"] = meta["action"]
        else:
            # --model: None when not given, so that --model with --plans is refused
            kwargs["default"] = None if f.name == "model" else f.default
            for key in ("type", "nargs"):
                if meta.get(key) is not None:
                    kwargs[key] = meta[key]
        parser.add_argument(_flag(f), **kwargs)
    for flag, name, kwargs in _MODEL_OVERRIDE_FLAGS:
        kwargs = {**kwargs, "help": _help(kwargs["help"], kwargs.pop("choices", None))}
        parser.add_argument(flag, dest=name, **kwargs)


def train_config_from_flags(args) -> TrainConfig:
    """The :class:`TrainConfig` of arguments parsed with :func:`add_train_flags`."""
    values = {name: getattr(args, name) for name in train_flags()}
    nnunet = "--plans" if values["plans"] else "--checkpoint" if values["init_checkpoint"] else None
    if values["model"] is None:
        values["model"] = "small"
    elif nnunet:
        raise UserError(
            f"--model {values['model']} and {nnunet} both choose the network; pass one of them "
            f"({nnunet} trains nnU-Net's planned network, --model a paper U-Net preset)"
        )
    data = values["data"]
    if isinstance(data, (list, tuple)):
        values["data"] = data[0] if len(data) == 1 else tuple(data)
    overrides = {}
    for _, name, _kwargs in _MODEL_OVERRIDE_FLAGS:
        value = getattr(args, name)
        if value is not None and value is not False:
            overrides[name] = value
    return TrainConfig(**values, model_overrides=overrides)
