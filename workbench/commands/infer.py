"""``workbench infer INPUT --mesh ZxYxX --out DIR``: partitioned inference on a volume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ._common import add_common, image_for_model, infer_array, model_from_args, staged_output, summary_line

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

    from ..devices import device_summary
    from ..halo import validate_halo
    from ..mesh import parse_mesh
    from ..run import BACKENDS

    if args.backend not in BACKENDS:
        raise ValueError(f"--backend {args.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    halo = validate_halo(args.halo)
    if args.mesh.strip().lower() != "auto":
        parse_mesh(args.mesh)  # fail on a malformed mesh before reading anything
    volume = load_input(args.input, series=args.series)
    with staged_output(args.out, overwrite=args.overwrite) as tmp:
        model = model_from_args(args)
        image = image_for_model(volume)
        report, logits, _ = infer_array(model, image, args.mesh, backend=args.backend, halo=halo,
                                        reference=args.reference)
        labels = logits.argmax(-1).astype(np.uint8)
        written = write_prediction(labels, volume, tmp)
        if args.save_logits:
            np.save(tmp / "logits.npy", logits)
        report.update(input=str(args.input), prediction=Path(written).name,
                      machine=device_summary(), weights=f"random (seed {args.seed})")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    print(f"wrote {Path(args.out) / Path(written).name} and {Path(args.out) / 'report.json'}")
    return 0
