"""The layer spec: a network as data (pure Python, no JAX).

A :class:`NetworkSpec` describes nnU-Net's planned U-Nets (``PlainConvUNet`` and
``ResidualEncoderUNet``) and the workbench's own paper U-Net (``PaperUNet``, the
``small`` / ``paper`` presets: :meth:`NetworkSpec.paper`, ``UNetConfig.spec()``) as stages (per-axis kernel, per-axis stride, features, blocks)
and derives from them, once, everything that depends on the architecture:

* :attr:`NetworkSpec.layers`: the network in execution order, one :class:`Layer` per
  convolution, transposed convolution, average or max pool or residual addition, each with
  its per-axis kernel, stride, padding, (lo, hi) halo, cumulative scale and channels;
* :attr:`NetworkSpec.multiple`: per axis, the product of the strides (volume sides and
  block starts must be multiples of it);
* :meth:`NetworkSpec.receptive_radius`: per axis, one backward walk over the layers;
* :attr:`NetworkSpec.num_params` and :meth:`NetworkSpec.state_dict`: nnU-Net's tensor
  names and shapes, aliases included, in nnU-Net's own order.

:mod:`workbench.model.nnunet_plans` builds specs from nnU-Net's plans files.

The halo rule. A convolution with kernel k, stride s, dilation 1 and padding p reads,
for output i, the inputs ``[s·i − p, s·i − p + k − 1]``. On a block whose first voxel
is a multiple of s (and whose size is a multiple of s) the first output reads p voxels
below the block and the last reads ``k − 1 − p − (s − 1)`` above it: the halo is
``(p, max(0, k − 1 − p − (s − 1)))``. nnU-Net pads ``k // 2`` on both sides, strided
convolutions included, so its stride-2 kernel-3 convolutions need (1, 0).
Transposed convolutions with kernel = stride and average or max pools with kernel =
stride need none.

Example
-------
>>> spec = NetworkSpec.plain(in_channels=1, num_outputs=2, kernels=[(1, 3, 3), (3, 3, 3)],
...                          strides=[(1, 1, 1), (1, 2, 2)], features=[4, 8], blocks=[2, 2])
>>> spec.multiple, spec.layers[2].halo
((1, 2, 2), ((1, 1), (1, 0), (1, 0)))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from workbench.errors import UserError

__all__ = ["Stage", "Layer", "NetworkSpec", "conv_halo", "INPUT", "NETWORK_CLASSES", "PAPER_UNET"]

Triple = tuple[int, int, int]
Pairs = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

NETWORK_CLASSES = ("PlainConvUNet", "ResidualEncoderUNet")  # nnU-Net's (plans files name them)
PAPER_UNET = "PaperUNet"  # the workbench's own: workbench.model.unet.UNet3D
INPUT = "input"  # the name a layer uses for the network's input


def conv_halo(kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """(lo, hi) voxels a block needs from its neighbours for one axis of a convolution
    (dilation 1; blocks start at multiples of ``stride``)."""
    return padding, max(0, kernel - 1 - padding - (stride - 1))


@dataclass(frozen=True)
class Stage:
    """One resolution level: its kernel and the stride that enters it (per axis, z y x),
    its features, and its blocks (convolutions for PlainConvUNet, residual blocks for ResEnc)."""

    kernel: Triple
    stride: Triple
    features: int
    blocks: int


@dataclass(frozen=True)
class Layer:
    """One layer in execution order.

    ``name`` is nnU-Net's module path (``encoder.stages.1.0.convs.0``); ``inputs`` the
    names of the layers it reads (:data:`INPUT` for the image): several inputs are
    concatenated along channels in that order (a convolution) or summed (``add``).
    ``op``: ``conv`` (then norm and LeakyReLU if flagged), ``transposed_conv`` (kernel =
    ``stride``, up-sampling by ``stride``), ``avg_pool`` or ``max_pool`` (kernel = stride) or ``add``.
    ``in_scale`` / ``scale``: cumulative stride per axis of the input and output grid.
    ``output``: the deep-supervision index of a segmentation head (0 = full resolution).
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    in_channels: tuple[int, ...]
    out_channels: int
    kernel: Triple = (1, 1, 1)
    stride: Triple = (1, 1, 1)
    padding: Pairs = ((0, 0), (0, 0), (0, 0))
    halo: Pairs = ((0, 0), (0, 0), (0, 0))
    in_scale: Triple = (1, 1, 1)
    scale: Triple = (1, 1, 1)
    bias: bool = False
    norm: bool = False
    nonlin: bool = False
    output: int | None = None

    @property
    def weight_shape(self) -> tuple[int, ...] | None:
        """nnU-Net's (torch) weight shape, or None for layers without weights."""
        if self.op == "conv":
            return (self.out_channels, sum(self.in_channels), *self.kernel)
        if self.op == "transposed_conv":
            return (sum(self.in_channels), self.out_channels, *self.stride)
        return None

    @property
    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(suffix, torch shape) of this layer's tensors, in nnU-Net's order."""
        if self.weight_shape is None:
            return []
        if not self.norm:  # seg heads, transposed convs: plain torch modules
            out = [("weight", self.weight_shape)]
            return out + ([("bias", (self.out_channels,))] if self.bias else [])
        out = [("conv.weight", self.weight_shape)]
        out += [("conv.bias", (self.out_channels,))] if self.bias else []
        return out + [("norm.weight", (self.out_channels,)), ("norm.bias", (self.out_channels,))]

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors)


def _triple(value, what: str) -> Triple:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"{what}={value!r} must be 3 positive integers (z, y, x)") from None
    if len(out) != 3 or min(out) < 1:
        raise UserError(f"{what}={value!r} must be 3 positive integers (z, y, x)")
    return out


@dataclass(frozen=True)
class NetworkSpec:
    """A U-Net as data (nnU-Net's or the paper's); hashable, so it can be a Flax module attribute.

    ``norm``: whether the convolutions (but the heads) are followed by a normalisation with
    a scale and a bias (always for nnU-Net; the paper U-Net may have ``norm="none"``)."""

    network_class: str
    in_channels: int
    num_outputs: int
    stages: tuple[Stage, ...]
    decoder_convs: tuple[int, ...]
    conv_bias: bool = True
    norm_eps: float = 1e-5
    negative_slope: float = 0.01
    output_kind: str = "softmax"  # "sigmoid" for region outputs
    output_names: tuple[str, ...] = ()
    regions_class_order: tuple[int, ...] | None = None
    norm: bool = True
    source: str = field(default="", compare=False)

    def __post_init__(self):
        if self.network_class not in (*NETWORK_CLASSES, PAPER_UNET):
            raise UserError(f"network class {self.network_class!r} is not supported; use one of {NETWORK_CLASSES}")
        if len(self.stages) < (1 if self.network_class == PAPER_UNET else 2):
            raise UserError(f"a U-Net needs at least 2 stages, got {len(self.stages)}")
        if len(self.decoder_convs) != len(self.stages) - 1 or min(self.decoder_convs, default=1) < 1:
            raise UserError(
                f"decoder_convs={self.decoder_convs!r} needs one count >= 1 per decoder stage ({len(self.stages) - 1})"
            )
        if self.in_channels < 1 or self.num_outputs < 1:
            raise UserError(f"in_channels={self.in_channels} and num_outputs={self.num_outputs} must be >= 1")
        for s, stage in enumerate(self.stages):
            if any(k % 2 == 0 for k in stage.kernel):
                raise UserError(f"stage {s} kernel {stage.kernel} must be odd on every axis (nnU-Net pads k // 2)")
            if stage.blocks < 1 or stage.features < 1:
                raise UserError(f"stage {s} needs blocks >= 1 and features >= 1, got {stage}")
        if self.stages[0].stride != (1, 1, 1):
            raise UserError(f"the first stage's stride must be (1, 1, 1), got {self.stages[0].stride}")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def plain(cls, *, in_channels, num_outputs, kernels, strides, features, blocks, decoder_convs=None, **kw):
        """A PlainConvUNet; ``decoder_convs`` defaults to ``blocks[:-1]`` (nnU-Net's default planner)."""
        stages = _stages(kernels, strides, features, blocks)
        decoder = tuple(decoder_convs) if decoder_convs is not None else tuple(s.blocks for s in stages[:-1])
        return cls("PlainConvUNet", in_channels, num_outputs, stages, decoder, **kw)

    @classmethod
    def residual(cls, *, in_channels, num_outputs, kernels, strides, features, blocks, decoder_convs=None, **kw):
        """A ResidualEncoderUNet (BasicBlockD encoder); ``decoder_convs`` defaults to 1 per stage."""
        stages = _stages(kernels, strides, features, blocks)
        decoder = tuple(decoder_convs) if decoder_convs is not None else (1,) * (len(stages) - 1)
        return cls("ResidualEncoderUNet", in_channels, num_outputs, stages, decoder, **kw)

    @classmethod
    def paper(cls, *, in_channels, num_outputs, depth, base_filters, convs_per_block, norm=True) -> NetworkSpec:
        """The paper U-Net (:class:`workbench.model.unet.UNet3D`): ``depth`` levels of
        ``convs_per_block`` 3×3×3 convolutions (bias; then a norm if ``norm``, and an activation),
        ``base_filters · 2^level`` features, 2×2×2 max-pool down, stride-2 transposed
        convolutions up, skip concatenation (skip first), a 1×1×1 head. Dropout and the kind of
        norm do not change the geometry or the parameter count."""
        stages = tuple(
            Stage((3, 3, 3), (2, 2, 2) if level else (1, 1, 1), base_filters * 2**level, convs_per_block)
            for level in range(depth)
        )
        return cls(PAPER_UNET, in_channels, num_outputs, stages, (convs_per_block,) * (depth - 1), norm=bool(norm))

    # -- derived -----------------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def stage_scales(self) -> tuple[Triple, ...]:
        """Cumulative stride of each stage's grid, per axis."""
        out, scale = [], (1, 1, 1)
        for stage in self.stages:
            scale = tuple(a * b for a, b in zip(scale, stage.stride))
            out.append(scale)
        return tuple(out)

    @property
    def multiple(self) -> Triple:
        """Per axis: the product of the strides. Volume sides are padded to multiples of it,
        and every block of a partitioned run must start at a multiple of it."""
        return self.stage_scales[-1]

    @functools.cached_property
    def layers(self) -> tuple[Layer, ...]:
        """The network in execution order (encoder, then per decoder stage: transposed conv,
        convolutions, segmentation head)."""
        builder = _Builder(self)
        if self.network_class == PAPER_UNET:
            builder.paper_network()
            return tuple(builder.layers)
        skips = builder.plain_encoder() if self.network_class == "PlainConvUNet" else builder.residual_encoder()
        builder.decoder(skips)
        return tuple(builder.layers)

    @property
    def outputs(self) -> tuple[Layer, ...]:
        """The segmentation heads, highest resolution first (nnU-Net's deep-supervision order)."""
        return tuple(sorted((la for la in self.layers if la.output is not None), key=lambda la: la.output))

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers)

    def state_dict(self, *, aliases: bool = True) -> list[tuple[str, tuple[int, ...], str | None]]:
        """nnU-Net's state_dict as ``(key, torch shape, same_as)`` in nnU-Net's order.

        ``same_as`` is None for a tensor's first name, else that name: nnU-Net's blocks
        register their conv and norm twice (``.conv`` / ``.all_modules.0``, ``.norm`` /
        ``.all_modules.1``) and the decoder holds the encoder again (``decoder.encoder.``).
        """
        if self.network_class == PAPER_UNET:
            raise UserError("the paper U-Net has Flax parameters, not an nnU-Net state_dict")
        encoder = [la for la in self.layers if la.name.startswith("encoder.")]
        decoder = [la for la in self.layers if la.name.startswith("decoder.")]
        group = {"stages": 0, "transpconvs": 1, "seg_layers": 2}
        decoder.sort(key=lambda la: group[la.name.split(".")[1]])  # stable: torch registration order

        def keys(layer: Layer, prefix: str = ""):
            for suffix, shape in layer.tensors:
                yield prefix + layer.name + "." + suffix, shape, (layer.name + "." + suffix) if prefix else None
            if layer.norm:
                for suffix, shape in layer.tensors:
                    alias = suffix.replace("conv.", "all_modules.0.").replace("norm.", "all_modules.1.")
                    yield prefix + layer.name + "." + alias, shape, layer.name + "." + suffix

        out = [k for la in encoder for k in keys(la)]
        if aliases:
            out += [k for la in encoder for k in keys(la, "decoder.")]
        out += [k for la in decoder for k in keys(la)]
        return out if aliases else [k for k in out if k[2] is None]

    def receptive_radius(self) -> Triple:
        """Per axis, how far (input voxels) a change can move the full-resolution output:
        the largest distance from an output voxel to an input it reads, over every
        alignment of the output voxel to the stride grid. One backward walk over
        :attr:`layers` with index intervals."""
        return self.layer_radius(self.outputs[0].name)

    def layer_radius(self, name: str) -> Triple:
        """Per axis, the receptive radius (input voxels) of layer ``name``'s output: how far
        from the input voxels that one of its output voxels covers it reads, worst case over
        every alignment to the stride grid."""
        scale = next(la.scale for la in self.layers if la.name == name)
        radius = []
        for axis, step in enumerate(scale):
            worst = 0
            for q in range(max(1, self.multiple[axis] // step)):
                lo, hi = self.input_interval(name, q, axis)
                worst = max(worst, q * step - lo, hi - ((q + 1) * step - 1))
            radius.append(worst)
        return tuple(radius)

    def input_interval(self, name: str, p: int, axis: int) -> tuple[int, int]:
        """The input voxels [lo, hi] along ``axis`` that output voxel ``p`` of layer ``name``
        (on that layer's grid) reads: one backward walk over :attr:`layers`."""
        need = {name: (p, p)}
        for layer in reversed(self.layers):
            if layer.name not in need:
                continue
            lo, hi = need.pop(layer.name)
            k, s = layer.kernel[axis], layer.stride[axis]
            if layer.op == "conv":
                pad = layer.padding[axis][0]
                lo, hi = lo * s - pad, hi * s - pad + k - 1
            elif layer.op == "transposed_conv":
                lo, hi = lo // s, hi // s
            elif layer.op in ("avg_pool", "max_pool"):
                lo, hi = lo * s, hi * s + s - 1
            for source in layer.inputs:
                have = need.get(source)
                need[source] = (lo, hi) if have is None else (min(have[0], lo), max(have[1], hi))
        return need[INPUT]

    def check_blocks(self, global_shape: Sequence[int], mesh_shape: Sequence[int]) -> Triple:
        """The block shape of ``global_shape`` split over ``mesh_shape`` (z, y, x), after checking
        that every block starts at a multiple of every stage's cumulative stride.

        Raises one :class:`UserError` naming the first axis and stage that cannot be split,
        and block sizes that would work.
        """
        blocks = []
        for axis, (size, parts, name) in enumerate(zip(global_shape, mesh_shape, "zyx")):
            if size % parts:
                raise UserError(
                    f"the volume's {name} size {size} does not split into {parts} equal blocks; "
                    f"pad it to a multiple of {parts * self.multiple[axis]} (ShardLayout does)"
                )
            block = size // parts
            for s, scale in enumerate(self.stage_scales):
                if block % scale[axis]:
                    step = self.multiple[axis]
                    lower, upper = block // step * step, -(-block // step) * step
                    options = ", ".join(str(b) for b in sorted({lower, upper} - {0}))
                    raise UserError(
                        f"mesh {'x'.join(map(str, mesh_shape))} cannot split stage {s} along {name}: blocks of "
                        f"{block} voxels do not start at multiples of its cumulative stride {scale[axis]}; "
                        f"use blocks that are multiples of {step} along {name} (e.g. {options}), "
                        f"i.e. pad {name} to a multiple of {parts * step}, or use fewer devices along {name}"
                    )
            blocks.append(block)
        return tuple(blocks)

    def describe(self) -> dict:
        """A JSON-able summary (for reports and docs)."""
        return {
            "network_class": self.network_class,
            "in_channels": self.in_channels,
            "num_outputs": self.num_outputs,
            "output_kind": self.output_kind,
            "kernels": [list(s.kernel) for s in self.stages],
            "strides": [list(s.stride) for s in self.stages],
            "features": [s.features for s in self.stages],
            "blocks": [s.blocks for s in self.stages],
            "decoder_convs": list(self.decoder_convs),
            "multiple": list(self.multiple),
            "num_params": self.num_params,
            "source": self.source,
        }


def _stages(kernels, strides, features, blocks) -> tuple[Stage, ...]:
    n = len(features)
    for what, value in (("kernels", kernels), ("strides", strides), ("blocks", blocks)):
        if len(value) != n:
            raise UserError(f"{what} has {len(value)} entries but features has {n}; give one per stage")
    return tuple(
        Stage(_triple(k, f"kernels[{i}]"), _triple(s, f"strides[{i}]"), int(f), int(b))
        for i, (k, s, f, b) in enumerate(zip(kernels, strides, features, blocks))
    )


class _Builder:
    """Appends the layers of one network in execution order."""

    def __init__(self, spec: NetworkSpec):
        self.spec = spec
        self.layers: list[Layer] = []
        self.channels = {INPUT: spec.in_channels}
        self.scales = {INPUT: (1, 1, 1)}

    def add(self, name, op, inputs, out_channels, **kw) -> str:
        in_scale = self.scales[inputs[0]]
        kernel, stride = kw.get("kernel", (1, 1, 1)), kw.get("stride", (1, 1, 1))
        if op == "conv":
            kw["padding"] = tuple((k // 2, k // 2) for k in kernel)
            kw["halo"] = tuple(conv_halo(k, s, k // 2) for k, s in zip(kernel, stride))
        if op == "transposed_conv":
            scale = tuple(a // b for a, b in zip(in_scale, stride))
        else:
            scale = tuple(a * b for a, b in zip(in_scale, stride))
        layer = Layer(
            name,
            op,
            tuple(inputs),
            tuple(self.channels[i] for i in inputs),
            out_channels,
            in_scale=in_scale,
            scale=scale,
            **kw,
        )
        self.layers.append(layer)
        self.channels[name], self.scales[name] = out_channels, scale
        return name

    def conv(self, name, source, features, kernel, stride=(1, 1, 1), *, nonlin=True, bias=None) -> str:
        bias = self.spec.conv_bias if bias is None else bias
        return self.add(
            name, "conv", (source,), features, kernel=kernel, stride=stride, bias=bias, norm=True, nonlin=nonlin
        )

    def plain_encoder(self) -> list[str]:
        x, skips = INPUT, []
        for s, stage in enumerate(self.spec.stages):
            for c in range(stage.blocks):
                stride = stage.stride if c == 0 else (1, 1, 1)
                x = self.conv(f"encoder.stages.{s}.0.convs.{c}", x, stage.features, stage.kernel, stride)
            skips.append(x)
        return skips

    def paper_network(self) -> None:
        """The paper U-Net, named as its Flax modules (``down0/conv1``, ``up0``, ``head``)."""
        spec, x, skips = self.spec, INPUT, []
        for level, stage in enumerate(spec.stages):
            if level:
                x = self.add(
                    f"pool{level}", "max_pool", (x,), self.channels[x], kernel=stage.stride, stride=stage.stride
                )
            for i in range(stage.blocks):
                x = self.add(f"down{level}/conv{i}", "conv", (x,), stage.features, kernel=stage.kernel, bias=True,
                             norm=spec.norm, nonlin=True)  # fmt: skip
            skips.append(x)
        for level in reversed(range(spec.n_stages - 1)):
            stage, stride = spec.stages[level], spec.stages[level + 1].stride
            up = self.add(
                f"up{level}", "transposed_conv", (x,), stage.features, kernel=stride, stride=stride, bias=True
            )
            x = (skips[level], up)  # UNet3D: the skip first
            for i in range(stage.blocks):
                x = self.add(f"dec{level}/conv{i}", "conv", x if i == 0 else (x,), stage.features,
                             kernel=stage.kernel, bias=True, norm=spec.norm, nonlin=True)  # fmt: skip
        self.add("head", "conv", (x,), spec.num_outputs, bias=True, output=0)

    def residual_encoder(self) -> list[str]:
        first = self.spec.stages[0]
        x = self.conv("encoder.stem.convs.0", INPUT, first.features, first.kernel)
        skips = []
        for s, stage in enumerate(self.spec.stages):
            for i in range(stage.blocks):
                x = self.basic_block_d(f"encoder.stages.{s}.blocks.{i}", x, stage, strided=i == 0)
            skips.append(x)
        return skips

    def basic_block_d(self, name: str, x: str, stage: Stage, *, strided: bool) -> str:
        """conv1 (strided) → conv2 (no nonlin); skip: avg-pool if strided, then a 1×1 conv
        (no bias) + norm if the channels change; LeakyReLU after the sum."""
        stride = stage.stride if strided else (1, 1, 1)
        h = self.conv(f"{name}.conv1", x, stage.features, stage.kernel, stride)
        h = self.conv(f"{name}.conv2", h, stage.features, stage.kernel, nonlin=False)
        skip, index = x, 0
        if stride != (1, 1, 1):
            skip = self.add(f"{name}.skip.0", "avg_pool", (skip,), self.channels[skip], kernel=stride, stride=stride)
            index = 1
        if self.channels[x] != stage.features:
            skip = self.conv(f"{name}.skip.{index}", skip, stage.features, (1, 1, 1), nonlin=False, bias=False)
        return self.add(name, "add", (h, skip), stage.features, nonlin=True)

    def decoder(self, skips: list[str]) -> None:
        spec, low = self.spec, skips[-1]
        for s in range(spec.n_stages - 1):
            k = spec.n_stages - 2 - s  # the encoder stage whose resolution this decoder stage has
            below, stage = spec.stages[k + 1], spec.stages[k]
            up = self.add(
                f"decoder.transpconvs.{s}",
                "transposed_conv",
                (low,),
                stage.features,
                kernel=below.stride,
                stride=below.stride,
                bias=spec.conv_bias,
            )
            h = self.add(
                f"decoder.stages.{s}.convs.0",
                "conv",
                (up, skips[k]),  # nnU-Net: torch.cat((upsampled, skip))
                stage.features,
                kernel=stage.kernel,
                bias=spec.conv_bias,
                norm=True,
                nonlin=True,
            )
            for c in range(1, spec.decoder_convs[s]):
                h = self.conv(f"decoder.stages.{s}.convs.{c}", h, stage.features, stage.kernel)
            self.add(f"decoder.seg_layers.{s}", "conv", (h,), spec.num_outputs, bias=True, output=k)
            low = h
