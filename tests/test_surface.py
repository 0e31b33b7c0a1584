"""HD95 from per-block surfaces (workbench.execute.surface) against the one-process HD95.

The blocks are a real partitioned array on the 8 simulated devices: the same programs and
per-block host code a multi-process evaluation runs (each process then holds some of the
blocks; here one process holds them all, and the gathers are the identity). Layouts are
uneven (padded shards) and spacings anisotropic and not representable in binary.
"""

import numpy as np
import pytest
from scipy import ndimage

from workbench.training.losses import hausdorff95

# (volume shape, mesh, spacing): uneven shards on each, the x axis split 4 ways on two
LAYOUTS = [
    ((19, 21, 17), "2x2x2", (1.5, 0.8, 0.8)),
    ((23, 16, 30), "2x1x4", (2.5, 0.7, 1.3)),
    ((20, 24, 18), "1x2x4", (1.0, 1.0, 1.0)),
]
HD_RTOL = 1e-12  # tied nearest surface voxels may differ in the last bit (module notes); measured: equal


def _blocks(mesh_spec, shape, arrays, valid_shape=None):
    """Per array: {block key: (labels block, edge block)} from the partitioned arrays."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from workbench.execute.distributed import local_blocks, put
    from workbench.execute.surface import surface_fn
    from workbench.mesh import ACTIVATION_SPEC, ShardLayout, build_mesh

    layout = ShardLayout(shape, mesh_spec)
    mesh = build_mesh(mesh_spec)
    sharding = NamedSharding(mesh, P(*ACTIVATION_SPEC[:4]))
    edges = surface_fn(mesh)
    out = []
    for a in arrays:
        padded = np.full((1, *layout.padded_shape), 7, np.uint8)  # padding: a label that must not count
        padded[0, : shape[0], : shape[1], : shape[2]] = a
        x = put(padded, sharding)
        e = edges(x, valid_shape or shape)

        def key(index):
            return tuple((s.start or 0, s.stop) for s in index)

        labels = {key(i): b[0] for i, b in local_blocks(x)}
        out.append({k: (labels[k], b[0]) for k, b in ((key(i), b) for i, b in local_blocks(e))})
    return out, layout


def _hd95_blocks(pred, truth, mesh_spec, spacing, k=3):
    from workbench.execute.surface import block_points, hd95_from_points

    (p_blocks, t_blocks), layout = _blocks(mesh_spec, pred.shape, [pred, truth])
    assert len(p_blocks) == 8
    pred_rows, truth_rows = [], []
    for key, (labels, edge) in p_blocks.items():
        origin = [lo for lo, _ in key[1:4]]
        pred_rows.append(block_points(labels, edge, origin))
        truth_rows.append(block_points(*t_blocks[key], origin))
    counts = np.array([[np.sum((pred == c) & (truth == c)), np.sum(pred == c), np.sum(truth == c)] for c in range(k)]).T
    return hd95_from_points(np.concatenate(pred_rows), np.concatenate(truth_rows), counts, spacing)


def _phantom_pair(shape, seed=1):
    """A phantom's labels (organ, lesion) and a prediction: shifted by a voxel in z and y,
    with 1 % of voxels flipped to the lesion (surface voxels all over the volume)."""
    from data_tools.synthetic import make_phantom

    truth = make_phantom(shape, seed=seed, vessels=False).labels.astype(np.uint8)
    pred = ndimage.shift(truth, (1, -1, 0), order=0)
    pred[np.random.default_rng(seed).random(shape) < 0.01] = 2
    return pred, truth


@pytest.mark.parametrize("shape, mesh, spacing", LAYOUTS[:2], ids=["2x2x2", "2x1x4"])
def test_surfaces_per_block_are_the_whole_masks_surfaces(shape, mesh, spacing):
    """Each class's surface (mask & ~binary_erosion, outside the volume = background) is the
    edge map restricted to the class: block faces are not surfaces, the volume's faces are,
    and the layout's padding (filled with a label here) never is."""
    from data_tools.synthetic import make_phantom

    labels = make_phantom(shape, seed=3, vessels=False).labels.astype(np.uint8)
    labels[:, :, -3:] = 1  # the organ up to the x faces
    ([blocks], layout) = _blocks(mesh, shape, [labels])
    edge = np.zeros(layout.padded_shape, bool)
    for key, (_, e) in blocks.items():
        edge[tuple(slice(lo, hi) for lo, hi in key[1:4])] = e
    assert not edge[shape[0] :].any() and not edge[:, shape[1] :].any() and not edge[:, :, shape[2] :].any()
    edge = edge[: shape[0], : shape[1], : shape[2]]
    for c in (1, 2):
        mask = labels == c
        np.testing.assert_array_equal(edge & mask, mask & ~ndimage.binary_erosion(mask, border_value=0))
    # a smaller valid shape (a case padded to a larger grid): its faces become surfaces
    ([small], _) = _blocks(mesh, shape, [np.ones(shape, np.uint8)], valid_shape=(10, 9, 8))
    edge = np.zeros(layout.padded_shape, bool)
    for key, (_, e) in small.items():
        edge[tuple(slice(lo, hi) for lo, hi in key[1:4])] = e
    cube = np.zeros(layout.padded_shape, bool)
    cube[:10, :9, :8] = True
    np.testing.assert_array_equal(edge, cube & ~ndimage.binary_erosion(cube, border_value=0))


@pytest.mark.parametrize("shape, mesh, spacing", LAYOUTS, ids=["2x2x2", "2x1x4", "1x2x4"])
def test_hd95_from_blocks_equals_the_one_process_hd95(shape, mesh, spacing):
    pred, truth = _phantom_pair(shape)
    hd = _hd95_blocks(pred, truth, mesh, spacing)
    for c in (1, 2):
        ref = hausdorff95(pred == c, truth == c, spacing)
        assert np.isfinite(ref) and ref > 0
        assert hd[c] == pytest.approx(ref, rel=HD_RTOL, abs=0)
    assert np.isnan(hd[0])  # background is not scored


def test_hd95_from_blocks_empty_and_equal_masks_as_the_one_process_hd95():
    """A class missing from the prediction, from the truth, from both: NaN; equal masks: 0;
    one voxel against a far surface: that distance."""
    shape, mesh, spacing = (19, 21, 17), "2x2x2", (1.5, 0.8, 0.8)
    pred, truth = _phantom_pair(shape, seed=2)
    pred[pred == 2] = 0  # no lesion predicted
    hd = _hd95_blocks(pred, truth, mesh, spacing)
    assert np.isnan(hd[2]) and np.isnan(hausdorff95(pred == 2, truth == 2, spacing))
    hd = _hd95_blocks(truth, np.where(truth == 2, 0, truth).astype(np.uint8), mesh, spacing)
    assert np.isnan(hd[2]) and hd[1] == hausdorff95(truth == 1, truth == 1, spacing) == 0.0
    empty = np.zeros(shape, np.uint8)
    assert np.isnan(_hd95_blocks(empty, empty, mesh, spacing)[1:]).all()
    one, far = empty.copy(), empty.copy()
    one[0, 0, 0], far[18, 20, 16] = 1, 1
    ref = hausdorff95(one == 1, far == 1, spacing)
    assert _hd95_blocks(one, far, mesh, spacing)[1] == pytest.approx(ref, rel=HD_RTOL, abs=0)
    assert ref == pytest.approx(np.sqrt((18 * 1.5) ** 2 + (20 * 0.8) ** 2 + (16 * 0.8) ** 2), rel=1e-12)
