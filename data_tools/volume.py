"""The :class:`Volume` every part of the workbench passes around.

Axis order and the affine
-------------------------
``Volume.array`` is indexed ``array[z, y, x]`` (numpy's C order: x varies fastest).
``Volume.affine`` is a 4x4 matrix mapping the **(z, y, x) voxel index of this array**
to world coordinates in millimetres::

    [wx, wy, wz, 1]^T = affine @ [z, y, x, 1]^T

The world frame is NIfTI's RAS+ frame (+x towards the patient's Right, +y Anterior,
+z Superior); DICOM's LPS positions (and NRRD's / MetaImage's, read through SimpleITK)
are converted by negating world x and y. Voxel
indices refer to voxel centres. ``spacing`` is ``(dz, dy, dx)`` in mm, the lengths of
the affine's first three columns.

A NIfTI file stores the array as ``(i, j, k)`` (x fastest on disk) with an affine that
maps ``(i, j, k)``. Reading transposes the array to ``(k, j, i)`` and reverses the
affine's first three columns (:func:`zyx_affine_from_ijk`); writing does the inverse
(:func:`ijk_affine_from_zyx`), so a NIfTI read and written back holds the same data
and the same affine, exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["Volume", "default_affine", "zyx_affine_from_ijk", "ijk_affine_from_zyx"]

# Reverses the order of the first three homogeneous coordinates: (z,y,x,1) <-> (x,y,z,1).
_REVERSE_XYZ = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
_CHECK_SLAB_ELEMENTS = 1 << 22  # finite check in slabs of ~4M voxels: bounded temporaries


def zyx_affine_from_ijk(affine_ijk: np.ndarray) -> np.ndarray:
    """Affine of the transposed ``(k, j, i)`` array from an ``(i, j, k)`` (NIfTI) affine.

    Examples
    --------
    >>> a = np.diag([2.0, 3.0, 4.0, 1.0])
    >>> np.diag(zyx_affine_from_ijk(a)).tolist()
    [0.0, 3.0, 0.0, 1.0]
    """
    return np.asarray(affine_ijk, dtype=np.float64) @ _REVERSE_XYZ


def ijk_affine_from_zyx(affine_zyx: np.ndarray) -> np.ndarray:
    """Inverse of :func:`zyx_affine_from_ijk` (the same column swap)."""
    return np.asarray(affine_zyx, dtype=np.float64) @ _REVERSE_XYZ


def default_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """The affine of an array with no known orientation: world x = x*dx, y = y*dy, z = z*dz.

    Examples
    --------
    >>> default_affine((3.0, 2.0, 1.0))[:3, :3].tolist()
    [[0.0, 0.0, 1.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
    """
    dz, dy, dx = (float(s) for s in spacing)
    return zyx_affine_from_ijk(np.diag([dx, dy, dz, 1.0]))


def _first_bad_index(array: np.ndarray) -> tuple[int, tuple[int, ...]]:
    """Count of non-finite voxels and the (z, y, x) of the first one, slab by slab."""
    count, first = 0, None
    step = max(1, _CHECK_SLAB_ELEMENTS // max(1, array[0].size))
    for z0 in range(0, array.shape[0], step):
        bad = ~np.isfinite(array[z0 : z0 + step])
        n = int(bad.sum())
        if n and first is None:
            idx = np.unravel_index(int(np.argmax(bad)), bad.shape)
            first = (int(idx[0]) + z0, int(idx[1]), int(idx[2]))
        count += n
    return count, first


def _all_finite(array: np.ndarray) -> bool:
    step = max(1, _CHECK_SLAB_ELEMENTS // max(1, array[0].size))
    return all(bool(np.isfinite(array[z0 : z0 + step]).all()) for z0 in range(0, array.shape[0], step))


@dataclass(frozen=True, eq=False, repr=False)
class Volume:
    """A 3-D image in (Z, Y, X) order with its geometry and optional labels.

    Parameters
    ----------
    array : numpy.ndarray
        The voxels, shape ``(Z, Y, X)``, any real dtype; floats must be finite.
    spacing : tuple of 3 floats
        Voxel size in mm, ``(dz, dy, dx)``. Must match the affine's column lengths.
    affine : numpy.ndarray or None
        4x4 map from the ``(z, y, x)`` voxel index to world mm (RAS+). ``None`` means
        ``diag(spacing)`` with the origin at voxel ``(0, 0, 0)``. See the module notes.
    source_format : str
        Where the data came from: ``"nifti"``, ``"dicom"``, ``"tiff"``, ``"nrrd"``,
        ``"metaimage"``, ``"zarr"``, ``"npy"``, ``"npz"``, ``"phantom"``, ``"mni"`` or ``"array"``.
    labels : numpy.ndarray or None
        Integer label map, same shape as ``array``, values in ``0 .. len(class_names)-1``.
    class_names : tuple of str or None
        Names of the label values; ``class_names[0]`` is the background.
    path : str or None
        The file or folder read, for messages.
    metadata : dict
        Format-specific extras (e.g. ``"nifti_header"``, ``"series_uid"``, ``"lesions"``).

    Examples
    --------
    >>> v = Volume(np.zeros((4, 5, 6), np.float32), spacing=(2.0, 1.0, 1.0))
    >>> v.shape, float(v.affine[2, 0])
    ((4, 5, 6), 2.0)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray | None = None
    source_format: str = "array"
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- validation -------------------------------------------------------------------
    def __post_init__(self) -> None:
        where = self.path or "volume"
        set_ = object.__setattr__  # frozen dataclass: normalise fields once, here
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise DataError(
                where,
                f"the image has {array.ndim} dimensions {tuple(array.shape)}, expected 3 (Z, Y, X)",
                "pass a single 3-D volume (select one channel or time point first)",
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
            raise DataError(
                where,
                f"the image has dtype {array.dtype}, expected real numbers",
                "convert it, e.g. array.astype(np.float32) or np.abs(array)",
            )
        if 0 in array.shape:
            raise DataError(where, f"the image is empty, shape {array.shape}", "pass a non-empty volume")
        if np.issubdtype(array.dtype, np.floating) and not _all_finite(array):
            count, first = _first_bad_index(array)
            raise DataError(
                where,
                f"{count} voxel(s) are NaN or infinite (first at z,y,x={first})",
                "replace them, e.g. np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), "
                "or fix the export that produced them",
            )
        set_(self, "array", array)

        spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=np.float64).ravel())
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise DataError(
                where,
                f"spacing={self.spacing!r} is not 3 positive finite numbers (dz, dy, dx) in mm",
                "pass spacing=(dz, dy, dx), e.g. (1.0, 1.0, 1.0)",
            )
        set_(self, "spacing", spacing)

        if self.affine is None:
            affine = default_affine(spacing)
        else:
            affine = np.array(self.affine, dtype=np.float64)
            if affine.shape != (4, 4) or not np.isfinite(affine).all():
                raise DataError(
                    where,
                    f"affine must be a finite 4x4 matrix, got shape {affine.shape}",
                    "pass a 4x4 matrix mapping (z, y, x, 1) to world mm, or affine=None",
                )
            if not np.allclose(affine[3], [0, 0, 0, 1]):
                raise DataError(
                    where,
                    f"affine's last row is {affine[3].tolist()}, expected [0, 0, 0, 1]",
                    "pass a homogeneous 4x4 affine",
                )
            norms = np.linalg.norm(affine[:3, :3], axis=0)
            if not np.allclose(norms, spacing, rtol=1e-3, atol=1e-6):
                raise DataError(
                    where,
                    f"spacing={spacing} disagrees with the affine's column lengths "
                    f"{tuple(round(float(n), 6) for n in norms)}",
                    "pass spacing equal to the column lengths of affine[:3, :3] (z, y, x order)",
                )
        affine.setflags(write=False)
        set_(self, "affine", affine)

        if self.class_names is not None:
            names = tuple(str(n) for n in self.class_names)
            if not names:
                raise DataError(where, "class_names is empty", "pass at least ('background',)")
            set_(self, "class_names", names)
        if self.labels is not None:
            set_(self, "labels", self._checked_labels(where))
        set_(self, "metadata", dict(self.metadata))
        set_(self, "path", None if self.path is None else str(self.path))
        set_(self, "source_format", str(self.source_format))

    def _checked_labels(self, where: str) -> np.ndarray:
        labels = np.asarray(self.labels)
        if labels.shape != self.array.shape:
            raise DataError(
                where,
                f"labels have shape {labels.shape} but the image has shape {self.array.shape}",
                "resample the label map to the image grid (nearest neighbour) or pick the matching file",
            )
        if labels.dtype == bool:
            labels = labels.astype(np.uint8)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                where,
                f"labels have dtype {labels.dtype}, expected integers",
                "cast the label map, e.g. np.rint(labels).astype(np.uint8), after checking it holds whole numbers",
            )
        lo, hi = int(labels.min()), int(labels.max())
        n = None if self.class_names is None else len(self.class_names)
        if lo < 0 or (n is not None and hi >= n):
            outside = labels < 0 if n is None else (labels < 0) | (labels >= n)
            bad = labels[outside]
            values = np.unique(bad)[:10].tolist()
            allowed = f"0..{n - 1} ({', '.join(self.class_names)})" if n is not None else ">= 0"
            raise DataError(
                where,
                f"label map has unexpected values {values}, allowed {allowed}",
                "remap the labels to 0..n-1 or pass class_names with one name per label value",
            )
        return labels

    # -- conveniences -----------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def replace(self, **changes: Any) -> Volume:
        """A copy with some fields changed (validated again).

        Examples
        --------
        >>> v = Volume(np.zeros((2, 2, 2)))
        >>> v.replace(source_format="npy").source_format
        'npy'
        """
        return dataclasses.replace(self, **changes)

    def voxel_to_world(self, zyx: Any) -> np.ndarray:
        """World mm of voxel index/indices ``zyx`` (shape ``(..., 3)``), via the affine."""
        zyx = np.asarray(zyx, dtype=np.float64)
        return zyx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def __repr__(self) -> str:
        labels = None if self.labels is None else f"{self.labels.dtype}{list(self.labels.shape)}"
        spacing = tuple(round(s, 4) for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, dtype={self.dtype}, spacing={spacing}, "
            f"source_format={self.source_format!r}, labels={labels}, "
            f"class_names={self.class_names}, path={self.path!r})"
        )
