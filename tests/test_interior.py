"""Interior + boundary convolutions (workbench.model.interior): geometry, the auto rule, and the
split convolution against the unsplit one (values and float64 gradients) on 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from workbench.errors import UserError
from workbench.mesh import ACTIVATION_SPEC, build_mesh, parse_mesh
from workbench.model.halo import halo_pad
from workbench.model.halo_direct import direct_applies, direct_pad
from workbench.model.interior import (
    GPU_COMPILER_OPTIONS,
    MIN_INTERIOR_FRACTION,
    compiler_options,
    conv_valid,
    interior_boundary_conv,
    resolve_comm_overlap,
    split_pays,
    split_ranges,
)
from workbench.model.layers import Partition

ALL = (True, True, True)
H3 = ((1, 1),) * 3


def test_split_ranges_per_layer_kind():
    # 3×3×3, stride 1: the first and last output read a halo
    assert (
        split_ranges(block=(16, 16, 16), kernel=(3, 3, 3), stride=(1, 1, 1), halo=H3, exchanged=ALL) == ((1, 15),) * 3
    )
    # stride 2, kernel 3, nnU-Net padding 1: halo (1, 0), so only the first output reads one
    strided = split_ranges(block=(16, 8, 8), kernel=(3, 3, 3), stride=(2, 2, 2), halo=((1, 0),) * 3, exchanged=ALL)
    assert strided == ((1, 8), (1, 4), (1, 4))
    # (1, 3, 3): z has no halo; an axis that is not split has no range
    aniso = split_ranges(
        block=(4, 8, 8),
        kernel=(1, 3, 3),
        stride=(1, 1, 1),
        halo=((0, 0), (1, 1), (1, 1)),
        exchanged=(False, True, True),
    )
    assert aniso == (None, (1, 7), (1, 7))
    # a block of 2 has no interior for a 3-wide kernel
    assert split_ranges(block=(2, 8, 8), kernel=(3, 3, 3), stride=(1, 1, 1), halo=H3, exchanged=ALL) is None


@pytest.mark.parametrize(
    "block, kernel, stride, halo, exchanged, expected",
    [
        ((16, 16, 16), (3, 3, 3), (1, 1, 1), H3, ALL, True),  # interior (14/16)³ = 0.67
        ((8, 8, 8), (3, 3, 3), (1, 1, 1), H3, ALL, False),  # (6/8)³ = 0.42
        ((8, 8, 8), (3, 3, 3), (1, 1, 1), H3, (True, False, False), True),  # one split axis: 0.75
        ((8, 8, 8), (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)), (False, True, True), False),  # 0.56
        ((32, 32, 32), (3, 3, 3), (2, 2, 2), ((1, 0),) * 3, ALL, True),  # (15/16)³ = 0.82
        ((16, 16, 16), (3, 3, 3), (1, 1, 1), H3, (False, False, False), False),  # no message: nothing to hide
    ],
)
def test_auto_rule(block, kernel, stride, halo, exchanged, expected):
    assert split_pays(block=block, kernel=kernel, stride=stride, halo=halo, exchanged=exchanged) is expected
    assert 0.42 < MIN_INTERIOR_FRACTION < 0.67  # the measured boundary (benchmarks/interior_boundary.py)


def test_resolve_comm_overlap_and_the_partition_s_choice():
    assert resolve_comm_overlap("auto", "cpu") == "off"  # XLA:CPU collectives are synchronous
    assert resolve_comm_overlap("AUTO", "gpu") == "off"  # until a GPU measurement shows the split pays
    assert resolve_comm_overlap("on", "cpu") == "on"
    with pytest.raises(UserError, match="--comm-overlap 'yes' is unknown; use one of auto, on, off"):
        resolve_comm_overlap("yes", "gpu")
    part = Partition("explicit", (2, 2, 2), 1, None, (64, 64, 64), interior_boundary="auto")
    assert part.splits((16, 16, 16), (3, 3, 3), (1, 1, 1), H3) and not part.splits((8, 8, 8), (3, 3, 3), (1, 1, 1), H3)
    on = Partition("explicit", (2, 2, 2), 1, None, (64, 64, 64), interior_boundary="on")
    assert on.splits((8, 8, 8), (3, 3, 3), (1, 1, 1), H3) and not on.splits((2, 8, 8), (3, 3, 3), (1, 1, 1), H3)
    for other in (Partition("reference"), Partition("explicit", (2, 2, 2), halo="zero", interior_boundary="on")):
        assert not other.splits((16, 16, 16), (3, 3, 3), (1, 1, 1), H3)


# (mesh, global shape, kernel, stride, halo): every layer kind of the spec, uneven splits of the
# mesh's axes (1x2x4), a block with one interior voxel per axis (3 voxels, kernel 3)
CASES = [
    ("2x2x2", (12, 16, 10), (3, 3, 3), (1, 1, 1), H3),
    ("1x2x4", (5, 6, 12), (3, 3, 3), (1, 1, 1), H3),
    ("2x2x2", (8, 12, 12), (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1))),
    ("2x2x2", (16, 16, 8), (3, 3, 3), (2, 2, 2), ((1, 0),) * 3),
    ("4x2x1", (16, 12, 8), (3, 3, 3), (1, 2, 2), ((1, 1), (1, 0), (1, 0))),
]


@pytest.mark.parametrize("mesh_text, shape, kernel, stride, halo", CASES)
def test_split_convolution_equals_unsplit_values_and_float64_gradients(mesh_text, shape, kernel, stride, halo):
    """Inside shard_map with exact halos: same output, and the same gradients (input and kernel)
    through the split's autodiff (the shells' adjoint exchange included), within 1e-12."""
    spec = parse_mesh(mesh_text)
    mesh = build_mesh(spec)
    act = P(*ACTIVATION_SPEC)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((1, *shape, 3)))
        k = jnp.asarray(rng.standard_normal((*kernel, 3, 4)))
        out_shape = (1, *(n // s for n, s in zip(shape, stride)), 4)
        w = jnp.asarray(rng.standard_normal(out_shape))

        def unsplit(x_block, k):
            xp = halo_pad(x_block, width=halo, mesh_shape=spec.spatial)
            return conv_valid(xp, k, stride, ((0, 0),) * 3)

        def split(x_block, k):
            return interior_boundary_conv(
                x_block, k, stride=stride, halo=halo, mesh_shape=spec.spatial, conv=conv_valid
            )

        results = []
        for body in (unsplit, split):
            fn = jax.shard_map(body, mesh=mesh, in_specs=(act, P()), out_specs=act)
            loss = lambda x, k, fn=fn: jnp.sum(fn(x, k) * w)  # noqa: E731
            y = jax.jit(fn)(x, k)
            gx, gk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, k)
            results.append((np.asarray(y), np.asarray(gx), np.asarray(gk)))
        reference = conv_valid(x, k, stride, tuple((p, p) for p in (kk // 2 for kk in kernel)))
    (y0, gx0, gk0), (y1, gx1, gk1) = results
    np.testing.assert_allclose(y0, np.asarray(reference), rtol=0, atol=1e-12)  # the unsplit is exact
    np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gx1, gx0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gk1, gk0, rtol=0, atol=1e-11)


# (mesh, global shape, per-axis (lo, hi) halo): axes of two devices (one message per
# combination of axes: 7 on 2x2x2), axes of four (faces, edges and corners: one-sided at the
# volume's faces), uneven blocks, asymmetric and zero-depth halos, a halo of a whole block.
DIRECT_CASES = [
    ("2x2x2", (8, 10, 6), H3),
    ("1x2x4", (5, 6, 12), ((1, 1), (2, 1), (1, 2))),
    ("2x2x2", (8, 8, 8), ((4, 4), (1, 0), (0, 0))),
]


@pytest.mark.parametrize("mesh_text, shape, halo", DIRECT_CASES)
def test_one_phase_exchange_equals_the_chained_one(mesh_text, shape, halo):
    """direct_pad (every message at once, from the unpadded block) gives halo_pad's padded block,
    and its hand-written adjoint the same float64 gradient; the held array passes unchanged
    (values and cotangent)."""
    spec = parse_mesh(mesh_text)
    mesh = build_mesh(spec)
    act = P(*ACTIVATION_SPEC)
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((1, *shape, 2)))
        held = jnp.asarray(rng.standard_normal((1, *shape, 1)))
        # shard_map joins the padded blocks: each block grows by lo + hi
        padded = (1, *((n // m + sum(h)) * m for n, m, h in zip(shape, spec.spatial, halo)), 2)
        weights = jnp.asarray(rng.standard_normal(padded))

        def chained(x_block, held_block):
            return halo_pad(x_block, width=halo, mesh_shape=spec.spatial), held_block

        def direct(x_block, held_block):
            assert direct_applies(x_block.shape, halo, spec.spatial)
            return direct_pad(x_block, halo, spec.spatial, held_block)

        results = []
        for body in (chained, direct):
            fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(act, act), out_specs=(act, act)))
            xp, kept = fn(x, held)
            loss = lambda x, h, fn=fn: jnp.sum(fn(x, h)[0] * weights) + jnp.sum(fn(x, h)[1] ** 2)  # noqa: E731
            gx, gh = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, held)
            results.append((np.asarray(xp), np.asarray(kept), np.asarray(gx), np.asarray(gh)))
    (p0, k0, gx0, gh0), (p1, k1, gx1, gh1) = results
    assert p0.shape == padded and np.abs(p0).max() > 1  # halos and blocks, not zeros
    np.testing.assert_array_equal(p1, p0)
    np.testing.assert_array_equal(k1, k0)
    np.testing.assert_allclose(gx1, gx0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gh1, 2 * np.asarray(held), rtol=0, atol=0)


def test_one_phase_applies_to_one_hop_halos_and_gpu_options():
    assert direct_applies((1, 4, 4, 4, 1), ((4, 4), (1, 1), (0, 0)), (2, 2, 1))
    assert not direct_applies((1, 4, 4, 4, 1), ((5, 1), (1, 1), (1, 1)), (2, 2, 2))  # two hops along z
    assert direct_applies((1, 4, 4, 4, 1), ((5, 1), (1, 1), (1, 1)), (1, 2, 2))  # z is not split
    assert compiler_options("on", "gpu") == GPU_COMPILER_OPTIONS
    assert compiler_options("off", "gpu") is None and compiler_options("on", "cpu") is None
