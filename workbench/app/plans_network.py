"""A plans file's network where the front ends pick a model: the notebook panel, the napari widget.

A model choice is a preset name (``small``, ``paper``: the workbench's own U-Net) or the
path of a plans file (nnU-Net's ``nnUNetPlans.json`` with its ``dataset.json`` beside it, or
one written by ``workbench plan --data``). :func:`network_config` turns a choice into the
configuration the rest of the application keys on: a :class:`~workbench.model.unet.UNetConfig`
for a preset, an :class:`~workbench.training.models.NNUNetConfig` for a plans file (the same
config ``workbench train --plans`` trains). :func:`infer_plans` runs a plans network on a
loaded volume partitioned over a mesh, and with ``reference`` the single-device reference and
the comparison, returning the same :class:`~workbench.app.inference.Inference` as
:func:`~workbench.app.inference.infer` (so the panel, its viewer and napari show it alike).

Runs of a plans network compute in float32 (as ``workbench infer --checkpoint NNUNET_FOLDER``
does); the ``dtype`` of its config is what the memory estimate plans and what training uses.

Example
-------
>>> config = network_config("Dataset001/nnUNetPlans.json")                     # doctest: +SKIP
>>> choice = plans_model(config, seed=0)                                       # doctest: +SKIP
>>> run = infer_plans(choice, load_volume("phantom:32"), "2x2x2", reference=True)  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from workbench.errors import UserError
from workbench.options import PRESETS

__all__ = [
    "is_preset",
    "is_plans_config",
    "network_config",
    "plans_shape",
    "plans_model",
    "check_channels",
    "infer_plans",
    "network_name",
]


def is_preset(choice) -> bool:
    """Whether a model choice names one of the workbench's presets (else: a plans file)."""
    return isinstance(choice, str) and choice.strip() in PRESETS


def is_plans_config(config) -> bool:
    """Whether ``config`` is a plans network's (an ``NNUNetConfig``), not a preset's ``UNetConfig``."""
    return getattr(config, "kind", None) == "nnunet"


@functools.lru_cache(maxsize=16)
def _plans_config(path: str, stamp: tuple, dtype: str):
    from workbench.model.nnunet_plans import load_plans_file
    from workbench.training.models import nnunet_config

    return nnunet_config(load_plans_file(path), dtype=dtype)


def network_config(choice: str, dtype: str | None = None, remat: bool = False):
    """The configuration of a model choice: a preset's ``UNetConfig`` (``dtype``, ``remat``), or
    the ``NNUNetConfig`` of a plans file (read again when the file changes). One
    :class:`UserError` for an empty choice, a missing or unreadable plans file, or
    rematerialisation asked of a plans network (nnU-Net's networks have none)."""
    from workbench.model.unet import UNetConfig

    text = str(choice or "").strip()
    if not text:
        raise UserError(f"no model chosen; pick a preset ({', '.join(PRESETS)}) or enter a plans file's path")
    if text in PRESETS:
        return UNetConfig.preset(text, **({"dtype": dtype} if dtype else {}), remat=bool(remat))
    path = Path(os.path.expanduser(text))
    if not path.is_file():
        from workbench.errors import InputNotFoundError

        raise InputNotFoundError(
            f"model {text!r} is neither a preset ({', '.join(PRESETS)}) nor an existing plans file; "
            "pick a preset or enter the path of nnUNetPlans.json (dataset.json beside it) or of a "
            "plans file written by workbench plan --data"
        )
    if remat:
        raise UserError(
            "rematerialisation is an option of the workbench's U-Net presets; nnU-Net's networks "
            f"(model {text!r}) have none: untick it"
        )
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"dtype {dtype!r} is not planned for nnU-Net networks; use float32 or bfloat16")
    stat = path.stat()
    return _plans_config(str(path.resolve()), (stat.st_mtime_ns, stat.st_size), dtype)


def plans_shape(config) -> str | None:
    """``ZxYxX`` of the volume a plans file names (``workbench plan --data``'s median shape, else
    the configuration's patch size: what ``workbench plan --plans`` plans without ``--shape``), or None."""
    info = getattr(config, "plans", None) or {}
    plans = info.get("plans") or {}
    shape = (plans.get("workbench") or {}).get("median_shape")
    if not shape:
        shape = ((plans.get("configurations") or {}).get(info.get("configuration")) or {}).get("patch_size")
    return "x".join(str(int(n)) for n in shape) if shape else None


def network_name(config) -> str:
    """A short name of a configuration for status lines."""
    if not is_plans_config(config):
        return f"U-Net depth {config.depth}, {config.base_filters} filters"
    spec = config.spec
    where = Path((config.plans or {}).get("path", "")).name or spec.source or "plans"
    return f"{spec.network_class} of {where} ({spec.n_stages} stages, {spec.num_params:,} parameters)"


def plans_model(config, *, seed: int = 0):
    """A :class:`~workbench.app.models.ModelChoice` of a plans network with random weights from ``seed``."""
    from workbench.app.models import ModelChoice
    from workbench.training.models import init_model, model_with

    model = model_with(config, init_model(config, seed=seed).variables, f"random (seed {seed})")
    return ModelChoice(model, "random", f"random (seed {seed})")


def check_channels(spec, channels: int, name: str = "") -> None:
    """One :class:`UserError` naming both counts when the volume's channels are not the network's
    (``name``: where the network came from, e.g. its plans file)."""
    if channels != spec.in_channels:
        plural = "s" * (channels != 1)
        raise UserError(
            f"the volume has {channels} channel{plural} but the plans network ({spec.network_class}"
            f"{f' of {name}' if name else ''}) takes {spec.in_channels} (its dataset.json's channel_names); "
            f"choose a plans file made for {channels} channel{plural}, or a volume with {spec.in_channels}"
        )


def infer_plans(choice, loaded, mesh, *, backend: str = "explicit", reference: bool = False,
                tolerance: float = 1e-5, on_stage=None, force: bool = False, comm_overlap: str = "auto"):  # fmt: skip
    """Run the plans network of ``choice`` (a ``ModelChoice`` of an ``NNUNetModel``) on
    ``loaded`` (a :class:`~workbench.app.volumes.LoadedVolume`) over ``mesh``, exact halos;
    with ``reference`` also on one device, and compare. The memory guard runs on the compiled
    program first (``force`` skips it). Returns an :class:`~workbench.app.inference.Inference`."""
    from types import SimpleNamespace

    import numpy as np

    from workbench.analysis.compare import compare
    from workbench.app.inference import Inference
    from workbench.app.memory_guard import check_run_memory
    from workbench.app.nnunet import _compiled, _run, check_nnunet_mesh
    from workbench.app.results import build_report
    from workbench.mesh import MeshSpec

    stage = on_stage or (lambda text: None)
    model = choice.model
    spec = model.spec
    image = np.asarray(loaded.image, np.float32)
    path = (getattr(model.config, "plans", None) or {}).get("path")
    check_channels(spec, 1 if image.ndim == 3 else image.shape[-1], Path(path).name if path else spec.source)
    x = image[..., None] if image.ndim == 3 else image
    mesh_spec = check_nnunet_mesh(spec, x.shape[:3], mesh, backend)
    stage(f"compile and run ({backend})")
    if not force:  # the guard reads the program the run compiles anyway
        compiled = lambda key: _compiled(model, x.shape[:3], key.mesh, key.backend, comm_overlap)[1]  # noqa: E731
        check_run_memory(spec, x.shape[:3], mesh_spec, backend=backend, reference=reference, compiled=compiled)
    result = _run(model, x, mesh_spec, backend, comm_overlap=comm_overlap)
    ref = comparison = None
    if reference:
        stage("single-device reference")
        ref = _run(model, x, MeshSpec(), "reference")
        stage("compare")
        comparison = compare(result.output, ref.output, result.layout, keep_error=False, tol=tolerance)
    report = build_report(
        result,
        model=SimpleNamespace(config=SimpleNamespace(as_dict=spec.describe)),
        reference=ref,
        comparison=comparison,
        weights=choice.description,
        volume=loaded.volume,
    )
    report["class_names"] = list(spec.output_names)
    report["plans"] = path
    return Inference(result, ref, comparison, report, loaded=loaded)
