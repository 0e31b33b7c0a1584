"""``workbench train``: train a U-Net on whole volumes, partitioned over a device mesh."""

from __future__ import annotations

import argparse
import json

from workbench.cli.args import positive_int

HELP = "train on whole volumes at full resolution (checkpoints, resume, history, plot)"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def _weights(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,8,16") from None
    if not all(v >= 0 for v in values) or not any(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: class weights must be >= 0 and not all zero")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", default=["phantom"],
                   help="phantom[:N] (fresh synthetic phantoms rendered at N³), mni[:N], or labelled "
                        "volume paths (default phantom)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="resample every volume to N³ (default: the data's own size; phantom: 64)")
    p.add_argument("--mesh", default="2x2x2", help="ZxYxX or data=D,z=Z,y=Y,x=X (default 2x2x2)")
    p.add_argument("--data-parallel", type=positive_int, default=1, help="size of the data axis (default 1)")
    p.add_argument("--backend", default="explicit", help="explicit | gspmd | reference (default explicit)")
    p.add_argument("--model", default="small", help="model preset: small | paper (default small)")
    p.add_argument("--norm", default=None, help="batch | instance | group | none (default: the preset's)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 compute (default: the preset's)")
    p.add_argument("--remat", action="store_true", help="rematerialise activations per U-Net level")
    p.add_argument("--steps", type=positive_int, default=100, help="training steps (default 100)")
    p.add_argument("--batch", type=positive_int, default=1, help="volumes per step (default 1)")
    p.add_argument("--optimizer", default="adam", help="adam | adafactor | sgd (default adam)")
    p.add_argument("--lr", type=_positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--schedule", default="constant", help="constant | cosine | warmup_cosine (default constant)")
    p.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clip, 0 = off (default 1)")
    p.add_argument("--class-weights", type=_weights, default=None,
                   help="cross-entropy weight per class, e.g. 1,8,16 (default: 1,8,16 for phantoms as the "
                        "paper, else all 1)")
    p.add_argument("--dice-weight", type=float, default=0.2, help="loss = CE + w × Dice loss (default 0.2)")
    p.add_argument("--no-augment", action="store_true", help="turn flips/rotations/intensity/noise off")
    p.add_argument("--checkpoint-dir", required=True, help="run folder: checkpoints/, history.*, curves.png")
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints to keep (default 3)")
    p.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on held-out cases every E steps")
    p.add_argument("--eval-cases", type=int, default=4, help="held-out cases to evaluate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, dropout and augmentation")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu-devices", type=positive_int, default=8,
                   help="simulated CPU devices when no accelerator is present (default 8)")


def run(args) -> int:
    """``workbench train``: validate everything, then train; Ctrl-C / SIGTERM checkpoint and stop."""
    from workbench.mesh import parse_mesh
    from workbench.training.loop import TrainConfig, train_and_evaluate
    from workbench.model.unet import PRESETS

    if args.model not in PRESETS:
        raise ValueError(f"--model {args.model!r} is unknown; use one of {', '.join(sorted(PRESETS))}")
    overrides = {}
    if args.dtype is not None:
        overrides["dtype"] = args.dtype
    if args.norm is not None:
        overrides["norm"] = args.norm
    if args.remat:
        overrides["remat"] = True
    parse_mesh(args.mesh)
    data = args.data[0] if len(args.data) == 1 else tuple(args.data)
    config = TrainConfig(
        data=data, resolution=args.resolution, mesh=args.mesh, data_parallel=args.data_parallel,
        backend=args.backend, model=args.model, model_overrides=overrides, steps=args.steps,
        batch=args.batch, optimizer=args.optimizer, learning_rate=args.lr, schedule=args.schedule,
        clip_norm=args.clip, dice_weight=args.dice_weight, class_weights=args.class_weights, augment=not args.no_augment,
        checkpoint_every=args.checkpoint_every, keep=args.keep, eval_every=args.eval_every,
        eval_cases=args.eval_cases, seed=args.seed,
    )
    result = train_and_evaluate(config, args.checkpoint_dir, resume=args.resume, progress=not args.no_progress)
    if result["interrupted"]:
        return 130 if result["interrupted"] == "SIGINT" else 143
    rows = result["history"]["train"]
    timed = [r["seconds"] for r in rows[1:]] or [r["seconds"] for r in rows]
    print(f"trained {result['step']} steps; median {sorted(timed)[len(timed) // 2]:.2f} s/step "
          f"(first step with compilation {rows[0]['seconds']:.1f} s)" if rows else "nothing to train")
    if result.get("eval"):
        ev = result["eval"]
        print("held-out Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["dice"].items() if v is not None)
              + f"; accuracy {ev['accuracy']:.4f}")
        print(json.dumps({"eval_dice": ev["dice"], "hd95_mm": ev.get("hd95_mm")}))
    print(f"wrote {args.checkpoint_dir}/history.json, history.csv, curves.png, model.msgpack and checkpoints/")
    return 0
