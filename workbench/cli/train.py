"""``workbench train``: train a U-Net on whole volumes, partitioned over a device mesh.

Runs as one process, or as several (``workbench launch --processes P -- train ...``, or
once per host with ``WORKBENCH_DISTRIBUTED=auto``); then process 0 prints and writes
the history, curves and weights, and every process takes part in the checkpoints.
"""

from __future__ import annotations

import argparse
import json

from workbench.cli.args import positive_int

HELP = "train on whole volumes at full resolution (checkpoints, resume, history, plot)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field (see :func:`workbench.training.config.add_train_flags`),
    then the flags of this command only."""
    from workbench.training.config import add_train_flags

    add_train_flags(p)
    p.add_argument("--checkpoint-dir", required=True, help="run folder: checkpoints/, history.*, curves.png")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true", help="run even if the memory estimate says it will not fit")
    p.add_argument(
        "--cpu-devices",
        type=positive_int,
        default=8,
        help="simulated CPU devices when no accelerator is present (default 8)",
    )


def run(args) -> int:
    """``workbench train``: validate everything, then train; Ctrl-C / SIGTERM checkpoint and stop."""
    from workbench.app import train
    from workbench.execute.distributed import is_main
    from workbench.mesh import parse_mesh
    from workbench.training.config import train_config_from_flags

    config = train_config_from_flags(args)
    parse_mesh(config.mesh)
    result = train(config, args.checkpoint_dir, resume=args.resume, progress=not args.no_progress, force=args.force)
    if result["interrupted"]:
        return 130 if result["interrupted"] == "SIGINT" else 143
    if not is_main():  # another process of a multi-process run: process 0 reports
        return 0
    rows = result["history"]["train"]
    timed = [r["seconds"] for r in rows[1:]] or [r["seconds"] for r in rows]
    print(
        f"trained {result['step']} steps; median {sorted(timed)[len(timed) // 2]:.2f} s/step "
        f"(first step with compilation {rows[0]['seconds']:.1f} s)"
        if rows
        else "nothing to train"
    )
    if result.get("eval"):
        ev = result["eval"]
        print(
            "held-out Dice: "
            + ", ".join(f"{k} {v:.3f}" for k, v in ev["dice"].items() if v is not None)
            + f"; accuracy {ev['accuracy']:.4f}"
        )
        if ev.get("region_dice"):
            print(
                "held-out region Dice: "
                + ", ".join(f"{k} {v:.3f}" for k, v in ev["region_dice"].items() if v is not None)
            )
        print(
            json.dumps(
                {
                    "eval_dice": ev["dice"],
                    "hd95_mm": ev.get("hd95_mm"),
                    **({"region_dice": ev["region_dice"]} if ev.get("region_dice") else {}),
                }
            )
        )
    print(f"wrote {args.checkpoint_dir}/history.json, history.csv, curves.png, model.msgpack and checkpoints/")
    return 0
