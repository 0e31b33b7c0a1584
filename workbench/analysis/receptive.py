"""The U-Net's receptive field: how far a wrong halo reaches, and the halo each mode receives.

* :func:`receptive_field`: the exact receptive radius, the halo each layer needs, the
  ``overlap`` width that makes one input halo exact, and the seam depth.
* :func:`predicted_artifact_depth`: the depth of the band each halo mode corrupts
  (compare with :func:`workbench.analysis.compare.artifact_depth` of a measured profile).
* :func:`halo_width`: the level-0 shell each shard receives for a halo choice.
"""

from __future__ import annotations

from workbench.errors import UserError
from workbench.execute.run import overlap_width
from workbench.model.halo import validate_halo
from workbench.model.unet import UNetConfig, receptive_radius

__all__ = ["receptive_field", "predicted_artifact_depth", "halo_width"]


def _layer_names(config) -> list[tuple[str, int, str, int]]:
    """(name, level, part, conv index) of every 3x3x3 conv in execution order."""
    names = [
        (f"down{lvl}/conv{i}", lvl, "down", i) for lvl in range(config.depth) for i in range(config.convs_per_block)
    ]
    names += [
        (f"dec{lvl}/conv{i}", lvl, "dec", i)
        for lvl in reversed(range(config.depth - 1))
        for i in range(config.convs_per_block)
    ]
    return names


def _reach(config, level: int, part: str, upto: int, q: int) -> tuple[int, int]:
    """Level-0 input interval [lo, hi] that the output of conv ``upto - 1`` of block
    ``part``/``level`` at level-``level`` position ``q`` depends on."""
    convs, depth = config.convs_per_block, config.depth

    def encoder(lvl, lo, hi, k):
        lo, hi = lo - k, hi + k
        if lvl == 0:
            return lo, hi
        return encoder(lvl - 1, 2 * lo, 2 * hi + 1, convs)  # max-pool: i <- 2i, 2i+1

    def decoder(lvl, lo, hi, k):
        if lvl == depth - 1:
            return encoder(lvl, lo, hi, k)
        lo, hi = lo - k, hi + k
        skip = encoder(lvl, lo, hi, convs)
        up = decoder(lvl + 1, lo // 2, hi // 2, convs)  # transposed conv: i <- i // 2
        return min(skip[0], up[0]), max(skip[1], up[1])

    return (encoder if part == "down" else decoder)(level, q, q, upto)


def receptive_field(config) -> dict:
    """The U-Net's exact receptive field and the halo each layer needs.

    Returns ``{"radius": r, "overlap_width": w, "seam_depth": s, "layers": [...]}``:
    ``r`` (level-0 voxels) is the receptive radius of the output (an output voxel
    depends on inputs at most ``r`` away, worst case over the pooling grid); ``w``
    the input halo that makes ``overlap`` mode exact (``r`` rounded up to
    2^(depth-1)); ``s`` the deepest an output voxel can sit from a shard face and
    still see across it (shard faces lie on the pooling grid, so ``s <= r``). Each
    layer row has ``name``, ``level``, ``halo`` (voxels per side at its level: 1 for
    a 3x3x3 conv), ``halo_level0`` (2^level: the same halo in input voxels) and
    ``radius`` (receptive radius of that layer's output in level-0 voxels: how far
    a wrong halo at the input can reach).
    """

    layers = []
    for name, level, part, i in _layer_names(config):
        radius, step = 0, 2**level
        for q in range(2 ** (config.depth - 1 - level)):
            lo, hi = _reach(config, level, part, i + 1, q)
            # level-`level` voxel q covers level-0 voxels [q*step, (q+1)*step - 1]
            radius = max(radius, q * step - lo, hi - ((q + 1) * step - 1))
        layers.append({"name": name, "level": level, "halo": 1, "halo_level0": step, "radius": int(radius)})
    return {
        "radius": receptive_radius(config),
        "overlap_width": overlap_width(config),
        "seam_depth": _seam_depth(config),
        "layers": layers,
    }


def _seam_depth(config) -> int:
    """Largest d + 1 such that an output voxel d voxels from a grid-aligned face
    depends on an input on the other side."""
    m, convs = config.multiple, config.convs_per_block
    reach = [_reach(config, 0, "dec" if config.depth > 1 else "down", convs, p) for p in range(m)]
    radius = max(max(p - lo, hi - p) for p, (lo, hi) in enumerate(reach))
    depth = 0
    for d in range(radius + 1):
        above = d % m  # voxel S + d, S a multiple of m: needs an input below S
        below = (-1 - d) % m  # voxel S - 1 - d: needs an input at or above S
        if above - reach[above][0] > d or reach[below][1] - below > d:
            depth = d + 1
    return depth


def predicted_artifact_depth(config, halo) -> int:
    """Depth (voxels from a seam) of the band a halo mode corrupts.

    ``exact`` and ``overlap``: 0. ``zero``/``reflect``/``replicate`` (and width 0):
    the seam depth ``s`` of :func:`receptive_field` (every layer's halo is wrong, and
    the first layer's reaches every output that sees across the face). An overlap
    width ``w`` (a multiple of 2^(depth-1)): ``s - w``, as the shard's own zero
    padding now sits ``w`` voxels beyond the face; 0 once ``w >= s``.
    """

    halo = validate_halo(halo)
    if halo in ("exact", "overlap"):
        return 0
    s = _seam_depth(config)
    if isinstance(halo, int):
        return s if halo == 0 else max(s - halo, 0)
    return s


def halo_width(halo, *, model: dict | None = None) -> int:
    """Level-0 width of the shell each shard receives from its neighbours for a halo choice.

    ``exact``: 1 voxel (a 1-voxel shell per 3×3×3 conv layer, at every resolution level);
    an integer ``w``: ``w`` (the input halo); ``overlap``: the receptive radius rounded up
    to 2^(depth-1) (needs ``model``, the report's config dict); ``zero`` / ``reflect`` /
    ``replicate`` / ``0``: 0 (each shard pads itself, nothing is received).
    """
    if isinstance(halo, str) and halo.strip().lstrip("-").isdigit():
        halo = int(halo)
    if isinstance(halo, bool) or not isinstance(halo, (int, str)):
        raise UserError(f"halo={halo!r} is not a halo mode; use exact, zero, reflect, replicate, overlap or a width")
    if isinstance(halo, int):
        if halo < 0:
            raise UserError(f"halo width {halo} must be >= 0")
        return halo
    text = halo.strip().lower()
    if text == "exact":
        return 1
    if text in ("zero", "reflect", "replicate"):
        return 0
    if text == "overlap":
        if model is None:
            raise UserError("halo 'overlap' needs the model config to know its width; pass model=config.as_dict()")
        return overlap_width(UNetConfig(**model))
    raise UserError(f"unknown halo mode {halo!r}; use exact, zero, reflect, replicate, overlap or a width")
