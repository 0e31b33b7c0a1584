"""Host memory of training on a dataset folder: training reads boxes, evaluation whole cases.

Builds a dataset of ``--cases`` phantoms of ``--size``³ in MSD layout (NIfTI, in a
temporary folder), then measures two things:

1. the data pipeline alone, as training drives it: every step's batch from the
   prefetching :class:`~workbench.training.data.BatchStream` (read, resample, normalise,
   augment) and, every ``steps / 2`` steps, two validation cases read as the evaluation
   reads them; peak Python/numpy host allocations (``tracemalloc``) against one prepared
   case (float32 image + uint8 labels on the training grid) and the whole dataset prepared;
2. a real run: ``--steps`` training steps partitioned on 2x2x2 with held-out evaluation on
   the way; the peak number of prepared cases alive
   (``workbench.training.datasets.LIVE_CASES``), the run's traced peak (which also holds
   JAX's compilation, checkpointing and plotting) and the process's peak resident memory.

    python benchmarks/dataset_memory.py [--cases 20 [40 …]] [--size 128] [--steps 4] [--no-run] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import _common


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, nargs="+", default=[20], help="dataset sizes to measure (default 20)")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--no-run", action="store_true", help="measure the data pipeline only (no training run)")
    p.add_argument("--quick", action="store_true", help="8 cases of 48³, 3 steps")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.size, args.steps = ([8] if args.cases == [20] else args.cases), 48, 3
    _common.start(8)
    rows = [_measure(n, args) for n in args.cases]
    mib = 2**20
    print(
        f"{args.size}³ phantom cases in MSD layout (NIfTI), {args.steps} steps on {args.mesh}; {rows[0]['description']}"
    )
    print(
        _common.table(
            ["cases", "on disk MiB", "one case MiB", "all prepared MiB", "pipeline: live", "peak MiB",
             "÷ one case", "run: live", "peak MiB", "RSS MiB", "run s"],
            [[r["cases"], r["dataset_disk_bytes"] / mib, r["one_case_bytes"] / mib, r["dataset_prepared_bytes"] / mib,
              r["pipeline_peak_live_cases"], r["pipeline_peak_bytes"] / mib, r["pipeline_peak_bytes"] / r["one_case_bytes"],
              r.get("run_peak_live_cases"), _div(r.get("run_peak_traced_bytes"), mib), _div(r.get("peak_rss_bytes"), mib),
              r.get("train_seconds")] for r in rows],
            ["d", ".0f", ".1f", ".0f", "d", ".1f", ".2f", "d", ".0f", ".0f", ".0f"],
        )
    )  # fmt: skip
    print(
        "one case = float32 image + uint8 labels on the training grid; pipeline = batches and validation reads alone "
        "(tracemalloc); run = a real training run (its traced peak also holds the evaluation's logits and HD95 "
        "distance maps, checkpointing and compilation); RSS = the process's peak so far, JAX and XLA included"
    )
    _common.write_json(args.json, {"machine": _common.machine(), "rows": rows})
    return 0


def _div(value, by):
    return None if value is None else value / by


def _measure(cases: int, args) -> dict:
    from data_tools.datasets import write_phantom_dataset
    from workbench.training import TrainConfig
    from workbench.training.datasets import LIVE_CASES, DatasetSource
    from workbench.training.loop import train_and_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        dataset = write_phantom_dataset(Path(tmp) / "Task99_Memory", cases=cases, test=0, shapes=args.size)
        build_seconds = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in dataset.rglob("*") if f.is_file())
        config = TrainConfig(
            data=str(dataset),
            fold=0,
            steps=args.steps,
            mesh=args.mesh,
            eval_every=max(1, args.steps // 2),
            eval_cases=2,
            checkpoint_every=args.steps,
            model_overrides={"depth": 2, "base_filters": 4},  # the data pipeline is measured, not the model
        )
        source = DatasetSource(dataset, fold=0, progress=False)
        grid = source.shape
        one_case = grid[0] * grid[1] * grid[2] * (4 + 1)  # float32 image + uint8 labels on the training grid
        pipeline = _pipeline(source, config)
        row = {
            "cases": cases,
            "size": args.size,
            "training_grid": list(grid),
            "steps": args.steps,
            "one_case_bytes": one_case,
            "dataset_prepared_bytes": one_case * cases,
            "dataset_disk_bytes": disk,
            "pipeline_peak_bytes": pipeline["peak"],
            "pipeline_peak_live_cases": pipeline["live"],
            "build_seconds": build_seconds,
            "description": source.description,
        }
        if args.no_run:
            return row
        LIVE_CASES.reset()
        tracemalloc.start()
        t0 = time.perf_counter()
        train_and_evaluate(config, Path(tmp) / "run", progress=False, log=lambda *a: None)
        row["train_seconds"] = time.perf_counter() - t0
        row["run_peak_traced_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        row["run_cases_prepared"], row["run_peak_live_cases"] = LIVE_CASES.loaded, LIVE_CASES.peak
        row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return row


def _pipeline(source, config) -> dict:
    """Peak traced bytes and live cases of the batches and validation reads of a run: the
    batches as the training loop makes them (the blocks of this process's devices)."""
    from workbench.mesh import ShardLayout
    from workbench.training.config import model_config
    from workbench.training.data import BatchStream
    from workbench.training.datasets import LIVE_CASES
    from workbench.training.step import batch_keys, build_train_step

    cfg = model_config(config, source.num_classes)
    ts = build_train_step(cfg, config, ShardLayout(source.shape, config.mesh_spec, multiple=cfg.multiple))
    keys = batch_keys(ts, config.batch)
    LIVE_CASES.reset()
    tracemalloc.start()
    stream = BatchStream(source, config.batch, start=0, seed=config.seed, augment_data=config.augment, keys=keys,
                         workers=getattr(source, "prefetch_workers", None))  # fmt: skip
    try:
        for step in range(1, config.steps + 1):
            blocks = stream.next()  # noqa: F841  (held while the validation cases are read)
            if step % config.eval_every == 0:
                for case in source.eval_cases(config.eval_cases):
                    del case
    finally:
        stream.close()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"peak": peak, "live": LIVE_CASES.peak}


if __name__ == "__main__":
    raise SystemExit(main())
