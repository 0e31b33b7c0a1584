"""Sliding-window prediction: how a patch-trained network is run on a whole volume.

A window of the network's patch size is run at MONAI's window positions
(:func:`window_starts`: a step of ``int(roi × (1 − overlap))``, the last window shifted
back to the face) and the windows' logits are blended with a Gaussian importance map
(:func:`importance_map`, ``sigma = sigma_scale × roi``, clamped below at
``max(min, 1e-3)``), MONAI's ``sliding_window_inference`` arithmetic (checked against
MONAI itself in ``tests/test_baselines.py``). A patch-trained model is predicted with
:data:`PATCH_OVERLAP` (nnU-Net's step of half a patch) and Gaussian weights
(:func:`patch_logits`); a volume smaller than the patch along an axis is zero-padded to
it (as nnU-Net pads) and the logits cropped back.

:func:`blend_windows` is the arithmetic alone, over any window predictor;
:func:`window_predictor` runs a model (the paper U-Net or an nnU-Net network) on one
device on a batch of windows. :mod:`workbench.analysis.baselines` builds the
sliding-window peer of the partitioned run on these.

Example
-------
>>> logits = patch_logits(model, image, (24, 24, 24))      # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence

import numpy as np

from workbench.errors import UserError

__all__ = [
    "BLEND_MODES",
    "PATCH_OVERLAP",
    "triple",
    "check_window_options",
    "scan_interval",
    "window_starts",
    "importance_map",
    "blend_windows",
    "window_predictor",
    "patch_logits",
]

BLEND_MODES = ("constant", "gaussian")
#: the overlap of a patch-trained model's windows: a step of half a patch (nnU-Net's tile_step_size 0.5)
PATCH_OVERLAP = 0.5


def triple(value, name: str) -> tuple[int, int, int]:
    """``value`` as three positive integers (Z, Y, X); one :class:`UserError` naming ``name`` otherwise."""
    values = [value] * 3 if np.isscalar(value) else list(value)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise UserError(f"{name}={value!r} must be a positive integer or three of them (Z, Y, X)")
    return tuple(int(v) for v in values)


def check_window_options(volume_shape, roi, overlap, mode, sigma_scale, batch_windows):
    """The roi as three ints, after checking every option against ``volume_shape``."""
    roi = triple(roi, "roi")
    if not isinstance(overlap, (int, float)) or isinstance(overlap, bool) or not 0 <= overlap < 1:
        raise UserError(
            f"overlap={overlap!r} must be >= 0 and < 1 (the fraction of a window shared "
            "with its neighbour, e.g. 0.25 or 0.5)"
        )
    for r, s, axis in zip(roi, volume_shape, "ZYX"):
        if r > s:
            raise UserError(
                f"roi {roi} is larger than the volume {tuple(volume_shape)} along {axis}; "
                f"use a roi of at most {tuple(volume_shape)} (or pad the volume)"
            )
    if mode not in BLEND_MODES:
        raise UserError(f"blending mode {mode!r} is unknown; use one of {BLEND_MODES}")
    if not sigma_scale > 0:
        raise UserError(f"sigma_scale={sigma_scale!r} must be > 0 (MONAI's default is 0.125)")
    if isinstance(batch_windows, bool) or not isinstance(batch_windows, int) or batch_windows < 1:
        raise UserError(f"batch_windows={batch_windows!r} must be an integer >= 1")
    return roi


def scan_interval(volume_shape: Sequence[int], roi: Sequence[int], overlap: float) -> tuple[int, ...]:
    """Step between window starts: ``int(roi * (1 - overlap))`` (at least 1), or the roi
    itself where it covers the axis (MONAI's ``_get_scan_interval``)."""
    out = []
    for s, r in zip(volume_shape, roi):
        out.append(r if r == s else max(int(r * (1 - overlap)), 1))
    return tuple(out)


def window_starts(volume_shape: Sequence[int], roi: Sequence[int], overlap: float) -> list[tuple[int, int, int]]:
    """Window corners in MONAI's order (``dense_patch_slices``: z slowest); the last
    window on each axis is shifted back to end at the volume's face."""
    per_axis = []
    for s, r, step in zip(volume_shape, roi, scan_interval(volume_shape, roi, overlap)):
        count = next((d for d in range(math.ceil(s / step)) if d * step + r >= s), 0) + 1
        per_axis.append([i * step - max(i * step + r - s, 0) for i in range(count)])
    return list(itertools.product(*per_axis))


def importance_map(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """(Z, Y, X) float32 blending weights of one window (MONAI's ``compute_importance_map``
    followed by its clamp at ``max(min, 1e-3)``)."""
    roi = triple(roi, "roi")
    if mode == "constant":
        weights = np.ones(roi, np.float32)
    elif mode == "gaussian":
        axes = []
        for r in roi:
            x = np.arange(-(r - 1) / 2.0, (r - 1) / 2.0 + 1, dtype=np.float32)
            axes.append(np.exp(x**2 / np.float32(-2 * (r * sigma_scale) ** 2)).astype(np.float32))
        weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    else:
        raise UserError(f"blending mode {mode!r} is unknown; use one of {BLEND_MODES}")
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def blend_windows(x: np.ndarray, roi, predict, *, overlap: float, mode: str = "gaussian",
                  sigma_scale: float = 0.125, batch_windows: int = 1):  # fmt: skip
    """Blend ``predict(windows f32[b, rz, ry, rx, c]) -> f32[b, rz, ry, rx, k]`` over the
    batch ``x`` f32[n, z, y, x, c]: ``(logits f32[n, z, y, x, k], windows per volume, seconds)``."""
    shape = x.shape[1:4]
    roi = check_window_options(shape, roi, overlap, mode, sigma_scale, batch_windows)
    weights = importance_map(roi, mode, sigma_scale)[..., None]  # f32[rz, ry, rx, 1]
    starts = window_starts(shape, roi, overlap)
    jobs = [(n, s) for n in range(x.shape[0]) for s in starts]
    out = None
    count = np.zeros((*shape, 1), np.float32)
    t0 = time.perf_counter()
    for first in range(0, len(jobs), batch_windows):
        chunk = jobs[first : first + batch_windows]
        boxes = [(n, tuple(slice(a, a + r) for a, r in zip(s, roi))) for n, s in chunk]
        windows = np.stack([x[(n, *box)] for n, box in boxes])
        logits = np.asarray(predict(windows), np.float32)
        if out is None:
            out = np.zeros((x.shape[0], *shape, logits.shape[-1]), np.float32)
        for (n, box), y in zip(boxes, logits):
            out[(n, *box)] += weights * y
            if n == 0:
                count[box] += weights
    out /= count
    return out, len(starts), time.perf_counter() - t0


_PREDICTORS: dict = {}


def window_predictor(model, roi, batch_windows: int = 1):
    """``predict(windows f32[b, z, y, x, c]) -> logits f32[b, z, y, x, k]`` of ``model`` on
    one device (the reference run), compiled once per model config, roi and batch (a short
    last batch is zero-filled): the paper U-Net (:func:`~workbench.execute.run.compile_forward`)
    or an nnU-Net network (its full-resolution head)."""
    import jax

    roi = triple(roi, "roi")
    if getattr(model, "spec", None) is not None:
        from workbench.execute.nnunet import apply_nnunet

        def predict_nnunet(windows: np.ndarray) -> np.ndarray:
            return np.asarray(apply_nnunet(model, np.asarray(windows, np.float32), None, backend="reference"))

        return predict_nnunet

    from workbench.execute.run import compile_forward
    from workbench.mesh import MeshSpec, ShardLayout

    config = model.config
    layout = ShardLayout(roi, MeshSpec(), multiple=config.multiple)
    key = (config, roi, batch_windows)
    if key not in _PREDICTORS:
        if len(_PREDICTORS) >= 8:
            _PREDICTORS.clear()
        _PREDICTORS[key] = compile_forward(config, layout, backend="reference", batch=batch_windows)
    compiled = _PREDICTORS[key]
    variables = jax.device_put(model.variables, compiled.variables_sharding)
    pad = [(0, 0)] + [(0, t - s) for t, s in zip(layout.reference_shape, roi)] + [(0, 0)]

    def predict(windows: np.ndarray) -> np.ndarray:
        n = windows.shape[0]
        x = np.pad(windows, pad)
        if n < batch_windows:
            x = np.concatenate([x, np.zeros((batch_windows - n, *x.shape[1:]), x.dtype)])
        y = np.asarray(compiled.fn(variables, jax.device_put(x, compiled.input_sharding)))
        return layout.crop(y)[:n]

    return predict


def patch_logits(model, image, patch, *, batch_windows: int = 1) -> np.ndarray:
    """(Z, Y, X, K) logits of a patch-trained ``model`` on one case's ``image`` ((Z, Y, X)
    or (Z, Y, X, C)): windows of ``patch`` at a step of half a patch (:data:`PATCH_OVERLAP`),
    blended with Gaussian weights; axes shorter than the patch are zero-padded to it first."""
    from workbench.execute.run import as_batch

    patch = triple(patch, "patch")
    spec = getattr(model, "spec", None)
    channels = spec.in_channels if spec is not None else model.config.in_channels
    array = np.asarray(image, np.float32)
    x = as_batch(array if array.ndim == 3 else array[None], channels)  # f32[1, z, y, x, c]
    shape = x.shape[1:4]
    padded = tuple(max(s, p) for s, p in zip(shape, patch))
    if padded != shape:
        x = np.pad(x, [(0, 0), *((0, t - s) for t, s in zip(padded, shape)), (0, 0)])
    predict = window_predictor(model, patch, batch_windows)
    out, _, _ = blend_windows(x, patch, predict, overlap=PATCH_OVERLAP, mode="gaussian", batch_windows=batch_windows)
    return out[0, : shape[0], : shape[1], : shape[2]]
