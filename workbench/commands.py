"""What the CLI commands do, as importable functions (notebooks call these too)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["infer_array", "shard_errors", "staged_output", "infer", "demo", "write_figure"]


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, *, overwrite: bool = False):
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    An existing non-empty ``out`` is an error unless ``overwrite``; then only the
    files written here replace their namesakes, everything else in ``out`` stays.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} already holds files; choose a new folder or pass --overwrite"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not out.exists():
        os.replace(tmp, out)
        return
    for item in tmp.iterdir():
        target = out / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    tmp.rmdir()


def shard_errors(layout, output: np.ndarray, reference: np.ndarray) -> list[dict]:
    """Per shard: index, mesh coordinates, box (volume coordinates) and max |Δ|."""
    rows = []
    first = 1 if output.ndim == 5 else 0
    for shard in layout.shards():
        sl = [slice(None)] * output.ndim
        for i, (lo, hi) in enumerate(shard.valid_box):
            sl[first + i] = slice(lo, hi)
        diff = np.abs(output[tuple(sl)] - reference[tuple(sl)])
        rows.append({
            "index": shard.index,
            "coords": list(shard.coords),
            "box": [list(b) for b in shard.valid_box],
            "max_abs_diff": float(diff.max()) if diff.size else None,
        })
    return rows


def infer_array(model, image: np.ndarray, mesh, *, backend="explicit", halo="exact",
                reference=False) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """Run one volume; return (report, logits, reference logits or None)."""
    from .mesh import parse_mesh
    from .run import run

    result = run(model, image, mesh, backend=backend, halo=halo)
    report = {
        "input_shape": list(image.shape),
        "output_shape": list(result.output.shape[:3]),
        "num_classes": int(result.output.shape[-1]),
        "mesh": parse_mesh(result.layout.mesh).as_dict(),
        "padded_shape": list(result.layout.padded_shape),
        "backend": backend,
        "halo": halo,
        "seconds": result.seconds,
        "compile_seconds": result.compile_seconds,
        "peak_bytes_per_device": result.memory.get("peak"),
        "memory": result.memory,
        "max_abs_diff": None,
        "argmax_disagreement": None,
        "reference_seconds": None,
        "per_shard": [
            {"index": s.index, "coords": list(s.coords), "box": [list(b) for b in s.valid_box],
             "max_abs_diff": None}
            for s in result.layout.shards()
        ],
        "model": model.config.as_dict(),
    }
    ref_logits = None
    if reference:
        ref = run(model, image, backend="reference")
        ref_logits = ref.output
        report["reference_seconds"] = ref.seconds
        report["reference_peak_bytes"] = ref.memory.get("peak")
        report["max_abs_diff"] = float(np.abs(result.output - ref_logits).max())
        report["argmax_disagreement"] = float(
            np.mean(result.output.argmax(-1) != ref_logits.argmax(-1))
        )
        report["per_shard"] = shard_errors(result.layout, result.output, ref_logits)
    return report, result.output, ref_logits


def _model_from_args(args):
    from .unet import Model, UNetConfig

    config = UNetConfig.preset(args.model)
    return Model.init(config, seed=args.seed)


def _image_for_model(volume) -> np.ndarray:
    from data_tools.preprocess import zscore

    return zscore(np.asarray(volume.array, np.float32)).astype(np.float32)


def infer(args) -> int:
    """``workbench infer``: read, run, write prediction + report.json."""
    from data_tools.io import load_input, write_prediction

    from .devices import device_summary
    from .halo import validate_halo
    from .mesh import parse_mesh
    from .run import BACKENDS

    if args.backend not in BACKENDS:
        raise ValueError(f"--backend {args.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    halo = validate_halo(args.halo)
    if args.mesh.strip().lower() != "auto":
        parse_mesh(args.mesh)  # fail on a malformed mesh before reading anything
    volume = load_input(args.input)
    with staged_output(args.out, overwrite=args.overwrite) as tmp:
        model = _model_from_args(args)
        image = _image_for_model(volume)
        report, logits, _ = infer_array(model, image, args.mesh, backend=args.backend, halo=halo,
                                        reference=args.reference)
        labels = logits.argmax(-1).astype(np.uint8)
        written = write_prediction(labels, volume, tmp)
        if args.save_logits:
            np.save(tmp / "logits.npy", logits)
        report.update(input=str(args.input), prediction=Path(written).name,
                      machine=device_summary(), weights=f"random (seed {args.seed})")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(_summary_line(report))
    print(f"wrote {Path(args.out) / Path(written).name} and {Path(args.out) / 'report.json'}")
    return 0


def _summary_line(report: dict) -> str:
    mesh = report["mesh"]
    diff = report["max_abs_diff"]
    peak = report["peak_bytes_per_device"]
    return (
        f"{report['backend']} on z={mesh['z']},y={mesh['y']},x={mesh['x']},data={mesh['data']}: "
        f"{report['seconds']:.2f} s, peak {peak / 2**20:.1f} MiB/device"
        + ("" if diff is None else f", max |Δ| vs reference {diff:.3g}")
    )


def write_figure(path, image: np.ndarray, labels: np.ndarray, error: np.ndarray | None, layout,
                 title: str = "") -> Path:
    """Mid-slices of image, prediction and |error| with shard boundaries (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    z = image.shape[0] // 2
    panels = [("image", image[z], "gray"), ("prediction", labels[z], "viridis")]
    if error is not None:
        panels.append(("|partitioned − reference|", error[z], "magma"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    ids = layout.shard_ids()[z]
    for ax, (name, data, cmap) in zip(np.atleast_1d(axes), panels):
        im = ax.imshow(data, cmap=cmap, interpolation="nearest")
        ax.contour(ids, levels=np.arange(ids.max() + 1) + 0.5, colors="red", linewidths=0.8)
        ax.set_title(name)
        ax.axis("off")
        if name.startswith("|"):
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or f"slice z={z}; red lines: shard boundaries (mesh {layout.mesh})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def demo(args) -> int:
    """``workbench demo``: phantom → explicit and gspmd vs reference → table, report, PNG."""
    from data_tools.io import load_input

    from .devices import device_summary
    from .mesh import ShardLayout, parse_mesh

    spec = parse_mesh(args.mesh)
    n = args.resolution
    with staged_output(args.out, overwrite=args.overwrite) as tmp:
        t0 = time.perf_counter()
        volume = load_input(f"phantom:{n}")
        model = _model_from_args(args)
        image = _image_for_model(volume)
        print(f"phantom {n}³ in {time.perf_counter() - t0:.1f} s; model '{args.model}' "
              f"({model.num_params:,} parameters, random weights seed {args.seed}); mesh {spec}")
        report, logits, ref = infer_array(model, image, spec, backend="explicit", reference=True)
        gspmd_report, gspmd_logits, _ = infer_array(model, image, spec, backend="gspmd")
        gspmd_diff = float(np.abs(gspmd_logits - ref).max())
        rows = [
            ("reference (1 device)", report["reference_seconds"], 0.0, report["reference_peak_bytes"]),
            ("explicit (ours)", report["seconds"], report["max_abs_diff"], report["peak_bytes_per_device"]),
            ("gspmd (XLA)", gspmd_report["seconds"], gspmd_diff, gspmd_report["peak_bytes_per_device"]),
        ]
        ref_seconds, ref_peak = rows[0][1], rows[0][3]
        print(f"\n{'backend':<22}{'seconds':>9}{'÷ ref':>8}{'max |Δ|':>10}{'MiB/device':>12}{'ideal ÷ used':>14}")
        for name, sec, diff, peak in rows:
            ideal = ref_peak / spec.n_devices if "1 device" not in name else ref_peak
            print(f"{name:<22}{sec:>9.2f}{sec / ref_seconds:>8.2f}{diff:>10.2g}"
                  f"{peak / 2**20:>12.1f}{ideal / peak:>14.2f}")
        labels = logits.argmax(-1).astype(np.uint8)
        np.save(tmp / "prediction.npy", labels)
        np.save(tmp / "image.npy", np.asarray(volume.array, np.float32))
        if volume.labels is not None:
            np.save(tmp / "ground_truth.npy", volume.labels.astype(np.uint8))
        np.save(tmp / "reference_prediction.npy", ref.argmax(-1).astype(np.uint8))
        error = np.abs(logits - ref).max(-1)
        layout = ShardLayout(image.shape, spec, multiple=model.config.multiple)
        write_figure(tmp / "view.png", image, labels, error, layout)
        report.update(
            input=f"phantom:{n}", prediction="prediction.npy", machine=device_summary(),
            weights=f"random (seed {args.seed})",
            gspmd={"seconds": gspmd_report["seconds"], "max_abs_diff": gspmd_diff,
                   "peak_bytes_per_device": gspmd_report["peak_bytes_per_device"]},
        )
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}/report.json, prediction.npy and view.png")
    return 0
