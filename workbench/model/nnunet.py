"""nnU-Net's planned U-Nets (PlainConvUNet, ResidualEncoderUNet) in Flax, from a layer spec.

:class:`NNUNet` runs the layers of a :class:`~workbench.model.spec.NetworkSpec` in
execution order, channels-last (N, Z, Y, X, C), and returns the deep-supervision logits
highest resolution first, as nnU-Net does. Conventions (checked against nnU-Net 2.8.1 by
the golden fixture, tests/fixtures/nnunet/README.md):

* convolutions pad ``k // 2`` on both sides of each axis, strided ones included (not
  JAX's ``SAME``, which pads (0, 1) at stride 2 on even sizes), and have a bias;
* InstanceNorm: affine, eps inside the square root, biased variance over the spatial axes
  per sample and channel; LeakyReLU with slope 0.01 after the norm;
* transposed convolutions with kernel = stride (no overlap, no flip); the decoder
  concatenates the up-sampled features first, then the skip;
* ResEnc's BasicBlockD: conv1 (strided) → norm → LeakyReLU → conv2 → norm, plus the skip
  (average pool with kernel = stride where strided, then a 1×1×1 convolution without bias
  and a norm where the channels change), LeakyReLU after the sum.

Partitioning comes from the :class:`~workbench.model.layers.Partition`, as for the
workbench's own U-Net: convolutions get their (lo, hi) halos per axis, norms sum their
statistics over shards, and every layer's output is masked to the reference's domain.

:func:`load_nnunet_weights` maps nnU-Net state_dict names to these parameters;
:func:`load_nnunet_folder` reads an nnU-Net training folder (``fold_K/checkpoint_final.pth``).

Example
-------
>>> spec = from_nnunet_plans("nnUNetPlans.json", "dataset.json")          # doctest: +SKIP
>>> model = NNUNetModel(spec, {"params": load_nnunet_weights(spec, state_dict)})  # doctest: +SKIP
>>> logits = model.module().apply(model.variables, x)[0]                   # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from workbench.errors import InputNotFoundError, UserError
from workbench.model.interior import conv_valid
from workbench.model.layers import Norm, Partition, he_normal
from workbench.model.nnunet_plans import from_nnunet_plans
from workbench.model.spec import INPUT, Layer, NetworkSpec

__all__ = [
    "NNUNet",
    "NNUNetModel",
    "param_name",
    "load_nnunet_weights",
    "load_nnunet_folder",
    "read_checkpoint_weights",
]

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}


def param_name(layer_name: str) -> str:
    """The Flax module name of an nnU-Net module path (``encoder.stages.0.0.convs.0`` →
    ``encoder_stages_0_0_convs_0``)."""
    return layer_name.replace(".", "_")


class SpecConv(nn.Module):
    """One convolution of the spec (kernel DHWIO, optional bias), then norm and LeakyReLU if flagged."""

    layer: Layer
    partition: Partition
    dtype: Any = jnp.float32
    eps: float = 1e-5
    negative_slope: float = 0.01

    @nn.compact
    def __call__(self, parts):
        la, part = self.layer, self.partition
        x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
        kernel = self.param("kernel", he_normal, (*la.kernel, sum(la.in_channels), la.out_channels), jnp.float32)
        y = part.convolve(
            x.astype(self.dtype), kernel.astype(self.dtype), conv=conv_valid, stride=la.stride, padding=la.padding,
            halo=la.halo,
        )  # fmt: skip
        if la.bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (la.out_channels,), jnp.float32).astype(self.dtype)
        if la.norm:  # statistics over the volume only (Partition.stats_mask)
            y = Norm("instance", la.scale, part, epsilon=self.eps, name="norm")(y)
        if la.nonlin:
            y = nn.leaky_relu(y, self.negative_slope)
        return y


class SpecTransposedConv(nn.Module):
    """Transposed convolution with kernel = stride: every input voxel writes its own output
    block, so it needs no halo. Kernel (sz, sy, sx, C_in, C_out), no flip:
    ``out[s·i + a] = Σ_c x[i, c] · kernel[a, c, o] + bias[o]``."""

    layer: Layer
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        la = self.layer
        (c_in,), sz, sy, sx = la.in_channels, *la.stride
        kernel = self.param("kernel", he_normal, (sz, sy, sx, c_in, la.out_channels), jnp.float32)
        n, z, y, w, _ = x.shape
        out = jnp.einsum("nzyxc,abdco->nzaybxdo", x.astype(self.dtype), kernel.astype(self.dtype))
        out = out.reshape(n, z * sz, y * sy, w * sx, la.out_channels)
        if la.bias:
            out = out + self.param("bias", nn.initializers.zeros_init(), (la.out_channels,), jnp.float32).astype(
                self.dtype
            )
        return out


def avg_pool(x, stride):
    """Average pool with kernel = stride (no padding): no halo needed on aligned blocks."""
    n, z, y, w, c = x.shape
    sz, sy, sx = stride
    return x.reshape(n, z // sz, sz, y // sy, sy, w // sx, sx, c).mean(axis=(2, 4, 6))


class NNUNet(nn.Module):
    """(N, Z, Y, X, C_in) → tuple of (N, Z/s, Y/s, X/s, num_outputs) logits, one per decoder
    stage, highest resolution first (nnU-Net's deep-supervision order). Spatial sizes must be
    multiples of ``spec.multiple``. ``deep_supervision=False`` returns the full-resolution
    logits only (the other heads are not computed)."""

    spec: NetworkSpec
    partition: Partition = Partition()
    dtype: str = "float32"
    deep_supervision: bool = True

    @nn.compact
    def __call__(self, x):
        spec, part = self.spec, self.partition
        if self.dtype not in _DTYPES:
            raise UserError(f"dtype={self.dtype!r}; use one of {sorted(_DTYPES)}")
        if x.ndim != 5 or any(n % m for n, m in zip(x.shape[1:4], spec.multiple)):
            raise UserError(
                f"input (block) shape {x.shape} must be (N, Z, Y, X, C) with Z, Y, X multiples of {spec.multiple} "
                "(the product of each axis's strides); pad the volume (apply_nnunet and nnunet_layout do)"
            )
        dtype = _DTYPES[self.dtype]
        out_dtype = jnp.float64 if self.dtype == "float64" else jnp.float32
        values = {INPUT: part.mask(part.constrain(x.astype(dtype)), (1, 1, 1))}
        heads = {}
        for la in spec.layers:
            if la.output is not None and la.output > 0 and not self.deep_supervision:
                continue
            parts = [values[name] for name in la.inputs]
            name = param_name(la.name)
            if la.op == "conv":
                y = SpecConv(la, part, dtype, spec.norm_eps, spec.negative_slope, name=name)(parts)
            elif la.op == "transposed_conv":
                y = SpecTransposedConv(la, dtype, name=name)(parts[0])
            elif la.op == "avg_pool":
                y = avg_pool(parts[0], la.stride)
            elif la.op == "add":
                y = parts[0] + parts[1]
                y = nn.leaky_relu(y, spec.negative_slope) if la.nonlin else y
            else:  # pragma: no cover - the spec builds only these
                raise AssertionError(la.op)
            y = part.mask(y, la.scale)
            if la.output is not None:
                heads[la.output] = part.constrain(y.astype(out_dtype))
            else:
                values[la.name] = part.constrain(y)
        if not self.deep_supervision:
            return heads[0]
        return tuple(heads[i] for i in sorted(heads))


@dataclass
class NNUNetModel:
    """A spec with its variables (``{"params": ...}``); ``source`` says where the weights came from."""

    spec: NetworkSpec
    variables: Any
    source: str = ""

    @classmethod
    def init(cls, spec: NetworkSpec, *, seed: int = 0) -> NNUNetModel:
        dummy = jnp.zeros((1, *spec.multiple, spec.in_channels), jnp.float32)
        variables = jax.jit(NNUNet(spec).init)(jax.random.key(seed), dummy)
        return cls(spec, variables, f"random (seed {seed})")

    @property
    def num_params(self) -> int:
        return int(sum(np.size(p) for p in jax.tree.leaves(self.variables["params"])))

    def module(self, partition: Partition | None = None, *, dtype: str = "float32", deep_supervision=True):
        return NNUNet(self.spec, Partition() if partition is None else partition, dtype, deep_supervision)


# -- nnU-Net weights -------------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers (nnU-Net strips them too)


def _to_flax(layer: Layer, suffix: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Where one nnU-Net tensor goes in the Flax params, in Flax's layout."""
    name = param_name(layer.name)
    if suffix in ("conv.weight", "weight"):
        if layer.op == "transposed_conv":
            return (name, "kernel"), array.transpose(2, 3, 4, 0, 1)  # (I, O, sz, sy, sx) -> (sz, sy, sx, I, O)
        return (name, "kernel"), array.transpose(2, 3, 4, 1, 0)  # (O, I, kz, ky, kx) -> (kz, ky, kx, I, O)
    if suffix in ("conv.bias", "bias"):
        return (name, "bias"), array
    if suffix == "norm.weight":
        return (name, "norm", "scale"), array
    return (name, "norm", "bias"), array  # norm.bias


def load_nnunet_weights(spec: NetworkSpec, state_dict) -> dict:
    """Flax ``params`` for ``spec`` from an nnU-Net state_dict (name → array, e.g. a checkpoint's
    ``network_weights`` as numpy arrays, aliases such as ``.all_modules.0`` and
    ``decoder.encoder.`` included or not).

    Raises one :class:`UserError` naming the first tensor whose name is not in the plan, whose
    shape differs from the plan's, or that the plan needs and the weights lack.
    """
    expected = {key: (shape, same_as or key) for key, shape, same_as in spec.state_dict()}
    owner = {}
    for layer in spec.layers:
        for suffix, _ in layer.tensors:
            owner[f"{layer.name}.{suffix}"] = (layer, suffix)
    where = spec.source or spec.network_class
    found: dict[str, np.ndarray] = {}
    for raw_key, value in state_dict.items():
        key = raw_key
        for prefix in _PREFIXES:
            key = key[len(prefix) :] if key.startswith(prefix) else key
        if key not in expected:
            raise UserError(
                f"tensor {raw_key!r} of the weights is not in the network planned by {where} "
                f"({spec.network_class}, {spec.num_params:,} parameters); load the weights with the plans "
                "file they were trained with"
            )
        shape, canonical = expected[key]
        array = np.asarray(value)
        if tuple(array.shape) != tuple(shape):
            raise UserError(
                f"tensor {raw_key!r} has shape {tuple(array.shape)} but the network planned by {where} needs "
                f"{tuple(shape)}; load the weights with the plans file (and dataset.json) they were trained with"
            )
        found.setdefault(canonical, array)
    params: dict = {}
    for key, (layer, suffix) in owner.items():
        if key not in found:
            shape = expected[key][0]
            raise UserError(
                f"the weights lack tensor {key!r} {tuple(shape)} that the network planned by {where} needs; "
                "load the weights with the plans file they were trained with"
            )
        path, array = _to_flax(layer, suffix, found[key])
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = array  # a transposed view; JAX copies it when placing it
    return params


def read_checkpoint_weights(path, *, use_torch: bool | None = None) -> tuple[dict, str]:
    """The ``network_weights`` of an nnU-Net checkpoint as numpy arrays, and how they were read.

    With torch importable (and ``use_torch`` not False) the ``.pth`` is read by
    ``torch.load(weights_only=True)``. Otherwise the weights are read from
    ``<stem>_network_weights.npz`` beside it (numpy arrays keyed by state_dict name).
    """
    path = os.fspath(path)
    stem = os.path.splitext(path)[0]
    npz = stem + "_network_weights.npz"
    torch = None
    if use_torch is not False:
        try:
            import torch  # noqa: F811 - optional: only nnU-Net's own checkpoints need it
        except ImportError:
            if use_torch:
                raise UserError(f"reading {path} needs torch, which is not installed; pip install torch") from None
    if torch is not None:
        if not os.path.exists(path):
            raise InputNotFoundError(f"checkpoint {path!r} does not exist; pass an nnU-Net training folder")
        # A trained checkpoint's logging and _best_ema hold numpy float32 scalars: allow exactly those.
        scalars = [np._core.multiarray.scalar, np.dtype, type(np.dtype(np.float32)), type(np.dtype(np.float64))]
        with torch.serialization.safe_globals(scalars):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
        if not isinstance(weights, dict):
            raise UserError(f"{path} holds no 'network_weights'; pass a checkpoint written by nnU-Net's trainer")
        return {k: v.detach().cpu().numpy() for k, v in weights.items()}, f"{path} (torch)"
    if not os.path.exists(npz):
        raise UserError(
            f"reading {path} needs torch, which is not installed (or use_torch=False); install torch, "
            f"or save the checkpoint's network_weights as numpy arrays in {npz}"
        )
    with np.load(npz) as data:
        return {k: data[k] for k in data.files}, npz


def load_nnunet_folder(
    folder,
    *,
    fold: int | str = 0,
    checkpoint: str = "checkpoint_final.pth",
    configuration: str | None = None,
    use_torch: bool | None = None,
) -> NNUNetModel:
    """The model of an nnU-Net training folder (``…/nnUNetTrainer__nnUNetPlans__3d_fullres``):
    its ``plans.json`` and ``dataset.json`` give the network, ``fold_K/<checkpoint>`` the weights
    (see :func:`read_checkpoint_weights`). The configuration defaults to the folder name's last
    part (``Trainer__Plans__Configuration``)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise InputNotFoundError(
            f"nnU-Net training folder {folder!r} does not exist; pass the folder holding plans.json"
        )
    if configuration is None:
        match = re.fullmatch(r".+__.+__(.+)", os.path.basename(os.path.normpath(folder)))
        configuration = match.group(1) if match else "3d_fullres"
    spec = from_nnunet_plans(os.path.join(folder, "plans.json"), os.path.join(folder, "dataset.json"), configuration)
    fold_dir = os.path.join(folder, f"fold_{fold}")
    if not os.path.isdir(fold_dir):
        folds = sorted(d for d in os.listdir(folder) if d.startswith("fold_"))
        raise InputNotFoundError(f"{folder} has no fold_{fold}; use one of {folds or 'its folds (none found)'}")
    weights, source = read_checkpoint_weights(os.path.join(fold_dir, checkpoint), use_torch=use_torch)
    params = load_nnunet_weights(spec, weights)
    return NNUNetModel(spec, {"params": jax.tree.map(jnp.asarray, params)}, source)
