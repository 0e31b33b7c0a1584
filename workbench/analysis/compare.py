"""Seeing what partitioning does: comparison with the single-device reference.

* :func:`compare`: error volume, per-shard max/mean error, the **seam profile**
  (error as a function of the distance to the nearest shard face), argmax
  disagreement and Dice between the two predictions. It walks the volume shard by
  shard, so the inputs may be memory-mapped or zarr arrays larger than memory
  (pass ``keep_error=False`` to skip the full error volume).
* :func:`seam_distance`: per voxel, the distance to the nearest face shared by two
  shards (the volume's outer faces are not seams).
* :func:`artifact_depth`: how deep from the seams the error reaches.
* :func:`receptive_field` / :func:`predicted_artifact_depth`: the U-Net's exact
  receptive field, the halo each layer needs, and the depth of the artifact band
  each halo mode must produce.
* :func:`plot_seam_profile`: the profile as a matplotlib figure.

Example
-------
>>> ref = apply(model, volume, backend="reference")
>>> out = apply(model, volume, "2x1x1", halo="zero")
>>> cmp = compare(out, ref, ShardLayout(volume.shape, "2x1x1", multiple=4))
>>> artifact_depth(cmp.profile) == predicted_artifact_depth(model.config, "zero")
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.mesh import ShardLayout

__all__ = [
    "Comparison",
    "compare",
    "seam_distance",
    "seam_profile_table",
    "artifact_depth",
    "receptive_field",
    "predicted_artifact_depth",
    "plot_seam_profile",
]

# Below this the partitioned and reference runs agree up to float32 summation order.
DEFAULT_TOL = 1e-4


@dataclass
class Comparison:
    """What :func:`compare` measured. Distances are in voxels from the nearest seam
    (0 = the voxel touching it); ``profile`` rows are indexed by distance."""

    max_abs_diff: float
    mean_abs_diff: float
    argmax_disagreement: float
    dice: dict[int, float]
    per_shard: list[dict]
    profile: dict[str, np.ndarray]
    error: np.ndarray | None = None
    voxels: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-able summary (no error volume)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("error", "profile")}
        d["profile"] = {k: v.tolist() for k, v in self.profile.items()}
        d["dice"] = {str(k): v for k, v in self.dice.items()}
        return d


def _seam_distance_1d(n: int, block: int, mesh_size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Distance of positions ``start:stop`` (of ``n``) to the nearest internal seam, or a
    large number where the axis is not split."""
    stop = n if stop is None else stop
    pos = np.arange(start, stop)
    far = np.iinfo(np.int32).max // 4
    if mesh_size == 1:
        return np.full(pos.shape, far, np.int64)
    seams = np.arange(1, mesh_size) * block  # a seam lies between voxels s-1 and s
    seams = seams[seams < n]
    if seams.size == 0:
        return np.full(pos.shape, far, np.int64)
    d = np.where(pos[:, None] >= seams[None, :], pos[:, None] - seams[None, :], seams[None, :] - 1 - pos[:, None])
    return d.min(axis=1)


def seam_distance(layout: ShardLayout, box=None) -> np.ndarray:
    """(Z, Y, X) int distance of each voxel to the nearest face between two shards.

    ``box`` ((z0, z1), (y0, y1), (x0, x1)) restricts to a sub-block. Voxels on an
    axis that is not split only see the seams of the other axes; with no seam at all
    the distance is a large sentinel.
    """
    box = box or tuple((0, s) for s in layout.volume_shape)
    d = [
        _seam_distance_1d(layout.volume_shape[i], layout.block_shape[i], layout.mesh.spatial[i], *box[i])
        for i in range(3)
    ]
    return np.minimum(np.minimum(d[0][:, None, None], d[1][None, :, None]), d[2][None, None, :])


def _check_pair(output, reference, layout: ShardLayout):
    for name, a in (("output", output), ("reference", reference)):
        if a.ndim not in (3, 4, 5):
            raise ValueError(f"{name} has shape {a.shape}: expected (Z, Y, X[, K]) or (N, Z, Y, X, K)")
    if output.shape != reference.shape:
        raise ValueError(f"output shape {output.shape} differs from reference shape {reference.shape}; "
                         "compare runs of the same volume")
    first = 1 if output.ndim == 5 else 0
    if tuple(output.shape[first:first + 3]) != layout.volume_shape:
        raise ValueError(f"arrays have spatial shape {output.shape[first:first + 3]} but the layout is for "
                         f"{layout.volume_shape}; build the ShardLayout from the volume's shape")
    return first


def compare(output, reference, layout: ShardLayout, *, keep_error: bool = True, max_distance: int | None = None,
            tol: float = DEFAULT_TOL) -> Comparison:
    """Compare a partitioned run's logits with the reference's, shard by shard.

    Parameters
    ----------
    output, reference
        logits (Z, Y, X, K) or (N, Z, Y, X, K) (or (Z, Y, X) scalar maps), any array
        that slices into numpy (numpy, memmap, zarr).
    layout
        the partitioned run's :class:`~workbench.mesh.ShardLayout` (its volume shape
        must match the arrays).
    keep_error
        build the (Z, Y, X) error volume (max |Δ| over classes and batch).
    max_distance
        profile rows 0..max_distance (default: the largest distance present).
    tol
        per-shard ``artifact_voxels`` count voxels with error above this.
    """
    first = _check_pair(output, reference, layout)
    has_classes = output.ndim in (4, 5)
    split = [m > 1 for m in layout.mesh.spatial]
    limit = max_distance
    if limit is None:
        limit = max([max(layout.block_shape[i], layout.volume_shape[i] - layout.block_shape[i])
                     for i in range(3) if split[i]] or [0])
    bins = limit + 2  # the last bin collects voxels farther than `limit` (or with no seam)
    p_max = np.zeros(bins)
    p_sum = np.zeros(bins)
    p_count = np.zeros(bins, np.int64)
    error = np.zeros(layout.volume_shape, np.float32) if keep_error else None
    n_classes = output.shape[-1] if has_classes else 0
    inter = np.zeros(n_classes, np.int64)
    sizes = np.zeros(n_classes, np.int64)
    disagree, total, total_sum, total_max = 0, 0, 0.0, 0.0
    rows = []
    for shard in layout.shards():
        if shard.is_empty:
            continue
        sl = [slice(None)] * output.ndim
        for i, (lo, hi) in enumerate(shard.valid_box):
            sl[first + i] = slice(lo, hi)
        out_b = np.asarray(output[tuple(sl)], np.float32)  # f32[(n,) z', y', x'(, k)]
        ref_b = np.asarray(reference[tuple(sl)], np.float32)
        diff = np.abs(out_b - ref_b)
        if has_classes:
            diff = diff.max(axis=-1)
        if first:
            diff = diff.max(axis=0)  # f32[z', y', x']
        if error is not None:
            error[tuple(slice(lo, hi) for lo, hi in shard.valid_box)] = diff
        dist = np.minimum(seam_distance(layout, shard.valid_box), limit + 1).ravel()
        flat = diff.ravel().astype(np.float64)
        np.maximum.at(p_max, dist, flat)
        p_sum += np.bincount(dist, weights=flat, minlength=bins)
        p_count += np.bincount(dist, minlength=bins)
        if has_classes:
            a, b = out_b.argmax(-1), ref_b.argmax(-1)
            disagree += int((a != b).sum())
            for k in range(n_classes):
                inter[k] += int(((a == k) & (b == k)).sum())
                sizes[k] += int((a == k).sum() + (b == k).sum())
        total += diff.size
        total_sum += float(flat.sum())
        total_max = max(total_max, float(diff.max()))
        rows.append({
            "index": shard.index,
            "coords": list(shard.coords),
            "box": [list(b) for b in shard.valid_box],
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "artifact_voxels": int((diff > tol).sum()),
        })
    seen = p_count > 0
    profile = {
        "distance": np.arange(bins)[seen],
        "max": p_max[seen],
        "mean": np.where(seen, p_sum / np.maximum(p_count, 1), 0.0)[seen],
        "count": p_count[seen],
    }
    dice = {}
    for k in range(n_classes):
        dice[k] = 1.0 if sizes[k] == 0 else float(2 * inter[k] / sizes[k])
    n_vox = int(np.prod(layout.volume_shape)) * (output.shape[0] if first else 1)
    return Comparison(
        max_abs_diff=total_max,
        mean_abs_diff=total_sum / max(total, 1),
        argmax_disagreement=disagree / n_vox if has_classes else float("nan"),
        dice=dice,
        per_shard=rows,
        profile=profile,
        error=error,
        voxels=total,
        extra={"profile_limit": limit},
    )


def seam_profile_table(profile: dict[str, np.ndarray], *, every: int = 1, limit: int | None = None) -> str:
    """The seam profile as a text table (distance, voxels, max and mean |Δ|)."""
    lines = [f"{'distance':>9}{'voxels':>10}{'max |Δ|':>12}{'mean |Δ|':>12}"]
    for d, n, mx, mn in zip(profile["distance"], profile["count"], profile["max"], profile["mean"]):
        if (limit is not None and d > limit) or d % every:
            continue
        lines.append(f"{int(d):>9}{int(n):>10}{mx:>12.3g}{mn:>12.3g}")
    return "\n".join(lines)


def artifact_depth(profile: dict[str, np.ndarray], *, tol: float = DEFAULT_TOL) -> int:
    """Depth of the artifact band: 1 + the largest seam distance whose max error exceeds
    ``tol`` (0 when no voxel does). A depth of r means voxels 0..r-1 away from a seam."""
    bad = profile["distance"][profile["max"] > tol]
    return int(bad.max()) + 1 if bad.size else 0


# -- receptive field ----------------------------------------------------------------------------
def _layer_names(config) -> list[tuple[str, int, str, int]]:
    """(name, level, part, conv index) of every 3x3x3 conv in execution order."""
    names = [(f"down{lvl}/conv{i}", lvl, "down", i) for lvl in range(config.depth) for i in range(config.convs_per_block)]
    names += [(f"dec{lvl}/conv{i}", lvl, "dec", i) for lvl in reversed(range(config.depth - 1))
              for i in range(config.convs_per_block)]
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
    from workbench.execute.run import overlap_width
    from workbench.model.unet import receptive_radius

    layers = []
    for name, level, part, i in _layer_names(config):
        radius, step = 0, 2**level
        for q in range(2 ** (config.depth - 1 - level)):
            lo, hi = _reach(config, level, part, i + 1, q)
            # level-`level` voxel q covers level-0 voxels [q*step, (q+1)*step - 1]
            radius = max(radius, q * step - lo, hi - ((q + 1) * step - 1))
        layers.append({"name": name, "level": level, "halo": 1, "halo_level0": step, "radius": int(radius)})
    return {"radius": receptive_radius(config), "overlap_width": overlap_width(config),
            "seam_depth": _seam_depth(config), "layers": layers}


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
    from workbench.model.halo import validate_halo

    halo = validate_halo(halo)
    if halo in ("exact", "overlap"):
        return 0
    s = _seam_depth(config)
    if isinstance(halo, int):
        return s if halo == 0 else max(s - halo, 0)
    return s


def plot_seam_profile(profiles: dict[str, dict[str, np.ndarray]], *, path=None, predicted: dict | None = None,
                      title: str = "", tol: float = DEFAULT_TOL):
    """Max |Δ| against seam distance, one line per run (``{label: profile}``), log scale.

    ``predicted`` ({label: depth}) draws each run's predicted band edge as a dashed
    line. Saves to ``path`` when given; returns the figure.
    """
    import matplotlib

    if path is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, prof in profiles.items():
        line, = ax.semilogy(prof["distance"], np.maximum(prof["max"], 1e-9), marker=".", label=label)
        if predicted and label in predicted and predicted[label] > 0:
            ax.axvline(predicted[label] - 0.5, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.axhline(tol, color="gray", linewidth=0.6)
    ax.set_xlabel("distance to the nearest shard face (voxels)")
    ax.set_ylabel("max |partitioned − reference|")
    ax.set_title(title or "seam profile (dashed: receptive-field prediction)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return fig
