"""Scaling on paper: halo messages from the model alone, and which mesh axes leave a node.

The explicit backend exchanges a width-1 halo before every 3×3×3 convolution
(:mod:`workbench.model.halo`): axis after axis (z, then y, then x), one
collective-permute per direction, each face including the halos received along the
earlier axes. For a conv whose input block is ``(bz, by, bx)`` with ``C`` channels of
``s`` bytes, one message is

* along z: ``1 × by × bx × C × s``
* along y: ``(bz + 2) × 1 × bx × C × s``
* along x: ``(bz + 2) × (by + 2) × 1 × C × s``

(a face spans the grown extent of the earlier axes whether or not they were exchanged:
an axis of size 1 is zero padded instead). Every axis with more than one device sends
one message each way. A training step adds the adjoint exchange (same shapes, opposite
direction) for every conv whose input needs a gradient: all but the first, which reads
the image. In training the decoder's first conv pads the concatenation of skip and
up-sampled features; in inference it pads the two parts separately (same bytes, twice
the messages).

So halo bytes scale with face area: ``(b + 2)²``-like terms, about 4× for a block twice
as wide (exactly: 387,171,344 bytes at 256³ vs 98,252,816 at 128³ for the paper model's
training step, both equal to the compiled audit). :func:`halo_bytes` is the total the
HLO audit (:mod:`workbench.analysis.audit`) reports as collective-permute bytes: the
result buffers every device receives, zero-filled where it has no neighbour.

:func:`crossing_axes` says which mesh axes have neighbours on different nodes when
:func:`workbench.mesh.build_mesh` lays the mesh over ``jax.devices()`` in row-major
order (x fastest) and each node holds consecutive devices.
"""

from __future__ import annotations

import itertools

from workbench.mesh import SPATIAL_AXES, MeshSpec, parse_mesh

__all__ = ["DTYPE_BYTES", "halo_messages", "halo_bytes", "busiest_device_halo_bytes", "crossing_axes"]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}


def _conv_inputs(config, *, train: bool) -> list[tuple[str, int, list[int]]]:
    """(name, level, channel parts) of every 3×3×3 conv's input, in program order."""
    convs = []
    base, depth = config.base_filters, config.depth
    for level in range(depth):
        features = base * 2**level
        for i in range(config.convs_per_block):
            if i == 0:
                c_in = config.in_channels if level == 0 else features // 2
            else:
                c_in = features
            convs.append((f"down{level}/conv{i}", level, [c_in]))
    for level in reversed(range(depth - 1)):
        features = base * 2**level
        for i in range(config.convs_per_block):
            # the first conv sees the skip and the up-sampled features (features each)
            parts = ([2 * features] if train else [features, features]) if i == 0 else [features]
            convs.append((f"dec{level}/conv{i}", level, parts))
    return convs


def halo_messages(config, block_shape, mesh="2x2x2", *, train: bool = True) -> list[dict]:
    """Every halo message of one step on one device, as ``{"conv", "level", "pass",
    "axis", "direction", "bytes"}`` (``pass`` is ``forward`` or ``backward``; ``direction``
    +1 sends to the next device along ``axis``, -1 to the previous one).

    ``block_shape`` is the per-device block ``(bz, by, bx)`` at full resolution (each
    U-Net level halves it); axes of ``mesh`` with one device exchange nothing.
    """
    spec = parse_mesh(mesh)
    size = DTYPE_BYTES[config.dtype]
    out = []
    passes = ["forward", "backward"] if train else ["forward"]
    for pass_ in passes:
        for index, (name, level, parts) in enumerate(_conv_inputs(config, train=train)):
            if pass_ == "backward" and index == 0:
                continue  # the image needs no gradient
            bz, by, bx = (b // 2**level for b in block_shape)
            faces = {"z": by * bx, "y": (bz + 2) * bx, "x": (bz + 2) * (by + 2)}
            for channels in parts:
                for axis, n in zip(SPATIAL_AXES, spec.spatial):
                    if n == 1:
                        continue
                    for direction in (1, -1):
                        out.append(
                            {
                                "conv": name,
                                "level": level,
                                "pass": pass_,
                                "axis": axis,
                                "direction": direction,
                                "bytes": faces[axis] * channels * size,
                            }
                        )
    return out


def halo_bytes(config, block_shape, mesh="2x2x2", *, train: bool = True) -> int:
    """Collective-permute bytes per device and step as the HLO audit counts them
    (every message's result buffer, zero-filled at the volume's outer faces)."""
    return sum(m["bytes"] for m in halo_messages(config, block_shape, mesh, train=train))


def busiest_device_halo_bytes(config, block_shape, mesh, *, train: bool = True) -> int:
    """Bytes the busiest device actually receives: on an axis of 2 devices every
    device has one neighbour (one of the two directions carries data to it), on an
    axis of 3 or more the interior devices have two."""
    spec = parse_mesh(mesh)
    sizes = dict(zip(SPATIAL_AXES, spec.spatial))
    total = 0
    for m in halo_messages(config, block_shape, spec, train=train):
        if sizes[m["axis"]] >= 3 or m["direction"] == 1:
            total += m["bytes"]
    return total


def crossing_axes(mesh, devices_per_node: int = 8) -> dict[str, bool]:
    """For each spatial axis, whether some pair of neighbours along it sits on
    different nodes, when device ``i`` of the row-major (data, z, y, x) mesh lives on
    node ``i // devices_per_node`` (the order :func:`workbench.mesh.build_mesh` uses;
    ``jax.devices()`` lists a multi-process run's devices process by process)."""
    spec = mesh if isinstance(mesh, MeshSpec) else parse_mesh(mesh)
    shape = (spec.data, *spec.spatial)
    strides = (spec.z * spec.y * spec.x, spec.y * spec.x, spec.x, 1)
    out = {}
    for k, axis in enumerate(SPATIAL_AXES, start=1):
        crosses = False
        for coords in itertools.product(*(range(n) for n in shape)):
            if coords[k] + 1 < shape[k]:
                i = sum(c * s for c, s in zip(coords, strides))
                if i // devices_per_node != (i + strides[k]) // devices_per_node:
                    crosses = True
                    break
        out[axis] = crosses
    return out
