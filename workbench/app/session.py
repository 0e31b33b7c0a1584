"""A working session on one volume: what the notebook panel does, without widgets.

A :class:`Session` holds an input (a phantom spec, a path, a ``Volume``, or a dataset
folder whose cases it switches between with :meth:`Session.select_case`) and what has
been computed from it: the volume at each resolution asked for, the model for each
configuration (shipped weights, or the weights a :meth:`Session.train` produced), and
the last run and comparison. The panel's buttons are one call each:

>>> session = Session("phantom:32")
>>> settings = session.settings(mesh="2x2x2")
>>> run = session.run(settings)                      # partitioned inference
>>> run = session.compare(settings)                  # + the single-device reference
>>> run.report["max_abs_diff"] < 1e-5
True
"""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from workbench.errors import UserError
from workbench.mesh import MeshSpec, parse_resolution

__all__ = ["Settings", "Session"]


@dataclass(frozen=True)
class Settings:
    """What a run depends on: the grid, the mesh, the model and how it is partitioned.

    ``preset`` is a preset name (``small``, ``paper``) or the path of a plans file (nnU-Net's
    ``nnUNetPlans.json`` with its dataset.json beside it, or one ``workbench plan --data`` wrote).
    """

    shape: tuple[int, int, int]
    mesh: MeshSpec
    preset: str = "small"
    dtype: str = "float32"
    remat: bool = False
    halo: Any = "exact"
    backend: str = "explicit"

    @property
    def config(self):
        """A preset's ``UNetConfig``, or a plans file's ``NNUNetConfig`` (see :mod:`workbench.app.plans_network`)."""
        from workbench.app.plans_network import network_config

        return network_config(self.preset, self.dtype, self.remat)


class Session:
    """One input and the runs made on it (see the module docstring)."""

    def __init__(self, source="phantom:32", *, seed: int = 0):
        from data_tools.datasets import is_dataset, open_dataset
        from workbench.app.volumes import load_volume, parse_phantom_spec

        self.seed = seed
        self.dataset, self.case = None, None  # a dataset folder's Dataset: its cases are the inputs
        phantom = parse_phantom_spec(source) if isinstance(source, str) else None
        if isinstance(source, (str, os.PathLike)) and phantom is None and is_dataset(source):
            self.dataset = open_dataset(source)
            self._loaded, self._models = {}, {}
            self.select_case(self.dataset.names[0])
            return
        if phantom is not None:
            self.source, self.volume = f"phantom::{phantom[1]}", None
            shape = phantom[0] or (32, 32, 32)
            self.default_size: int | str = shape[0] if len(set(shape)) == 1 else "x".join(map(str, shape))
        else:
            self.volume = load_volume(source).volume  # native grid; resampled on demand
            self.source, self.default_size = source, "native"
        self._loaded: dict = {}
        self._models: dict = {}
        self.last = None  # the last Inference (with its reference after compare)
        self.last_settings: Settings | None = None

    # -- a dataset folder's cases --------------------------------------------------------------
    @property
    def cases(self) -> list[str]:
        """The dataset's case names (training, then test); empty without a dataset."""
        return [] if self.dataset is None else [c.name for c in (*self.dataset.training, *self.dataset.test)]

    def select_case(self, name: str) -> None:
        """Make case ``name`` of the dataset the input (its own grid; labels when it has them)."""
        from data_tools.datasets import read_case

        if self.dataset is None:
            raise UserError("this session has no dataset folder; pass one (dataset.json, imagesTr/) to select cases")
        self.volume = read_case(self.dataset, name)
        self.source, self.default_size, self.case = f"{self.dataset.root}#{name}", "native", name
        self._loaded.clear()
        self.last, self.last_settings = None, None

    # -- choices ---------------------------------------------------------------------------
    @property
    def native_shape(self) -> tuple[int, int, int] | None:
        return None if self.volume is None else tuple(self.volume.shape)

    def shape_for(self, resolution) -> tuple[int, int, int]:
        """The grid of a resolution choice: ``native``, N (N³) or ZxYxX."""
        shape = parse_resolution(resolution, allow_native=True)
        if shape == "native":
            if self.volume is None:
                raise UserError("a phantom has no native size; type a side such as 64")
            return self.native_shape
        if min(shape) < 4:
            raise UserError(f"resolution {resolution} is too small; use at least 8")
        return shape

    def settings(self, *, resolution=None, mesh="2x2x2", **choices) -> Settings:
        from workbench.mesh import parse_mesh

        return Settings(self.shape_for(resolution or self.default_size), parse_mesh(mesh), **choices)

    # -- data and model --------------------------------------------------------------------
    def load(self, shape):
        """The :class:`~workbench.app.volumes.LoadedVolume` at ``shape`` (cached)."""
        from workbench.app.volumes import load_volume

        shape = tuple(shape)
        if shape not in self._loaded:
            if self.volume is None:
                self._loaded[shape] = load_volume(f"phantom:{shape[0]}:{self.source.split('::')[1]}", shape=shape)
            else:
                self._loaded[shape] = load_volume(self.volume, shape=shape)
        return self._loaded[shape]

    def model(self, settings: Settings):
        """The :class:`~workbench.app.models.ModelChoice` for ``settings`` (trained weights after :meth:`train`)."""
        from workbench.app.models import resolve_model, task_for_input
        from workbench.app.plans_network import is_plans_config, plans_model

        key = settings.config
        if key not in self._models and is_plans_config(key):
            self._models[key] = plans_model(key, seed=self.seed)  # random weights (trained ones after train)
        if key not in self._models:
            task = "phantom" if self.volume is None else task_for_input(self.volume)
            self._models[key] = resolve_model(
                settings.preset, task=task, seed=self.seed, dtype=settings.dtype, remat=settings.remat
            )
        return self._models[key]

    # -- actions ---------------------------------------------------------------------------
    def run(self, settings: Settings, *, reference: bool = False, progress: bool = True):
        """Partitioned inference (and the reference with ``reference``); returns the Inference.

        ``progress`` shows a progress bar of the stages (tqdm: a widget in notebooks)."""
        from tqdm.auto import tqdm

        from workbench.app.inference import check_run_options, infer
        from workbench.app.plans_network import infer_plans, is_plans_config

        plans = is_plans_config(settings.config)
        if plans:
            if settings.halo != "exact":
                raise UserError(f"halo {settings.halo!r}: nnU-Net networks run with exact halos only; choose exact")
            run = infer_plans
        else:
            halo, _ = check_run_options(settings.config, settings.backend, settings.halo, settings.mesh)
            run = functools.partial(infer, halo=halo)
        with tqdm(
            total=3 + 2 * reference, desc="compare" if reference else "inference", leave=False, disable=not progress
        ) as bar:

            def stage(text):
                bar.set_postfix_str(text)
                bar.update()

            stage("loading the volume")
            loaded = self.load(settings.shape)
            stage("model")
            choice = self.model(settings)
            self.last = run(
                choice, loaded, settings.mesh, backend=settings.backend, reference=reference, on_stage=stage
            )
        self.last_settings = settings
        return self.last

    def compare(self, settings: Settings, *, progress: bool = True):
        """:meth:`run` with the single-device reference and the comparison."""
        return self.run(settings, reference=True, progress=progress)

    def train_config(self, settings: Settings, steps: int):
        """The :class:`~workbench.training.config.TrainConfig` of training ``steps`` with ``settings``."""
        from workbench.app.training import TrainConfig

        spec = settings.mesh
        native = settings.shape == self.native_shape
        if not native and len(set(settings.shape)) != 1:
            raise UserError(
                f"training resamples every volume to N³, not {settings.shape}; pick a cube side such as 64 (or native)"
            )
        if self.dataset is not None:
            data = str(self.dataset.root)  # the whole dataset, fold 0, read lazily
        else:
            data = "phantom" if self.volume is None else [self.volume]
        from workbench.app.plans_network import is_plans_config

        plans = is_plans_config(settings.config)  # nnU-Net's network: the loop reads the plans file
        return TrainConfig(
            data=data,
            resolution=None if native else settings.shape[0],
            mesh="x".join(str(s) for s in spec.spatial),
            data_parallel=spec.data,
            backend=settings.backend,
            model="small" if plans else settings.preset,
            plans=settings.config.plans["path"] if plans else None,
            model_overrides={"dtype": settings.dtype, **({} if plans else {"remat": bool(settings.remat)})},
            steps=int(steps),
            batch=spec.data,
            eval_cases=1,
            checkpoint_every=int(steps),
            seed=self.seed,
        )

    def train(self, settings: Settings, steps: int, *, workdir=None, log=print) -> dict:
        """Train ``steps`` steps; the trained weights replace the model of ``settings``' config."""
        from workbench.app.models import ModelChoice
        from workbench.app.training import train

        workdir = workdir or tempfile.mkdtemp(prefix="workbench-train-")
        out = train(self.train_config(settings, steps), workdir, progress=True, log=log)
        if out.get("model") is not None:
            self._models[settings.config] = ModelChoice(
                out["model"], "checkpoint", f"trained {out['step']} steps in {workdir}"
            )
            self.last = None
        out["workdir"] = str(workdir)
        return out
