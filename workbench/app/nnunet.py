"""Run an nnU-Net-trained model on a whole volume, partitioned over the device mesh.

:func:`predict_nnunet` is what ``workbench infer … --checkpoint NNUNET_TRAINING_FOLDER``
calls. It reads the training folder (``plans.json``, ``dataset.json``,
``fold_K/checkpoint_final.pth`` or its ``_network_weights.npz``), preprocesses the channels
as nnU-Net's ``DefaultPreprocessor`` does for the configuration (transpose, crop to the
non-zero region, per-channel normalisation from the plans, resampling to the plan's
spacing), runs the network on the whole volume (no sliding window) on the mesh, and undoes
the preprocessing on the logits: resampling back, nnU-Net's segmentation rule (argmax, or
for region plans the regions painted in ``regions_class_order``, sigmoid > 0.5, later
regions overwrite), the crop pasted back and the transpose undone.

The pure-numpy steps (:func:`normalise_channel`, :func:`crop_to_nonzero`,
:func:`logits_to_segmentation`, :func:`preprocess`) follow nnU-Net 2.x's code; what differs
from nnU-Net's own predictor is listed in docs/nnunet.md.

Example
-------
>>> run = predict_nnunet("nnUNet_results/Dataset903_ThickMRI/nnUNetTrainer__nnUNetPlans__3d_fullres",
...                      ["imagesTs/case_0000.nii.gz", "imagesTs/case_0001.nii.gz"], mesh="2x2x2")  # doctest: +SKIP
>>> run.segmentation.shape                                                        # doctest: +SKIP
(20, 192, 192)
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workbench.app.memory_guard import check_run_memory
from workbench.app.nnunet_processing import (
    NORMALISATIONS,
    Preprocessed,
    compute_new_shape,
    crop_to_nonzero,
    logits_to_segmentation,
    normalise_channel,
    postprocess,
    preprocess,
)
from workbench.errors import InputNotFoundError, UserError
from workbench.options import BACKENDS

__all__ = [
    "NORMALISATIONS",
    "NNUNetFolder",
    "NNUNetPrediction",
    "Preprocessed",
    "is_nnunet_folder",
    "open_nnunet_folder",
    "channel_files",
    "normalise_channel",
    "crop_to_nonzero",
    "compute_new_shape",
    "preprocess",
    "logits_to_segmentation",
    "check_nnunet_mesh",
    "MIRROR_AXES",
    "predict_nnunet",
    "write_nnunet_result",
]

_FOLDER_FILES = ("plans.json", "dataset.json")
#: the axes ``mirror=True`` flips: nnU-Net's default ``inference_allowed_mirroring_axes`` for 3D
MIRROR_AXES = (0, 1, 2)
_CHANNEL_FILE = re.compile(r"(.+)_(\d{4})(\.[A-Za-z0-9][A-Za-z0-9.]*)$")
_MODELS: dict = {}  # the last loaded model, keyed by its folder, fold and files' stamps
_CACHE: dict = {}  # compiled forwards, keyed by (spec, shape, mesh, backend, devices)


# -- the training folder ---------------------------------------------------------------------------
def is_nnunet_folder(path) -> bool:
    """Whether ``path`` looks like an nnU-Net training folder (``Trainer__Plans__Configuration``,
    or holding ``plans.json``, ``dataset.json`` or a ``fold_K``), complete or not."""
    if path is None:
        return False
    path = Path(path)
    if not path.is_dir():
        return re.fullmatch(r".+__.+__.+", path.name) is not None and not path.suffix
    if re.fullmatch(r".+__.+__.+", path.name) or any((path / n).is_file() for n in _FOLDER_FILES):
        return True
    return any(p.is_dir() and re.fullmatch(r"fold_(\d+|all)", p.name) for p in path.iterdir())


@dataclass(frozen=True)
class NNUNetFolder:
    """An nnU-Net training folder, checked: its plans, dataset.json, configuration and fold."""

    path: Path
    fold: str
    configuration: str
    plans: dict
    dataset: dict
    config: dict  # the configuration with inherits_from resolved

    @property
    def channel_names(self) -> list[str]:
        names = self.dataset.get("channel_names", self.dataset.get("modality")) or {}
        return [str(names[k]) for k in sorted(names, key=int)]

    @property
    def file_ending(self) -> str:
        return str(self.dataset.get("file_ending", ".nii.gz"))


def open_nnunet_folder(folder, *, fold: int | str = 0, configuration: str | None = None) -> NNUNetFolder:
    """Check an nnU-Net training folder before anything runs; one :class:`UserError` naming what
    is missing (plans.json, dataset.json, the fold, its checkpoint)."""
    from workbench.model.nnunet_plans import _configuration

    path = Path(folder)
    if not path.is_dir():
        raise InputNotFoundError(
            f"nnU-Net training folder {folder} does not exist; pass the folder nnU-Net trained into "
            "(…/DatasetXXX_Name/Trainer__Plans__3d_fullres)"
        )
    missing = [n for n in _FOLDER_FILES if not (path / n).is_file()]
    if missing:
        raise InputNotFoundError(
            f"{folder} is not an nnU-Net training folder: it lacks {' and '.join(missing)}; pass the folder "
            "nnU-Net trained into (it holds plans.json, dataset.json and fold_K/)"
        )
    fold = str(fold)
    fold_dir = path / f"fold_{fold}"
    if not fold_dir.is_dir():
        folds = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("fold_"))
        hint = f"use --fold with one of {', '.join(f[5:] for f in folds)}" if folds else "it holds no fold_K folder"
        raise InputNotFoundError(f"{folder} has no fold_{fold}; {hint}")
    ckpt = fold_dir / "checkpoint_final.pth"
    if not ckpt.is_file() and not (fold_dir / "checkpoint_final_network_weights.npz").is_file():
        raise InputNotFoundError(
            f"{fold_dir} holds no checkpoint_final.pth; pass a fold whose training finished (nnU-Net writes "
            "checkpoint_final.pth at the end)"
        )
    plans = _read_json(path / "plans.json")
    dataset = _read_json(path / "dataset.json")
    if configuration is None:
        match = re.fullmatch(r".+__.+__(.+)", path.resolve().name)
        configuration = match.group(1) if match else "3d_fullres"
    config = _configuration(plans, configuration, str(path / "plans.json"))
    schemes = config.get("normalization_schemes") or []
    unknown = [s for s in schemes if s not in NORMALISATIONS]
    if unknown:
        raise UserError(
            f"{path / 'plans.json'} ({configuration}) normalises with {', '.join(unknown)}, which is not supported; "
            f"supported: {', '.join(NORMALISATIONS)}"
        )
    return NNUNetFolder(path, fold, configuration, plans, dataset, config)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not readable JSON ({exc}); pass the file nnU-Net wrote") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no JSON object; pass the file nnU-Net wrote")
    return data


# -- the input channels ----------------------------------------------------------------------------
def channel_files(inputs, channel_names, file_ending: str = ".nii.gz") -> list[Path]:
    """The channel files of one case, in channel order.

    ``inputs``: the files themselves (nnU-Net's naming ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``
    … is sorted by channel index; other names are taken in the order given), or one case id
    with its folder (``imagesTs/CASE``) whose ``CASE_XXXX`` files are found. The count must
    equal ``len(channel_names)``.
    """
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    n = len(channel_names)
    if len(paths) == 1 and not paths[0].exists() and paths[0].parent.is_dir():
        prefix = paths[0]
        found = []
        for p in prefix.parent.iterdir():
            m = _CHANNEL_FILE.fullmatch(p.name)
            if m and m.group(1) == prefix.name:
                found.append(p)
        if not found:
            raise InputNotFoundError(
                f"{prefix}: no such file, and no channel files {prefix.name}_0000{file_ending} … beside it; "
                "pass the channel files, or a case id inside its images folder (imagesTs/CASE)"
            )
        paths = found
    matches = [_CHANNEL_FILE.fullmatch(p.name) for p in paths]
    numbered = all(matches) and len({m.group(1) for m in matches}) == 1
    if numbered:
        paths = [p for _, p in sorted(zip((int(m.group(2)) for m in matches), paths))]
    named = ", ".join(f"{i} {c}" for i, c in enumerate(channel_names))
    if len(paths) != n:
        raise UserError(
            f"{len(paths)} input channel file(s) given ({', '.join(p.name for p in paths)}) but the network expects "
            f"{n} (dataset.json's channel_names: {named}); pass one file per channel (CASE_0000, CASE_0001, …)"
        )
    if numbered:
        indices = sorted(int(_CHANNEL_FILE.fullmatch(p.name).group(2)) for p in paths)
        if indices != list(range(n)):
            raise UserError(
                f"the channel files are numbered {', '.join(f'{i:04d}' for i in indices)} but the network's channels "
                f"are {', '.join(f'{i:04d}' for i in range(n))} ({named}); pass CASE_0000 … CASE_{n - 1:04d}"
            )
    return paths


# -- the mesh and the forward --------------------------------------------------------------------------
def check_nnunet_mesh(spec, shape, mesh, backend: str = "explicit"):
    """The :class:`~workbench.mesh.MeshSpec` of ``mesh`` for a run of ``spec`` on a (Z, Y, X)
    network-grid ``shape``; one :class:`UserError` when the mesh needs more devices than
    there are, has a data axis, or has more shards on an axis than the volume has voxels at
    the network's coarsest stride level (a shard would hold padding only)."""
    import jax

    from workbench.mesh import MeshSpec, auto_mesh, parse_mesh

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return MeshSpec()
    n = len(jax.devices())
    if mesh is None or (isinstance(mesh, str) and mesh.strip().lower() == "auto"):
        mesh_spec = auto_mesh(n)
    else:
        mesh_spec = parse_mesh(mesh)
        if mesh_spec.n_devices > n:
            parse_mesh(mesh_spec, n_devices=n)  # raises: names the meshes that fit
    if mesh_spec.data > 1:
        raise UserError(
            f"mesh {mesh_spec} has a data-parallel axis of {mesh_spec.data} but inference runs one volume; "
            "set data-parallel to 1"
        )
    if shape is not None:
        for axis, size, parts, mult in zip("zyx", shape, mesh_spec.spatial, spec.multiple):
            coarse = -(-int(size) // mult)
            if parts > coarse:
                raise UserError(
                    f"mesh {axis}={parts} cannot split the {axis} axis: the network sees {size} voxels there, "
                    f"{coarse} at its coarsest stride level (stride {mult}); use {axis} <= {coarse}"
                )
    return mesh_spec


def _load_model(folder: NNUNetFolder):
    """The folder's model, kept while its files are unchanged (a second run reuses it, and its
    compiled forwards)."""
    from workbench.model.nnunet import load_nnunet_folder

    files = [folder.path / n for n in _FOLDER_FILES]
    files += [
        folder.path / f"fold_{folder.fold}" / n
        for n in ("checkpoint_final.pth", "checkpoint_final_network_weights.npz")
    ]
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file())
    key = (str(folder.path.resolve()), folder.fold, folder.configuration, stamp)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_nnunet_folder(folder.path, fold=folder.fold, configuration=folder.configuration)
    return _MODELS[key]


def _compiled(model, shape, mesh_spec, backend, comm_overlap="auto"):
    """(layout, compiled fn, input sharding, variables on devices, compile seconds), cached."""
    import jax
    import jax.numpy as jnp

    from workbench.execute.distributed import put_tree
    from workbench.execute.nnunet import make_nnunet_forward, nnunet_layout

    key = (model.spec, tuple(shape), mesh_spec, backend, comm_overlap, len(jax.devices()), id(model.variables))
    if key not in _CACHE:
        t0 = time.perf_counter()
        layout = nnunet_layout(model.spec, shape, mesh_spec)
        fn, _, in_sharding, var_sharding = make_nnunet_forward(
            model.spec, layout, backend=backend, deep_supervision=False, comm_overlap=comm_overlap)  # fmt: skip
        target = layout.reference_shape if backend == "reference" else layout.padded_shape
        variables = put_tree(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), model.variables), var_sharding)
        x = jax.ShapeDtypeStruct((1, *target, model.spec.in_channels), jnp.float32, sharding=in_sharding)
        compiled = fn.lower(variables, x).compile()
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = (layout, compiled, in_sharding, variables, time.perf_counter() - t0, model.variables)
    return _CACHE[key][:5]


def _run(model, x: np.ndarray, mesh_spec, backend: str, mirror=(), comm_overlap="auto"):
    """A :class:`~workbench.execute.run.RunResult` of the full-resolution logits (Z, Y, X, K).

    ``mirror`` (axes of the network grid): nnU-Net's test-time mirroring, the logits of every
    flipped input flipped back and averaged with the plain ones (sum in nnU-Net's order:
    plain, then each combination of the axes, then divided by the count)."""
    import itertools

    import jax

    from workbench.execute.distributed import put, to_host
    from workbench.execute.run import RunResult, memory_stats

    cached = _compiled(model, x.shape[:3], mesh_spec, backend, comm_overlap)
    layout, compiled, in_sharding, variables, t_compile = cached
    target = layout.reference_shape if backend == "reference" else layout.padded_shape
    z, h, w = x.shape[:3]
    flips = [()] + [c for i in range(1, len(mirror) + 1) for c in itertools.combinations(mirror, i)]
    total = None
    t0 = time.perf_counter()
    for axes in flips:
        xi = np.flip(x, axes) if axes else x
        padded = np.pad(xi, [*((0, t - s) for t, s in zip(target, x.shape[:3])), (0, 0)])[None]
        y = to_host(jax.block_until_ready(compiled(variables, put(padded, in_sharding))))[0, :z, :h, :w]
        y = np.flip(y, axes) if axes else y
        total = np.array(y, np.float32) if total is None else total + y
    if len(flips) > 1:
        total /= np.float32(len(flips))
    seconds = time.perf_counter() - t0
    return RunResult(total, backend, "exact", layout, seconds, t_compile, memory_stats(compiled))


# -- the whole prediction --------------------------------------------------------------------------
@dataclass
class NNUNetPrediction:
    """One case predicted by an nnU-Net model, partitioned, with its reference when asked."""

    segmentation: np.ndarray  # (Z, Y, X) on the input's grid: nnU-Net's labels
    result: Any  # RunResult: full-resolution logits (Z', Y', X', K) on the network's grid
    preprocessed: Preprocessed
    folder: NNUNetFolder
    model: Any  # NNUNetModel
    report: dict
    volume: Any = None  # data_tools.Volume of channel 0 (the output's geometry), or None
    reference: Any = None  # RunResult of the single-device reference, or None
    reference_segmentation: np.ndarray | None = None
    comparison: Any = None
    files: list = field(default_factory=list)
    channels: np.ndarray | None = None  # (C, Z, Y, X) the input channels as read (what the viewers show)

    @property
    def logits(self) -> np.ndarray:
        return self.result.output


def _load_channels(images, folder: NNUNetFolder, spacing):
    """(data (C, Z, Y, X), spacing, Volume of channel 0 or None, file names)."""
    from data_tools.io import load_input
    from data_tools.volume import Volume

    names = folder.channel_names
    if isinstance(images, np.ndarray):
        data = images[None] if images.ndim == 3 and len(names) == 1 else images
        if data.ndim != 4 or data.shape[0] != len(names):
            raise UserError(
                f"image array has shape {images.shape} but the network expects {len(names)} channel(s) "
                f"(dataset.json's channel_names: {', '.join(names)}); pass (C, Z, Y, X) with C = {len(names)}"
            )
        space = tuple(spacing) if spacing is not None else tuple(folder.config.get("spacing", (1.0, 1.0, 1.0)))
        return np.asarray(data, np.float32), space, None, ["array"]
    if isinstance(images, Volume) or (isinstance(images, (list, tuple)) and images and isinstance(images[0], Volume)):
        volumes = [images] if isinstance(images, Volume) else list(images)
        files = [v.path or "volume" for v in volumes]
        if len(volumes) != len(names):
            raise UserError(
                f"{len(volumes)} input channel(s) given but the network expects {len(names)} "
                f"(dataset.json's channel_names: {', '.join(names)})"
            )
    else:
        paths = channel_files(images, names, folder.file_ending)
        volumes = [load_input(p) for p in paths]
        files = [str(p) for p in paths]
    first = volumes[0]
    for v, f in zip(volumes[1:], files[1:]):
        if v.shape != first.shape:
            raise UserError(f"channel {f} has shape {v.shape} but channel {files[0]} has {first.shape}; pass one case")
        if not np.allclose(v.spacing, first.spacing, rtol=1e-3):
            raise UserError(
                f"channel {f} has spacing {v.spacing} but channel {files[0]} has {first.spacing}; pass one case"
            )
    data = np.stack([np.asarray(v.array, np.float32) for v in volumes])
    return data, tuple(spacing or first.spacing), first, files


def predict_nnunet(
    results_folder,
    images,
    mesh="auto",
    *,
    fold: int | str = 0,
    backend: str = "explicit",
    reference: bool = False,
    configuration: str | None = None,
    spacing=None,
    tolerance: float = 1e-5,
    mirror: bool = False,
    on_stage=None,
    model=None,
    force: bool = False,
    comm_overlap: str = "auto",
) -> NNUNetPrediction:
    """Predict one case with the nnU-Net model of ``results_folder`` (a training folder,
    ``…/Trainer__Plans__3d_fullres``) and ``fold``, partitioned over ``mesh``.

    ``images``: the channel files (``CASE_0000.nii.gz`` …), a case id with its folder
    (``imagesTs/CASE``), ``data_tools.Volume`` objects, or a (C, Z, Y, X) array (then
    ``spacing`` (z, y, x), default the plan's). With ``reference``, the single-device reference
    runs too; the report then holds the comparison of the logits and ``label_agreement``.
    ``mirror``: nnU-Net's test-time mirroring over the three axes of the network grid (nnU-Net's
    default for 3D trainers; 8 forward passes, the reference mirrored too).
    ``model``: an already loaded :class:`~workbench.model.nnunet.NNUNetModel` of the folder. A run
    that would not fit is refused once compiled (memory guard), ``force`` skips that; ``comm_overlap``: make_forward.
    """
    from workbench.analysis.compare import compare

    stage = on_stage or (lambda text: None)
    folder = open_nnunet_folder(results_folder, fold=fold, configuration=configuration)
    check_nnunet_mesh(None, None, mesh, backend)  # the mesh alone, before anything is read
    stage("load the network")
    if model is None:
        model = _load_model(folder)
    spec = model.spec
    if spec.in_channels != len(folder.channel_names):  # pragma: no cover - the plans reader checks this
        raise UserError(f"the network takes {spec.in_channels} channels; dataset.json: {len(folder.channel_names)}")
    stage("read and preprocess")
    data, in_spacing, volume, files = _load_channels(images, folder, spacing)
    pre = preprocess(data, in_spacing, folder)
    mesh_spec = check_nnunet_mesh(spec, pre.data.shape[1:], mesh, backend)
    x = np.ascontiguousarray(np.moveaxis(pre.data, 0, -1))
    stage(f"compile and run ({backend})")
    axes = MIRROR_AXES if mirror else ()
    if not force:  # the memory guard, on the compiled forward itself (the run reuses it)
        compiled = lambda key: _compiled(model, x.shape[:3], key.mesh, key.backend, comm_overlap)[1]  # noqa: E731
        check_run_memory(spec, x.shape[:3], mesh_spec, backend=backend, reference=reference, compiled=compiled)
    result = _run(model, x, mesh_spec, backend, axes, comm_overlap)
    segmentation = postprocess(result.output, pre, spec)
    ref = ref_seg = comparison = None
    if reference:
        from workbench.mesh import MeshSpec

        stage("single-device reference")
        ref = _run(model, x, MeshSpec(), "reference", axes)
        ref_seg = postprocess(ref.output, pre, spec)
        stage("compare")
        comparison = compare(result.output, ref.output, result.layout, keep_error=False, tol=tolerance)
    report = _report(result, model, folder, pre, files, ref, comparison, segmentation, ref_seg, volume)
    report["nnunet"]["mirror_axes"] = list(axes) or None
    return NNUNetPrediction(segmentation, result, pre, folder, model, report, volume, ref, ref_seg, comparison, files,
                            data)  # fmt: skip


def _report(result, model, folder, pre, files, ref, comparison, segmentation, ref_seg, volume) -> dict:
    from types import SimpleNamespace

    from workbench.app.results import build_report

    report = build_report(
        result,
        model=SimpleNamespace(config=SimpleNamespace(as_dict=model.spec.describe)),  # what build_report reads
        reference=ref,
        comparison=comparison,
        weights=f"nnU-Net {folder.path} fold_{folder.fold} ({model.source})",
    )
    spec = model.spec
    if spec.output_kind == "sigmoid":  # region i paints the value regions_class_order[i]
        names = ["background"] + [""] * max(spec.regions_class_order)
        for name, value in zip(spec.output_names, spec.regions_class_order):
            names[value] = name
        report["class_names"] = names
    else:
        report["class_names"] = list(spec.output_names)
    report["output_shape"] = list(segmentation.shape)
    report["input_shape"] = list(segmentation.shape)
    report["network_shape"] = list(pre.data.shape[1:])
    if volume is not None:
        report["spacing"] = [float(s) for s in volume.spacing]
    report["label_agreement"] = None if ref_seg is None else float(np.mean(segmentation == ref_seg))
    report["nnunet"] = {
        "folder": str(folder.path),
        "fold": folder.fold,
        "configuration": folder.configuration,
        "channels": dict(zip(folder.channel_names, files)) if len(files) == len(folder.channel_names) else files,
        "output_kind": spec.output_kind,
        "regions_class_order": None if spec.regions_class_order is None else list(spec.regions_class_order),
        "normalization_schemes": list(folder.config.get("normalization_schemes") or []),
        "preprocessing": pre.describe(),
        "labels_present": sorted(int(v) for v in np.unique(segmentation)),
    }
    report["channel_names"], labels = list(folder.channel_names), folder.dataset.get("labels") or {}
    if spec.output_kind == "sigmoid":  # what each region covers in the painted prediction (dataset.json)
        report["regions"] = [[n, list(np.atleast_1d(labels[n]).astype(int).tolist())] for n in spec.output_names]
    return report


def write_nnunet_result(out, prediction: NNUNetPrediction, *, overwrite: bool = False, input_name=None,
                        save_logits: bool = False, compare_with: np.ndarray | None = None,
                        images: bool | None = None) -> dict:  # fmt: skip
    """The result folder of a prediction (staged, renamed when complete): ``prediction.<ext>``
    in the input's format family with its geometry (``.npy`` for arrays), ``report.json``, the
    optional files of :func:`~workbench.app.nnunet_compare.write_extras`, and ``image.npy``, the
    input channels (Z, Y, X, C): by default with a reference or ``compare_with``."""
    from data_tools.io import write_prediction
    from workbench.app.nnunet_compare import write_extras
    from workbench.app.results import staged_output, write_report
    from workbench.execute.devices import device_summary

    with staged_output(out, overwrite=overwrite) as tmp:
        if prediction.volume is not None:
            written = Path(write_prediction(prediction.segmentation, prediction.volume, tmp)).name
        else:
            written = "prediction.npy"
            np.save(tmp / written, prediction.segmentation)
        write_extras(tmp, prediction, save_logits=save_logits, compare_with=compare_with)
        wanted = images if images is not None else (prediction.reference is not None or compare_with is not None)
        if prediction.channels is not None and wanted:
            np.save(tmp / "image.npy", np.ascontiguousarray(np.moveaxis(prediction.channels, 0, -1), np.float32))
        report = dict(prediction.report)
        report.update(input=input_name, prediction=written, machine=device_summary())
        write_report(tmp, report)
    return report
