"""``workbench plan --data DIR``: nnU-Net's planning rules applied to the whole median volume.

:func:`dataset_fingerprint` is nnU-Net's ``DatasetFingerprintExtractor`` on a dataset folder
(read by :mod:`data_tools.datasets`): per case the shape after ``crop_to_nonzero`` and the
spacing, and per channel the statistics of foreground voxels (label > 0) that CT
normalisation uses. As in nnU-Net, ``10e7 // cases`` foreground voxels are drawn per case
with replacement (``RandomState(1234).choice`` per case, the channels in turn: the same
draws), and the statistics are those
of the drawn sample; here the draws are counted instead of gathered, so memory stays at the
size of the foreground.

:func:`plan_dataset` turns a fingerprint into a plans file in nnU-Net's schema: target
spacing, transposition and median shape (nnU-Net's rules), then the topology of
:func:`~workbench.analysis.nnunet_rules.pool_and_conv_props` for the **whole median volume**
(not a patch), the planner's features and blocks, and the smallest mesh whose compiled
training step fits the budget (:func:`~workbench.analysis.nnunet_mesh.smallest_mesh`). The
``"workbench"`` block records the planner, the nnU-Net v2 ``dataset.json`` (so
:func:`~workbench.model.nnunet_plans.load_plans_file` needs no file beside it), the mesh and
its memory, the budget, the median shape and the patch nnU-Net's own planner would pick.

Example
-------
>>> plans = plan_dataset("Dataset902_AnisoCT", planner="resenc-l", budget_gib=80, compiler="h100")  # doctest: +SKIP
>>> plans["workbench"]["mesh"], plans["configurations"]["3d_fullres"]["patch_size"]                  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workbench.analysis import nnunet_rules as rules
from workbench.errors import UserError

__all__ = ["dataset_fingerprint", "foreground_statistics", "plan_dataset", "format_dataset_plan", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
FOREGROUND_SAMPLES = 10e7  # nnU-Net's num_foreground_voxels_for_intensitystats
_SEED = 1234
_NORMALIZATION = {"ct": "CTNormalization", "nonorm": "NoNormalization", "zscore": "ZScoreNormalization",
                  "rescale_to_0_1": "RescaleTo01Normalization", "rgb_to_0_1": "RGBTo01Normalization"}  # fmt: skip
_MASK_WHEN_CROPPED = {"ZScoreNormalization"}  # leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true
_RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}


# -- the fingerprint ----------------------------------------------------------------------------------
def _draw_counts(rs: np.random.RandomState, n_voxels: int, n_samples: int) -> np.ndarray:
    """How often each of ``n_voxels`` is drawn by ``rs.choice(…, n_samples)`` (the same
    stream, drawn in chunks)."""
    counts = np.zeros(n_voxels, np.int64)
    chunk = 1 << 22
    for start in range(0, n_samples, chunk):
        counts += np.bincount(rs.randint(0, n_voxels, min(chunk, n_samples - start)), minlength=n_voxels)
    return counts


def foreground_statistics(values: np.ndarray, counts: np.ndarray) -> dict:
    """mean, median, std, min, max and the 0.5 / 99.5 percentiles (numpy's linear rule) of
    the sample holding ``values[i]`` ``counts[i]`` times."""
    order = np.argsort(values, kind="stable")
    v, c = values[order].astype(np.float64), counts[order]
    v, c = v[c > 0], c[c > 0]
    n = int(c.sum())
    ends = np.cumsum(c)  # the sorted sample's element k is v[searchsorted(ends, k, 'right')]

    def kth(k: int) -> float:
        return float(v[np.searchsorted(ends, k, side="right")])

    def percentile(q: float) -> float:
        pos = q / 100 * (n - 1)
        lo = int(np.floor(pos))
        a, b, t = kth(lo), kth(min(lo + 1, n - 1)), pos - lo
        return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t

    mean = float(np.sum(v * c) / n)
    return {
        "max": float(v[-1]),
        "mean": mean,
        "median": percentile(50.0),
        "min": float(v[0]),
        "percentile_00_5": percentile(0.5),
        "percentile_99_5": percentile(99.5),
        "std": float(np.sqrt(np.sum(c * (v - mean) ** 2) / n)),
    }


def _nonzero_box(images) -> tuple[slice, ...]:
    """nnU-Net's ``crop_to_nonzero`` box: where any channel is non-zero (all of it if none is)."""
    mask = np.zeros(images[0].shape, bool)
    for image in images:
        mask |= image != 0
    if not mask.any():
        return tuple(slice(0, n) for n in mask.shape)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def dataset_fingerprint(path, *, samples: float = FOREGROUND_SAMPLES, log=None) -> tuple[dict, object]:
    """(nnU-Net's ``dataset_fingerprint.json`` of the dataset folder ``path``, the
    :class:`data_tools.datasets.Dataset`). Spacings and shapes are (z, y, x)."""
    from data_tools.datasets import check_case, open_dataset
    from data_tools.io import read_volume

    dataset = open_dataset(path)
    if log:
        log(f"fingerprint of {dataset.root} (nnU-Net's rules):")
    cases = sorted(dataset.training, key=lambda c: c.name)
    per_case = int(samples // len(cases))
    shapes, spacings, relative = [], [], []
    values = [[] for _ in dataset.channel_names]
    counts = [[] for _ in dataset.channel_names]
    for i, case in enumerate(cases):
        if log:
            log(f"  reading case {i + 1}/{len(cases)}: {case.name}")
        info = check_case(dataset, case, labels=False)
        images = [read_volume(p).array.astype(np.float32) for p in case.images]
        seg = read_volume(case.label).array
        box = _nonzero_box(images)
        cropped = seg[box]
        foreground = cropped > 0
        shapes.append([int(s.stop - s.start) for s in box])
        spacings.append([float(s) for s in info.spacing])
        relative.append(float(np.prod(shapes[-1]) / np.prod(seg.shape)))
        rs = np.random.RandomState(_SEED)  # one stream per case, the channels drawn in turn (as nnU-Net)
        for c, image in enumerate(images):
            fg = image[box][foreground]
            if fg.size:
                values[c].append(fg)
                counts[c].append(_draw_counts(rs, fg.size, per_case))
    stats = {}
    for c in range(len(dataset.channel_names)):
        if not values[c]:
            raise UserError(
                f"dataset {dataset.root} has no foreground voxel (label > 0) in any case; "
                "nnU-Net's fingerprint needs labelled foreground: check labelsTr/"
            )
        stats[str(c)] = foreground_statistics(np.concatenate(values[c]), np.concatenate(counts[c]))
    fingerprint = {
        "foreground_intensity_properties_per_channel": stats,
        "median_relative_size_after_cropping": float(np.median(relative)),
        "shapes_after_crop": shapes,
        "spacings": spacings,
    }
    return fingerprint, dataset


def _dataset_json(dataset) -> dict:
    """The dataset's description in nnU-Net v2's form (MSD's ``modality`` / ``{"0": name}`` converted)."""
    raw = json.loads((Path(dataset.root) / "dataset.json").read_text())
    if dataset.regions:  # nnU-Net's region labels: {"background": 0, "whole": [1, 2], "core": 2}
        labels = {"background": 0, **{n: list(v) if len(v) > 1 else v[0] for n, v in dataset.regions}}
    else:
        labels = {n: i for i, n in enumerate(dataset.class_names)}
    out = {
        "channel_names": {str(i): n for i, n in enumerate(dataset.channel_names)},
        "labels": labels,
        "numTraining": len(dataset.training),
        "file_ending": dataset.file_ending,
        "name": dataset.name,
    }
    if dataset.regions:
        out["regions_class_order"] = [int(v) for v in dataset.regions_class_order]
    for key in ("description", "overwrite_image_reader_writer"):
        if key in raw:
            out[key] = raw[key]
    return out


# -- the plan -------------------------------------------------------------------------------------------
def plan_dataset(
    path,
    *,
    planner: str = "nnunet",
    budget_gib: float = 80.0,
    dtype: str = "bfloat16",
    train: bool = True,
    compiler: str | None = None,
    max_devices: int = 512,
    samples: float = FOREGROUND_SAMPLES,
    mesh_search: bool = True,
    log=None,
) -> dict:
    """The plans (nnU-Net's schema with a ``"workbench"`` block) of the dataset folder ``path``:
    nnU-Net's rules on the whole median volume, the smallest mesh that fits ``budget_gib``
    (``mesh_search=False``: no mesh is searched and the block has no mesh fields)."""
    from workbench.analysis.nnunet_mesh import smallest_mesh
    from workbench.model.nnunet_plans import from_nnunet_plans

    plan = rules.planner(planner)
    fingerprint, dataset = dataset_fingerprint(path, samples=samples, log=log)
    dataset_json = _dataset_json(dataset)
    spacing = rules.target_spacing(fingerprint["spacings"], fingerprint["shapes_after_crop"])
    forward, backward = rules.transpose(spacing)
    median = rules.resampled_median_shape(fingerprint["spacings"], fingerprint["shapes_after_crop"], spacing)
    spacing_t = [spacing[i] for i in forward]
    median_t = [median[i] for i in forward]
    volume = [int(round(n)) for n in median_t]
    topology = rules.pool_and_conv_props(spacing_t, volume)
    schemes = [_NORMALIZATION.get(n.casefold(), "ZScoreNormalization") for n in dataset.channel_names]
    cropped = fingerprint["median_relative_size_after_cropping"] < 3 / 4
    nnunet = rules.nnunet_configuration(
        plan, spacing_t, median_t, num_classes=len(dataset_json["labels"]), n_cases=len(dataset.training)
    )
    configuration = {
        "data_identifier": f"{plan.plans_name}_workbench_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 1,
        "patch_size": list(topology.shape),
        "median_image_size_in_voxels": median_t,
        "spacing": spacing_t,
        "normalization_schemes": schemes,
        "use_mask_for_norm": [cropped and s in _MASK_WHEN_CROPPED for s in schemes],
        **_RESAMPLING,
        "architecture": rules.architecture(plan, topology),
        "batch_dice": False,
    }
    plans = {
        "dataset_name": dataset.name,
        "plans_name": f"{plan.plans_name}_workbench",
        "original_median_spacing_after_transp": [
            float(v) for v in np.median(fingerprint["spacings"], 0)[list(forward)]
        ],
        "original_median_shape_after_transp": [
            int(round(v)) for v in np.median(fingerprint["shapes_after_crop"], 0)[list(forward)]
        ],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(forward),
        "transpose_backward": list(backward),
        "configurations": {"3d_fullres": configuration},
        "experiment_planner_used": plan.name,
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": fingerprint["foreground_intensity_properties_per_channel"],
    }
    spec = from_nnunet_plans(plans, dataset_json)
    mesh_fields = {}
    if mesh_search:
        if log:
            log(
                f"{spec.network_class}, {spec.n_stages} stages, {spec.num_params:,} parameters, on the whole "
                f"{'x'.join(map(str, volume))} volume; searching the smallest mesh within {budget_gib:g} GiB/device:"
            )
        best = smallest_mesh(
            spec, volume, budget_gib, train=train, dtype=dtype, compiler=compiler, max_devices=max_devices, log=log
        )
        mesh_fields = {k: best[k] for k in ("mesh", "devices", "bytes_per_device", "memory", "padded_shape",
                                            "block_shape")}  # fmt: skip
    plans["workbench"] = {
        "schema_version": SCHEMA_VERSION,
        "planner": planner,
        "dataset": dataset_json,
        "fingerprint": fingerprint,
        "median_shape": volume,
        "network_shape": list(topology.shape),
        **mesh_fields,
        "budget_gib": budget_gib,
        "budget_bytes": int(budget_gib * 2**30),
        "train": bool(train),
        "dtype": dtype,
        "batch": 1,
        **({"compiler": best["compiler"], "tried": best["tried"]} if mesh_search else {}),
        "parameters": spec.num_params,
        "nnunet_patch_size": nnunet["patch_size"],
        "nnunet_batch_size": nnunet["batch_size"],
        "nnunet_strides": nnunet["architecture"]["arch_kwargs"]["strides"],
    }
    return plans


def format_dataset_plan(plans: dict) -> str:
    """The short table ``workbench plan --data`` prints."""
    from workbench.analysis.plan import _size

    wb = plans["workbench"]
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    devices = f"{wb['devices']} device{'s' if wb['devices'] != 1 else ''}"
    rows = [
        ("dataset", f"{plans['dataset_name']} ({wb['dataset']['numTraining']} cases)"),
        ("planner", f"{wb['planner']} ({plans['experiment_planner_used']} rules, whole volume)"),
        ("target spacing (mm)", " x ".join(f"{s:.4g}" for s in config["spacing"])),
        ("median volume", "x".join(map(str, wb["median_shape"]))),
        (
            "network",
            f"{config['architecture']['network_class_name'].rsplit('.', 1)[-1]}, {arch['n_stages']} stages, "
            f"{wb['parameters']:,} parameters",
        ),
        ("strides", " ".join("".join(map(str, s)) for s in arch["strides"])),
        ("step", f"{'training (Adam, deep supervision)' if wb['train'] else 'inference'}, {wb['dtype']}, batch 1"),
        (
            "smallest mesh",
            f"{wb['mesh']} ({devices}): {_size(wb['bytes_per_device'])}/device "
            f"within {wb['budget_gib']:g} GiB ({wb['compiler']} compiler)",
        ),
        ("meshes compiled", ", ".join(f"{t['mesh']} {_size(t['bytes_per_device'])}" for t in wb["tried"])),
        ("nnU-Net's own patch", f"{'x'.join(map(str, wb['nnunet_patch_size']))}, batch {wb['nnunet_batch_size']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
