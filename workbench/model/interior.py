"""Interior/boundary convolutions: the halo exchange hidden behind the block's interior.

A convolution on a block that needs halos is computed in two parts (as LBANN's DistConv
does):

* the **interior**: the output voxels whose window lies inside the block, convolved
  from the unpadded block (``VALID``), so it depends on no message;
* the **boundary shells**: the thin slabs of output voxels whose window reaches into a
  halo, convolved from slices of the halo-padded block (:func:`~workbench.model.halo.halo_pad`).

The halo messages go out in one phase (:func:`~workbench.model.halo_direct.direct_pad`:
every face, edge and corner straight from the unpadded block, none waiting for another) and
only the shells wait for them; the received messages pass through one
``optimization_barrier`` with the interior's output, so the padded block is assembled (and
the messages waited for) only once the interior exists. In the backward pass the block's
two gradients (the interior's input gradient and the adjoint exchange's) meet in one
barrier (``_tie``), so the returned messages are waited for only with the interior's
gradients computed. On GPUs the program is compiled with
:data:`GPU_COMPILER_OPTIONS` (XLA:GPU otherwise keeps one collective in flight). Halos
deeper than a block fall back to the chained exchange (:func:`~workbench.model.halo.halo_pad`). The
output is the concatenation of the parts, equal to the unsplit convolution up to the
order of float sums within each voxel (none: each output voxel is still one window).

Backward (autodiff of the split): the shells' input cotangents are thin; they go back
through the adjoint exchange (``direct_pad``'s or ``halo_pad``'s custom gradient), which waits only for
them, while the interior's input and kernel gradients (the bulk of the work) depend on
no message. The interior is convolved by the caller's ``conv``: the U-Net's ``conv3d`` puts
its input and the kernel through one ``optimization_barrier``, so the interior's input
gradient (the bulk of the layer's) exists only once its kernel gradient does, as before
the split. The shells are convolved plainly (:func:`conv_valid`): a barrier holding the
kernel together with a shell's input (which waits for the halos) made XLA:GPU schedule
every other use of the kernel, the interior convolution included, after the halos had
arrived (deviceless H100 compile: no convolution between any collective-permute's start
and done). Their kernel gradients are thin and may run late; their inputs are thin too.

Only axes that exchange halos (split over the mesh, with a halo) are split; along the
others the block pads itself with zeros (the volume's outer faces), locally.

Example
-------
>>> split_ranges(block=(16, 16, 16), kernel=(3, 3, 3), stride=(1, 1, 1),
...              halo=((1, 1),) * 3, exchanged=(True, True, False))
((1, 15), (1, 15), None)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from workbench.errors import UserError
from workbench.model.halo import halo_pad, halo_widths
from workbench.model.halo_direct import direct_applies, direct_pad
from workbench.options import COMM_OVERLAP

__all__ = [
    "split_ranges",
    "split_pays",
    "validate_comm_overlap",
    "resolve_comm_overlap",
    "interior_boundary_conv",
    "compiler_options",
    "GPU_COMPILER_OPTIONS",
    "MIN_INTERIOR_FRACTION",
]

Pairs = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

# ``auto`` splits a layer when its interior holds at least this fraction of the block's
# output voxels. Measured (benchmarks/interior_boundary.py, one CPU device, halos as zero
# padding so only the split's own cost shows; results/interior_boundary_cpu_2026-12-06.json):
# the split costs 3-27 % more compute at blocks of 16³-48³ (interior 0.67-0.92 of the
# outputs) and 14-63 % at 8³ (0.42-0.56), where the convolution itself takes 0.1-2 ms on
# CPU and a few µs on a GPU: too little to hide a message behind, and the shells add up to
# six kernel launches. 0.6 keeps 16³ and larger blocks of every layer kind and drops 8³.
MIN_INTERIOR_FRACTION = 0.6


def split_ranges(*, block, kernel, stride, halo, exchanged) -> tuple[tuple[int, int] | None, ...] | None:
    """Per axis, the [start, stop) of the interior output voxels of a block, or None for an
    axis that is not split; None in place of the tuple when some split axis has no interior.

    ``block``: the block's input extent per axis (a multiple of ``stride``); ``halo``: the
    (lo, hi) halo per axis (:func:`workbench.model.spec.conv_halo`); output ``i`` reads
    inputs ``[stride·i − lo, stride·i − lo + kernel − 1]`` of the block.
    """
    out = []
    for n, k, s, (lo, _), split in zip(block, kernel, stride, halo, exchanged):
        if not split:
            out.append(None)
            continue
        start = -(-lo // s)  # first output whose window starts inside the block
        stop = (n - k + lo) // s + 1  # one past the last whose window ends inside it
        if stop <= start:
            return None
        out.append((start, stop))
    return tuple(out)


def split_pays(*, block, kernel, stride, halo, exchanged) -> bool:
    """The ``auto`` rule, per layer and block: split when some axis exchanges halos and the
    interior holds at least :data:`MIN_INTERIOR_FRACTION` of the block's output voxels."""
    if not any(exchanged):
        return False
    ranges = split_ranges(block=block, kernel=kernel, stride=stride, halo=halo, exchanged=exchanged)
    if ranges is None:
        return False
    fraction = 1.0
    for n, s, r in zip(block, stride, ranges):
        if r is not None:
            fraction *= (r[1] - r[0]) / (n // s)
    return fraction >= MIN_INTERIOR_FRACTION


def validate_comm_overlap(choice) -> str:
    """``auto``, ``on`` or ``off`` (any case), or one :class:`UserError` naming the choices."""
    text = str(choice).strip().lower()
    if text not in COMM_OVERLAP:
        raise UserError(f"--comm-overlap {choice!r} is unknown; use one of {', '.join(COMM_OVERLAP)}")
    return text


def resolve_comm_overlap(choice: str, platform: str) -> str:
    """The per-layer setting (``off`` / ``on`` / ``auto``) for a user ``choice`` on ``platform``.

    ``auto`` is ``off`` on every platform for now, by measurement. On CPU, XLA runs
    collectives synchronously (nothing can travel while the interior is computed) and the
    split only costs time (:data:`MIN_INTERIOR_FRACTION`). On GPU, XLA:GPU's schedule of the
    split program with the one-phase exchange (deviceless H100, paper model at 512³) hides
    every forward halo byte on 2x2x2 and 4x4x4 and 96 % / 87 % of the backward's
    (benchmarks/halo_overlap.py, docs/scaling.md), at 9 % more memory, but no GPU has timed
    the split's extra convolution work (3-27 % more on CPU), so ``auto`` stays off until one
    does. ``on``
    splits every layer whose block has an interior; ``Partition(interior_boundary="auto")``
    applies the per-layer rule :func:`split_pays` for experiments.
    """
    text = validate_comm_overlap(choice)
    return "off" if text == "auto" else text


# XLA:GPU keeps one collective in flight at a time by default; the one-phase exchange sends
# up to 26 messages per convolution (7 on a 2x2x2 mesh), and with one in flight the scheduler
# leaves the interior convolution outside them. Measured (deviceless H100 compile, paper model,
# 512³ training step on 2x2x2; docs/scaling.md): forward halo bytes hidden 33 % at the
# default, 100 % with 8 or 32.
GPU_COMPILER_OPTIONS = {"xla_gpu_experimental_parallel_collective_overlap_limit": 32}


def compiler_options(interior_boundary: str, platform: str) -> dict | None:
    """XLA options for ``jax.jit`` of a program whose convolutions are split (``on``/``auto``)
    on ``platform``: :data:`GPU_COMPILER_OPTIONS` on GPUs, else None."""
    return dict(GPU_COMPILER_OPTIONS) if interior_boundary != "off" and platform == "gpu" else None


Conv = Callable[..., object]  # conv(x, kernel, stride, padding) -> output


def interior_boundary_conv(x_block, kernel, *, stride, halo: Pairs, mesh_shape, conv: Conv, mode: str = "exact"):
    """The convolution of ``x_block`` (N, z, y, x, C) with ``kernel`` at ``stride``, its halos
    (per axis (lo, hi)) exchanged over ``mesh_shape`` (``halo_pad``), as interior plus
    boundary shells. Same result as ``conv(halo_pad(x_block, ...), kernel, stride, "VALID")``.

    ``conv(x, kernel, stride, padding)`` convolves the interior (``padding`` per axis (lo, hi));
    the shells use :func:`conv_valid`.
    Raises if no axis can be split (call :func:`split_ranges` first).
    """
    block = x_block.shape[1:4]
    kernel_size = kernel.shape[:3]
    exchanged = tuple(m > 1 and (lo or hi) for m, (lo, hi) in zip(mesh_shape, halo))
    ranges = split_ranges(block=block, kernel=kernel_size, stride=stride, halo=halo, exchanged=exchanged)
    if ranges is None or not any(exchanged):
        raise UserError(f"a block of {block} cannot be split for a {kernel_size} kernel; use comm overlap 'off'")
    m = [n // s for n, s in zip(block, stride)]

    # Interior: the block itself along split axes (cut to the windows that stay inside),
    # zero padded by the halo along the others (no message there).
    cut, padding = [slice(None)] * 5, []
    for d, (r, s, k, (lo, hi)) in enumerate(zip(ranges, stride, kernel_size, halo)):
        if r is None:
            padding.append((lo, hi))
        else:
            cut[1 + d] = slice(s * r[0] - lo, s * (r[1] - 1) - lo + k)
            padding.append((0, 0))
    # Backward hold: the block's two gradients (the interior's, the adjoint exchange's) meet in
    # one barrier, so the returned halo messages are waited for once the interior's are done.
    x_inner, x_outer = _tie(x_block, x_block)
    out = conv(x_inner[tuple(cut)], kernel, tuple(stride), tuple(padding))
    # The shells read the padded block; the interior does not. One phase of messages (none
    # waits for another), written into the padded block only once the interior exists.
    widths = halo_widths(halo)
    if mode == "exact" and direct_applies(x_block.shape, widths, mesh_shape):
        xp_block, out = direct_pad(x_outer, widths, tuple(mesh_shape), out)
    else:  # halos deeper than a block: the chained exchange (several hops)
        xp_block = halo_pad(x_outer, width=halo, mesh_shape=tuple(mesh_shape), mode=mode)

    def shell(box):
        """The output voxels in ``box`` ((start, stop) per axis, grid of this layer), from the padded block."""
        window = [slice(None)] * 5
        for d, ((a, b), s, k) in enumerate(zip(box, stride, kernel_size)):
            window[1 + d] = slice(s * a, s * (b - 1) + k)
        return conv_valid(xp_block[tuple(window)], kernel, tuple(stride), ((0, 0),) * 3)

    # Shells: along each split axis the low and high slabs, spanning the interior range of
    # the earlier split axes and the whole range of the later ones; joined innermost first.
    split_axes = [d for d in range(3) if ranges[d] is not None]
    for d in reversed(split_axes):
        box = [(0, m[e]) for e in range(3)]
        for e in split_axes:
            if e < d:
                box[e] = ranges[e]
        a, b = ranges[d]
        parts = []
        if a > 0:
            parts.append(shell([*box[:d], (0, a), *box[d + 1 :]]))
        parts.append(out)
        if b < m[d]:
            parts.append(shell([*box[:d], (b, m[d]), *box[d + 1 :]]))
        out = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1 + d)
    return out


@jax.custom_vjp
def _tie(a, b):
    """``(a, b)`` unchanged; their cotangents pass through one ``optimization_barrier``."""
    return a, b


def _tie_fwd(a, b):
    return (a, b), None


def _tie_bwd(_, g):
    return lax.optimization_barrier(g)


_tie.defvjp(_tie_fwd, _tie_bwd)


def conv_valid(x, kernel, stride: Sequence[int], padding):
    """``lax.conv_general_dilated`` channels-last (NDHWC, DHWIO) with per-axis padding."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=tuple(stride), padding=padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )
