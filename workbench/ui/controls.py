"""The panel's widgets: declared in one place, laid out in one place, no behaviour.

:class:`Controls` builds every control of :class:`workbench.ui.panel.WorkbenchPanel` with
its initial value; the panel wires them to the application layer.
"""

from __future__ import annotations

import ipywidgets as W

from workbench.mesh import MeshSpec
from workbench.options import PLAN_BACKENDS, PRESETS
from workbench.ui.choices import data_choices, mesh_choices

__all__ = ["Controls", "BUTTONS"]

# (attribute, label, icon) of the action buttons, in display order after the steps box.
BUTTONS = (
    ("run_button", "Run inference", "play"),
    ("compare_button", "Compare with reference", "balance-scale"),
    ("train_button", "Train N steps", "line-chart"),
    ("view_button", "View", "eye"),
    ("napari_button", "Open in napari", "cube"),
    ("memory_button", "Memory vs devices", "bar-chart"),
)


class Controls:
    """Every control of the panel as an attribute (tests set ``.value`` and click)."""

    def __init__(
        self,
        n_devices: int,
        spec: MeshSpec,
        *,
        resolution: str,
        model: str,
        dtype: str,
        halo_choices,
        halo,
        backend: str,
        steps: int,
    ):
        style = {"description_width": "110px"}
        layout = W.Layout(width="300px")
        self.data = W.Dropdown(
            options=data_choices(n_devices), value=spec.data, description="data-parallel", style=style, layout=layout
        )
        self.mesh = W.Dropdown(
            options=mesh_choices(n_devices, data=spec.data),
            value=spec,
            description="mesh z×y×x",
            style=style,
            layout=layout,
        )
        self.mesh_picture = W.HTML()
        self.resolution = W.Combobox(
            value=resolution,
            ensure_option=False,
            description="resolution",
            style=style,
            layout=layout,
            placeholder="a side N (N³) or native",
        )
        self.padding = W.HTML()
        # a preset, or the path of a plans file typed in (nnUNetPlans.json, or workbench plan --data's)
        self.model = W.Combobox(
            options=sorted(PRESETS),
            value=model,
            ensure_option=False,
            continuous_update=False,  # a typed path counts on Enter or leaving the box
            description="model",
            placeholder="small, paper or a plans file",
            style=style,
            layout=layout,
        )
        self.dtype = W.Dropdown(
            options=["float32", "bfloat16"], value=dtype, description="dtype", style=style, layout=layout
        )
        self.remat = W.Checkbox(
            value=False,
            description="rematerialise (less memory, more compute)",
            indent=False,
            layout=W.Layout(width="auto"),  # ipywidgets' default 300 px cuts the label
        )
        self.halo = W.Dropdown(options=halo_choices, value=halo, description="halo", style=style, layout=layout)
        self.backend = W.Dropdown(
            options=PLAN_BACKENDS, value=backend, description="backend", style=style, layout=layout
        )
        self.steps = W.BoundedIntText(
            value=steps, min=1, max=100_000, description="steps", layout=W.Layout(width="140px", flex="0 0 auto")
        )
        for name, label, icon in BUTTONS:
            setattr(
                self,
                name,
                W.Button(
                    description=label,
                    icon=icon,
                    # never narrower than its label: the row wraps instead of cutting it
                    layout=W.Layout(width="auto", min_width="fit-content", flex="0 0 auto"),
                    button_style="primary" if name == "run_button" else "",
                ),
            )
        self.status = W.HTML()
        self.output = W.Output(layout=W.Layout(border="1px solid #ddd", min_height="40px"))

    @property
    def choices(self) -> tuple:
        """The controls whose change refreshes the panel (and its memory estimate)."""
        return (self.data, self.mesh, self.resolution, self.model, self.dtype, self.remat, self.halo, self.backend)

    def box(self, title: str, memory) -> W.VBox:
        """The whole panel: mesh, resolution and model columns, memory, actions, status, output."""
        mesh_col = W.VBox([W.HTML("<b>Mesh</b>"), self.data, self.mesh, self.mesh_picture])
        res_col = W.VBox([W.HTML("<b>Resolution</b>"), self.resolution, self.padding], layout=W.Layout(width="340px"))
        model_col = W.VBox([W.HTML("<b>Model</b>"), self.model, self.dtype, self.remat, self.halo, self.backend])
        memory_row = W.VBox(
            [W.HTML("<b>Per-device memory</b>"), W.HBox([memory.plan_for, memory.budget]), memory.label]
        )
        # Rows wrap at narrow widths (a JupyterLab notebook beside its side panels) instead of
        # shrinking their children: no button or column is ever cut.
        wrap = W.Layout(flex_flow="row wrap", align_items="center", grid_gap="4px")
        actions = W.HBox(
            [
                self.run_button,
                self.compare_button,
                self.steps,
                self.train_button,
                self.view_button,
                self.napari_button,
                self.memory_button,
            ],
            layout=wrap,
        )
        columns = W.HBox([mesh_col, res_col, model_col], layout=W.Layout(flex_flow="row wrap"))
        return W.VBox([W.HTML(title), columns, memory_row, actions, self.status, self.output])
