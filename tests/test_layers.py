"""The U-Net's up-sampling and pooling layers equal the flax layers they replace."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from workbench.model.layers import UpConv2, he_normal, max_pool2


def test_upconv2_equals_flax_conv_transpose_with_the_same_parameters():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5, 6)), jnp.float32)
    flax_layer = nn.ConvTranspose(7, (2, 2, 2), strides=(2, 2, 2), padding="VALID", kernel_init=he_normal)
    variables = flax_layer.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda p: p + 0.1, variables)  # a non-zero bias too
    ours = UpConv2(7)
    # same parameter names, shapes and initial values (checkpoints and seeds carry over)
    init = ours.init(jax.random.key(1), x)
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, variables)
    np.testing.assert_array_equal(init["params"]["kernel"], flax_layer.init(jax.random.key(1), x)["params"]["kernel"])
    want = flax_layer.apply(variables, x)
    got = ours.apply(variables, x)
    assert got.shape == (2, 6, 8, 10, 7)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    # gradients with respect to input and kernel too
    g = jnp.asarray(np.random.default_rng(2).standard_normal(want.shape), jnp.float32)
    gw = jax.vjp(lambda v, x: flax_layer.apply(v, x), variables, x)[1](g)
    go = jax.vjp(lambda v, x: ours.apply(v, x), variables, x)[1](g)
    for a, b in zip(jax.tree.leaves(go), jax.tree.leaves(gw)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * float(jnp.abs(b).max()))


def test_max_pool2_values_equal_flax_and_the_gradient_shares_ties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 8, 3)).astype(np.float32)
    x[0, :2, :2, :2, 0] = 1.5  # one window of 8 tied maxima
    x[1, 2:4, :2, :2, 1] = [[[2, 2], [0, 2]], [[0, 0], [0, -1]]]  # 3 tied maxima
    x = jnp.asarray(x)
    np.testing.assert_array_equal(max_pool2(x), nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2)))
    g = jnp.asarray(rng.standard_normal((2, 2, 3, 4, 3)), jnp.float32)
    dx = jax.vjp(max_pool2, x)[1](g)[0]
    np.testing.assert_allclose(dx[0, :2, :2, :2, 0], np.full((2, 2, 2), g[0, 0, 0, 0, 0] / 8), rtol=1e-6)
    window = np.asarray(dx[1, 2:4, :2, :2, 1])
    np.testing.assert_allclose(window[[0, 0, 0], [0, 0, 1], [0, 1, 1]], g[1, 1, 0, 0, 1] / 3, rtol=1e-6)
    assert np.count_nonzero(window) == 3
    # elsewhere (no ties) the gradient is the first-max rule of flax's max_pool
    dflax = jax.vjp(lambda x: nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2)), x)[1](g)[0]
    untied = np.ones(x.shape, bool)
    untied[0, :2, :2, :2, 0] = untied[1, 2:4, :2, :2, 1] = False
    np.testing.assert_array_equal(np.asarray(dx)[untied], np.asarray(dflax)[untied])
    # and everywhere the rule of jnp.max (the custom gradient keeps only the input)
    dmax = jax.vjp(lambda x: x.reshape(2, 2, 2, 3, 2, 4, 2, 3).max(axis=(2, 4, 6)), x)[1](g)[0]
    np.testing.assert_array_equal(dx, dmax)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_max_pool2_keeps_the_dtype(dtype):
    x = jnp.ones((1, 2, 2, 2, 1), dtype)
    y, back = jax.vjp(max_pool2, x)
    assert y.dtype == dtype and back(jnp.ones_like(y))[0].dtype == dtype


def test_max_pool2_refuses_odd_sizes_with_the_fix():
    with pytest.raises(ValueError, match="even spatial sizes, got 3x2x2; pad the volume"):
        max_pool2(jnp.ones((1, 3, 2, 2, 1)))


def test_conv3d_joins_input_and_kernel_gradients_in_one_barrier():
    from jax import lax

    from workbench.model.layers import conv3d

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 5, 4, 3, 2)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 2, 4)), jnp.float32)

    def plain(x, k):
        return lax.conv_general_dilated(x, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    loss = lambda f: lambda x, k: (jnp.tanh(f(x, k)) ** 2).sum()  # noqa: E731
    np.testing.assert_array_equal(conv3d(x, k, "SAME"), plain(x, k))
    for a, b in zip(
        jax.grad(loss(lambda x, k: conv3d(x, k, "SAME")), (0, 1))(x, k), jax.grad(loss(plain), (0, 1))(x, k)
    ):
        np.testing.assert_array_equal(a, b)
    # the backward pass computes the kernel gradient together with the input gradient
    jaxpr = jax.make_jaxpr(jax.grad(loss(lambda x, k: conv3d(x, k, "SAME")), (0, 1)))(x, k).jaxpr
    barriers = [e for e in jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    shapes = [sorted(tuple(v.aval.shape) for v in e.outvars) for e in barriers]
    assert sorted([x.shape, k.shape]) in shapes
