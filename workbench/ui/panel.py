"""The notebook panel: the workbench as an instrument panel in JupyterLab.

Pick a mesh and a resolution, see whether it fits before anything runs, then run,
compare with the single-device reference, train and look at the result::

    from workbench.ui.panel import WorkbenchPanel
    panel = WorkbenchPanel("phantom:32", mesh="2x2x2")
    panel                                  # the controls (last line of a cell)
    result = panel.run_inference()         # what the "Run inference" button does
    report = panel.compare()               # "Compare with reference"

Controls and display only: every action is one call into the application layer
(:class:`workbench.app.session.Session`: load, resolve the model, run, compare, train;
:class:`workbench.app.planning.MemoryEstimator`: the per-device memory estimate, an
ahead-of-time compile of the same step ``workbench plan`` compiles, run in a background
thread so the controls never freeze). Every control is an attribute (``panel.mesh``,
``panel.resolution``, ``panel.halo``, ``panel.budget`` ...) so a script or a test sets
``.value`` and calls the methods the buttons call. A bad choice shows one red line
(``panel.error``); the methods themselves raise the same user error.

Nothing here imports JAX or napari at module level: the panel imports them when built.
"""

from __future__ import annotations

import concurrent.futures
import html
from typing import Any

import ipywidgets as W
import numpy as np

from workbench.analysis.figures import _pyplot, plot_curves, plot_memory, plot_seam_profile, plot_slices
from workbench.app.planning import MemoryEstimator, PlanKey, fits_line, format_bytes
from workbench.errors import USER_ERRORS, UserError, one_line
from workbench.mesh import MeshSpec, auto_mesh
from workbench.options import PLAN_BACKENDS, PRESETS
from workbench.ui.choices import (
    data_choices,
    halo_options,
    mesh_choices,
    mesh_svg,
    padding_note,
    shape_text,
    valid_resolutions,
)

__all__ = ["WorkbenchPanel"]


def _red(text: str) -> str:
    return f'<span style="color:#b00020">{html.escape(text)}</span>'


def _green(text: str) -> str:
    return f'<span style="color:#1b7a1b">{html.escape(text)}</span>'


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

        from workbench.app.session import Session
        from workbench.model.unet import PRESETS as PRESET_CONFIGS

        if estimate not in ("background", "sync", "off"):
            raise UserError(f"estimate={estimate!r}; use 'background', 'sync' or 'off'")
        devices = jax.devices()
        self.n_devices = len(devices) if n_devices is None else int(n_devices)
        self.platform = devices[0].platform
        self.session = Session(volume, seed=seed)
        self.estimate_mode = estimate
        self.estimator = estimator or MemoryEstimator()
        self._estimate_key: PlanKey | None = None
        self._refreshing = False
        self._choice_error: str | None = None
        self.inference = self.history = None
        self.summary = ""
        self.viewer = None
        self.error: str | None = None
        self.fits: bool | None = None
        self.last_estimate: dict | None = None
        self.figures: dict[str, Any] = {}

        spec = self._initial_mesh(mesh)
        style = {"description_width": "110px"}
        layout = W.Layout(width="300px")
        self.data = W.Dropdown(options=data_choices(self.n_devices), value=spec.data,
                               description="data-parallel", style=style, layout=layout)
        self.mesh = W.Dropdown(options=mesh_choices(self.n_devices, data=spec.data), value=spec,
                               description="mesh z×y×x", style=style, layout=layout)
        self.mesh_picture = W.HTML()
        self.resolution = W.Combobox(value=str(resolution or self.session.default_size), ensure_option=False,
                                     description="resolution", style=style, layout=layout,
                                     placeholder="a side N (N³) or native")
        self.padding = W.HTML()
        model = model if model in PRESETS else "small"
        self.model = W.Dropdown(options=sorted(PRESETS), value=model, description="model", style=style,
                                layout=layout)
        self.dtype = W.Dropdown(options=["float32", "bfloat16"], value=PRESET_CONFIGS[model]["dtype"],
                                description="dtype", style=style, layout=layout)
        self.remat = W.Checkbox(value=False, description="rematerialise (less memory, more compute)", indent=False)
        self.halo = W.Dropdown(options=halo_options(self.config), value=halo, description="halo", style=style,
                               layout=layout)
        self.backend = W.Dropdown(options=PLAN_BACKENDS, value=backend, description="backend", style=style,
                                  layout=layout)
        self.plan_for = W.ToggleButtons(options=["inference", "training"], value="inference",
                                        description="plan for", style={"button_width": "92px"})
        self.budget = W.BoundedFloatText(value=budget_gib, min=1e-6, max=1e6, step=1.0, description="budget GiB/dev",
                                         style=style, layout=W.Layout(width="200px"))
        self.estimate = W.HTML()
        auto = W.Layout(width="auto")
        self.steps = W.BoundedIntText(value=steps, min=1, max=100_000, description="steps",
                                      layout=W.Layout(width="140px"))
        self.run_button = W.Button(description="Run inference", button_style="primary", icon="play", layout=auto)
        self.compare_button = W.Button(description="Compare with reference", icon="balance-scale", layout=auto)
        self.train_button = W.Button(description="Train N steps", icon="line-chart", layout=auto)
        self.napari_button = W.Button(description="Open in napari", icon="cube", layout=auto)
        self.memory_button = W.Button(description="Memory vs devices", icon="bar-chart", layout=auto)
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

    def _initial_mesh(self, mesh) -> MeshSpec:
        from workbench.mesh import parse_mesh

        if mesh is None or (isinstance(mesh, str) and mesh.strip().lower() == "auto"):
            return auto_mesh(self.n_devices)
        spec = parse_mesh(mesh)
        if spec.n_devices != self.n_devices:
            parse_mesh(spec, n_devices=self.n_devices)  # raises the helpful error
        return spec

    # -- what the controls select ----------------------------------------------------------------
    @property
    def spec(self) -> MeshSpec:
        return self.mesh.value

    @property
    def config(self):
        from workbench.model.unet import UNetConfig

        preset = self.model.value if hasattr(self, "model") else "small"
        dtype = self.dtype.value if hasattr(self, "dtype") else None
        remat = bool(self.remat.value) if hasattr(self, "remat") else False
        return UNetConfig.preset(preset, **({"dtype": dtype} if dtype else {}), remat=remat)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return self.session.shape_for(self.resolution.value)

    def settings(self):
        """The :class:`~workbench.app.session.Settings` the controls select."""
        from workbench.app.session import Settings

        return Settings(self.volume_shape, self.spec, self.model.value, self.dtype.value, bool(self.remat.value),
                        self.halo.value, self.backend.value)

    def plan_key(self) -> PlanKey:
        """What the memory estimate is computed for (one volume per data-parallel group)."""
        spec = self.spec
        return PlanKey(self.config, self.volume_shape, spec, self.backend.value, self.halo.value,
                       self.plan_for.value == "training", batch=spec.data)

    # -- results (the last Inference of the session) ---------------------------------------------
    @property
    def result(self):
        """The last run (:class:`~workbench.execute.run.RunResult`), or None."""
        return None if self.inference is None else self.inference.result

    @property
    def reference(self):
        return None if self.inference is None else self.inference.reference

    @property
    def report(self) -> dict | None:
        """The last comparison's report (``report.json`` schema), or None."""
        inf = self.inference
        return None if inf is None or inf.comparison is None else inf.report

    @property
    def comparison(self):
        return None if self.inference is None else self.inference.comparison

    @property
    def signed_error(self):
        return None if self.inference is None else self.inference.signed_error()

    # -- reacting to changes ----------------------------------------------------------------------
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
            self.halo.options = halo_options(self.config)
            self.halo.value = halo if halo in [v for _, v in self.halo.options] else "exact"
            multiple = self.config.multiple
            sizes = [str(n) for n in valid_resolutions(self.spec, multiple)]
            self.resolution.options = (["native"] if self.session.volume is not None else []) + sizes
            try:
                self.padding.value = html.escape(padding_note(self.volume_shape, self.spec, multiple))
            except USER_ERRORS as err:
                self.padding.value = _red(one_line(err))
                self.estimate.value = ""
                self._estimate_key, self._choice_error = None, one_line(err)
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
            raise UserError(self._choice_error or "no valid configuration to estimate; fix the choices first")
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
            self.estimate.value = _red(prefix + one_line(err))
            return
        stats = future.result()
        self.last_estimate = stats
        self.fits, text = fits_line(stats, self.budget.value)
        mode = "training step" if key.train else "inference"
        self.estimate.value = (_green if self.fits else _red)(f"{mode}: {text}")

    def _on_budget(self, change=None) -> None:
        if self._estimate_key is not None:
            self._show_estimate(self._estimate_key, self.estimator.submit(self._estimate_key))

    # -- status and output ------------------------------------------------------------------------
    def show_error(self, err: BaseException | str) -> None:
        """Show one red line in the panel (``panel.error`` holds the text)."""
        self.error = err if isinstance(err, str) else one_line(err)
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

    # -- actions: one call into the session each ----------------------------------------------------
    def run_inference(self):
        """Partitioned inference with the chosen settings; returns :class:`workbench.execute.run.RunResult`."""
        settings = self.settings()
        self.inference = self.session.run(settings)
        result = self.result
        peak = result.memory.get("peak")
        self.summary = (
            f"{settings.backend} on {settings.mesh}, halo {settings.halo}: {result.seconds:.2f} s "
            f"(+{result.compile_seconds:.1f} s compile)"
            + ("" if peak is None else f", measured peak {format_bytes(peak)} per device"))
        self.show_status(self.summary)
        self._show_figure("slices", plot_slices(self.inference.loaded.image, self.inference.labels, result.layout))
        return result

    def compare(self) -> dict:
        """Run with the single-device reference and compare: max |Δ|, argmax disagreement,
        per-shard errors and the seam profile (the report)."""
        from workbench.analysis.receptive import predicted_artifact_depth

        settings = self.settings()
        self.inference = self.session.compare(settings)
        r, result = self.report, self.result
        self.summary = (
            f"max |Δ| vs reference {r['max_abs_diff']:.2g}; argmax differs on "
            f"{100 * r['argmax_disagreement']:.2f}% of voxels; partitioned {r['seconds']:.2f} s vs "
            f"reference {r['reference_seconds']:.2f} s ({r['seconds'] / r['reference_seconds']:.2f}×)")
        self.show_status(self.summary)
        self._show_figure("error", plot_slices(self.inference.loaded.image, self.inference.labels, result.layout,
                                               error=np.abs(self.signed_error)))
        label = f"{result.backend}, halo {result.halo}"
        self._show_figure("seam", plot_seam_profile(
            {label: self.comparison.profile}, predicted={label: predicted_artifact_depth(settings.config, result.halo)}))
        return r

    def train(self, steps: int | None = None, *, workdir=None) -> dict:
        """Train ``steps`` (default: the steps box); the trained weights replace the model's
        for later runs. Returns the training result dict."""
        out = self.session.train(self.settings(), int(steps or self.steps.value), workdir=workdir,
                                 log=self.show_status)
        self.history, self.inference = out["history"], None
        rows = self.history["train"]
        curves = {"loss": [r["loss"] for r in rows]}
        for name in [k for k in rows[-1] if k.startswith("dice_")]:
            curves[name.replace("_", " ")] = [np.nan if r[name] is None else r[name] for r in rows]
        self.show_status(f"trained {out['step']} steps in {out['loop_seconds']:.1f} s; "
                         f"loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}; weights in {out['workdir']}")
        self._show_figure("curves", plot_curves(curves, title=f"training on {self.spec}"))
        return out

    def layers(self) -> list:
        """napari layer data of the last run with these settings (run first if needed): image,
        ground truth, prediction, error maps (after :meth:`compare`), halo band, shard boundaries."""
        from workbench.analysis.receptive import halo_width
        from workbench.ui.napari.layers import build_layers

        if self.inference is None or self.session.last_settings != self.settings():
            self.run_inference()
        run, loaded = self.inference, self.inference.loaded
        return build_layers(
            run.layout, spacing=loaded.spacing, image=loaded.image, prediction=run.labels,
            ground_truth=loaded.labels, signed=self.signed_error, halo=run.result.halo,
            halo_band_width=halo_width(run.result.halo, model=self.config.as_dict()), class_names=loaded.class_names)

    def open_napari(self):
        """Open a napari viewer with :meth:`layers` (needs a display); returns the viewer."""
        from workbench.ui.napari import view

        layers = self.layers()
        ok, reason = view.display_available()
        if not ok:
            raise UserError(f"cannot open napari: {reason}")
        import napari

        self.viewer = napari.Viewer(title="workbench")
        view.add_layers(self.viewer, layers)
        self.show_status(f"opened napari with {len(layers)} layers")
        return self.viewer

    def screenshot(self, path, *, ndisplay: int = 3):
        """Save a picture of the shards to ``path``: a napari screenshot where a display
        exists, else matplotlib slices. Returns (path, how)."""
        from workbench.ui.napari import view

        layers = self.layers()
        ok, reason = view.display_available()
        if ok:
            view.save_view_png(path, layers, ndisplay=ndisplay)
            how = "napari"
        else:
            error = None if self.signed_error is None else np.abs(self.signed_error)
            fig = plot_slices(self.inference.loaded.image, self.inference.labels, self.result.layout, error=error)
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
            rows.append({"devices": spec.n_devices, "mesh": str(spec), "resolution": shape_text(key.shape),
                         "bytes_per_device": stats["peak"]})
        self._show_figure("memory", plot_memory(rows, budgets_gib=(self.budget.value,)))
        return rows

    # -- display ------------------------------------------------------------------------------------
    @property
    def widget(self) -> W.VBox:
        """The whole panel as one ipywidgets box."""
        if not hasattr(self, "_box"):
            title = W.HTML(f"<b>Partitioned U-Net workbench</b> · {self.n_devices} {self.platform} devices")
            mesh_col = W.VBox([W.HTML("<b>Mesh</b>"), self.data, self.mesh, self.mesh_picture])
            res_col = W.VBox([W.HTML("<b>Resolution</b>"), self.resolution, self.padding],
                             layout=W.Layout(width="340px"))
            model_col = W.VBox([W.HTML("<b>Model</b>"), self.model, self.dtype, self.remat, self.halo, self.backend])
            memory = W.VBox([W.HTML("<b>Per-device memory</b>"), W.HBox([self.plan_for, self.budget]), self.estimate])
            actions = W.HBox([self.run_button, self.compare_button, self.steps, self.train_button,
                              self.napari_button, self.memory_button])
            self._box = W.VBox([title, W.HBox([mesh_col, res_col, model_col]), memory, actions, self.status,
                                self.output])
        return self._box

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
