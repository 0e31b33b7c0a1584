"""Whole-volume training against nnU-Net-style patch training: same network, same budget.

Per task (:mod:`data_tools.synthetic.context`: ``laterality``, ``connection``, ``counting``;
``lesions``: the CT phantoms' small lesions), one dataset folder (``--cases`` cases, every
case resampled to ``--size``³ so both arms see the same volumes; fold 0's validation cases
held out), and one plan of it (``--network plan``, the default): ``workbench plan --data``'s
rules (nnU-Net's fingerprint, target spacing and topology for the whole median volume, a
PlainConvUNet) with ``--features`` per stage instead of nnU-Net's 32–320, so that it trains
on this CPU. Both arms train that network (``workbench train --plans``) with the same
optimiser (Adam, constant learning rate), loss (nnU-Net's Dice + CE, deep supervision) and
number of voxels seen:

* ``whole``: one whole volume per step, partitioned over ``--mesh`` (default 2x2x2, exact
  halos); what its compiled training step needs per device is the **budget** (or ``--budget-gib``);
* ``patch``: ``--batch`` patches per step (nnU-Net's 2) on one device, nnU-Net's sampler with
  one third forced foreground; the patch is the plan's under the budget
  (:func:`workbench.analysis.patch_budget.plan_patch`: nnU-Net's shrinking order, multiples
  of the network's strides, the first patch whose compiled step fits), or ``--patch``; as many
  steps as make the whole arm's voxels; predicted by Gaussian sliding windows at half-patch steps.

``--network small`` trains the paper U-Net ``small`` preset instead, with ``--patch``³ patches,
(size / patch)³ per step, both arms on ``--mesh`` (the earlier run's design: ``--network small
--patch 16 --mesh 1x1x1 --backend reference``; the lesion cases are now resampled to 32³, where
the earlier run had 33×32×32).

Augmentation is off in both arms (its x mirroring would swap the laterality task's sides).
Each run is scored by ``workbench evaluate`` (``evaluate_dataset`` on one device: per-case
Dice, the predictions written), and from the predictions: lesions found per size bin, the
laterality / index confusion rate, and the error rate within 2 voxels of the sliding-window
tile borders against elsewhere (both arms on the same grid). Per arm also the inference
time of one case on one device (median of 3, after a warm-up) and the compiled forward's
memory per device (the whole volume on the mesh, or one window). The JSON records per task the
plan, the budget, the patch search (every patch tried and its compiled bytes) and both arms'
per-device memory; per run the compute (steps, voxels seen, device-seconds) and the training's
wall and CPU seconds. Nothing passes or fails; results are written whichever way they fall,
after every run (``--json``), and the figure at the end (``--figure``).

    nice -n 10 python benchmarks/patch_vs_whole.py --tasks laterality,lesions --size 32 --steps 120 --seeds 3 \\
        --json benchmarks/results/patch_vs_whole_plan_cpu_DATE.json --figure ...png

(stored: ``benchmarks/results/patch_vs_whole_plan_cpu_2026-12-06.json``; the earlier run on the
``small`` preset with a hand-chosen 16³ patch: ``patch_vs_whole{,_context}_cpu_2026-12-06.json``)::

    python benchmarks/patch_vs_whole.py --quick    # 16³, features 4,8,16, 2 steps, 8³ patches, 1 seed
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


def study_plan(data: Path, features, work: Path) -> Path:
    """The plan of the task's dataset folder (``workbench plan --data``'s rules: nnU-Net's
    fingerprint, target spacing and topology for the whole median volume, a PlainConvUNet)
    with ``features`` per stage instead of nnU-Net's 32–320, so that it trains on this CPU;
    written to ``work/<dataset>_plans.json`` (the ``workbench`` block says what changed)."""
    import json

    from workbench.analysis.nnunet_planning import plan_dataset

    plans = plan_dataset(data, dtype="float32", samples=1e5, mesh_search=False)
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    planned = list(arch["features_per_stage"])
    arch["features_per_stage"] = [int(f) for f in features][: arch["n_stages"]]
    if len(arch["features_per_stage"]) != arch["n_stages"]:
        raise SystemExit(f"--features needs {arch['n_stages']} values (the plan has {arch['n_stages']} stages)")
    for key in ("budget_gib", "budget_bytes", "parameters"):
        plans["workbench"].pop(key, None)  # no mesh was searched; the parameters were the planned features'
    plans["workbench"]["study_note"] = (f"features_per_stage {arch['features_per_stage']} replace the planned "
                                        f"{planned} (benchmarks/patch_vs_whole.py: a network this CPU trains)")  # fmt: skip
    path = work / f"{Path(data).name}_plans.json"
    path.write_text(json.dumps(plans, indent=1))
    return path


def plan_arms(plans: Path, args, log=print) -> dict:
    """The budget and both arms' shapes: the whole arm's compiled training step per device on
    ``--mesh`` (batch 1) is the budget unless ``--budget-gib`` gives one; the patch is
    :func:`~workbench.analysis.patch_budget.plan_patch`'s (or ``--patch``), ``--batch``
    patches per step on one device, and the patch arm takes as many steps as make the whole
    arm's voxels."""
    from workbench.analysis.nnunet_memory import spec_memory
    from workbench.analysis.patch_budget import compiled_step_bytes, plan_patch
    from workbench.model.nnunet_plans import load_plans_file

    loaded = load_plans_file(plans)
    spec = loaded.spec
    config = loaded.plans["configurations"]["3d_fullres"]
    volume = (args.size,) * 3
    whole = spec_memory(spec, volume, args.mesh, train=True, dtype="float32", batch=1)
    budget = int(args.budget_gib * 2**30) if args.budget_gib else int(whole["bytes_per_device"])
    if args.patch:
        patch = [args.patch] * 3
        planned = {"patch": patch, "batch": args.batch, "given": True,
                   "bytes_per_device": compiled_step_bytes(spec, patch, batch=args.batch)}  # fmt: skip
    else:
        planned = plan_patch(spec, volume, budget, spacing=config["spacing"], batch=args.batch, log=log)
    patch = tuple(planned["patch"])
    ratio = np.prod(volume) / (args.batch * np.prod(patch))
    if ratio != int(ratio):
        raise SystemExit(f"a {volume} volume is not a whole number of {args.batch} x {patch} patches; choose --batch")
    return {
        "plans": str(plans),
        "network": f"{spec.network_class}, {spec.n_stages} stages, features {[st.features for st in spec.stages]}, "
        f"{spec.num_params:,} parameters",
        "multiple": list(spec.multiple),
        "budget_bytes": budget,
        "budget_from": f"--budget-gib {args.budget_gib}" if args.budget_gib else f"whole arm on {args.mesh}",
        "whole": {"shape": list(volume), "mesh": args.mesh, "batch": 1, "steps": args.steps,
                  "bytes_per_device": int(whole["bytes_per_device"])},
        "patch": {"shape": list(patch), "mesh": "1x1x1", "batch": args.batch, "steps": int(args.steps * ratio),
                  "bytes_per_device": int(planned["bytes_per_device"])},
        "patch_search": planned,
    }  # fmt: skip


def train_config(task, data, arm, seed, args, arms=None):
    from workbench.training.config import TrainConfig

    common = {"data": str(data), "fold": 0, "augment": False, "eval_cases": 0, "seed": seed,
              "learning_rate": args.lr, "resolution": args.size}  # fmt: skip
    if arms is not None:  # the plan's network: whole on --mesh, patches on one device
        plan = arms[arm]
        extra = {"patch": tuple(plan["shape"])} if arm == "patch" else {}
        return TrainConfig(plans=arms["plans"], steps=plan["steps"], mesh=plan["mesh"], backend=args.backend,
                           batch=plan["batch"], checkpoint_every=plan["steps"], **common, **extra)  # fmt: skip
    n_classes = 6 if task == "counting" else 3
    weights = (1.0, 8.0, 16.0) if task == "lesions" else (1.0,) * n_classes  # the workbench's phantom default
    ratio = round((args.size / args.patch) ** 3)
    extra = {"patch": (args.patch,) * 3, "batch": ratio} if arm == "patch" else {"batch": 1}
    return TrainConfig(steps=args.steps, mesh=args.mesh, backend=args.backend, checkpoint_every=args.steps,
                       class_weights=weights, **common, **extra)  # fmt: skip


def score_run(task, data, run_dir, out_dir, args, grid) -> dict:
    """``evaluate_dataset`` of one run, and the study's measures from its predictions."""
    from data_tools.datasets import open_dataset, read_case
    from data_tools.io import read_volume
    from workbench.analysis.patch_study import confusion_rate, grid_error_rates, lesion_detection
    from workbench.app.evaluation import evaluate_dataset

    summary = evaluate_dataset(data, out_dir, checkpoint=run_dir, mesh="1x1x1", backend="reference",
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
        grids.append(grid_error_rates(pred, truth, grid, band=2))
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


def inference_cost(run_dir, data, window, mesh: str) -> dict:
    """Seconds of one held-out case's logits on one device (median of 3 after a warm-up; a
    patch model by sliding windows of ``window``) and the compiled forward's memory per device (the
    whole volume on ``mesh``, or one window on one device)."""
    from workbench.execute.run import compile_forward
    from workbench.mesh import MeshSpec, ShardLayout, parse_mesh
    from workbench.training.checkpoint import load_model
    from workbench.training.datasets import DatasetSource
    from workbench.training.evaluation import model_logits

    model, meta = load_model(run_dir, log=lambda m: None)
    case = next(
        iter(DatasetSource(data, fold=0, progress=False, resolution=meta["train"].get("resolution")).eval_cases(1))
    )

    def once():
        return model_logits(model, case.image, MeshSpec(), "reference", window=window)

    once()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    shape = tuple(window or case.image.shape[:3])
    mesh = "1x1x1" if window else mesh
    if getattr(model, "spec", None) is not None:
        from workbench.analysis.nnunet_memory import spec_memory

        peak = spec_memory(model.spec, shape, mesh, train=False, dtype="float32", batch=1)["bytes_per_device"]
    else:
        layout = ShardLayout(shape, parse_mesh(mesh), multiple=model.config.multiple)
        mem = compile_forward(model.config, layout, backend="reference" if mesh == "1x1x1" else "explicit").compiled
        mem = mem.memory_analysis()
        peak = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
    return {"seconds_per_case": statistics.median(times), "forward_shape": list(shape), "forward_mesh": mesh,
            "forward_bytes": int(peak)}  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    """The study's settings (``--quick``: the laptop-size version notebook 03 runs)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="laterality,lesions", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--size", type=int, default=32, help="volume side (voxels; every case resampled to it)")
    p.add_argument(
        "--network",
        default="plan",
        choices=("plan", "small"),
        help="plan: each task's plan (PlainConvUNet, --features); small: the paper U-Net preset (needs --patch)",
    )
    p.add_argument("--features", default="8,16,32,64", help="with --network plan: features per stage")
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="per-device memory budget (default: what the whole arm's training step needs per device on --mesh)",
    )
    p.add_argument("--batch", type=int, default=2, help="patches per step of the patch arm (nnU-Net: 2)")
    p.add_argument("--patch", type=int, default=None, help="patch side (voxels; default: planned under the budget)")
    p.add_argument("--steps", type=int, default=120, help="whole-arm steps (the patch arm takes as many voxels)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--cases", type=int, default=20, help="cases per task (fold 0 holds a fifth out)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mesh", default="2x2x2", help="the whole arm's mesh (the budget's)")
    p.add_argument("--backend", default="explicit", help="the whole arm's backend on --mesh")
    p.add_argument("--arms", default="whole,patch")
    p.add_argument("--work", default=None, help="folder for datasets and runs (default: a temporary one)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="laptop size: the first task, 16³, features 4,8,16, 2 steps, 8³ patches, one device, 1 seed, 5 cases",
    )
    p.add_argument(
        "--no-inference-cost",
        dest="inference_cost",
        action="store_false",
        help="skip the per-arm inference time and forward memory",
    )
    p.add_argument("--json", default=None)
    p.add_argument("--figure", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.size, args.steps, args.seeds, args.cases = args.tasks.split(",")[0], 16, 2, 1, 5
        args.features, args.mesh, args.patch, args.batch, args.inference_cost = "4,8,16", "1x1x1", 8, 1, False
    if args.network == "small" and not args.patch:
        raise SystemExit("--network small needs --patch (the small preset has no plan)")
    return args


def main(argv=None) -> dict:
    start(8)
    return run_study(parse_args(argv), log=lambda m: print(m, flush=True))


def run_study(args, log=print) -> dict:
    """Write the datasets, plan each task, train and score every arm and seed (see the module notes)."""
    from workbench.analysis.patch_study import plot_study, study_rows, study_table
    from workbench.app import train

    work = Path(args.work or tempfile.mkdtemp(prefix="patch-vs-whole-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k not in ("json", "figure")},
               "network": "paper U-Net, small preset (depth 3, 8 base filters, instance norm)", "tasks": {}}  # fmt: skip
    datasets = {task: write_task(task, work, args.size, args.cases) for task in args.tasks.split(",")}
    arms_of = {}
    for task, data in datasets.items():
        results["tasks"][task] = {"dataset": str(data), "arms": {a: [] for a in args.arms.split(",")}, "inference": {}}
        if args.network == "plan":
            plans = study_plan(data, [int(f) for f in args.features.split(",")], work)
            arms_of[task] = plan_arms(plans, args, log)
            results["tasks"][task]["plan"] = arms_of[task]
            results["network"] = arms_of[task]["network"] + " (each task's plan)"
            log(
                f"{task}: {arms_of[task]['network']}; budget {arms_of[task]['budget_bytes'] / 2**20:.1f} MiB/device "
                f"({arms_of[task]['budget_from']}); patch {arms_of[task]['patch']['shape']} x {args.batch}"
            )
    for seed in range(args.seeds):  # seed by seed: a run cut short still holds every task and arm
        for task, data in datasets.items():
            entry, arms = results["tasks"][task], arms_of.get(task)
            window = tuple(arms["patch"]["shape"]) if arms else (args.patch,) * 3
            for arm in args.arms.split(","):
                run_dir = work / f"{task}_{arm}_{seed}"
                t0, c0 = time.perf_counter(), time.process_time()
                guard = {"memory_check": lambda *a: None} if arms else {}  # the plan compiled both arms' steps
                result = train(train_config(task, data, arm, seed, args, arms), run_dir, progress=False,
                               log=lambda m: None, **guard)  # fmt: skip
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                scored = score_run(task, data, run_dir, work / f"{task}_{arm}_{seed}_eval", args, window)
                entry["arms"][arm].append({"seed": seed, "compute": result["history"]["compute"],
                                           "train_wall_seconds": wall, "train_cpu_seconds": cpu, **scored})  # fmt: skip
                dice = ", ".join(f"{k} {v:.3f}" for k, v in scored["dice"].items() if v is not None)
                log(f"{task} {arm} seed {seed}: {dice}; confusion {scored['confusion']}; {wall:.0f} s "
                      f"({cpu:.0f} CPU s)")  # fmt: skip
                if seed == 0 and args.inference_cost:
                    entry["inference"][arm] = inference_cost(run_dir, data, window if arm == "patch" else None,
                                                             arms["whole"]["mesh"] if arms else "1x1x1")  # fmt: skip
                write_json(args.json, results)
    rows = study_rows(results)
    log(study_table(results))
    results["rows"] = rows
    write_json(args.json, results)
    if args.figure:
        plot_study(results, args.figure)
    return results


if __name__ == "__main__":
    main()
