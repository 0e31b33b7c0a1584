"""``workbench view DIR``: open a result folder in napari (or save a screenshot of it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from workbench.errors import UserError

HELP = "open a result folder (infer --reference / demo) in napari"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a folder written by `workbench infer ... --out DIR` or `workbench demo`")
    p.add_argument(
        "--screenshot",
        metavar="PNG",
        default=None,
        help="save a PNG of the view and exit instead of opening the window",
    )
    p.add_argument(
        "--ndisplay",
        type=int,
        choices=(2, 3),
        default=None,
        help="2 (slices) or 3 (volume); default 2 in the window, 3 for --screenshot",
    )


def run(args) -> int:
    """Check the folder first (bad files: exit 2, one line), then open napari."""
    from workbench.app import load_result
    from workbench.ui.napari.layers import result_layers
    from workbench.ui.napari.view import add_layers, display_available, save_view_png, show_view

    result = load_result(args.dir)
    if args.screenshot is not None and Path(args.screenshot).suffix.lower() != ".png":
        raise UserError(f"--screenshot {args.screenshot} must end in .png")
    ok, why = display_available()
    if not ok:
        raise UserError(f"cannot open napari: {why}")
    layers = result_layers(result)
    print(
        f"{result.path}: {result.layout}, halo {result.report['halo']}, "
        f"max |Δ| vs reference {result.report.get('max_abs_diff')}"
    )
    if args.screenshot is not None:
        ndisplay = args.ndisplay or 3
        for _, kwargs, kind in layers:  # label volumes would hide the rest; they stay in the list
            if kind == "labels" and (ndisplay == 3 or "prediction" in kwargs["name"]):
                kwargs["visible"] = False
        save_view_png(args.screenshot, layers, ndisplay=ndisplay)
        print(f"wrote {args.screenshot}")
        return 0
    import napari

    viewer = napari.Viewer(title=f"workbench view {result.path}")
    add_layers(viewer, layers)
    show_view(viewer, ndisplay=args.ndisplay or 2)
    napari.run()
    return 0
