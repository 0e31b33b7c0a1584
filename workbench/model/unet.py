"""The 3D U-Net: one Flax definition for every backend.

Encoder levels of ``convs_per_block`` 3×3×3 convolutions (each followed by
normalisation, activation and dropout), 2×2×2 max-pool down, 2×2×2 stride-2
transposed convolution up, skip concatenation, and a final 1×1×1 convolution to
``num_classes`` logits. Partitioning lives in the :class:`~workbench.model.layers.Partition`
the module is given; the parameters do not depend on it.

Example
-------
>>> config = UNetConfig.preset("small")
>>> model = Model.init(config, seed=0)
>>> model.num_params
85355
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from workbench.errors import UserError
from workbench.model.layers import Conv3, Norm, Partition, UpConv2, hash_dropout, he_normal, max_pool2
from workbench.model.spec import NetworkSpec
from workbench.options import DTYPES, NORMS
from workbench.options import PRESETS as PRESET_NAMES

__all__ = ["UNetConfig", "UNet3D", "Model", "PRESETS"]

ACTIVATIONS = ("relu", "leaky_relu")
_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    # Small enough to train on a laptop CPU. Instance norm (as nnU-Net): with one volume
    # per step, batch norm's running averages lag the weights and hurt held-out inference.
    "small": dict(
        depth=3,
        base_filters=8,
        convs_per_block=2,
        norm="instance",
        activation="relu",
        dtype="float32",
        num_classes=3,
    ),
    # The Mesh-TensorFlow paper's configuration (Hou et al. 2019).
    "paper": dict(
        depth=4,
        base_filters=32,
        convs_per_block=2,
        norm="batch",
        activation="leaky_relu",
        dtype="bfloat16",
        num_classes=3,
    ),
}
# Keyed by the names of workbench.options.PRESETS (a KeyError here means the two disagree).
PRESETS: dict[str, dict[str, Any]] = {name: _PRESET_FIELDS[name] for name in PRESET_NAMES}


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines the network (hashable, JSON-able via ``asdict``)."""

    depth: int = 3
    base_filters: int = 8
    convs_per_block: int = 2
    in_channels: int = 1
    num_classes: int = 3
    activation: str = "relu"
    negative_slope: float = 0.1
    dropout: float = 0.0
    norm: str = "batch"
    groups: int = 8
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise UserError(msg)

        check(isinstance(self.depth, int) and 1 <= self.depth <= 7, f"depth={self.depth!r} must be an integer in 1..7")
        check(
            isinstance(self.base_filters, int) and self.base_filters >= 1,
            f"base_filters={self.base_filters!r} must be >= 1",
        )
        check(
            isinstance(self.convs_per_block, int) and self.convs_per_block >= 1,
            f"convs_per_block={self.convs_per_block!r} must be >= 1",
        )
        check(self.in_channels >= 1 and self.num_classes >= 1, "in_channels and num_classes must be >= 1")
        check(self.activation in ACTIVATIONS, f"activation={self.activation!r}; use one of {ACTIVATIONS}")
        check(self.norm in NORMS, f"norm={self.norm!r}; use one of {NORMS}")
        check(self.dtype in DTYPES, f"dtype={self.dtype!r}; use one of {DTYPES}")
        check(0.0 <= self.dropout < 1.0, f"dropout={self.dropout!r} must be in [0, 1)")

    @classmethod
    def preset(cls, name: str, **overrides) -> UNetConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; use one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def spec(self) -> NetworkSpec:
        """This network as a layer spec (:meth:`NetworkSpec.paper`): the one description its
        geometry (halos, size multiple, receptive field, halo messages) is derived from."""
        return _paper_spec(self.in_channels, self.num_classes, self.depth, self.base_filters, self.convs_per_block,
                           self.norm != "none")  # fmt: skip

    @property
    def multiples(self) -> tuple[int, int, int]:
        """Per axis (z, y, x): volume sides must be multiples of these (the spec's stride products)."""
        return self.spec().multiple

    @property
    def multiple(self) -> int:
        """The one size multiple of every axis (2^(depth-1): the paper U-Net is isotropic); the reference pads to it."""
        return max(self.multiples)

    @property
    def compute_dtype(self):
        return {"bfloat16": jnp.bfloat16, "float64": jnp.float64}.get(self.dtype, jnp.float32)

    @property
    def output_dtype(self):
        """Logits are float32 (float64 for the float64 verification dtype)."""
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    @classmethod
    def from_dict(cls, fields: dict) -> UNetConfig:
        """The config with these fields (the rest default), e.g. from :meth:`as_dict` or JSON;
        an unknown field is a ``ValueError`` naming it and the known ones."""
        if not isinstance(fields, dict):
            raise UserError(
                f"a model config is a JSON object of UNetConfig fields, not {type(fields).__name__}; "
                'e.g. {"depth": 2, "base_filters": 6}'
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in fields if k not in known]
        if unknown:
            raise UserError(f"unknown UNetConfig field {unknown[0]!r}; use only {', '.join(known)}")
        return cls(**fields)

    def replace(self, **changes) -> UNetConfig:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConvBlock(nn.Module):
    """``convs_per_block`` × (conv → norm → activation → dropout → mask) at one level."""

    config: UNetConfig
    features: int
    level: int
    partition: Partition
    train: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, part = self.config, self.partition
        for i in range(cfg.convs_per_block):
            x = Conv3(self.features, self.level, part, cfg.compute_dtype, split_inputs=not self.train, name=f"conv{i}")(
                x
            )
            if cfg.norm != "none":
                x = Norm(cfg.norm, self.level, part, groups=cfg.groups, train=self.train, name=f"norm{i}")(x)
            x = nn.relu(x) if cfg.activation == "relu" else nn.leaky_relu(x, cfg.negative_slope)
            if self.train and cfg.dropout > 0:
                seed = jax.random.bits(self.make_rng("dropout"), dtype=jnp.uint32)
                x = hash_dropout(x, rate=cfg.dropout, seed=seed, level=self.level, partition=part)
            x = part.mask(x, self.level)
        return x


class UNet3D(nn.Module):
    """(N, Z, Y, X, C) → (N, Z, Y, X, num_classes) float32 logits."""

    config: UNetConfig
    partition: Partition = Partition()

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        cfg, part = self.config, self.partition
        block_cls = nn.remat(ConvBlock) if cfg.remat else ConvBlock
        x = part.constrain(x.astype(cfg.compute_dtype))
        skips = []
        for level in range(cfg.depth):
            x = block_cls(cfg, cfg.base_filters * 2**level, level, part, train, name=f"down{level}")(x)
            if level < cfg.depth - 1:
                skips.append(x)
                x = part.constrain(max_pool2(x))
        for level in reversed(range(cfg.depth - 1)):
            features = cfg.base_filters * 2**level
            x = UpConv2(features, dtype=cfg.compute_dtype, name=f"up{level}")(x)
            x = part.mask(x, level)
            # skip connection: the first conv sees the channel concatenation
            x = block_cls(cfg, features, level, part, train, name=f"dec{level}")((skips[level], x))
        x = nn.Dense(
            cfg.num_classes, dtype=cfg.compute_dtype, param_dtype=jnp.float32, kernel_init=he_normal, name="head"
        )(x)
        return part.constrain(x.astype(cfg.output_dtype))


@dataclass
class Model:
    """A config with its variables (``params`` and, with batch norm, ``batch_stats``)."""

    config: UNetConfig
    variables: Any

    @classmethod
    def init(cls, config: UNetConfig | str = "small", *, seed: int = 0) -> Model:
        if isinstance(config, str):
            config = UNetConfig.preset(config)
        size = config.multiple
        dummy = jnp.zeros((1, size, size, size, config.in_channels), jnp.float32)
        variables = jax.jit(UNet3D(config).init)(jax.random.key(seed), dummy)
        return cls(config, variables)

    @property
    def num_params(self) -> int:
        return int(sum(np.size(p) for p in jax.tree.leaves(self.variables["params"])))

    def module(self, partition: Partition | None = None) -> UNet3D:
        return UNet3D(self.config, Partition() if partition is None else partition)


@functools.lru_cache(maxsize=64)
def _paper_spec(in_channels, num_classes, depth, base_filters, convs_per_block, norm) -> NetworkSpec:
    return NetworkSpec.paper(in_channels=in_channels, num_outputs=num_classes, depth=depth,
                             base_filters=base_filters, convs_per_block=convs_per_block, norm=norm)  # fmt: skip
