"""halo_pad inside shard_map against slices of the zero-padded global array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from workbench.mesh import ACTIVATION_SPEC, ShardLayout, build_mesh, parse_mesh
from workbench.model.halo import HALO_MODES, halo_pad, validate_halo


def _padded_blocks(global_x, mesh_text, width, mode):
    spec = parse_mesh(mesh_text)
    mesh = build_mesh(spec)
    act = P(*ACTIVATION_SPEC)
    fn = jax.jit(
        jax.shard_map(
            lambda x: halo_pad(x, width=width, mesh_shape=spec.spatial, mode=mode),
            mesh=mesh,
            in_specs=act,
            out_specs=act,
        )
    )
    out = np.asarray(fn(jax.device_put(global_x, NamedSharding(mesh, act))))
    layout = ShardLayout(global_x.shape[1:4], spec)
    grown = tuple(b + 2 * width for b in layout.block_shape)
    blocks = {}
    for shard in layout.shards():
        sl = tuple(slice(c * g, (c + 1) * g) for c, g in zip(shard.coords, grown))
        blocks[shard.coords] = (shard, out[(slice(None), *sl)])
    return blocks


@pytest.mark.parametrize(
    "mesh_text, width", [("2x2x2", 1), ("1x2x4", 1), ("4x2x1", 2), ("2x2x2", 5), ("2x1x4", 1), ("1x1x8", 3)]
)
def test_exact_halo_equals_global_neighbourhood(mesh_text, width):
    """Edges, corners and multi-hop widths come from the right neighbours; outer faces are zero."""
    shape = (1, 8, 8, 8, 2)
    global_x = (np.arange(np.prod(shape), dtype=np.float32) + 1).reshape(shape)
    padded = np.pad(global_x, [(0, 0)] + [(width, width)] * 3 + [(0, 0)])
    for coords, (shard, block) in _padded_blocks(global_x, mesh_text, width, "exact").items():
        (z0, z1), (y0, y1), (x0, x1) = shard.box
        expected = padded[:, z0 : z1 + 2 * width, y0 : y1 + 2 * width, x0 : x1 + 2 * width]
        np.testing.assert_array_equal(block, expected, err_msg=f"shard {coords}")


def test_outer_faces_receive_zeros():
    """ppermute leaves unlisted destinations at zero: the volume's faces get conv zero padding."""
    global_x = np.ones((1, 4, 4, 4, 1), np.float32)
    blocks = _padded_blocks(global_x, "2x2x2", 1, "exact")
    _, corner = blocks[(0, 0, 0)]
    assert corner[0, 0].max() == 0 and corner[0, :, 0].max() == 0 and corner[0, :, :, 0].max() == 0
    assert corner[0, -1, -1, -1, 0] == 1  # the diagonal neighbour's voxel arrived


@pytest.mark.parametrize("mode", ["zero", "reflect", "replicate"])
def test_self_padding_modes(mode):
    global_x = np.random.default_rng(1).random((1, 8, 8, 8, 1)).astype(np.float32)
    blocks = _padded_blocks(global_x, "2x1x1", 1, mode)
    (_, low), (_, high) = blocks[(0, 0, 0)], blocks[(1, 0, 0)]
    own = global_x[:, 0:4]
    np_mode = {"zero": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    expected_seam = np.pad(own, [(0, 0), (0, 1), (0, 0), (0, 0), (0, 0)], mode=np_mode)[:, -1]
    np.testing.assert_array_equal(low[:, -1, 1:-1, 1:-1], expected_seam)
    assert low[:, 0].max() == 0 and high[:, -1].max() == 0  # outer faces stay zero


def test_validate_halo_errors():
    assert validate_halo("EXACT") == "exact"
    assert validate_halo("8") == 8
    assert set(HALO_MODES) == {"exact", "zero", "reflect", "replicate"}
    with pytest.raises(ValueError, match=r"halo width -1 must be >= 0"):
        validate_halo(-1)
    with pytest.raises(ValueError, match=r"unknown halo mode 'mirror'; use one of exact, zero"):
        validate_halo("mirror")
    with pytest.raises(ValueError, match="must be >= 0"):
        halo_pad(jnp.zeros((1, 2, 2, 2, 1)), width=-2, mesh_shape=(1, 1, 1))


def test_exact_halo_writes_the_padded_block_in_place():
    """No copy of the padded block: each face is built before any halo is written.

    Faces used to be sliced out of the padded block between writes into it, and XLA
    then copied the whole padded block at each exchange (two alive at once: the peak
    of partitioned inference). The compiled program may copy nothing that large.
    """
    spec = parse_mesh("2x2x2")
    mesh = build_mesh(spec)
    act = P(*ACTIVATION_SPEC)
    kernel = jnp.ones((3, 3, 3, 4, 4), jnp.float32)

    def block(x):
        xp = halo_pad(x, width=1, mesh_shape=spec.spatial, mode="exact")
        return jax.lax.conv_general_dilated(
            xp, kernel, (1, 1, 1), "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC")
        )

    fn = jax.jit(jax.shard_map(block, mesh=mesh, in_specs=act, out_specs=act))
    text = fn.lower(jax.ShapeDtypeStruct((1, 32, 32, 32, 4), jnp.float32)).compile().as_text()
    padded = "f32[1,18,18,18,4]"
    assert f"{padded}" in text
    copies = [line for line in text.splitlines() if " copy(" in line and f"= {padded}" in line]
    assert copies == [], copies


@pytest.mark.parametrize("mesh_text, width", [("2x2x2", 1), ("1x2x4", 2), ("2x1x4", 3)])
def test_exact_halo_gradient_is_the_adjoint_exchange(mesh_text, width):
    """The hand-written backward equals the transpose of zero padding the global array
    and cutting every shard's grown block out of it (float64: exact sums)."""
    jax.config.update("jax_enable_x64", True)
    try:
        spec = parse_mesh(mesh_text)
        mesh = build_mesh(spec)
        act = P(*ACTIVATION_SPEC)
        shape = (1, 8, 8, 8, 2)
        rng = np.random.default_rng(3)
        x = rng.standard_normal(shape)
        layout = ShardLayout(shape[1:4], spec)
        grown = tuple(b + 2 * width for b in layout.block_shape)
        cot = rng.standard_normal((1, *(g * m for g, m in zip(grown, spec.spatial)), 2))

        fn = jax.shard_map(
            lambda v: halo_pad(v, width=width, mesh_shape=spec.spatial, mode="exact"),
            mesh=mesh,
            in_specs=act,
            out_specs=act,
        )
        # One compiled program: op-by-op dispatch of the shard_map's vjp costs seconds.
        pullback = jax.jit(lambda v, c: jax.vjp(fn, v)[1](c)[0])
        sharding = NamedSharding(mesh, act)
        got = np.asarray(pullback(jax.device_put(x, sharding), jax.device_put(cot, sharding)))

        expected = np.zeros([s + 2 * width if 1 <= i <= 3 else s for i, s in enumerate(shape)])
        for shard in layout.shards():
            (z0, z1), (y0, y1), (x0, x1) = shard.box
            src = tuple(slice(c * g, (c + 1) * g) for c, g in zip(shard.coords, grown))
            expected[:, z0 : z1 + 2 * width, y0 : y1 + 2 * width, x0 : x1 + 2 * width] += cot[(slice(None), *src)]
        expected = expected[:, width:-width, width:-width, width:-width]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)
