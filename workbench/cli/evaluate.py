"""``workbench evaluate --checkpoint RUN --data DATASET_DIR [--fold K | --test] --mesh ZxYxX --out DIR``.

Also as one of several processes (``workbench launch -- evaluate ...``, ``WORKBENCH_DISTRIBUTED=auto``):
each process scores its own blocks of each case and process 0 writes the folder
(:mod:`workbench.app.evaluation_blocks`).
"""

from __future__ import annotations

import argparse

from workbench.cli.args import add_common
from workbench.options import BACKENDS
from workbench.training.config import parse_spacing, positive_int

HELP = "score a trained model on a dataset's validation fold or test cases (predictions, per-case CSV, summary)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (MSD / nnU-Net: dataset.json, imagesTr/, labelsTr/)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, default=None, help="validation fold 0..4 (default: the one trained with)")
    which.add_argument("--test", action="store_true", help="the test cases (imagesTs/) instead of a fold")
    p.add_argument("--mesh", required=True, help="ZxYxX, z=Z,y=Y,x=X or auto")
    p.add_argument("--backend", default="explicit", help=" | ".join(BACKENDS))
    p.add_argument("--out", required=True, help="output folder: predictions/, cases.csv, summary.json")
    p.add_argument("--overwrite", action="store_true", help="replace files in an existing --out")
    p.add_argument(
        "--spacing", type=parse_spacing, default=None, help="resample to this spacing in mm (default: as trained)"
    )
    p.add_argument("--resolution", type=positive_int, default=None, help="resample to N³ (default: as trained)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common(p)


def run(args) -> int:
    """``workbench evaluate``: check everything, run case by case, write the folder at the end."""
    from workbench.app.evaluation import evaluate_dataset

    summary = evaluate_dataset(
        args.data,
        args.out,
        checkpoint=args.checkpoint,
        model=args.model,
        random_weights=args.random_weights,
        seed=args.seed,
        fold=args.fold,
        test=args.test,
        mesh=args.mesh,
        backend=args.backend,
        spacing=args.spacing,
        resolution=args.resolution,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if summary is None:  # one of several processes: process 0 reports
        return 0
    print(f"{summary['cases']} case(s) of {summary['dataset']} ({summary['split']}), weights: {summary['weights']}")
    for name, dice in summary["mean_dice"].items():
        hd = summary["mean_hd95_mm"].get(name)
        print(
            f"  {name}: mean Dice {'-' if dice is None else f'{dice:.3f}'}, "
            f"mean HD95 {'-' if hd is None else f'{hd:.1f} mm'}"
        )
    for name, dice in (summary.get("mean_region_dice") or {}).items():
        print(f"  region {name}: mean Dice {'-' if dice is None else f'{dice:.3f}'}")
    if summary["worst_cases"]:
        print("worst: " + ", ".join(f"{w['case']} (mean Dice {w['mean_dice']:.3f})" for w in summary["worst_cases"]))
    print(f"wrote {args.out}/cases.csv, summary.json and {summary['cases']} prediction(s) in {args.out}/predictions/")
    return 0
