"""Refuse a run that would not fit in memory, before anything big is allocated or compiled.

Rule (README, Reliability): with ``V`` voxels per device (padded shards × batch per data
slice), ``F`` the first level's filters and ``b`` bytes per value,

* a run whose quick upper bound is below half the memory it may use runs unchecked: no
  compile. The bound is ``32 · V·F·4 + 256 MiB`` for inference, ``128 · V·F·4 + 256 MiB``
  for training, for the architectures it was fitted on only (:func:`fitted`: the ``small``
  and ``paper`` presets' architecture); for any other network (another depth, filters,
  convolutions per block, input channels, more classes than filters, float64, dropout in
  training, an nnU-Net :class:`~workbench.model.spec.NetworkSpec`) it is
  :func:`spec_upper_bound`, summed from the network's own layer spec with no buffer
  ever reused;
* one whose lower bound (two full-resolution feature maps, ``2·V·F·b``; four for training;
  for other networks the image and the logits or parameters, :func:`spec_lower_bound`)
  already exceeds it is refused at once;
* otherwise the planner (:func:`workbench.app.planning.plan_bytes`: the same program,
  compiled abstractly, ``compiled.memory_analysis()``) gives the per-device peak.

The memory a run may use: on accelerators ``device.memory_stats()["bytes_limit"]`` per
device; on CPU the host's available RAM (``psutil``), shared by every device the mesh
uses. The fitted bounds come from the planner's peaks (14× and 48× ``V·F·4`` at 32³–64³ for
the small and paper presets), so they say nothing of another architecture: an architecture
must never pass on bounds fitted to another. ``force=True`` (``--force``) skips the guard.

The guard runs before the input is generated or read: :func:`input_shape` and
:func:`training_shape` tell the shape from the spec (``phantom:N``, ``mni:N``) or from
headers only (:func:`data_tools.io.volume_info`), so a ``phantom:512`` is refused before
its 0.5 GiB are made.
"""

from __future__ import annotations

import math
import os
import re

from workbench.errors import UserError

__all__ = [
    "MemoryRefused",
    "available_memory",
    "check_memory",
    "check_run_memory",
    "fitted",
    "spec_upper_bound",
    "spec_lower_bound",
    "input_shape",
    "training_shape",
]

_MNI = re.compile(r"mni:(\d+)(?:x(\d+)x(\d+))?")

_FIXED = 256 * 2**20


class MemoryRefused(UserError):
    """The run would not fit; the message names what would."""


def available_memory(n_used: int) -> tuple[int, str]:
    """(bytes one device may use, where they come from) for a run over ``n_used`` devices."""
    import jax

    device = jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    import psutil

    free = psutil.virtual_memory().available
    n_used = min(n_used, jax.local_device_count())  # several processes: only this one's devices share its RAM
    share = f", shared by {n_used} CPU devices" if n_used > 1 else ""
    return free // max(1, n_used), f"{free / 2**30:.1f} GiB of available host RAM{share}"


# The fields of the presets the bounds were fitted on (depth, base_filters, convs_per_block, in_channels, norm).
def _fitted_architectures() -> set[tuple]:
    from workbench.model.unet import PRESETS

    fields = ("depth", "base_filters", "convs_per_block", "in_channels", "norm")
    return {tuple({"in_channels": 1, **preset}[f] for f in fields) for preset in PRESETS.values()}


def fitted(config, *, train: bool = False) -> bool:
    """Whether ``config`` has an architecture the analytic bounds were fitted on: a
    :class:`~workbench.model.unet.UNetConfig` with a preset's depth, filters, convolutions
    per block, input channels and norm, at most as many classes as first-level filters,
    float32 or bfloat16, and (training) no dropout. Activation and remat do not add memory."""
    from workbench.model.unet import UNetConfig

    if not isinstance(config, UNetConfig):
        return False
    arch = (config.depth, config.base_filters, config.convs_per_block, config.in_channels, config.norm)
    return (
        arch in _fitted_architectures()
        and config.num_classes <= config.base_filters
        and config.dtype in ("float32", "bfloat16")
        and not (train and config.dropout > 0)
    )


def _layer_voxels(layer, block) -> tuple[int, int]:
    """(input voxels grown by the layer's halo, output voxels) of ``layer`` on a block."""
    grid = [b // s for b, s in zip(block, layer.in_scale)]
    grown = math.prod(g + lo + hi for g, (lo, hi) in zip(grid, layer.halo))
    return grown, math.prod(b // s for b, s in zip(block, layer.scale))


def spec_upper_bound(net, block, *, train: bool = False, batch: int = 1, item: int = 4) -> int:
    """Bytes per device that a run of layer spec ``net`` on per-device ``block`` (Z, Y, X)
    cannot exceed, from the spec alone, as if no buffer were ever freed or reused: per layer its
    halo-grown input copy and its output (a convolution's three times: convolution, norm,
    activation; a head's five times in training: logits, softmax, log-softmax, one-hot target,
    gradient), ``item`` bytes a value (at least float32); training three times that (saved
    activations, their gradients, the gradients of the parts), and parameters with their
    gradient and optimiser state; all twice, plus 256 MiB."""
    values = 0
    for layer in net.layers:
        grown, out = _layer_voxels(layer, block)
        copies = 1 + (layer.op == "conv") * (layer.norm + layer.nonlin) + 4 * (train and layer.output is not None)
        values += grown * sum(layer.in_channels) + out * layer.out_channels * copies
    values *= batch * (3 if train else 1)
    values += net.num_params * (5 if train else 1)
    return 2 * values * max(item, 4) + _FIXED


def spec_lower_bound(net, block, *, train: bool = False, batch: int = 1, item: int = 4) -> int:
    """Bytes per device that a run of ``net`` on ``block`` needs at least: its arguments and
    outputs, which the compiled program's peak always counts: the image (float32) and the
    logits (``item`` bytes, at least float32), in training the image and the parameters
    with Adam's two moments (float32)."""
    voxels = math.prod(block) * batch
    image = voxels * net.in_channels * 4
    if train:
        return image + 3 * net.num_params * 4
    return image + voxels * net.num_outputs * max(item, 4)


def _bounds(config, shape, spec, *, train: bool, batch: int, halo) -> tuple[int, int]:
    """(upper, lower) bytes per device: the fitted bounds for an architecture they were fitted
    on, else the layer spec's; on blocks grown by the ``overlap`` input halo, if any."""
    from workbench.mesh import ShardLayout

    item = {"bfloat16": 2, "float64": 8}.get(str(getattr(config, "dtype", "float32")), 4)
    net = config.spec() if hasattr(config, "spec") else config
    per_device = max(1, batch // spec.data)
    block = ShardLayout(tuple(shape), spec, multiple=net.multiple).block_shape
    if hasattr(config, "spec") and spec.n_spatial > 1:
        from workbench.execute.run import check_options

        overlap = check_options(config, "explicit", halo)[1] if halo not in (None, "exact") else 0
        block = tuple(b + 2 * overlap for b in block)
    if fitted(config, train=train):
        feature = math.prod(block) * per_device * config.base_filters
        return (128 if train else 32) * feature * 4 + _FIXED, (4 if train else 2) * feature * item
    return (
        spec_upper_bound(net, block, train=train, batch=per_device, item=item),
        spec_lower_bound(net, block, train=train, batch=per_device, item=item),
    )


def check_memory(config, shape, spec, *, train=False, batch=1, backend="explicit", halo="exact", budget=None,
                 planner=None) -> dict:  # fmt: skip
    """Raise :class:`MemoryRefused` if the run would not fit; returns how it was decided.

    ``config``: a :class:`~workbench.model.unet.UNetConfig` or an nnU-Net
    :class:`~workbench.model.spec.NetworkSpec` (inference, float32). ``budget``: bytes per
    device (default :func:`available_memory`); ``planner``: a
    :class:`~workbench.app.planning.PlanKey` → stats function (default ``plan_bytes``; for a
    ``NetworkSpec`` its forward compiled abstractly).
    """
    from workbench.app.planning import PlanKey, format_bytes, plan_bytes

    spec = spec if spec is not None else _default_spec()
    where = "the given budget"
    if budget is None:
        budget, where = available_memory(spec.n_devices)
    upper, lower = _bounds(config, shape, spec, train=train, batch=batch, halo=halo)
    if upper <= budget / 2:
        decided = "upper bound" if fitted(config, train=train) else "layer spec bound"
        return {"decided_by": decided, "bytes": upper, "budget": budget}
    if lower > budget:
        need, how = lower, "at least"
    else:
        if planner is None:
            planner = plan_bytes if hasattr(config, "spec") else _plan_network
        need = planner_bytes = planner(PlanKey(config, tuple(shape), spec, backend, halo, train, batch))["peak"]
        how = "the planner's"
        if planner_bytes <= budget:
            return {"decided_by": "planner", "bytes": need, "budget": budget}
    raise MemoryRefused(
        f"this {'training' if train else 'inference'} run needs {how} {format_bytes(need)} per device "
        f"but {format_bytes(budget)} is available ({where}); {_what_fits(config, shape, spec, train, need, budget)}"
        ", or pass --force to run anyway"
    )


def check_run_memory(
    config, shape, spec, *, backend="explicit", halo="exact", reference=False, planner=None, compiled=None
) -> None:
    """:func:`check_memory` for an inference run on ``spec``, then (``reference``) for the
    whole-volume single-device reference, which a partitioned run that fits may still not.
    ``compiled``: a PlanKey → compiled program function, read with ``memory_analysis()``
    (a run that compiles its program anyway: the guard then costs no second compile)."""
    from workbench.execute.run import memory_stats
    from workbench.mesh import MeshSpec

    if compiled is not None:
        planner = lambda key: memory_stats(compiled(key))  # noqa: E731
    check_memory(config, shape, spec, backend=backend, halo=halo, planner=planner)
    if reference and spec.n_devices > 1:
        try:
            check_memory(config, shape, MeshSpec(), backend="reference", halo="exact", planner=planner)
        except MemoryRefused as exc:
            text = str(exc).replace("this inference run needs", "--reference: the single-device reference needs", 1)
            raise MemoryRefused(
                text.replace(
                    ", or pass --force", ", or drop --reference (the partitioned run alone fits), or pass --force"
                )
            ) from None


def _plan_network(key) -> dict[str, int]:
    """The per-device memory of an nnU-Net network's forward (float32, full-resolution head),
    compiled for abstract inputs."""
    import jax
    import jax.numpy as jnp

    from workbench.execute.nnunet import make_nnunet_forward, nnunet_layout
    from workbench.execute.run import memory_stats
    from workbench.model.nnunet import NNUNetModel

    net, layout = key.config, nnunet_layout(key.config, key.shape, key.mesh)
    fn, _, in_sharding, var_sharding = make_nnunet_forward(net, layout, backend=key.backend, deep_supervision=False)
    variables = jax.eval_shape(lambda: NNUNetModel.init(net).variables)
    variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=var_sharding), variables)
    target = layout.reference_shape if key.backend == "reference" else layout.padded_shape
    x = jax.ShapeDtypeStruct((key.batch, *target, net.in_channels), jnp.float32, sharding=in_sharding)
    return memory_stats(fn.lower(variables, x).compile())


def _default_spec():
    from workbench.mesh import MeshSpec

    return MeshSpec()


def _what_fits(config, shape, spec, train, need, budget) -> str:
    """The cheapest changes that would fit, by the planner's scaling (memory ∝ voxels per device)."""
    import jax

    ratio = need / budget
    options = []
    multiple = max(getattr(config, "multiples", None) or config.multiple)
    if jax.local_devices()[0].platform != "cpu":
        devices = spec.n_spatial * 2 ** math.ceil(math.log2(ratio))
        options.append(f"a mesh of {devices} or more devices (`workbench plan --budget-gib` names the smallest)")
    if str(getattr(config, "dtype", "bfloat16")) != "bfloat16" and ratio <= 2:
        options.append("--dtype bfloat16")
    if train and not getattr(config, "remat", True) and ratio <= 2:
        options.append("--remat")
    side = int(min(shape) / ratio ** (1 / 3)) // multiple * multiple
    if side >= multiple:
        options.append(f"a smaller volume (about {side}³)")
    return "use " + " or ".join(options) if options else "use a smaller volume or more devices"


# -- shapes known before anything is read --------------------------------------------------------
def input_shape(source, *, series: str | None = None) -> tuple[int, int, int] | None:
    """The (Z, Y, X) shape :func:`workbench.app.load_volume` would give ``source`` (a spec or
    path), from the spec or the file's headers only; None when that cannot tell it (an
    array, a file whose headers do not read: loading it then names the problem)."""
    from data_tools.errors import DataError
    from workbench.app.volumes import parse_phantom_spec

    if not isinstance(source, (str, os.PathLike)):
        return None
    try:
        phantom = parse_phantom_spec(source) if isinstance(source, str) else None
        if phantom is not None:
            return phantom[0] or (32, 32, 32)  # load_volume's default phantom
        mni = _MNI.fullmatch(str(source).strip().lower()) if isinstance(source, str) else None
        if mni is not None:  # resampled: the native MNI is not read to know it
            n = int(mni.group(1))
            return (n, n, n) if mni.group(2) is None else (n, int(mni.group(2)), int(mni.group(3)))
        from data_tools.io import volume_info

        shape = tuple(int(s) for s in volume_info(source, series=series).shape)  # mni: the native template, 35 MB
        return shape if len(shape) == 3 and min(shape) > 0 else None
    except (DataError, UserError, OSError, ValueError):
        return None


def training_shape(tc) -> tuple[tuple[int, int, int], int | None] | None:
    """(volume shape, number of classes or None) that ``workbench train`` config ``tc`` will
    train on, from its ``--data`` spec, a dataset's headers, or volume files' headers (as
    :func:`workbench.training.datasets.make_source` will make them); None when that cannot
    tell (the source then reports its own problem when it loads)."""
    from data_tools.errors import DataError

    data, n = tc.data, tc.resolution
    items = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    try:
        if len(items) == 1 and isinstance(items[0], str):
            spec = items[0].strip().lower()
            if spec == "phantom" or spec.startswith("phantom:"):
                render = int(spec.split(":")[1]) if ":" in spec else (n or 64)
                return ((n or render),) * 3, 3
            if spec == "mni" or spec.startswith("mni:"):
                from data_tools.samples import MNI_CLASS_NAMES

                shape = (n,) * 3 if n else ((64,) * 3 if spec == "mni" else input_shape(spec))
                return (shape, len(MNI_CLASS_NAMES)) if shape else None
        if not all(isinstance(i, (str, os.PathLike)) for i in items):
            return None
        from data_tools.datasets import is_dataset

        if len(items) == 1 and is_dataset(items[0]):
            return _dataset_shape(items[0], tc)
        shapes = {input_shape(i) for i in items}
        if None in shapes or (len(shapes) != 1 and not n):
            return None
        return ((n,) * 3 if n else shapes.pop()), None
    except (DataError, UserError, OSError, ValueError, IndexError):
        return None


def _dataset_shape(path, tc):
    """A dataset's training grid from its images' headers (the plan of
    :func:`workbench.training.datasets.plan_preprocessing`), and its number of classes."""
    from data_tools.datasets import open_dataset
    from data_tools.io import volume_info
    from workbench.training.datasets import plan_preprocessing

    dataset = open_dataset(path)
    train, val = dataset.split(tc.fold)
    infos = [volume_info(case.images[0]) for case in train + val]
    plan = plan_preprocessing(infos, spacing=tc.spacing, resolution=tc.resolution)
    return tuple(plan.shape), len(dataset.class_names)
