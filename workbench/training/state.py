"""The train state: learning-rate schedule, optimiser, and the state pytree orbax saves.

``create_train_state`` gives ``{params, batch_stats?, opt_state, step, rng}``;
``abstract_train_state`` its shapes (with a sharding) for restoring and for
ahead-of-time compilation; ``variables_of`` the model variables inside it.
"""

from __future__ import annotations

from workbench.training.config import TrainConfig

__all__ = [
    "learning_rate_schedule",
    "make_optimizer",
    "create_train_state",
    "abstract_train_state",
    "variables_of",
]


def learning_rate_schedule(tc: TrainConfig):
    import optax

    if tc.schedule == "constant":
        return optax.constant_schedule(tc.learning_rate)
    if tc.schedule == "cosine":
        return optax.cosine_decay_schedule(tc.learning_rate, decay_steps=tc.steps, alpha=0.05)
    return optax.warmup_cosine_decay_schedule(
        0.0,
        tc.learning_rate,
        warmup_steps=max(1, tc.warmup_steps or tc.steps // 20),
        decay_steps=tc.steps,
        end_value=0.05 * tc.learning_rate,
    )


def make_optimizer(tc: TrainConfig, config=None):
    """optax chain: optional global-norm clipping, then Adam / Adafactor / SGD-momentum.

    With batch or instance norm, the bias of each convolution feeding a norm layer is
    frozen (``optax.set_to_zero``): the norm subtracts it again, so its gradient is zero
    in exact arithmetic, and Adam would turn the rounding noise left in it into full-size
    steps that differ between meshes (summation order). Freezing it changes no output.
    """
    import optax

    lr = learning_rate_schedule(tc)
    if tc.optimizer == "adam":
        opt = optax.adam(lr)
    elif tc.optimizer == "adafactor":
        opt = optax.adafactor(lr, multiply_by_parameter_scale=False)
    else:
        opt = optax.sgd(lr, momentum=0.9)
    if tc.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(tc.clip_norm), opt)
    from workbench.training.models import NNUNetConfig

    if isinstance(config, NNUNetConfig):
        from workbench.model.nnunet import param_name

        # every convolution there feeds an InstanceNorm but the heads
        normed = frozenset(param_name(la.name) for la in config.spec.layers if la.op == "conv" and la.norm)
        return optax.multi_transform(
            {"train": opt, "frozen": optax.set_to_zero()}, lambda params: _frozen_spec_labels(params, normed)
        )
    if config is None or config.norm not in ("batch", "instance"):
        return opt
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, _frozen_labels)


def _frozen_spec_labels(params, normed):
    """'frozen' for the bias of a spec network's convolution followed by InstanceNorm."""
    import jax

    def label(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        return "frozen" if len(keys) == 2 and keys[1] == "bias" and keys[0] in normed else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def _frozen_labels(params):
    """'frozen' for the biases of convolutions followed by a norm layer, else 'train'."""
    import jax

    def label(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        conv_bias = (
            len(keys) >= 3
            and keys[-1] == "bias"
            and keys[-2].startswith("conv")
            and keys[-3].startswith(("down", "dec"))
        )
        return "frozen" if conv_bias else "train"

    return jax.tree_util.tree_map_with_path(label, params)


def create_train_state(config, tc: TrainConfig, *, variables=None) -> dict:
    """{params, batch_stats?, opt_state, step, rng}: a plain pytree that orbax saves."""
    import jax
    import jax.numpy as jnp

    from workbench.training.models import init_model

    if variables is None:
        variables = init_model(config, seed=tc.seed).variables
    params = variables["params"]
    state = {
        "params": params,
        "opt_state": make_optimizer(tc, config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(tc.seed + 1)),
    }
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    return state


def abstract_train_state(config, tc: TrainConfig, sharding=None):
    """Shapes/dtypes (with ``sharding``) of :func:`create_train_state`, allocating nothing."""
    import jax

    shapes = jax.eval_shape(lambda: create_train_state(config, tc))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def variables_of(state) -> dict:
    """The model variables (``params``, ``batch_stats``) of a train state."""
    out = {"params": state["params"]}
    if "batch_stats" in state:
        out["batch_stats"] = state["batch_stats"]
    return out
