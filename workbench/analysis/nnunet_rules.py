"""nnU-Net 2.8's planning rules, re-implemented from its source (NumPy, no JAX, no torch).

What ``nnunetv2.experiment_planning`` decides from a dataset fingerprint, as plain functions:

* :func:`target_spacing`: the median spacing, except on strongly anisotropic data (the
  worst axis over 3× coarser *and* 3× fewer voxels), where that axis takes the 10th
  percentile of its spacings (never finer than the other axes);
* :func:`transpose`: the coarsest axis first (``transpose_forward`` / ``_backward``);
* :func:`resampled_median_shape`: the median of every case's shape at the target spacing;
* :func:`pool_and_conv_props`: ``get_pool_and_conv_props``: halve every axis whose spacing
  is within 2× of the finest and whose size is still ≥ 8, kernel 3 once an axis is within 2×
  of the finest spacing (1 before), a 3×3×3 bottleneck; the shape padded up to the strides;
* :func:`features_per_stage` (32 doubling, capped at 320) and the blocks per stage of each
  planner (:data:`PLANNERS`: the default ``ExperimentPlanner`` and ResEnc M / L / XL);
* :func:`feature_map_size`: ``compute_conv_feature_map_size`` of ``PlainConvUNet`` and
  ``ResidualEncoderUNet`` (the number nnU-Net compares with its VRAM reference);
* :func:`nnunet_configuration`: the whole ``3d_fullres`` patch search (start at 256³ voxels
  shaped like the spacing, clipped to the median shape, shrink the axis that is largest
  relative to the median until the estimate fits the planner's reference) and batch size;
* :func:`architecture`: nnU-Net's ``architecture`` block (class name and ``arch_kwargs``)
  for a topology, the form :func:`workbench.model.nnunet_plans.from_nnunet_arch` reads.

Checked against the plans nnU-Net 2.8.1 wrote for three datasets (``tests/fixtures/nnunet``;
``tests/test_nnunet_planning.py``).

Example
-------
>>> topo = pool_and_conv_props((2.5, 0.8, 0.8), (48, 160, 160))
>>> topo.strides[:3], topo.kernels[0]
(((1, 1, 1), (1, 2, 2), (2, 2, 2)), (1, 3, 3))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError

__all__ = [
    "Planner",
    "PLANNERS",
    "Topology",
    "target_spacing",
    "transpose",
    "compute_new_shape",
    "resampled_median_shape",
    "pool_and_conv_props",
    "features_per_stage",
    "architecture",
    "feature_map_size",
    "nnunet_configuration",
]

ANISO_THRESHOLD = 3  # nnunetv2.configuration.ANISO_THRESHOLD
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
MIN_EDGE = 4  # UNet_featuremap_min_edge_length
_PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
_RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


@dataclass(frozen=True)
class Planner:
    """One nnU-Net planner preset: network class, blocks per stage, VRAM reference."""

    name: str  # nnU-Net's class name (plans: experiment_planner_used)
    plans_name: str
    network_class: str
    encoder_blocks: tuple[int, ...]
    decoder_blocks: tuple[int, ...]
    reference_3d: float  # UNet_reference_val_3d
    gpu_gb: float  # gpu_memory_target_in_gb (= UNet_reference_val_corresp_GB for the presets)
    max_dataset_covered: float

    @property
    def plain(self) -> bool:
        return self.network_class == _PLAIN


_RES_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
PLANNERS = {
    "nnunet": Planner("ExperimentPlanner", "nnUNetPlans", _PLAIN, (2,) * 14, (2,) * 13, 560e6, 8, 0.05),
    "resenc-m": Planner("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", _RESENC, _RES_BLOCKS, (1,) * 12, 680e6, 8, 1),
    "resenc-l": Planner(
        "nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", _RESENC, _RES_BLOCKS, (1,) * 12, 2.1e9, 24, 1
    ),
    "resenc-xl": Planner(
        "nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", _RESENC, _RES_BLOCKS, (1,) * 12, 3.6e9, 40, 1
    ),
}


def planner(name: str) -> Planner:
    """The preset called ``name`` (``nnunet``, ``resenc-m``, ``resenc-l``, ``resenc-xl``)."""
    if name not in PLANNERS:
        raise UserError(f"--planner {name!r} is unknown; use one of {', '.join(PLANNERS)}")
    return PLANNERS[name]


# -- spacing and shape ------------------------------------------------------------------------------
def target_spacing(spacings, shapes) -> tuple[float, ...]:
    """nnU-Net's ``determine_fullres_target_spacing`` from the fingerprint's per-case spacings
    and shapes after cropping (both in the files' axis order)."""
    spacings = np.vstack(spacings).astype(np.float64)
    target = np.percentile(spacings, 50, 0)
    sizes = np.percentile(np.vstack(shapes), 50, 0)
    worst = int(np.argmax(target))
    others = [i for i in range(len(target)) if i != worst]
    other_spacing = max(target[i] for i in others)
    aniso_spacing = target[worst] > ANISO_THRESHOLD * other_spacing
    aniso_voxels = sizes[worst] * ANISO_THRESHOLD < min(sizes[i] for i in others)
    if aniso_spacing and aniso_voxels:
        tenth = np.percentile(spacings[:, worst], 10)
        if tenth < other_spacing:  # never finer than the other axes
            tenth = max(other_spacing, tenth) + 1e-5
        target[worst] = tenth
    return tuple(float(v) for v in target)


def transpose(spacing) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(transpose_forward, transpose_backward): the coarsest axis first, the others in order."""
    first = int(np.argmax(spacing))
    forward = (first, *(i for i in range(3) if i != first))
    backward = tuple(forward.index(i) for i in range(3))
    return forward, backward


def compute_new_shape(shape, spacing, new_spacing) -> tuple[int, ...]:
    """``round(spacing / new_spacing × shape)`` per axis (nnU-Net's ``compute_new_shape``)."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, new_spacing, shape))


def resampled_median_shape(spacings, shapes, target) -> tuple[float, ...]:
    """The median, per axis, of every case's shape resampled to ``target`` (floats, as nnU-Net's
    ``np.median``; in the files' axis order)."""
    new = [compute_new_shape(n, s, target) for s, n in zip(spacings, shapes)]
    return tuple(float(v) for v in np.median(new, 0))


# -- topology ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Topology:
    """Strides (the first is (1, 1, 1)) and kernels per stage, the shape padded up to a multiple
    of the strides' product (``multiple``), and poolings per axis."""

    strides: tuple[tuple[int, ...], ...]
    kernels: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]
    multiple: tuple[int, ...]
    pools: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.strides)


def _pad_up(shape, multiple) -> tuple[int, ...]:
    """nnU-Net's ``pad_shape``: the next multiple (a shape already a multiple stays)."""
    return tuple(int(n + m - n % m) if n % m else int(n) for n, m in zip(shape, multiple))


def pool_and_conv_props(spacing, shape, min_edge: int = MIN_EDGE) -> Topology:
    """nnU-Net's ``get_pool_and_conv_props(spacing, patch_size, min_edge, 999999)``.

    Each round halves every axis that is still at least ``2·min_edge`` voxels and whose
    spacing is within 2× of the finest such axis (a single axis only while it has
    ``3·min_edge`` voxels); an axis's kernel becomes 3 once its spacing is within 2× of the
    finest and stays 3. The bottleneck has kernel 3 on every axis."""
    dim = len(spacing)
    spacing_now, size = [float(s) for s in spacing], [float(n) for n in shape]
    strides, kernels = [(1,) * dim], []
    pools, kernel = [0] * dim, [1] * dim
    while True:
        valid = [i for i in range(dim) if size[i] >= 2 * min_edge]
        if not valid:
            break
        finest = min(spacing_now[i] for i in valid)
        valid = [i for i in valid if spacing_now[i] / finest < 2]
        if len(valid) == 1 and size[valid[0]] < 3 * min_edge:
            break
        if not valid:
            break
        for d in range(dim):
            if kernel[d] != 3 and spacing_now[d] / min(spacing_now) < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            pools[v] += 1
            spacing_now[v] *= 2
            size[v] = float(np.ceil(size[v] / 2))
        strides.append(tuple(stride))
        kernels.append(tuple(kernel))
    kernels.append((3,) * dim)
    multiple = tuple(2**p for p in pools)
    return Topology(tuple(strides), tuple(kernels), _pad_up(shape, multiple), multiple, tuple(pools))


def features_per_stage(n_stages: int) -> tuple[int, ...]:
    """32 doubling per stage, capped at 320 (3D)."""
    return tuple(min(MAX_FEATURES_3D, BASE_FEATURES * 2**i) for i in range(n_stages))


def architecture(plan: Planner, topology: Topology) -> dict:
    """nnU-Net's ``architecture`` block (``network_class_name``, ``arch_kwargs``,
    ``_kw_requires_import``) of ``plan`` for ``topology``, as its planner writes it."""
    n = topology.n_stages
    blocks_key = "n_conv_per_stage" if plan.plain else "n_blocks_per_stage"
    kwargs = {
        "n_stages": n,
        "features_per_stage": list(features_per_stage(n)),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(k) for k in topology.kernels],
        "strides": [list(s) for s in topology.strides],
        blocks_key: list(plan.encoder_blocks[:n]),
        "n_conv_per_stage_decoder": list(plan.decoder_blocks[: n - 1]),
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    }
    return {
        "network_class_name": plan.network_class,
        "arch_kwargs": kwargs,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


# -- nnU-Net's VRAM estimate ------------------------------------------------------------------------
def _after(size, stride):
    return [int(n) // int(s) for n, s in zip(size, stride)]


def feature_map_size(
    plan: Planner, topology: Topology, patch, num_classes: int, *, deep_supervision: bool = False
) -> int:
    """``compute_conv_feature_map_size(patch)`` of the planner's network (deep supervision off,
    as the planner builds it): the voxels × channels of every convolution's output, plus the
    transposed convolutions and the segmentation head(s)."""
    feats = features_per_stage(topology.n_stages)
    n = topology.n_stages

    def volume(channels, size):
        return int(np.prod([channels, *size], dtype=np.int64))

    total, size = 0, [int(v) for v in patch]
    if not plan.plain:
        total += volume(feats[0], size)  # the stem
    for s in range(n):
        stride, blocks = topology.strides[s], plan.encoder_blocks[s]
        after = _after(size, stride)
        if plan.plain:
            total += blocks * volume(feats[s], after)
        else:
            in_channels = feats[s - 1] if s else feats[0]
            skip = in_channels != feats[s] or after != size
            total += (2 + skip) * volume(feats[s], after) + (blocks - 1) * 2 * volume(feats[s], after)
        size = after
    skips, size = [], [int(v) for v in patch]
    for s in range(n - 1):
        size = _after(size, topology.strides[s])
        skips.append(size)
    for s in range(n - 1):
        skip = skips[-(s + 1)]
        total += plan.decoder_blocks[s] * volume(feats[-(s + 2)], skip)  # decoder convolutions
        total += volume(feats[-(s + 2)], skip)  # the transposed convolution
        if deep_supervision or s == n - 2:
            total += volume(num_classes, skip)  # the segmentation head
    return total


# -- the patch nnU-Net would train on -----------------------------------------------------------------
def initial_patch_shape(spacing, median_shape) -> list:
    """nnU-Net's starting patch: 256³ voxels shaped like the inverse ``spacing``, clipped to
    ``median_shape`` (before the network's size multiples are applied)."""
    inverse = 1 / np.asarray(spacing, dtype=float)
    initial = [round(v) for v in inverse * (256**3 / np.prod(inverse)) ** (1 / 3)]
    return [min(i, m) for i, m in zip(initial, median_shape)]


def nnunet_configuration(
    plan: Planner, spacing, median_shape, *, num_classes: int, n_cases: int, gpu_gb: float | None = None
) -> dict:
    """nnU-Net's ``3d_fullres`` patch search of ``plan``: ``patch_size``, ``batch_size`` and the
    ``architecture`` block, for ``spacing`` and ``median_shape`` (transposed, coarse axis first),
    ``num_classes`` = ``len(dataset.json labels)`` and ``n_cases`` training cases."""
    gpu_gb = plan.gpu_gb if gpu_gb is None else gpu_gb
    spacing = [float(s) for s in spacing]
    median = [float(n) for n in median_shape]
    topo = pool_and_conv_props(spacing, initial_patch_shape(spacing, median))
    patch = list(topo.shape)
    reference = plan.reference_3d * gpu_gb / plan.gpu_gb
    estimate = feature_map_size(plan, topo, patch, num_classes)
    while estimate > reference:
        axis = int(np.argsort([p / m for p, m in zip(patch, median)])[-1])
        trial = list(patch)
        trial[axis] -= topo.multiple[axis]
        patch[axis] -= pool_and_conv_props(spacing, trial).multiple[axis]
        topo = pool_and_conv_props(spacing, patch)
        patch = list(topo.shape)
        estimate = feature_map_size(plan, topo, patch, num_classes)
    batch = round(reference / estimate * 2)
    n_voxels = float(np.prod(median, dtype=np.float64) * n_cases)
    cap = round(n_voxels * plan.max_dataset_covered / np.prod(patch, dtype=np.float64))
    batch = max(min(batch, cap), 2)
    return {
        "patch_size": [int(v) for v in patch],
        "batch_size": int(batch),
        "architecture": architecture(plan, topo),
        "estimate": int(estimate),
        "reference": float(reference),
    }
