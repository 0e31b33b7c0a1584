"""Partitioned vs single-device reference: the one place error statistics are computed.

* :func:`signed_error`: partitioned − reference per voxel (for logits: at the class with
  the largest ``|Δ|``, so ``|signed|`` is the max over classes).
* :func:`shard_stats`: per shard ``max_abs_diff``, ``mean_abs_diff``, ``rms_diff`` and
  ``voxels_over_tolerance`` of an error map.
* :func:`seam_profile`: max and mean ``|Δ|`` against the distance to the nearest face
  between two shards (:func:`seam_distance`; the volume's outer faces are not seams).
* :func:`compare`: both of them plus argmax disagreement and Dice between the two
  predictions, from the logits, walking the volume shard by shard and slab by slab, so
  the inputs may be memory-mapped or zarr arrays larger than memory.
* :func:`compare_shards` / :func:`merge_shards`: the same comparison made shard by shard
  where the shards live (each process of a multi-process run compares its own shards and
  packs the result into one small vector; the vectors of all processes merge into the
  :class:`Comparison` that :func:`compare` would give for the whole volume).
* :func:`artifact_depth`: how deep from the seams a measured profile's error reaches
  (compare with :func:`workbench.analysis.receptive.predicted_artifact_depth`).

Every per-shard row has the same keys wherever it is shown (``report.json``, the
napari layers, the notebook panel): ``index``, ``coords``, ``box``, ``max_abs_diff``,
``mean_abs_diff``, ``rms_diff``, ``voxels_over_tolerance`` (``None`` for a shard that
holds only padding). A profile has ``distance``, ``max``, ``mean`` and ``count``.

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
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.mesh import ShardLayout

__all__ = [
    "Comparison",
    "compare",
    "compare_shards",
    "merge_shards",
    "signed_error",
    "shard_stats",
    "seam_profile",
    "seam_distance",
    "seam_profile_table",
    "artifact_depth",
    "DEFAULT_TOL",
]

# Below this the partitioned and reference runs agree up to float32 summation order.
DEFAULT_TOL = 1e-4
_SLAB_VOXELS = 1 << 22  # temporaries stay below ~32 MiB (float64) per array


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
    reference_scale: float = 0.0  # the largest |reference value|: float32 differences scale with it
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-able summary (no error volume)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("error", "profile")}
        d["profile"] = {k: v.tolist() for k, v in self.profile.items()}
        d["dice"] = {str(k): v for k, v in self.dice.items()}
        return d


# -- geometry of the seams ---------------------------------------------------------------
def _seam_distance_1d(n: int, block: int, mesh_size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Distance of positions ``start:stop`` (of ``n``) to the nearest internal seam, or a
    large number where the axis is not split."""
    stop = n if stop is None else stop
    pos = np.arange(start, stop)
    far = np.iinfo(np.int32).max // 4
    seams = np.arange(1, mesh_size) * block  # a seam lies between voxels s-1 and s
    seams = seams[seams < n]  # a shard beyond the volume holds only padding: no seam
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


def _default_limit(layout: ShardLayout) -> int:
    split = [m > 1 for m in layout.mesh.spatial]
    return max(
        [max(layout.block_shape[i], layout.volume_shape[i] - layout.block_shape[i]) for i in range(3) if split[i]]
        or [0]
    )


def _slabs_of(box, row_voxels: int) -> Iterator[tuple]:
    """Sub-boxes of ``box`` cut along z so each holds about :data:`_SLAB_VOXELS` voxels."""
    (z0, z1), rest = box[0], tuple(box[1:])
    step = max(1, _SLAB_VOXELS // max(1, row_voxels))
    for lo in range(z0, z1, step):
        yield ((lo, min(z1, lo + step)), *rest)


# -- the accumulator both statistics share -------------------------------------------------
class _Statistics:
    """Per-shard rows and the seam profile, fed one block of ``|Δ|`` at a time."""

    def __init__(self, layout: ShardLayout, *, tolerance: float, max_distance: int | None):
        self.layout = layout
        self.tolerance = tolerance
        self.limit = _default_limit(layout) if max_distance is None else int(max_distance)
        bins = self.limit + 2  # the last bin collects voxels farther than `limit` (or with no seam)
        self.p_max = np.zeros(bins)
        self.p_sum = np.zeros(bins)
        self.p_count = np.zeros(bins, np.int64)
        self.rows: list[dict] = []

    def shard(self, shard, blocks: Iterator[tuple[tuple, np.ndarray]]) -> None:
        """Add one shard, given as (sub-box, ``|Δ|`` block) pairs covering its valid box."""
        row = {
            "index": shard.index,
            "coords": list(shard.coords),
            "box": [list(b) for b in shard.valid_box],
            "max_abs_diff": None,
            "mean_abs_diff": None,
            "rms_diff": None,
            "voxels_over_tolerance": None,
        }
        total = sq = worst = 0.0
        count = over = 0
        for box, err in blocks:
            flat = np.asarray(err, np.float64).ravel()
            dist = np.minimum(seam_distance(self.layout, box), self.limit + 1).ravel()
            np.maximum.at(self.p_max, dist, flat)
            self.p_sum += np.bincount(dist, weights=flat, minlength=self.p_sum.size)
            self.p_count += np.bincount(dist, minlength=self.p_count.size)
            total += float(flat.sum())
            sq += float((flat * flat).sum())
            worst = max(worst, float(flat.max()) if flat.size else 0.0)
            count += flat.size
            over += int((flat > self.tolerance).sum())
        if count:
            row.update(
                max_abs_diff=worst,
                mean_abs_diff=total / count,
                rms_diff=math.sqrt(sq / count),
                voxels_over_tolerance=over,
            )
        self.rows.append(row)

    def profile(self) -> dict[str, np.ndarray]:
        seen = self.p_count > 0
        return {
            "distance": np.arange(self.p_count.size)[seen],
            "max": self.p_max[seen],
            "mean": (self.p_sum / np.maximum(self.p_count, 1))[seen],
            "count": self.p_count[seen],
        }


def _check_map(error, layout: ShardLayout, name: str = "error map") -> None:
    if np.ndim(error) != 3 or tuple(np.shape(error)) != tuple(layout.volume_shape):
        raise UserError(
            f"{name} has shape {tuple(np.shape(error))} but the volume is {tuple(layout.volume_shape)}; "
            "pass arrays of the same run (crop padding first)"
        )


def _map_blocks(error, layout: ShardLayout, shard):
    row = int(np.prod(error.shape[1:]))
    for box in _slabs_of(shard.valid_box, row):
        yield box, np.abs(np.asarray(error[tuple(slice(lo, hi) for lo, hi in box)], np.float64))


def _statistics(error, layout: ShardLayout, *, tolerance: float, max_distance: int | None) -> _Statistics:
    _check_map(error, layout)
    stats = _Statistics(layout, tolerance=tolerance, max_distance=max_distance)
    for shard in layout.shards():
        stats.shard(shard, _map_blocks(error, layout, shard) if not shard.is_empty else iter(()))
    return stats


def shard_stats(error, layout: ShardLayout, *, tolerance: float = 1e-5) -> list[dict]:
    """Per shard of ``layout``: the statistics of ``|error|`` (a (Z, Y, X) map, signed or not).

    Rows: ``index``, ``coords``, ``box``, ``max_abs_diff``, ``mean_abs_diff``, ``rms_diff``,
    ``voxels_over_tolerance`` (all ``None`` for shards holding only padding).
    """
    return _statistics(error, layout, tolerance=tolerance, max_distance=0).rows


def seam_profile(error, layout: ShardLayout, *, max_distance: int | None = None) -> dict[str, np.ndarray]:
    """Max and mean ``|error|`` against the distance to the nearest seam (0 = touching).

    Rows ``0..max_distance`` (default: the largest distance present); farther voxels, and
    voxels with no seam on any axis, are pooled in one last row at ``max_distance + 1``.
    """
    return _statistics(error, layout, tolerance=math.inf, max_distance=max_distance).profile()


# -- error maps and the comparison ---------------------------------------------------------
def signed_error(output, reference) -> np.ndarray:
    """Partitioned − reference per voxel, float32 (Z, Y, X).

    For ``(Z, Y, X, K)`` logits it is the difference at the class with the largest
    ``|Δ|`` (so ``|signed|`` is the max over classes, as ``report.json`` measures).
    Computed slab by slab: temporaries stay small for 512³ volumes.
    """
    if np.shape(output) != np.shape(reference):
        raise UserError(
            f"output shape {np.shape(output)} does not match reference shape "
            f"{np.shape(reference)}; compare arrays of the same volume"
        )
    if np.ndim(output) not in (3, 4):
        raise UserError(f"expected (Z, Y, X) or (Z, Y, X, K) arrays, got shape {np.shape(output)}")
    out = np.empty(output.shape[:3], np.float32)
    step = max(1, _SLAB_VOXELS // int(np.prod(output.shape[1:])))
    for z0 in range(0, output.shape[0], step):
        sl = slice(z0, z0 + step)
        diff = np.asarray(output[sl], np.float32) - np.asarray(reference[sl], np.float32)
        if diff.ndim == 4:
            k = np.abs(diff).argmax(-1)[..., None]
            diff = np.take_along_axis(diff, k, -1)[..., 0]
        out[sl] = diff
    return out


def _check_pair(output, reference, layout: ShardLayout):
    for name, a in (("output", output), ("reference", reference)):
        if a.ndim not in (3, 4, 5):
            raise UserError(f"{name} has shape {a.shape}: expected (Z, Y, X[, K]) or (N, Z, Y, X, K)")
    if output.shape != reference.shape:
        raise UserError(
            f"output shape {output.shape} differs from reference shape {reference.shape}; "
            "compare runs of the same volume"
        )
    first = 1 if output.ndim == 5 else 0
    if tuple(output.shape[first : first + 3]) != layout.volume_shape:
        raise UserError(
            f"arrays have spatial shape {output.shape[first : first + 3]} but the layout is for "
            f"{layout.volume_shape}; build the ShardLayout from the volume's shape"
        )
    return first


def compare(
    output,
    reference,
    layout: ShardLayout,
    *,
    keep_error: bool = True,
    max_distance: int | None = None,
    tol: float = DEFAULT_TOL,
) -> Comparison:
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
        per-shard ``voxels_over_tolerance`` count voxels with error above this.
    """
    first = _check_pair(output, reference, layout)
    has_classes = output.ndim in (4, 5)
    stats = _Statistics(layout, tolerance=tol, max_distance=max_distance)
    error = np.zeros(layout.volume_shape, np.float32) if keep_error else None
    n_classes = output.shape[-1] if has_classes else 0
    inter = np.zeros(n_classes, np.int64)
    sizes = np.zeros(n_classes, np.int64)
    counts = {"disagree": 0, "scale": 0.0}
    row_voxels = int(np.prod(output.shape[first + 1 :])) * (output.shape[0] if first else 1)

    def blocks(shard):
        for box in _slabs_of(shard.valid_box, row_voxels):
            sl = [slice(None)] * output.ndim
            for i, (lo, hi) in enumerate(box):
                sl[first + i] = slice(lo, hi)
            out_b = np.asarray(output[tuple(sl)], np.float32)  # f32[(n,) z', y', x'(, k)]
            ref_b = np.asarray(reference[tuple(sl)], np.float32)
            diff = np.abs(out_b - ref_b)
            if ref_b.size:
                counts["scale"] = max(counts["scale"], float(np.abs(ref_b).max()))
            if has_classes:
                diff = diff.max(axis=-1)
                a, b = out_b.argmax(-1), ref_b.argmax(-1)
                counts["disagree"] += int((a != b).sum())
                for k in range(n_classes):
                    inter[k] += int(((a == k) & (b == k)).sum())
                    sizes[k] += int((a == k).sum() + (b == k).sum())
            if first:
                diff = diff.max(axis=0)  # f32[z', y', x']
            if error is not None:
                error[tuple(slice(lo, hi) for lo, hi in box)] = diff
            yield box, diff

    for shard in layout.shards():
        stats.shard(shard, blocks(shard) if not shard.is_empty else iter(()))
    filled = [r for r in stats.rows if r["max_abs_diff"] is not None]
    total = sum(int(np.prod([hi - lo for lo, hi in r["box"]])) for r in filled)
    total_sum = sum(r["mean_abs_diff"] * int(np.prod([hi - lo for lo, hi in r["box"]])) for r in filled)
    dice = {k: 1.0 if sizes[k] == 0 else float(2 * inter[k] / sizes[k]) for k in range(n_classes)}
    n_vox = int(np.prod(layout.volume_shape)) * (output.shape[0] if first else 1)
    return Comparison(
        max_abs_diff=max((r["max_abs_diff"] for r in filled), default=0.0),
        mean_abs_diff=total_sum / max(total, 1),
        argmax_disagreement=counts["disagree"] / n_vox if has_classes else float("nan"),
        dice=dice,
        per_shard=stats.rows,
        profile=stats.profile(),
        error=error,
        voxels=total,
        reference_scale=counts["scale"],
        extra={"profile_limit": stats.limit},
    )


_ROW = ("max_abs_diff", "mean_abs_diff", "rms_diff", "voxels_over_tolerance")


def compare_shards(blocks, layout: ShardLayout, n_classes: int, *, tol: float = DEFAULT_TOL) -> np.ndarray:
    """Compare some shards' logits with the reference's; the result packed for :func:`merge_shards`.

    ``blocks`` yields ``(shard, output, reference)``: a :class:`~workbench.mesh.Shard` of
    ``layout`` and both (z, y, x, K) logits over its ``valid_box``. Returns a float64
    vector of fixed length (per-shard rows, the seam profile's sums, Dice counts), so
    every process's vector can be gathered and merged.
    """
    stats = _Statistics(layout, tolerance=tol, max_distance=None)
    rows = np.full((len(layout.shards()), 1 + len(_ROW)), np.nan)
    inter, sizes = np.zeros(n_classes), np.zeros(n_classes)
    disagree, scale = 0, 0.0
    for shard, out_b, ref_b in blocks:
        out_b, ref_b = np.asarray(out_b, np.float32), np.asarray(ref_b, np.float32)
        scale = max(scale, float(np.abs(ref_b).max()) if ref_b.size else 0.0)
        a, b = out_b.argmax(-1), ref_b.argmax(-1)
        disagree += int((a != b).sum())
        for k in range(n_classes):
            inter[k] += int(((a == k) & (b == k)).sum())
            sizes[k] += int((a == k).sum() + (b == k).sum())
        box = shard.valid_box
        stats.shard(shard, iter([(box, np.abs(out_b - ref_b).max(axis=-1))]))
        row = stats.rows[-1]
        rows[shard.index] = [1.0, *(np.nan if row[k] is None else row[k] for k in _ROW)]
    return np.concatenate(
        [rows.ravel(), stats.p_max, stats.p_sum, stats.p_count.astype(np.float64), [disagree, scale], inter, sizes]
    )


def merge_shards(packed, layout: ShardLayout, n_classes: int) -> Comparison:
    """The :class:`Comparison` of the whole volume from :func:`compare_shards` vectors
    (one per process, stacked; every shard compared by exactly one of them)."""
    packed = np.atleast_2d(np.asarray(packed, np.float64))
    shards = layout.shards()
    n_rows = len(shards) * (1 + len(_ROW))
    stats = _Statistics(layout, tolerance=DEFAULT_TOL, max_distance=None)
    bins = stats.p_max.size
    rows = packed[:, :n_rows].reshape(len(packed), len(shards), 1 + len(_ROW))
    at = n_rows
    stats.p_max = packed[:, at : at + bins].max(axis=0)
    stats.p_sum = packed[:, at + bins : at + 2 * bins].sum(axis=0)
    stats.p_count = packed[:, at + 2 * bins : at + 3 * bins].sum(axis=0).astype(np.int64)
    at += 3 * bins
    disagree, scale = float(packed[:, at].sum()), float(packed[:, at + 1].max())
    at += 2
    inter = packed[:, at : at + n_classes].sum(axis=0)
    sizes = packed[:, at + n_classes : at + 2 * n_classes].sum(axis=0)
    per_shard, total, total_sum = [], 0, 0.0
    for shard in shards:
        row = {"index": shard.index, "coords": list(shard.coords), "box": [list(b) for b in shard.valid_box],
               **dict.fromkeys(_ROW)}  # fmt: skip
        mine = [r for r in rows[:, shard.index] if r[0] == 1.0]
        if mine and not shard.is_empty:
            values = mine[0][1:]
            row.update({k: (int(v) if k == "voxels_over_tolerance" else float(v)) for k, v in zip(_ROW, values)})
            voxels = int(np.prod([hi - lo for lo, hi in shard.valid_box]))
            total += voxels
            total_sum += row["mean_abs_diff"] * voxels
        per_shard.append(row)
    filled = [r for r in per_shard if r["max_abs_diff"] is not None]
    return Comparison(
        max_abs_diff=max((r["max_abs_diff"] for r in filled), default=0.0),
        mean_abs_diff=total_sum / max(total, 1),
        argmax_disagreement=disagree / int(np.prod(layout.volume_shape)),
        dice={k: 1.0 if sizes[k] == 0 else float(2 * inter[k] / sizes[k]) for k in range(n_classes)},
        per_shard=per_shard,
        profile=stats.profile(),
        voxels=total,
        reference_scale=scale,
        extra={"profile_limit": stats.limit},
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
