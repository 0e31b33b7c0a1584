"""MeshSpec parsing and ShardLayout geometry (pure Python; JAX only to check which blocks
its devices really hold)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.mesh import (
    ACTIVATION_SPEC,
    MeshSpec,
    ShardLayout,
    auto_mesh,
    build_mesh,
    parse_mesh,
    process_blocks,
    valid_meshes,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2x2x2", MeshSpec(2, 2, 2)),
        ("1x2x4", MeshSpec(1, 2, 4)),
        (" 4X2X1 ", MeshSpec(4, 2, 1)),
        ("data=2,z=2,y=2,x=1", MeshSpec(2, 2, 1, data=2)),
        ("z=8", MeshSpec(8, 1, 1)),
    ],
)
def test_parse_mesh(text, expected):
    spec = parse_mesh(text)
    assert spec == expected
    assert parse_mesh(str(spec)) == spec


def test_auto_mesh_is_most_cubic():
    assert parse_mesh("auto", n_devices=8) == MeshSpec(2, 2, 2)
    assert auto_mesh(4) == MeshSpec(2, 2, 1)
    assert auto_mesh(1) == MeshSpec(1, 1, 1)
    assert auto_mesh(8, data=2) == MeshSpec(2, 2, 1, data=2)


def test_valid_meshes_cover_all_factorisations():
    meshes = valid_meshes(8)
    assert len(meshes) == 10  # ordered factorisations of 8 into 3 factors
    assert all(m.n_devices == 8 for m in meshes)
    with_data = valid_meshes(8, data_parallel=True)
    assert MeshSpec(2, 2, 1, data=2) in with_data
    assert len(with_data) == 10 + 6 + 3 + 1


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("2x2", "write the mesh as ZxYxX"),
        ("2x0x2", "sizes must be >= 1"),
        ("a=2", "cannot read 'a=2'"),
        ("z=2,z=2", "axis z given twice"),
        ("", "write the mesh as ZxYxX"),
        ("2x2x2x2", "write the mesh as ZxYxX"),
    ],
)
def test_bad_mesh_strings_name_the_fix(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_mesh(bad)


def test_mesh_device_mismatch_names_options():
    with pytest.raises(ValueError, match=r"needs 16 devices but 8 are available.*--cpu-devices 16"):
        parse_mesh("4x2x2", n_devices=8)
    with pytest.raises(ValueError, match="needs the device count"):
        parse_mesh("auto")


def test_layout_uneven_volume():
    layout = ShardLayout((37, 53, 45), "2x2x2", multiple=4)
    assert layout.reference_shape == (40, 56, 48)
    assert layout.padded_shape == (40, 56, 48)
    assert layout.block_shape == (20, 28, 24)
    assert layout.needs_mask == (False, False, False)
    layout = ShardLayout((37, 53, 45), "8x1x1", multiple=4)
    assert layout.padded_shape == (64, 56, 48)
    assert layout.needs_mask == (True, False, False)
    empty = [s for s in layout.shards() if s.is_empty]
    assert [s.coords[0] for s in empty] == [5, 6, 7]


def test_layout_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"must be 3 positive sizes"):
        ShardLayout((10, 10), "2x2x2")
    with pytest.raises(ValueError, match="power of two"):
        ShardLayout((8, 8, 8), "2x2x2", multiple=3)
    with pytest.raises(ValueError, match="does not match the layout"):
        ShardLayout((8, 8, 8), "2x2x2").pad(np.zeros((9, 8, 8)))


mesh_sizes = st.tuples(*[st.sampled_from([1, 2, 3, 4])] * 3)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 70)] * 3),
    mesh=mesh_sizes,
    multiple=st.sampled_from([1, 2, 4, 8]),
)
def test_layout_boxes_tile_the_padded_volume(shape, mesh, multiple):
    layout = ShardLayout(shape, MeshSpec(*mesh), multiple=multiple)
    cover = np.zeros(layout.padded_shape, np.int32)
    valid_voxels = 0
    for shard in layout.shards():
        (z0, z1), (y0, y1), (x0, x1) = shard.box
        cover[z0:z1, y0:y1, x0:x1] += 1
        for (lo, hi), (vlo, vhi), s in zip(shard.box, shard.valid_box, shape):
            assert vlo <= vhi <= s and (vlo == vhi or lo <= vlo < vhi <= hi)
        valid_voxels += int(np.prod([hi - lo for lo, hi in shard.valid_box]))
    assert (cover == 1).all()  # every voxel exactly once: no gaps, no overlap
    assert valid_voxels == np.prod(shape)
    for p, r, m in zip(layout.padded_shape, layout.reference_shape, mesh):
        assert p % (m * multiple) == 0 and r % multiple == 0 and p >= r
    volume = np.random.default_rng(0).random(shape)
    padded = layout.pad(volume)
    assert padded.shape == layout.padded_shape
    np.testing.assert_array_equal(layout.crop(padded), volume)
    ids = layout.shard_ids()
    assert ids.shape == shape and ids.max() < MeshSpec(*mesh).n_spatial


def test_process_blocks_by_hand():
    # 64 devices, 8 per host, 4x4x4 over 1024³: host h holds z slab h // 2, y half h % 2
    layout = ShardLayout((1024,) * 3, "4x4x4", multiple=8)
    blocks = process_blocks(layout, 8, 8)
    assert [b.process for b in blocks] == list(range(8))
    assert blocks[0].devices == blocks[0].shards == tuple(range(8))
    assert blocks[0].boxes[5] == ((0, 256), (256, 512), (256, 512))
    assert [b.box for b in blocks[:3]] == [
        ((0, 256), (0, 512), (0, 1024)),
        ((0, 256), (512, 1024), (0, 1024)),
        ((256, 512), (0, 512), (0, 1024)),
    ]
    assert blocks[7].box == blocks[7].valid_box == ((768, 1024), (512, 1024), (0, 1024))
    # uneven volume on 1x2x4, 2 devices per process: padded boxes vs the part on disk
    layout = ShardLayout((37, 53, 45), "1x2x4", multiple=4)
    assert layout.padded_shape == (40, 56, 48) and layout.block_shape == (40, 28, 12)
    blocks = process_blocks(layout, 4, 2)
    assert [b.shards for b in blocks] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert [b.box for b in blocks] == [
        ((0, 40), (0, 28), (0, 24)),
        ((0, 40), (0, 28), (24, 48)),
        ((0, 40), (28, 56), (0, 24)),
        ((0, 40), (28, 56), (24, 48)),
    ]
    assert [b.valid_box for b in blocks] == [
        ((0, 37), (0, 28), (0, 24)),
        ((0, 37), (0, 28), (24, 45)),
        ((0, 37), (28, 53), (0, 24)),
        ((0, 37), (28, 53), (24, 45)),
    ]
    # a data axis: each process holds a whole replica
    layout = ShardLayout((32, 32, 32), "data=2,z=2,y=2,x=1")
    blocks = process_blocks(layout, 2, 4)
    assert blocks[1].devices == (4, 5, 6, 7) and blocks[1].shards == (0, 1, 2, 3)
    assert blocks[0].box == blocks[1].box == ((0, 32), (0, 32), (0, 32))
    # one process holds everything
    (only,) = process_blocks(ShardLayout((8, 8, 8), "2x2x2"), 1, 8)
    assert only.box == ((0, 8), (0, 8), (0, 8)) and only.shards == tuple(range(8))


def test_process_blocks_rejects_a_device_count_the_mesh_does_not_use():
    layout = ShardLayout((32, 32, 32), "2x2x2")
    with pytest.raises(ValueError, match=r"2 processes × 2 devices = 4 devices, but mesh 2x2x2 uses 8"):
        process_blocks(layout, 2, 2)
    with pytest.raises(ValueError, match="processes=0 must be a positive integer"):
        process_blocks(layout, 0, 8)


@pytest.mark.parametrize(
    "mesh, shape",
    [("2x2x2", (32, 32, 32)), ("1x2x4", (37, 53, 45)), ("4x2x1", (16, 24, 8)), ("data=2,z=2,y=2,x=1", (20, 12, 8))],
)
def test_process_blocks_match_what_jax_assigns(mesh, shape):
    """Devices grouped 4 per "process" in jax.devices() order hold the boxes process_blocks names."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    layout = ShardLayout(shape, mesh, multiple=2)
    spec = layout.mesh
    sharding = NamedSharding(build_mesh(spec), P(*ACTIVATION_SPEC))
    indices = sharding.devices_indices_map((spec.data, *layout.padded_shape, 3))
    devices = jax.devices()[: spec.n_devices]

    def box(device):  # the (z, y, x) box of a device's block
        return tuple(
            (s.start or 0, s.stop if s.stop is not None else n)
            for s, n in zip(indices[device][1:4], layout.padded_shape)
        )

    blocks = process_blocks(layout, spec.n_devices // 4, 4)
    for block in blocks:
        mine = devices[block.process * 4 : (block.process + 1) * 4]
        assert block.boxes == tuple(box(d) for d in mine)
        assert block.box == tuple((min(box(d)[i][0] for d in mine), max(box(d)[i][1] for d in mine)) for i in range(3))


def test_cpu_codegen_flag_is_added_once_and_yields_to_the_user(monkeypatch):
    """configure_cpu_devices' XLA:CPU code-generator flag: added on the measured jaxlib versions,
    never twice, never over the user's own setting, and not at all with WORKBENCH_XLA_CPU_DEFAULTS=1."""
    import os

    import jaxlib

    from workbench.execute import devices

    monkeypatch.setattr(jaxlib, "__version__", "0.10.2")  # measured there
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.delenv("WORKBENCH_XLA_CPU_DEFAULTS", raising=False)
    devices.cpu_codegen_flags()
    devices.cpu_codegen_flags()
    assert os.environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {devices.CPU_CODEGEN_FLAG}"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    devices.cpu_codegen_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=true"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("WORKBENCH_XLA_CPU_DEFAULTS", "1")
    devices.cpu_codegen_flags()
    assert os.environ["XLA_FLAGS"] == ""
    monkeypatch.delenv("WORKBENCH_XLA_CPU_DEFAULTS")
    monkeypatch.setattr(jaxlib, "__version__", "0.12.0")  # a jaxlib it was not measured on
    devices.cpu_codegen_flags()
    assert os.environ["XLA_FLAGS"] == ""
