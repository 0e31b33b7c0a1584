"""Scaling on paper: halo messages from the layer spec alone, and which mesh axes leave a node.

The explicit backend exchanges, before every layer of the network's
:class:`~workbench.model.spec.NetworkSpec` that needs a halo (the paper U-Net's 3×3×3
convolutions: (1, 1) per axis), the layer's per-axis (lo, hi) halo
(:mod:`workbench.model.halo`): axis after axis (z, then y, then x), one
collective-permute per direction, each face including the halos received along the
earlier axes. For a conv whose input block is ``(bz, by, bx)`` (the block at the layer's
cumulative scale) with ``C`` channels of ``s`` bytes, one message of the paper U-Net is

* along z: ``1 × by × bx × C × s``
* along y: ``(bz + 2) × 1 × bx × C × s``
* along x: ``(bz + 2) × (by + 2) × 1 × C × s``

(a face spans the grown extent ``b + lo + hi`` of the earlier axes whether or not they
were exchanged: an axis of size 1 is zero padded instead; the message to the next device
is ``lo`` deep, the one to the previous device ``hi``, none where that width is 0). Every
axis with more than one device sends one message each way; an axis of exactly two devices
with equal depths sends one two-way message instead (its result buffer is one face: half
the bytes the audit counts there). A training step adds the
adjoint exchange (same shapes, opposite direction) for every conv whose input needs a
gradient: all but those reading the image. In training the decoder's first conv pads the
concatenation of skip and up-sampled features; in inference the paper U-Net pads the two
parts separately (same bytes, twice the messages).

So halo bytes scale with face area: ``(b + 2)²``-like terms, about 4× for a block twice
as wide (exactly: 387,171,344 bytes at 256³ on 2x2x2 without pairing vs 98,252,816 at
128³ on 4x4x4 for the paper model's training step, both equal to the compiled audit). :func:`halo_bytes` is the total the
HLO audit (:mod:`workbench.analysis.audit`) reports as collective-permute bytes: the
result buffers every device receives, zero-filled where it has no neighbour.

:func:`crossing_axes` says which mesh axes have neighbours on different nodes when
:func:`workbench.mesh.build_mesh` lays the mesh over ``jax.devices()`` in row-major
order (x fastest) and each node holds consecutive devices.
"""

from __future__ import annotations

import itertools
import math

from workbench.mesh import SPATIAL_AXES, MeshSpec, parse_mesh

__all__ = [
    "DTYPE_BYTES",
    "halo_messages",
    "halo_bytes",
    "busiest_device_halo_bytes",
    "crossing_axes",
    "simulate_step",
]

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}


def _conv_inputs(spec, *, train: bool) -> list:
    """(layer, channel parts, reads the image) of every layer that exchanges a halo, in program order."""
    from workbench.analysis.receptive import halo_layers
    from workbench.model.spec import INPUT, PAPER_UNET

    split = not train and spec.network_class == PAPER_UNET  # Conv3(split_inputs=not train)
    return [
        (layer, list(layer.in_channels) if split else [sum(layer.in_channels)], INPUT in layer.inputs)
        for layer in halo_layers(spec)
    ]


def halo_messages(
    config, block_shape, mesh="2x2x2", *, train: bool = True, dtype: str | None = None, paired: bool = True
) -> list[dict]:
    """Every halo message of one step on one device, as ``{"conv", "level", "pass",
    "axis", "direction", "bytes"}`` (``pass`` is ``forward`` or ``backward``; ``direction``
    +1 sends to the next device along ``axis``, -1 to the previous one, 0 both ways in one
    message).

    ``paired``: the explicit backend's exchange since the interior/boundary work: on an axis
    of two devices with equal (lo, hi) depths of at most one block, one message carries both
    directions (:func:`workbench.model.halo._paired`); ``False`` gives the exchange of
    programs compiled before (two messages there).

    ``config``: a :class:`~workbench.model.unet.UNetConfig` (its ``spec()`` and ``dtype``) or
    a :class:`~workbench.model.spec.NetworkSpec` (``dtype`` default float32).
    ``block_shape`` is the per-device block ``(bz, by, bx)`` at full resolution (a layer at
    cumulative scale ``s`` sees ``b // s``); axes of ``mesh`` with one device exchange nothing.
    """
    spec = config.spec() if hasattr(config, "spec") else config
    size = DTYPE_BYTES[dtype or getattr(config, "dtype", "float32")]
    sizes = parse_mesh(mesh).spatial
    scales = list(dict.fromkeys(spec.stage_scales))
    out = []
    for pass_ in ["forward", "backward"] if train else ["forward"]:
        for layer, parts, reads_image in _conv_inputs(spec, train=train):
            if pass_ == "backward" and reads_image:
                continue  # the image needs no gradient
            block = [b // s for b, s in zip(block_shape, layer.in_scale)]
            grown = [b + lo + hi for b, (lo, hi) in zip(block, layer.halo)]
            for channels, k in itertools.product(parts, range(3)):
                if sizes[k] == 1:
                    continue
                face = math.prod(grown[:k]) * math.prod(block[k + 1 :])
                lo, hi = layer.halo[k]
                if paired and sizes[k] == 2 and lo == hi and 0 < lo <= block[k]:
                    out.append(
                        {
                            "conv": layer.name,
                            "level": scales.index(layer.in_scale),
                            "pass": pass_,
                            "axis": SPATIAL_AXES[k],
                            "direction": 0,
                            "bytes": face * lo * channels * size,
                        }
                    )
                    continue
                for direction, width in ((1, lo), (-1, hi)):
                    # a halo deeper than the block takes several hops (workbench.model.halo)
                    for seg in (min(block[k], width - h * block[k]) for h in range(-(-width // block[k]))):
                        out.append(
                            {
                                "conv": layer.name,
                                "level": scales.index(layer.in_scale),
                                "pass": pass_,
                                "axis": SPATIAL_AXES[k],
                                "direction": direction,
                                "bytes": face * seg * channels * size,
                            }
                        )
    return out


def halo_bytes(config, block_shape, mesh="2x2x2", *, train: bool = True, paired: bool = True) -> int:
    """Collective-permute bytes per device and step as the HLO audit counts them
    (every message's result buffer, zero-filled at the volume's outer faces)."""
    return sum(m["bytes"] for m in halo_messages(config, block_shape, mesh, train=train, paired=paired))


def busiest_device_halo_bytes(config, block_shape, mesh, *, train: bool = True) -> int:
    """Bytes the busiest device actually receives: on an axis of 2 devices every
    device has one neighbour (one of the two directions, or the one two-way message,
    carries data to it), on an axis of 3 or more the interior devices have two."""
    spec = parse_mesh(mesh)
    sizes = dict(zip(SPATIAL_AXES, spec.spatial))
    total = 0
    for m in halo_messages(config, block_shape, spec, train=train):
        if sizes[m["axis"]] >= 3 or m["direction"] in (0, 1):
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


def simulate_step(events: list[dict], compute_s: float, seconds_of, *, flop_rate: float, byte_rate: float) -> dict:
    """Time one step as scheduled: a compute stream that runs the schedule in order and one
    communication stream that runs the collectives one at a time, in the order they start.

    ``events``: :func:`workbench.analysis.schedule.timeline`. ``compute_s``: the measured
    compute of the step, split over the compute events in proportion to
    ``flops / flop_rate + bytes / byte_rate`` (only the ratio of the two rates matters).
    ``seconds_of(event)``: how long a collective takes on the wire (latency + bytes / rate).
    A ``start`` lets the compute stream go on; its ``done`` waits for the message; a
    ``sync`` collective stops the compute stream until it is through. Returns ``step_s``,
    ``communication_s`` (every collective's time), ``exposed_s`` (step - compute) and
    ``hidden_s`` (communication that ran under compute).
    """
    weights = [e["flops"] / flop_rate + e["bytes"] / byte_rate for e in events if e["event"] == "compute"]
    scale = compute_s / sum(weights) if sum(weights) else 0.0
    clock = wire = comm = 0.0  # compute stream, communication stream, their sum of message times
    ends: dict[int, float] = {}
    for e in events:
        if e["event"] == "compute":
            clock += (e["flops"] / flop_rate + e["bytes"] / byte_rate) * scale
            continue
        if e["event"] == "done":
            clock = max(clock, ends.pop(e["id"], clock))
            continue
        t = seconds_of(e)
        comm += t
        wire = max(clock, wire) + t
        if e["event"] == "start":
            ends[e["id"]] = wire
        else:
            clock = wire
    step = max(clock, compute_s)
    return {
        "step_s": step,
        "communication_s": comm,
        "exposed_s": step - compute_s,
        "hidden_s": comm - (step - compute_s),
    }
