"""Which training recipe finds the phantoms' lesions? A sweep, evaluated on held-out phantoms.

Each recipe (a set of :class:`workbench.training.TrainConfig` fields) trains the ``small``
U-Net on fresh phantoms at ``--render``³ and is evaluated on held-out phantoms
(``--eval-seed``.. ``--eval-seed + --eval-cases - 1``, never trained on) with
:func:`workbench.analysis.resolution.evaluate_at_render`: organ and lesion Dice (mean
and spread over cases), the detection rate by lesion diameter and the share of lesions
of diameter ≥ 4 voxels found. Every number is measured in this run; the table and one
JSON file (``WORKDIR/lesion_recipe.json``) keep the evidence. Finished runs in
``--workdir`` are reused.

    python benchmarks/lesion_recipe.py --recipes unit paper paper_lr1e-2 --steps 400
    python benchmarks/lesion_recipe.py --parallel 6 ...   # one process per recipe (a GPU)

Runs on the single-device reference backend (``--mesh 1x1x1``): it follows the same
trajectory as a partitioned run (tests/test_train.py), and on a 2-core CPU simulated
devices only add overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> TrainConfig fields (model fields under "model_overrides").
PAPER = dict(class_weights=(1.0, 8.0, 16.0), dice_classes=(2,), learning_rate=3e-3)
RECIPES: dict[str, dict] = {
    "unit": dict(class_weights=(1.0, 1.0, 1.0), dice_classes=None, learning_rate=1e-2),
    "paper": PAPER,
    "paper_lr1e-2": {**PAPER, "learning_rate": 1e-2},
    "paper_lr1e-3": {**PAPER, "learning_rate": 1e-3},
    "paper_alldice": {**PAPER, "dice_classes": None},
    "paper_dice1": {**PAPER, "dice_weight": 1.0},
    "paper_batchnorm": {**PAPER, "model_overrides": {"norm": "batch"}},
    "paper_wide": {**PAPER, "model_overrides": {"base_filters": 16}},
    "paper_deep": {**PAPER, "model_overrides": {"depth": 4}},
    "w148": {**PAPER, "class_weights": (1.0, 4.0, 8.0)},
    "unit_lesiondice": dict(class_weights=(1.0, 1.0, 1.0), dice_classes=(2,), learning_rate=3e-3, dice_weight=1.0),
}


def config_for(name: str, args):
    from workbench.training import TrainConfig

    fields = dict(
        data=f"phantom:{args.render}",
        resolution=args.render,
        mesh=args.mesh,
        backend=args.backend,
        steps=args.steps,
        schedule="cosine",
        augment=False,
        checkpoint_every=max(args.steps // 4, 1),
        eval_every=args.eval_every,
        eval_cases=4 if args.eval_every else 0,
        seed=args.seed,
    )
    return TrainConfig(**{**fields, **RECIPES[name]})


def run_one(name: str, args) -> dict:
    from workbench.analysis.resolution import evaluate_at_render
    from workbench.training import train_and_evaluate

    tc = config_for(name, args)
    t0 = time.perf_counter()
    run = train_and_evaluate(tc, Path(args.workdir) / name, resume=True, progress=not args.quiet)
    rows = run["history"]["train"]
    train_s = sum(r["seconds"] for r in rows)
    ev = evaluate_at_render(
        run["model"],
        args.render,
        render=args.render,
        eval_cases=args.eval_cases,
        mesh="1x1x1",
        first_seed=args.eval_seed,
    )
    result = {
        "recipe": name,
        "fields": {k: (list(v) if isinstance(v, tuple) else v) for k, v in RECIPES[name].items()},
        "steps": tc.steps,
        "train_seconds": train_s,
        "seconds_per_step": sorted(r["seconds"] for r in rows)[len(rows) // 2] if rows else None,
        "wall_seconds": time.perf_counter() - t0,
        "final_loss": rows[-1]["loss"] if rows else None,
        **ev,
    }
    out = Path(args.workdir) / name / "recipe_eval.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["unit", "paper"], choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--render", type=int, default=64)
    p.add_argument("--eval-cases", type=int, default=8)
    p.add_argument("--eval-seed", type=int, default=0, help="first held-out phantom seed (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights")
    p.add_argument("--eval-every", type=int, default=0, help="also evaluate 4 held-out phantoms every N steps")
    p.add_argument("--mesh", default="1x1x1")
    p.add_argument("--backend", default="reference")
    p.add_argument("--workdir", default="runs/lesion_recipe")
    p.add_argument("--parallel", type=int, default=1, help="recipes trained at once, one process each")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--only", help=argparse.SUPPRESS)  # worker: one recipe, result JSON on stdout's last line
    return p.parse_args(argv)


def table(results: list[dict], render: int) -> str:
    sizes = sorted({float(s) for r in results for s in r["detection"]})
    head = (
        f"{'recipe':<18}{'steps':>6}{'s/step':>8}{'organ Dice (sd)':>17}{'lesion Dice (sd)':>18}{'found ≥4vx':>11}  "
        + "".join(f"{f'{s:g}vx':>7}" for s in sizes)
    )
    lines = [f"held-out phantoms at {render}³; detection rate by lesion diameter (voxels)", head]
    for r in results:
        det = {float(k): v for k, v in r["detection"].items()}
        cells = "".join(f"{det.get(s, float('nan')):>7.2f}" for s in sizes)
        organ = f"{r['organ_dice']:.3f} ({r['organ_dice_sd']:.3f})"
        lesion = f"{r['lesion_dice']:.3f} ({r['lesion_dice_sd']:.3f})"
        sps = r["seconds_per_step"] or float("nan")
        lines.append(
            f"{r['recipe']:<18}{r['steps']:>6}{sps:>8.3f}{organ:>17}{lesion:>18}{r['large_lesions_found']:>11.2f}  {cells}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return 0
    results = []
    if args.parallel > 1:
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        pending = list(args.recipes)
        running: dict[str, subprocess.Popen] = {}
        while pending or running:
            while pending and len(running) < args.parallel:
                name = pending.pop(0)
                log = open(Path(args.workdir) / f"{name}.log", "w")
                running[name] = subprocess.Popen(
                    [sys.executable, __file__, *base, "--only", name, "--quiet"],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    cwd=ROOT,
                )
            time.sleep(2)
            for name, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                out = proc.stdout.read().strip().splitlines()
                del running[name]
                if proc.returncode == 0 and out:
                    results.append(json.loads(out[-1]))
                    print(f"{name}: done", flush=True)
                else:
                    print(f"{name}: failed (exit {proc.returncode}; see {args.workdir}/{name}.log)", flush=True)
        order = {n: i for i, n in enumerate(args.recipes)}
        results.sort(key=lambda r: order[r["recipe"]])
    else:
        for name in args.recipes:
            results.append(run_one(name, args))
    from workbench.execute.devices import device_summary

    text = table(results, args.render)
    print("\n" + text)
    out = Path(args.workdir) / "lesion_recipe.json"
    out.write_text(json.dumps({"device": device_summary(), "results": results}, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
