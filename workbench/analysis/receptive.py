"""The U-Net's receptive field: how far a wrong halo reaches, and the halo each mode receives.

* :func:`receptive_field`: the exact receptive radius, the halo each layer needs, the
  ``overlap`` width that makes one input halo exact, and the seam depth.
* :func:`predicted_artifact_depth`: the depth of the band each halo mode corrupts
  (compare with :func:`workbench.analysis.compare.artifact_depth` of a measured profile).
* :func:`halo_width`: the level-0 shell each shard receives for a halo choice.
"""

from __future__ import annotations

import math

from workbench.errors import UserError
from workbench.execute.run import overlap_width
from workbench.model.halo import validate_halo
from workbench.model.unet import UNetConfig

__all__ = ["receptive_field", "predicted_artifact_depth", "halo_width", "halo_layers", "seam_depth"]


def halo_layers(spec) -> list:
    """The layers of a :class:`~workbench.model.spec.NetworkSpec` that need a halo (the
    convolutions wider than 1 voxel), in execution order."""
    return [layer for layer in spec.layers if any(lo or hi for lo, hi in layer.halo)]


def receptive_field(config) -> dict:
    """The U-Net's exact receptive field and the halo each layer needs, from its layer spec
    (``config.spec()``, or a :class:`~workbench.model.spec.NetworkSpec`).

    Returns ``{"radius": r, "overlap_width": w, "seam_depth": s, "layers": [...]}``:
    ``r`` (level-0 voxels) is the receptive radius of the output (an output voxel
    depends on inputs at most ``r`` away, worst case over the pooling grid); ``w``
    the input halo that makes ``overlap`` mode exact (``r`` rounded up to
    2^(depth-1)); ``s`` the deepest an output voxel can sit from a shard face and
    still see across it (shard faces lie on the pooling grid, so ``s <= r``). Each
    layer row has ``name``, ``level``, ``halo`` (voxels per side at its level: 1 for
    a 3x3x3 conv), ``halo_level0`` (the same halo in input voxels: 2^level) and
    ``radius`` (receptive radius of that layer's output in level-0 voxels: how far
    a wrong halo at the input can reach). Per-axis figures are given as their largest
    axis (the paper U-Net is isotropic).
    """
    spec = config.spec() if hasattr(config, "spec") else config
    layers = []
    for layer in halo_layers(spec):
        step = max(layer.in_scale)
        layers.append(
            {
                "name": layer.name,
                "level": int(math.log2(step)),
                "halo": max(max(pair) for pair in layer.halo),
                "halo_level0": max(max(pair) * s for pair, s in zip(layer.halo, layer.in_scale)),
                "radius": max(spec.layer_radius(layer.name)),
            }
        )
    return {
        "radius": max(spec.receptive_radius()),
        "overlap_width": overlap_width(config) if spec is not config else _overlap(spec),
        "seam_depth": seam_depth(spec),
        "layers": layers,
    }


def _overlap(spec) -> int:
    return max(-(-r // m) * m for r, m in zip(spec.receptive_radius(), spec.multiple))


def seam_depth(spec) -> int:
    """Largest d + 1 such that an output voxel d voxels from a grid-aligned shard face
    depends on an input on the other side (the largest over the axes)."""
    spec = spec.spec() if hasattr(spec, "spec") else spec
    head, worst = spec.outputs[0].name, 0
    for axis, m in enumerate(spec.multiple):
        reach = [spec.input_interval(head, p, axis) for p in range(m)]
        radius = max(max(p - lo, hi - p) for p, (lo, hi) in enumerate(reach))
        for d in range(radius + 1):
            above = d % m  # voxel S + d, S a multiple of m: needs an input below S
            below = (-1 - d) % m  # voxel S - 1 - d: needs an input at or above S
            if above - reach[above][0] > d or reach[below][1] - below > d:
                worst = max(worst, d + 1)
    return worst


def predicted_artifact_depth(config, halo) -> int:
    """Depth (voxels from a seam) of the band a halo mode corrupts.

    ``exact`` and ``overlap``: 0. ``zero``/``reflect``/``replicate`` (and width 0):
    the seam depth ``s`` of :func:`receptive_field` (every layer's halo is wrong, and
    the first layer's reaches every output that sees across the face). An overlap
    width ``w`` (a multiple of 2^(depth-1)): ``s - w``, as the shard's own zero
    padding now sits ``w`` voxels beyond the face; 0 once ``w >= s``.
    """

    halo = validate_halo(halo)
    if halo in ("exact", "overlap"):
        return 0
    s = seam_depth(config)
    if isinstance(halo, int):
        return s if halo == 0 else max(s - halo, 0)
    return s


def halo_width(halo, *, model: dict | None = None) -> int:
    """Level-0 width of the shell each shard receives from its neighbours for a halo choice.

    ``exact``: the widest halo a layer of the spec needs, at its own level (1 voxel: a
    1-voxel shell per 3×3×3 conv layer; 1 without ``model``);
    an integer ``w``: ``w`` (the input halo); ``overlap``: the receptive radius rounded up
    to 2^(depth-1) (needs ``model``, the report's config dict); ``zero`` / ``reflect`` /
    ``replicate`` / ``0``: 0 (each shard pads itself, nothing is received).
    """
    if isinstance(halo, str) and halo.strip().lstrip("-").isdigit():
        halo = int(halo)
    if isinstance(halo, bool) or not isinstance(halo, (int, str)):
        raise UserError(f"halo={halo!r} is not a halo mode; use exact, zero, reflect, replicate, overlap or a width")
    if isinstance(halo, int):
        if halo < 0:
            raise UserError(f"halo width {halo} must be >= 0")
        return halo
    text = halo.strip().lower()
    if text == "exact":
        if model is None:
            return 1
        return max(max(max(pair) for pair in la.halo) for la in halo_layers(_model_spec(model)))
    if text in ("zero", "reflect", "replicate"):
        return 0
    if text == "overlap":
        if model is None:
            raise UserError("halo 'overlap' needs the model config to know its width; pass model=config.as_dict()")
        if "network_class" in model:
            raise UserError("halo 'overlap' is not available for nnU-Net networks; use halo='exact'")
        return overlap_width(UNetConfig.from_dict(model))
    raise UserError(f"unknown halo mode {halo!r}; use exact, zero, reflect, replicate, overlap or a width")


def _model_spec(model: dict):
    """The layer spec of a report's ``model`` dict: a ``UNetConfig``'s fields, or an nnU-Net
    network's :meth:`~workbench.model.spec.NetworkSpec.describe`."""
    from workbench.model.spec import NetworkSpec

    if "network_class" not in model:
        return UNetConfig.from_dict(model).spec()
    build = NetworkSpec.plain if model["network_class"] == "PlainConvUNet" else NetworkSpec.residual
    fields = ("in_channels", "num_outputs", "kernels", "strides", "features", "blocks", "decoder_convs")
    return build(**{k: model[k] for k in fields})
