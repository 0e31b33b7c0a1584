"""zarr v3 and OME-Zarr (v0.5) stores: multiscale writing block by block, box reads.

Layout written (OME-Zarr 0.5 on zarr v3)::

    store.zarr/            group; attrs {"ome": {"version": "0.5", "multiscales": [...]},
                                         "data_tools": {spacing, affine, class_names, ...}}
      0, 1, 2, ...         image levels; level k+1 = 2x2x2 mean of level k (odd edges
                           replicated), chunks of 64³ (clipped to the level's shape)
      labels/tissue/0, 1…  label levels (when the volume has labels): every 2nd voxel

Several writers at once (one per process of a multi-process run): one of them creates
the store with :func:`create_ome_zarr`, with chunks equal to the blocks each writer owns
at every level (:func:`aligned_levels`), then each writes its own blocks with
:func:`write_ome_block`; no chunk is shared, so no write touches another's data.

Reading accepts OME-Zarr 0.4 (zarr v2) and 0.5 groups, a bare 3-D zarr array, or a group
holding exactly one 3-D array. Singleton non-spatial axes (t, c) are dropped.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output
from ..errors import DataError
from ..geometry import Box, iter_blocks, spacing_of
from ..volume import Volume, default_affine

__all__ = [
    "FORMATS", "SUFFIXES", "sniff", "read", "read_box", "info", "write", "labels_info", "read_labels_box",
    "OmeZarrWriter", "default_levels", "downsample_mean", "aligned_levels", "create_ome_zarr", "write_ome_block",
]  # fmt: skip

FORMATS = ("zarr",)
SUFFIXES = (".zarr",)
_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
_KEY = "data_tools"
_UNIT_MM = {"millimeter": 1.0, "micrometer": 1e-3, "nanometer": 1e-6, "centimeter": 10.0, "meter": 1000.0}
MIN_LEVEL_SIZE = 16
MAX_LEVELS = 5


def sniff(path: Path, head: bytes | None) -> str | None:
    """``"zarr"`` for a folder holding zarr v2/v3 metadata, else None (``head`` not None: a file)."""
    if head is None and any((path / name).exists() for name in _METADATA):
        return "zarr"
    return None


# -- writing ----------------------------------------------------------------------------
def default_levels(shape) -> int:
    """Levels down to a smallest side of ``MIN_LEVEL_SIZE`` (at most ``MAX_LEVELS``)."""
    levels, s = 1, tuple(shape)
    while levels < MAX_LEVELS and min(math.ceil(n / 2) for n in s) >= MIN_LEVEL_SIZE:
        s = tuple(math.ceil(n / 2) for n in s)
        levels += 1
    return levels


def downsample_mean(block: np.ndarray) -> np.ndarray:
    """2x2x2 mean; an odd trailing edge is replicated (its voxel averages with itself)."""
    pad = [(0, n % 2) for n in block.shape]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    z, y, x = (n // 2 for n in block.shape)
    work = block.astype(np.float32, copy=False)
    out = work.reshape(z, 2, y, 2, x, 2).mean(axis=(1, 3, 5), dtype=np.float32)
    if np.issubdtype(block.dtype, np.integer):
        out = np.rint(out).astype(block.dtype)
    return out.astype(block.dtype, copy=False)


def _multiscales(name: str, levels: int, spacing) -> list[dict]:
    axes = [{"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"]
    datasets = []
    for k in range(levels):
        f = 2**k
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [s * f for s in spacing]},
                    {"type": "translation", "translation": [s * (f - 1) / 2 for s in spacing]},
                ],
            }
        )
    return [{"name": name, "axes": axes, "datasets": datasets}]


def _codec():
    from zarr.codecs import BloscCodec

    # lz4 + byte shuffle: about as small as zarr's default zstd here, 2-3x faster to write
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def _level_shape(shape, k: int) -> tuple[int, ...]:
    for _ in range(k):
        shape = tuple(math.ceil(n / 2) for n in shape)
    return tuple(shape)


def aligned_levels(shape, block) -> int:
    """Levels of a store written in blocks of ``block`` voxels (at block-aligned starts)
    such that every level's chunks are whole blocks halved: :func:`default_levels`, fewer
    when a block side has fewer factors of 2."""
    levels = default_levels(shape)
    for b in block:
        twos = (int(b) & -int(b)).bit_length() - 1  # factors of 2 in b
        levels = min(levels, twos + 1)
    return max(1, levels)


def create_ome_zarr(path, shape, *, dtype, block, levels: int | None = None, spacing=(1.0, 1.0, 1.0), affine=None,
                    extra_attrs: dict | None = None) -> int:  # fmt: skip
    """Create an empty OME-Zarr 0.5 image at ``path`` whose level-k chunks are ``block >> k``
    (blocks halved per level), for writers that each own whole blocks; returns the levels.
    Not atomic by itself: create it inside a folder that is renamed when complete."""
    import zarr

    shape, block = tuple(int(s) for s in shape), tuple(int(b) for b in block)
    levels = aligned_levels(shape, block) if levels is None else int(levels)
    spacing = tuple(float(s) for s in spacing)
    affine = default_affine(spacing) if affine is None else np.asarray(affine, float)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for k in range(levels):
        level = _level_shape(shape, k)
        chunks = tuple(max(1, min(b >> k, n)) for b, n in zip(block, level))
        root.create_array(str(k), shape=level, chunks=chunks, dtype=dtype, fill_value=0, compressors=_codec(),
                          dimension_names=("z", "y", "x"))  # fmt: skip
    attrs = {"spacing": list(spacing), "affine": affine.tolist(), **(extra_attrs or {})}
    root.attrs.update({"ome": {"version": "0.5", "multiscales": _multiscales("image", levels, spacing)}, _KEY: attrs})
    return levels


def write_ome_block(path, box, block: np.ndarray) -> None:
    """Write ``block`` at ``box`` of a store from :func:`create_ome_zarr`, with its smaller levels.

    ``box`` starts at a multiple of the store's block (its level-0 chunk); the block holds
    the whole box (clipped to the volume at its far edge)."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    levels = len(root.attrs["ome"]["multiscales"][0]["datasets"])
    starts = [a for a, _ in box]
    for k in range(levels):
        if k:
            block = downsample_mean(block)
        lo = [a >> k for a in starts]
        root[str(k)][tuple(slice(a, a + n) for a, n in zip(lo, block.shape))] = block


class OmeZarrWriter:
    """Write an OME-Zarr store block by block; use as a context manager (atomic).

    Blocks must start at multiples of ``writer.block`` (itself a multiple of the chunk and
    of ``2**(levels-1)``) so each block's down-sampled levels are exact and no two blocks
    share a chunk. Memory: one block and its smaller levels.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape,
        *,
        dtype=np.float32,
        spacing=(1.0, 1.0, 1.0),
        affine=None,
        class_names=None,
        labels: bool | None = None,
        chunks: int = 64,
        levels: int | None = None,
        block: int = 128,
        extra_attrs: dict[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.spacing = tuple(float(s) for s in spacing)
        self.affine = default_affine(self.spacing) if affine is None else np.asarray(affine, float)
        self.class_names = None if class_names is None else tuple(class_names)
        self.with_labels = self.class_names is not None if labels is None else bool(labels)
        self.levels = default_levels(self.shape) if levels is None else max(1, int(levels))
        self.chunks = int(chunks)
        unit = math.lcm(self.chunks, 2 ** (self.levels - 1))
        self.block = max(unit, (int(block) // unit) * unit)
        self.extra_attrs = dict(extra_attrs or {})
        self._ctx = None

    def level_shape(self, k: int) -> tuple[int, ...]:
        s = self.shape
        for _ in range(k):
            s = tuple(math.ceil(n / 2) for n in s)
        return s

    def __enter__(self) -> OmeZarrWriter:
        import zarr

        self._ctx = atomic_output(self.path)
        tmp = self._ctx.__enter__()
        try:
            root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            self._image = self._create(root, self.dtype)
            attrs = {"spacing": list(self.spacing), "affine": self.affine.tolist(), **self.extra_attrs}
            if self.class_names is not None:
                attrs["class_names"] = list(self.class_names)
            multiscales = _multiscales("image", self.levels, self.spacing)
            root.attrs.update({"ome": {"version": "0.5", "multiscales": multiscales}, _KEY: attrs})
            self._labels = None
            if self.with_labels:
                group = root.create_group("labels")
                group.attrs.update({"ome": {"version": "0.5", "labels": ["tissue"]}})
                tissue = group.create_group("tissue")
                names = self.class_names or ()
                tissue.attrs.update({"ome": {
                    "version": "0.5",
                    "multiscales": _multiscales("tissue", self.levels, self.spacing),
                    "image-label": {"version": "0.5", "source": {"image": "../../"},
                                    "properties": [{"label-value": i, "class": n} for i, n in enumerate(names)]},
                }})  # fmt: skip
                self._labels = self._create(tissue, np.uint8)
        except BaseException as exc:
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def _create(self, group, dtype) -> list:
        codec = _codec()
        arrays = []
        for k in range(self.levels):
            shape = self.level_shape(k)
            chunks = tuple(min(self.chunks, n) for n in shape)
            arrays.append(group.create_array(str(k), shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                                             compressors=codec, dimension_names=("z", "y", "x")))  # fmt: skip
        return arrays

    def write_block(self, box, image: np.ndarray, labels: np.ndarray | None = None) -> None:
        starts = [a for a, _ in box]
        assert all(a % (2 ** (self.levels - 1)) == 0 for a in starts), f"unaligned block {box}"
        image = np.asarray(image, dtype=self.dtype)
        for k, arr in enumerate(self._image):
            if k:
                image = downsample_mean(image)
            lo = [a >> k for a in starts]
            arr[tuple(slice(a, a + n) for a, n in zip(lo, image.shape))] = image
        if self._labels is not None and labels is not None:
            labels = np.asarray(labels, dtype=np.uint8)
            for k, arr in enumerate(self._labels):
                if k:
                    labels = labels[::2, ::2, ::2]
                lo = [a >> k for a in starts]
                arr[tuple(slice(a, a + n) for a, n in zip(lo, labels.shape))] = labels

    def __exit__(self, exc_type, exc, tb):
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(exc_type, exc, tb)


def write(volume: Volume, path: Path, *, chunks: int = 64, levels: int | None = None) -> Path:
    """Write a whole :class:`Volume` as OME-Zarr (image levels, labels if present)."""
    extra = {"source_format": volume.source_format}
    with OmeZarrWriter(path, volume.shape, dtype=volume.dtype if volume.dtype != bool else np.uint8,
                       spacing=volume.spacing, affine=volume.affine, class_names=volume.class_names,
                       labels=volume.labels is not None, chunks=chunks, levels=levels,
                       extra_attrs=extra) as writer:  # fmt: skip
        slab = (writer.block, volume.shape[1], volume.shape[2])
        for box in iter_blocks(volume.shape, slab):
            sl = tuple(slice(a, b) for a, b in box)
            writer.write_block(box, volume.array[sl], None if volume.labels is None else volume.labels[sl])
    return Path(path)


# -- reading ----------------------------------------------------------------------------
def _open(path: Path):
    import zarr

    try:
        return zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for missing/broken metadata
        raise DataError(path, f"not a readable zarr store ({type(exc).__name__}: {exc})",
                        "point to a zarr v2/v3 array or OME-Zarr group") from None  # fmt: skip


def _ome(attrs) -> dict | None:
    attrs = dict(attrs)
    if "ome" in attrs and "multiscales" in attrs["ome"]:
        return attrs["ome"]
    if "multiscales" in attrs:  # OME-Zarr 0.4 keeps it at the top level
        return attrs
    return None


class _Source:
    """A located 3-D image inside a store: the array, how to index it, its geometry."""

    def __init__(self, path: Path, node):
        import zarr

        self.path, self.attrs = path, {}
        self.spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
        self.affine = None
        axes_names = None
        if isinstance(node, zarr.Array):
            array = node
            self.attrs = dict(node.attrs).get(_KEY, {})
            names = getattr(node.metadata, "dimension_names", None)
            axes_names = list(names) if names and all(names) else None
            if "spacing" in node.attrs:
                self.spacing = tuple(float(s) for s in node.attrs["spacing"])  # type: ignore[assignment]
        else:
            ome = _ome(node.attrs)
            self.attrs = dict(node.attrs).get(_KEY, {})
            if ome is not None:
                ms = ome["multiscales"][0]
                array = node[ms["datasets"][0]["path"]]
                axes = ms.get("axes")
                axes_names = [a["name"] if isinstance(a, dict) else a for a in axes] if axes else None
                units = [_UNIT_MM.get(a.get("unit", "millimeter"), 1.0) if isinstance(a, dict) else 1.0
                         for a in (axes or [])]  # fmt: skip
                scale = None
                for t in ms["datasets"][0].get("coordinateTransformations", []):
                    if t.get("type") == "scale":
                        scale = [float(s) * (units[i] if i < len(units) else 1.0) for i, s in enumerate(t["scale"])]
                if scale is not None:
                    self._scale = scale
            else:
                arrays = [(name, a) for name, a in node.arrays()]
                three_d = [(n, a) for n, a in arrays if a.ndim == 3]
                if len(three_d) != 1:
                    raise DataError(
                        path,
                        f"is a zarr group without OME-Zarr multiscales metadata holding arrays "
                        f"{[(n, a.shape) for n, a in arrays]}",
                        "point to the image array itself, e.g. read_volume('store.zarr/image')",
                    )
                array = three_d[0][1]
        self.array = array
        self.index = self._index(axes_names)
        if self.attrs.get("spacing") is not None:
            self.spacing = tuple(float(s) for s in self.attrs["spacing"])  # type: ignore[assignment]
        elif getattr(self, "_scale", None) is not None:
            spatial = [s for s, i in zip(self._scale, self.index) if i == slice(None)]
            self.spacing = tuple(spatial)  # type: ignore[assignment]
        if self.attrs.get("affine") is not None:
            self.affine = np.asarray(self.attrs["affine"], dtype=np.float64)

    def _index(self, names) -> tuple:
        shape = tuple(self.array.shape)
        if names is not None and len(names) == len(shape):
            keep = [i for i, n in enumerate(names) if str(n).lower() in ("z", "y", "x")]
            drop_ok = all(shape[i] == 1 for i in range(len(shape)) if i not in keep)
        else:
            keep = [i for i, n in enumerate(shape) if n > 1] if len(shape) > 3 else list(range(len(shape)))
            drop_ok = all(shape[i] == 1 for i in range(len(shape)) if i not in keep)
        if len(keep) != 3 or not drop_ok:
            raise DataError(
                self.path,
                f"zarr array has shape {shape}"
                + (f" with axes {list(names)}" if names else "")
                + ", expected 3 spatial dimensions (Z, Y, X)",
                "store one 3-D volume per array (select a channel/time point), or point to that array",
            )
        return tuple(slice(None) if i in keep else 0 for i in range(len(shape)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(n for n, i in zip(self.array.shape, self.index) if i == slice(None))  # type: ignore[return-value]

    def read(self, box=None) -> np.ndarray:
        if box is None:
            return np.asarray(self.array[self.index])
        it = iter(slice(a, b) for a, b in box)
        index = tuple(next(it) if i == slice(None) else i for i in self.index)
        return np.asarray(self.array[index])


def _labels(path: Path, root) -> tuple[np.ndarray | None, tuple[str, ...] | None]:
    import zarr

    if not isinstance(root, zarr.Group) or "labels" not in root:
        return None, None
    group = root["labels"]
    names = dict(group.attrs).get("ome", dict(group.attrs)).get("labels") or []
    if not names:
        return None, None
    src = _Source(path, group[names[0]])
    class_names = None
    ours = dict(root.attrs).get(_KEY, {})
    if ours.get("class_names"):
        class_names = tuple(ours["class_names"])
    labels = src.read()
    if not np.issubdtype(labels.dtype, np.integer):
        labels = labels.astype(np.int64)
    return labels, class_names


def _labels_source(path: Path):
    import zarr

    root = _open(path)
    if not isinstance(root, zarr.Group) or "labels" not in root:
        return None, root
    group = root["labels"]
    names = dict(group.attrs).get("ome", dict(group.attrs)).get("labels") or []
    return (_Source(path, group[names[0]]) if names else None), root


def labels_info(path: Path):
    """``(dtype, class_names or None)`` of the store's label image, or None without one
    (metadata only)."""
    src, root = _labels_source(path)
    if src is None:
        return None
    names = dict(root.attrs).get(_KEY, {}).get("class_names")
    return np.dtype(src.array.dtype), (tuple(names) if names else None)


def read_labels_box(path: Path, box: Box) -> np.ndarray:
    """Only ``box`` of the store's label image (the chunks it touches)."""
    src, _ = _labels_source(path)
    if src is None:
        raise DataError(path, "holds no label image (labels/)", "write the volume with its labels")
    return src.read(box)


def read(path: Path, *, series=None) -> Volume:
    """The image (level 0) with its geometry and, when present, the labels (``series``: unused)."""
    node = _open(path)
    src = _Source(path, node)
    data = src.read()
    labels, class_names = _labels(path, node)
    affine = src.affine if src.affine is not None else default_affine(src.spacing)
    meta = {k: v for k, v in src.attrs.items() if k not in ("spacing", "affine", "class_names")}
    meta["zarr_shape"] = tuple(src.array.shape)
    return Volume(data, spacing=src.spacing, affine=affine, source_format="zarr", labels=labels,
                  class_names=class_names, path=str(path), metadata=meta)  # fmt: skip


def read_box(path: Path, box: Box, *, series=None) -> np.ndarray:
    """Only the box: zarr reads only the chunks it touches (``series``: unused)."""
    return _Source(path, _open(path)).read(box)


def info(path: Path, *, series=None):
    """``(shape, dtype, spacing, affine)`` from the store's metadata (``series``: unused)."""
    src = _Source(path, _open(path))
    affine = src.affine if src.affine is not None else default_affine(src.spacing)
    return src.shape, np.dtype(src.array.dtype), spacing_of(affine), affine
