"""Mesh specs and shard geometry (pure Python + numpy; JAX only in :func:`build_mesh`).

Axis names live here and nowhere else: the data-parallel axis ``data`` and the
spatial axes ``z``, ``y``, ``x`` (numpy order of a (Z, Y, X) volume). A JAX mesh
built by :func:`build_mesh` always carries all four axes (size-1 axes included), so
one :data:`ACTIVATION_SPEC` describes every activation on every mesh.

Example
-------
>>> spec = parse_mesh("2x2x2")
>>> layout = ShardLayout((37, 53, 45), spec, multiple=4)
>>> layout.padded_shape, layout.block_shape
((40, 56, 48), (20, 28, 24))
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError

__all__ = [
    "DATA_AXIS",
    "SPATIAL_AXES",
    "MESH_AXES",
    "ACTIVATION_SPEC",
    "MeshSpec",
    "Shard",
    "ShardLayout",
    "ProcessBlock",
    "process_blocks",
    "parse_mesh",
    "valid_meshes",
    "auto_mesh",
    "build_mesh",
    "parse_resolution",
]

DATA_AXIS = "data"
SPATIAL_AXES = ("z", "y", "x")
MESH_AXES = (DATA_AXIS, *SPATIAL_AXES)
# PartitionSpec entries of a (N, Z, Y, X, C) activation: batch over data, volume over z/y/x.
ACTIVATION_SPEC = (DATA_AXIS, *SPATIAL_AXES, None)

_MESH_HELP = "write the mesh as ZxYxX (e.g. 2x2x2 or 1x2x4), as axis=size pairs (e.g. data=2,z=2,y=2,x=1), or 'auto'"


@dataclass(frozen=True)
class MeshSpec:
    """Sizes of the four mesh axes. ``str(spec)`` round-trips through :func:`parse_mesh`."""

    z: int = 1
    y: int = 1
    x: int = 1
    data: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise UserError(f"mesh axis {name}={value!r} must be a positive integer; {_MESH_HELP}")

    @property
    def spatial(self) -> tuple[int, int, int]:
        return (self.z, self.y, self.x)

    @property
    def n_devices(self) -> int:
        return self.data * self.z * self.y * self.x

    @property
    def n_spatial(self) -> int:
        return self.z * self.y * self.x

    def as_dict(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in MESH_AXES}

    def __str__(self) -> str:
        if self.data == 1:
            return f"{self.z}x{self.y}x{self.x}"
        return f"data={self.data},z={self.z},y={self.y},x={self.x}"


def auto_mesh(n_devices: int, *, data: int = 1) -> MeshSpec:
    """The most cube-like z×y×x split of ``n_devices // data`` devices (ties: more on z)."""
    if n_devices < 1 or n_devices % data:
        raise UserError(
            f"cannot split {n_devices} devices into data={data} groups; choose a data size that divides {n_devices}"
        )
    n = n_devices // data
    best = min(
        (s for s in _factorizations(n)),
        key=lambda s: (max(s) / min(s), -s[0], -s[1]),
    )
    return MeshSpec(*best, data=data)


def _factorizations(n: int) -> Iterator[tuple[int, int, int]]:
    for z in range(1, n + 1):
        if n % z:
            continue
        for y in range(1, n // z + 1):
            if (n // z) % y:
                continue
            yield (z, y, n // z // y)


def valid_meshes(n_devices: int, *, data_parallel: bool = False) -> list[MeshSpec]:
    """Every mesh that uses exactly ``n_devices`` devices.

    Without ``data_parallel`` only z×y×x meshes (data=1) are listed; with it, every
    data size that divides ``n_devices`` as well.
    """
    if not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
        raise UserError(f"n_devices={n_devices!r} must be a positive integer")
    datas = [d for d in range(1, n_devices + 1) if n_devices % d == 0] if data_parallel else [1]
    return [MeshSpec(*s, data=d) for d in datas for s in _factorizations(n_devices // d)]


def parse_mesh(spec, *, n_devices: int | None = None) -> MeshSpec:
    """Parse ``"2x2x2"``, ``"data=2,z=2,y=2,x=1"``, ``"auto"``, a dict or a MeshSpec.

    With ``n_devices`` given, the mesh must use exactly that many devices (``auto``
    needs it). Errors are ``ValueError`` naming the bad value and the fix.
    """
    if isinstance(spec, MeshSpec):
        result = spec
    elif isinstance(spec, dict):
        unknown = set(spec) - set(MESH_AXES)
        if unknown:
            raise UserError(f"unknown mesh axes {sorted(unknown)} in {spec!r}; axes are {MESH_AXES}")
        result = MeshSpec(**{k: int(v) for k, v in spec.items()})
    elif isinstance(spec, (tuple, list)):
        if len(spec) != 3:
            raise UserError(f"mesh {spec!r} must have 3 sizes (z, y, x); {_MESH_HELP}")
        result = MeshSpec(*[int(v) for v in spec])
    elif isinstance(spec, str):
        result = _parse_mesh_string(spec.strip().lower(), n_devices)
    else:
        raise TypeError(f"mesh must be a string, dict or MeshSpec, got {type(spec).__name__}")
    if n_devices is not None and result.n_devices != n_devices:
        options = ", ".join(str(m) for m in valid_meshes(n_devices)[:12])
        raise UserError(
            f"mesh {result} needs {result.n_devices} devices but {n_devices} are available; "
            f"use a mesh with {n_devices} devices (e.g. {options}) or change the device "
            f"count (--cpu-devices {result.n_devices} on CPU)"
        )
    return result


def _parse_mesh_string(text: str, n_devices: int | None) -> MeshSpec:
    if text == "auto":
        if n_devices is None:
            raise UserError("mesh 'auto' needs the device count; pass n_devices")
        return auto_mesh(n_devices)
    if re.fullmatch(r"\d+x\d+x\d+", text):
        sizes = [int(v) for v in text.split("x")]
        if min(sizes) < 1:
            raise UserError(f"invalid mesh {text!r}: sizes must be >= 1; {_MESH_HELP}")
        return MeshSpec(*sizes)
    if "=" in text:
        sizes: dict[str, int] = {}
        for part in text.split(","):
            match = re.fullmatch(r"\s*(data|z|y|x)\s*=\s*(\d+)\s*", part)
            if not match:
                raise UserError(f"invalid mesh {text!r}: cannot read {part!r}; {_MESH_HELP}")
            if match.group(1) in sizes:
                raise UserError(f"invalid mesh {text!r}: axis {match.group(1)} given twice")
            sizes[match.group(1)] = int(match.group(2))
        if min(sizes.values()) < 1:
            raise UserError(f"invalid mesh {text!r}: sizes must be >= 1; {_MESH_HELP}")
        return MeshSpec(**sizes)
    raise UserError(f"invalid mesh {text!r}; {_MESH_HELP}")


def build_mesh(spec, devices: Sequence | None = None):
    """A ``jax.sharding.Mesh`` with axes (data, z, y, x) over ``devices`` (default: all)."""
    import jax

    all_devices = list(jax.devices() if devices is None else devices)
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        spec = auto_mesh(len(all_devices))
    spec = parse_mesh(spec)
    if spec.n_devices > len(all_devices):
        parse_mesh(spec, n_devices=len(all_devices))  # raises the helpful error
    grid = np.array(all_devices[: spec.n_devices], dtype=object).reshape(spec.data, spec.z, spec.y, spec.x)
    return jax.sharding.Mesh(grid, MESH_AXES)


@dataclass(frozen=True)
class Shard:
    """One device's block. ``box`` is in padded coordinates; ``valid_box`` is the
    part of the original volume it holds (empty ranges when it holds only padding)."""

    index: int
    coords: tuple[int, int, int]
    box: tuple[tuple[int, int], ...]
    valid_box: tuple[tuple[int, int], ...]

    @property
    def is_empty(self) -> bool:
        return any(hi <= lo for lo, hi in self.valid_box)


class ShardLayout:
    """Geometry of a (Z, Y, X) volume split over the spatial axes of a mesh.

    * ``reference_shape``: the volume zero-padded at the high end of each axis to a
      multiple of ``multiple`` (= 2^(depth-1); or per axis (z, y, x), the product of a
      layer spec's strides), as MONAI's ``DivisiblePad`` does; the single-device
      reference runs on this.
    * ``padded_shape``: padded further to a multiple of ``mesh_size * multiple`` so
      every shard is the same size and every U-Net level splits evenly. The extra
      padding is treated as outside the volume at every layer (see docs/design.md).
    """

    def __init__(self, volume_shape: Sequence[int], mesh, *, multiple: int | Sequence[int] = 1):
        shape = tuple(int(s) for s in volume_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise UserError(f"volume shape {tuple(volume_shape)} must be 3 positive sizes (Z, Y, X)")
        if isinstance(multiple, (int, np.integer)):
            if multiple < 1 or multiple & (multiple - 1):
                raise UserError(f"multiple={multiple} must be a power of two (2^(depth-1))")
            multiples = (int(multiple),) * 3
        else:  # per axis (z, y, x): the product of a layer spec's strides
            multiples = tuple(int(m) for m in multiple)
            if len(multiples) != 3 or min(multiples) < 1:
                raise UserError(f"multiple={tuple(multiple)} must be 3 positive sizes (z, y, x)")
        self.mesh = parse_mesh(mesh)
        self.volume_shape = shape
        self.multiple = multiple
        self.multiples = multiples
        self.reference_shape = tuple(_round_up(s, m) for s, m in zip(shape, multiples))
        self.padded_shape = tuple(
            _round_up(r, m * k) for r, m, k in zip(self.reference_shape, self.mesh.spatial, multiples)
        )
        self.block_shape = tuple(p // m for p, m in zip(self.padded_shape, self.mesh.spatial))

    def __repr__(self) -> str:
        return (
            f"ShardLayout(volume={self.volume_shape}, mesh={self.mesh}, "
            f"padded={self.padded_shape}, block={self.block_shape})"
        )

    @property
    def pad_widths(self) -> tuple[tuple[int, int], ...]:
        return tuple((0, p - s) for p, s in zip(self.padded_shape, self.volume_shape))

    @property
    def padding_fraction(self) -> float:
        """Fraction of the padded volume that is padding (wasted compute)."""
        return 1.0 - math.prod(self.volume_shape) / math.prod(self.padded_shape)

    @property
    def needs_mask(self) -> tuple[bool, bool, bool]:
        """Per axis: does the partitioned run pad beyond the reference's padding?"""
        return tuple(p > r for p, r in zip(self.padded_shape, self.reference_shape))

    def shards(self) -> list[Shard]:
        out = []
        for index, coords in enumerate(itertools.product(*(range(m) for m in self.mesh.spatial))):
            box = tuple((c * b, (c + 1) * b) for c, b in zip(coords, self.block_shape))
            valid = tuple((min(lo, s), max(min(lo, s), min(hi, s))) for (lo, hi), s in zip(box, self.volume_shape))
            out.append(Shard(index, coords, box, valid))
        return out

    def pad(self, array: np.ndarray, *, target: str = "padded") -> np.ndarray:
        """Zero-pad the three spatial axes of a (Z,Y,X), (Z,Y,X,C) or (N,Z,Y,X,C) array."""
        shape = self.padded_shape if target == "padded" else self.reference_shape
        first = _spatial_start(array.ndim)
        widths = [(0, 0)] * array.ndim
        for i in range(3):
            have = array.shape[first + i]
            if have != self.volume_shape[i]:
                raise UserError(
                    f"array spatial shape {array.shape[first : first + 3]} does not match "
                    f"the layout's volume shape {self.volume_shape}"
                )
            widths[first + i] = (0, shape[i] - have)
        return np.pad(array, widths)

    def crop(self, array):
        """Crop a padded (Z,Y,X), (Z,Y,X,C) or (N,Z,Y,X,C) array back to the volume."""
        first = _spatial_start(array.ndim)
        index = [slice(None)] * array.ndim
        for i in range(3):
            index[first + i] = slice(0, self.volume_shape[i])
        return array[tuple(index)]

    def shard_ids(self, *, padded: bool = False) -> np.ndarray:
        """(Z, Y, X) int32 map of which shard holds each voxel (volume shape by default)."""
        shape = self.padded_shape if padded else self.volume_shape
        ids = [np.arange(s) // b for s, b in zip(shape, self.block_shape)]
        mz, my, mx = self.mesh.spatial
        return (ids[0][:, None, None] * (my * mx) + ids[1][None, :, None] * mx + ids[2][None, None, :]).astype(np.int32)


@dataclass(frozen=True)
class ProcessBlock:
    """What one process (host) of a multi-process run holds of a :class:`ShardLayout`.

    ``devices``: its global device numbers; ``shards`` and ``boxes``: the shard index and
    the padded box of each of those devices, in the same order (a shard repeats when the
    mesh has a ``data`` axis); ``box``: their bounding box (padded coordinates);
    ``valid_box``: that bounding box clipped to the volume, the part to read from disk
    (empty ranges when the process holds only padding).
    """

    process: int
    devices: tuple[int, ...]
    shards: tuple[int, ...]
    boxes: tuple[tuple[tuple[int, int], ...], ...]
    box: tuple[tuple[int, int], ...]
    valid_box: tuple[tuple[int, int], ...]


def process_blocks(layout: ShardLayout, processes: int, devices_per_process: int) -> list[ProcessBlock]:
    """Per process, the shards its devices hold and their bounding box.

    Devices are numbered process by process (process *p* owns devices
    ``p·devices_per_process … (p+1)·devices_per_process − 1``, as ``jax.devices()``
    orders them) and :func:`build_mesh` lays them out over (data, z, y, x) in that
    order, so device *d* holds shard ``d mod (z·y·x)`` of data replica ``d // (z·y·x)``.

    >>> layout = ShardLayout((64, 64, 64), parse_mesh("2x2x2"))
    >>> [b.box for b in process_blocks(layout, 2, 4)]
    [((0, 32), (0, 64), (0, 64)), ((32, 64), (0, 64), (0, 64))]
    """
    for name, value in (("processes", processes), ("devices_per_process", devices_per_process)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise UserError(f"{name}={value!r} must be a positive integer")
    spec = layout.mesh
    if processes * devices_per_process != spec.n_devices:
        raise UserError(
            f"{processes} processes × {devices_per_process} devices = {processes * devices_per_process} "
            f"devices, but mesh {spec} uses {spec.n_devices}; choose processes × devices per process "
            f"= {spec.n_devices}"
        )
    shards = layout.shards()
    out = []
    for process in range(processes):
        devices = tuple(range(process * devices_per_process, (process + 1) * devices_per_process))
        mine = [shards[d % spec.n_spatial] for d in devices]
        box = _bounding_box([s.box for s in mine])
        valid = tuple((min(lo, s), max(min(lo, s), min(hi, s))) for (lo, hi), s in zip(box, layout.volume_shape))
        out.append(ProcessBlock(process, devices, tuple(s.index for s in mine), tuple(s.box for s in mine), box, valid))
    return out


def _bounding_box(boxes) -> tuple[tuple[int, int], ...]:
    return tuple((min(b[i][0] for b in boxes), max(b[i][1] for b in boxes)) for i in range(3))


def _spatial_start(ndim: int) -> int:
    if ndim == 3 or ndim == 4:
        return 0
    if ndim == 5:
        return 1
    raise UserError(f"expected a (Z, Y, X), (Z, Y, X, C) or (N, Z, Y, X, C) array, got {ndim} dimensions")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def parse_resolution(value, *, allow_native: bool = False) -> tuple[int, int, int] | str:
    """A volume size as (Z, Y, X): ``512``, ``"512"``, ``"256x512x512"`` or a 3-sequence.

    With ``allow_native``, ``"native"`` (a loaded volume's own shape) is returned as is.

    >>> parse_resolution("64"), parse_resolution("32x64x64")
    ((64, 64, 64), (32, 64, 64))
    """
    fix = "type a positive integer such as 64, or ZxYxX such as 256x512x512" + (", or native" if allow_native else "")
    if isinstance(value, str):
        text = value.strip().lower()
        if allow_native and text == "native":
            return "native"
        parts = text.split("x")
        if len(parts) not in (1, 3) or not all(p.strip().isdigit() for p in parts):
            raise UserError(f"resolution {value!r} is not a size; {fix}")
        sizes = [int(p) for p in parts]
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        sizes = [int(value)]
    else:
        try:
            sizes = list(value)
        except TypeError:
            raise UserError(f"resolution {value!r} is not a size; {fix}") from None
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in sizes):
        raise UserError(f"resolution {value!r} is not a size; {fix}")
    return tuple(int(s) for s in sizes)
