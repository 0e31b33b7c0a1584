"""Checkpoints (orbax), restoring a model from them, and shipped weights (flax msgpack).

Training checkpoints live in ``WORKDIR/checkpoints/<step>/`` and are written by an
orbax ``CheckpointManager``: each save goes to a temporary folder renamed when complete
(atomic), only the last ``keep`` are kept, and each holds the whole train state
(parameters, optimiser state, batch-norm statistics, step, RNG key) plus a JSON ``meta``
item (model config, train config, class names). :meth:`Checkpoints.restore` takes the
newest readable step: a corrupt one is skipped, with a message saying so, and the
previous one used. Arrays are restored onto whatever shardings the caller asks for, so
a checkpoint written on one mesh loads on another; :func:`restore_model` gives the
model of the newest one, :func:`load_model` that of a folder or a weights file.

Shipped weights (``workbench/model/weights/*.msgpack``) hold just the variables and the
model's config in one flax-serialised file; :func:`pretrained` loads them.

Example
-------
>>> model = pretrained("phantom")          # the small preset trained on phantoms
>>> model.config.num_classes
3
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.atomic import write_bytes_atomic
from workbench.errors import InputNotFoundError, UserError
from workbench.training.config import TrainConfig
from workbench.training.models import (
    CheckpointMismatchError,
    check_same_model,
    describe_model,
    init_model,
    model_with,
    parse_model,
)
from workbench.training.state import abstract_train_state, variables_of

__all__ = [
    "Checkpoints",
    "CheckpointMismatchError",
    "restore_model",
    "save_weights",
    "load_weights",
    "load_model",
    "pretrained",
    "PRETRAINED",
    "WEIGHTS_DIR",
    "weights_for_input",
]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "model" / "weights"
PRETRAINED = {"phantom": "phantom_small.msgpack", "mni": "mni_small.msgpack"}


class Checkpoints:
    """Orbax checkpoints of a train state in ``directory`` (created when first saved)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, writer: bool = False):
        """``writer=True`` for the training run that saves: it creates the folder and removes
        the temporary folders of interrupted saves. Readers leave both alone (a run may be
        writing at the same time)."""
        import orbax.checkpoint as ocp

        if not isinstance(keep, int) or keep < 1:
            raise UserError(f"keep={keep!r} must be an integer >= 1 (checkpoints to keep)")
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=writer,
            create=writer,
        )
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        ocp = self._ocp
        if step in self.steps():
            return
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        ocp = self._ocp
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, abstract_state: Any, *, expect_model=None, log=print):
        """(state, meta, step) of the newest readable checkpoint, or None when there is none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with the target
        shardings. A step that cannot be read is skipped (and reported through ``log``);
        a step written for another model config than ``expect_model`` (a config: compared as
        configs, see :func:`workbench.training.models.check_same_model`) raises
        :class:`CheckpointMismatchError`.
        """
        ocp = self._ocp
        failures = []
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as err:  # noqa: BLE001 - any unreadable file means a corrupt step
                failures.append((step, err))
                log(
                    f"checkpoint step {step} in {self.directory} is unreadable ({_short(err)}); trying the previous one"
                )
                continue
            if expect_model is not None:
                check_same_model(meta.get("model", {}), expect_model, where=f"{self.directory} step {step}")
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
                )
            except Exception as err:  # noqa: BLE001
                failures.append((step, err))
                log(
                    f"checkpoint step {step} in {self.directory} is unreadable ({_short(err)}); trying the previous one"
                )
                continue
            return restored["state"], meta, step
        if failures:
            steps = ", ".join(str(s) for s, _ in failures)
            raise UserError(
                f"no readable checkpoint in {self.directory} (steps {steps} are corrupt: "
                f"{_short(failures[-1][1])}); delete the folder to start again"
            )
        return None

    def close(self) -> None:
        self.manager.close()


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def restore_model(ckpt_dir, *, log=print):
    """(Model, meta) from the newest readable orbax checkpoint in ``ckpt_dir``."""
    import jax

    ckpts = Checkpoints(ckpt_dir)
    steps = ckpts.steps()
    if not steps:
        raise InputNotFoundError(f"{ckpt_dir} holds no checkpoint; pass a folder written by workbench train")
    meta = None
    for step in reversed(steps):
        try:
            meta = ckpts.read_meta(step)
            break
        except Exception:  # noqa: BLE001 - restore() below reports the skipped steps
            continue
    if meta is None:
        ckpts.restore(None, log=log)  # raises the "no readable checkpoint" error
    config = parse_model(meta.get("model"), where=f"checkpoint {ckpt_dir}")
    tc = TrainConfig.from_dict(meta["train"])
    device = jax.local_devices()[0]  # this process's own copy, also in a multi-process run
    abstract = abstract_train_state(config, tc, jax.sharding.SingleDeviceSharding(device))
    state, meta, step = ckpts.restore(abstract, expect_model=config, log=log)
    ckpts.close()
    meta = {**meta, "step": step}
    return model_with(config, variables_of(state), f"checkpoint {ckpt_dir} (step {step})"), meta


# -- shipped weights --------------------------------------------------------------------
def save_weights(path: str | os.PathLike, model, meta: dict | None = None) -> Path:
    """Write a model's variables and config (plus ``meta``) as one flax msgpack file, atomically."""
    from flax import serialization

    path = Path(path)
    payload = {
        "variables": _to_numpy(model.variables),
        "config": json.dumps(describe_model(model.config)),
        "meta": json.dumps(meta or {}),
    }
    return write_bytes_atomic(path, serialization.msgpack_serialize(payload))


def _to_numpy(tree):
    return _tree_map(np.asarray, tree)


def load_weights(path: str | os.PathLike):
    """(Model, meta) from a file written by :func:`save_weights`."""
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"weights file {path} does not exist; pass a .msgpack file or a training folder")
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        config = parse_model(json.loads(payload["config"]), where=f"weights file {path}")
        meta = json.loads(payload["meta"])
        variables = payload["variables"]
    except Exception as err:  # noqa: BLE001 - anything unreadable is the same problem for the user
        raise UserError(f"weights file {path} is not readable ({_short(err)}); re-download or re-train it") from None
    import jax
    import jax.numpy as jnp

    expected = _shapes(jax.eval_shape(lambda: init_model(config).variables))
    if _shapes(variables) != expected:
        raise UserError(f"weights file {path} does not match its own config {config}; the file is damaged")
    return model_with(config, _tree_map(jnp.asarray, variables), f"weights file {path}"), meta


def _tree_map(fn, tree):
    if hasattr(tree, "items"):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _shapes(tree):
    if hasattr(tree, "items"):
        return {k: _shapes(v) for k, v in tree.items()}
    return tuple(np.shape(tree))


def load_model(path: str | os.PathLike, *, log=print):
    """(Model, meta) from a ``.msgpack`` file, a training folder or its ``checkpoints`` folder."""
    path = Path(path)
    if path.is_file():
        return load_weights(path)
    if not path.is_dir():
        raise InputNotFoundError(
            f"checkpoint {path} does not exist; pass a training folder (--checkpoint-dir of "
            "workbench train) or a .msgpack weights file"
        )
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return restore_model(ckpt_dir, log=log)


def pretrained(task: str = "phantom"):
    """The shipped ``small`` model for ``task`` (``phantom`` or ``mni``)."""
    if task not in PRETRAINED:
        raise UserError(f"no shipped weights for {task!r}; choose one of {sorted(PRETRAINED)}")
    path = WEIGHTS_DIR / PRETRAINED[task]
    if not path.is_file():
        raise InputNotFoundError(
            f"shipped weights {path} are missing from the installation; reinstall the package "
            f"or train them (see {WEIGHTS_DIR / 'README.md'})"
        )
    model, _ = load_weights(path)
    return model


def weights_for_input(spec: str) -> str:
    """Which shipped model suits an input spec: ``mni`` for MNI inputs, else ``phantom``."""
    return "mni" if str(spec).strip().lower().startswith("mni") else "phantom"
