"""Load a volume and the image the model reads from it.

Front ends name their input in many ways: a spec (``phantom:64``, ``phantom:64:3``,
``mni``), a path in any format ``data_tools`` reads, an array from a napari layer, or a
:class:`data_tools.Volume`. :func:`load_volume` turns each into a :class:`LoadedVolume`:
the volume (with spacing, affine, labels) and the normalised float32 image the shipped
models expect (:func:`workbench.training.data.model_input`: CT window or z-score).

Per-process runs (several hosts) will read only their own blocks: :meth:`LoadedVolume.read_box`
is the one place a run asks for voxels of the model input by box.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from workbench.errors import UserError

__all__ = ["LoadedVolume", "load_volume", "parse_phantom_spec"]

_PHANTOM = re.compile(r"phantom(?::(\d+(?:x\d+x\d+)?))?(?::(-?\d+))?")


@dataclass
class LoadedVolume:
    """A volume and the model's view of it."""

    volume: object  # data_tools.Volume
    image: np.ndarray  # f32[Z, Y, X]: what the model reads
    name: str  # how the input was named (spec, path, layer)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in self.volume.spacing)

    @property
    def labels(self):
        return self.volume.labels

    @property
    def class_names(self):
        return self.volume.class_names

    def read_box(self, box) -> np.ndarray:
        """The model input inside ``box`` ((z0, z1), (y0, y1), (x0, x1))."""
        return self.image[tuple(slice(lo, hi) for lo, hi in box)]


def parse_phantom_spec(text: str) -> tuple[tuple[int, int, int] | None, int] | None:
    """``phantom``, ``phantom:N``, ``phantom:ZxYxX``, each with an optional ``:SEED`` →
    (shape or None, seed); None for anything else (a path, ``mni``)."""
    low = str(text).strip().lower()
    if not (low == "phantom" or low.startswith("phantom:")):
        return None
    m = _PHANTOM.fullmatch(low)
    if m is None:
        raise UserError(f"volume {text!r}: write phantom, phantom:N or phantom:N:SEED (or phantom:ZxYxX[:SEED])")
    shape = None
    if m.group(1):
        sizes = [int(s) for s in m.group(1).split("x")]
        shape = tuple(sizes * 3 if len(sizes) == 1 else sizes)
    return shape, int(m.group(2) or 0)


def load_volume(source, *, shape=None, series: str | None = None, name: str | None = None) -> LoadedVolume:
    """Load ``source`` and, with ``shape``, bring it to that (Z, Y, X) grid.

    ``source``: a spec or path (see :func:`data_tools.load_input`), a ``data_tools.Volume``,
    or a (Z, Y, X) array (spacing 1 mm). A phantom is rendered at ``shape`` directly;
    anything else is resampled to it (linear; labels nearest).
    """
    from data_tools.io import load_input
    from data_tools.volume import Volume
    from workbench.training.data import model_input

    shape = None if shape is None else tuple(int(s) for s in shape)
    if isinstance(source, Volume):
        volume = source
    elif isinstance(source, np.ndarray):
        volume = Volume(source, path=name or "array")
    elif isinstance(source, (str, os.PathLike)):
        phantom = parse_phantom_spec(source) if isinstance(source, str) else None
        if phantom is not None and shape is not None:
            from data_tools.synthetic import make_phantom

            volume = make_phantom(shape, seed=phantom[1])
        else:
            spec = source if phantom is None else f"phantom:{'x'.join(map(str, phantom[0] or (32,) * 3))}:{phantom[1]}"
            volume = load_input(spec, series=series)
    else:
        raise UserError(
            f"volume must be a spec string, a path, an array or a data_tools.Volume, got {type(source).__name__}"
        )
    if shape is not None and tuple(volume.shape) != shape:
        from data_tools.preprocess import resample

        volume = resample(volume, shape=shape)
    return LoadedVolume(volume, model_input(volume), name or str(getattr(source, "path", None) or source))
