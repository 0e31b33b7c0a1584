"""Determinism (same seed, data and mesh → bitwise-identical predictions; across meshes within
the exactness tolerance) and fuzzing (mesh specs, file headers: a valid result or one clear error)."""

import numpy as np
import pytest
from conftest import f32_tolerance
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_tools import DataError, read_volume
from workbench.errors import USER_ERRORS
from workbench.execute.run import run
from workbench.mesh import parse_mesh

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_same_seed_data_and_mesh_are_bitwise_identical_and_meshes_agree(small_model):
    image = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    a = run(small_model, image, "2x2x2").output
    b = run(small_model, image, "2x2x2").output
    assert np.array_equal(a, b)
    c = run(small_model, image, "1x2x4").output
    ref = run(small_model, image, backend="reference").output
    assert np.max(np.abs(c - ref)) <= f32_tolerance(ref) and np.max(np.abs(a - ref)) <= f32_tolerance(ref)


@FUZZ
@given(st.text(alphabet="0123456789x,=datyz -auo", max_size=20))
def test_parse_mesh_is_a_mesh_or_one_user_error(text):
    try:
        spec = parse_mesh(text)
    except USER_ERRORS as err:
        assert "\n" not in str(err)
        return
    assert spec.n_devices >= 1 and all(s >= 1 for s in spec.spatial)


def _valid_npy(tmp_path):
    path = tmp_path / "ok.npy"
    np.save(path, np.arange(60, dtype=np.float32).reshape(3, 4, 5))
    return path.read_bytes()


@FUZZ
@given(st.data())
def test_mutated_npy_headers_read_or_raise_data_error(tmp_path, data):
    raw = bytearray(_valid_npy(tmp_path))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, 127))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path = tmp_path / "fuzz.npy"
    path.write_bytes(bytes(raw[:cut]))
    try:
        volume = read_volume(path)
    except DataError as err:
        assert "\n" not in str(err)
        return
    assert volume.array.ndim == 3 and np.isfinite(volume.array).all()


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["x.nii", "x.tif", "x.npy", "x.npz"]))
def test_random_bytes_read_or_raise_data_error(tmp_path, blob, name):
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(DataError):
        read_volume(path)
