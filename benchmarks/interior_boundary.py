"""What splitting a convolution into interior + boundary shells costs in compute, per layer and block.

The ``auto`` rule of ``--comm-overlap`` (:func:`workbench.model.interior.split_pays`) splits a
layer when its interior holds at least ``MIN_INTERIOR_FRACTION`` of the block's output
voxels. This script measures, on one CPU device (no messages: the halos are zero padding,
so only the split's own cost shows), the time of the unsplit convolution (one padded
block, one ``VALID`` convolution) and of the split one (interior from the block, up to six
shells from the padded block, joined), for the layer kinds of the layer spec (3×3×3,
(1, 3, 3), stride-2 with its (1, 0) halo) at a few block sizes, every axis split (2x2x2).
Times are CPU seconds of this process (``time.process_time``: steadier than wall time on a
shared machine), median of ``--repeats`` after a warm-up. Nothing passes or fails on time.

    python benchmarks/interior_boundary.py [--blocks 8 16 32 48] [--channels 8 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

KINDS = {
    # name: (kernel, stride, halo per axis)
    "3x3x3": ((3, 3, 3), (1, 1, 1), ((1, 1), (1, 1), (1, 1))),
    "1x3x3": ((1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1))),
    "3x3x3 stride 2": ((3, 3, 3), (2, 2, 2), ((1, 0), (1, 0), (1, 0))),
}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32, 48])
    p.add_argument("--channels", type=int, nargs="+", default=[8, 32])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=None, help="also write the rows as JSON")
    return p.parse_args()


def _cpu_seconds(fn, args, repeats: int) -> float:
    fn(*args).block_until_ready()  # compile and warm up
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn(*args).block_until_ready()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def main() -> int:
    args = _parse()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from workbench.model.halo import halo_pad
    from workbench.model.interior import conv_valid, interior_boundary_conv, split_pays, split_ranges

    mesh = (2, 2, 2)
    print(
        f"# interior/boundary split, one {jax.devices()[0].platform} device, jax {jax.__version__}, "
        f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}"
    )
    print("| layer | channels | block | interior fraction | auto splits | unsplit s | split s | split ÷ unsplit |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for kind, (kernel, stride, halo) in KINDS.items():
        for c in args.channels:
            for n in args.blocks:
                rng = np.random.default_rng(0)
                x = jnp.asarray(rng.standard_normal((1, n, n, n, c)), jnp.float32)
                k = jnp.asarray(rng.standard_normal((*kernel, c, c)) / np.sqrt(27 * c), jnp.float32)

                def unsplit(x, k, kernel=kernel, stride=stride, halo=halo):
                    return conv_valid(halo_pad(x, width=halo, mesh_shape=mesh, mode="zero"), k, stride, ((0, 0),) * 3)

                def split(x, k, stride=stride, halo=halo):
                    return interior_boundary_conv(
                        x, k, stride=stride, halo=halo, mesh_shape=mesh, conv=conv_valid, mode="zero"
                    )

                f_unsplit, f_split = jax.jit(unsplit), jax.jit(split)
                np.testing.assert_allclose(np.asarray(f_split(x, k)), np.asarray(f_unsplit(x, k)), atol=1e-4)
                t_unsplit = _cpu_seconds(f_unsplit, (x, k), args.repeats)
                t_split = _cpu_seconds(f_split, (x, k), args.repeats)
                geometry = dict(block=(n,) * 3, kernel=kernel, stride=stride, halo=halo)
                exchanged = tuple(h != (0, 0) for h in halo)
                ranges = split_ranges(**geometry, exchanged=exchanged)
                inner = 1.0
                for s, r in zip(stride, ranges):
                    inner *= 1.0 if r is None else (r[1] - r[0]) / (n // s)
                pays = split_pays(**geometry, exchanged=exchanged)
                row = {
                    "layer": kind,
                    "channels": c,
                    "block": n,
                    "interior_fraction": inner,
                    "auto_splits": pays,
                    "unsplit_s": t_unsplit,
                    "split_s": t_split,
                    "ratio": t_split / t_unsplit,
                }
                rows.append(row)
                print(
                    f"| {kind} | {c} | {n}³ | {inner:.2f} | {'yes' if pays else 'no'} | {t_unsplit:.4f} | "
                    f"{t_split:.4f} | {row['ratio']:.2f} |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
