"""HD95 of label maps held block by block: surfaces found per block, distances exact.

The one-process HD95 (:func:`workbench.training.losses.hausdorff95`) needs whole masks:
a mask's surface is ``mask & ~binary_erosion(mask)`` (6-connected, outside the volume
counts as background), every surface voxel of one mask gets its Euclidean distance (mm,
with the voxel spacing) to the nearest surface voxel of the other (a distance transform of
the whole volume), and the result is the 95th percentile (numpy's linear interpolation)
of both directions' distances together. Here no process needs a whole mask:

1. **Surfaces per block** (:func:`surface_fn`): on the devices, each block gets a
   one-voxel halo of labels from its neighbours (:func:`workbench.model.halo.halo_pad`,
   exact mode; the volume's outer faces and the padding of uneven shards count as
   outside), so a voxel on a block face is a surface voxel only when the volume's own
   neighbour across the face says so. A voxel is on the surface of its class when any of
   its 6 neighbours holds another label or lies outside: one boolean map for every class.
2. **Surface points** (:func:`block_points`): each process lists the surface voxels of
   its own blocks as global (class, z, y, x) rows; surfaces are far smaller than volumes.
3. **Exact distances** (:func:`hd95_from_points`): the rows are gathered to every process,
   each process measures the distances of its own points to the other mask's surface
   (a k-d tree finds the nearest candidates; the distance is then computed as
   ``scipy.ndimage.distance_transform_edt`` computes it: the index differences times the
   spacing, squared, summed in axis order, square root), and the distances are gathered
   for the percentile. The order of the distances does not change a percentile.

Empty masks follow :func:`~workbench.training.losses.hausdorff95`: NaN when either mask of
a class is empty, 0 when the two masks are equal. A k-d tree's nearest point and the
distance transform's agree on the distance; where several surface voxels lie at the
same distance the two may pick different ones, whose distances can differ in the last
bit (the tests compare to 1e-12 relative).

Example (one process: every block is local)
-------
>>> edges = surface_fn(mesh)(labels, (19, 21, 17))                       # doctest: +SKIP
>>> hd = hd95_from_points(pred_rows, truth_rows, counts, (1.5, 1, 1))   # doctest: +SKIP
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["surface_fn", "block_points", "directed_distances", "hd95_from_points", "gather_rows"]

NEIGHBOURS = 8  # nearest candidates compared exactly per surface point


@functools.lru_cache(maxsize=8)
def surface_fn(mesh):
    """A jitted function ``(labels, valid_shape) → edges``: labels (N, Z, Y, X) (any integer
    dtype below 2**24, sharded as :data:`~workbench.mesh.ACTIVATION_SPEC`'s first four axes
    over ``mesh``) and ``valid_shape`` (int32 (3,): the volume's (Z, Y, X), a value, so one
    compilation serves every case of a padded shape) → boolean (N, Z, Y, X): the voxels
    inside ``valid_shape`` that lie on the surface of their class (see the module notes).
    Voxels beyond it (the padding of an uneven layout or of a smaller case) count as
    outside the volume and are never on a surface. One function per mesh (cached)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from workbench.mesh import ACTIVATION_SPEC, SPATIAL_AXES
    from workbench.model.halo import global_index, halo_pad

    sizes = tuple(int(mesh.shape[a]) for a in SPATIAL_AXES)

    def block_fn(labels_block, valid):  # u8[n, z/mz, y/my, x/mx], i32[3]
        inside = None
        for dim, (name, size) in enumerate(zip(SPATIAL_AXES, sizes), start=1):
            index = global_index(labels_block.shape[dim], name, size) < valid[dim - 1]
            shape = [1, 1, 1, 1]
            shape[dim] = -1
            index = index.reshape(shape)
            inside = index if inside is None else inside & index
        # label + 1 inside the volume, 0 outside: the halo's zeros at the outer faces are "outside" too
        codes = jnp.where(inside, labels_block.astype(jnp.float32) + 1.0, 0.0)
        grown = halo_pad(codes[..., None], width=1, mesh_shape=sizes, mode="exact")[..., 0]
        centre = grown[:, 1:-1, 1:-1, 1:-1]
        edge = jnp.zeros(centre.shape, bool)
        for dim in (1, 2, 3):
            for start in (0, 2):
                part = [slice(None), slice(1, -1), slice(1, -1), slice(1, -1)]
                part[dim] = slice(start, start + centre.shape[dim])
                edge = edge | (grown[tuple(part)] != centre)
        return edge & (centre > 0)

    spec = P(*ACTIVATION_SPEC[:4])
    mapped = jax.jit(jax.shard_map(block_fn, mesh=mesh, in_specs=(spec, P()), out_specs=spec))
    return lambda labels, valid_shape: mapped(labels, np.asarray(valid_shape, np.int32))


def block_points(labels_block: np.ndarray, edge_block: np.ndarray, origin) -> np.ndarray:
    """(M, 4) int32 rows (class, z, y, x) of the surface voxels of one (Z, Y, X) block whose
    first voxel is at global ``origin``: ``edge_block`` from :func:`surface_fn`; class 0
    (background) is left out."""
    edge = np.asarray(edge_block, bool) & (np.asarray(labels_block) > 0)
    where = np.argwhere(edge).astype(np.int32) + np.asarray(origin, np.int32)
    return np.column_stack([np.asarray(labels_block)[edge].astype(np.int32), where]).astype(np.int32)


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every process's (M_p, C) int32 / uint32 ``rows`` stacked in process order (the counts
    may differ; a 32-bit dtype crosses JAX's host gather unchanged)."""
    from workbench.execute.distributed import allgather

    rows = np.asarray(rows)
    counts = allgather(np.array([rows.shape[0]], np.int32))[:, 0]
    if len(counts) == 1:
        return rows
    padded = np.zeros((int(counts.max()), rows.shape[1]), rows.dtype)
    padded[: rows.shape[0]] = rows
    everyone = allgather(padded)
    return np.concatenate([everyone[p, :n] for p, n in enumerate(counts)])


def directed_distances(points: np.ndarray, targets: np.ndarray, spacing) -> np.ndarray:
    """float64 distance (mm) of each of ``points`` (N, 3 voxel indices) to the nearest of
    ``targets`` (M, 3; M >= 1), computed as the distance transform computes it."""
    from scipy.spatial import cKDTree

    points, targets = np.asarray(points, np.int64), np.asarray(targets, np.int64)
    if not len(points):
        return np.zeros(0)
    sampling = np.asarray(spacing, np.float64)
    k = min(NEIGHBOURS, len(targets))
    _, nearest = cKDTree(targets * sampling).query(points * sampling, k=k)
    nearest = np.asarray(nearest).reshape(len(points), k)
    out = np.full(len(points), np.inf)
    for j in range(k):  # as distance_transform_edt: (feature - index) * sampling, squared, summed z, y, x
        diff = (targets[nearest[:, j]] - points).astype(np.float64) * sampling
        diff *= diff
        np.minimum(out, np.sqrt((diff[:, 0] + diff[:, 1]) + diff[:, 2]), out=out)
    return out


def hd95_from_points(pred_rows, truth_rows, counts, spacing) -> np.ndarray:
    """(K,) HD95 (mm) per class from this process's surface rows (:func:`block_points` of its
    blocks) and ``counts`` (3, K) summed over every block: intersection, predicted and true
    voxels per class. Entry 0 (background) and classes with an empty mask are NaN; equal
    masks give 0. Every process calls it (the rows and distances are gathered) and gets
    the same result."""
    counts = np.asarray(counts)
    k = counts.shape[1]
    pred_rows, truth_rows = np.asarray(pred_rows, np.int32), np.asarray(truth_rows, np.int32)
    all_pred, all_truth = gather_rows(pred_rows), gather_rows(truth_rows)
    mine = []
    for c in range(1, k):
        inter, p, t = (int(v) for v in counts[:, c])
        if not p or not t or inter == p == t:
            continue
        own_p, own_t = pred_rows[pred_rows[:, 0] == c, 1:], truth_rows[truth_rows[:, 0] == c, 1:]
        d = np.concatenate([directed_distances(own_p, all_truth[all_truth[:, 0] == c, 1:], spacing),
                            directed_distances(own_t, all_pred[all_pred[:, 0] == c, 1:], spacing)])  # fmt: skip
        mine.append(np.column_stack([np.full(len(d), c, np.uint32).astype(np.uint64), d.view(np.uint64)]))
    rows = np.concatenate(mine) if mine else np.zeros((0, 2), np.uint64)
    gathered = gather_rows(rows.view(np.uint32).reshape(len(rows), 4)).view(np.uint64).reshape(-1, 2)
    classes, distances = gathered[:, 0], gathered[:, 1].copy().view(np.float64)
    out = np.full(k, np.nan)
    for c in range(1, k):
        inter, p, t = (int(v) for v in counts[:, c])
        if p and t:
            out[c] = 0.0 if inter == p == t else float(np.percentile(distances[classes == c], 95))
    return out
