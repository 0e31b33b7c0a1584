"""Per-device memory of nnU-Net's networks on whole volumes, from ahead-of-time compilation.

:func:`spec_memory` compiles one step of a :class:`~workbench.model.spec.NetworkSpec` on a
mesh for abstract inputs (nothing is allocated) and reads XLA's own per-device accounting
(``compiled.memory_analysis()``): inference (the full-resolution head), or a training step.

The training step is ``workbench train --plans``'s own
(:func:`workbench.training.step.compile_train_step` for an
:class:`~workbench.training.models.NNUNetConfig` with the default :class:`TrainConfig`: every
deep-supervision head, nnU-Net's loss, gradients, Adam, parameters and optimiser state
donated). ``dtype="bfloat16"`` computes activations in bfloat16 with float32 parameters and
optimiser state.

``compiler``: ``None`` compiles in this process (its devices: simulated CPU devices, or a
GPU target set by ``--compiler``); ``"cpu"`` or ``"h100"`` compile in this process when it
already compiles for that and has enough devices, else in a ``workbench plan --plans``
subprocess (:func:`workbench.analysis.plan.plan_subprocess`).

Example
-------
>>> spec = from_nnunet_plans("nnUNetPlans.json", "dataset.json")                      # doctest: +SKIP
>>> spec_memory(spec, (128, 512, 512), "2x4x4", train=True, dtype="bfloat16", compiler="h100")["bytes_per_device"]
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time

from workbench.errors import UserError
from workbench.mesh import ShardLayout, parse_mesh, parse_resolution
from workbench.model.spec import NetworkSpec

__all__ = ["spec_memory", "compile_nnunet", "spec_plans", "DTYPES"]

DTYPES = ("bfloat16", "float32")
_CLASS_PATHS = {
    "PlainConvUNet": ("dynamic_network_architectures.architectures.unet.PlainConvUNet", "ExperimentPlanner"),
    "ResidualEncoderUNet": (
        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
        "nnUNetPlannerResEncL",
    ),
}


def compile_nnunet(spec: NetworkSpec, layout: ShardLayout, *, train: bool, dtype: str = "bfloat16", batch: int = 1):
    """Compile inference (full-resolution head) or ``workbench train --plans``'s training step
    for ``spec`` on ``layout`` (one device: the reference)."""
    import jax
    import jax.numpy as jnp

    from workbench.execute.nnunet import make_nnunet_forward
    from workbench.model.nnunet import NNUNet

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not planned; use one of {', '.join(DTYPES)}")
    if batch % layout.mesh.data:
        raise UserError(f"batch of {batch} does not split over data={layout.mesh.data}; use a multiple of it")
    backend = "reference" if layout.mesh.n_devices == 1 else "explicit"
    target = layout.reference_shape if backend == "reference" else layout.padded_shape
    if not train:
        dummy = jax.ShapeDtypeStruct((1, *spec.multiple, spec.in_channels), jnp.float32)
        params = jax.eval_shape(NNUNet(spec).init, jax.random.key(0), dummy)["params"]
        fn, _, in_sharding, var_sharding = make_nnunet_forward(
            spec, layout, backend=backend, dtype=dtype, deep_supervision=False
        )
        variables = {
            "params": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=var_sharding), params)
        }
        images = jax.ShapeDtypeStruct((batch, *target, spec.in_channels), jnp.float32, sharding=in_sharding)
        return jax.jit(fn).lower(variables, images).compile()
    from workbench.training.config import TrainConfig
    from workbench.training.models import NNUNetConfig
    from workbench.training.step import compile_train_step

    # Region outputs need label values per region for the loss; memory does not depend on them.
    regions = tuple((i + 1,) for i in range(spec.num_outputs)) if spec.output_kind == "sigmoid" else None
    config = NNUNetConfig(spec, dtype=dtype, regions=regions)
    return compile_train_step(config, layout, TrainConfig(), backend=backend, batch=batch)


@functools.lru_cache(maxsize=128)
def _measure(spec: NetworkSpec, shape, mesh_text: str, train: bool, dtype: str, batch: int) -> tuple[dict, float]:
    from workbench.execute.run import memory_stats

    layout = ShardLayout(shape, parse_mesh(mesh_text), multiple=spec.multiple)
    t0 = time.perf_counter()
    compiled = compile_nnunet(spec, layout, train=train, dtype=dtype, batch=batch)
    return memory_stats(compiled), time.perf_counter() - t0


def _this_compiler() -> str:
    import jax

    from workbench.execute.devices import gpu_target

    return gpu_target() or jax.devices()[0].platform


def spec_memory(
    spec: NetworkSpec,
    shape,
    mesh,
    *,
    train: bool = True,
    dtype: str = "bfloat16",
    compiler: str | None = None,
    batch: int | None = None,
) -> dict:
    """Per-device memory of one step of ``spec`` on a ``shape`` (Z, Y, X) volume over ``mesh``.

    Returns ``{"bytes_per_device", "memory" (argument, output, temp, alias, peak), "mesh",
    "devices", "shape", "padded_shape", "block_shape", "train", "dtype", "batch", "compiler",
    "compile_seconds"}``. ``batch`` defaults to the mesh's data size.
    """
    import jax

    from workbench.execute.devices import validate_compiler

    shape = tuple(parse_resolution(shape))
    mesh_spec = parse_mesh(mesh)
    batch = mesh_spec.data if batch is None else int(batch)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not planned; use one of {', '.join(DTYPES)}")
    layout = ShardLayout(shape, mesh_spec, multiple=spec.multiple)
    here = _this_compiler()
    want = here if compiler is None else validate_compiler(compiler)
    if want == here and mesh_spec.n_devices <= len(jax.devices()):
        memory, seconds = _measure(spec, shape, str(mesh_spec), bool(train), dtype, batch)
    else:
        memory, seconds = _in_subprocess(spec, shape, mesh_spec, train=train, dtype=dtype, batch=batch, compiler=want)
    return {
        "bytes_per_device": memory["peak"],
        "memory": memory,
        "mesh": str(mesh_spec),
        "devices": mesh_spec.n_devices,
        "shape": list(shape),
        "padded_shape": list(layout.padded_shape if mesh_spec.n_devices > 1 else layout.reference_shape),
        "block_shape": list(layout.block_shape),
        "train": bool(train),
        "dtype": dtype,
        "batch": batch,
        "compiler": want,
        "compile_seconds": seconds,
    }


def spec_plans(spec: NetworkSpec) -> dict:
    """A minimal plans file (nnU-Net's schema, the dataset.json inside under ``workbench``) that
    :func:`workbench.model.nnunet_plans.load_plans_file` reads back as ``spec``."""
    class_path, planner = _CLASS_PATHS[spec.network_class]
    plain = spec.network_class == "PlainConvUNet"
    kwargs = {
        "n_stages": spec.n_stages,
        "features_per_stage": [s.features for s in spec.stages],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [list(s.kernel) for s in spec.stages],
        "strides": [list(s.stride) for s in spec.stages],
        ("n_conv_per_stage" if plain else "n_blocks_per_stage"): [s.blocks for s in spec.stages],
        "n_conv_per_stage_decoder": list(spec.decoder_convs),
        "conv_bias": spec.conv_bias,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": spec.norm_eps, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"negative_slope": spec.negative_slope, "inplace": True},
    }
    names = list(spec.output_names) or [f"label_{i}" for i in range(spec.num_outputs)]
    dataset = {"channel_names": {str(i): f"channel_{i}" for i in range(spec.in_channels)}}
    if spec.output_kind == "sigmoid":
        order = list(spec.regions_class_order or range(1, spec.num_outputs + 1))
        dataset["labels"] = {"background": 0, **{n: [r, r] for n, r in zip(names, order)}}
        dataset["regions_class_order"] = order
    else:
        dataset["labels"] = {n: i for i, n in enumerate(names)}
    architecture = {"network_class_name": class_path, "arch_kwargs": kwargs}
    return {
        "plans_name": spec.source or "workbench",
        "experiment_planner_used": planner,
        "configurations": {"3d_fullres": {"architecture": architecture}},
        "workbench": {"dataset": dataset},
    }


def _in_subprocess(spec, shape, mesh_spec, *, train, dtype, batch, compiler) -> tuple[dict, float]:
    """``workbench plan --plans TMP --mesh M --shape S --json`` with ``mesh_spec.n_devices``
    devices of ``compiler``, in its own process."""
    from workbench.analysis.plan import plan_subprocess

    fd, path = tempfile.mkstemp(suffix=".json", prefix="workbench-spec-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(spec_plans(spec), f)
        argv = ["--plans", path, "--mesh", str(mesh_spec), "--shape", "x".join(map(str, shape))]
        argv += ["--dtype", dtype, "--batch", str(batch), *(["--train"] if train else ["--infer"])]
        result = plan_subprocess(argv, devices=mesh_spec.n_devices, compiler=compiler, timeout=3600)
    finally:
        os.unlink(path)
    return result["memory"], result["compile_seconds"]
