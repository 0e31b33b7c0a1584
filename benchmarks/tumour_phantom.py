"""Is the two-channel tumour phantom learnable at laptop sizes, and does a model need both channels?

Writes ``write_phantom_dataset(task="tumour", layout="nnunet")`` (``--cases`` cases of
32–40 voxels per side), trains the paper U-Net with two input channels on fold 0
(``workbench.training.loop.train_and_evaluate``, whole volumes, 1x1x1), then scores the
validation cases: Dice per class, per nnU-Net region (``whole`` = {1, 2}, ``core`` = {2}),
and again with each input channel zeroed (the model must lose the core without ADC and
everything without T2). Nothing passes or fails; the figures go in the README.

    python benchmarks/tumour_phantom.py [--steps 300] [--cases 10] [--depth 3] [--filters 8] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import machine, start, table, write_json


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--filters", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="40 steps, 6 cases")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.cases = 40, 6
    start(8)
    from data_tools.datasets import write_phantom_dataset
    from workbench.training import TrainConfig
    from workbench.training.checkpoint import load_model
    from workbench.training.datasets import DatasetSource
    from workbench.training.evaluation import evaluate
    from workbench.training.loop import train_and_evaluate

    work = Path(tempfile.mkdtemp(prefix="tumour-"))
    data = write_phantom_dataset(work / "Dataset002_Tumour", task="tumour", layout="nnunet", cases=args.cases, test=0)
    config = TrainConfig(data=str(data), fold=0, steps=args.steps, mesh="1x1x1", eval_every=args.steps,
                         eval_cases=2, checkpoint_every=args.steps,
                         model_overrides={"depth": args.depth, "base_filters": args.filters, "in_channels": 2})  # fmt: skip
    t0 = time.perf_counter()
    train_and_evaluate(config, work / "run", progress=False, log=lambda m: None)
    seconds = time.perf_counter() - t0
    model, _ = load_model(work / "run", log=lambda m: None)
    source = DatasetSource(data, fold=0, progress=False)

    def zeroed(channel):
        for case in source.eval_cases(len(source.val_files)):
            if channel is not None:
                case.image[..., channel] = 0.0  # the channel's mean after its z-score
            yield case

    rows, results = [], {}
    for channel, what in ((None, "both channels"), (0, "T2 zeroed"), (1, "ADC zeroed")):
        r = evaluate(
            model, zeroed(channel), "1x1x1", class_names=source.class_names, regions=source.regions, hd95=False
        )
        results[what] = {"dice": r["dice"], "region_dice": r["region_dice"]}
        rows.append([what, r["dice"]["label1"], r["dice"]["core"], r["region_dice"]["whole"], r["region_dice"]["core"]])
    print(f"{args.steps} steps on {len(source.train_files)} cases ({source.shape} grid), {seconds:.0f} s; "
          f"{len(source.val_files)} validation cases:")  # fmt: skip
    print(table(["input", "Dice oedema", "Dice core", "Dice region whole", "Dice region core"], rows,
                ["s", ".3f", ".3f", ".3f", ".3f"]))  # fmt: skip
    payload = {"machine": machine(), "args": vars(args), "train_seconds": seconds, "results": results}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
