"""Shared pieces of the CLI commands: staged output folders, per-shard errors, inference."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "positive_int",
    "add_common",
    "infer_array", "shard_errors", "staged_output", "model_from_args", "image_for_model", "write_figure", "summary_line"]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def add_common(p) -> None:
    """Options every JAX-running command takes: devices, model preset, weights (checkpoint or seed)."""
    p.add_argument("--cpu-devices", type=positive_int, default=8,
                   help="simulated CPU devices when no accelerator is present (default 8)")
    p.add_argument("--model", default="small", help="model preset: small | paper (default small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--checkpoint", default=None,
                   help="trained weights: a workbench train folder, its checkpoints/ or a .msgpack file "
                        "(default: the shipped weights of --model small)")
    p.add_argument("--random-weights", action="store_true",
                   help="use random weights (--seed) instead of the shipped ones")


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
    from workbench.mesh import parse_mesh
    from workbench.execute.run import run

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


def model_from_args(args, task: str | None = None):
    """The model a command runs: ``--checkpoint PATH``, else the shipped weights, else random.

    Shipped weights exist for ``--model small`` (phantom and MNI tasks; ``task`` or the
    command's input picks one, see :func:`workbench.training.checkpoint.weights_for_input`);
    ``--random-weights`` or another preset gives random weights from ``--seed``. The
    choice is recorded in ``args.weights_description`` for report.json.
    """
    from workbench.training.checkpoint import WEIGHTS_DIR, PRETRAINED, load_model, pretrained, weights_for_input
    from workbench.model.unet import Model, UNetConfig

    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        model, meta = load_model(checkpoint)
        step = meta.get("step")
        args.weights_description = f"checkpoint {checkpoint}" + (f" (step {step})" if step is not None else "")
        return model
    config = UNetConfig.preset(args.model)
    if args.model == "small" and not getattr(args, "random_weights", False):
        task = task or weights_for_input(getattr(args, "input", "phantom"))
        if (WEIGHTS_DIR / PRETRAINED[task]).is_file():
            args.weights_description = f"shipped {task} weights ({PRETRAINED[task]})"
            return pretrained(task)
    args.weights_description = f"random (seed {args.seed})"
    return Model.init(config, seed=args.seed)


def image_for_model(volume) -> np.ndarray:
    """The normalised image the shipped models expect (:func:`workbench.training.data.model_input`)."""
    from workbench.training.data import model_input

    return model_input(volume)


def summary_line(report: dict) -> str:
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
    """Mid-slices of image, prediction and |error| with shard boundaries (matplotlib, Agg).

    The figure is the notebooks' :func:`workbench.analysis.figures.plot_slices`, saved to ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from workbench.analysis.figures import plot_slices

    fig = plot_slices(image, labels, layout, error=error, title=title)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)


