"""ipywidgets panels: the workbench as an instrument panel in JupyterLab.

Pick a mesh and a resolution, see whether it fits before anything runs, then run,
compare with the single-device reference, train and look at the result::

    from workbench.ui.panel import WorkbenchPanel
    panel = WorkbenchPanel("phantom:32", mesh="2x2x2")
    panel                                  # the controls (last line of a cell)
    result = panel.run_inference()         # what the "Run inference" button does
    report = panel.compare()               # "Compare with reference"

Every control is an attribute (``panel.mesh``, ``panel.resolution``, ``panel.halo``,
``panel.budget`` ...) so a script or a test sets ``.value`` and calls the methods the
buttons call. The per-device memory estimate comes from the planner
(:func:`workbench.analysis.plan.plan_memory`, an ahead-of-time compile: nothing is allocated),
cached per configuration and computed in a background thread so the controls never
freeze. A bad choice shows one red line in the panel (``panel.error``); the methods
themselves raise the same ``ValueError``.

Nothing here imports JAX or napari at module level: the panel imports them when built.
"""

from __future__ import annotations

import concurrent.futures
import html
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

import ipywidgets as W
import numpy as np

from workbench.analysis.figures import _pyplot, plot_slices
from workbench.mesh import MeshSpec, ShardLayout, auto_mesh, valid_meshes

__all__ = [
    "WorkbenchPanel",
    "MemoryEstimator",
    "PlanKey",
    "plan_bytes",
    "data_choices",
    "mesh_choices",
    "mesh_svg",
    "resolution_step",
    "valid_resolutions",
    "parse_resolution",
    "padding_note",
    "format_bytes",
    "fits_line",
    "plot_slices",
    "plot_memory",
    "plot_curves",
    "memory_table",
    "table_text",
]

# Sizes a resolution picker offers (those that split evenly on the chosen mesh).
NICE_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
BACKEND_CHOICES = ("explicit", "gspmd")
_SHARD_COLOURS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7")
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


# ---------------------------------------------------------------- pure helpers


def data_choices(n_devices: int) -> list[int]:
    """Data-parallel sizes for ``n_devices``: the divisors of the device count."""
    return [d for d in range(1, n_devices + 1) if n_devices % d == 0]


def mesh_choices(n_devices: int, *, data: int = 1) -> list[tuple[str, MeshSpec]]:
    """(label, MeshSpec) for every z×y×x mesh of ``n_devices // data`` devices.

    >>> [label for label, _ in mesh_choices(4)]
    ['1×1×4', '1×2×2', '1×4×1', '2×1×2', '2×2×1', '4×1×1']
    """
    if data < 1 or n_devices % data:
        raise ValueError(
            f"data-parallel size {data} does not divide the {n_devices} devices; "
            f"choose one of {data_choices(n_devices)}"
        )
    out = []
    for spec in valid_meshes(n_devices // data):
        mesh = MeshSpec(*spec.spatial, data=data)
        label = "×".join(str(s) for s in mesh.spatial)
        out.append((label if data == 1 else f"{label} (data {data})", mesh))
    return out


def mesh_svg(spec: MeshSpec, *, cell: int = 16) -> str:
    """A small SVG of the device grid: one y×x panel per z slab, one colour per device."""
    mz, my, mx = spec.spatial
    cell = max(4, min(cell, 96 // max(my, mx)))
    gap, top = 10, 14
    width = mz * (mx * cell + gap) + gap
    height = my * cell + top + (18 if spec.data > 1 else 6)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10">']
    for z in range(mz):
        x0 = gap + z * (mx * cell + gap)
        parts.append(f'<text x="{x0}" y="10">z{z}</text>')
        for y in range(my):
            for x in range(mx):
                index = (z * my + y) * mx + x
                colour = _SHARD_COLOURS[index % len(_SHARD_COLOURS)]
                parts.append(
                    f'<rect x="{x0 + x * cell}" y="{top + y * cell}" width="{cell - 1}" '
                    f'height="{cell - 1}" fill="{colour}"><title>device {index}: '
                    f'z{z} y{y} x{x}</title></rect>'
                )
    if spec.data > 1:
        parts.append(f'<text x="{gap}" y="{height - 4}">× {spec.data} data-parallel copies</text>')
    parts.append("</svg>")
    return "".join(parts)


def resolution_step(spec: MeshSpec, multiple: int) -> int:
    """Cube sides that are multiples of this split evenly on ``spec`` (no padding)."""
    return math.lcm(*spec.spatial) * multiple


def valid_resolutions(spec: MeshSpec, multiple: int, *, largest: int = 1024) -> list[int]:
    """Cube sides up to ``largest`` that need no padding on ``spec`` for a model whose
    sides must be multiples of ``multiple`` (= 2^(depth-1)).

    >>> valid_resolutions(MeshSpec(2, 2, 2), 4, largest=128)
    [16, 24, 32, 48, 64, 96, 128]
    """
    step = resolution_step(spec, multiple)
    sizes = [n for n in NICE_SIZES if n % step == 0 and n <= largest]
    return sizes or [k * step for k in range(1, 13) if k * step <= max(largest, step)]


def parse_resolution(text) -> int | str:
    """``"native"`` or a positive integer side, from a text field."""
    value = str(text).strip().lower()
    if value == "native":
        return "native"
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(
        f"resolution {str(text)!r} is not a size; type a positive integer such as 64 "
        "or pick one from the list"
    )


def _shape_text(shape) -> str:
    shape = tuple(shape)
    return f"{shape[0]}³" if len(set(shape)) == 1 else "×".join(str(s) for s in shape)


def padding_note(shape, spec: MeshSpec, multiple: int) -> str:
    """One line: does ``shape`` split evenly on ``spec``, and what padding would it add."""
    layout = ShardLayout(shape, spec, multiple=multiple)
    blocks = f"{spec.n_spatial} blocks of {_shape_text(layout.block_shape)}"
    if layout.padded_shape == layout.volume_shape:
        return f"{_shape_text(shape)} splits evenly: {blocks}"
    extra = math.prod(layout.padded_shape) / math.prod(layout.volume_shape) - 1.0
    return (
        f"{_shape_text(shape)} is padded to {_shape_text(layout.padded_shape)} on this mesh "
        f"(+{100 * extra:.0f}% voxels, masked out): {blocks}"
    )


def format_bytes(n: float) -> str:
    """Bytes as MiB below 1 GiB, else GiB."""
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def fits_line(stats: dict, budget_gib: float) -> tuple[bool, str]:
    """(fits, text) for planner ``stats`` (with ``peak`` bytes per device) against a budget."""
    peak = stats["peak"]
    budget = budget_gib * 2**30
    if peak <= budget:
        return True, f"{format_bytes(peak)} per device: fits {budget_gib:g} GiB ({100 * peak / budget:.0f}%)"
    return False, (f"{format_bytes(peak)} per device: does not fit {budget_gib:g} GiB "
                   f"({peak / budget:.1f}× the budget)")


# ---------------------------------------------------------------- memory estimates


@dataclass(frozen=True)
class PlanKey:
    """Everything the per-device memory depends on (hashable: the cache key)."""

    config: Any  # UNetConfig
    shape: tuple[int, int, int]
    mesh: MeshSpec
    backend: str = "explicit"
    halo: Any = "exact"
    train: bool = False
    batch: int = 1


def plan_bytes(key: PlanKey) -> dict[str, int]:
    """Per-device bytes of the compiled program for ``key`` (see :func:`workbench.analysis.plan.plan_memory`)."""
    from workbench.analysis.plan import plan_memory

    layout = ShardLayout(key.shape, key.mesh, multiple=key.config.multiple)
    return plan_memory(key.config, layout, backend=key.backend, halo=key.halo, train=key.train,
                       batch=key.batch)


class MemoryEstimator:
    """Planner results cached per :class:`PlanKey`, computed in one background thread.

    ``submit(key)`` returns a ``Future`` at once (the cached one when the key was seen
    before); ``estimate(key)`` waits for it. ``computed`` counts planner calls made.
    """

    def __init__(self, planner: Callable[[PlanKey], dict] = plan_bytes):
        self._planner = planner
        self._futures: dict[PlanKey, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="workbench-plan")
        self.computed = 0

    def _plan(self, key: PlanKey) -> dict:
        with self._lock:
            self.computed += 1
        return self._planner(key)

    def submit(self, key: PlanKey) -> concurrent.futures.Future:
        with self._lock:
            future = self._futures.get(key)
            if future is None:
                future = self._pool.submit(self._plan, key)
                self._futures[key] = future
            return future

    def estimate(self, key: PlanKey, timeout: float | None = None) -> dict:
        return self.submit(key).result(timeout)


def memory_table(config, resolutions, meshes, *, train: bool = False, backend: str = "explicit",
                 budgets_gib=(16, 80), estimator: MemoryEstimator | None = None, progress: bool = True) -> list[dict]:
    """Planner bytes per device for every (resolution, mesh), with the single-device bytes.

    Each row: ``resolution``, ``mesh``, ``devices``, ``bytes_per_device``,
    ``bytes_single_device`` (same resolution on one device), ``efficiency`` (= single ×
    data ÷ devices ÷ per-device: 1.0 is a perfect split) and ``fits_<B>GiB`` per budget.
    Meshes need that many devices to compile (``configure_cpu_devices(N)`` on CPU).
    """
    from tqdm.auto import tqdm

    from workbench.mesh import parse_mesh

    estimator = estimator or MemoryEstimator()
    specs = [parse_mesh(m) for m in meshes]
    rows = []
    jobs = [(n, spec) for n in resolutions for spec in specs]
    for n, spec in tqdm(jobs, desc="planning", disable=not progress, leave=False):
        shape = (int(n),) * 3
        single = estimator.estimate(PlanKey(config, shape, MeshSpec(), backend, "exact", train, 1))["peak"]
        peak = estimator.estimate(PlanKey(config, shape, spec, backend, "exact", train, spec.data))["peak"]
        row = {"resolution": int(n), "mesh": str(spec), "devices": spec.n_devices, "bytes_per_device": peak,
               "bytes_single_device": single, "efficiency": single * spec.data / spec.n_devices / peak}
        for budget in budgets_gib:
            row[f"fits_{budget:g}GiB"] = peak <= budget * 2**30
        rows.append(row)
    return rows


def table_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned text table (bytes columns in MiB/GiB, floats to 3 digits)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(key, value):
        if value is None:
            return "-"
        if key.startswith("bytes") and isinstance(value, (int, float)):
            return format_bytes(value)
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    cells = [[cell(k, r.get(k)) for k in columns] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(columns)]
    lines = ["  ".join(k.rjust(w) for k, w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots (matplotlib)


def plot_memory(rows: list[dict], *, x: str = "devices", budgets_gib=(16, 80), title: str = ""):
    """Per-device peak memory (GiB) vs ``x`` (a key of ``rows``), one line per resolution."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    by_res: dict[Any, list[dict]] = {}
    for row in rows:
        by_res.setdefault(row["resolution"], []).append(row)
    for res, group in by_res.items():
        group = sorted(group, key=lambda r: r[x])
        ax.plot([r[x] for r in group], [r["bytes_per_device"] / 2**30 for r in group], marker="o",
                label=f"{res}³")
    for budget in budgets_gib:
        ax.axhline(budget, color="grey", ls="--", lw=0.8)
        ax.text(ax.get_xlim()[0], budget, f" {budget} GiB", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("peak GiB per device")
    ax.set_title(title or "per-device memory (planner)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(curves: dict[str, list[float]], *, xlabel: str = "step", title: str = ""):
    """Line plots of named series (loss, Dice ...), one axis each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", ms=3)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the panel


def _red(text: str) -> str:
    return f'<span style="color:#b00020">{html.escape(text)}</span>'


def _green(text: str) -> str:
    return f'<span style="color:#1b7a1b">{html.escape(text)}</span>'


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class WorkbenchPanel:
    """Controls for one volume: mesh, resolution, model, halo, memory estimate, actions.

    Parameters
    ----------
    volume : str or Volume
        ``"phantom"`` / ``"phantom:N[:SEED]"`` (made at whatever size is picked), ``"mni"``,
        a path any :func:`data_tools.load_input` reads, or a :class:`data_tools.Volume`.
        Loaded volumes offer ``native`` (their own, possibly uneven, shape) or a cube side.
    mesh, resolution, model, halo, backend
        initial choices (mesh default: the most cube-like mesh of all devices).
    budget_gib : float
        per-device memory budget the estimate is checked against.
    estimate : {"background", "sync", "off"}
        when to run the planner: in a background thread (default), before returning from
        every change (scripts, tests), or never.
    estimator : MemoryEstimator, optional
        share one cache between panels.

    The buttons call :meth:`run_inference`, :meth:`compare`, :meth:`train`,
    :meth:`open_napari` and :meth:`memory_vs_devices`; results are kept in
    ``panel.result``, ``panel.report``, ``panel.history`` and figures in ``panel.figures``.
    """

    def __init__(self, volume="phantom:32", *, mesh=None, resolution=None, model: str = "small",
                 halo="exact", backend: str = "explicit", budget_gib: float = 16.0, steps: int = 5,
                 seed: int = 0, n_devices: int | None = None, estimate: str = "background",
                 estimator: MemoryEstimator | None = None):
        import jax

        from workbench.model.unet import PRESETS

        if estimate not in ("background", "sync", "off"):
            raise ValueError(f"estimate={estimate!r}; use 'background', 'sync' or 'off'")
        devices = jax.devices()
        self.n_devices = len(devices) if n_devices is None else int(n_devices)
        self.platform = devices[0].platform
        self.seed = seed
        self.estimate_mode = estimate
        self.estimator = estimator or MemoryEstimator()
        self._phantom_seed, self._volume, default_size = self._parse_source(volume)
        self._loaded: dict[Any, tuple] = {}
        self._models: dict[Any, Any] = {}
        self._estimate_key: PlanKey | None = None
        self._refreshing = False
        self._choice_error: str | None = None
        self.result = self.report = self.history = self.reference = self.signed_error = None
        self.comparison = None
        self.summary = ""
        self.viewer = None
        self._result_settings = self._report_settings = None
        self.error: str | None = None
        self.fits: bool | None = None
        self.last_estimate: dict | None = None
        self.figures: dict[str, Any] = {}

        spec = self._initial_mesh(mesh)
        style = {"description_width": "110px"}
        layout = W.Layout(width="300px")
        # -- mesh
        self.data = W.Dropdown(options=data_choices(self.n_devices), value=spec.data,
                               description="data-parallel", style=style, layout=layout)
        self.mesh = W.Dropdown(options=mesh_choices(self.n_devices, data=spec.data), value=spec,
                               description="mesh z×y×x", style=style, layout=layout)
        self.mesh_picture = W.HTML()
        # -- resolution
        self.resolution = W.Combobox(value=str(resolution or default_size), ensure_option=False,
                                     description="resolution", style=style, layout=layout,
                                     placeholder="a side N (N³) or native")
        self.padding = W.HTML()
        # -- model and partitioning
        preset = PRESETS[model] if model in PRESETS else PRESETS["small"]
        self.model = W.Dropdown(options=sorted(PRESETS), value=model if model in PRESETS else "small",
                                description="model", style=style, layout=layout)
        self.dtype = W.Dropdown(options=["float32", "bfloat16"], value=preset["dtype"], description="dtype",
                                style=style, layout=layout)
        self.remat = W.Checkbox(value=False, description="rematerialise (less memory, more compute)",
                                indent=False)
        self.halo = W.Dropdown(options=self._halo_options(), value=halo, description="halo",
                               style=style, layout=layout)
        self.backend = W.Dropdown(options=BACKEND_CHOICES, value=backend, description="backend",
                                  style=style, layout=layout)
        # -- memory
        self.plan_for = W.ToggleButtons(options=["inference", "training"], value="inference",
                                        description="plan for", style={"button_width": "92px"})
        self.budget = W.BoundedFloatText(value=budget_gib, min=1e-6, max=1e6, step=1.0,
                                         description="budget GiB/dev", style=style,
                                         layout=W.Layout(width="200px"))
        self.estimate = W.HTML()
        # -- actions
        _auto = W.Layout(width="auto")
        self.steps = W.BoundedIntText(value=steps, min=1, max=100_000, description="steps",
                                      layout=W.Layout(width="140px"))
        self.run_button = W.Button(description="Run inference", button_style="primary", icon="play", layout=_auto)
        self.compare_button = W.Button(description="Compare with reference", icon="balance-scale", layout=_auto)
        self.train_button = W.Button(description="Train N steps", icon="line-chart", layout=_auto)
        self.napari_button = W.Button(description="Open in napari", icon="cube", layout=_auto)
        self.memory_button = W.Button(description="Memory vs devices", icon="bar-chart", layout=_auto)
        self.status = W.HTML()
        self.output = W.Output(layout=W.Layout(border="1px solid #ddd", min_height="40px"))

        for button, action in ((self.run_button, self.run_inference), (self.compare_button, self.compare),
                               (self.train_button, self.train), (self.napari_button, self.open_napari),
                               (self.memory_button, self.memory_vs_devices)):
            button.on_click(self._click(button, action))
        for control in (self.data, self.mesh, self.resolution, self.model, self.dtype, self.remat,
                        self.halo, self.backend, self.plan_for):
            control.observe(self._on_change, names="value")
        self.budget.observe(self._on_budget, names="value")
        self._refresh()

    # -- source ----------------------------------------------------------------------------
    @staticmethod
    def _parse_source(volume):
        if isinstance(volume, str) and volume.strip().lower().split(":")[0] == "phantom":
            parts = volume.strip().lower().split(":")
            if len(parts) > 3 or not all(p.isdigit() for p in parts[1:]):
                raise ValueError(f"volume {volume!r}: write phantom, phantom:N or phantom:N:SEED")
            size = int(parts[1]) if len(parts) > 1 else 32
            return (int(parts[2]) if len(parts) > 2 else 0), None, size
        if isinstance(volume, str) or hasattr(volume, "__fspath__"):
            from data_tools.io import load_input

            volume = load_input(volume)
        if not hasattr(volume, "array"):
            raise TypeError(f"volume must be a spec string, a path or a data_tools.Volume, "
                            f"got {type(volume).__name__}")
        return None, volume, "native"

    def _initial_mesh(self, mesh) -> MeshSpec:
        from workbench.mesh import parse_mesh

        if mesh is None or (isinstance(mesh, str) and mesh.strip().lower() == "auto"):
            return auto_mesh(self.n_devices)
        spec = parse_mesh(mesh)
        if spec.n_devices != self.n_devices:
            parse_mesh(spec, n_devices=self.n_devices)  # raises the helpful error
        return spec

    # -- derived state -----------------------------------------------------------------------
    @property
    def spec(self) -> MeshSpec:
        return self.mesh.value

    @property
    def config(self):
        from workbench.model.unet import UNetConfig

        return UNetConfig.preset(self.model.value, dtype=self.dtype.value, remat=bool(self.remat.value))

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        size = parse_resolution(self.resolution.value)
        if size == "native":
            if self._volume is None:
                raise ValueError("a phantom has no native size; type a side such as 64")
            return tuple(self._volume.shape)
        if size < 4:
            raise ValueError(f"resolution {size} is too small; use at least {self.config.multiple * 2}")
        return (size, size, size)

    def plan_key(self) -> PlanKey:
        """What the memory estimate is computed for (one volume per data-parallel group)."""
        spec = self.spec
        return PlanKey(self.config, self.volume_shape, spec, self.backend.value, self.halo.value,
                       self.plan_for.value == "training", batch=spec.data)

    def _halo_options(self) -> list:
        from workbench.execute.run import overlap_width
        from workbench.model.unet import UNetConfig

        preset = self.model.value if hasattr(self, "model") else "small"
        config = UNetConfig.preset(preset)
        full = overlap_width(config)
        narrow = [(f"overlap {w} (narrower than the {full} needed)", w)
                  for w in range(config.multiple, full, config.multiple)]
        return ([("exact", "exact"), (f"overlap (input halo {full}, exact)", "overlap")]
                + [(m, m) for m in ("zero", "reflect", "replicate")] + narrow)

    # -- reacting to changes ------------------------------------------------------------------
    def _on_change(self, change=None):
        if not self._refreshing:
            self._refresh()

    def _refresh(self) -> None:
        self._refreshing = True
        self._choice_error = None
        try:
            self.clear_error()
            data = self.data.value
            options = mesh_choices(self.n_devices, data=data)
            if [spec for _, spec in self.mesh.options] != [spec for _, spec in options]:
                wanted = MeshSpec(*self.mesh.value.spatial, data=data)
                specs = [spec for _, spec in options]
                self.mesh.options = options
                self.mesh.value = wanted if wanted in specs else auto_mesh(self.n_devices, data=data)
            self.mesh_picture.value = mesh_svg(self.spec)
            halo = self.halo.value
            self.halo.options = self._halo_options()
            self.halo.value = halo if halo in [v for _, v in self.halo.options] else "exact"
            multiple = self.config.multiple
            sizes = [str(n) for n in valid_resolutions(self.spec, multiple)]
            self.resolution.options = (["native"] if self._volume is not None else []) + sizes
            try:
                self.padding.value = html.escape(padding_note(self.volume_shape, self.spec, multiple))
            except ValueError as err:
                self.padding.value = _red(_one_line(err))
                self.estimate.value = ""
                self._estimate_key, self._choice_error = None, _one_line(err)
                return
        finally:
            self._refreshing = False
        self.refresh_estimate()

    def refresh_estimate(self) -> None:
        """(Re)start the planner for the current choices; the label updates when it is done."""
        key = self._estimate_key = self.plan_key()
        self.fits = self.last_estimate = None
        if self.estimate_mode == "off":
            self.estimate.value = "memory estimate off"
            return
        future = self.estimator.submit(key)
        if not future.done():
            self.estimate.value = "estimating per-device memory (compiling ahead of time, nothing is allocated)…"
            future.add_done_callback(lambda f, k=key: self._show_estimate(k, f))
        if self.estimate_mode == "sync":
            concurrent.futures.wait([future])
        if future.done():
            self._show_estimate(key, future)

    def wait_estimate(self, timeout: float | None = None) -> dict:
        """Wait for the current estimate; returns the planner's bytes (raises its error)."""
        if self._estimate_key is None:
            raise ValueError(self._choice_error or "no valid configuration to estimate; fix the choices first")
        key = self._estimate_key
        future = self.estimator.submit(key)
        concurrent.futures.wait([future], timeout)
        self._show_estimate(key, future)
        return future.result(0)

    def _show_estimate(self, key: PlanKey, future: concurrent.futures.Future) -> None:
        if key != self._estimate_key or not future.done():
            return  # a newer choice replaced this one
        err = future.exception()
        if err is not None:
            self.fits = None
            prefix = "" if isinstance(err, USER_ERRORS) else f"planner failed ({type(err).__name__}): "
            self.estimate.value = _red(prefix + _one_line(err))
            return
        stats = future.result()
        self.last_estimate = stats
        self.fits, text = fits_line(stats, self.budget.value)
        mode = "training step" if key.train else "inference"
        self.estimate.value = (_green if self.fits else _red)(f"{mode}: {text}")

    def _on_budget(self, change=None) -> None:
        if self._estimate_key is not None:
            self._show_estimate(self._estimate_key, self.estimator.submit(self._estimate_key))

    # -- status and output ----------------------------------------------------------------------
    def show_error(self, err: BaseException | str) -> None:
        """Show one red line in the panel (``panel.error`` holds the text)."""
        self.error = err if isinstance(err, str) else _one_line(err)
        self.status.value = _red(self.error)

    def clear_error(self) -> None:
        self.error = None
        self.status.value = ""

    def show_status(self, text: str) -> None:
        self.status.value = html.escape(text)

    def _show_figure(self, name: str, fig) -> None:
        from IPython.display import display

        self.figures[name] = fig
        with self.output:
            display(fig)
        _pyplot().close(fig)

    def _click(self, button, action):
        def handler(_button=None):
            self.clear_error()
            button.disabled = True
            try:
                with self.output:
                    try:
                        action()
                    except USER_ERRORS as err:
                        self.show_error(err)
            finally:
                button.disabled = False

        return handler

    # -- data and model ------------------------------------------------------------------------
    def load(self):
        """(Volume, model input image) at the chosen resolution (cached)."""
        from workbench.cli.args import image_for_model

        shape = self.volume_shape
        if shape not in self._loaded:
            if self._volume is None:
                from data_tools.phantoms import make_phantom

                volume = make_phantom(shape, seed=self._phantom_seed)
            elif shape == tuple(self._volume.shape):
                volume = self._volume
            else:
                from data_tools.preprocess import resample

                volume = resample(self._volume, shape=shape)
            self._loaded[shape] = (volume, image_for_model(volume))
        return self._loaded[shape]

    def get_model(self):
        """The model for the chosen preset/dtype/remat (trained weights after :meth:`train`)."""
        from workbench.model.unet import Model

        config = self.config
        if config not in self._models:
            self._models[config] = self._shipped_model(config) or Model.init(config, seed=self.seed)
        return self._models[config]

    def _shipped_model(self, config):
        """The shipped trained weights for the small preset (phantom or MNI task), if any."""
        from workbench.training.checkpoint import PRETRAINED, WEIGHTS_DIR, pretrained
        from workbench.model.unet import Model

        if self.model.value != "small":
            return None
        source = self._volume.source_format if self._volume is not None else "phantom"
        task = "mni" if source in ("mni", "nifti") else "phantom"
        if not (WEIGHTS_DIR / PRETRAINED[task]).is_file():
            return None
        trained = pretrained(task)
        # the shipped config fixes the classes (MNI: 4); dtype/remat do not change parameters
        return Model(trained.config.replace(dtype=config.dtype, remat=config.remat), trained.variables)

    def _inference_mesh(self) -> MeshSpec:
        spec = self.spec
        if spec.data > 1:
            raise ValueError(
                f"mesh {spec} has a data-parallel axis of {spec.data} but inference runs one volume; "
                "set data-parallel to 1 (it is for training and memory plans)"
            )
        return spec

    # -- actions -----------------------------------------------------------------------------------
    def _settings(self) -> tuple:
        return (self.config, self.volume_shape, self.spec, self.backend.value, self.halo.value)

    def run_inference(self):
        """Partitioned inference with the chosen settings; returns :class:`workbench.execute.run.RunResult`."""
        from tqdm.auto import tqdm

        from workbench.execute.run import run

        spec = self._inference_mesh()
        settings = self._settings()
        with tqdm(total=3, desc="inference", leave=False) as bar:
            bar.set_postfix_str("loading the volume")
            volume, image = self.load()
            bar.update()
            bar.set_postfix_str("model")
            model = self.get_model()
            bar.update()
            bar.set_postfix_str("compile and run")
            result = run(model, image, spec, backend=self.backend.value, halo=self.halo.value)
            bar.update()
        self.result, self._result_settings = result, settings
        peak = result.memory.get("peak")
        self.summary = (
            f"{self.backend.value} on {spec}, halo {self.halo.value}: {result.seconds:.2f} s "
            f"(+{result.compile_seconds:.1f} s compile)"
            + ("" if peak is None else f", measured peak {format_bytes(peak)} per device")
        )
        self.show_status(self.summary)
        self._show_figure("slices", plot_slices(image, result.output.argmax(-1), result.layout))
        return result

    def compare(self) -> dict:
        """Run the single-device reference and compare (:func:`workbench.analysis.compare.compare`):
        max |Δ|, argmax disagreement, per-shard errors and the seam profile."""
        from tqdm.auto import tqdm

        from workbench.analysis.compare import compare, plot_seam_profile, predicted_artifact_depth
        from workbench.execute.run import run
        from workbench.ui.napari.layers import signed_error

        with tqdm(total=3, desc="compare", leave=False) as bar:
            if self.result is None or self._result_settings != self._settings():
                self.run_inference()
            result = self.result
            bar.update()
            volume, image = self.load()
            reference = run(self.get_model(), image, backend="reference")
            self.reference = reference
            bar.update()
            comparison = compare(result.output, reference.output, result.layout)
            self.signed_error = signed_error(result.output, reference.output)  # f32[Z, Y, X]
            bar.update()
        self.comparison = comparison
        self._report_settings = self._settings()
        self.report = {"mesh": str(result.layout.mesh), "backend": result.backend, "halo": result.halo,
                       "seconds": result.seconds, "reference_seconds": reference.seconds, **comparison.as_dict()}
        r = self.report
        self.summary = (
            f"max |Δ| vs reference {r['max_abs_diff']:.2g}; argmax differs on "
            f"{100 * r['argmax_disagreement']:.2f}% of voxels; partitioned {r['seconds']:.2f} s vs "
            f"reference {r['reference_seconds']:.2f} s ({r['seconds'] / r['reference_seconds']:.2f}×)"
        )
        self.show_status(self.summary)
        self._show_figure("error", plot_slices(image, result.output.argmax(-1), result.layout,
                                               error=comparison.error))
        label = f"{result.backend}, halo {result.halo}"
        self._show_figure("seam", plot_seam_profile(
            {label: comparison.profile}, predicted={label: predicted_artifact_depth(self.config, result.halo)}))
        return self.report

    def train(self, steps: int | None = None, *, workdir=None) -> dict:
        """Train ``steps`` (default: the steps box) with :func:`workbench.training.loop.train_and_evaluate`;
        the trained weights replace the model's for later runs. Returns its result dict."""
        import tempfile

        from workbench.training.loop import TrainConfig, train_and_evaluate

        spec = self.spec
        size = parse_resolution(self.resolution.value)
        data = "phantom" if self._volume is None else [self._volume]
        tc = TrainConfig(
            data=data, resolution=None if size == "native" else size,
            mesh="x".join(str(s) for s in spec.spatial), data_parallel=spec.data,
            backend=self.backend.value, model=self.model.value,
            model_overrides={"dtype": self.dtype.value, "remat": bool(self.remat.value)},
            steps=int(steps or self.steps.value), batch=spec.data, eval_cases=1,
            checkpoint_every=int(steps or self.steps.value), seed=self.seed,
        )
        workdir = workdir or tempfile.mkdtemp(prefix="workbench-train-")
        out = train_and_evaluate(tc, workdir, progress=True, log=self.show_status)
        self.history = out["history"]
        if out.get("model") is not None:
            self._models[self.config] = out["model"]
            self.result = None
        rows = self.history["train"]
        curves = {"loss": [r["loss"] for r in rows]}
        for name in [k for k in rows[-1] if k.startswith("dice_")]:
            curves[name.replace("_", " ")] = [np.nan if r[name] is None else r[name] for r in rows]
        self.show_status(f"trained {out['step']} steps in {out['loop_seconds']:.1f} s; "
                         f"loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}; weights in {workdir}")
        self._show_figure("curves", plot_curves(curves, title=f"training on {spec}"))
        return out

    def layers(self) -> list:
        """napari layer data of the last run: image, ground truth, prediction, error maps
        (after :meth:`compare`), halo band and shard boundaries (:func:`workbench.ui.napari.layers.build_layers`)."""
        from workbench.ui.napari.layers import build_layers, halo_width

        if self.result is None or self._result_settings != self._settings():
            self.run_inference()
        volume, image = self.load()
        result = self.result
        signed = self.signed_error if self.report is not None and self._report_settings == self._settings() else None
        width = halo_width(result.halo, model=self.config.as_dict())
        return build_layers(
            result.layout, spacing=tuple(volume.spacing), image=image,
            prediction=result.output.argmax(-1).astype(np.uint8), ground_truth=volume.labels,
            signed=signed, halo=result.halo, halo_band_width=width,
            class_names=volume.class_names,
        )

    def open_napari(self):
        """Open a napari viewer with :meth:`layers` (needs a display); returns the viewer."""
        from workbench.ui.napari.layers import add_layers, display_available

        layers = self.layers()
        ok, reason = display_available()
        if not ok:
            raise ValueError(f"cannot open napari: {reason}")
        import napari

        viewer = napari.Viewer(title="workbench")
        add_layers(viewer, layers)
        self.viewer = viewer
        self.show_status(f"opened napari with {len(layers)} layers")
        return viewer

    def screenshot(self, path, *, ndisplay: int = 3):
        """Save a picture of the shards to ``path``: a napari screenshot where a display
        exists, else matplotlib slices (:func:`plot_slices`). Returns (path, how)."""
        from workbench.ui.napari.layers import display_available, save_view_png

        layers = self.layers()
        ok, reason = display_available()
        if ok:
            save_view_png(path, layers, ndisplay=ndisplay)
            how = "napari"
        else:
            volume, image = self.load()
            error = None if self.signed_error is None else np.abs(self.signed_error)
            fig = plot_slices(image, self.result.output.argmax(-1), self.result.layout, error=error)
            fig.savefig(path, dpi=100)
            _pyplot().close(fig)
            how = f"matplotlib ({reason})"
        self.show_status(f"saved {path} with {how}")
        return path, how

    def memory_vs_devices(self, counts=None) -> list[dict]:
        """Planner peak per device for the current choices on 1, 2, 4 … devices (cube-like meshes)."""
        from tqdm.auto import tqdm

        counts = counts or [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= self.n_devices]
        key = self.plan_key()
        rows = []
        for n in tqdm(counts, desc="planning", leave=False):
            spec = auto_mesh(n * key.mesh.data, data=key.mesh.data)
            stats = self.estimator.estimate(PlanKey(key.config, key.shape, spec, key.backend, key.halo,
                                                    key.train, key.batch))
            rows.append({"devices": spec.n_devices, "mesh": str(spec), "resolution": _shape_text(key.shape),
                         "bytes_per_device": stats["peak"]})
        self.figures["memory"] = None
        self._show_figure("memory", plot_memory(rows, budgets_gib=(self.budget.value,)))
        return rows

    # -- display ---------------------------------------------------------------------------------
    @property
    def widget(self) -> W.VBox:
        """The whole panel as one ipywidgets box."""
        if not hasattr(self, "_box"):
            title = W.HTML(f"<b>Partitioned U-Net workbench</b> · {self.n_devices} {self.platform} devices")
            mesh_col = W.VBox([W.HTML("<b>Mesh</b>"), self.data, self.mesh, self.mesh_picture])
            res_col = W.VBox([W.HTML("<b>Resolution</b>"), self.resolution, self.padding],
                             layout=W.Layout(width="340px"))
            model_col = W.VBox([W.HTML("<b>Model</b>"), self.model, self.dtype, self.remat, self.halo,
                                self.backend])
            memory = W.VBox([W.HTML("<b>Per-device memory</b>"), W.HBox([self.plan_for, self.budget]),
                             self.estimate])
            actions = W.HBox([self.run_button, self.compare_button, self.steps, self.train_button,
                              self.napari_button, self.memory_button])
            self._box = W.VBox([title, W.HBox([mesh_col, res_col, model_col]), memory, actions,
                                self.status, self.output])
        return self._box

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

