"""Phantom tasks where the label of a structure depends on context a patch may not see.

Each task draws one case from ``numpy.random.default_rng(seed)`` at any shape (Z, Y, X);
sizes are fractions of the shape, so a case at 48³ and at 96³ holds the same scene. The
image is a plain background with structures of one intensity and Gaussian noise (a
non-CT channel, ``MR``: z-scored by the workbench and by nnU-Net); what tells two
structures apart is where they lie or what they connect to, never how they look.

- ``laterality``: two organs (ellipsoids), exact mirror images of each other about the
  volume's x mid-plane, labelled 1 ``left`` (low x) and 2 ``right`` (high x). A patch that
  sees one organ and not the other cannot tell which it is.
- ``connection``: two tubes of the same intensity run along z over most of the volume
  (longer than a patch); at their top each meets an anchor, one a solid ball, the other a
  hollow shell (anchors are background). A tube is labelled 1 ``from_ball`` or 2
  ``from_shell`` by the anchor it meets; along most of its length both look the same.
- ``counting``: a column of :data:`VERTEBRAE` identical blocks along z, separated by gaps
  (vertebrae and discs), labelled 1..K by their order from low z; the column starts at a
  random z, jittered by more than one block period, so a block's index is known only by
  counting from the column's end.

Small lesions (the fourth task of the study) are the CT phantoms of
:mod:`data_tools.synthetic.raster`. :func:`make_context_case` draws one case;
``parts=True`` also returns the masks the labels are made from (what the tests check the
labels against). :func:`data_tools.synthetic.dataset.write_phantom_dataset` writes any of
them as an MSD / nnU-Net dataset folder.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONTEXT_TASKS", "CONTEXT_CLASSES", "CONTEXT_INTENSITY", "CONTEXT_NOISE", "VERTEBRAE",
           "make_context_case"]  # fmt: skip

#: label names per task (index = label value)
CONTEXT_CLASSES = {
    "laterality": ("background", "left", "right"),
    "connection": ("background", "from_ball", "from_shell"),
    "counting": ("background", *(f"vertebra{k}" for k in range(1, 6))),
}
CONTEXT_TASKS = tuple(CONTEXT_CLASSES)
VERTEBRAE = 5
#: mean intensity of the background and of every structure, and the noise's SD
CONTEXT_INTENSITY = (100.0, 220.0)
CONTEXT_NOISE = 20.0


def _grid(shape):
    return np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")


def _laterality(shape, rng):
    z, y, x = _grid(shape)
    nz, ny, nx = shape
    radii = (rng.uniform(0.12, 0.18) * nz, rng.uniform(0.12, 0.18) * ny, rng.uniform(0.08, 0.12) * nx)
    centre = (rng.uniform(0.35, 0.65) * (nz - 1), rng.uniform(0.35, 0.65) * (ny - 1))
    offset = rng.uniform(0.2, 0.28) * nx  # from the mid-plane to each organ's centre
    cx = (nx - 1) / 2.0 - offset
    left = ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - cx) / radii[2]) ** 2 <= 1
    right = left[..., ::-1]  # the exact mirror image about the x mid-plane
    labels = np.zeros(shape, np.uint8)
    labels[left], labels[right] = 1, 2
    return labels, {"left": left, "right": np.ascontiguousarray(right)}


def _ball(grid, centre, radius):
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _connection(shape, rng):
    grid = _grid(shape)
    z, y, x = grid
    nz, ny, nx = shape
    side = min(ny, nx)
    radius, anchor = max(1.5, 0.05 * side), max(3.0, 0.11 * side)
    while True:  # two tube positions (y, x) far enough apart for their anchors not to touch
        pos = rng.uniform(0.3, 0.7, size=(2, 2)) * (ny - 1, nx - 1)
        if np.hypot(*(pos[0] - pos[1])) > 2.6 * anchor:
            break
    top, bottom = 0.06 * nz + anchor, nz - 1.0
    tubes, anchors = [], []
    for p in pos:
        slope = rng.uniform(-0.08, 0.08, size=2)  # a slight tilt: no tube is a plain column
        cy, cx = p[0] + slope[0] * (z - top), p[1] + slope[1] * (z - top)
        tubes.append(((y - cy) ** 2 + (x - cx) ** 2 <= radius**2) & (z >= top) & (z <= bottom))
        anchors.append((top - 0.6 * anchor, p[0], p[1]))
    ball_first = bool(rng.integers(2))
    ball_at, shell_at = (anchors[0], anchors[1]) if ball_first else (anchors[1], anchors[0])
    ball = _ball(grid, ball_at, anchor)
    shell = _ball(grid, shell_at, anchor) & ~_ball(grid, shell_at, anchor - max(1.5, 0.35 * anchor))
    from_ball, from_shell = (tubes[0], tubes[1]) if ball_first else (tubes[1], tubes[0])
    labels = np.zeros(shape, np.uint8)
    labels[from_ball & ~ball & ~shell] = 1
    labels[from_shell & ~ball & ~shell] = 2
    return labels, {"ball": ball, "shell": shell, "from_ball": labels == 1, "from_shell": labels == 2}


def _counting(shape, rng):
    z, y, x = _grid(shape)
    nz, ny, nx = shape
    height, gap = max(2, round(0.1 * nz)), max(1, round(0.045 * nz))
    period = height + gap
    length = VERTEBRAE * height + (VERTEBRAE - 1) * gap
    room = nz - 2 - length  # the column's start is drawn from 1 .. 1 + room
    start = 1 + int(rng.integers(0, max(1, room) + 1))
    centre = rng.uniform(0.4, 0.6) * (ny - 1), rng.uniform(0.4, 0.6) * (nx - 1)
    radii = 0.14 * ny, 0.17 * nx
    disc = ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1
    labels = np.zeros(shape, np.uint8)
    blocks = []
    for k in range(VERTEBRAE):
        z0 = start + k * period
        block = disc & (z >= z0) & (z < z0 + height)
        labels[block] = k + 1
        blocks.append(block)
    return labels, {"blocks": blocks, "start": start, "period": period}


_MAKERS = {"laterality": _laterality, "connection": _connection, "counting": _counting}


def make_context_case(task: str, shape, *, seed: int = 0, parts: bool = False):
    """One case of ``task`` (:data:`CONTEXT_TASKS`) at ``shape`` (Z, Y, X):
    ``(image f32, labels u8)``, with ``parts=True`` also the masks the labels came from.

    The image is :data:`CONTEXT_INTENSITY` (background, structures: every voxel > 0 of the
    labels, and a task's unlabelled anchors) plus Gaussian noise of SD :data:`CONTEXT_NOISE`.
    """
    from ..errors import DataError

    if task not in _MAKERS:
        raise DataError("task", f"task={task!r}", f"use one of {', '.join(CONTEXT_TASKS)}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise DataError("shape", f"shape={shape}", "give three sides of at least 16 voxels, e.g. (48, 48, 48)")
    rng = np.random.default_rng(seed)
    labels, found = _MAKERS[task](shape, rng)
    bright = labels > 0
    for name in ("ball", "shell"):
        if name in found:
            bright |= found[name]
    low, high = CONTEXT_INTENSITY
    image = np.where(bright, np.float32(high), np.float32(low)).astype(np.float32)
    image += rng.normal(0.0, CONTEXT_NOISE, size=shape).astype(np.float32)
    return (image, labels, found) if parts else (image, labels)
