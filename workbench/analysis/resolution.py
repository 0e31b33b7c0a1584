"""Resolution study: does training at full resolution find what down-sampling loses?

The same model is trained for the same number of steps on phantoms rendered at
``render``³, once per training resolution (a resolution below ``render`` trains on
down-sampled copies); every arm is then evaluated on held-out phantoms at the full
``render``³ (low-resolution predictions are made on the down-sampled image and their
logits up-sampled linearly): organ and lesion Dice, and the per-lesion detection rate by
lesion size (a lesion counts as found when at least one predicted lesion voxel overlaps it).

``benchmarks/resolution_study.py`` (the full study, its CLI and table) and notebook 03
(a laptop-sized run) both call :func:`resolution_study`.

Example
-------
>>> rows = resolution_study([16, 32], render=32, steps=2, workdir="/tmp/study",
...                         model_overrides={"depth": 2}, eval_cases=1)   # doctest: +SKIP
>>> [(r["resolution"], r["evaluated_at"]) for r in rows]                    # doctest: +SKIP
[(16, 32), (32, 32)]
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = [
    "RECIPES",
    "study_config",
    "predict_full",
    "lesion_hits",
    "lesion_sizes",
    "evaluate_at_render",
    "study_row",
    "resolution_study",
    "load_study",
]

NUM_CLASSES = 3  # phantom labels: background, organ, lesion
LESION = 2
LARGE_LESION = 4.0  # diameter (voxels at full resolution) from which detection is a target

# Training recipes (TrainConfig fields) the study and benchmarks/lesion_recipe.py compare.
# "unit": the recipe of the first shipped phantom model (it found no lesions); "paper": the
# loss of Hou et al.'s Mesh-TensorFlow code (cross-entropy weighted 1/8/16 for background/
# organ/lesion + 0.2 × a Dice loss on the lesion class alone).
RECIPES: dict[str, dict] = {
    "unit": dict(class_weights=(1.0, 1.0, 1.0), dice_classes=None, learning_rate=1e-2),
    "paper": dict(class_weights=(1.0, 8.0, 16.0), dice_classes=(LESION,), learning_rate=3e-3),
}


def study_config(
    resolution: int,
    *,
    render: int,
    steps: int,
    mesh: str = "2x2x2",
    model: str = "small",
    model_overrides: dict | None = None,
    learning_rate: float = 3e-3,
    class_weights=(1.0, 8.0, 16.0),
    dice_classes=(LESION,),
    augment: bool = False,
    backend: str = "explicit",
    train_eval_cases: int = 4,
    checkpoint_every: int = 10,
):
    """The training run of one arm: phantoms rendered at ``render``³, trained at ``resolution``³.

    The study's recipe by default: the paper's loss (:data:`RECIPES` ``"paper"``: CE 1/8/16 +
    0.2 × lesion Dice, learning rate 3e-3), cosine schedule and no augmentation (as the
    shipped phantom model: every step is a new phantom); the full-resolution arm also
    evaluates every 50 steps on ``train_eval_cases`` held-out phantoms.
    """
    from workbench.training import TrainConfig

    return TrainConfig(
        data=f"phantom:{render}",
        resolution=resolution,
        mesh=mesh,
        model=model,
        model_overrides=dict(model_overrides or {}),
        steps=steps,
        learning_rate=learning_rate,
        schedule="cosine",
        checkpoint_every=checkpoint_every,
        backend=backend,
        augment=augment,
        class_weights=tuple(float(w) for w in class_weights),
        dice_classes=None if dice_classes is None else tuple(int(c) for c in dice_classes),
        eval_every=50 if resolution == render else 0,
        eval_cases=train_eval_cases,
    )


def predict_full(model, image_full: np.ndarray, resolution: int, mesh) -> np.ndarray:
    """Labels at full resolution from a model run at ``resolution``³ (logits up-sampled)."""
    from data_tools.preprocess import resample_array
    from workbench.execute.run import apply
    from workbench.training.data import ct_input

    image = image_full
    if image.shape[0] != resolution:
        image = resample_array(image_full, (resolution,) * 3, order=1)
    logits = apply(model, ct_input(image), mesh)  # phantoms are CT: as workbench.training.data.model_input
    if logits.shape[0] != image_full.shape[0]:
        logits = np.stack(
            [resample_array(logits[..., k], image_full.shape, order=1) for k in range(logits.shape[-1])], axis=-1
        )
    return logits.argmax(-1).astype(np.uint8)


def lesion_hits(pred: np.ndarray, truth: np.ndarray, lesions: list[dict]) -> list[tuple[float, bool]]:
    """(diameter in voxels, found) per lesion: the lesion's voxels are the true lesion
    voxels within its radius + 1 of its centre."""
    zz, yy, xx = np.indices(truth.shape, sparse=True)
    out = []
    for les in lesions:
        c, r = les["centre_voxel"], max(les["radius_voxels"]) + 1.0
        ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
        region = ball & (truth == LESION)
        if not region.any():  # too small to be rasterised at this resolution
            continue
        out.append((float(les["diameter_voxels"]), bool((pred[region] == LESION).any())))
    return out


def lesion_sizes(render: int) -> list[float]:
    """The lesion diameters (voxels, 2 decimals) of the phantoms at ``render``³: the
    detection table's columns."""
    from data_tools.synthetic import make_phantom

    return sorted({round(les["diameter_voxels"], 2) for les in make_phantom(render, seed=0).metadata["lesions"]})


def evaluate_at_render(model, resolution: int, *, render: int, eval_cases: int, mesh, first_seed: int = 0) -> dict:
    """Organ and lesion Dice (mean and standard deviation over held-out phantoms, seeds
    ``first_seed..first_seed+eval_cases-1``, rendered at ``render``³ without vessels), the
    detection rate by lesion diameter, and the share of lesions of diameter ≥ 4 voxels found,
    of ``model`` run at ``resolution``³."""
    from data_tools.synthetic import make_phantom
    from workbench.mesh import parse_mesh
    from workbench.training.losses import dice_per_class

    spec = parse_mesh(mesh)
    organ, lesion, hits = [], [], {}
    for seed in range(first_seed, first_seed + eval_cases):
        vol = make_phantom(render, seed=seed, vessels=False)
        pred = predict_full(model, np.asarray(vol.array, np.float32), resolution, spec)
        d = dice_per_class(pred, vol.labels, NUM_CLASSES)
        organ.append(d[1])
        lesion.append(d[LESION])
        for size, found in lesion_hits(pred, vol.labels, vol.metadata["lesions"]):
            hits.setdefault(round(size, 2), []).append(found)
    large = [f for s, v in hits.items() if s >= LARGE_LESION for f in v]
    return {
        "organ_dice": float(np.nanmean(organ)),
        "lesion_dice": float(np.nanmean(lesion)),
        "organ_dice_sd": float(np.nanstd(organ)),
        "lesion_dice_sd": float(np.nanstd(lesion)),
        "organ_dice_cases": [float(v) for v in organ],
        "lesion_dice_cases": [float(v) for v in lesion],
        "detection": {s: float(np.mean(v)) for s, v in sorted(hits.items())},
        "detection_counts": {s: [int(sum(v)), len(v)] for s, v in sorted(hits.items())},
        "large_lesions_found": float(np.mean(large)) if large else float("nan"),
        "seeds": [first_seed, first_seed + eval_cases - 1],
    }


def study_row(resolution: int, run: dict, evaluation: dict | None = None, *, render: int | None = None) -> dict:
    """One arm of the study: its training run (``train`` result) and, when evaluated, the
    full-resolution scores of :func:`evaluate_at_render` (at ``render``³)."""
    rows = run["history"]["train"]
    last = rows[-1] if rows else {}
    row = {
        "resolution": resolution,
        "steps": run["step"],
        "final_loss": last.get("loss"),
        "seconds_per_step": last.get("seconds"),
        "train_seconds": sum(r["seconds"] for r in rows),
        "interrupted": run.get("interrupted"),
    }
    if evaluation is not None:
        row = {**row, "evaluated_at": render, **evaluation}
    return row


def resolution_study(
    resolutions,
    *,
    render: int | None = None,
    steps: int,
    workdir,
    mesh: str = "2x2x2",
    model: str = "small",
    model_overrides: dict | None = None,
    learning_rate: float = 3e-3,
    class_weights=(1.0, 8.0, 16.0),
    dice_classes=(LESION,),
    augment: bool = False,
    backend: str = "explicit",
    eval_cases: int = 4,
    train_eval_cases: int = 4,
    checkpoint_every: int = 10,
    runs: dict | None = None,
    evaluate: bool = True,
    resume: bool = True,
    progress: bool = True,
    log=print,
) -> list[dict]:
    """Train one arm per entry of ``resolutions`` (same steps, same recipe: :func:`study_config`)
    and evaluate each at the full ``render``³ (default: the largest resolution).

    Arms train into ``workdir/train<res>`` (or ``runs[res]``, e.g. the shipped model's run)
    and finished runs are reused (``resume``). One row per arm (:func:`study_row`), in the
    order given. ``evaluate=False`` only trains; an interrupted arm (SIGINT/SIGTERM) ends
    the study before evaluating, its row has ``interrupted`` set.
    """
    from workbench.training import train_and_evaluate

    resolutions = [int(r) for r in resolutions]
    render = int(render or max(resolutions))
    runs = {int(k): Path(v) for k, v in (runs or {}).items()}
    workdir = Path(workdir)
    trained = {}
    for res in resolutions:
        tc = study_config(
            res,
            render=render,
            steps=steps,
            mesh=mesh,
            model=model,
            model_overrides=model_overrides,
            learning_rate=learning_rate,
            class_weights=class_weights,
            dice_classes=dice_classes,
            augment=augment,
            backend=backend,
            train_eval_cases=train_eval_cases,
            checkpoint_every=checkpoint_every,
        )
        t0 = time.perf_counter()
        run = train_and_evaluate(tc, runs.get(res, workdir / f"train{res}"), resume=resume, progress=progress, log=log)
        trained[res] = run
        if run["interrupted"]:
            return [study_row(r, trained[r]) for r in trained]
        rows = run["history"]["train"]
        log(
            f"{res}³: {len(rows)} steps, {sum(r['seconds'] for r in rows):.0f} s of steps in total "
            f"(this call {time.perf_counter() - t0:.0f} s)"
        )
    if not evaluate:
        return [study_row(res, run) for res, run in trained.items()]
    return [
        study_row(
            res,
            run,
            evaluate_at_render(run["model"], res, render=render, eval_cases=eval_cases, mesh=mesh),
            render=render,
        )
        for res, run in trained.items()
    ]


def load_study(path) -> list[dict]:
    """The rows ``benchmarks/resolution_study.py`` wrote to ``resolution_study.json``, in
    order of resolution (each with ``resolution`` and ``evaluated_at``), for tables and
    :func:`workbench.analysis.figures.plot_detection`."""
    import json

    data = json.loads(Path(path).read_text())
    return [
        {"resolution": int(res), "evaluated_at": data["render"], "steps": data["steps"], **row}
        for res, row in sorted(data["table"].items(), key=lambda item: int(item[0]))
    ]
