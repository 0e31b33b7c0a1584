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

import math
import time
from dataclasses import dataclass

import numpy as np

from workbench.execute.windows import (
    BLEND_MODES,
    blend_windows,
    importance_map,
    scan_interval,
    window_predictor,
    window_starts,
)
from workbench.execute.windows import check_window_options as _check
from workbench.execute.windows import triple as _triple

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


@dataclass
class SlidingWindowResult:
    """Blended logits ((Z, Y, X, K) or (N, Z, Y, X, K)) and what the run cost."""

    output: np.ndarray
    seconds: float
    windows: int
    roi: tuple[int, int, int]
    interval: tuple[int, int, int]
    voxels_computed: int


def _window_predictor(model, roi, batch_windows: int):
    """:func:`workbench.execute.windows.window_predictor` (kept under its old name)."""
    return window_predictor(model, roi, batch_windows)


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
    out, windows, seconds = blend_windows(x, roi, predict, overlap=overlap, mode=mode, sigma_scale=sigma_scale,
                                          batch_windows=batch_windows)  # fmt: skip
    return SlidingWindowResult(
        output=out[0] if squeeze else out,
        seconds=seconds,
        windows=windows,
        roi=roi,
        interval=scan_interval(shape, roi, overlap),
        voxels_computed=x.shape[0] * windows * math.prod(roi),
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
