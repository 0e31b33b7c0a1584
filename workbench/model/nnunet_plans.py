"""nnU-Net's plans files → :class:`~workbench.model.spec.NetworkSpec` (pure Python, no JAX).

``from_nnunet_plans(plans, dataset_json, configuration)`` builds the network nnU-Net's
``get_network_from_plans`` builds for a plans file (``nnUNetPlans.json`` from the default
planner, ``nnUNetResEncUNet{M,L,XL}Plans.json`` from the residual-encoder presets) and its
``dataset.json``: input channels from ``channel_names``, outputs from ``labels`` (softmax over
the labels, or one sigmoid per foreground region when labels are regions, as nnU-Net's
``LabelManager`` counts them). ``from_nnunet_arch`` takes ``get_network_from_plans``'s own
arguments. Unknown planners, network classes or operations, and channel counts that disagree
with the plans, are one :class:`~workbench.errors.UserError` each.

Example
-------
>>> spec = from_nnunet_plans("nnUNetResEncUNetLPlans.json", "dataset.json")   # doctest: +SKIP
>>> spec.network_class, spec.multiple                                          # doctest: +SKIP
('ResidualEncoderUNet', (8, 32, 32))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import InputNotFoundError, UserError
from workbench.model.spec import NetworkSpec

__all__ = ["from_nnunet_plans", "from_nnunet_arch", "load_plans_file", "PlansFile", "PLANNED_CLASSES", "PLANNERS"]

# nnU-Net's class names (plans: architecture.network_class_name) -> our short names.
PLANNED_CLASSES = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}
# The planners whose plans we have checked against nnU-Net's builder (plans: experiment_planner_used).
PLANNERS = ("ExperimentPlanner", "nnUNetPlannerResEncM", "nnUNetPlannerResEncL", "nnUNetPlannerResEncXL")
# The operations the plans may name; anything else is refused (arch_kwargs).
_SUPPORTED_OPS = {
    "conv_op": ("torch.nn.modules.conv.Conv3d",),
    "norm_op": ("torch.nn.modules.instancenorm.InstanceNorm3d",),
    "nonlin": ("torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU"),
    "dropout_op": (None,),
}


def _read_json(source, what: str) -> dict:
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputNotFoundError(f"{what} {path!r} does not exist; pass the path of nnU-Net's {what}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {what} {path!r} as JSON ({err}); pass nnU-Net's {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path!r} holds a {type(data).__name__}, not a JSON object; pass nnU-Net's {what}")
    return data


def _configuration(plans: dict, name: str, where: str) -> dict:
    """The configuration with its ``inherits_from`` chain resolved (nnU-Net's rule: the child's keys win)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict):
        raise UserError(f"{where} has no 'configurations'; pass an nnU-Net plans file (nnUNetPlans.json)")
    if name not in configs:
        raise UserError(f"{where} has no configuration {name!r}; use one of {sorted(configs)}")
    config, seen = dict(configs[name]), {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise UserError(f"{where}: configuration {name!r} inherits from {parent!r}, which is missing or a cycle")
        seen.add(parent)
        config = {**configs[parent], **config}
    return config


def _labels(dataset: dict, where: str) -> tuple[int, str, tuple[str, ...], tuple[int, ...] | None]:
    """(heads, output kind, output names, regions_class_order) as nnU-Net's LabelManager counts them."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{where} has no 'labels'; pass the dataset.json the plans were made with")
    labels = {k: v for k, v in labels.items() if k != "ignore"}
    for name, value in labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise UserError(
                f"{where} label {name!r} is {value!r}; a label is an integer >= 0, or a list of them for a region"
            )
    regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())
    if not regions:
        by_value = {}
        for name, value in labels.items():
            by_value.setdefault(int(value[0] if isinstance(value, (list, tuple)) else value), name)
        values = sorted(by_value)
        return len(values), "softmax", tuple(by_value[v] for v in values), None
    foreground = [
        k for k, v in labels.items() if set(v if isinstance(v, (list, tuple)) else [v]) != {0} and k != "background"
    ]
    order = dataset.get("regions_class_order")
    if not isinstance(order, list) or len(order) != len(foreground):
        raise UserError(
            f"{where} has {len(foreground)} region labels ({', '.join(foreground)}) but regions_class_order "
            f"is {order!r}; give one integer per region, as nnU-Net requires"
        )
    return len(foreground), "sigmoid", tuple(foreground), tuple(int(v) for v in order)


def from_nnunet_plans(plans_json, dataset_json, configuration: str = "3d_fullres") -> NetworkSpec:
    """The network nnU-Net builds from a plans file (``nnUNetPlans.json``, ``nnUNetResEncUNet{M,L,XL}Plans.json``)
    and its ``dataset.json``: paths or already-loaded dicts.

    Input channels come from ``channel_names``; outputs from ``labels`` (one per label with
    softmax, or one per foreground region with sigmoid when labels are regions).
    """
    where = plans_json if isinstance(plans_json, (str, os.PathLike)) else "the plans"
    plans = _read_json(plans_json, "plans file")
    dataset = _read_json(dataset_json, "dataset.json")
    planner = plans.get("experiment_planner_used")
    if planner not in PLANNERS:
        raise UserError(
            f"{where} was made by planner {planner!r}, which is not supported; use plans from one of "
            f"{', '.join(PLANNERS)} (nnU-Net's default and ResEnc M/L/XL presets)"
        )
    config = _configuration(plans, configuration, where)
    arch = config.get("architecture") or {}
    class_name = arch.get("network_class_name")
    kw = arch.get("arch_kwargs") or {}
    channel_names = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channel_names, dict) or not channel_names:
        raise UserError("dataset.json has no 'channel_names'; pass the dataset.json the plans were made with")
    schemes = config.get("normalization_schemes")
    if isinstance(schemes, list) and len(schemes) != len(channel_names):
        raise UserError(
            f"dataset.json's channel_names lists {len(channel_names)} channels ({', '.join(map(str, channel_names.values()))}) "
            f"but {where} ({configuration}) normalises {len(schemes)} ({', '.join(schemes)}); "
            "pass the dataset.json the plans were made with"
        )
    heads, kind, names, order = _labels(dataset, "dataset.json")

    return from_nnunet_arch(
        class_name,
        kw,
        len(channel_names),
        heads,
        where=f"{where} ({configuration})",
        output_kind=kind,
        output_names=names,
        regions_class_order=order,
        source=f"{plans.get('plans_name', where)} / {configuration}",
    )


def from_nnunet_arch(
    network_class_name: str,
    arch_kwargs: dict,
    input_channels: int,
    output_channels: int,
    *,
    where: str = "the plans",
    **fields,
) -> NetworkSpec:
    """The network of nnU-Net's ``get_network_from_plans(network_class_name, arch_kwargs, …,
    input_channels, output_channels)``: the plans' ``architecture`` section with the channel
    counts. ``fields`` go to :class:`NetworkSpec` (output kind and names, source)."""
    if network_class_name not in PLANNED_CLASSES:
        raise UserError(
            f"{where} plans network class {network_class_name!r}, which is not supported; "
            f"supported: {', '.join(PLANNED_CLASSES)}"
        )
    kw = arch_kwargs
    for key, allowed in _SUPPORTED_OPS.items():
        if kw.get(key) not in allowed:
            raise UserError(
                f"{where} uses {key}={kw.get(key)!r}; only {allowed[0]!r} is supported "
                "(3D convolutions, InstanceNorm3d, LeakyReLU, no dropout)"
            )
    norm = kw.get("norm_op_kwargs") or {}
    nonlin = kw.get("nonlin_kwargs") or {}
    if not norm.get("affine", False):
        raise UserError(f"{where}: InstanceNorm3d without affine parameters is not supported")
    plain = PLANNED_CLASSES[network_class_name] == "PlainConvUNet"
    blocks = kw.get("n_conv_per_stage" if plain else "n_blocks_per_stage")
    common = dict(
        in_channels=int(input_channels),
        num_outputs=int(output_channels),
        kernels=kw.get("kernel_sizes"),
        strides=kw.get("strides"),
        features=kw.get("features_per_stage"),
        blocks=blocks,
        decoder_convs=kw.get("n_conv_per_stage_decoder"),
        conv_bias=bool(kw.get("conv_bias", True)),
        norm_eps=float(norm.get("eps", 1e-5)),
        negative_slope=float(nonlin.get("negative_slope", 0.01)),
        **fields,
    )
    if any(common[k] is None for k in ("kernels", "strides", "features", "blocks")):
        raise UserError(
            f"{where}: arch_kwargs lacks kernel_sizes, strides, features_per_stage or the blocks per stage; "
            "pass a plans file written by nnU-Net"
        )
    return NetworkSpec.plain(**common) if plain else NetworkSpec.residual(**common)


@dataclass(frozen=True)
class PlansFile:
    """A plans file and what it describes: the network, the plans, the dataset.json, the
    configuration (``inherits_from`` resolved) and the workbench's own block (``{}`` for
    nnU-Net's plans files; ``workbench plan --data`` writes one)."""

    path: str
    spec: NetworkSpec
    plans: dict
    dataset: dict
    configuration: dict
    configuration_name: str
    workbench: dict


def load_plans_file(path, configuration: str = "3d_fullres") -> PlansFile:
    """A plans file given on the command line (``--plans FILE``): nnU-Net's own
    (``nnUNet_preprocessed/DatasetXXX/nnUNetPlans.json``, its ``dataset.json`` beside it) or
    one written by ``workbench plan --data`` (the dataset.json inside it, under
    ``workbench.dataset``). One :class:`UserError` when the dataset.json is in neither place.
    """
    path = os.fspath(path)
    plans = _read_json(path, "plans file")
    block = plans.get("workbench") or {}
    if not isinstance(block, dict):
        raise UserError(
            f"plans file {path!r}: 'workbench' is a {type(block).__name__}, not an object; rewrite it with workbench plan --data"
        )
    dataset = block.get("dataset")
    if dataset is None:
        sibling = Path(path).with_name("dataset.json")
        if not sibling.is_file():
            raise InputNotFoundError(
                f"plans file {path!r} has no dataset.json beside it ({sibling}) and none inside it; "
                "put the dataset.json the plans were made with next to the plans file "
                "(as in nnUNet_preprocessed/DatasetXXX/)"
            )
        dataset = _read_json(sibling, "dataset.json")
    spec = from_nnunet_plans(plans, dataset, configuration)
    return PlansFile(
        path=path,
        spec=spec,
        plans=plans,
        dataset=dict(dataset),
        configuration=_configuration(plans, configuration, path),
        configuration_name=configuration,
        workbench=dict(block),
    )
