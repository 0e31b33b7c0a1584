"""Run nnU-Net's networks (:mod:`workbench.model.nnunet`) on whole volumes: ``reference`` |
``explicit`` | ``gspmd``, with the same padding, masks and cropping as :mod:`workbench.execute.run`.

The layout pads each axis to a multiple of ``spec.multiple`` (the product of that axis's
strides: the reference's domain) and then to a multiple of ``mesh size × spec.multiple``, so
every block starts at a multiple of every stage's cumulative stride; what lies beyond the
reference's domain is masked at every layer and acts as outside the volume.

Example
-------
>>> logits = apply_nnunet(model, volume, "2x2x2")[0]           # doctest: +SKIP
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.errors import UserError
from workbench.execute.distributed import put, put_tree, to_host
from workbench.execute.run import run_mesh
from workbench.mesh import ACTIVATION_SPEC, ShardLayout, build_mesh
from workbench.model.interior import compiler_options, resolve_comm_overlap
from workbench.model.layers import Partition
from workbench.model.nnunet import NNUNet, NNUNetModel
from workbench.model.spec import NetworkSpec
from workbench.options import BACKENDS

__all__ = ["nnunet_layout", "make_nnunet_forward", "apply_nnunet", "crop_heads", "check_input"]


def nnunet_layout(spec: NetworkSpec, volume_shape, mesh) -> ShardLayout:
    """The padded layout of ``volume_shape`` for ``spec`` on ``mesh``."""
    return ShardLayout(volume_shape, mesh, multiple=spec.multiple)


def check_input(spec: NetworkSpec, x: np.ndarray) -> None:
    """A (N, Z, Y, X, C) input must have the plan's channels (dataset.json's channel_names)."""
    if x.ndim != 5:
        raise UserError(f"input has shape {x.shape}: expected (N, Z, Y, X, C) with C = {spec.in_channels}")
    if x.shape[-1] != spec.in_channels:
        raise UserError(
            f"input has {x.shape[-1]} channels but the network ({spec.source or spec.network_class}) "
            f"expects {spec.in_channels} (dataset.json's channel_names); pass one channel per entry, in that order"
        )


def make_nnunet_forward(
    spec: NetworkSpec,
    layout: ShardLayout,
    *,
    backend: str = "explicit",
    dtype: str = "float32",
    deep_supervision: bool = True,
    devices=None,
    jit: bool = True,
    comm_overlap: str = "auto",
):
    """A forward pass ``fn(variables, x) -> logits`` (a tuple of heads, highest resolution
    first, or the full-resolution logits alone) and the shardings of its inputs.

    Returns ``(fn, mesh, input_sharding, variables_sharding)``. ``x`` has the layout's
    ``padded_shape`` (``reference_shape`` for the reference) and so do the logits, divided
    by each head's scale. With ``jit=False`` the function is returned unjitted (to compose
    with a loss and ``jax.grad``). ``comm_overlap``: as :func:`workbench.execute.run.make_forward`'s.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    wrap = jax.jit if jit else (lambda f: f)
    if backend == "reference":
        device = (list(devices) if devices is not None else jax.local_devices())[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        return wrap(NNUNet(spec, Partition(), dtype, deep_supervision).apply), None, sharding, sharding

    mesh_spec = layout.mesh
    spec.check_blocks(layout.padded_shape, mesh_spec.spatial)
    mesh = build_mesh(mesh_spec, devices)
    act = P(*ACTIVATION_SPEC)
    act_sharding, replicated = NamedSharding(mesh, act), NamedSharding(mesh, P())
    geometry = (mesh_spec.spatial, mesh_spec.data, layout.reference_shape, layout.padded_shape)
    if backend == "gspmd":
        module = NNUNet(spec, Partition("gspmd", *geometry, mesh=mesh), dtype, deep_supervision)
        return wrap(module.apply), mesh, act_sharding, replicated

    platform = mesh.devices.flat[0].platform
    split = resolve_comm_overlap(comm_overlap, platform)
    if jit:  # the split program's XLA options (unjitted: the caller's jit, train_step, sets them)
        wrap = functools.partial(jax.jit, compiler_options=compiler_options(split, platform))
    module = NNUNet(
        spec, Partition("explicit", *geometry, halo="exact", interior_boundary=split), dtype, deep_supervision
    )
    out_specs = tuple(act for _ in spec.outputs) if deep_supervision else act
    mapped = jax.shard_map(module.apply, mesh=mesh, in_specs=(P(), act), out_specs=out_specs)
    return wrap(mapped), mesh, act_sharding, replicated


def crop_heads(spec: NetworkSpec, heads, shape):
    """Crop each head (N, Z/s, Y/s, X/s, K) to ``shape`` (Z, Y, X) divided by its scale, rounded up."""
    out = []
    for head, layer in zip(heads, spec.outputs):
        z, y, x = (-(-n // s) for n, s in zip(shape, layer.scale))
        out.append(head[:, :z, :y, :x])
    return tuple(out)


_FORWARDS: dict = {}


def apply_nnunet(
    model: NNUNetModel,
    volume,
    mesh=None,
    *,
    backend: str = "explicit",
    dtype: str = "float32",
    deep_supervision: bool = False,
):
    """Logits of ``model`` on a (N, Z, Y, X, C) ``volume``, cropped to the volume: the full
    resolution head, or with ``deep_supervision`` every head (highest resolution first)."""
    x = np.asarray(volume)
    check_input(model.spec, x)
    mesh_spec = run_mesh(mesh, backend)
    if x.shape[0] % mesh_spec.data:
        raise UserError(
            f"batch of {x.shape[0]} does not split over data={mesh_spec.data}; use a batch that is a multiple of "
            f"{mesh_spec.data} or a mesh with a smaller data axis"
        )
    layout = nnunet_layout(model.spec, x.shape[1:4], mesh_spec)
    target = layout.reference_shape if backend == "reference" else layout.padded_shape
    key = (model.spec, layout.volume_shape, layout.mesh, backend, dtype, deep_supervision)
    if key not in _FORWARDS:  # one compilation per network, shape and mesh (evaluation runs case after case)
        if len(_FORWARDS) >= 8:
            _FORWARDS.clear()
        _FORWARDS[key] = make_nnunet_forward(
            model.spec, layout, backend=backend, dtype=dtype, deep_supervision=deep_supervision
        )
    fn, _, in_sharding, var_sharding = _FORWARDS[key]
    np_dtype = jnp.float64 if dtype == "float64" else jnp.float32
    padded = np.pad(x, [(0, 0), *((0, t - s) for t, s in zip(target, x.shape[1:4])), (0, 0)]).astype(np_dtype)
    variables = put_tree(jax.tree.map(lambda a: jnp.asarray(a, np_dtype), model.variables), var_sharding)
    heads = fn(variables, put(padded, in_sharding))
    heads = [to_host(h) for h in heads] if deep_supervision else [to_host(heads)]
    heads = crop_heads(model.spec, heads, layout.volume_shape)  # gathered across processes when there are several
    return heads if deep_supervision else heads[0]
