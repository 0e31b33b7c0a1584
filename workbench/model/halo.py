"""Halo exchange: the one module that talks to neighbours.

Every function here runs *inside* ``jax.shard_map`` over a mesh with the axes of
:mod:`workbench.mesh`; blocks are (N, z, y, x, C) with the spatial dims split.

``halo_pad(x_block, width=w, mesh_shape=(mz, my, mx), mode=...)`` returns the block
grown by ``w`` voxels on each side of each spatial axis (or, with per-axis (lo, hi)
widths, by ``lo`` below and ``hi`` above: the halos of strided and anisotropic layers):

* ``exact``: the grown faces hold the neighbours' voxels. Axis after axis (z, then
  y, then x), each exchange sends faces that already include the halos received
  along the previous axes, so edges and corners arrive from diagonal neighbours
  without extra messages. Each face is assembled from the block and the earlier
  (small) messages; the padded block is written once at the end, by one pad and
  one in-place ``dynamic_update_slice`` per received slab. Reading faces out of the
  padded block while writing halos into it made XLA copy the whole padded block at
  each exchange (two alive at once: the inference peak). ``ppermute`` leaves
  unlisted destinations at zero: the shards on the volume's outer faces get exactly
  the convolution's zero padding. Widths wider than a block take several hops.
* ``zero``: every shard pads itself with zeros, as naive tiling does.
* ``reflect`` / ``replicate``: every shard pads itself from its own voxels
  (``numpy.pad`` modes ``reflect`` / ``edge``) at faces shared with a neighbour; the
  volume's outer faces stay zero so that differences appear only at seams.

Only ``exact`` is exact; the others exist to show seam artifacts.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from workbench.errors import UserError
from workbench.mesh import SPATIAL_AXES
from workbench.options import HALO_MODES as _NAMED_HALO_MODES

__all__ = ["HALO_MODES", "halo_pad", "halo_widths", "validate_halo", "global_index"]

# What each layer pads with: the named modes but "overlap" (one input halo, workbench.execute.run).
HALO_MODES = tuple(m for m in _NAMED_HALO_MODES if m != "overlap")
_SPATIAL_DIMS = (1, 2, 3)


def validate_halo(halo) -> str | int:
    """Normalise a halo choice: one of :data:`HALO_MODES`, ``overlap``, or an int width >= 0."""
    if isinstance(halo, bool):
        raise UserError(f"halo={halo!r} is not a halo mode; use one of {HALO_MODES + ('overlap',)} or a width >= 0")
    if isinstance(halo, int):
        if halo < 0:
            raise UserError(f"halo width {halo} must be >= 0; use 0 (no halo) or a positive width")
        return halo
    if isinstance(halo, str):
        text = halo.strip().lower()
        if text.lstrip("-").isdigit():
            return validate_halo(int(text))
        if text in HALO_MODES or text == "overlap":
            return text
    raise UserError(
        f"unknown halo mode {halo!r}; use one of {', '.join(HALO_MODES)}, 'overlap', or an integer width (e.g. 4)"
    )


Width = int | Sequence[int | tuple[int, int]]


def halo_widths(width: Width) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Per spatial axis (z, y, x), the (lo, hi) halo: ``w`` means ``w`` on every side; a
    3-sequence gives one entry per axis, each ``w`` (both sides) or ``(lo, hi)``."""
    if isinstance(width, (int, np.integer)) and not isinstance(width, bool):
        pairs = ((int(width), int(width)),) * 3
    else:
        try:
            entries = list(width)
            pairs = tuple(
                (int(e), int(e)) if isinstance(e, (int, np.integer)) else (int(e[0]), int(e[1])) for e in entries
            )
        except (TypeError, ValueError, IndexError):
            raise UserError(f"halo width {width!r} must be an int or 3 per-axis widths or (lo, hi) pairs") from None
        if len(pairs) != 3 or any(len(e) != 2 for e in pairs):
            raise UserError(f"halo width {width!r} must be an int or 3 per-axis widths or (lo, hi) pairs")
    for lo, hi in pairs:
        if lo < 0 or hi < 0:
            shown = width if isinstance(width, (int, np.integer)) else min(lo, hi)
            raise UserError(f"halo width {shown} must be >= 0")
    return pairs


def halo_pad(x_block, *, width: Width, mesh_shape: tuple[int, int, int], mode: str = "exact"):
    """Grow a (N, z, y, x, C) block by ``width`` on the sides of each spatial axis.

    ``width``: an int (every side, as the U-Net's 3×3×3 convolutions need), or per axis a
    width or a (lo, hi) pair (the layer spec's asymmetric halos, e.g. (1, 0) for a
    stride-2 kernel-3 convolution). Call inside ``shard_map`` over a mesh whose spatial
    axes have sizes ``mesh_shape``. Axes of size 1 are zero padded (the volume's outer faces).
    """
    widths = halo_widths(width)
    if mode not in HALO_MODES:
        raise UserError(f"unknown halo mode {mode!r}; use one of {HALO_MODES}")
    if not any(lo or hi for lo, hi in widths):
        return x_block
    if mode == "exact":
        return _exact_pad(x_block, widths, tuple(mesh_shape))
    if mode == "zero":
        return jnp.pad(x_block, _grow(widths))
    np_mode = "reflect" if mode == "reflect" else "edge"
    for dim, name, size, (w_lo, w_hi) in zip(_SPATIAL_DIMS, SPATIAL_AXES, mesh_shape, widths):
        if mode == "reflect" and x_block.shape[dim] <= max(w_lo, w_hi):
            raise UserError(
                f"halo mode 'reflect' needs shards wider than the halo ({max(w_lo, w_hi)}) but the "
                f"shard is {x_block.shape[dim]} voxels along {name}; use fewer devices along {name}"
            )
        pads = [(0, 0)] * x_block.ndim
        pads[dim] = (w_lo, w_hi)
        if size == 1:
            x_block = jnp.pad(x_block, pads)
            continue
        x_block = jnp.pad(x_block, pads, mode=np_mode)
        # The volume's outer faces keep the convolution's zero padding.
        index = lax.axis_index(name)
        n = x_block.shape[dim]
        if w_lo:
            lo = lax.slice_in_dim(x_block, 0, w_lo, axis=dim)
            x_block = lax.dynamic_update_slice_in_dim(x_block, jnp.where(index == 0, 0, lo), 0, axis=dim)
        if w_hi:
            hi = lax.slice_in_dim(x_block, n - w_hi, n, axis=dim)
            x_block = lax.dynamic_update_slice_in_dim(x_block, jnp.where(index == size - 1, 0, hi), n - w_hi, axis=dim)
    return x_block


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _exact_pad(x_block, widths, mesh_shape: tuple[int, int, int]):
    """``exact`` halo: exchange along z, y, x; then pad once and write the slabs in.

    ``widths``: (lo, hi) per spatial axis. Its gradient (:func:`_exact_pad_bwd`) is the
    adjoint exchange, written by hand: differentiating the face assembly would pad every
    face's cotangent to the whole block (+22 % training memory for the paper model at
    256³ on 2x2x2).
    """
    received = {}  # dim -> (low slab, high slab), None where that side's width is 0;
    # a slab spans the grown extent of earlier axes

    def face(dim, start, stop):
        """Voxels [start, stop) along ``dim`` of the block grown along the earlier axes."""
        part = lax.slice_in_dim(x_block, start, stop, axis=dim)
        for prev in _SPATIAL_DIMS[: _SPATIAL_DIMS.index(dim)]:
            if prev in received:
                parts = [
                    lax.slice_in_dim(slab, start, stop, axis=dim) if slab is not None else None
                    for slab in received[prev]
                ]
                part = jnp.concatenate([p for p in (parts[0], part, parts[1]) if p is not None], axis=prev)
            else:  # an axis of size 1 (or no halo): the volume's zero padding
                pads = [(0, 0)] * part.ndim
                pads[prev] = widths[prev - 1]
                part = jnp.pad(part, pads)
        return part

    for dim, name, size in zip(_SPATIAL_DIMS, SPATIAL_AXES, mesh_shape):
        if _exchanged(size, widths[dim - 1]):
            received[dim] = _exchange_axis(face, dim, name, size, widths[dim - 1], x_block.shape[dim])
    xp_block = jnp.pad(x_block, _grow(widths))  # f32[n, z+lo+hi, y+lo+hi, x+lo+hi, c]
    for dim, (lo, hi) in received.items():
        if lo is not None:
            xp_block = lax.dynamic_update_slice(xp_block, lo, _slab_start(dim, True, x_block.shape, widths))
        if hi is not None:
            xp_block = lax.dynamic_update_slice(xp_block, hi, _slab_start(dim, False, x_block.shape, widths))
    return xp_block


def _paired(size: int, pair: tuple[int, int], n: int) -> bool:
    """Whether an axis of 2 devices exchanges both halos in one message: equal depths of
    at most one block (one hop), e.g. the (1, 1) halo of a 3×3×3 convolution."""
    return size == 2 and pair[0] == pair[1] and 0 < pair[0] <= n


def _exchanged(size: int, pair: tuple[int, int]) -> bool:
    """Whether an axis exchanges halos: it is split and needs some."""
    return size > 1 and (pair[0] > 0 or pair[1] > 0)


def _grow(widths):
    """``jnp.pad`` widths that grow a (N, z, y, x, C) block by (lo, hi) per spatial axis."""
    return [(0, 0), *widths, (0, 0)]


def _slab_start(dim: int, low: bool, block_shape, widths) -> list[int]:
    """Where the slab received along ``dim`` sits in the grown block: at the grown block's
    origin along earlier axes (it spans their halos), at the block's own origin along
    later ones, and in the low or high halo along ``dim``."""
    start = [0, *(0 if d < dim else widths[d - 1][0] for d in _SPATIAL_DIMS), 0]
    start[dim] = 0 if low else widths[dim - 1][0] + block_shape[dim]
    return start


def _hops(width: int, n: int):
    """(hop, seg) per exchange: a halo ``width`` deep over blocks of ``n`` voxels takes
    ``ceil(width / n)`` hops, the ``hop``-th bringing ``seg`` voxels from ``hop`` devices away."""
    for hop in range(1, -(-width // n) + 1):
        yield hop, min(n, width - (hop - 1) * n)


def _exact_pad_fwd(x_block, widths, mesh_shape):
    return _exact_pad(x_block, widths, mesh_shape), None


def _exact_pad_bwd(widths, mesh_shape, _, g):
    """The adjoint exchange: each halo's cotangent goes back to the shard its voxels
    came from and is added there, axes in reverse order (x, y, z), so edge and corner
    cotangents travel back along the diagonal path they came by.

    Mirrors the forward: the cotangents of the received slabs are cut out of ``g``;
    what comes back for a face is split into its parts, added to the earlier axes'
    slab cotangents (still to be sent) and to the block's own gradient. The block's
    gradient is ``g``'s interior, made once and updated in place.
    """
    lo_w = {d: widths[d - 1][0] for d in _SPATIAL_DIMS}
    hi_w = {d: widths[d - 1][1] for d in _SPATIAL_DIMS}
    n = {d: g.shape[d] - lo_w[d] - hi_w[d] for d in _SPATIAL_DIMS}
    names = dict(zip(_SPATIAL_DIMS, SPATIAL_AXES))
    sizes = dict(zip(_SPATIAL_DIMS, mesh_shape))
    exchanged = [d for d in _SPATIAL_DIMS if _exchanged(sizes[d], widths[d - 1])]

    block_shape = [g.shape[0], n[1], n[2], n[3], g.shape[4]]

    def cut(d, low: bool):
        """Where the forward wrote the slab received along ``d`` (None: no halo on that side)."""
        depth = lo_w[d] if low else hi_w[d]
        if depth == 0:
            return None
        start = _slab_start(d, low, block_shape, widths)
        size = [
            g.shape[0],
            *(n[e] + lo_w[e] + hi_w[e] if e < d else depth if e == d else n[e] for e in _SPATIAL_DIMS),
            g.shape[4],
        ]
        return lax.slice(g, start, [a + b for a, b in zip(start, size)])

    slabs = {d: [cut(d, True), cut(d, False)] for d in exchanged}
    grad = g[:, lo_w[1] : lo_w[1] + n[1], lo_w[2] : lo_w[2] + n[2], lo_w[3] : lo_w[3] + n[3], :]

    def scatter_face(r, d, start):
        """Add the cotangent of ``face(d, start, start + seg)`` where its voxels came from."""
        nonlocal grad
        for prev in reversed(_SPATIAL_DIMS[: _SPATIAL_DIMS.index(d)]):
            total = r.shape[prev]
            if prev in slabs:
                if lo_w[prev]:
                    part = lax.slice_in_dim(r, 0, lo_w[prev], axis=prev)
                    slabs[prev][0] = _add_in_dim(slabs[prev][0], part, start, d)
                if hi_w[prev]:
                    part = lax.slice_in_dim(r, total - hi_w[prev], total, axis=prev)
                    slabs[prev][1] = _add_in_dim(slabs[prev][1], part, start, d)
            r = lax.slice_in_dim(r, lo_w[prev], total - hi_w[prev], axis=prev)
        grad = _add_in_dim(grad, r, start, d)

    for d in reversed(exchanged):
        lo, hi = slabs[d]
        name, size = names[d], sizes[d]
        if _paired(size, (lo_w[d], hi_w[d]), n[d]):  # one message each way (see _exchange_axis)
            seg, first = lo_w[d], lax.axis_index(name) == 0
            send = jnp.where(first, lax.slice_in_dim(hi, 0, seg, axis=d), lax.slice_in_dim(lo, 0, seg, axis=d))
            back = lax.ppermute(send, name, [(0, 1), (1, 0)])
            zero = jnp.zeros((), back.dtype)
            scatter_face(jnp.where(first, back, zero), d, n[d] - seg)  # the second's low halo: my tail
            scatter_face(jnp.where(first, zero, back), d, 0)  # the first's high halo: my head
            continue
        # My low halo's segments came from the tails of the devices before,
        # my high halo's from the heads of the devices after: send them back.
        for hop, seg in _hops(lo_w[d], n[d]) if lo is not None else ():
            lo_end = lo_w[d] - (hop - 1) * n[d]
            back = lax.ppermute(
                lax.slice_in_dim(lo, lo_end - seg, lo_end, axis=d), name, [(i + hop, i) for i in range(size - hop)]
            )
            scatter_face(back, d, n[d] - seg)
        for hop, seg in _hops(hi_w[d], n[d]) if hi is not None else ():
            hi_start = (hop - 1) * n[d]
            back = lax.ppermute(
                lax.slice_in_dim(hi, hi_start, hi_start + seg, axis=d), name, [(i, i + hop) for i in range(size - hop)]
            )
            scatter_face(back, d, 0)
    return (grad,)


_exact_pad.defvjp(_exact_pad_fwd, _exact_pad_bwd)


def _add_in_dim(x, update, start: int, dim: int):
    """``x`` with ``update`` added to the slab of ``x`` that starts at ``start`` along ``dim``."""
    current = lax.slice_in_dim(x, start, start + update.shape[dim], axis=dim)
    return lax.dynamic_update_slice_in_dim(x, current + update, start, axis=dim)


def _exchange_axis(face, dim: int, name: str, size: int, pair: tuple[int, int], n: int):
    """The low and high halo slabs along ``dim`` (``pair`` = their depths), received from
    neighbours; None for a side of depth 0.

    ``face(dim, start, stop)`` gives this block's voxels to send. The interior is
    ``n`` voxels; a depth greater than ``n`` takes ``ceil(depth / n)`` hops.

    Two devices along ``dim`` with equal depths (:func:`_paired`): one ``ppermute`` each way
    instead of two, the first sending its tail and the second its head (each collective is a
    rendezvous of every device on XLA:CPU and a launch on a GPU).
    """
    if _paired(size, pair, n):
        seg, first = pair[0], lax.axis_index(name) == 0
        got = lax.ppermute(jnp.where(first, face(dim, n - seg, n), face(dim, 0, seg)), name, [(0, 1), (1, 0)])
        zero = jnp.zeros((), got.dtype)
        return jnp.where(first, zero, got), jnp.where(first, got, zero)
    lows, highs = [], []
    for hop, seg in _hops(pair[0], n):
        # Low halo <- the last `seg` voxels of the device `hop` places before.
        lows.insert(0, lax.ppermute(face(dim, n - seg, n), name, [(i, i + hop) for i in range(size - hop)]))
    for hop, seg in _hops(pair[1], n):
        # High halo <- the first `seg` voxels of the device `hop` places after.
        highs.append(lax.ppermute(face(dim, 0, seg), name, [(i + hop, i) for i in range(size - hop)]))

    def join(parts):
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=dim)

    return join(lows), join(highs)


def global_index(block_size: int, name: str, size: int, *, offset: int = 0, length: int | None = None):
    """Global voxel indices of this shard's positions along one axis (1-D int32).

    ``offset`` shifts the local origin (e.g. ``-halo`` for a grown block) and
    ``length`` is the local extent (default ``block_size``).
    """
    start = (lax.axis_index(name) * block_size if size > 1 else 0) + offset
    return start + jnp.arange(block_size if length is None else length, dtype=jnp.int32)
