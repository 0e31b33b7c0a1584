"""The sliding-window peer: patch-based inference with the same weights.

This is how MONAI (``monai.inferers.sliding_window_inference``) and nnU-Net run a
network on a volume too big for it: cut overlapping ROI windows, run each alone
(with the network's own zero padding at the window faces), and blend the window
predictions with constant or Gaussian weights. Window positions, the Gaussian
importance map (``sigma = sigma_scale * roi``, clamped below at
``max(min, 1e-3)``) and the blending follow MONAI exactly, so the two agree to
float32 rounding; :func:`monai_sliding_window` runs MONAI's own implementation with
our JAX model wrapped as its predictor (needs the ``bench`` extra: torch, monai).

Unlike exact partitioned inference, windows see a truncated receptive field, so
their blend differs from the reference near every window face.

Example
-------
>>> model = Model.init("small")
>>> volume = np.random.rand(96, 96, 96).astype(np.float32)
>>> result = sliding_window(model, volume, roi=64, overlap=0.25, mode="gaussian")
>>> result.output.shape, result.windows
((96, 96, 96, 3), 8)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError

__all__ = [
    "BLEND_MODES",
    "SlidingWindowResult",
    "scan_interval",
    "window_starts",
    "importance_map",
    "sliding_window",
    "monai_predictor",
    "monai_sliding_window",
]

BLEND_MODES = ("constant", "gaussian")


@dataclass
class SlidingWindowResult:
    """Blended logits ((Z, Y, X, K) or (N, Z, Y, X, K)) and what the run cost."""

    output: np.ndarray
    seconds: float
    windows: int
    roi: tuple[int, int, int]
    interval: tuple[int, int, int]
    voxels_computed: int


def _triple(value, name: str) -> tuple[int, int, int]:
    values = [value] * 3 if np.isscalar(value) else list(value)
    if len(values) != 3 or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise UserError(f"{name}={value!r} must be a positive integer or three of them (Z, Y, X)")
    return tuple(int(v) for v in values)


def _check(volume_shape, roi, overlap, mode, sigma_scale, batch_windows):
    roi = _triple(roi, "roi")
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
    roi = _triple(roi, "roi")
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


def _window_predictor(model, roi, batch_windows: int):
    """``predict(windows f32[b, z, y, x, c]) -> logits f32[b, z, y, x, k]`` on one device,
    compiled once for ``batch_windows`` (a short last batch is zero-filled)."""
    import jax

    from workbench.execute.run import compile_forward
    from workbench.mesh import MeshSpec, ShardLayout

    config = model.config
    layout = ShardLayout(roi, MeshSpec(), multiple=config.multiple)
    compiled = compile_forward(config, layout, backend="reference", batch=batch_windows)
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


def sliding_window(
    model,
    volume,
    *,
    roi=64,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    batch_windows: int = 1,
    predictor=None,
) -> SlidingWindowResult:
    """Blend ROI-window predictions of ``model`` over ``volume``, as MONAI does.

    Parameters
    ----------
    model
        a :class:`~workbench.model.unet.Model` (run unpartitioned on one device per window).
    volume
        (Z, Y, X) or (N, Z, Y, X, C) array.
    roi
        window size, one int or (Z, Y, X); must fit in the volume.
    overlap
        fraction of a window shared with the next one, in [0, 1).
    mode, sigma_scale
        ``constant`` or ``gaussian`` blending; Gaussian sigma is ``sigma_scale * roi``.
    batch_windows
        windows per model call (MONAI's ``sw_batch_size``).
    predictor
        optional ``f(windows f32[b,z,y,x,c]) -> f32[b,z,y,x,k]`` to reuse a compiled one.
    """
    from workbench.execute.run import as_batch

    squeeze = np.ndim(volume) == 3
    x = as_batch(volume, model.config.in_channels)  # f32[n, z, y, x, c]
    shape = x.shape[1:4]
    roi = _check(shape, roi, overlap, mode, sigma_scale, batch_windows)
    predict = predictor or _window_predictor(model, roi, batch_windows)
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
    seconds = time.perf_counter() - t0
    return SlidingWindowResult(
        output=out[0] if squeeze else out,
        seconds=seconds,
        windows=len(starts),
        roi=roi,
        interval=scan_interval(shape, roi, overlap),
        voxels_computed=len(jobs) * math.prod(roi),
    )


def monai_predictor(model, roi, batch_windows: int = 1, predictor=None):
    """Our JAX model as a MONAI predictor: torch (B, C, Z, Y, X) -> torch (B, K, Z, Y, X)."""
    import torch

    predict = predictor or _window_predictor(model, _triple(roi, "roi"), batch_windows)

    def torch_predict(windows):
        x = windows.detach().cpu().numpy().transpose(0, 2, 3, 4, 1)  # channels last
        y = predict(np.ascontiguousarray(x, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(y.transpose(0, 4, 1, 2, 3)))

    return torch_predict


def monai_sliding_window(
    model,
    volume,
    *,
    roi=64,
    overlap: float = 0.25,
    mode: str = "gaussian",
    sigma_scale: float = 0.125,
    batch_windows: int = 1,
    predictor=None,
) -> SlidingWindowResult:
    """MONAI's own ``sliding_window_inference`` with our model as the predictor.

    Raises ``ModuleNotFoundError`` naming the ``bench`` extra when torch/monai are missing.
    """
    try:
        import torch
        from monai.inferers import sliding_window_inference
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{err.name} is not installed; install the bench extra: pip install -e '.[bench]'"
        ) from err
    from workbench.execute.run import as_batch

    squeeze = np.ndim(volume) == 3
    x = as_batch(volume, model.config.in_channels)
    roi = _check(x.shape[1:4], roi, overlap, mode, sigma_scale, batch_windows)
    torch_predict = monai_predictor(model, roi, batch_windows, predictor)
    inputs = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))
    t0 = time.perf_counter()
    with torch.no_grad():
        y = sliding_window_inference(
            inputs, roi, batch_windows, torch_predict, overlap=overlap, mode=mode, sigma_scale=sigma_scale
        )
    seconds = time.perf_counter() - t0
    out = np.asarray(y).transpose(0, 2, 3, 4, 1)
    starts = window_starts(x.shape[1:4], roi, overlap)
    return SlidingWindowResult(
        output=out[0] if squeeze else out,
        seconds=seconds,
        windows=len(starts),
        roi=roi,
        interval=scan_interval(x.shape[1:4], roi, overlap),
        voxels_computed=len(starts) * x.shape[0] * math.prod(roi),
    )
