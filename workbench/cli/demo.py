"""``workbench demo``: the main job, on the embedded default data."""

from __future__ import annotations

import argparse
import time

import numpy as np

from workbench.cli.args import add_common, model_choice, positive_int, write_figure

HELP = "the main job: partitioned inference vs the reference on a phantom"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--resolution", type=positive_int, default=64, help="phantom side (default 64)")
    p.add_argument("--mesh", default="2x2x2", help="ZxYxX or data=D,z=Z,y=Y,x=X (default 2x2x2)")
    p.add_argument("--overwrite", action="store_true", help="replace files in an existing --out")
    add_common(p)


def run(args) -> int:
    """``workbench demo``: phantom → explicit and gspmd vs reference → table, report, PNG."""
    from workbench.app import infer, load_volume, staged_output, write_report, write_result_files
    from workbench.mesh import parse_mesh

    spec = parse_mesh(args.mesh)
    n = args.resolution
    with staged_output(args.out, overwrite=args.overwrite) as tmp:
        t0 = time.perf_counter()
        loaded = load_volume(f"phantom:{n}")
        choice = model_choice(args)
        print(
            f"phantom {n}³ in {time.perf_counter() - t0:.1f} s; model '{args.model or 'small'}' "
            f"({choice.model.num_params:,} parameters, {choice.description}); mesh {spec}"
        )
        explicit = infer(choice, loaded, spec, backend="explicit", reference=True)
        gspmd = infer(choice, loaded, spec, backend="gspmd")
        gspmd_diff = float(np.abs(gspmd.logits - explicit.reference.output).max())
        report = explicit.report
        rows = [
            ("reference (1 device)", report["reference_seconds"], 0.0, report["reference_peak_bytes"]),
            ("explicit (ours)", report["seconds"], report["max_abs_diff"], report["peak_bytes_per_device"]),
            ("gspmd (XLA)", gspmd.report["seconds"], gspmd_diff, gspmd.report["peak_bytes_per_device"]),
        ]
        ref_seconds, ref_peak = rows[0][1], rows[0][3]
        print(f"\n{'backend':<22}{'seconds':>9}{'÷ ref':>8}{'max |Δ|':>10}{'MiB/device':>12}{'ideal ÷ used':>14}")
        for name, sec, diff, peak in rows:
            ideal = ref_peak / spec.n_devices if "1 device" not in name else ref_peak
            print(
                f"{name:<22}{sec:>9.2f}{sec / ref_seconds:>8.2f}{diff:>10.2g}{peak / 2**20:>12.1f}{ideal / peak:>14.2f}"
            )
        report = write_result_files(
            tmp, explicit, input_name=f"phantom:{n}", images=True, ground_truth=True, native_format=False
        )
        signed = np.load(tmp / "error.npy")
        view = save_view(
            tmp / "view.png",
            np.asarray(loaded.volume.array, np.float32),
            explicit.labels,
            np.abs(signed),
            signed,
            explicit.layout,
            loaded.spacing,
        )
        report.update(
            view=view,
            gspmd={
                "seconds": gspmd.report["seconds"],
                "max_abs_diff": gspmd_diff,
                "peak_bytes_per_device": gspmd.report["peak_bytes_per_device"],
            },
        )
        write_report(tmp, report)
    print(f"\nwrote {args.out}/report.json, prediction.npy and view.png ({view['kind']})")
    return 0


def save_view(path, image, labels, error, signed, layout, spacing) -> dict:
    """PNG of the napari 3D view (image MIP, |error| MIP, shard wireframes) where a display
    exists, else the matplotlib mid-slice figure; returns what was written, for report.json."""
    from workbench.ui.napari.layers import boundary_layer, error_layers, image_layer
    from workbench.ui.napari.view import display_available, save_view_png

    ok, why = display_available()
    if ok:
        layers = [
            image_layer(image, spacing=spacing),
            error_layers(signed, layout, spacing=spacing)[1],
            boundary_layer(layout, spacing=spacing),
        ]
        try:
            save_view_png(path, layers, ndisplay=3)
            return {"file": path.name, "kind": "napari", "ndisplay": 3}
        except Exception as err:  # a Qt/OpenGL failure: keep the figure and say why in the report
            why = f"napari screenshot failed: {type(err).__name__}: {err}"
            print(f"note: {why}; writing the matplotlib figure instead")
    write_figure(path, image, labels, error, layout)
    return {"file": path.name, "kind": "matplotlib", "reason": why}
