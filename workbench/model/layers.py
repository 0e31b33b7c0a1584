"""Partition-aware layers: 3×3×3 convolution, normalisation, dropout, masking.

A :class:`Partition` says how the model is laid out (single device, our explicit
``shard_map`` with halos, or GSPMD). Layers ask it three questions:

* how to pad a convolution's input (``conv_input``): halo exchange, self padding or
  the convolution's own ``SAME`` padding;
* which voxels are inside the volume (``valid_mask``): the partitioned run may pad
  the volume beyond the reference's padding so the mesh splits it evenly; those
  voxels are zeroed after every layer so they act as "outside the volume";
* how to sum statistics over the whole volume (``psum``): across shards for the
  explicit backend, a plain sum elsewhere.

So one model definition serves every backend, and the partitioned output equals the
single-device output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from workbench.errors import UserError
from workbench.mesh import ACTIVATION_SPEC, DATA_AXIS, SPATIAL_AXES
from workbench.model.halo import global_index, halo_pad
from workbench.model.interior import interior_boundary_conv, split_pays, split_ranges
from workbench.options import NORMS

# A resolution level: the U-Net's level number (scale 2**level on every axis) or a
# per-axis (z, y, x) cumulative stride (nnU-Net's anisotropic stages).
Level = int | tuple[int, int, int]

__all__ = ["Partition", "Conv3", "Norm", "hash_dropout", "NORMS", "he_normal"]


# The paper U-Net's geometry, as its layer spec (NetworkSpec.paper) describes it (tests check the two agree).
CONV3_KERNEL = (3, 3, 3)
CONV3_HALO = 1  # (1, 1) on every axis: SAME padding of a 3-wide kernel


@dataclass(frozen=True)
class Partition:
    """Static description of how a model is partitioned (hashable: a Flax attribute).

    backend
        ``reference`` (one device), ``explicit`` (inside ``shard_map``) or ``gspmd``
        (global arrays under ``jax.jit`` with sharding constraints).
    mesh_shape, data
        spatial mesh sizes (z, y, x) and the data-parallel size.
    valid_shape
        level-0 extent of the reference's domain (the volume padded to a multiple of
        2^(depth-1)); ``None`` when the whole array is valid.
    global_shape
        level-0 extent of the padded global array the partitioned run works on.
    halo
        per-layer halo mode for the explicit backend (see :mod:`workbench.model.halo`).
    overlap
        explicit backend only: width of a single input halo (level-0 voxels) after
        which every shard runs the network alone, with no per-layer exchange.
    mesh
        the ``jax.sharding.Mesh`` (gspmd sharding constraints).
    interior_boundary
        explicit backend, ``exact`` halos: ``off`` (each convolution waits for its halos),
        ``on`` (every convolution whose block has an interior is computed as interior +
        boundary shells, :mod:`workbench.model.interior`) or ``auto`` (per layer and block,
        :func:`~workbench.model.interior.split_pays`). Not to be confused with ``overlap``.
    """

    backend: str = "reference"
    mesh_shape: tuple[int, int, int] = (1, 1, 1)
    data: int = 1
    valid_shape: tuple[int, int, int] | None = None
    global_shape: tuple[int, int, int] | None = None
    halo: str = "exact"
    overlap: int = 0
    mesh: Any = None
    interior_boundary: str = "off"

    # -- geometry ---------------------------------------------------------------
    def _block(self, dim: int, level) -> int:
        return self.global_shape[dim] // self.mesh_shape[dim] // _scale(level, dim)

    def _axis_positions(self, dim: int, level: Level, local: int):
        """Global indices (level ``level``) of the ``local`` positions along spatial ``dim``."""
        if self.backend != "explicit":
            return jnp.arange(local, dtype=jnp.int32)
        name, size = SPATIAL_AXES[dim], self.mesh_shape[dim]
        halo = self.overlap // _scale(level, dim)
        return global_index(self._block(dim, level), name, size, offset=-halo, length=local)

    def valid_mask(self, x, level: Level):
        """(1, z, y, x, 1) bool mask of voxels inside the reference domain, or None."""
        if self.valid_shape is None:
            return None
        mask = None
        for dim in range(3):
            valid = self.valid_shape[dim] // _scale(level, dim)
            local = x.shape[1 + dim]
            covers_all = self.overlap == 0 and self.global_shape[dim] <= self.valid_shape[dim]
            if covers_all:
                continue
            pos = self._axis_positions(dim, level, local)
            ok = (pos >= 0) & (pos < valid)
            shape = [1, 1, 1, 1, 1]
            shape[1 + dim] = local
            ok = ok.reshape(shape)
            mask = ok if mask is None else mask & ok
        return mask

    def mask(self, x, level: Level):
        """Zero the voxels outside the volume (a no-op when there are none)."""
        valid = self.valid_mask(x, level)
        x = x if valid is None else jnp.where(valid, x, jnp.zeros((), x.dtype))
        return self.constrain(x)

    def stats_mask(self, x, level: Level):
        """Voxels whose statistics count: inside the volume and (overlap mode) owned."""
        valid = self.valid_mask(x, level)
        if self.overlap == 0:
            return valid
        for dim in range(3):
            halo = self.overlap // _scale(level, dim)
            local = x.shape[1 + dim]
            idx = jnp.arange(local)
            own = (idx >= halo) & (idx < local - halo)
            shape = [1, 1, 1, 1, 1]
            shape[1 + dim] = local
            valid = own.reshape(shape) if valid is None else valid & own.reshape(shape)
        return valid

    # -- communication -----------------------------------------------------------
    def conv_input(self, x, level: int):
        """Input and padding for a 3×3×3 VALID/SAME convolution at ``level``."""
        if self.backend != "explicit" or self.overlap > 0:
            return x, "SAME"
        if self.halo == "exact" and self.mesh_shape == (1, 1, 1):
            return x, "SAME"
        return halo_pad(x, width=CONV3_HALO, mesh_shape=self.mesh_shape, mode=self.halo), "VALID"

    def padded_conv_input(self, x, level, padding, halo):
        """Input and explicit padding for a convolution at ``level`` with per-axis ``padding``
        ((lo, hi) per spatial axis) whose blocks need the per-axis ``halo`` (see
        :mod:`workbench.model.spec`): the reference pads, the explicit backend exchanges halos."""
        if self.backend != "explicit" or (self.halo == "exact" and self.mesh_shape == (1, 1, 1)):
            return x, tuple(padding)
        if self.overlap > 0:
            raise UserError("overlap halos are not available for per-axis (nnU-Net) layers; use halo='exact'")
        return halo_pad(x, width=tuple(halo), mesh_shape=self.mesh_shape, mode=self.halo), ((0, 0),) * 3

    def splits(self, block, kernel, stride, halo) -> bool:
        """Whether a convolution on ``block`` (input extent per axis) with this ``kernel``,
        ``stride`` and per-axis (lo, hi) ``halo`` is computed as interior + boundary shells."""
        if self.backend != "explicit" or self.halo != "exact" or self.overlap > 0 or self.interior_boundary == "off":
            return False
        exchanged = tuple(m > 1 and (lo > 0 or hi > 0) for m, (lo, hi) in zip(self.mesh_shape, halo))
        geometry = dict(block=tuple(block), kernel=tuple(kernel), stride=tuple(stride), halo=tuple(halo))
        if self.interior_boundary == "on":
            return any(exchanged) and split_ranges(**geometry, exchanged=exchanged) is not None
        return split_pays(**geometry, exchanged=exchanged)

    def convolve(self, x, kernel, *, conv, stride=(1, 1, 1), padding=((1, 1),) * 3, halo=((1, 1),) * 3):
        """``conv(x_in, kernel, stride, padding)`` of ``x`` with the halos this partition needs:
        one padded block, or interior + boundary shells (:meth:`splits`). ``padding``: the
        reference's per-axis (lo, hi); ``halo``: the blocks' (:mod:`workbench.model.spec`)."""
        if self.splits(x.shape[1:4], kernel.shape[:3], stride, halo):
            return interior_boundary_conv(
                x, kernel, stride=tuple(stride), halo=tuple(halo), mesh_shape=self.mesh_shape, conv=conv
            )
        x_in, pad = self.padded_conv_input(x, None, padding, halo)
        return conv(x_in, kernel, tuple(stride), pad)

    def psum(self, value, *, over_batch: bool):
        """Sum a per-shard partial statistic over the whole volume (and batch)."""
        if self.backend != "explicit":
            return value
        # Size-1 axes are included: the sum is free, and the result's type then says
        # it is the same on every device (shard_map's replication check).
        names = (DATA_AXIS, *SPATIAL_AXES) if over_batch else SPATIAL_AXES
        return lax.psum(value, names)

    def constrain(self, x):
        """GSPMD: keep activations split over (data, z, y, x)."""
        if self.backend != "gspmd" or self.mesh is None:
            return x
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*ACTIVATION_SPEC))
        return lax.with_sharding_constraint(x, sharding)

    def batch_positions(self, n_local: int):
        if self.backend == "explicit" and self.data > 1:
            return lax.axis_index(DATA_AXIS) * n_local + jnp.arange(n_local, dtype=jnp.int32)
        return jnp.arange(n_local, dtype=jnp.int32)


def _scale(level, dim: int) -> int:
    """The cumulative stride of ``level`` along spatial ``dim``: ``2**level`` for the U-Net's
    levels, or a per-axis (z, y, x) scale tuple (the layer spec's ``Layer.scale``)."""
    return level[dim] if isinstance(level, tuple) else 2**level


def he_normal(key, shape, dtype=jnp.float32):
    """He (Kaiming) normal init, fan-in = every axis but the last.

    Draws a flat vector and reshapes it: XLA:CPU compiles the partitionable threefry
    generator for 5-D shapes very slowly (seconds per shape), flat draws are fast.
    """
    fan_in = math.prod(shape[:-1])
    flat = jax.random.normal(key, (math.prod(shape),), jnp.float32)
    return (flat * math.sqrt(2.0 / fan_in)).reshape(shape).astype(dtype)


def conv3d(x, kernel, padding):
    """A 3-D convolution whose kernel gradient is computed when its input gradient is.

    ``x`` and ``kernel`` pass through one ``optimization_barrier``, whose transpose
    joins their cotangents: in the backward pass the input gradient (which every
    earlier layer waits for) exists only once the kernel gradient does. Values and
    gradients are unchanged; only the schedule is pinned. Without it XLA:GPU runs the
    kernel-gradient convolutions at the end of the backward pass, which keeps every
    layer's (halo-padded, rematerialised) input alive until then: in the H100 buffer
    report of 512³ training on 2x2x2 with remat, the 2.05 GiB padded input of the first
    decoder convolution lived until the last kernel gradient, and remat saved 5 %
    instead of the 46 % it saves on XLA:CPU.
    """
    x, kernel = lax.optimization_barrier((x, kernel))
    return lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1, 1), padding=padding, dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
    )


def _conv3d_part(x, kernel, stride, padding):
    """One part of a split :func:`conv3d` (stride 1), for :meth:`Partition.convolve`."""
    del stride
    return conv3d(x, kernel, padding)


class Conv3(nn.Module):
    """3×3×3 convolution whose padding comes from the :class:`Partition`.

    Called with a tuple of arrays, it convolves their channel concatenation (the
    U-Net's skip connections). With ``split_inputs`` the concatenated array is never
    built: each part is convolved with its slice of the kernel and the results are
    added, so only one part's halo-padded copy is alive at a time; the parameters
    are the same. The U-Net splits in inference on every backend, the reference included, so
    partitioned ÷ reference memory compares like with like; in training it keeps the
    concatenation, since the split costs more in the backward pass than it saves.
    """

    features: int
    level: int
    partition: Partition
    dtype: Any = jnp.float32
    split_inputs: bool = False

    @nn.compact
    def __call__(self, x):
        parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        channels = [p.shape[-1] for p in parts]
        kernel = self.param("kernel", he_normal, (*CONV3_KERNEL, sum(channels), self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        kernel = kernel.astype(self.dtype)
        if not self.split_inputs and len(parts) > 1:
            parts = (jnp.concatenate(parts, axis=-1),)
            channels = [sum(channels)]
        y, start = None, 0
        for part, c in zip(parts, channels):
            k = kernel[..., start : start + c, :]
            if self.partition.splits(part.shape[1:4], CONV3_KERNEL, (1, 1, 1), ((CONV3_HALO, CONV3_HALO),) * 3):
                term = self.partition.convolve(part.astype(self.dtype), k, conv=_conv3d_part)
            else:
                x_in, padding = self.partition.conv_input(part.astype(self.dtype), self.level)
                term = conv3d(x_in, k, padding)
            y = term if y is None else y + term
            start += c
        return y + bias.astype(self.dtype)


class UpConv2(nn.Module):
    """The U-Net's up-sampling: a 2×2×2 transposed convolution with stride 2, as one
    matrix product and a depth-to-space reshape.

    Every input voxel writes its own 2×2×2 output block, so the layer needs no halo
    and is the same function on a shard as on the whole volume. Its parameters are
    those of ``flax.linen.ConvTranspose(features, (2, 2, 2), strides=(2, 2, 2),
    padding="VALID")`` (kernel ``(2, 2, 2, C_in, C_out)``, bias), and so is its output:
    that layer convolves without flipping the kernel, so output offset ``a`` takes kernel
    tap ``1 - a``. Why not ``lax.conv_transpose``: XLA:GPU lowers it as a convolution over
    the input dilated with zeros, a buffer 8× the input (2 GiB per device for the paper
    model's last up-sampling at 512³ on 2x2x2, seen in the H100 buffer report), in the
    forward pass and again for the kernel gradient; the product needs none.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        n, z, y, w, c = x.shape
        kernel = self.param("kernel", he_normal, (2, 2, 2, c, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        kernel = kernel[::-1, ::-1, ::-1].astype(self.dtype)
        out = jnp.einsum("nzyxi,abcio->nzaybxco", x.astype(self.dtype), kernel)
        return out.reshape(n, 2 * z, 2 * y, 2 * w, self.features) + bias.astype(self.dtype)


def _pool_blocks(x):
    n, z, y, w, c = x.shape
    if z % 2 or y % 2 or w % 2:
        raise UserError(
            f"2x2x2 pooling needs even spatial sizes, got {z}x{y}x{w}; pad the volume to a "
            "multiple of 2^(depth-1) per axis (ShardLayout and run.apply do)"
        )
    return x.reshape(n, z // 2, 2, y // 2, 2, w // 2, 2, c)


def _spread(p):
    """(n, z, y, x, c) → broadcastable against :func:`_pool_blocks`' 8-D view."""
    return p[:, :, None, :, None, :, None, :]


@jax.custom_vjp
def max_pool2(x):
    """2×2×2 max-pooling with stride 2 (spatial sizes even).

    Same values as ``flax.linen.max_pool``; the gradient differs only where a window
    holds tied maxima: it is shared equally among them (the rule of ``jnp.max``)
    instead of going to the first. Why not ``lax.reduce_window``: its gradient is a
    select-and-scatter, which XLA:GPU expands into five int32 index arrays of the
    pooled size (1.25 GiB per device at the paper model's first level at 512³ on
    2x2x2) and a scatter. Why a custom gradient: ``jnp.max``'s own keeps a full-size
    indicator array for the backward pass (+8 % training memory on XLA:CPU); this one
    keeps only the input, as the select-and-scatter did, and recomputes the maxima and
    the indicator in the backward pass.
    """
    return _pool_blocks(x).max(axis=(2, 4, 6))


def _max_pool2_fwd(x):
    return max_pool2(x), x


def _max_pool2_bwd(x, g):
    blocks = _pool_blocks(x)
    hit = blocks == _spread(blocks.max(axis=(2, 4, 6)))
    share = g / hit.sum(axis=(2, 4, 6)).astype(g.dtype)
    return (jnp.where(hit, _spread(share), jnp.zeros((), g.dtype)).reshape(x.shape),)


max_pool2.defvjp(_max_pool2_fwd, _max_pool2_bwd)


def _moments(x, weight, axes, partition: Partition, *, over_batch: bool):
    """Mean and (biased) variance over ``axes`` of the whole volume, masked by ``weight``."""
    if weight is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in axes), x.dtype)
        total = partition.psum(jnp.sum(x, axis=axes, keepdims=True), over_batch=over_batch)
    else:
        # Built from x so it varies over the same mesh axes as x: a mask that depends
        # only on the z position would otherwise be typed as equal on the other axes,
        # and shard_map's psum refuses to mix the two.
        w = jnp.where(weight, jnp.ones_like(x), jnp.zeros_like(x))
        count = jnp.sum(w, axis=axes, keepdims=True)
        total = partition.psum(jnp.sum(x * w, axis=axes, keepdims=True), over_batch=over_batch)
    count = partition.psum(count, over_batch=over_batch)
    mean = total / count
    centered = x - mean
    if weight is not None:
        centered = centered * w
    var = partition.psum(jnp.sum(centered * centered, axis=axes, keepdims=True), over_batch=over_batch) / count
    return mean, var


class Norm(nn.Module):
    """Batch / group / instance normalisation with whole-volume statistics.

    Statistics are summed over every shard (``psum``) and exclude voxels outside the
    volume, so they equal the single-device statistics. Batch norm keeps running
    averages in the ``batch_stats`` collection (same update rule as Flax's).
    """

    kind: str
    level: Level
    partition: Partition
    groups: int = 8
    momentum: float = 0.9
    epsilon: float = 1e-5
    train: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in >= float32
        weight = self.partition.stats_mask(x, self.level)
        if self.kind == "batch":
            # in the statistics' dtype, so a step returns them with the dtype it was given
            # (float64 models: no second compilation at the second step)
            ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), xf.dtype))
            ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), xf.dtype))
            if self.train:
                mean, var = _moments(xf, weight, (0, 1, 2, 3), self.partition, over_batch=True)
                mean, var = mean.reshape(c), var.reshape(c)
                if not self.is_initializing():
                    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
            else:
                mean, var = ra_mean.value, ra_var.value
            y = (xf - mean) * lax.rsqrt(var + self.epsilon)
        elif self.kind in ("group", "instance"):
            groups = c if self.kind == "instance" else math.gcd(self.groups, c)
            xg = xf.reshape(*xf.shape[:4], groups, c // groups)
            wg = None if weight is None else weight[..., None]
            mean, var = _moments(xg, wg, (1, 2, 3, 5), self.partition, over_batch=False)
            y = ((xg - mean) * lax.rsqrt(var + self.epsilon)).reshape(xf.shape)
        else:
            raise UserError(f"unknown normalisation {self.kind!r}; use one of {NORMS}")
        return (y * scale + bias).astype(x.dtype)


def _mix32(h):
    """murmur3 finaliser on uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_dropout(x, *, rate: float, seed, level: int, partition: Partition):
    """Dropout whose mask depends only on the seed and the voxel's global position,

    so every backend and every mesh drops exactly the same voxels.
    """
    if rate <= 0.0:
        return x
    n, *spatial, c = x.shape
    coords = [partition.batch_positions(n)]
    coords += [partition._axis_positions(d, level, spatial[d]) for d in range(3)]
    coords.append(jnp.arange(c, dtype=jnp.int32))
    h = jnp.asarray(seed, jnp.uint32).reshape((1,) * 5) ^ jnp.uint32(level * 0x9E3779B9 & 0xFFFFFFFF)
    for axis, pos in enumerate(coords):
        shape = [1] * 5
        shape[axis] = pos.shape[0]
        h = _mix32(h ^ (pos.astype(jnp.uint32) * jnp.uint32(0x27D4EB2F)).reshape(shape))
    keep = h >= jnp.uint32(min(int(rate * 2**32), 2**32 - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype)).astype(x.dtype)
