"""Apply a model: ``reference`` | ``explicit`` | ``gspmd``, with padding and cropping.

Example
-------
>>> model = Model.init("small")
>>> volume = np.random.rand(40, 56, 48).astype(np.float32)
>>> logits = apply(model, volume, "2x2x2")                    # (40, 56, 48, 3)
>>> ref = apply(model, volume, backend="reference")
>>> float(np.abs(logits - ref).max()) < 1e-5
True
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.errors import UserError
from workbench.execute.distributed import put, put_tree, to_host
from workbench.mesh import ACTIVATION_SPEC, MeshSpec, ShardLayout, build_mesh, parse_mesh
from workbench.model.halo import halo_pad, validate_halo
from workbench.model.interior import compiler_options, resolve_comm_overlap
from workbench.model.layers import Partition
from workbench.model.unet import Model, UNet3D, UNetConfig
from workbench.options import BACKENDS

__all__ = [
    "BACKENDS",
    "apply",
    "run_mesh",
    "run",
    "RunResult",
    "Compiled",
    "compile_forward",
    "make_forward",
    "as_batch",
    "memory_stats",
    "overlap_width",
    "check_options",
]


def as_batch(volume, in_channels: int = 1) -> np.ndarray:
    """(Z,Y,X) or (N,Z,Y,X,C) → float32 (N,Z,Y,X,C), validated."""
    array = np.asarray(volume)
    if array.ndim == 3:
        array = array[None, ..., None]
    if array.ndim != 5:
        raise UserError(
            f"volume has shape {array.shape}: expected (Z, Y, X) or (N, Z, Y, X, C); "
            "squeeze extra axes or add batch/channel axes"
        )
    if array.shape[-1] != in_channels:
        raise UserError(
            f"volume has {array.shape[-1]} channels but the model expects {in_channels}; "
            "pass (N, Z, Y, X, C) with the right C"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise UserError(f"volume dtype {array.dtype} is not a real number type; convert it to float32")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise UserError(f"volume holds {bad} NaN/inf voxels; replace them (e.g. np.nan_to_num) before running")
    return array


def memory_stats(compiled) -> dict[str, int]:
    """Per-device bytes from ``compiled.memory_analysis()``.

    ``peak`` = arguments + outputs + temporaries − aliased bytes.
    """
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    stats = {
        "argument": int(ma.argument_size_in_bytes),
        "output": int(ma.output_size_in_bytes),
        "temp": int(ma.temp_size_in_bytes),
        "alias": int(ma.alias_size_in_bytes),
    }
    stats["peak"] = stats["argument"] + stats["output"] + stats["temp"] - stats["alias"]
    return stats


def overlap_width(config: UNetConfig) -> int:
    """Input halo that makes overlap mode exact: the receptive radius of the layer spec,
    rounded up to the size multiple (2^(depth-1)), the largest over the axes."""
    spec = config.spec()
    return max(-(-r // m) * m for r, m in zip(spec.receptive_radius(), spec.multiple))


@dataclass
class Compiled:
    """A compiled forward pass for one (config, layout, backend, halo)."""

    fn: Any
    backend: str
    halo: Any
    layout: ShardLayout
    mesh: Any
    input_sharding: Any
    variables_sharding: Any
    compiled: Any = None

    @property
    def memory(self) -> dict[str, int]:
        return memory_stats(self.compiled) if self.compiled is not None else {}


def check_options(config: UNetConfig, backend: str, halo) -> tuple[str, int]:
    """Validate a backend/halo choice for ``config`` before any work is done.

    Returns the per-layer halo mode and the overlap width (0 for per-layer modes).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    mode, overlap = _resolve_halo(halo, config)
    if backend == "gspmd" and (mode != "exact" or overlap):
        raise UserError(
            f"halo {halo!r} is only available with the explicit backend (gspmd lets XLA "
            "insert exact halos); use backend='explicit' or halo='exact'"
        )
    return mode, overlap


def _resolve_halo(halo, config: UNetConfig) -> tuple[str, int]:
    """(per-layer mode, overlap width) from a user halo choice."""
    halo = validate_halo(halo)
    if halo == "overlap":
        return "exact", overlap_width(config)
    if isinstance(halo, int):
        if halo % config.multiple:
            raise UserError(
                f"overlap halo width {halo} must be a multiple of {config.multiple} "
                f"(2^(depth-1)) so every shard's pooling grid lines up; use "
                f"{halo // config.multiple * config.multiple} or {-(-halo // config.multiple) * config.multiple}"
            )
        if halo == 0:
            return "zero", 0
        return "exact", halo
    return halo, 0


def compile_forward(
    config: UNetConfig,
    layout: ShardLayout,
    *,
    backend: str = "explicit",
    halo="exact",
    batch: int = 1,
    devices=None,
    variables_shape=None,
    comm_overlap: str = "auto",
) -> Compiled:
    """Lower and compile the forward pass (inference mode) for abstract inputs.

    Nothing is allocated: inputs are ``jax.ShapeDtypeStruct``s with shardings.
    ``comm_overlap``: as :func:`make_forward`'s.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    spec = layout.mesh
    if batch % spec.data:
        raise UserError(
            f"batch of {batch} does not split over data={spec.data}; use a batch that is a "
            f"multiple of {spec.data} or a mesh with a smaller data axis"
        )
    if variables_shape is None:
        variables_shape = jax.eval_shape(lambda: Model.init(config).variables)
    fn, mesh, in_sharding, var_sharding = make_forward(
        config, layout, backend=backend, halo=halo, devices=devices, comm_overlap=comm_overlap
    )
    target = layout.reference_shape if backend == "reference" else layout.padded_shape
    shape = (batch, *target, config.in_channels)
    abstract_vars = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=var_sharding), variables_shape
    )
    abstract_x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=in_sharding)
    compiled = fn.lower(abstract_vars, abstract_x).compile()
    return Compiled(compiled, backend, halo, layout, mesh, in_sharding, var_sharding, compiled)


def make_forward(
    config: UNetConfig,
    layout: ShardLayout,
    *,
    backend: str = "explicit",
    halo="exact",
    train: bool = False,
    devices=None,
    comm_overlap: str = "auto",
):
    """A jitted forward pass and the shardings of its inputs.

    Returns ``(fn, mesh, input_sharding, variables_sharding)``. In inference mode
    ``fn(variables, x) -> logits``; with ``train=True``
    ``fn(variables, x, rng) -> (logits, {"batch_stats": ...})`` (batch statistics and
    dropout as in training). ``x`` is padded to ``layout.padded_shape``
    (``layout.reference_shape`` for the reference) and the logits keep that shape.
    ``comm_overlap`` (``auto`` | ``on`` | ``off``, explicit backend): convolutions as interior
    + boundary shells so halos travel while the interior is computed
    (:func:`~workbench.model.interior.resolve_comm_overlap`; ``auto`` is ``off`` for now).
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    mode, overlap = _resolve_halo(halo, config)
    spec = layout.mesh
    if backend == "reference":
        device = (list(devices) if devices is not None else jax.local_devices())[0]
        sharding = jax.sharding.SingleDeviceSharding(device)
        return jax.jit(_module_call(UNet3D(config, Partition()), train)), None, sharding, sharding

    mesh = build_mesh(spec, devices)
    act = P(*ACTIVATION_SPEC)
    act_sharding, replicated = NamedSharding(mesh, act), NamedSharding(mesh, P())
    if backend == "gspmd":
        if mode != "exact" or overlap:
            raise UserError(
                f"halo {halo!r} is only available with the explicit backend (gspmd lets XLA "
                "insert exact halos); use backend='explicit' or halo='exact'"
            )
        part = Partition("gspmd", spec.spatial, spec.data, layout.reference_shape, layout.padded_shape, mesh=mesh)
        out = (act_sharding, replicated) if train else act_sharding
        fn = jax.jit(_module_call(UNet3D(config, part), train), out_shardings=out)
        return fn, mesh, act_sharding, replicated

    platform = mesh.devices.flat[0].platform
    split = resolve_comm_overlap(comm_overlap, platform)
    part = Partition(
        "explicit",
        spec.spatial,
        spec.data,
        layout.reference_shape,
        layout.padded_shape,
        halo=mode,
        overlap=overlap,
        interior_boundary=split,
    )
    call = _module_call(UNet3D(config, part), train)

    def forward_block(variables, x_block, *rng):  # x_block: f32[n/d, z/mz, y/my, x/mx, c]
        if overlap:
            x_block = halo_pad(x_block, width=overlap, mesh_shape=spec.spatial, mode="exact")
        out = call(variables, x_block, *rng)
        y_block = out[0] if train else out
        if overlap:
            y_block = y_block[:, overlap:-overlap, overlap:-overlap, overlap:-overlap, :]
        return (y_block, out[1]) if train else y_block

    in_specs = (P(), act, P()) if train else (P(), act)
    out_specs = (act, P()) if train else act
    mapped = jax.shard_map(forward_block, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    options = None if train else compiler_options(split, platform)  # train: the step's jit sets them
    return jax.jit(mapped, compiler_options=options), mesh, act_sharding, replicated


def _module_call(module: UNet3D, train: bool):
    if not train:
        return lambda variables, x: module.apply(variables, x)

    def call(variables, x, rng):
        return module.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})

    return call


@functools.lru_cache(maxsize=32)
def _cached_compile(config, volume_shape, mesh_spec, backend, halo, batch, devices_key, comm_overlap="auto"):
    layout = ShardLayout(volume_shape, mesh_spec, multiple=config.multiple)
    return compile_forward(config, layout, backend=backend, halo=halo, batch=batch, comm_overlap=comm_overlap)


@dataclass
class RunResult:
    """Output of :func:`run`: cropped logits plus what was measured on the way."""

    output: np.ndarray
    backend: str
    halo: Any
    layout: ShardLayout
    seconds: float
    compile_seconds: float
    memory: dict[str, int] = field(default_factory=dict)


def run(
    model: Model, volume, mesh=None, *, backend: str = "explicit", halo="exact", comm_overlap: str = "auto"
) -> RunResult:
    """Run ``model`` on ``volume`` and return logits cropped to the volume, with timings.

    ``volume`` is (Z, Y, X) or (N, Z, Y, X, C); the output is (Z, Y, X, K) or
    (N, Z, Y, X, K) to match. ``mesh`` is anything :func:`~workbench.mesh.parse_mesh`
    accepts (ignored by ``backend="reference"``). ``comm_overlap``: as :func:`make_forward`'s.
    """
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    validate_halo(halo)
    squeeze = np.ndim(volume) == 3
    x = as_batch(volume, model.config.in_channels)
    spec = run_mesh(mesh, backend)
    spatial = x.shape[1:4]
    layout = ShardLayout(spatial, spec, multiple=model.config.multiple)
    t0 = time.perf_counter()
    halo_key = halo if backend != "reference" else "exact"
    compiled = _cached_compile(
        model.config, spatial, spec, backend, halo_key, x.shape[0], len(jax.devices()), comm_overlap
    )
    compile_seconds = time.perf_counter() - t0

    padded = np.pad(
        x,
        [(0, 0)]
        + [
            (0, t - s)
            for t, s in zip(layout.reference_shape if backend == "reference" else layout.padded_shape, spatial)
        ]
        + [(0, 0)],
    )
    variables = put_tree(model.variables, compiled.variables_sharding)
    t0 = time.perf_counter()
    x_dev = put(padded, compiled.input_sharding)  # each device gets only its block
    y = compiled.fn(variables, x_dev)
    y = to_host(jax.block_until_ready(y))  # gathered across processes when there are several
    seconds = time.perf_counter() - t0
    out = layout.crop(y)
    if squeeze:
        out = out[0]
    return RunResult(out, backend, halo, layout, seconds, compile_seconds, compiled.memory)


def run_mesh(mesh, backend: str) -> MeshSpec:
    """The mesh a run on ``backend`` uses: one device for the reference, else ``mesh``
    (``None`` or ``"auto"``: the most cube-like over every device), refused with the helpful
    error when it needs more devices than there are."""
    if backend == "reference":
        return MeshSpec()
    n_devices = len(jax.devices())
    auto = mesh is None or (isinstance(mesh, str) and mesh.strip().lower() == "auto")
    spec = parse_mesh("auto" if auto else mesh, n_devices=n_devices if auto else None)
    if spec.n_devices > n_devices:
        parse_mesh(spec, n_devices=n_devices)  # raises the helpful error
    return spec


def apply(model: Model, volume, mesh=None, *, backend: str = "explicit", halo="exact") -> np.ndarray:
    """Full-resolution logits of ``model`` on ``volume`` (see :func:`run`)."""
    return run(model, volume, mesh, backend=backend, halo=halo).output
