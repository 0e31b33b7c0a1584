"""npe2 dock widget: partitioned inference on the active image layer.

Thin GUI over the library: the controls are attributes (``image``, ``network``,
``plans``, ``mesh``, ``backend``, ``halo``, ``reference``, ``run_button``, ``status``) so
tests set ``.value`` and call :meth:`PartitionedInferenceWidget.run`. ``network`` picks a
preset (``small``: the shipped phantom weights; ``paper``: random weights, seed 0) or
``plans file``: the network of the plans file in ``plans`` (nnU-Net's ``nnUNetPlans.json``
with its dataset.json beside it, or one ``workbench plan --data`` wrote) with random weights
(seed 0), run with exact halos (:func:`workbench.app.plans_network.infer_plans`). Presets go
through :func:`workbench.app.infer` (the same model and report as ``workbench infer``);
layers come from :func:`workbench.ui.napari.layers.build_layers`.
"""

from __future__ import annotations

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, PushButton

from workbench.errors import USER_ERRORS, one_line
from workbench.options import HALO_MODES, PLAN_BACKENDS, PRESETS

PLANS_CHOICE = "plans file"  # the network choice that reads the ``plans`` box

__all__ = ["PartitionedInferenceWidget"]


def _devices() -> int:
    """JAX device count, simulating CPU devices if JAX has not started yet."""
    from workbench.execute.devices import DEFAULT_CPU_DEVICES, configure_cpu_devices

    try:
        configure_cpu_devices(DEFAULT_CPU_DEVICES)
    except ValueError:
        pass  # JAX already started with another count: offer meshes for the devices it has
    import jax

    return len(jax.devices())


class PartitionedInferenceWidget(Container):
    """Run the U-Net partitioned over a device mesh on an image layer; add the result layers."""

    def __init__(self, napari_viewer):
        from workbench.mesh import auto_mesh, valid_meshes

        super().__init__(labels=True)
        self._viewer = napari_viewer
        self._models: dict = {}
        self._added: list[str] = []
        self.last_report: dict | None = None
        n = _devices()
        meshes = [str(m) for m in valid_meshes(n)]
        self.image = ComboBox(label="image", choices=self._image_choices, nullable=True)
        self.network = ComboBox(label="model", choices=[*PRESETS, PLANS_CHOICE], value="small")
        self.plans = FileEdit(label="plans file", mode="r", filter="*.json", visible=False)
        self.mesh = ComboBox(label="mesh (z×y×x)", choices=meshes, value=str(auto_mesh(n)))
        self.backend = ComboBox(label="backend", choices=PLAN_BACKENDS, value="explicit")
        self.halo = ComboBox(label="halo", choices=HALO_MODES, value="exact")
        self.reference = CheckBox(text="compare with the single-device reference", value=True)
        self.run_button = PushButton(text="Run partitioned inference")
        self.status = Label(value=f"{n} devices")
        self.network.changed.connect(lambda _value: setattr(self.plans, "visible", self.uses_plans))
        self.extend(
            [
                self.image,
                self.network,
                self.plans,
                self.mesh,
                self.backend,
                self.halo,
                self.reference,
                self.run_button,
                self.status,
            ]
        )
        self.run_button.changed.connect(self.run)
        events = napari_viewer.layers.events
        for event in (events.inserted, events.removed, events.moved):
            event.connect(self._refresh)
        selection = napari_viewer.layers.selection.events.active
        selection.connect(self._refresh)
        self._refresh()

    def _image_choices(self, _widget=None):
        from napari.layers import Image

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Image)]

    def _refresh(self, _event=None):
        from napari.layers import Image

        self.image.reset_choices()
        active = self._viewer.layers.selection.active
        if isinstance(active, Image):
            self.image.value = active

    @property
    def uses_plans(self) -> bool:
        return self.network.value == PLANS_CHOICE

    def model(self):
        """The chosen network's :class:`~workbench.app.models.ModelChoice`: the shipped phantom
        model of the small preset (random weights if they are missing), the paper preset with
        random weights, or a plans file's network with random weights (seed 0). A missing or
        unreadable plans file raises one user error."""
        from workbench.app import resolve_model
        from workbench.app.plans_network import network_config, plans_model

        if self.uses_plans:
            path = str(self.plans.value) if str(self.plans.value) not in ("", ".") else ""
            if not path:
                from workbench.errors import UserError

                raise UserError(
                    "model 'plans file' needs a plans file; choose nnUNetPlans.json or a workbench plan --data file"
                )
            config = network_config(path)  # read again when the file changes
            key = config
        else:
            key = self.network.value
        if key not in self._models:
            self._models[key] = plans_model(key) if self.uses_plans else resolve_model(key, task="phantom")
        return self._models[key]

    def run(self, _value=None) -> list | None:
        """Infer on the selected image layer and add the result layers (returned).

        Bad input (no layer, not 3-D, a halo the backend lacks, ...) shows one error
        notification and returns ``None``.
        """
        from napari.utils.notifications import show_error

        from workbench.ui.napari.view import add_layers

        try:
            layers = self.result_layers()
        except USER_ERRORS as err:
            self.status.value = f"error: {one_line(err)}"
            show_error(f"partitioned inference: {one_line(err)}")
            return None
        names = [kwargs["name"] for _, kwargs, _ in layers]
        for stale in self._added:  # layers of the previous run this one does not replace
            if stale not in names and stale in self._viewer.layers:
                self._viewer.layers.remove(stale)
        self._added = names
        return add_layers(self._viewer, layers)

    def result_layers(self) -> list:
        """Run inference and return the layer data tuples (raises a user error on bad input)."""
        from workbench.analysis.receptive import halo_width
        from workbench.app import check_run_options, infer, load_volume, summary_line
        from workbench.errors import UserError
        from workbench.ui.napari.layers import build_layers

        layer = self.image.value
        if layer is None:
            raise UserError("no image layer selected; open or add a 3-D image layer first")
        data = layer.data[0] if layer.multiscale else layer.data
        if layer.rgb or np.ndim(data) != 3:
            raise UserError(
                f"image layer {layer.name!r} has {np.ndim(data)} dimensions {tuple(np.shape(data))}"
                f"{' (RGB)' if layer.rgb else ''}; partitioned inference needs a 3-D (Z, Y, X) volume, "
                "so pick a 3-D image layer"
            )
        from data_tools.volume import Volume

        spacing = tuple(float(s) for s in layer.scale[-3:])
        loaded = load_volume(
            Volume(np.asarray(data), spacing=spacing, path=f"layer {layer.name!r}"), name=f"layer {layer.name!r}"
        )
        choice = self.model()
        if self.uses_plans:
            from workbench.app.plans_network import infer_plans

            if self.halo.value != "exact":
                raise UserError(f"halo {self.halo.value!r}: nnU-Net networks run with exact halos only; choose exact")
            halo, band = "exact", max(max(max(p) for p in layer.halo) for layer in choice.model.spec.layers)
            run = infer_plans(
                choice, loaded, self.mesh.value, backend=self.backend.value, reference=self.reference.value
            )
        else:
            halo, _ = check_run_options(choice.config, self.backend.value, self.halo.value, self.mesh.value)
            band = halo_width(halo, model=choice.config.as_dict())
            run = infer(
                choice, loaded, self.mesh.value, backend=self.backend.value, halo=halo, reference=self.reference.value
            )
        self.last_report = run.report
        self.status.value = summary_line(run.report)
        return build_layers(
            run.layout,
            spacing=spacing,
            prediction=run.labels,
            logits=run.logits,
            reference_prediction=run.reference_labels,
            signed=run.signed_error(),
            halo=halo,
            halo_band_width=band,
        )
