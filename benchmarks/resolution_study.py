"""Resolution study: does training at full resolution find what down-sampling loses?

Trains the same model for the same number of steps on phantoms rendered at ``--render``³,
once per ``--resolutions`` entry (a resolution below the render size trains on
down-sampled copies), then evaluates every model on held-out phantoms at the full
``--render``³ (low-resolution predictions are made on the down-sampled image and their
logits up-sampled linearly). Prints organ and lesion Dice per setting and the per-lesion
detection rate by lesion size (a lesion counts as found when at least one predicted
lesion voxel overlaps it).

The issue's setting is ``--render 128 --resolutions 64 128``; on a 2-core CPU the
scaled-down ``--render 64 --resolutions 32 64`` makes the same comparison 8× cheaper.
Finished runs in ``--workdir`` are reused (``--resume``), so the script can be re-run
for the table alone. Never fails on time; every number is measured in this run.

    python benchmarks/resolution_study.py --render 64 --resolutions 32 64 --steps 160 \
        --backend reference --workdir runs/study --run 64=runs/phantom64   # the shipped model's run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", type=int, default=128, help="phantom side and evaluation resolution")
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128], help="training resolutions")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--class-weights", default="1,1,1", help="cross-entropy weights (default 1,1,1, as the "
                   "shipped phantom model; the paper used 1,8,16)")
    p.add_argument("--augment", action="store_true", help="flips/rotations/intensity/noise (default off, as "
                   "the shipped phantom model: every step is a new phantom)")
    p.add_argument("--backend", default="explicit", help="explicit | gspmd | reference (same trajectory)")
    p.add_argument("--mesh", default="2x2x2")
    p.add_argument("--eval-cases", type=int, default=4, help="held-out phantoms (seeds 0..N-1)")
    p.add_argument("--workdir", default="resolution_study")
    p.add_argument("--run", action="append", default=[], metavar="RES=DIR",
                   help="use this training folder for resolution RES (e.g. the shipped model's run)")
    p.add_argument("--train-only", action="store_true", help="train the arms, skip the table")
    p.add_argument("--cpu-devices", type=int, default=8)
    return p.parse_args(argv)


def predict_full(model, image_full: np.ndarray, resolution: int, mesh) -> np.ndarray:
    """Labels at full resolution from a model run at ``resolution``³ (logits up-sampled)."""
    from data_tools.preprocess import resample_array

    from workbench.training.data import ct_input
    from workbench.execute.run import apply

    image = image_full
    if image.shape[0] != resolution:
        image = resample_array(image_full, (resolution,) * 3, order=1)
    logits = apply(model, ct_input(image), mesh)  # phantoms are CT: as workbench.training.data.model_input
    if logits.shape[0] != image_full.shape[0]:
        logits = np.stack([resample_array(logits[..., k], image_full.shape, order=1)
                           for k in range(logits.shape[-1])], axis=-1)
    return logits.argmax(-1).astype(np.uint8)


def lesion_hits(pred: np.ndarray, truth: np.ndarray, lesions: list[dict]) -> list[tuple[float, bool]]:
    """(diameter in voxels, found) per lesion: the lesion's voxels are the true lesion
    voxels within its radius + 1 of its centre."""
    zz, yy, xx = np.indices(truth.shape, sparse=True)
    out = []
    for les in lesions:
        c, r = les["centre_voxel"], max(les["radius_voxels"]) + 1.0
        ball = ((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) <= r * r
        region = ball & (truth == 2)
        if not region.any():  # too small to be rasterised at this resolution
            continue
        out.append((float(les["diameter_voxels"]), bool((pred[region] == 2).any())))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from workbench.execute.devices import configure_cpu_devices

    configure_cpu_devices(args.cpu_devices)
    from data_tools.phantoms import make_phantom

    from workbench.training.losses import dice_per_class
    from workbench.mesh import parse_mesh
    from workbench.training import TrainConfig, train_and_evaluate

    runs = {int(k): Path(v) for k, v in (item.split("=", 1) for item in args.run)}
    workdir = Path(args.workdir)
    models, train_seconds = {}, {}
    for res in args.resolutions:
        tc = TrainConfig(data=f"phantom:{args.render}", resolution=res, mesh=args.mesh, steps=args.steps,
                         learning_rate=args.lr, schedule="cosine", checkpoint_every=10, backend=args.backend,
                         augment=args.augment,
                         class_weights=tuple(float(w) for w in args.class_weights.split(",")),
                         eval_every=50 if res == args.render else 0, eval_cases=4)
        folder = runs.get(res, workdir / f"train{res}")
        t0 = time.perf_counter()
        result = train_and_evaluate(tc, folder, resume=True, progress=True)
        if result["interrupted"]:
            return 130
        models[res] = result["model"]
        rows = result["history"]["train"]
        train_seconds[res] = sum(r["seconds"] for r in rows)
        print(f"{res}³: {len(rows)} steps, {train_seconds[res]:.0f} s of steps in total "
              f"(this call {time.perf_counter() - t0:.0f} s)")
    if args.train_only:
        return 0

    spec = parse_mesh(args.mesh)
    sizes = sorted({round(les["diameter_voxels"], 2) for les in make_phantom(args.render, seed=0).metadata["lesions"]})
    table = {}
    for res, model in models.items():
        organ, lesion, hits = [], [], {}
        for seed in range(args.eval_cases):
            vol = make_phantom(args.render, seed=seed, vessels=False)
            pred = predict_full(model, np.asarray(vol.array, np.float32), res, spec)
            d = dice_per_class(pred, vol.labels, 3)
            organ.append(d[1])
            lesion.append(d[2])
            for size, found in lesion_hits(pred, vol.labels, vol.metadata["lesions"]):
                hits.setdefault(round(size, 2), []).append(found)
        table[res] = {"organ_dice": float(np.nanmean(organ)), "lesion_dice": float(np.nanmean(lesion)),
                      "detection": {s: float(np.mean(v)) for s, v in hits.items()},
                      "train_seconds": train_seconds[res]}
    mm = 400.0 / args.render
    print(f"\nHeld-out phantoms at {args.render}³ (seeds 0..{args.eval_cases - 1}), {args.steps} training steps each")
    header = f"{'trained at':<11}{'organ Dice':>11}{'lesion Dice':>12}  " + "".join(
        f"{f'{s:g}vx':>7}" for s in sizes)
    print(f"{'':<34}lesion detection rate by diameter at {args.render}³ ({mm:g} mm voxels)")
    print(header)
    for res, row in table.items():
        cells = "".join(f"{row['detection'].get(s, float('nan')):>7.2f}" for s in sizes)
        print(f"{f'{res}³':<11}{row['organ_dice']:>11.3f}{row['lesion_dice']:>12.3f}  {cells}")
    out = workdir / "resolution_study.json"
    workdir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"render": args.render, "steps": args.steps, "table": {str(k): v for k, v in table.items()}},
                              indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
