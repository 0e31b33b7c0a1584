"""Whole-volume training against nnU-Net-style patch training: same network, same budget.

Per task (:mod:`data_tools.synthetic.context`: ``laterality``, ``connection``, ``counting``;
``lesions``: the CT phantoms' small lesions), one dataset folder (``--cases`` cases of
``--size``³, fold 0's validation cases held out) and, per arm and seed, one training run of
the same network (the paper U-Net ``small`` preset) with the same optimiser (Adam, constant
learning rate), loss and steps:

* ``whole``: one whole volume per step (``workbench train``);
* ``patch``: ``--patch``³ patches, nnU-Net's sampler with one third forced foreground
  (``workbench train --patch``), as many per step as make the same voxels per step
  ((size / patch)³), predicted by Gaussian sliding windows at half-patch steps.

Augmentation is off in both arms (its x mirroring would swap the laterality task's sides).
Each run is scored by ``workbench evaluate`` (``evaluate_dataset``: per-case Dice, the
predictions written), and from the predictions: lesions found per size bin, the
laterality / index confusion rate, and the error rate within 2 voxels of the sliding-window
tile borders against elsewhere (both arms on the same grid). Per arm also the inference
time of one case (median of 3, after a warm-up) and the compiled forward's memory (whole
volume, or one window). Compute per run (steps, voxels seen, device-seconds) comes from the
training history. Nothing passes or fails; results are written whichever way they fall,
after every run (``--json``), and the figure at the end (``--figure``).

    nice -n 10 python benchmarks/patch_vs_whole.py --tasks laterality,lesions --size 32 --patch 16 \\
        --steps 120 --seeds 3 --json benchmarks/results/patch_vs_whole_cpu_DATE.json --figure ...png
    nice -n 10 python benchmarks/patch_vs_whole.py --tasks connection,counting ...   # the other two tasks

(the stored results: ``benchmarks/results/patch_vs_whole_cpu_2026-12-06.json`` and
``patch_vs_whole_context_cpu_2026-12-06.json``, two shared CPU cores, about 2–4 minutes a run)::

    python benchmarks/patch_vs_whole.py --quick       # 32³, 16³ patches, 6 steps, 1 seed: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, start, write_json

TASKS = ("laterality", "lesions", "connection", "counting")
GROUPS = {"laterality": (1, 2), "counting": (1, 2, 3, 4, 5), "connection": (1, 2)}


def write_task(task: str, root: Path, size: int, cases: int) -> Path:
    from data_tools.synthetic.dataset import write_phantom_dataset

    number = TASKS.index(task) + 1
    kind = "ct" if task == "lesions" else task
    return write_phantom_dataset(root / f"Task{number:02d}_{task}", cases=cases, test=0, shapes=size, task=kind)


def train_config(task, data, arm, seed, args):
    from workbench.training.config import TrainConfig

    n_classes = 6 if task == "counting" else 3
    weights = (1.0, 8.0, 16.0) if task == "lesions" else (1.0,) * n_classes  # the workbench's phantom default
    ratio = round((args.size / args.patch) ** 3)
    extra = {"patch": (args.patch,) * 3, "batch": ratio} if arm == "patch" else {"batch": 1}
    return TrainConfig(data=str(data), fold=0, steps=args.steps, mesh=args.mesh, backend=args.backend, augment=False,
                       eval_cases=0, checkpoint_every=args.steps, seed=seed, learning_rate=args.lr,
                       class_weights=weights, **extra)  # fmt: skip


def score_run(task, data, run_dir, out_dir, args) -> dict:
    """``evaluate_dataset`` of one run, and the study's measures from its predictions."""
    from data_tools.datasets import open_dataset, read_case
    from data_tools.io import read_volume
    from workbench.analysis.patch_study import confusion_rate, grid_error_rates, lesion_detection
    from workbench.app.evaluation import evaluate_dataset

    summary = evaluate_dataset(data, out_dir, checkpoint=run_dir, mesh=args.mesh, backend=args.backend,
                               progress=False, log=lambda m: None)  # fmt: skip
    dataset = open_dataset(data)
    files = {c.name: c for c in dataset.training}
    names = list(summary["class_names"][1:])
    per_case = {n: [r.get(f"dice_{n}") for r in summary["rows"]] for n in names}
    lesions = None
    confusion, grids = [], []
    for row in summary["rows"]:
        pred = np.asarray(read_volume(out_dir / row["prediction"]).array)
        truth = np.asarray(read_case(dataset, files[row["case"]], check=False).labels)
        if task == "lesions":
            found = lesion_detection(pred, truth, 2)
            if lesions is None:
                lesions = {"bins": found["bins"], "total": [0] * len(found["bins"]), "found": [0] * len(found["bins"])}
            lesions["total"] = [a + b for a, b in zip(lesions["total"], found["total"])]
            lesions["found"] = [a + b for a, b in zip(lesions["found"], found["found"])]
        if task in GROUPS:
            confusion.append(confusion_rate(pred, truth, GROUPS[task]))
        grids.append(grid_error_rates(pred, truth, (args.patch,) * 3, band=2))
    confusion = [c for c in confusion if c is not None]
    return {
        "cases": [r["case"] for r in summary["rows"]],
        "dice": {n: _mean(v) for n, v in per_case.items()},
        "dice_per_case": per_case,
        "dice_case_sd": {n: float(np.std([x for x in v if x is not None])) for n, v in per_case.items()},
        "confusion": float(np.mean(confusion)) if confusion else None,
        "lesions": lesions,
        "grid": {
            "band": 2,
            "error_rate_near": float(np.mean([g["error_rate_near"] for g in grids])),
            "error_rate_elsewhere": float(np.mean([g["error_rate_elsewhere"] for g in grids])),
            "volume_fraction_near": grids[0]["volume_fraction_near"],
        },
        "prediction": summary["prediction"],
    }


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def inference_cost(run_dir, data, arm, args) -> dict:
    """Seconds of one held-out case's logits (median of 3 after a warm-up) and the compiled
    forward's memory on one device (the whole volume, or one window)."""
    from workbench.execute.run import compile_forward
    from workbench.mesh import MeshSpec, ShardLayout
    from workbench.training.checkpoint import load_model
    from workbench.training.datasets import DatasetSource
    from workbench.training.evaluation import model_logits

    model, meta = load_model(run_dir, log=lambda m: None)
    case = next(iter(DatasetSource(data, fold=0, progress=False).eval_cases(1)))
    window = (args.patch,) * 3 if arm == "patch" else None
    spatial = MeshSpec()

    def once():
        return model_logits(model, case.image, spatial, "reference", window=window)

    once()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    shape = window or case.image.shape[:3]
    compiled = compile_forward(model.config, ShardLayout(shape, spatial, multiple=model.config.multiple),
                               backend="reference").compiled  # fmt: skip
    mem = compiled.memory_analysis()
    peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    return {"seconds_per_case": statistics.median(times), "forward_shape": list(shape), "forward_bytes": peak}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="laterality,lesions", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--size", type=int, default=32, help="volume side (voxels)")
    p.add_argument("--patch", type=int, default=16, help="patch side (voxels)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cases", type=int, default=20, help="cases per task (fold 0 holds a fifth out)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mesh", default="1x1x1")
    p.add_argument("--backend", default="reference")
    p.add_argument("--arms", default="whole,patch")
    p.add_argument("--work", default=None, help="folder for datasets and runs (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="32³, 16³ patches, 6 steps, 1 seed, 10 cases")
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.patch, args.steps, args.seeds, args.cases = 32, 16, 6, 1, 10
    start(8)
    from workbench.analysis.patch_study import plot_study, study_rows, study_table
    from workbench.app import train

    work = Path(args.work or tempfile.mkdtemp(prefix="patch-vs-whole-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k not in ("json", "figure")},
               "network": "paper U-Net, small preset (depth 3, 8 base filters, instance norm)", "tasks": {}}  # fmt: skip
    datasets = {task: write_task(task, work, args.size, args.cases) for task in args.tasks.split(",")}
    for task, data in datasets.items():
        results["tasks"][task] = {"dataset": str(data), "arms": {a: [] for a in args.arms.split(",")}, "inference": {}}
    for seed in range(args.seeds):  # seed by seed: a run cut short still holds every task and arm
        for task, data in datasets.items():
            entry = results["tasks"][task]
            for arm in args.arms.split(","):
                run_dir = work / f"{task}_{arm}_{seed}"
                t0 = time.perf_counter()
                result = train(train_config(task, data, arm, seed, args), run_dir, progress=False, log=lambda m: None)
                wall = time.perf_counter() - t0
                scored = score_run(task, data, run_dir, work / f"{task}_{arm}_{seed}_eval", args)
                entry["arms"][arm].append({"seed": seed, "compute": result["history"]["compute"],
                                           "train_wall_seconds": wall, **scored})  # fmt: skip
                dice = ", ".join(f"{k} {v:.3f}" for k, v in scored["dice"].items() if v is not None)
                print(f"{task} {arm} seed {seed}: {dice}; confusion {scored['confusion']}; {wall:.0f} s", flush=True)
                if seed == 0:
                    entry["inference"][arm] = inference_cost(run_dir, data, arm, args)
                write_json(args.json, results)
    rows = study_rows(results)
    print(study_table(results))
    results["rows"] = rows
    write_json(args.json, results)
    if args.figure:
        plot_study(results, args.figure)
    return results


if __name__ == "__main__":
    main()
