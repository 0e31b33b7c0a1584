"""Resolution study: does training at full resolution find what down-sampling loses?

Trains the same model for the same number of steps on phantoms rendered at ``--render``³,
once per ``--resolutions`` entry (a resolution below the render size trains on
down-sampled copies), then evaluates every model on held-out phantoms at the full
``--render``³ (low-resolution predictions are made on the down-sampled image and their
logits up-sampled linearly). Prints organ and lesion Dice per setting and the per-lesion
detection rate by lesion size (a lesion counts as found when at least one predicted
lesion voxel overlaps it). The study itself is :func:`workbench.analysis.resolution.resolution_study`
(notebook 03 runs it at laptop size); this script is its command line, table and JSON.

The issue's setting is ``--render 128 --resolutions 64 128``; on a 2-core CPU the
scaled-down ``--render 64 --resolutions 32 64`` makes the same comparison 8× cheaper.
Finished runs in ``--workdir`` are reused (``--resume``), so the script can be re-run
for the table alone. Never fails on time; every number is measured in this run.

    python benchmarks/resolution_study.py --render 64 --resolutions 32 64 --steps 160 \
        --backend reference --workdir runs/study --run 64=runs/phantom64   # the shipped model's run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", type=int, default=128, help="phantom side and evaluation resolution")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="training resolutions")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--recipe",
        default="paper",
        choices=["unit", "paper"],
        help="loss recipe (workbench.analysis.resolution.RECIPES): paper = CE 1,8,16 + 0.2 x lesion Dice "
        "(default); unit = CE 1,1,1 + 0.2 x Dice over organ and lesion",
    )
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    p.add_argument("--class-weights", default=None, help="cross-entropy weights (default: the recipe's)")
    p.add_argument("--norm", default=None, help="instance | batch | group (default: the preset's)")
    p.add_argument("--model", default="small")
    p.add_argument(
        "--augment",
        action="store_true",
        help="flips/rotations/intensity/noise (default off, as the shipped phantom model: every step is a new phantom)",
    )
    p.add_argument("--backend", default="explicit", help="explicit | gspmd | reference (same trajectory)")
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--eval-cases", type=int, default=4, help="held-out phantoms (seeds 0..N-1)")
    p.add_argument("--workdir", default="resolution_study")
    p.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="RES=DIR",
        help="use this training folder for resolution RES (e.g. the shipped model's run)",
    )
    p.add_argument("--train-only", action="store_true", help="train the arms, skip the table")
    p.add_argument("--cpu-devices", type=int, default=8)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from workbench.execute.devices import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)
    from workbench.analysis.resolution import RECIPES, lesion_sizes, resolution_study

    recipe = dict(RECIPES[args.recipe])
    if args.lr is not None:
        recipe["learning_rate"] = args.lr
    if args.class_weights is not None:
        recipe["class_weights"] = tuple(float(w) for w in args.class_weights.split(","))
    rows = resolution_study(
        args.resolutions,
        render=args.render,
        steps=args.steps,
        workdir=args.workdir,
        mesh=args.mesh,
        model=args.model,
        model_overrides={"norm": args.norm} if args.norm else None,
        augment=args.augment,
        backend=args.backend,
        **recipe,
        eval_cases=args.eval_cases,
        runs=dict(item.split("=", 1) for item in args.run),
        evaluate=not args.train_only,
    )
    if any(row["interrupted"] for row in rows):
        return 130
    if args.train_only:
        return 0

    workdir = Path(args.workdir)
    sizes = lesion_sizes(args.render)
    table = {
        row["resolution"]: {
            k: row[k]
            for k in (
                "organ_dice",
                "organ_dice_sd",
                "lesion_dice",
                "lesion_dice_sd",
                "large_lesions_found",
                "detection",
                "detection_counts",
                "train_seconds",
                "organ_dice_cases",
                "lesion_dice_cases",
            )
        }
        for row in rows
    }
    mm = 400.0 / args.render
    print(f"\nHeld-out phantoms at {args.render}³ (seeds 0..{args.eval_cases - 1}), {args.steps} training steps each")
    header = f"{'trained at':<11}{'organ Dice (sd)':>16}{'lesion Dice (sd)':>17}{'found ≥4vx':>11}  " + "".join(
        f"{f'{s:g}vx':>7}" for s in sizes
    )
    print(f"{'':<57}lesion detection rate by diameter at {args.render}³ ({mm:g} mm voxels)")
    print(header)
    for res, row in table.items():
        cells = "".join(f"{row['detection'].get(s, float('nan')):>7.2f}" for s in sizes)
        organ = f"{row['organ_dice']:.3f} ({row['organ_dice_sd']:.3f})"
        lesion = f"{row['lesion_dice']:.3f} ({row['lesion_dice_sd']:.3f})"
        print(f"{f'{res}³':<11}{organ:>16}{lesion:>17}{row['large_lesions_found']:>11.2f}  {cells}")
    out = workdir / "resolution_study.json"
    workdir.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "render": args.render,
                "steps": args.steps,
                "recipe": args.recipe,
                "table": {str(k): v for k, v in table.items()},
            },
            indent=1,
        )
        + "\n"
    )
    from workbench.analysis.figures import plot_detection
    from workbench.analysis.resolution import load_study

    figure = out.with_suffix(".png")
    plot_detection(load_study(out), title=f"{args.steps} steps, held-out phantoms at {args.render}³").savefig(
        figure, dpi=120
    )
    print(f"\nwrote {out} and {figure.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
