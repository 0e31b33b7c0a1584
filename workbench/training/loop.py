"""Training at full resolution: the loop of :func:`train_and_evaluate`.

Reads top to bottom in stages: data and model → checkpoints (fresh or resume) → the
partitioned step (:mod:`workbench.training.step`) → update loop (checkpoints, signals,
NaN guard, progress) → final evaluation (:mod:`workbench.training.evaluation`), history
and weights.

The same loop runs in one process or in several (``workbench launch -- train``, or one
process per host with ``WORKBENCH_DISTRIBUTED=auto``): every process makes only the
batch blocks of its own devices, runs the same step (parameters replicated, gradients
and batch statistics reduced over every device of every process), and takes part in each
orbax checkpoint; process 0 alone writes ``config.json``, the history, the curves and
the final weights, and shows the progress bar. A signal to any process stops all of them
at the same step (they agree after every step), with a checkpoint. The pieces live in :mod:`~workbench.training.config` (``TrainConfig``),
:mod:`~workbench.training.state`, :mod:`~workbench.training.step`,
:mod:`~workbench.training.history` and :mod:`~workbench.training.checkpoint`.

Example
-------
>>> cfg = TrainConfig(data="phantom", resolution=32, mesh="2x2x2", steps=4, model_overrides={"depth": 2})
>>> result = train_and_evaluate(cfg, "/tmp/run")          # doctest: +SKIP
>>> result["eval"]["dice"]["organ"]                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from data_tools.atomic import write_text_atomic
from workbench.errors import NotAFolderError, OutputExistsError, UserError
from workbench.execute.signals import StopSignals
from workbench.training.checkpoint import Checkpoints, save_weights
from workbench.training.config import PAPER_CLASS_WEIGHTS, NonFiniteLossError, TrainConfig, model_config
from workbench.training.evaluation import evaluate, evaluate_blocks, held_out_blocks
from workbench.training.history import eval_row, plot_history, train_row, write_history
from workbench.training.models import NNUNetConfig, describe_model, model_with
from workbench.training.nnunet_train import check_source, nnunet_weights, output_names
from workbench.training.state import abstract_train_state, create_train_state, learning_rate_schedule, variables_of
from workbench.training.step import batch_keys, build_train_step, put_batch_blocks

__all__ = ["train_and_evaluate"]


def train_and_evaluate(
    config: TrainConfig,
    workdir,
    *,
    resume: bool = False,
    progress: bool = True,
    log=print,
    source=None,
    memory_check=None,
) -> dict:
    """Train ``config`` into ``workdir`` (checkpoints, history, plot, final weights) and evaluate.

    Returns a dict with ``history``, ``eval`` (final held-out metrics), ``step``,
    ``interrupted`` (signal name or None), ``params_steps_per_second`` and the paths written.
    A run interrupted by SIGINT/SIGTERM writes a checkpoint and returns; ``resume=True``
    continues from the newest readable checkpoint, exactly. ``memory_check(model_config,
    layout, config)``, if given, runs before anything is compiled (it raises to refuse the run).
    """
    import jax

    from workbench.execute.distributed import agree, put_tree
    from workbench.mesh import ShardLayout, parse_mesh
    from workbench.training.data import BatchStream
    from workbench.training.datasets import make_source

    tc = config
    workdir = Path(workdir)
    several = jax.process_count() > 1
    main = jax.process_index() == 0
    if not main:
        progress, log = False, lambda message: None
    if several and tc.backend == "reference":
        raise UserError(
            "backend 'reference' trains on one device; run it as one process (without launch), "
            "or choose explicit or gspmd"
        )
    if workdir.exists() and not workdir.is_dir():
        raise NotAFolderError(f"--checkpoint-dir {workdir} is a file; choose a folder path")
    # -- data and model ---------------------------------------------------------------------
    spec = tc.mesh_spec if tc.backend != "reference" else parse_mesh("1x1x1")
    if tc.backend != "reference":
        parse_mesh(spec, n_devices=None)
        if spec.n_devices > len(jax.devices()):
            parse_mesh(spec, n_devices=len(jax.devices()))  # the helpful error
    if tc.batch % spec.data:
        raise UserError(f"batch {tc.batch} does not split over data={spec.data}; use a multiple of {spec.data}")
    source = source or make_source(tc.data, tc.resolution, fold=tc.fold, spacing=tc.spacing)
    case_shape = tuple(source.shape)
    if tc.patch is not None:  # nnU-Net's patch training: the step, the stream and the guard see patches
        from workbench.training.patches import PatchSource

        if several:
            raise UserError("patch training (--patch) runs in one process for now; run it without launch")
        source = PatchSource(source, tc.patch, batch=tc.batch, foreground=tc.foreground_oversampling)
    cfg = model_config(tc, source.num_classes, getattr(source, "channels", None) or 1)
    if tc.patch is not None:
        from workbench.training.patches import check_patch_multiple

        check_patch_multiple(tc.patch, cfg.multiple)
    initial_variables = None
    if isinstance(cfg, NNUNetConfig):
        if tc.init_checkpoint:  # before the data is checked: a folder whose weights are not its plans'
            initial_variables = nnunet_weights(tc, cfg)
        check_source(cfg, source, several)
    weights = tc.class_weights
    if isinstance(cfg, NNUNetConfig):
        weights = (1.0,) * source.num_classes  # not used: nnU-Net's loss has no class weights
    elif weights is None:
        weights = (
            PAPER_CLASS_WEIGHTS
            if source.num_classes == 3 and "phantom" in source.description
            else (1.0,) * source.num_classes
        )
    if len(weights) != source.num_classes:
        raise UserError(
            f"class_weights {tuple(weights)} must have {source.num_classes} entries ({', '.join(source.class_names)})"
        )
    if tc.dice_classes is not None and not all(c < source.num_classes for c in tc.dice_classes):
        raise UserError(
            f"dice_classes {tuple(tc.dice_classes)} must be foreground classes 1..{source.num_classes - 1} "
            f"({', '.join(source.class_names[1:])})"
        )
    layout = ShardLayout(source.shape, spec, multiple=cfg.multiple)
    if memory_check is not None:
        memory_check(cfg, layout, tc)
    names = output_names(cfg, source)  # classes, or an nnU-Net region model's regions
    region_model = isinstance(cfg, NNUNetConfig) and cfg.spec.output_kind == "sigmoid"
    first = 0 if region_model else 1  # the outputs a step's Dice is logged for
    # held-out evaluation: a region model is scored on its painted label map (the data's classes) and per region
    eval_names = tuple(source.class_names) if region_model else names
    regions = tuple(getattr(source, "regions", None) or ())
    meta = {
        "model": describe_model(cfg),
        "train": tc.as_dict(),
        "class_names": list(eval_names),  # the classes of the label maps the model predicts
        **({"region_names": list(names)} if region_model else {}),
        "class_weights": list(weights),
        "data": source.description,
        **(getattr(source, "meta", None) or {}),  # a dataset's split and preprocessing
        **({"window": window_record(tc.patch)} if tc.patch else {}),  # how infer / evaluate predict it
    }
    # -- checkpoints: fresh or resume ---------------------------------------------------------
    ckpt_dir = workdir / "checkpoints"
    existing = []
    if ckpt_dir.is_dir():
        probe = Checkpoints(ckpt_dir, keep=tc.keep)
        existing = probe.steps()
        probe.close()
    if existing and not resume:
        raise OutputExistsError(
            f"{workdir} already holds a training run (checkpoints at steps {existing}); pass --resume "
            "to continue it or choose a new --checkpoint-dir"
        )
    # -- set up mesh and step -------------------------------------------------------------------
    ts = build_train_step(cfg, tc, layout, class_weights=weights)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(ckpt_dir, keep=tc.keep, writer=True)
    state, start = None, 0
    history = {
        "config": tc.as_dict(),
        "model": describe_model(cfg),
        "class_names": list(eval_names),
        "scored_names": list(names[first:]),  # the dice_* of each step's row
        "data": source.description,
        "compute": compute_record(tc, case_shape, source.shape, spec, 0, 0.0),
        "train": [],
        "eval": [],
    }
    if resume and existing:
        abstract = abstract_train_state(cfg, tc, ts.state_sharding)
        state, _, start = ckpts.restore(abstract, expect_model=cfg, log=log)
        if (workdir / "history.json").is_file():
            old = json.loads((workdir / "history.json").read_text())
            history["train"] = [r for r in old.get("train", []) if r["step"] <= start]
            history["eval"] = [r for r in old.get("eval", []) if r["step"] <= start]
        log(f"resumed from {ckpt_dir} step {start}")
    elif resume:
        log(f"no checkpoint in {ckpt_dir} to resume; starting at step 0")
    if state is None:
        initial = create_train_state(cfg, tc, variables=initial_variables)
        state = put_tree(initial, ts.state_sharding) if several else jax.device_put(initial, ts.state_sharding)
    # -- update loop (from here on SIGINT/SIGTERM mean "checkpoint and return") -------------
    interrupted, step, last_good, final_eval = None, start, start, None
    stream = bar = None
    schedule = learning_rate_schedule(tc)

    def save(step):
        history["compute"] = compute_record(tc, case_shape, source.shape, spec, step,
                                            sum(r["seconds"] for r in history["train"]))  # fmt: skip
        # History first: killed in between, it holds rows past the newest checkpoint, which
        # a resume drops; the other order would leave the resumed history with a gap.
        if main:
            write_history(workdir, history)
        ckpts.save(step, state, meta)  # every process writes its part

    def run_eval(step):
        model = model_with(cfg, variables_of(state))
        if several:  # each process evaluates its own blocks: no process holds a whole held-out case
            result = evaluate_blocks(model, eval_cases, tc.eval_cases, spec, backend=tc.backend,
                                     class_names=eval_names, regions=regions)  # fmt: skip
        else:
            result = evaluate(model, eval_cases, spec, backend=tc.backend, class_names=eval_names, regions=regions,
                              window=tc.patch)  # fmt: skip
        history["eval"].append(eval_row(step, result))
        return result

    t_loop = time.perf_counter()
    with StopSignals() as stop:
        try:
            if main:
                write_text_atomic(workdir / "config.json", json.dumps(meta, indent=1) + "\n")
            if not tc.eval_cases:
                eval_cases = []
            elif several:
                eval_cases = held_out_blocks(source, tc.eval_cases)
            else:
                eval_cases = source.eval_cases(tc.eval_cases)
            keys = batch_keys(ts, tc.batch)  # the blocks of this process's devices
            stream = BatchStream(
                source,
                tc.batch,
                start=start,
                seed=tc.seed,
                augment_data=tc.augment,
                workers=getattr(source, "prefetch_workers", None),
                keys=keys,
            )
            bar = _progress(progress, tc.steps, start, source.description, spec)
            while step < tc.steps:
                blocks = stream.next()
                t0 = time.perf_counter()
                x, y = put_batch_blocks(ts, tc.batch, keys, blocks)
                state, metrics = ts.fn(state, x, y)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"loss became {float(metrics['loss'])} at step {step + 1}; training stopped and the "
                        f"last good checkpoint (step {last_good}) in {ckpt_dir} is kept; lower the learning "
                        "rate or check the data, then --resume"
                    )
                step += 1
                row = train_row(step, metrics, names, seconds, float(schedule(step - 1)), first=first)
                history["train"].append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(_postfix(row, names[first:]))
                if tc.eval_every and step % tc.eval_every == 0 and eval_cases and step < tc.steps:
                    run_eval(step)
                stopping = agree(stop.received is not None) if several else stop.received is not None
                if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
                    save(step)
                    last_good = step
                if stopping:
                    interrupted = stop.received or "SIGTERM"  # another process was signalled
                    break
        finally:
            if stream is not None:
                stream.close()
            if bar is not None:
                bar.close()
    loop_seconds = time.perf_counter() - t_loop
    result = {
        "step": step,
        "interrupted": interrupted,
        "workdir": str(workdir),
        "history": history,
        "loop_seconds": loop_seconds,
    }
    if interrupted:
        ckpts.close()
        log(f"{interrupted} at step {step}: checkpoint written to {ckpt_dir}; continue with --resume")
        return result
    if eval_cases:
        final_eval = run_eval(step)
    ckpts.close()
    model = model_with(cfg, jax.device_get(variables_of(state)))
    history["compute"] = compute_record(tc, case_shape, source.shape, spec, step,
                                        sum(r["seconds"] for r in history["train"]))  # fmt: skip
    if main:
        write_history(workdir, history)
        plot_history(history, workdir / "curves.png")
        # model.msgpack last: its presence means the run finished (every other file is written)
        save_weights(workdir / "model.msgpack", model, {**meta, "step": step, "eval": final_eval})
    result.update(
        eval=final_eval,
        model=model,
        files=[str(workdir / n) for n in ("history.json", "history.csv", "curves.png", "model.msgpack")],
    )
    return result


def window_record(patch) -> dict:
    """How a model trained on ``patch`` is predicted (the checkpoint's ``window``; see
    :func:`workbench.execute.windows.patch_logits`)."""
    from workbench.execute.windows import PATCH_OVERLAP

    return {"patch": [int(v) for v in patch], "overlap": PATCH_OVERLAP, "mode": "gaussian", "sigma_scale": 0.125}


def compute_record(tc, case_shape, seen_shape, spec, steps: int, seconds: float) -> dict:
    """What a run spent: steps, volumes (or patches) per step, voxels seen, and the seconds
    of its steps (compilation included) times the devices of the mesh."""
    per_step = tc.batch * int(np.prod(seen_shape))
    return {
        "arm": "patch" if tc.patch else "whole",
        "case_shape": list(case_shape),
        "input_shape": [int(v) for v in seen_shape],
        "batch": tc.batch,
        "steps": int(steps),
        "voxels_per_step": per_step,
        "voxels_seen": per_step * int(steps),
        "step_seconds": float(seconds),  # the first step's compilation included
        "devices": spec.n_devices,
        "device_seconds": float(seconds) * spec.n_devices,
    }


def _postfix(row: dict, scored) -> dict:
    out = {"loss": f"{row['loss']:.3f}"}
    for n in scored:
        v = row.get(f"dice_{n}")
        out[n[:6]] = "-" if v is None else f"{v:.2f}"
    out["s/step"] = f"{row['seconds']:.2f}"
    return out


def _progress(enabled: bool, total: int, initial: int, description: str, spec):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {description} on {spec}", unit="step")
