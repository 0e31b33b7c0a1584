"""Exact partitioned inference vs the sliding-window peer (MONAI / nnU-Net style).

The same random weights of the small U-Net run on one phantom volume: (a) the
single-device reference, (b) exact partitioned inference on a 2x2x2 mesh (explicit
and GSPMD backends), (c) our sliding window (ROI 64³, overlap 0.25, Gaussian
blending, windows on one device), (d) MONAI's own ``sliding_window_inference`` with
the JAX model wrapped as its predictor (when the ``bench`` extra is installed).
Times are the median of ``--repeats`` runs after a warm-up (compiles excluded);
errors are against the reference. Ratios are to MONAI's time (or ours without MONAI).

    python benchmarks/sliding_window.py [--resolution 128] [--roi 64] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse

import _common


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--roi", type=int, default=64)
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--mode", default="gaussian")
    p.add_argument("--batch-windows", type=int, default=1)
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="64³ volume, ROI 32³, one repeat")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.roi, args.repeats = 64, 32, 1
    return args


def main(argv=None) -> int:
    args = _parse(argv)
    _common.start(8)
    import numpy as np

    from data_tools.io import load_input
    from data_tools.preprocess import zscore
    from workbench.analysis.baselines import _window_predictor, monai_sliding_window, sliding_window
    from workbench.analysis.compare import compare
    from workbench.execute.run import run
    from workbench.mesh import ShardLayout
    from workbench.model.unet import Model

    n = args.resolution
    image = zscore(np.asarray(load_input(f"phantom:{n}").array, np.float32)).astype(np.float32)
    model = Model.init("small", seed=0)
    layout = ShardLayout(image.shape, args.mesh, multiple=model.config.multiple)
    ref_t, _, ref = _common.median_seconds(lambda: run(model, image, backend="reference").output, args.repeats)
    rows = {"reference (1 device)": (ref_t, ref, n**3)}
    for backend in ("explicit", "gspmd"):
        t, _, out = _common.median_seconds(
            lambda b=backend: run(model, image, args.mesh, backend=b).output, args.repeats
        )
        rows[f"exact {backend} {args.mesh}"] = (t, out, int(np.prod(layout.padded_shape)))
    roi = (args.roi,) * 3
    predict = _window_predictor(model, roi, args.batch_windows)
    kw = dict(roi=args.roi, overlap=args.overlap, mode=args.mode, batch_windows=args.batch_windows, predictor=predict)
    sw_t, _, sw = _common.median_seconds(lambda: sliding_window(model, image, **kw), args.repeats)
    rows[f"sliding window (ours, {args.mode})"] = (sw_t, sw.output, sw.voxels_computed)
    monai_note = None
    try:
        m_t, _, m = _common.median_seconds(lambda: monai_sliding_window(model, image, **kw), args.repeats)
        rows[f"sliding window (MONAI, {args.mode})"] = (m_t, m.output, m.voxels_computed)
        monai_vs_ours = float(np.abs(m.output - sw.output).max())
    except ModuleNotFoundError as err:
        monai_note, monai_vs_ours = str(err), None
    base_name = next((k for k in rows if "MONAI" in k), f"sliding window (ours, {args.mode})")
    base_t = rows[base_name][0]
    out_rows = []
    for name, (t, out, voxels) in rows.items():
        c = compare(out, ref, layout, keep_error=False)
        out_rows.append(
            {
                "method": name,
                "seconds": t,
                "ratio": t / base_t,
                "voxels_computed": voxels,
                "max_abs_diff": c.max_abs_diff,
                "mean_abs_diff": c.mean_abs_diff,
                "argmax_disagreement": c.argmax_disagreement,
                "dice_vs_reference": float(np.mean(list(c.dice.values()))),
            }
        )
    print(
        f"\n{n}³ phantom, small U-Net (random weights), ROI {args.roi}³, overlap {args.overlap}, "
        f"{sw.windows} windows of batch {args.batch_windows}; median of {args.repeats} after a warm-up; "
        f"ratio = seconds ÷ {base_name}"
    )
    print(
        _common.table(
            ["method", "seconds", "ratio", "voxels run", "max |Δ|", "mean |Δ|", "argmax ≠", "Dice vs ref"],
            [
                [
                    r["method"],
                    r["seconds"],
                    r["ratio"],
                    r["voxels_computed"],
                    r["max_abs_diff"],
                    r["mean_abs_diff"],
                    100 * r["argmax_disagreement"],
                    r["dice_vs_reference"],
                ]
                for r in out_rows
            ],
            ["", ".2f", ".2f", ",d", ".3g", ".3g", ".2f", ".4f"],
        )
    )
    print("argmax ≠ in % of voxels")
    if monai_vs_ours is not None:
        print(f"ours vs MONAI's sliding window: max |Δ| = {monai_vs_ours:.2e}")
    if monai_note:
        print(f"MONAI not run: {monai_note}")
    _common.write_json(
        args.json,
        {
            "benchmark": "sliding_window",
            "machine": _common.machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "windows": sw.windows,
            "rows": out_rows,
            "monai_vs_ours_max_abs_diff": monai_vs_ours,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
