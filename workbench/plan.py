"""Per-device memory from ahead-of-time compilation (nothing is allocated).

Inputs are ``jax.ShapeDtypeStruct``s carrying their shardings; ``lower().compile()``
gives XLA's own per-device accounting through ``compiled.memory_analysis()``.

Example
-------
>>> from workbench.mesh import ShardLayout
>>> cfg = UNetConfig.preset("small")
>>> layout = ShardLayout((128, 128, 128), "2x2x2", multiple=cfg.multiple)
>>> plan_memory(cfg, layout, backend="explicit", train=True)["peak"]  # bytes per device
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .mesh import ShardLayout
from .run import make_forward, memory_stats
from .unet import Model, UNetConfig

__all__ = ["compile_step", "plan_memory"]


def _loss_fn(fn, config: UNetConfig, volume_shape):
    z, y, x = volume_shape

    def loss(params, other, images, labels, rng):
        logits, updates = fn({**other, "params": params}, images, rng)
        logits = logits[:, :z, :y, :x, :]  # padding is not part of the loss
        onehot = jax.nn.one_hot(labels[:, :z, :y, :x], config.num_classes, dtype=logits.dtype)
        ce = -jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1)
        return jnp.mean(ce), updates

    return loss


def compile_step(config: UNetConfig, layout: ShardLayout, *, backend: str = "explicit",
                 halo="exact", train: bool = False, batch: int = 1):
    """Compile inference (``train=False``) or a loss-and-gradients step for abstract inputs."""
    if batch % layout.mesh.data:
        raise ValueError(
            f"batch of {batch} does not split over data={layout.mesh.data}; use a multiple of it"
        )
    fn, _, in_sharding, var_sharding = make_forward(config, layout, backend=backend, halo=halo, train=train)
    target = layout.reference_shape if backend == "reference" else layout.padded_shape
    variables = jax.eval_shape(lambda: Model.init(config).variables)
    abstract = lambda tree: jax.tree.map(  # noqa: E731
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=var_sharding), tree
    )
    images = jax.ShapeDtypeStruct((batch, *target, config.in_channels), jnp.float32, sharding=in_sharding)
    if not train:
        return jax.jit(fn).lower(abstract(variables), images).compile()
    label_sharding = in_sharding
    if backend != "reference":
        label_sharding = jax.sharding.NamedSharding(
            in_sharding.mesh, jax.sharding.PartitionSpec(*in_sharding.spec[:4])
        )
    labels = jax.ShapeDtypeStruct((batch, *target), jnp.int32, sharding=label_sharding)
    rng = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=var_sharding)
    loss = _loss_fn(fn, config, layout.volume_shape)
    params = abstract(variables["params"])
    other = abstract({k: v for k, v in variables.items() if k != "params"})
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return step.lower(params, other, images, labels, rng).compile()


def plan_memory(config: UNetConfig, layout: ShardLayout, *, backend: str = "explicit",
                halo="exact", train: bool = False, batch: int = 1) -> dict[str, int]:
    """Per-device bytes (argument, output, temp, alias, peak) of the compiled program."""
    return memory_stats(compile_step(config, layout, backend=backend, halo=halo, train=train, batch=batch))
