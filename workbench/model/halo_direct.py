"""One-phase exact halo exchange: every neighbour's message sent at once from the unpadded block.

:func:`~workbench.model.halo.halo_pad`'s ``exact`` mode exchanges axis after axis (z, then
y, then x), each face carrying the halos received before (three chained phases).
:func:`direct_pad` sends every face, edge and corner straight to the neighbour that needs it
(up to 26 messages; on an axis of two devices one message per combination of axes, up to 7
on a 2x2x2 mesh), each cut from the unpadded block, so no message depends on another. Edge
and corner messages are one ``ppermute`` over the combined mesh axes. Its gradient is the
same in reverse (each halo's cotangent sent back, one phase, added where it came from).

Only halos at most one block deep (one hop); :func:`direct_applies` says when.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax

from workbench.mesh import SPATIAL_AXES
from workbench.model.halo import _paired  # the rule that pairs an axis of two devices

__all__ = ["direct_applies", "direct_pad"]

_DIMS = (1, 2, 3)


def direct_applies(block_shape, widths, mesh_shape) -> bool:
    """Whether every exchanged halo is at most one block deep (no multi-hop messages)."""
    return all(size == 1 or (lo <= n and hi <= n) for size, (lo, hi), n in zip(mesh_shape, widths, block_shape[1:4]))


def _options(size, pair, n):
    """Per axis, the sides a message may cover: 0 (the block's own extent), -1 (the low
    halo, from the device before), +1 (the high halo, from the device after), or "pair"
    (an axis of two devices with equal depths: the other device's halo facing me)."""
    if size == 1 or (pair[0] == 0 and pair[1] == 0):
        return (0,)
    if _paired(size, pair, n):
        return (0, "pair")
    return (0, *((-1,) if pair[0] else ()), *((1,) if pair[1] else ()))


def _messages(block_shape, widths, mesh_shape):
    """(sides per axis) for every message of one exchange."""
    opts = [_options(m, w, n) for m, w, n in zip(mesh_shape, widths, block_shape[1:4])]
    return [s for s in itertools.product(*opts) if any(v != 0 for v in s)]


def _perm(sides, mesh_shape):
    """(axis names, source-target pairs) of one message over the combined mesh axes: the
    device at position p sends to p - side (a low halo comes from the device before)."""
    axes = [k for k, s in enumerate(sides) if s != 0]
    sizes = [mesh_shape[k] for k in axes]
    pairs = []
    for src in itertools.product(*(range(m) for m in sizes)):
        dst = []
        for k, p in zip(axes, src):
            s = sides[k]
            dst.append(1 - p if s == "pair" else p - s)
        if all(0 <= d < m for d, m in zip(dst, sizes)):
            pairs.append((_linear(src, sizes), _linear(dst, sizes)))
    return tuple(SPATIAL_AXES[k] for k in axes), pairs


def _linear(pos, sizes):
    i = 0
    for p, m in zip(pos, sizes):
        i = i * m + p
    return i


def _send_start(sides, widths, n, positions):
    """Start (per spatial axis) of what this device sends for a message with ``sides``:
    the tail of the block for a low halo, its head for a high one."""
    start = []
    for k, s in enumerate(sides):
        lo = widths[k][0]
        if s == 0 or s == 1:
            start.append(0)
        elif s == -1:
            start.append(n[k] - lo)
        else:  # pair: the first device sends its tail, the second its head
            start.append(jnp.where(positions[k] == 0, n[k] - lo, 0))
    return start


def _recv_start(sides, widths, n, positions):
    """Where the message lands in the padded block."""
    start = []
    for k, s in enumerate(sides):
        lo = widths[k][0]
        if s == 0:
            start.append(lo)
        elif s == -1:
            start.append(0)
        elif s == 1:
            start.append(lo + n[k])
        else:  # pair: the first device receives its high halo, the second its low one
            start.append(jnp.where(positions[k] == 0, lo + n[k], 0))
    return start


def _extent(sides, widths, n):
    return [n[k] if s == 0 else widths[k][0] if s in (-1, "pair") else widths[k][1] for k, s in enumerate(sides)]


def _dyn_slice(x, start, size):
    return lax.dynamic_slice(x, [0, *start, 0], [x.shape[0], *size, x.shape[4]])


def _dyn_update(x, update, start):
    zero = jnp.zeros((), jnp.int32)
    return lax.dynamic_update_slice(x, update, [zero, *(jnp.asarray(s, jnp.int32) for s in start), zero])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def direct_pad(x_block, widths, mesh_shape, after=None):
    """``x_block`` (N, z, y, x, C) grown by ``widths`` ((lo, hi) per spatial axis) with the
    neighbours' voxels, every message sent at once; zeros at the volume's outer faces.
    Call inside ``shard_map``; needs :func:`direct_applies`.

    ``after``: arrays the received messages are held with (one ``optimization_barrier``)
    before they are written into the padded block, e.g. the interior convolution's output:
    the block is assembled only once they exist (a schedule hint, values unchanged). Then
    the result is (padded block, ``after`` as held): use the latter in its place (XLA drops
    barrier operands whose outputs are unused)."""
    n = x_block.shape[1:4]
    positions = [lax.axis_index(a) if m > 1 else 0 for a, m in zip(SPATIAL_AXES, mesh_shape)]
    received = []
    for sides in _messages(x_block.shape, widths, mesh_shape):
        names, pairs = _perm(sides, mesh_shape)
        part = _dyn_slice(x_block, _send_start(sides, widths, n, positions), _extent(sides, widths, n))
        received.append((sides, lax.ppermute(part, names, pairs)))
    if after is not None:
        arrays, after = lax.optimization_barrier(([got for _, got in received], after))
        received = [(sides, got) for (sides, _), got in zip(received, arrays)]
    xp_block = jnp.pad(x_block, [(0, 0), *widths, (0, 0)])  # f32[n, z+lo+hi, y+lo+hi, x+lo+hi, c]
    for sides, got in received:
        xp_block = _dyn_update(xp_block, got, _recv_start(sides, widths, n, positions))
    return xp_block if after is None else (xp_block, after)


def _direct_fwd(x_block, widths, mesh_shape, after=None):
    return direct_pad(x_block, widths, mesh_shape, after), None


def _direct_bwd(widths, mesh_shape, _, g):
    """Each halo's cotangent back to the device it came from (one phase), added there."""
    g, g_after = g if isinstance(g, tuple) else (g, None)
    n = tuple(g.shape[d] - widths[d - 1][0] - widths[d - 1][1] for d in _DIMS)
    positions = [lax.axis_index(a) if m > 1 else 0 for a, m in zip(SPATIAL_AXES, mesh_shape)]
    block_shape = (g.shape[0], *n, g.shape[4])
    grad = lax.slice(
        g, [0, *(w[0] for w in widths), 0], [g.shape[0], *(w[0] + m for w, m in zip(widths, n)), g.shape[4]]
    )
    back = []
    for sides in _messages(block_shape, widths, mesh_shape):
        names, pairs = _perm(sides, mesh_shape)
        cut = _dyn_slice(g, _recv_start(sides, widths, n, positions), _extent(sides, widths, n))
        back.append((sides, lax.ppermute(cut, names, [(b, a) for a, b in pairs])))
    for sides, got in back:
        start = _send_start(sides, widths, n, positions)
        grad = _dyn_update(grad, _dyn_slice(grad, start, got.shape[1:4]) + got, start)
    return grad, g_after


direct_pad.defvjp(_direct_fwd, _direct_bwd)
