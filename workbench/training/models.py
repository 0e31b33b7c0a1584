"""What a training run trains: the paper U-Net (:class:`~workbench.model.unet.UNetConfig`) or an
nnU-Net planned network (:class:`NNUNetConfig`), and how a checkpoint describes it.

A checkpoint's ``model`` entry is ``{"schema": 2, "kind": "unet" | "nnunet", ...}``:
``unet`` carries the UNetConfig fields under ``config``; ``nnunet`` carries the whole
:class:`~workbench.model.spec.NetworkSpec` under ``spec`` (so the checkpoint is self-contained)
plus the loss settings (``regions``, ``batch_dice``), the compute ``dtype`` and, when the network
came from a plans file, the ``plans`` it was read from. Entries written before the schema
(the UNetConfig fields alone, main up to 54e522c) are read as ``unet``. :func:`parse_model`
turns an entry into a config (tuples, defaults for fields added later, unknown fields of
newer versions refused with one error), and checkpoints are compared as configs
(:func:`check_same_model`), not as dicts.

Example
-------
>>> from workbench.model.unet import UNetConfig
>>> parse_model(describe_model(UNetConfig(depth=2))) == UNetConfig(depth=2)
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from workbench.errors import UserError

__all__ = [
    "MODEL_SCHEMA",
    "CheckpointMismatchError",
    "NNUNetConfig",
    "nnunet_config",
    "describe_model",
    "parse_model",
    "check_same_model",
    "init_model",
    "model_with",
    "spec_to_dict",
    "spec_from_dict",
    "region_labels",
]

MODEL_SCHEMA = 2  # 1: the UNetConfig fields alone (no schema key)


class CheckpointMismatchError(UserError):
    """A checkpoint was written for another model configuration."""


@dataclass(frozen=True)
class NNUNetConfig:
    """An nnU-Net planned network as a training run's model config (hashable: the step cache
    is keyed by it). ``regions``: the label values of each region output (region plans);
    ``batch_dice``: the configuration's; ``plans``: where it came from (not compared)."""

    spec: Any  # NetworkSpec
    dtype: str = "float32"
    regions: tuple[tuple[int, ...], ...] | None = None
    batch_dice: bool = True
    plans: dict | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise UserError(f"dtype={self.dtype!r}; use float32 or bfloat16 (float64 for verification)")
        if self.spec.output_kind == "sigmoid":
            if not self.regions or len(self.regions) != self.spec.num_outputs:
                raise UserError(
                    f"the network has {self.spec.num_outputs} region outputs but {len(self.regions or ())} regions "
                    "are given; give dataset.json's labels (lists of label values) with regions_class_order"
                )

    kind = "nnunet"

    @property
    def in_channels(self) -> int:
        return self.spec.in_channels

    @property
    def num_classes(self) -> int:
        """Outputs: classes (softmax) or regions (sigmoid)."""
        return self.spec.num_outputs

    @property
    def multiple(self):
        return self.spec.multiple

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.spec.output_names or tuple(f"class{i}" for i in range(self.spec.num_outputs))

    def loss_spec(self):
        from workbench.training.nnunet_losses import LossSpec

        scales = tuple(layer.scale for layer in self.spec.outputs)
        return LossSpec(self.spec.output_kind, scales, self.regions, self.batch_dice)

    def as_dict(self) -> dict:
        return describe_model(self)

    def replace(self, **changes) -> NNUNetConfig:
        return dataclasses.replace(self, **changes)


def region_labels(dataset: dict) -> tuple[tuple[int, ...], ...] | None:
    """The label values of each foreground region of a dataset.json (in its order, as nnU-Net's
    LabelManager lists them), or None when its labels are plain classes."""
    labels = {k: v for k, v in (dataset.get("labels") or {}).items() if k != "ignore"}
    if not any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values()):
        return None
    out = []
    for name, value in labels.items():
        values = tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if set(values) != {0} and name != "background":
            out.append(values)
    return tuple(out)


def nnunet_config(plans_file, *, dtype: str = "float32") -> NNUNetConfig:
    """The config of a :class:`~workbench.model.nnunet_plans.PlansFile` (``load_plans_file``)."""
    regions = region_labels(plans_file.dataset)
    batch_dice = bool(plans_file.configuration.get("batch_dice", True))
    plans = {
        "plans": plans_file.plans,
        "dataset": plans_file.dataset,
        "configuration": plans_file.configuration_name,
        "path": str(plans_file.path),
    }
    return NNUNetConfig(plans_file.spec, dtype, regions, batch_dice, plans)


# -- the spec as JSON --------------------------------------------------------------------------------
def spec_to_dict(spec) -> dict:
    """Every field of a NetworkSpec, JSON-able (:func:`spec_from_dict` reads it back):
    :meth:`NetworkSpec.describe`'s architecture, without its derived figures, and the rest."""
    d = spec.describe()
    del d["multiple"], d["num_params"]
    order = spec.regions_class_order
    d.update(
        conv_bias=spec.conv_bias,
        norm_eps=spec.norm_eps,
        negative_slope=spec.negative_slope,
        output_names=list(spec.output_names),
        regions_class_order=None if order is None else list(order),
    )
    return d


def spec_from_dict(d: dict):
    from workbench.model.spec import NetworkSpec

    d = dict(d)
    build = NetworkSpec.plain if d.pop("network_class") == "PlainConvUNet" else NetworkSpec.residual
    order = d.pop("regions_class_order", None)
    return build(
        in_channels=int(d.pop("in_channels")),
        num_outputs=int(d.pop("num_outputs")),
        kernels=d.pop("kernels"),
        strides=d.pop("strides"),
        features=d.pop("features"),
        blocks=d.pop("blocks"),
        decoder_convs=d.pop("decoder_convs"),
        conv_bias=bool(d.pop("conv_bias", True)),
        norm_eps=float(d.pop("norm_eps", 1e-5)),
        negative_slope=float(d.pop("negative_slope", 0.01)),
        output_kind=d.pop("output_kind", "softmax"),
        output_names=tuple(d.pop("output_names", ())),
        regions_class_order=None if order is None else tuple(int(v) for v in order),
        source=d.pop("source", ""),
    )


# -- checkpoint entries ------------------------------------------------------------------------------
def describe_model(config) -> dict:
    """The checkpoint entry of a model config (see the module notes)."""
    if isinstance(config, NNUNetConfig):
        return {
            "schema": MODEL_SCHEMA,
            "kind": "nnunet",
            "spec": spec_to_dict(config.spec),
            "dtype": config.dtype,
            "regions": None if config.regions is None else [list(r) for r in config.regions],
            "batch_dice": config.batch_dice,
            "plans": config.plans,
        }
    return {"schema": MODEL_SCHEMA, "kind": "unet", "config": dataclasses.asdict(config)}


def parse_model(entry: dict, *, where: str = "the checkpoint"):
    """The config of a checkpoint's ``model`` entry (any schema so far); one error otherwise."""
    from workbench.model.unet import UNetConfig

    if not isinstance(entry, dict):
        raise UserError(f"{where} describes its model as {type(entry).__name__}; it is damaged, re-train it")
    schema = entry.get("schema", 1)
    if not isinstance(schema, int) or schema > MODEL_SCHEMA:
        raise UserError(
            f"{where} was written by a newer workbench (model schema {schema}; this one reads up to "
            f"{MODEL_SCHEMA}); update the workbench"
        )
    if schema == 1:
        entry = {"kind": "unet", "config": entry}
    kind = entry.get("kind")
    try:
        if kind == "unet":
            fields = {f.name for f in dataclasses.fields(UNetConfig)}
            config = entry.get("config") or {}
            unknown = sorted(set(config) - fields)
            if unknown:
                raise UserError(f"unknown model field(s) {', '.join(unknown)}")
            return UNetConfig(**config)  # fields added later keep their defaults
        if kind == "nnunet":
            regions = entry.get("regions")
            return NNUNetConfig(
                spec_from_dict(entry["spec"]),
                entry.get("dtype", "float32"),
                None if regions is None else tuple(tuple(int(v) for v in r) for r in regions),
                bool(entry.get("batch_dice", True)),
                entry.get("plans"),
            )
    except (KeyError, TypeError, ValueError, UserError) as err:
        raise UserError(f"{where} has a model entry this workbench cannot read ({err}); re-train it") from None
    raise UserError(f"{where} holds a model of kind {kind!r}; this workbench knows 'unet' and 'nnunet'")


def check_same_model(saved: dict, expected, *, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` when the checkpoint's model (an entry of any
    schema) is not ``expected`` (a config), naming the differing fields."""
    config = parse_model(saved, where=where)
    if config == expected:
        return
    if type(config) is not type(expected):
        text = f"{_kind(config)} vs requested {_kind(expected)}"
    else:
        a, b = describe_model(config), describe_model(expected)
        a = a.get("config", a.get("spec", {})) | {k: v for k, v in a.items() if k in ("dtype", "regions", "batch_dice")}
        b = b.get("config", b.get("spec", {})) | {k: v for k, v in b.items() if k in ("dtype", "regions", "batch_dice")}
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "source"]
        text = ", ".join(f"{k}: checkpoint {a.get(k)!r} vs requested {b.get(k)!r}" for k in diff)
    raise CheckpointMismatchError(
        f"checkpoint {where} was written for another model ({text}); use the same --model/--plans "
        "and options, or a different --checkpoint-dir"
    )


def _kind(config) -> str:
    return "an nnU-Net network" if isinstance(config, NNUNetConfig) else "a paper U-Net"


# -- models ------------------------------------------------------------------------------------------
def init_model(config, *, seed: int = 0):
    """A freshly initialised model (``Model`` or ``NNUNetModel``) of ``config``."""
    if isinstance(config, NNUNetConfig):
        from workbench.model.nnunet import NNUNetModel

        return NNUNetModel.init(config.spec, seed=seed)
    from workbench.model.unet import Model

    return Model.init(config, seed=seed)


def model_with(config, variables, source: str = ""):
    """The model object of ``config`` holding ``variables``."""
    if isinstance(config, NNUNetConfig):
        from workbench.model.nnunet import NNUNetModel

        model = NNUNetModel(config.spec, variables, source)
        model.config = config  # what the loop, evaluation and checkpoints read
        return model
    from workbench.model.unet import Model

    return Model(config, variables)
