"""The notebook viewer widget: three orthogonal slices streamed from the kernel on demand.

An `anywidget <https://anywidget.dev>`_ whose JavaScript (``viewer.js`` beside this file,
no network needed) asks the kernel for the slices it shows and nothing else. At start-up
the browser gets the :meth:`Scene.manifest <workbench.ui.notebook_viewer.scene.Scene.manifest>`
(shape, look-up tables, shard boxes, colours and errors: a few kB) and the three slices
through the cursor; each slice change asks for one slice of each channel shown, quantised to
``uint8`` and deflate-compressed. So a 512³ result starts with well under a megabyte and
never sends its float32 volume.

Synced state (set it from Python, read what the browser did): ``position`` (z, y, x of
the cursor: the three slices), ``visible`` and ``opacity`` (per channel, plus
``boundaries`` and ``crosshair``), ``error_mode`` (``"abs"`` or ``"signed"``) and
``rendered`` (what each view last drew, written by the browser).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import anywidget
import traitlets as T

from workbench.errors import UserError
from workbench.ui.notebook_viewer.scene import Scene

__all__ = ["SliceViewer", "START_BUDGET_FRACTION"]

HERE = Path(__file__).parent
# Start-up bytes allowed, as a fraction of the float32 volume (the budget is 1/8).
START_BUDGET_FRACTION = 1 / 8


class SliceViewer(anywidget.AnyWidget):
    """Orthogonal slices of a :class:`Scene` with overlays, shard boundaries and a shard table."""

    _esm = HERE / "viewer.js"
    _css = HERE / "viewer.css"

    manifest = T.Dict().tag(sync=True)
    position = T.List(T.Int(), default_value=[0, 0, 0], minlen=3, maxlen=3).tag(sync=True)
    visible = T.Dict().tag(sync=True)
    opacity = T.Dict().tag(sync=True)
    error_mode = T.Unicode("abs").tag(sync=True)
    size = T.Int(256).tag(sync=True)
    rendered = T.Dict().tag(sync=True)

    def __init__(self, scene: Scene, *, position=None, size: int = 256, level: int = 1):
        self.scene = scene
        self.level = int(level)  # deflate level of the slices (1: fast; 0: raw bytes)
        self.bytes_sent = 0
        self.slices_sent = 0
        manifest = scene.manifest()
        visible = {c.name: c.visible for c in scene.channels} | {"boundaries": True, "crosshair": True}
        opacity = {c.name: c.opacity for c in scene.channels}
        centre = [s // 2 for s in scene.shape] if position is None else self._checked(position)
        super().__init__(manifest=manifest, position=centre, visible=visible, opacity=opacity, size=int(size))
        self.bytes_sent += len(self._json(manifest))
        self.on_msg(self._on_message)

    @staticmethod
    def _json(value) -> bytes:
        import json

        return json.dumps(value, separators=(",", ":")).encode()

    def _checked(self, position) -> list[int]:
        pos = [int(p) for p in position]
        if len(pos) != 3 or not all(0 <= p < s for p, s in zip(pos, self.scene.shape)):
            raise UserError(
                f"position {tuple(position)} is outside the volume {self.scene.shape}; use 0 <= z, y, x < shape"
            )
        return pos

    @T.validate("position")
    def _valid_position(self, proposal):
        return self._checked(proposal["value"])

    # -- slices ------------------------------------------------------------------------------
    def slice_message(self, axis: int, index: int, seq: int = 0, channels=None) -> tuple[dict, list[bytes]]:
        """What the kernel sends for one view: a header and one buffer per channel asked
        for (``channels``: names; None: all)."""
        index = min(max(int(index), 0), self.scene.shape[int(axis)] - 1)
        rows, cols = (s for a, s in enumerate(self.scene.shape) if a != int(axis))
        names, buffers = [], []
        for channel in self.scene.channels:
            if channels is not None and channel.name not in channels:
                continue
            plane = self.scene.slice(channel.name, int(axis), index)
            raw = plane.tobytes()
            buffers.append(zlib.compress(raw, self.level) if self.level else raw)
            names.append(channel.name)
        header = {"type": "slice", "axis": int(axis), "index": index, "seq": int(seq), "channels": names,
                  "rows": rows, "cols": cols, "codec": "deflate" if self.level else "raw"}  # fmt: skip
        return header, buffers

    def _on_message(self, _widget, content, _buffers) -> None:
        if not isinstance(content, dict) or content.get("type") != "slice":
            return
        header, buffers = self.slice_message(
            content.get("axis", 0), content.get("index", 0), content.get("seq", 0), content.get("channels")
        )
        self.bytes_sent += sum(len(b) for b in buffers) + len(self._json(header))
        self.slices_sent += 1
        self.send(header, buffers)

    def startup_bytes(self) -> int:
        """Bytes the browser receives before its first picture: the manifest and synced
        state, then the three slices through ``position`` of the channels shown (what
        ``viewer.js`` asks for)."""
        state = self._json({k: getattr(self, k) for k in ("manifest", "position", "visible", "opacity", "size")})
        total = len(state)
        shown = [name for name, on in self.visible.items() if on]
        for axis in range(3):
            header, buffers = self.slice_message(axis, self.position[axis], channels=shown)
            total += len(self._json(header)) + sum(len(b) for b in buffers)
        return total

    # -- convenience -------------------------------------------------------------------------
    def show(self, **visible: bool) -> SliceViewer:
        """Toggle overlays by name (``show(error=True, halo_band=False)``; underscores for spaces)."""
        names = {name.replace(" ", "_"): name for name in self.visible}
        unknown = sorted(set(visible) - set(names))
        if unknown:
            raise UserError(f"no overlay {unknown[0]!r}; this viewer has {', '.join(sorted(names))}")
        self.visible = self.visible | {names[k]: bool(v) for k, v in visible.items()}
        return self

    def summary(self) -> str:
        return self.scene.summary()

    def __repr__(self) -> str:
        return f"<SliceViewer {self.summary()}>"
