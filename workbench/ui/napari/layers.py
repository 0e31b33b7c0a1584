"""napari layers for a partitioned run: image, predictions, shard boundaries, halo bands, errors.

No Qt or napari import at module level: every builder is a pure function returning a
napari *layer data tuple* ``(data, kwargs, layer_type)``, so they run and test headless.
Add one to a viewer with ``viewer.add_layer(napari.layers.Layer.create(*t))`` (what
:func:`add_layers` does) or return a list of them from a plugin reader.

Geometry: voxel ``(z, y, x)`` is centred at ``(z, y, x) * spacing`` in world mm (napari's
``scale``), so a shard holding voxels ``[lo, hi)`` along an axis has its faces at
``lo - 0.5`` and ``hi - 0.5`` (data units).

Large volumes (more than :data:`LARGE_VOXELS` voxels) are never copied whole: images and
labels become multiscale pyramids of strided *views*, computed maps (shard ids, halo
bands, |error|) are lazy dask arrays evaluated slice by slice (:mod:`~workbench.ui.napari.volumes`).

Example
-------
>>> from workbench.mesh import ShardLayout
>>> layout = ShardLayout((32, 32, 32), "2x2x2")
>>> data, kwargs, kind = boundary_layer(layout)
>>> kind, len(data), data[0].shape, kwargs["features"]["label"][7]
('shapes', 8, (16, 3), '7 (z1 y1 x1)')
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.analysis.compare import seam_profile, shard_stats
from workbench.errors import UserError
from workbench.mesh import ShardLayout
from workbench.ui.napari.volumes import (
    _SLAB_VOXELS,
    LARGE_VOXELS,
    _check_volume,
    _computed_volume,
    _is_large,
    _maybe_multiscale,
    _percentile_limits,
    _pyramid,
    _spacing,
    halo_band,
)

__all__ = [
    "LARGE_VOXELS",
    "shard_colors",
    "image_layer",
    "labels_layer",
    "probability_layers",
    "boundary_layer",
    "boundary_segments",
    "contour_layer",
    "halo_band",
    "halo_band_layer",
    "error_layers",
    "build_layers",
    "inference_layers",
    "result_layers",
]

# Cube corners as (z, y, x) bits, in an order that walks all 12 edges as one path
# (three edges are walked twice: a cube has 8 odd-degree corners, so no Euler path).
_CUBE_PATH = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (0, 0, 0), (1, 0, 0), (1, 0, 1),
              (1, 1, 1), (1, 1, 0), (1, 0, 0), (1, 0, 1), (0, 0, 1), (0, 1, 1), (1, 1, 1),
              (1, 1, 0), (0, 1, 0)]  # fmt: skip
_CUBE_EDGES = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]

LayerData = tuple  # (data, kwargs, layer_type)


# -- small helpers ----------------------------------------------------------------------
def shard_colors(n: int) -> np.ndarray:
    """``(n, 4)`` RGBA, one saturated colour per shard (golden-ratio hues: neighbours differ)."""
    hues = (np.arange(n) * 0.6180339887) % 1.0
    return np.array([(*colorsys.hsv_to_rgb(h, 0.85, 1.0), 1.0) for h in hues], np.float32)


def _lists(profile: dict) -> dict:
    """A seam profile with plain lists (layer metadata is shown and saved as JSON)."""
    return {k: np.asarray(v).tolist() for k, v in profile.items()}


def _shard_label(shard) -> str:
    cz, cy, cx = shard.coords
    return f"{shard.index} (z{cz} y{cy} x{cx})"


# -- image and labels -------------------------------------------------------------------
def image_layer(
    image, *, spacing=(1.0, 1.0, 1.0), name: str = "image", percentiles=(0.5, 99.5), colormap: str = "gray"
) -> LayerData:
    """The intensity volume with voxel ``scale`` and contrast from its percentiles.

    Contrast limits come from a strided sample (about 2M voxels), so a 512³ volume is
    not copied; large volumes become a multiscale pyramid of strided views.
    """
    _check_volume(image, name)
    kwargs = dict(
        name=name,
        scale=_spacing(spacing),
        colormap=colormap,
        rendering="mip",
        contrast_limits=_percentile_limits(image, percentiles),
        metadata={"spacing": _spacing(spacing), "contrast_percentiles": list(percentiles)},
    )
    return _maybe_multiscale(image, kwargs), kwargs, "image"


def labels_layer(
    labels,
    *,
    spacing=(1.0, 1.0, 1.0),
    name: str = "prediction",
    class_names: Sequence[str] | None = None,
    opacity: float = 0.5,
) -> LayerData:
    """An integer label map as a Labels layer; ``features`` name the classes."""
    _check_volume(labels, name)
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{name} has dtype {labels.dtype}, expected integers; use argmax(-1) of the logits")
    kwargs: dict[str, Any] = dict(
        name=name, scale=_spacing(spacing), opacity=opacity, metadata={"class_names": list(class_names or [])}
    )
    if class_names:
        kwargs["features"] = {"index": list(range(len(class_names))), "class": list(class_names)}
    return _maybe_multiscale(labels, kwargs), kwargs, "labels"


def probability_layers(
    logits, *, spacing=(1.0, 1.0, 1.0), class_names: Sequence[str] | None = None, skip_background: bool = True
) -> list[LayerData]:
    """Softmax of ``(Z, Y, X, K)`` logits, one hidden additive Image layer per class."""
    if np.ndim(logits) != 4:
        raise UserError(f"logits have shape {np.shape(logits)}, expected (Z, Y, X, K)")
    if _is_large(logits.shape[:3]):  # lazy softmax, slab by slab: no (Z, Y, X, K) copy
        import dask.array as da

        rows = max(1, _SLAB_VOXELS // int(np.prod(logits.shape[1:])))
        probs = da.from_array(logits, chunks=(rows, -1, -1, -1)).map_blocks(_softmax, dtype=np.float32)
    else:
        probs = _softmax(logits)
    names = list(class_names or [f"class {k}" for k in range(logits.shape[-1])])
    colormaps = ["magenta", "green", "cyan", "yellow", "red", "blue"]
    layers = []
    for k in range(1 if skip_background else 0, logits.shape[-1]):
        kwargs = dict(
            name=f"p({names[k]})",
            scale=_spacing(spacing),
            contrast_limits=[0.0, 1.0],
            colormap=colormaps[k % len(colormaps)],
            blending="additive",
            visible=False,
            metadata={"class": names[k], "class_index": k},
        )
        layers.append((_maybe_multiscale(probs[..., k], kwargs), kwargs, "image"))
    return layers


def _softmax(logits) -> np.ndarray:
    block = np.asarray(logits, np.float32)
    block = np.exp(block - block.max(-1, keepdims=True))
    return block / block.sum(-1, keepdims=True)


# -- shard boundaries -------------------------------------------------------------------
def _box_corners(valid_box) -> np.ndarray:
    """(8, 3) corners of a voxel box on voxel faces, indexed by (z, y, x) bits."""
    lo = np.array([b[0] for b in valid_box], np.float64) - 0.5
    hi = np.array([b[1] for b in valid_box], np.float64) - 0.5
    return np.array([[(hi if bit else lo)[axis] for axis, bit in enumerate(bits)]
                     for bits in ((i >> 2 & 1, i >> 1 & 1, i & 1) for i in range(8))])  # fmt: skip


def boundary_segments(layout: ShardLayout) -> dict[int, np.ndarray]:
    """Per non-empty shard: its 12 box edges, ``(12, 2, 3)`` in data (voxel) coordinates."""
    out = {}
    for shard in layout.shards():
        if not shard.is_empty:
            corners = _box_corners(shard.valid_box)
            out[shard.index] = np.array([[corners[a], corners[b]] for a, b in _CUBE_EDGES])
    return out


def boundary_layer(
    layout: ShardLayout,
    *,
    spacing=(1.0, 1.0, 1.0),
    stats: Sequence[dict] | None = None,
    name: str = "shard boundaries",
    edge_width: float | None = None,
) -> LayerData:
    """3D wireframe of every shard's block: one ``path`` shape and one colour per shard.

    ``features`` has one row per drawn shard: ``index``, ``coord_z/y/x``, ``label`` (shown
    as text) and, with ``stats`` (see :func:`workbench.analysis.compare.shard_stats`), the error columns.
    Shards that hold only padding are not drawn; ``metadata["empty_shards"]`` lists them.
    """
    shards = [s for s in layout.shards() if not s.is_empty]
    colors = shard_colors(len(layout.shards()))
    corner_bits = [4 * z + 2 * y + x for z, y, x in _CUBE_PATH]
    paths = [_box_corners(s.valid_box)[corner_bits] for s in shards]
    features: dict[str, list] = {
        "index": [s.index for s in shards],
        "coord_z": [s.coords[0] for s in shards],
        "coord_y": [s.coords[1] for s in shards],
        "coord_x": [s.coords[2] for s in shards],
        "label": [_shard_label(s) for s in shards],
    }
    if stats is not None:
        by_index = {row["index"]: row for row in stats}
        for key in ("max_abs_diff", "mean_abs_diff", "voxels_over_tolerance"):
            features[key] = [by_index[s.index].get(key) for s in shards]
    if edge_width is None:
        edge_width = max(layout.volume_shape) / 160.0
    kwargs = dict(
        name=name,
        scale=_spacing(spacing),
        shape_type="path",
        edge_color=colors[[s.index for s in shards]],
        face_color=[0.0, 0.0, 0.0, 0.0],
        edge_width=float(edge_width),
        features=features,
        blending="translucent_no_depth",
        text={"string": "{label}", "color": "white", "size": 9, "visible": False},
        metadata={
            "mesh": layout.mesh.as_dict(),
            "volume_shape": list(layout.volume_shape),
            "padded_shape": list(layout.padded_shape),
            "block_shape": list(layout.block_shape),
            "empty_shards": [s.index for s in layout.shards() if s.is_empty],
            "spacing": _spacing(spacing),
        },
    )
    return paths, kwargs, "shapes"


def _label_colormap(n_shards: int) -> dict:
    colors = shard_colors(n_shards)
    out: dict = {None: [0.0, 0.0, 0.0, 0.0], 0: [0.0, 0.0, 0.0, 0.0]}
    out.update({i + 1: colors[i].tolist() for i in range(n_shards)})
    return out


def contour_layer(
    layout: ShardLayout, *, spacing=(1.0, 1.0, 1.0), name: str = "shard contours", contour: int = 1
) -> LayerData:
    """Labels of ``shard index + 1`` drawn as contours: shard outlines on every 2D slice.

    napari's ``contour`` is a layer property, not a constructor argument, so it travels
    in ``metadata["contour"]``; :func:`add_layers` and the plugin reader apply it. The
    data is computed from the layout (lazily, slab by slab, for large volumes).
    """
    n = len(layout.shards())
    dtype = np.uint8 if n < 255 else np.uint16
    mz, my, mx = layout.mesh.spatial
    bz, by, bx = layout.block_shape

    def ids(zs, ys, xs):
        return ((zs // bz)[:, None, None] * (my * mx) + (ys // by)[None, :, None] * mx
                + (xs // bx)[None, None, :] + 1).astype(dtype)  # fmt: skip

    data = _computed_volume(layout.volume_shape, dtype, ids)
    kwargs = dict(name=name, scale=_spacing(spacing), opacity=0.8, colormap=_label_colormap(n),
                  features={"index": list(range(n + 1)), "shard": [-1] + list(range(n)),
                            "label": ["none"] + [_shard_label(s) for s in layout.shards()]},
                  metadata={"mesh": layout.mesh.as_dict(), "value": "shard index + 1", "contour": int(contour)})  # fmt: skip
    return _maybe_multiscale(data, kwargs), kwargs, "labels"


# -- halo bands -------------------------------------------------------------------------
def halo_band_layer(
    layout: ShardLayout,
    width: int,
    *,
    spacing=(1.0, 1.0, 1.0),
    shard: int | None = None,
    halo=None,
    name: str | None = None,
    opacity: float = 0.4,
) -> LayerData:
    """:func:`halo_band` as a translucent Labels layer in the shards' colours."""
    data = halo_band(layout, width, shard=shard)
    n = len(layout.shards())
    what = "received by each shard" if shard is None else f"received by shard {shard}"
    kwargs = dict(
        name=name or (f"halo band ({width} voxel{'s' if width > 1 else ''})" if shard is None
                      else f"halo shell of shard {shard}"),
        scale=_spacing(spacing), opacity=opacity, blending="translucent", colormap=_label_colormap(n),
        features={"index": list(range(n + 1)), "receiver": [-1] + list(range(n)),
                  "label": ["none"] + [_shard_label(s) for s in layout.shards()]},
        metadata={"width": int(width), "shard": shard, "halo": halo, "value": "receiving shard index + 1",
                  "what": f"level-0 voxels {what} from its neighbours; exact halos also send a "
                          "1-voxel shell per conv layer at every coarser level"},
    )  # fmt: skip
    return _maybe_multiscale(data, kwargs), kwargs, "labels"


# -- error maps -------------------------------------------------------------------------
def error_layers(
    signed,
    layout: ShardLayout,
    *,
    spacing=(1.0, 1.0, 1.0),
    tolerance: float = 1e-5,
    stats: Sequence[dict] | None = None,
) -> list[LayerData]:
    """Signed error (diverging, symmetric limits) and ``|error|`` (MIP in 3D) layers.

    Contrast limits come from the data: ``±max|Δ|`` and ``[0, max|Δ|]``, but never
    narrower than ``tolerance`` (rounding noise of an exact run stays dim). Both carry ``metadata`` with the per-shard statistics,
    the seam profile and ``max_abs_diff``.
    """
    _check_volume(signed, "error map", layout.volume_shape)
    stats = list(stats) if stats is not None else shard_stats(signed, layout, tolerance=tolerance)
    worst = max((r["max_abs_diff"] for r in stats if r["max_abs_diff"] is not None), default=0.0)
    limit = max(worst, tolerance, 1e-12)  # an exact run's rounding noise stays dim, not full scale
    metadata = {"max_abs_diff": worst, "tolerance": tolerance, "per_shard": stats,
                "seam_profile": _lists(seam_profile(signed, layout, max_distance=8)), "mesh": layout.mesh.as_dict(),
                "definition": "partitioned − reference (logits: at the class with the largest |Δ|)"}  # fmt: skip
    signed_kwargs = dict(name="error (partitioned − reference)", scale=_spacing(spacing),
                         colormap="berlin", contrast_limits=[-limit, limit], blending="additive",
                         visible=False, metadata=metadata)  # fmt: skip
    abs_kwargs = dict(name="|error|", scale=_spacing(spacing), colormap="magma",
                      contrast_limits=[0.0, limit], rendering="mip", blending="additive",
                      metadata=metadata)  # fmt: skip
    if _is_large(signed.shape):
        import dask.array as da

        abs_data = da.absolute(
            da.from_array(signed, chunks=(max(1, _SLAB_VOXELS // int(np.prod(signed.shape[1:]))), -1, -1))
        )
        abs_kwargs["multiscale"] = True
        abs_data = _pyramid(abs_data, reduce="max")  # max-pooled: thin seams survive
    else:
        abs_data = np.abs(signed)
    return [(_maybe_multiscale(signed, signed_kwargs), signed_kwargs, "image"), (abs_data, abs_kwargs, "image")]


# -- everything for one run -------------------------------------------------------------
def build_layers(
    layout: ShardLayout,
    *,
    spacing=(1.0, 1.0, 1.0),
    image=None,
    prediction=None,
    ground_truth=None,
    reference_prediction=None,
    logits=None,
    signed=None,
    halo=None,
    halo_band_width: int = 0,
    class_names: Sequence[str] | None = None,
    tolerance: float = 1e-5,
    stats: Sequence[dict] | None = None,
    channel_names: Sequence[str] | None = None,
    regions: Sequence[tuple[str, Sequence[int]]] | None = None,
) -> list[LayerData]:
    """All layers of one run, bottom to top: image (one layer per channel), ground truth,
    reference prediction, prediction, its regions, class probabilities, error maps, halo
    band, shard contours, boundaries.

    ``image`` (Z, Y, X) or (Z, Y, X, C): C layers named ``image: NAME`` by ``channel_names``,
    only the first visible. ``regions`` ((name, label values) of nnU-Net's region outputs):
    one labels layer per region, ``region: NAME``, of ``isin(prediction, values)``.
    Every array must have the layout's volume shape (a clear ``ValueError`` otherwise).
    ``stats`` (from :func:`workbench.analysis.compare.shard_stats` of ``signed``) saves recomputing them.
    """
    shape = layout.volume_shape
    channels = _channels(image, channel_names)
    for name, arr in (*channels, ("prediction", prediction), ("ground truth", ground_truth),
                      ("reference prediction", reference_prediction), ("error map", signed)):  # fmt: skip
        if arr is not None:
            _check_volume(arr, name, shape)
    if logits is not None and tuple(logits.shape[:3]) != shape:
        raise UserError(f"logits have shape {tuple(logits.shape)} but the volume is {shape}")
    layers: list[LayerData] = []
    for c, (name, channel) in enumerate(channels):
        layers.append(image_layer(channel, spacing=spacing, name=name))
        layers[-1][1]["visible"] = c == 0
    if ground_truth is not None:
        layers.append(labels_layer(ground_truth, spacing=spacing, name="ground truth", class_names=class_names))
    if reference_prediction is not None:
        ref = labels_layer(reference_prediction, spacing=spacing, name="reference prediction",
                           class_names=class_names)  # fmt: skip
        ref[1]["visible"] = False
        layers.append(ref)
    if prediction is not None:
        layers.append(labels_layer(prediction, spacing=spacing, name="prediction", class_names=class_names))
        for name, values in regions or ():
            mask = np.isin(np.asarray(prediction), list(values)).astype(np.uint8)
            region = labels_layer(mask, spacing=spacing, name=f"region: {name}", class_names=["", name])
            region[1]["visible"] = False
            region[1].setdefault("metadata", {})["region_values"] = [int(v) for v in values]
            layers.append(region)
    if logits is not None:
        layers.extend(probability_layers(logits, spacing=spacing, class_names=class_names))
    if signed is None:
        stats = None
    else:
        if stats is None:
            stats = shard_stats(signed, layout, tolerance=tolerance)
        layers.extend(error_layers(signed, layout, spacing=spacing, tolerance=tolerance, stats=stats))
    if halo_band_width > 0:
        layers.append(halo_band_layer(layout, halo_band_width, spacing=spacing, halo=halo))
    layers.append(contour_layer(layout, spacing=spacing))
    layers.append(boundary_layer(layout, spacing=spacing, stats=stats))
    return layers


def _channels(image, channel_names) -> list[tuple[str, Any]]:
    """(layer name, (Z, Y, X) array) of each channel of ``image`` ((Z, Y, X) or (Z, Y, X, C))."""
    if image is None:
        return []
    if np.ndim(image) != 4:
        return [("image", image)]
    names = list(channel_names or [f"channel {c}" for c in range(image.shape[-1])])
    if len(names) != image.shape[-1]:
        raise UserError(f"the image has {image.shape[-1]} channels but {len(names)} channel names {names}")
    return [(f"image: {n}", image[..., c]) for c, n in enumerate(names)]


def inference_layers(inference) -> list[LayerData]:
    """The layers of a :class:`workbench.app.inference.Inference` (see :func:`build_layers`):
    its image, ground truth, prediction, error maps (with a reference) and halo band."""
    from workbench.analysis.receptive import halo_width

    loaded, halo = inference.loaded, inference.result.halo
    return build_layers(
        inference.layout,
        spacing=loaded.spacing,
        image=loaded.image,
        prediction=inference.labels,
        ground_truth=loaded.labels,
        signed=inference.signed_error(),
        halo=halo,
        halo_band_width=halo_width(halo, model=inference.report["model"]),
        class_names=loaded.class_names,
    )


def result_layers(result) -> list[LayerData]:
    """The layers of a result folder (:func:`workbench.app.load_result`; see :func:`build_layers`)."""
    layers = build_layers(result.layout, spacing=result.spacing, image=result.image, prediction=result.prediction,
                          ground_truth=result.ground_truth, reference_prediction=result.reference_prediction,
                          signed=result.signed, halo=result.report["halo"],
                          halo_band_width=result.halo_band_width, class_names=result.class_names,
                          stats=result.stats, channel_names=getattr(result, "channel_names", None),
                          regions=getattr(result, "regions", None))  # fmt: skip
    if result.signed is None and result.reference_prediction is not None:
        differ = (np.asarray(result.prediction) != np.asarray(result.reference_prediction)).astype(np.uint8)
        layers.insert(-3, (differ, dict(name="prediction ≠ reference", scale=result.spacing,
                                        metadata={"voxels": int(differ.sum())}), "labels"))  # fmt: skip
    for _, kwargs, _ in layers:
        kwargs.setdefault("metadata", {})["result_folder"] = str(result.path)
    return layers
