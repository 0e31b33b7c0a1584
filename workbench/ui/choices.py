"""What the notebook panel offers: meshes, data-parallel sizes, resolutions, halo modes.

Pure functions of the device count, the mesh and the model (no widgets, no JAX), so the
panel's choices are tested without a notebook.
"""

from __future__ import annotations

import math

from workbench.errors import UserError
from workbench.mesh import MeshSpec, ShardLayout, valid_meshes

__all__ = [
    "data_choices",
    "mesh_choices",
    "mesh_svg",
    "resolution_step",
    "valid_resolutions",
    "padding_note",
    "halo_options",
    "shape_text",
    "NICE_SIZES",
]

# Sizes a resolution picker offers (those that split evenly on the chosen mesh).
NICE_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_SHARD_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")


def data_choices(n_devices: int) -> list[int]:
    """Data-parallel sizes for ``n_devices``: the divisors of the device count."""
    return [d for d in range(1, n_devices + 1) if n_devices % d == 0]


def mesh_choices(n_devices: int, *, data: int = 1) -> list[tuple[str, MeshSpec]]:
    """(label, MeshSpec) for every z×y×x mesh of ``n_devices // data`` devices.

    >>> [label for label, _ in mesh_choices(4)]
    ['1×1×4', '1×2×2', '1×4×1', '2×1×2', '2×2×1', '4×1×1']
    """
    if data < 1 or n_devices % data:
        raise UserError(
            f"data-parallel size {data} does not divide the {n_devices} devices; "
            f"choose one of {data_choices(n_devices)}"
        )
    out = []
    for spec in valid_meshes(n_devices // data):
        mesh = MeshSpec(*spec.spatial, data=data)
        label = "×".join(str(s) for s in mesh.spatial)
        out.append((label if data == 1 else f"{label} (data {data})", mesh))
    return out


def mesh_svg(spec: MeshSpec, *, cell: int = 16) -> str:
    """A small SVG of the device grid: one y×x panel per z slab, one colour per device."""
    mz, my, mx = spec.spatial
    cell = max(4, min(cell, 96 // max(my, mx)))
    gap, top = 10, 14
    width = mz * (mx * cell + gap) + gap
    height = my * cell + top + (18 if spec.data > 1 else 6)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="10">'
    ]
    for z in range(mz):
        x0 = gap + z * (mx * cell + gap)
        parts.append(f'<text x="{x0}" y="10">z{z}</text>')
        for y in range(my):
            for x in range(mx):
                index = (z * my + y) * mx + x
                colour = _SHARD_COLOURS[index % len(_SHARD_COLOURS)]
                parts.append(
                    f'<rect x="{x0 + x * cell}" y="{top + y * cell}" width="{cell - 1}" '
                    f'height="{cell - 1}" fill="{colour}"><title>device {index}: '
                    f"z{z} y{y} x{x}</title></rect>"
                )
    if spec.data > 1:
        parts.append(f'<text x="{gap}" y="{height - 4}">× {spec.data} data-parallel copies</text>')
    parts.append("</svg>")
    return "".join(parts)


def resolution_step(spec: MeshSpec, multiple) -> int:
    """Cube sides that are multiples of this split evenly on ``spec`` (no padding).
    ``multiple``: the model's size multiple, one for every axis or per axis (z, y, x)."""
    multiples = (multiple,) * 3 if isinstance(multiple, int) else tuple(multiple)
    return math.lcm(*(parts * m for parts, m in zip(spec.spatial, multiples)))


def valid_resolutions(spec: MeshSpec, multiple, *, largest: int = 1024) -> list[int]:
    """Cube sides up to ``largest`` that need no padding on ``spec`` for a model whose
    sides must be multiples of ``multiple`` (2^(depth-1) for the presets; per axis, the
    stride products ``spec.multiple``, for nnU-Net's networks).

    >>> valid_resolutions(MeshSpec(2, 2, 2), 4, largest=128)
    [16, 24, 32, 48, 64, 96, 128]
    >>> valid_resolutions(MeshSpec(1, 2, 2), (2, 8, 8), largest=128)
    [16, 32, 48, 64, 96, 128]
    """
    step = resolution_step(spec, multiple)
    sizes = [n for n in NICE_SIZES if n % step == 0 and n <= largest]
    return sizes or [k * step for k in range(1, 13) if k * step <= max(largest, step)]


def shape_text(shape) -> str:
    shape = tuple(shape)
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(str(s) for s in shape)


def padding_note(shape, spec: MeshSpec, multiple: int) -> str:
    """One line: does ``shape`` split evenly on ``spec``, and what padding would it add."""
    layout = ShardLayout(shape, spec, multiple=multiple)
    blocks = f"{spec.n_spatial} blocks of {shape_text(layout.block_shape)}"
    if layout.padded_shape == layout.volume_shape:
        return f"{shape_text(shape)} splits evenly: {blocks}"
    extra = math.prod(layout.padded_shape) / math.prod(layout.volume_shape) - 1.0
    return (
        f"{shape_text(shape)} is padded to {shape_text(layout.padded_shape)} on this mesh "
        f"(+{100 * extra:.0f}% voxels, masked out): {blocks}"
    )


def halo_options(config) -> list[tuple[str, object]]:
    """(label, value) of every halo choice for ``config``: exact, overlap at the full
    receptive width, the per-shard paddings, and overlaps narrower than needed (in steps of
    the size multiple). Widths come from the layer spec (``config.spec()``). An nnU-Net
    network (a plans file's ``NNUNetConfig``) runs with exact halos only."""
    from workbench.execute.run import overlap_width

    if getattr(config, "kind", None) == "nnunet":
        return [("exact", "exact")]
    full, step = overlap_width(config), max(config.spec().multiple)
    narrow = [(f"overlap {w} (narrower than the {full} needed)", w) for w in range(step, full, step)]
    return (
        [("exact", "exact"), (f"overlap (input halo {full}, exact)", "overlap")]
        + [(m, m) for m in ("zero", "reflect", "replicate")]
        + narrow
    )
