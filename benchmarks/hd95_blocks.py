"""HD95 from blocks against the one-process HD95: host memory, time, surface points, equality.

For each ``--sizes`` N: a phantom's labels (organ, lesion) at N³ and a prediction shifted by a
voxel in z and y. The one-process HD95 (:func:`workbench.training.losses.hausdorff95`, two
classes: surfaces and two distance transforms of the whole volume) against the block path
of a multi-process evaluation (:mod:`workbench.execute.surface`, here every block in one
process on 2x2x2 simulated devices): the surfaces found on the devices (one-voxel label
halo), then the host part a process runs (surface rows of its blocks, gathered, exact
distances, percentile). Peak host allocation (``tracemalloc``) of each host part: the
blocks themselves are not counted on either side (each process holds its own blocks anyway).

    python benchmarks/hd95_blocks.py [--sizes 64 128 256] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import _common
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--quick", action="store_true", help="48³ and 64³")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [48, 64]
    _common.start(8)
    rows = [_measure(n, args.mesh) for n in args.sizes]
    mib = 2**20
    print(f"HD95 of two classes, one process (whole masks) and from {args.mesh} blocks; peak host MiB (tracemalloc)")
    print(
        _common.table(
            ["N³", "voxels", "surface rows", "rows/voxel", "whole MiB", "whole s", "blocks MiB", "blocks s",
             "MiB ratio", "equal"],
            [[r["size"], r["voxels"], r["surface_rows"], r["surface_rows"] / r["voxels"], r["whole_peak_bytes"] / mib,
              r["whole_seconds"], r["blocks_peak_bytes"] / mib, r["blocks_seconds"],
              r["whole_peak_bytes"] / r["blocks_peak_bytes"], str(r["equal"])] for r in rows],
            ["d", "d", "d", ".4f", ".1f", ".2f", ".2f", ".2f", ".1f", "s"],
        )
    )  # fmt: skip
    _common.write_json(args.json, {"machine": _common.machine(), "rows": rows})
    return 0


def _measure(n: int, mesh_spec: str) -> dict:
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from scipy import ndimage

    from data_tools.synthetic import make_phantom
    from workbench.execute.distributed import local_blocks, put
    from workbench.execute.surface import block_points, directed_distances, hd95_from_points, surface_fn
    from workbench.mesh import ACTIVATION_SPEC, ShardLayout, build_mesh
    from workbench.training.losses import hausdorff95

    spacing = (400.0 / n,) * 3
    truth = make_phantom(n, seed=1, vessels=False).labels.astype(np.uint8)
    pred = ndimage.shift(truth, (1, -1, 0), order=0)
    hausdorff95(truth[:4, :4, :4] == 1, truth[:4, :4, :4] == 1)  # imports, before the trace
    tracemalloc.start()
    t0 = time.perf_counter()
    whole = [hausdorff95(pred == c, truth == c, spacing) for c in (1, 2)]
    whole_seconds = time.perf_counter() - t0
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    layout, mesh = ShardLayout(truth.shape, mesh_spec), build_mesh(mesh_spec)
    sharding = NamedSharding(mesh, P(*ACTIVATION_SPEC[:4]))
    edges = surface_fn(mesh)
    blocks = []
    for labels in (pred, truth):
        padded = np.zeros((1, *layout.padded_shape), np.uint8)
        padded[0, :n, :n, :n] = labels
        x = put(padded, sharding)
        edge = {tuple((s.start or 0, s.stop) for s in i): b[0] for i, b in local_blocks(edges(x, truth.shape))}
        blocks.append({tuple((s.start or 0, s.stop) for s in i): (b[0], edge[tuple((s.start or 0, s.stop) for s in i)])
                       for i, b in local_blocks(x)})  # fmt: skip
    counts = np.array([[np.sum((pred == c) & (truth == c)), np.sum(pred == c), np.sum(truth == c)] for c in range(3)]).T
    directed_distances(np.zeros((1, 3), np.int32), np.zeros((1, 3), np.int32), spacing)  # imports, before the trace
    tracemalloc.start()
    t0 = time.perf_counter()
    rows = [[block_points(lab, edge, [lo for lo, _ in key[1:4]]) for key, (lab, edge) in b.items()] for b in blocks]
    got = hd95_from_points(np.concatenate(rows[0]), np.concatenate(rows[1]), counts, spacing)
    blocks_seconds = time.perf_counter() - t0
    blocks_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "size": n,
        "voxels": n**3,
        "surface_rows": int(sum(len(r) for part in rows for r in part)),
        "whole_peak_bytes": whole_peak,
        "whole_seconds": whole_seconds,
        "blocks_peak_bytes": blocks_peak,
        "blocks_seconds": blocks_seconds,
        "hd95_mm": [float(v) for v in got[1:]],
        "equal": [float(v) for v in got[1:]] == whole,
    }


if __name__ == "__main__":
    raise SystemExit(main())
