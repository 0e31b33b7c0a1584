"""What the notebook viewer shows, as plain numpy: channels, colours, shards, slices.

A :class:`Scene` is built from the same pieces as the napari layers
(:mod:`workbench.ui.napari.layers`): the image's contrast limits from the same strided
percentiles, one colour per shard from :func:`~workbench.ui.napari.layers.shard_colors`,
the halo band from :func:`~workbench.ui.napari.volumes.halo_band`, the shard boxes from
the :class:`~workbench.mesh.ShardLayout` and the per-shard errors of
:func:`~workbench.analysis.compare.shard_stats` (or the comparison's own rows), so the
viewer and napari agree on every overlay.

Nothing is copied whole: arrays may be memory-mapped, and :meth:`Scene.slice` reads one
2D slice of one channel and quantises it to ``uint8`` for the browser (image: its contrast
window; signed error: ``±limit`` onto 1..255 with 128 = 0; labels and the halo band: their
values). The browser colours them with the look-up tables in :meth:`Scene.manifest`.

Example
-------
>>> import numpy as np
>>> from workbench.mesh import ShardLayout
>>> scene = Scene(ShardLayout((32, 32, 32), "2x2x2"), image=np.zeros((32, 32, 32), np.float32))
>>> [c.name for c in scene.channels], len(scene.shards), scene.slice("image", 0, 16).shape
(['image'], 8, (32, 32))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from workbench.errors import UserError
from workbench.mesh import ShardLayout
from workbench.ui.napari.layers import shard_colors
from workbench.ui.napari.volumes import _check_volume, _percentile_limits, _spacing, halo_band

__all__ = ["Channel", "Scene", "AXES", "CLASS_COLORS", "quantise_error", "quantise_image"]

AXES = ("z", "y", "x")
# Classes 1, 2, ... (0 is background, transparent); muted so that no blend equals a shard colour.
CLASS_COLORS = ((0.12, 0.47, 0.71), (0.17, 0.63, 0.17), (0.58, 0.40, 0.74), (0.55, 0.34, 0.29),
                (0.89, 0.47, 0.76), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81), (0.50, 0.50, 0.50))  # fmt: skip
_STAT_KEYS = ("max_abs_diff", "mean_abs_diff", "rms_diff", "voxels_over_tolerance")


@dataclass
class Channel:
    """One quantised volume the browser composes: ``image``, ``labels``, ``error`` or ``band``."""

    name: str
    label: str
    kind: str
    read: Callable[[int, int], np.ndarray]  # (axis, index) -> 2D uint8
    lut: np.ndarray  # (256, 4) uint8 RGBA per stored value
    visible: bool = True
    opacity: float = 1.0
    limits: tuple[float, float] | None = None  # what 0 and 255 (image) or ±127 (error) stand for
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "label": self.label, "kind": self.kind, "visible": self.visible,
                "opacity": self.opacity, "limits": None if self.limits is None else list(self.limits),
                "lut": self.lut.ravel().tolist(), **self.extra}  # fmt: skip


def quantise_image(plane, limits) -> np.ndarray:
    """``uint8`` of ``plane`` in the window ``limits`` (0 at or below, 255 at or above)."""
    lo, hi = limits
    scaled = (np.asarray(plane, np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def quantise_error(plane, limit: float) -> np.ndarray:
    """Signed error onto ``uint8``: 128 is 0, 1 is ``-limit`` (or less), 255 is ``+limit``."""
    scaled = np.asarray(plane, np.float32) * np.float32(127.0 / limit)
    return (np.clip(np.rint(scaled), -127, 127) + 128).astype(np.uint8)


def _plane(array, axis: int, index: int) -> np.ndarray:
    return np.asarray(array[(slice(None),) * axis + (index,)])


def _ramp_lut(colormap: str, alpha: np.ndarray | None = None) -> np.ndarray:
    from matplotlib import colormaps

    name = colormap if colormap in colormaps else {"berlin": "RdBu_r"}.get(colormap, "gray")
    rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
    if alpha is not None:
        rgba[:, 3] = alpha
    return np.rint(rgba * 255).astype(np.uint8)


def _palette_lut(colors: Sequence, *, first: int = 1) -> np.ndarray:
    """Value ``first + i`` → ``colors[i % len(colors)]``; everything below ``first`` transparent."""
    lut = np.zeros((256, 4), np.uint8)
    rgb = np.asarray(colors, np.float64)[:, :3]
    for value in range(first, 256):
        lut[value, :3] = np.rint(rgb[(value - first) % len(rgb)] * 255)
        lut[value, 3] = 255
    return lut


def _input_channels(image, channel_names) -> list:
    """(channel name, (Z, Y, X) array) of each input channel: ``image`` alone, or ``image: NAME``
    per channel of a (Z, Y, X, C) image."""
    if image is None:
        return []
    if np.ndim(image) != 4:
        return [("image", image)]
    names = list(channel_names or [str(c) for c in range(image.shape[-1])])
    if len(names) != image.shape[-1]:
        raise UserError(f"the image has {image.shape[-1]} channels but {len(names)} channel names {names}")
    return [(f"image: {n}", image[..., c]) for c, n in enumerate(names)]


class Scene:
    """Channels, shard boxes and colours of one partitioned run (see the module docstring).

    Parameters
    ----------
    layout : ShardLayout
    spacing : (dz, dy, dx) in mm
    image, prediction, ground_truth, reference_prediction : (Z, Y, X) arrays, optional
        (``image`` may be (Z, Y, X, C): one image channel per input channel, ``image: NAME``
        by ``channel_names``, each with its own contrast; the browser shows one at a time)
    signed : (Z, Y, X) partitioned − reference, optional (the error channel)
    stats : per-shard rows of :func:`~workbench.analysis.compare.shard_stats` of ``signed``
        (the comparison's or the report's); computed when ``signed`` is given without them
    halo_width : voxels each shard receives per face at level 0 (0: no halo band channel)
    regions : (name, label values) of nnU-Net's region outputs: one hidden labels channel per
        region, ``region: NAME``, of ``isin(prediction, values)`` (each its own colour)
    class_names, channel_names, title, tolerance
    """

    def __init__(
        self,
        layout: ShardLayout,
        *,
        spacing=(1.0, 1.0, 1.0),
        image=None,
        prediction=None,
        ground_truth=None,
        reference_prediction=None,
        signed=None,
        stats: Sequence[dict] | None = None,
        halo_width: int = 0,
        class_names: Sequence[str] | None = None,
        title: str = "",
        tolerance: float = 1e-5,
        channel_names: Sequence[str] | None = None,
        regions: Sequence[tuple[str, Sequence[int]]] | None = None,
    ):
        self.layout = layout
        self.shape = tuple(int(s) for s in layout.volume_shape)
        self.spacing = _spacing(spacing)
        self.class_names = list(class_names or [])
        self.title = title
        self.tolerance = float(tolerance)
        self.halo_width = int(halo_width)
        inputs = _input_channels(image, channel_names)
        arrays = {**dict(inputs), "prediction": prediction, "ground truth": ground_truth,
                  "reference prediction": reference_prediction, "error map": signed}  # fmt: skip
        for what, array in arrays.items():
            if array is not None:
                _check_volume(array, what, self.shape)
        if signed is not None and stats is None:
            from workbench.analysis.compare import shard_stats

            stats = shard_stats(signed, layout, tolerance=tolerance)
        self.stats = None if stats is None else [dict(row) for row in stats]
        n_shards = len(layout.shards())
        self.colors = shard_colors(n_shards)
        self.channels: list[Channel] = []
        for k, (name, channel) in enumerate(inputs):  # several: the browser shows the one ticked
            limits = tuple(_percentile_limits(channel))
            if k == 0:
                self.image_limits = limits
            self._add(name, name, "image", self._image_reader(channel, limits), _ramp_lut("gray"), limits=limits,
                      visible=k == 0)  # fmt: skip
        classes = _palette_lut(CLASS_COLORS)
        for name, array, visible, opacity, style in (
            ("ground truth", ground_truth, True, 0.9, "contour"),
            ("reference prediction", reference_prediction, False, 0.45, "fill"),
            ("prediction", prediction, True, 0.45, "fill"),
        ):
            if array is not None:
                if not np.issubdtype(array.dtype, np.integer):
                    raise UserError(f"{name} has dtype {array.dtype}, expected integer labels; use argmax(-1)")
                self._add(name, name, "labels", self._labels_reader(array), classes, visible=visible,
                          opacity=opacity, style=style)  # fmt: skip
        for r, (name, values) in enumerate(regions or () if prediction is not None else ()):
            lut = np.zeros((256, 4), np.uint8)
            lut[1, :3], lut[1, 3] = np.rint(np.asarray(CLASS_COLORS[r % len(CLASS_COLORS)]) * 255), 255
            self._add(f"region: {name}", f"region {name} ({', '.join(map(str, values))})", "labels",
                      self._region_reader(prediction, values), lut, visible=False, opacity=0.45, style="fill",
                      region=[int(v) for v in values])  # fmt: skip
        self.error_limit = None
        if signed is not None:
            worst = self.max_abs_diff or 0.0
            self.error_limit = max(worst, self.tolerance, 1e-12)  # rounding noise stays dim (as in napari)
            ramp = np.abs(np.arange(256) - 128.0).clip(0, 127) / 127.0
            signed_lut = _ramp_lut("berlin", ramp)
            abs_lut = _ramp_lut("magma")[np.clip(2 * np.abs(np.arange(256) - 128), 0, 255)]
            abs_lut[:, 3] = np.rint(ramp * 255)
            self._add("error", "error (partitioned − reference)", "error",
                      lambda a, i: quantise_error(_plane(signed, a, i), self.error_limit), signed_lut,
                      opacity=0.9, limits=(-self.error_limit, self.error_limit),
                      abs_lut=abs_lut.ravel().tolist(), mode="abs")  # fmt: skip
        if self.halo_width > 0:
            if n_shards > 255:
                raise UserError(f"the halo band shows at most 255 shards; mesh {layout.mesh} has {n_shards}")
            band_lut = _palette_lut(self.colors)
            band_lut[n_shards + 1 :] = 0
            self._add("halo band", f"halo band ({self.halo_width} voxel{'s' if self.halo_width > 1 else ''})", "band", self._band_reader, band_lut,
                      visible=False, opacity=0.4, width=self.halo_width)  # fmt: skip
        if not self.channels:
            raise UserError("nothing to show: give at least an image, a prediction or an error map")

    # -- building ----------------------------------------------------------------------------
    def _add(self, name, label, kind, read, lut, *, visible=True, opacity=1.0, limits=None, **extra):
        self.channels.append(Channel(name, label, kind, read, lut, visible, opacity, limits, extra))

    @staticmethod
    def _image_reader(array, limits):
        return lambda axis, index: quantise_image(_plane(array, axis, index), limits)

    @staticmethod
    def _region_reader(prediction, values):
        values = [int(v) for v in values]
        return lambda axis, index: np.isin(_plane(prediction, axis, index), values).astype(np.uint8)

    @staticmethod
    def _labels_reader(array):
        def read(axis, index):
            return np.clip(_plane(array, axis, index), 0, 255).astype(np.uint8)

        return read

    def _band_reader(self, axis: int, index: int) -> np.ndarray:
        box = [(0, s) for s in self.shape]
        box[axis] = (index, index + 1)
        band = halo_band(self.layout, self.halo_width, box=tuple(box))
        return np.asarray(band[(slice(None),) * axis + (0,)], np.uint8)

    # -- what the browser gets ---------------------------------------------------------------
    @property
    def max_abs_diff(self) -> float | None:
        values = [r["max_abs_diff"] for r in self.stats or [] if r.get("max_abs_diff") is not None]
        return max(values) if values else None

    def channel(self, name: str) -> Channel:
        for c in self.channels:
            if c.name == name:
                return c
        raise UserError(f"no channel {name!r}; this viewer has {', '.join(c.name for c in self.channels)}")

    @property
    def shards(self) -> list[dict]:
        """One row per shard: ``index``, ``coords``, ``box`` (its valid voxels), ``color``
        (``#rrggbb``), ``rgb`` (0–255), ``empty`` and, with an error map, its statistics."""
        by_index = {r["index"]: r for r in self.stats or []}
        rows = []
        for shard in self.layout.shards():
            rgb = [int(v) for v in np.rint(self.colors[shard.index, :3] * 255)]
            row = {"index": shard.index, "coords": list(shard.coords), "box": [list(b) for b in shard.valid_box],
                   "color": "#{:02x}{:02x}{:02x}".format(*rgb), "rgb": rgb, "empty": bool(shard.is_empty)}  # fmt: skip
            if shard.index in by_index:
                row.update({k: by_index[shard.index].get(k) for k in _STAT_KEYS})
            rows.append(row)
        return rows

    def slice(self, name: str, axis: int, index: int) -> np.ndarray:
        """Channel ``name`` at ``index`` along ``axis`` (0 = z, 1 = y, 2 = x), ``uint8``, C order."""
        if axis not in (0, 1, 2):
            raise UserError(f"axis {axis!r} must be 0 (z), 1 (y) or 2 (x)")
        if not 0 <= index < self.shape[axis]:
            raise UserError(f"{AXES[axis]} = {index} is outside the volume (0..{self.shape[axis] - 1})")
        return np.ascontiguousarray(self.channel(name).read(axis, index), np.uint8)

    def manifest(self) -> dict:
        """Everything but the pixels, JSON-able: shape, spacing, channels with their look-up
        tables, shards with colours and errors, the class names and the error limit."""
        return {"shape": list(self.shape), "spacing": list(self.spacing), "title": self.title,
                "channels": [c.describe() for c in self.channels], "shards": self.shards,
                "mesh": self.layout.mesh.as_dict(), "class_names": self.class_names,
                "error_limit": self.error_limit, "tolerance": self.tolerance,
                "max_abs_diff": self.max_abs_diff, "class_colors": [list(c) for c in CLASS_COLORS]}  # fmt: skip

    def summary(self) -> str:
        """One deterministic line (what the notebooks check)."""
        shape = "×".join(map(str, self.shape))
        names = ", ".join(c.name for c in self.channels)
        return f"viewer: {shape} voxels, mesh {self.layout.mesh}, {len(self.layout.shards())} shards; {names}"
