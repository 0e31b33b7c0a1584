"""The notebook panel: the workbench as an instrument panel in JupyterLab.

Pick a mesh and a resolution, see whether it fits before anything runs, then run,
compare with the single-device reference, train and look at the result::

    from workbench.ui.panel import WorkbenchPanel
    panel = WorkbenchPanel("phantom:32", mesh="2x2x2")
    panel                                  # the controls (last line of a cell)
    result = panel.run_inference()         # what the "Run inference" button does
    report = panel.compare()               # "Compare with reference"
    view = panel.view()                    # "View": the in-notebook viewer below the panel

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

import html
from pathlib import Path

import ipywidgets as W
import numpy as np

from workbench.analysis.figures import _pyplot, plot_curves, plot_memory, plot_seam_profile, plot_slices
from workbench.app.planning import MemoryEstimator, PlanKey, format_bytes
from workbench.app.plans_network import is_plans_config, is_preset, network_config, plans_shape
from workbench.errors import USER_ERRORS, UserError, one_line
from workbench.mesh import MeshSpec, auto_mesh
from workbench.options import PLAN_BACKENDS
from workbench.ui.choices import (
    halo_options,
    mesh_choices,
    mesh_svg,
    padding_note,
    valid_resolutions,
)
from workbench.ui.controls import Controls
from workbench.ui.display import Display
from workbench.ui.estimate import EstimateView, red

__all__ = ["WorkbenchPanel"]


class WorkbenchPanel:
    """Controls for one volume: mesh, resolution, model, halo, memory estimate, actions.

    Parameters
    ----------
    volume : str or Volume
        ``"phantom"`` / ``"phantom:N[:SEED]"`` (made at whatever size is picked), ``"mni"``,
        a path any :func:`data_tools.load_input` reads, a :class:`data_tools.Volume`, or a
        dataset folder (MSD / nnU-Net: ``dataset.json``, ``imagesTr/``): its cases are listed
        in ``panel.case`` (name, shape, spacing) and the chosen one is the input.
        Loaded volumes offer ``native`` (their own, possibly uneven, shape) or a cube side.
    mesh, resolution, halo, backend
        initial choices (mesh default: the most cube-like mesh of all devices).
    model : str
        a preset (``"small"``, ``"paper"``) or the path of a plans file: nnU-Net's
        ``nnUNetPlans.json`` (its ``dataset.json`` beside it) or one ``workbench plan --data``
        wrote. The ``model`` control takes the same (type a path, press Enter). A plans
        network offers the cube sides its per-axis size multiple splits evenly (and the
        plans' own volume), exact halos and the explicit backend only, float32 or bfloat16
        (planned and trained in that dtype; runs compute float32), and no rematerialisation.
    budget_gib : float
        per-device memory budget the estimate is checked against.
    plan_for : {"inference", "training"}
        what the first estimate plans (the ``plan for`` control; setting it here spares
        compiling the other one first).
    estimate : {"background", "sync", "off"}
        when to run the planner: in a background thread (default), before returning from
        every change (scripts, tests), or never.
    estimator : MemoryEstimator, optional
        share one cache between panels.

    The buttons call :meth:`run_inference`, :meth:`compare`, :meth:`train`, :meth:`view`,
    :meth:`open_napari` and :meth:`memory_vs_devices`; results are kept in
    ``panel.result``, ``panel.report``, ``panel.history`` and figures in ``panel.figures``.
    """

    def __init__(
        self,
        volume="phantom:32",
        *,
        mesh=None,
        resolution=None,
        model: str = "small",
        halo="exact",
        backend: str = "explicit",
        budget_gib: float = 16.0,
        plan_for: str = "inference",
        steps: int = 5,
        seed: int = 0,
        n_devices: int | None = None,
        estimate: str = "background",
        estimator: MemoryEstimator | None = None,
    ):
        import jax

        from workbench.app.session import Session
        from workbench.model.unet import PRESETS as PRESET_CONFIGS

        devices = jax.devices()
        self.n_devices = len(devices) if n_devices is None else int(n_devices)
        self.platform = devices[0].platform
        self.session = Session(volume, seed=seed)
        self.memory = EstimateView(
            estimator, mode=estimate, budget_gib=budget_gib, plan_for=plan_for, style={"description_width": "110px"}
        )
        self.estimator, self.plan_for, self.budget, self.estimate = (
            self.memory.estimator,
            self.memory.plan_for,
            self.memory.budget,
            self.memory.label,
        )
        self._refreshing = False
        self.inference = self.history = None
        self.summary = ""
        self.viewer = None  # napari's
        self.notebook_viewer = None  # the in-notebook viewer (workbench.ui.notebook_viewer)

        spec = self._initial_mesh(mesh)
        model = str(model)
        preset = is_preset(model)
        self.controls = Controls(
            self.n_devices,
            spec,
            resolution=str(resolution or self.session.default_size),
            model=model,
            dtype=PRESET_CONFIGS[model.strip()]["dtype"] if preset else "float32",
            halo_choices=halo_options(self.config_for(model)) if preset else [("exact", "exact")],
            halo=halo if preset else "exact",
            backend=backend,
            steps=steps,
        )
        for name, widget in vars(self.controls).items():  # panel.mesh, panel.run_button, ...
            setattr(self, name, widget)
        self.case = self._case_picker()
        self.display = Display(self.status, self.output)
        self.figures = self.display.figures
        for name, action in (
            ("run_button", self.run_inference),
            ("compare_button", self.compare),
            ("train_button", self.train),
            ("view_button", self.view),
            ("napari_button", self.open_napari),
            ("memory_button", self.memory_vs_devices),
        ):
            self.display.on_click(getattr(self, name), action)
        for control in (*self.controls.choices, self.plan_for):
            control.observe(self._on_change, names="value")
        self._refresh()

    def _case_picker(self):
        """A dropdown of a dataset's cases (None without a dataset): choosing one makes it the input."""
        if self.session.dataset is None:
            return None
        from data_tools.io import volume_info

        options = []
        for files in (*self.session.dataset.training, *self.session.dataset.test):
            info = volume_info(files.images[0])
            grid = "x".join(map(str, info.shape))
            mm = "x".join(f"{s:.3g}" for s in info.spacing)
            options.append((f"{files.name}: {grid}, {mm} mm{'' if files.label else ', unlabelled'}", files.name))
        picker = W.Dropdown(options=options, value=self.session.case, description="case",
                            style={"description_width": "110px"}, layout=W.Layout(width="460px"))  # fmt: skip

        def pick(change):
            self.display.clear_error()
            try:
                self.session.select_case(change["new"])
            except USER_ERRORS as err:
                self.display.show_error(one_line(err))
                return
            self.inference = None
            self._refresh()

        picker.observe(pick, names="value")
        return picker

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
        """The network the controls select: a preset's ``UNetConfig`` or a plans file's
        ``NNUNetConfig`` (raises the user error of a bad plans file)."""
        return self.config_for(self.model.value, self.dtype.value, bool(self.remat.value))

    @staticmethod
    def config_for(model: str, dtype: str | None = None, remat: bool = False):
        return network_config(model, dtype, remat)

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        return self.session.shape_for(self.resolution.value)

    def settings(self):
        """The :class:`~workbench.app.session.Settings` the controls select."""
        from workbench.app.session import Settings

        return Settings(
            self.volume_shape,
            self.spec,
            str(self.model.value).strip(),
            self.dtype.value,
            bool(self.remat.value),
            self.halo.value,
            self.backend.value,
        )

    def plan_key(self) -> PlanKey:
        """What the memory estimate is computed for (one volume per data-parallel group)."""
        spec = self.spec
        train = self.memory.train  # a training step always exchanges exact halos
        return PlanKey(
            self.config,
            self.volume_shape,
            spec,
            self.backend.value,
            "exact" if train else self.halo.value,
            train,
            batch=spec.data,
        )

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
        try:
            self.display.clear_error()
            data = self.data.value
            options = mesh_choices(self.n_devices, data=data)
            if [spec for _, spec in self.mesh.options] != [spec for _, spec in options]:
                wanted = MeshSpec(*self.mesh.value.spatial, data=data)
                specs = [spec for _, spec in options]
                self.mesh.options = options
                self.mesh.value = wanted if wanted in specs else auto_mesh(self.n_devices, data=data)
            self.mesh_picture.value = mesh_svg(self.spec)
            if not is_preset(self.model.value):
                self.remat.value = False  # nnU-Net's networks have no rematerialisation
            try:
                config = self.config
            except USER_ERRORS as err:  # a bad plans file: one red line, no estimate
                self.display.show_error(err)
                self.memory.block(one_line(err))
                return
            plans = is_plans_config(config)
            self.remat.disabled = plans
            backend = self.backend.value
            self.backend.options = ("explicit",) if plans else PLAN_BACKENDS  # what spec_memory plans
            self.backend.value = backend if backend in self.backend.options else "explicit"
            halo = self.halo.value
            self.halo.options = halo_options(config)
            self.halo.value = halo if halo in [v for _, v in self.halo.options] else "exact"
            multiple = config.multiple
            sizes = [str(n) for n in valid_resolutions(self.spec, multiple)]
            sizes += [s for s in ([plans_shape(config)] if plans else []) if s and s not in sizes]
            self.resolution.options = (["native"] if self.session.volume is not None else []) + sizes
            try:
                self.padding.value = html.escape(padding_note(self.volume_shape, self.spec, multiple))
            except USER_ERRORS as err:
                self.padding.value = red(one_line(err))
                self.memory.block(one_line(err))
                return
        finally:
            self._refreshing = False
        self.refresh_estimate()

    def refresh_estimate(self) -> None:
        """(Re)start the planner for the current choices; the label updates when it is done."""
        self.memory.refresh(self.plan_key())

    def wait_estimate(self, timeout: float | None = None) -> dict:
        """Wait for the current estimate; returns the planner's bytes (raises its error)."""
        return self.memory.wait(timeout)

    @property
    def fits(self) -> bool | None:
        return self.memory.fits

    @property
    def last_estimate(self) -> dict | None:
        return self.memory.last

    @property
    def estimate_mode(self) -> str:
        return self.memory.mode

    @estimate_mode.setter
    def estimate_mode(self, mode: str) -> None:
        self.memory.mode = mode

    @property
    def error(self) -> str | None:
        """The red line's text after a user error, else None."""
        return self.display.error

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
            + ("" if peak is None else f", measured peak {format_bytes(peak)} per device")
        )
        self.display.show_status(self.summary)
        self.display.show_figure(
            "slices", plot_slices(self.inference.loaded.image, self.inference.labels, result.layout)
        )
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
            f"reference {r['reference_seconds']:.2f} s ({r['seconds'] / r['reference_seconds']:.2f}×)"
        )
        self.display.show_status(self.summary)
        self.display.show_figure(
            "error",
            plot_slices(
                self.inference.loaded.image, self.inference.labels, result.layout, error=np.abs(self.signed_error)
            ),
        )
        label = f"{result.backend}, halo {result.halo}"
        self.display.show_figure(
            "seam",
            plot_seam_profile(
                {label: self.comparison.profile},
                predicted={label: predicted_artifact_depth(settings.config, result.halo)},
            ),
        )
        return r

    def train(self, steps: int | None = None, *, workdir=None) -> dict:
        """Train ``steps`` (default: the steps box); the trained weights replace the model's
        for later runs. Returns the training result dict."""
        from workbench.training.history import training_curves

        out = self.session.train(
            self.settings(), int(steps or self.steps.value), workdir=workdir, log=self.display.show_status
        )
        self.history, self.inference = out["history"], None
        rows = self.history["train"]
        self.display.show_status(
            f"trained {out['step']} steps in {out['loop_seconds']:.1f} s; "
            f"loss {rows[0]['loss']:.3f} → {rows[-1]['loss']:.3f}; weights in {out['workdir']}"
        )
        self.display.show_figure("curves", plot_curves(training_curves(self.history), title=f"training on {self.spec}"))
        return out

    def layers(self) -> list:
        """napari layer data of the last run with these settings (run first if needed): image,
        ground truth, prediction, error maps (after :meth:`compare`), halo band, shard boundaries."""
        from workbench.ui.napari.layers import inference_layers

        if self.inference is None or self.session.last_settings != self.settings():
            self.run_inference()
        return inference_layers(self.inference)

    def view(self, **options):
        """The in-notebook viewer of the last run with these settings (run first if needed),
        shown below the panel: slices streamed from the kernel, so it works on a remote
        JupyterLab. ``options`` go to :func:`workbench.ui.notebook_viewer.viewer`."""
        from workbench.ui.notebook_viewer import viewer

        if self.inference is None or self.session.last_settings != self.settings():
            self.run_inference()
        if self.notebook_viewer is not None:
            self.notebook_viewer.close()  # one live viewer per panel
        self.notebook_viewer = viewer(self.inference, **options)
        self.display.show_widget(self.notebook_viewer)
        self.display.show_status(self.notebook_viewer.summary())
        return self.notebook_viewer

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
        self.display.show_status(f"opened napari with {len(layers)} layers")
        return self.viewer

    def screenshot(self, path, *, ndisplay: int = 3):
        """Save a picture of the shards to ``path``: a napari screenshot where a display
        exists, else matplotlib slices. Returns (path, how): ``"napari"`` or ``"matplotlib"``
        (:func:`workbench.ui.napari.view.display_available` says why napari could not)."""
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
            how = "matplotlib"
        self.display.show_status(f"saved {Path(path).name} ({how})")
        return path, how

    def memory_vs_devices(self, counts=None) -> list[dict]:
        """Planner peak per device for the current choices on 1, 2, 4 … devices (cube-like meshes)."""
        from workbench.app.planning import memory_vs_devices

        counts = counts or [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= self.n_devices]
        rows = memory_vs_devices(self.estimator, self.plan_key(), counts)
        self.display.show_figure("memory", plot_memory(rows, budgets_gib=(self.budget.value,)))
        return rows

    # -- display ------------------------------------------------------------------------------------
    @property
    def widget(self) -> W.VBox:
        """The whole panel as one ipywidgets box."""
        if not hasattr(self, "_box"):
            title = f"<b>Partitioned U-Net workbench</b> · {self.n_devices} {self.platform} devices"
            self._box = self.controls.box(title, self.memory)
            if self.case is not None:
                name = html.escape(self.session.dataset.name)
                self._box.children = (self._box.children[0], W.HBox([self.case, W.HTML(f"of {name}")]),
                                      *self._box.children[1:])  # fmt: skip
        return self._box

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
