"""``workbench infer INPUT --mesh ZxYxX --out DIR``: partitioned inference on a volume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from workbench.cli.args import add_common, image_for_model, infer_array, model_from_args, staged_output, summary_line

HELP = "partitioned inference on a volume"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a .npy/.npz/NIfTI/DICOM/TIFF/zarr path, phantom:N or mni")
    p.add_argument("--mesh", required=True, help="ZxYxX, data=D,z=Z,y=Y,x=X or auto")
    p.add_argument("--backend", default="explicit", help="explicit | gspmd | reference")
    p.add_argument("--halo", default="exact",
                   help="exact | zero | reflect | replicate | overlap | WIDTH (default exact)")
    p.add_argument("--reference", action="store_true",
                   help="also run the single-device reference and report the difference")
    p.add_argument("--series", default=None, help="DICOM SeriesInstanceUID when a folder holds several")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace files in an existing --out")
    p.add_argument("--save-logits", action="store_true", help="also write logits.npy")
    add_common(p)


def run(args) -> int:
    """``workbench infer``: read, run, write prediction + report.json."""
    from data_tools.io import load_input, write_prediction

    import jax

    from workbench.execute.devices import device_summary
    from workbench.execute.distributed import is_main
    from workbench.model.halo import validate_halo
    from workbench.mesh import parse_mesh
    from workbench.execute.run import BACKENDS, check_options
    from workbench.model.unet import UNetConfig

    # Every option is checked before anything is read or written.
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend {args.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    halo = validate_halo(args.halo)
    check_options(UNetConfig.preset(args.model), args.backend, halo)
    if args.mesh.strip().lower() != "auto":
        spec = parse_mesh(args.mesh)
        if spec.n_devices > len(jax.devices()):
            parse_mesh(spec, n_devices=len(jax.devices()))  # raises: names the meshes that fit
    volume = load_input(args.input, series=args.series)

    def infer():
        return infer_array(model_from_args(args), image_for_model(volume), args.mesh, backend=args.backend,
                           halo=halo, reference=args.reference)

    if not is_main():  # another process of a multi-process run: compute its shards; process 0 writes
        infer()
        return 0
    with staged_output(args.out, overwrite=args.overwrite) as tmp:
        report, logits, ref_logits = infer()
        labels = logits.argmax(-1).astype(np.uint8)
        written = write_prediction(labels, volume, tmp)
        if args.save_logits:
            np.save(tmp / "logits.npy", logits)
        if ref_logits is not None:  # what `workbench view` / the napari reader show
            from workbench.ui.napari.layers import signed_error

            np.save(tmp / "image.npy", np.asarray(volume.array, np.float32))
            np.save(tmp / "reference_prediction.npy", ref_logits.argmax(-1).astype(np.uint8))
            np.save(tmp / "error.npy", signed_error(logits, ref_logits))
        report.update(input=str(args.input), prediction=Path(written).name,
                      machine=device_summary(), weights=args.weights_description,
                      spacing=list(volume.spacing),
                      class_names=(list(volume.class_names) if volume.class_names
                                   and len(volume.class_names) == report["num_classes"] else None))
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    print(f"wrote {Path(args.out) / Path(written).name} and {Path(args.out) / 'report.json'}")
    return 0
