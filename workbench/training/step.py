"""The partitioned train step: build it, compile it ahead of time, feed it a batch.

The step runs the partitioned forward of :func:`workbench.execute.run.make_forward` (``explicit``
shard_map + halos, ``gspmd``, or the single-device ``reference``) under one ``jax.jit``:
the loss (:mod:`workbench.training.losses`) is reduced over the whole padded global array with
the padding masked, the gradients of the replicated parameters are summed over shards
and the ``data`` axis by the partitioner, batch-norm statistics come back replicated,
and the optax update runs on replicated parameters and optimiser state. So every
backend and mesh follows the same trajectory as the single-device reference.

:func:`compile_train_step` compiles this same step for abstract inputs: the memory
planner (:mod:`workbench.analysis.plan`) measures it, so a plan and a run agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import UserError
from workbench.training.config import TrainConfig
from workbench.training.state import abstract_train_state, make_optimizer, variables_of

__all__ = ["TrainStep", "build_train_step", "compile_train_step", "put_batch", "batch_keys", "put_batch_blocks"]


@dataclass
class TrainStep:
    """A jitted ``fn(state, images, labels) -> (state, metrics)`` and its shardings."""

    fn: Any
    layout: Any
    backend: str
    mesh: Any
    state_sharding: Any
    image_sharding: Any
    label_sharding: Any

    @property
    def target_shape(self):
        return self.layout.reference_shape if self.backend == "reference" else self.layout.padded_shape


_STEP_CACHE: dict = {}


def build_train_step(
    config, tc: TrainConfig, layout, *, backend: str | None = None, class_weights=None, devices=None
) -> TrainStep:
    """The partitioned train step for ``layout`` (volume shape + mesh) on ``backend``.

    Cached on everything the compiled step depends on, so a resumed or repeated run in
    the same process (tests, notebooks) reuses the compilation.
    """
    backend = backend or tc.backend
    key = (
        config,
        backend,
        layout.volume_shape,
        layout.mesh,
        tc.optimizer,
        tc.learning_rate,
        tc.schedule,
        tc.warmup_steps,
        tc.steps if tc.schedule != "constant" else None,
        tc.clip_norm,
        tc.dice_weight,
        tc.dice_classes,
        tc.comm_overlap,
        None if class_weights is None else tuple(float(w) for w in class_weights),
        None if devices is None else tuple(devices),
    )
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) > 16:
            _STEP_CACHE.clear()
        _STEP_CACHE[key] = _build_train_step(config, tc, layout, backend, class_weights, devices)
    return _STEP_CACHE[key]


def _build_train_step(config, tc, layout, backend, class_weights, devices) -> TrainStep:
    import jax
    import optax

    from workbench.training.models import NNUNetConfig

    if isinstance(config, NNUNetConfig):
        fn, mesh, image_sharding, state_sharding, objective = _nnunet_parts(config, tc, layout, backend, devices)
    else:
        fn, mesh, image_sharding, state_sharding, objective = _unet_parts(
            config, tc, layout, backend, class_weights, devices
        )
    label_sharding = image_sharding
    if backend != "reference":
        label_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*image_sharding.spec[:4]))
    tx = make_optimizer(tc, config)

    def step(state, images, labels):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_fn(params):
            variables = {**variables_of(state), "params": params}
            logits, updates = fn(variables, images, rng)
            loss, parts, counts = objective(logits, labels)
            return loss, (updates, parts, counts)

        (loss, (updates, parts, counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        deltas, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {
            **state,
            "params": optax.apply_updates(state["params"], deltas),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        if "batch_stats" in state:
            new["batch_stats"] = updates["batch_stats"]
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": optax.tree.norm(grads),
            "inter": counts[0],
            "pred": counts[1],
            "true": counts[2],
        }
        return new, metrics

    options = None
    if backend == "explicit":  # the split program's XLA options (workbench.model.interior)
        from workbench.model.interior import compiler_options, resolve_comm_overlap

        platform = mesh.devices.flat[0].platform
        options = compiler_options(resolve_comm_overlap(tc.comm_overlap, platform), platform)
    jitted = jax.jit(
        step,
        in_shardings=(state_sharding, image_sharding, label_sharding),
        out_shardings=(state_sharding, state_sharding),
        donate_argnums=0,
        compiler_options=options,
    )
    return TrainStep(jitted, layout, backend, mesh, state_sharding, image_sharding, label_sharding)


def _unet_parts(config, tc, layout, backend, class_weights, devices):
    """The paper U-Net's forward (``fn(variables, images, rng) -> (logits, updates)``), its
    shardings, and its objective ``(logits, labels) -> (loss, parts, counts)``."""
    from workbench.execute.run import make_forward
    from workbench.training.losses import confusion_counts, segmentation_loss

    fn, mesh, image_sharding, state_sharding = make_forward(
        config, layout, backend=backend, train=True, devices=devices, comm_overlap=tc.comm_overlap
    )
    volume_shape = layout.volume_shape
    weights = tuple(float(w) for w in (class_weights or (1.0,) * config.num_classes))
    if len(weights) != config.num_classes:
        raise UserError(f"class_weights {weights} must have one weight per class ({config.num_classes})")

    def objective(logits, labels):
        loss, parts = segmentation_loss(
            logits,
            labels,
            volume_shape,
            class_weights=weights,
            dice_weight=tc.dice_weight,
            dice_classes=tc.dice_classes,
        )
        return loss, parts, confusion_counts(logits, labels, volume_shape)

    return fn, mesh, image_sharding, state_sharding, objective


def _nnunet_parts(config, tc, layout, backend, devices):
    """An nnU-Net network's forward (every deep-supervision head; InstanceNorm, so no state to
    update), its shardings, and nnU-Net's loss (:mod:`workbench.training.nnunet_losses`)."""
    from workbench.execute.nnunet import make_nnunet_forward
    from workbench.training.nnunet_losses import nnunet_confusion_counts, nnunet_loss

    forward, mesh, image_sharding, state_sharding = make_nnunet_forward(
        config.spec, layout, backend=backend, dtype=config.dtype, deep_supervision=True, devices=devices, jit=False,
        comm_overlap=tc.comm_overlap,
    )  # fmt: skip
    volume_shape = layout.volume_shape
    loss_spec = config.loss_spec()

    def fn(variables, images, rng):
        return forward({"params": variables["params"]}, images), {}

    def objective(heads, labels):
        loss, parts = nnunet_loss(heads, labels, volume_shape, loss_spec)
        return loss, parts, nnunet_confusion_counts(heads[0], labels, volume_shape, loss_spec)

    return fn, mesh, image_sharding, state_sharding, objective


def compile_train_step(
    config, layout, train_config: TrainConfig | None = None, *, backend: str | None = None, batch: int | None = None
):
    """Compile :func:`build_train_step` (loss, gradients, clipping, optimiser update) for
    abstract inputs on ``layout``'s mesh, allocating nothing: parameters, batch
    statistics and optimiser state are arguments, donated, so the update is in place.

    ``train_config`` (default ``TrainConfig()``) chooses the optimizer, schedule, clip and
    loss weights; ``backend`` and ``batch`` default to its own. Returns the compiled
    program (``memory_analysis()``, ``as_text()``).
    """
    import jax
    import jax.numpy as jnp

    tc = train_config or TrainConfig()
    spec = layout.mesh
    backend = backend or tc.backend
    tc = tc.replace(
        mesh=f"{spec.z}x{spec.y}x{spec.x}",
        data_parallel=spec.data,
        backend=backend,
        batch=tc.batch if batch is None else batch,
    )
    ts = build_train_step(config, tc, layout, backend=backend)
    state = abstract_train_state(config, tc, ts.state_sharding)
    target = ts.target_shape
    images = jax.ShapeDtypeStruct((tc.batch, *target, config.in_channels), jnp.float32, sharding=ts.image_sharding)
    labels = jax.ShapeDtypeStruct((tc.batch, *target), jnp.int32, sharding=ts.label_sharding)
    return ts.fn.lower(state, images, labels).compile()


def put_batch(ts: TrainStep, images: np.ndarray, labels: np.ndarray):
    """Pad a host batch to the step's shape and place each shard on its device."""
    from workbench.training.data import pad_to, place

    return place(pad_to(images, ts.target_shape), ts.image_sharding), place(
        pad_to(labels, ts.target_shape), ts.label_sharding
    )


def batch_keys(ts: TrainStep, batch: int) -> list:
    """The distinct blocks this process's devices hold of a ``batch``-volume step: keys
    ``((b0, b1), (z0, z1), (y0, y1), (x0, x1))`` in the padded batch, as
    :func:`workbench.training.data.batch_blocks` takes them."""
    shape = (batch, *ts.target_shape)
    keys = []
    for index in ts.label_sharding.addressable_devices_indices_map(shape).values():
        key = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if key not in keys:
            keys.append(key)
    return keys


def put_batch_blocks(ts: TrainStep, batch: int, keys, blocks):
    """The step's (images, labels) global arrays from this process's blocks (``blocks[i]``
    holds ``keys[i]``; see :func:`batch_keys`); no process needs the whole batch."""
    from workbench.execute.distributed import put_blocks

    shape = (batch, *ts.target_shape)
    by_key = {key: block for key, block in zip(keys, blocks)}

    def reader(which):
        def read(index):
            return by_key[tuple(s.indices(n)[:2] for s, n in zip(index[:4], shape))][which]

        return read

    channels = blocks[0][0].shape[-1] if blocks else 1
    images = put_blocks((*shape, channels), ts.image_sharding, reader(0))
    return images, put_blocks(shape, ts.label_sharding, reader(1))
