"""Evaluate a trained model on a dataset folder: predictions in each case's own geometry.

:func:`evaluate_dataset` is what ``workbench evaluate`` calls. It runs the model,
partitioned over a mesh, on a dataset's validation fold (the fold it was trained with,
by default) or its test cases (``imagesTs/``), one case at a time: the case is read,
resampled and normalised as in training (:class:`~workbench.training.datasets.Preprocessing`,
stored in the checkpoint), the class probabilities are resampled back onto the case's
original grid (:func:`data_tools.datasets.resample_onto`) and their argmax is written in
the case's format family with its own geometry (NIfTI: affine and header; NRRD / MetaImage:
origin, spacing and direction). With labels it scores each case (Dice and
HD95 per class, predicted and true volume in ml). The output folder, written whole or
not at all::

    predictions/CASE.nii.gz     one label map per case, on the case's original grid (.nrrd, .mha, ...
                                for such datasets)
    cases.csv                   one row per case: dice_*, hd95_mm_*, pred_ml_*, true_ml_* (and
                                region_dice_* for a dataset with nnU-Net's region labels)
    summary.json                means per class, the worst cases, what ran and how

As one of several processes (``workbench launch -- evaluate``, ``WORKBENCH_DISTRIBUTED=auto``)
each process reads, runs and scores its own blocks of each case and process 0 writes the
same folder (:mod:`workbench.app.evaluation_blocks`).

Example
-------
>>> summary = evaluate_dataset("Task01_Phantom", "eval", checkpoint="run", mesh="2x2x2")  # doctest: +SKIP
>>> summary["worst_cases"][0]["case"]                                                       # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path

import numpy as np

from workbench.app.case_scores import _finite, _mean, _prediction, _score
from workbench.errors import UserError
from workbench.training.patches import trained_window

__all__ = ["evaluate_dataset", "dataset_cases", "trained_window", "CASE_COLUMNS"]

CASE_COLUMNS = ("dice", "hd95_mm", "pred_ml", "true_ml")  # per foreground class, in cases.csv


def _model_and_meta(checkpoint, preset: str | None, random_weights: bool, seed: int, log):
    """(ModelChoice, meta of the weights): a checkpoint's meta, the shipped weights' meta, or {}."""
    from workbench.app.models import ModelChoice, check_preset_matches, resolve_model
    from workbench.training.checkpoint import PRETRAINED, WEIGHTS_DIR, load_model, load_weights

    if checkpoint:
        model, meta = load_model(checkpoint, log=log)
        if preset is not None and getattr(model, "spec", None) is not None:
            raise UserError(
                f"--model {preset} names a paper U-Net preset but {checkpoint} holds an nnU-Net network; drop --model"
            )
        if preset is not None:  # named as well: it must be the checkpoint's architecture
            check_preset_matches(preset, model.config, checkpoint)
        step = meta.get("step")
        return ModelChoice(model, "checkpoint", f"checkpoint {checkpoint}" + (f" (step {step})" if step else "")), meta
    choice = resolve_model(preset or "small", task="phantom", random_weights=random_weights, seed=seed, log=log)
    meta = load_weights(WEIGHTS_DIR / PRETRAINED["phantom"])[1] if choice.source == "shipped" else {}
    return choice, meta


def _plan(meta: dict, infos, spacing, resolution):
    """The preprocessing to evaluate with: the flags, else the checkpoint's, else the
    training resolution, else the evaluated cases' median spacing."""
    from workbench.training.datasets import Preprocessing, plan_preprocessing

    if spacing is not None or resolution is not None:
        return plan_preprocessing(infos, spacing=spacing, resolution=resolution)
    if meta.get("preprocessing"):
        return Preprocessing.from_dict(meta["preprocessing"])
    trained = (meta.get("train") or {}).get("resolution")
    if trained:
        return plan_preprocessing(infos, resolution=int(trained))
    return plan_preprocessing(infos)


def _with_normalisation(plan, meta: dict, dataset):
    """``plan`` with nnU-Net's per-channel normalisation where the model was trained with it
    (the checkpoint's numbers) or the dataset has several channels (schemes from the channel
    names; a CT channel needs the training set's numbers, so a checkpoint)."""
    import dataclasses

    trained = (meta.get("preprocessing") or {}).get("normalisation")
    if trained:
        from workbench.training.datasets import Preprocessing

        norm = Preprocessing.from_dict({"shape": [1, 1, 1], "normalisation": trained}).normalisation
    elif len(dataset.channel_names) > 1:
        from workbench.model.nnunet_rules import normalisation_scheme

        norm = tuple((normalisation_scheme(n), None) for n in dataset.channel_names)
        if any(s == "CTNormalization" for s, _ in norm):
            raise UserError(f"{dataset.root} has a CT channel, normalised with the training set's foreground "
                            "numbers; pass --checkpoint of a model trained on this dataset (they are in it)")  # fmt: skip
    else:
        return plan
    if len(norm) != len(dataset.channel_names):
        raise UserError(f"the model was trained on {len(norm)} channel(s) but {dataset.root} has "
                        f"{len(dataset.channel_names)} {list(dataset.channel_names)}; evaluate it on its own dataset")  # fmt: skip
    return dataclasses.replace(plan, normalisation=norm)


def _summary(rows: list[dict], class_names, worst: int = 3) -> dict:
    fg = class_names[1:]
    out = {
        "mean_dice": {n: _mean([r.get(f"dice_{n}") for r in rows]) for n in fg},
        "mean_hd95_mm": {n: _mean([r.get(f"hd95_mm_{n}") for r in rows]) for n in fg},
    }
    scored = [r for r in rows if r.get("mean_dice") is not None]
    ranked = sorted(scored, key=lambda r: r["mean_dice"])[:worst]
    out["worst_cases"] = [
        {"case": r["case"], "mean_dice": r["mean_dice"], **{f"dice_{n}": r.get(f"dice_{n}") for n in fg}}
        for r in ranked
    ]
    out["worst_case_per_class"] = {}
    for n in fg:
        have = [r for r in rows if r.get(f"dice_{n}") is not None]
        if have:
            r = min(have, key=lambda r: r[f"dice_{n}"])
            out["worst_case_per_class"][n] = {"case": r["case"], "dice": r[f"dice_{n}"]}
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})


def evaluate_dataset(
    data,
    out,
    *,
    checkpoint=None,
    model: str | None = None,
    random_weights: bool = False,
    seed: int = 0,
    fold: int | None = None,
    test: bool = False,
    mesh="2x2x2",
    backend: str = "explicit",
    spacing=None,
    resolution: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> dict:
    """Run a model over a dataset's validation fold (``fold``; default the one it was
    trained with) or its test cases (``test``) and write ``out`` (see the module notes).

    Everything is checked (dataset, cases, model classes, mesh, output folder) before a case
    is read; the folder appears only when every case is done. Returns the summary (also
    ``summary.json``) with ``rows``, one per case. ``model``: a preset (default small);
    with ``checkpoint`` it may only name the checkpoint's own architecture. As one of several
    processes each process scores its own blocks (:mod:`workbench.app.evaluation_blocks`):
    process 0 writes and returns the summary, the others return None.
    """
    from tqdm.auto import tqdm

    from data_tools.datasets import check_dataset, open_dataset, read_case_channels
    from data_tools.errors import DataError
    from data_tools.io import write_prediction
    from workbench.app.inference import check_run_options
    from workbench.app.results import check_output_folder, staged_output
    from workbench.training.datasets import prepare_case
    from workbench.training.evaluation import model_logits, region_dice

    dataset = open_dataset(data)
    choice, meta = _model_and_meta(checkpoint, model, random_weights, seed, log)
    k = choice.config.num_classes
    spec_net = getattr(choice.model, "spec", None)
    order = spec_net.regions_class_order if spec_net is not None and spec_net.output_kind == "sigmoid" else None
    if order is not None and not dataset.regions:
        raise UserError(
            f"the model predicts regions ({', '.join(spec_net.output_names)}) but {dataset.root} has no region labels; "
            "pass --checkpoint of a model trained on this dataset"
        )
    if order is None and k != len(dataset.class_names):
        raise UserError(
            f"the model predicts {k} classes but {dataset.root} declares {len(dataset.class_names)} "
            f"{list(dataset.class_names)}; pass --checkpoint of a model trained on this dataset"
        )
    channels = getattr(choice.config, "in_channels", 1)
    if channels != len(dataset.channel_names):
        raise UserError(
            f"the model takes {channels} input channel(s) but {dataset.root} has {len(dataset.channel_names)} "
            f"{list(dataset.channel_names)} (channel_names); pass --checkpoint of a model trained on this dataset"
        )
    _, spec = check_run_options(choice.config, backend, "exact", mesh)
    multi = _process_count() > 1  # several processes: each scores its own blocks (app.evaluation_blocks)
    if multi and trained_window(meta) is not None:
        raise UserError("a patch-trained model (sliding-window prediction) evaluates in one process so far; "
                        "run `workbench evaluate` without `workbench launch`")  # fmt: skip
    if multi:
        from workbench.app.evaluation_blocks import check_processes

        spec = check_processes(choice, order, mesh, backend)
    main = not multi or _is_main()
    if main:
        check_output_folder(out, overwrite=overwrite)
    trained_fold = (meta.get("dataset") or {}).get("fold")
    if test:
        if fold is not None:
            raise UserError("pass --fold K or --test, not both")
        cases = list(dataset.test)
        if not cases:
            raise DataError(dataset.root, "has no test cases (imagesTs/ is empty or missing)",
                            "add images to imagesTs/ or evaluate a validation fold (--fold K)")  # fmt: skip
        split = "test"
    else:
        fold = int(trained_fold if fold is None and trained_fold is not None else fold or 0)
        _, cases = dataset.split(fold)
        split = f"fold {fold}"
        if trained_fold is not None and fold != trained_fold:
            log(f"note: the model was trained on fold {trained_fold}'s training cases, which include fold {fold}")
    infos = check_dataset(dataset, cases, labels=not multi, progress=progress)  # several: labels checked by slabs
    plan = _with_normalisation(_plan(meta, infos.values(), spacing, resolution), meta, dataset)
    names = dataset.class_names
    readers = _case_readers(dataset, plan, cases, infos, log if main else None) if multi else {}
    programs: dict = {}  # several processes: the compiled programs, kept from case to case
    window = trained_window(meta)  # a patch model: Gaussian sliding windows of its patch
    rows: list[dict] = []
    t_start = time.perf_counter()
    with staged_output(out, overwrite=overwrite, marker="summary.json") if main else _nothing() as tmp:
        if main:
            (tmp / "predictions").mkdir()
        for files in tqdm(
            cases, desc=f"evaluate {dataset.name} {split}", unit="case", disable=not progress or not main
        ):
            if multi:
                from workbench.app.evaluation_blocks import score_case

                row = score_case(choice, dataset, files, infos[files.name], readers[files.name], spec, backend,
                                 tmp / "predictions" if main else None, programs)  # fmt: skip
                rows += [row] if row is not None else []
                continue
            t0 = time.perf_counter()
            volumes = read_case_channels(dataset, files, check=False)  # every channel (the first with the labels)
            volume = volumes[0]
            case = prepare_case(volumes if len(volumes) > 1 else volume, plan, name=files.name)
            del volumes
            logits = model_logits(choice.model, case.image, spec, backend, window=window)
            grid = case.metadata
            del case  # the model input is not needed any more
            pred = _prediction(logits, grid, order)
            del logits
            written = write_prediction(pred, volume, tmp / "predictions", name=files.name)
            row = {"case": files.name, "shape": "x".join(map(str, volume.shape)),
                   "spacing_mm": "x".join(f"{s:.4g}" for s in volume.spacing)}  # fmt: skip
            if volume.labels is not None:
                row.update(_score(pred, volume.labels, volume.spacing, names))
                row["mean_dice"] = _mean([row[f"dice_{n}"] for n in names[1:]])
                if dataset.regions:  # nnU-Net's regions: Dice of isin(seg, values) per region
                    dice = region_dice(pred, volume.labels, dataset.regions)
                    row.update({f"region_dice_{n}": _finite(d) for (n, _), d in zip(dataset.regions, dice)})
            else:
                ml = float(np.prod(volume.spacing)) / 1000.0
                row.update({f"pred_ml_{n}": float((pred == c).sum()) * ml for c, n in enumerate(names) if c})
            row["prediction"] = f"predictions/{Path(written).name}"
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)
            del volume, pred
        if not main:
            return None
        summary = {
            "dataset": str(dataset.root),
            "split": split,
            "cases": len(rows),
            "labelled": sum(1 for r in rows if "mean_dice" in r),
            "class_names": list(names),
            "weights": choice.description,
            "mesh": spec.as_dict() if spec is not None else None,
            "backend": backend,
            "prediction": {"whole_volume": True}
            if window is None
            else {"sliding_window": {"patch": list(window), "overlap": 0.5, "mode": "gaussian"}},
            "preprocessing": plan.as_dict(),
            **_summary(rows, names),
            **(
                {"mean_region_dice": {n: _mean([r.get(f"region_dice_{n}") for r in rows]) for n, _ in dataset.regions}}
                if dataset.regions
                else {}
            ),  # fmt: skip
            "seconds": round(time.perf_counter() - t_start, 3),
            "files": {"cases": "cases.csv", "predictions": "predictions/"},
        }
        _write_csv(tmp / "cases.csv", rows)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return {**summary, "rows": rows, "out": str(out)}


def _process_count() -> int:
    import jax

    return jax.process_count()


def _is_main() -> bool:
    from workbench.execute.distributed import is_main

    return is_main()


@contextlib.contextmanager
def _nothing():
    """What a process other than process 0 writes: nothing."""
    yield None


def _case_readers(dataset, plan, cases, infos, log) -> dict:
    """Every case read by box (several processes), surveyed before any case is scored: the
    statistics and label checks, the slabs shared among the processes; ``log`` (process 0)
    names the cases whose predictions need whole logits (resampled back to their grid)."""
    from workbench.training.cases import survey
    from workbench.training.datasets import case_reader

    readers = {f.name: case_reader(dataset, plan, f, infos[f.name]) for f in cases}
    survey(list(readers.values()))
    resampled = [name for name, r in readers.items() if r.resampling is not None]
    if resampled and log is not None:
        log(f"note: {len(resampled)} case(s) ({', '.join(resampled[:3])}{', ...' if len(resampled) > 3 else ''}) "
            "are resampled to the model's spacing: their logits are gathered and process 0 scores them whole "
            "(cases on the model's spacing are scored block by block)")  # fmt: skip
    return readers


def dataset_cases(data, fold: int | None = None) -> list[dict]:
    """One row per case of a dataset folder, from headers only: ``case``, ``split``
    (``train`` / ``validation`` of ``fold``, or ``test``), ``shape``, ``spacing``, ``label``."""
    from data_tools.datasets import open_dataset
    from data_tools.io import volume_info

    dataset = open_dataset(data)
    val = set() if fold is None else {c.name for c in dataset.split(fold)[1]}
    rows = []
    for group, cases in (("train", dataset.training), ("test", dataset.test)):
        for c in cases:
            info = volume_info(c.images[0])
            split = "validation" if c.name in val else group
            rows.append({"case": c.name, "split": split, "shape": info.shape,
                         "spacing": tuple(round(s, 4) for s in info.spacing), "label": c.label is not None})  # fmt: skip
    return rows
