"""Test set-up: 8 simulated CPU devices before any JAX computation; shared fixtures; tiers.

Tiers (``pytest -m TIER``): ``unit`` (pure functions, fast), ``exactness`` (partitioned ==
single-device reference), ``integration`` (commands, notebooks, result folders), with
``gui`` (napari under a display), ``browser`` (JupyterLab in headless Chromium) and
``multiprocess`` (several processes joined by jax.distributed) marking what they need.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from workbench.execute.devices import configure_cpu_devices  # noqa: E402

configure_cpu_devices(8)  # as the CLI and notebooks do (and XLA:CPU's code generator with it)

from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (CI must not pass or fail by chance);
# HYPOTHESIS_PROFILE=explore draws fresh ones (e.g. `HYPOTHESIS_PROFILE=explore pytest tests/test_reliability.py`).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Each test file's tier and what it needs. A new file must be listed (see
# test_every_test_file_has_a_tier), so `pytest -m exactness` never silently misses one.
TIERS = {
    "test_app.py": ("integration",),
    "test_architecture.py": ("unit",),
    "test_audit.py": ("unit",),
    "test_bad_inputs.py": ("integration",),
    "test_baselines.py": ("exactness",),
    "test_browser.py": ("integration", "browser"),
    "test_checkpoint.py": ("integration",),
    "test_cli.py": ("integration",),
    "test_context_tasks.py": ("unit",),
    "test_data_errors.py": ("unit",),
    "test_data_formats.py": ("unit",),
    "test_data_itk.py": ("unit",),
    "test_data_io.py": ("unit",),
    "test_data_phantoms.py": ("unit",),
    "test_data_preprocess.py": ("unit",),
    "test_data_samples.py": ("unit",),
    "test_data_volume.py": ("unit",),
    "test_dataset_channels.py": ("integration",),
    "test_datasets.py": ("integration",),
    "test_distributed.py": ("exactness", "multiprocess"),
    "test_gpu_check.py": ("integration",),
    "test_halo.py": ("exactness",),
    "test_inspect.py": ("exactness",),
    "test_interior.py": ("exactness",),
    "test_kill.py": ("integration",),
    "test_layers.py": ("exactness",),
    "test_losses.py": ("exactness",),
    "test_memory_guard.py": ("integration",),
    "test_mesh.py": ("unit",),
    "test_notebook_viewer.py": ("integration",),
    "test_multiprocess.py": ("exactness", "multiprocess"),
    "test_napari_gui.py": ("integration", "gui"),
    "test_nnunet.py": ("exactness",),
    "test_nnunet_compare.py": ("integration",),
    "test_nnunet_infer.py": ("integration",),
    "test_nnunet_loss.py": ("exactness",),
    "test_nnunet_plan_cli.py": ("integration",),
    "test_nnunet_planning.py": ("unit",),
    "test_panel_plans.py": ("integration",),
    "test_partition.py": ("exactness",),
    "test_patch_plan.py": ("integration",),
    "test_patch_training.py": ("integration",),
    "test_plan.py": ("integration",),
    "test_reliability.py": ("exactness",),
    "test_resolution.py": ("integration",),
    "test_scaling.py": ("unit",),
    "test_surface.py": ("exactness",),
    "test_schedule.py": ("integration",),
    "test_train.py": ("exactness",),
    "test_train_nnunet.py": ("exactness",),
    "test_train_nnunet_config.py": ("integration",),
    "test_viewer.py": ("integration",),
    "test_viewer_channels.py": ("integration",),
    "test_widgets.py": ("integration",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.path.name
        tiers = TIERS.get(name, ("integration",) if name.endswith(".ipynb") else ())
        for tier in tiers:
            item.add_marker(getattr(pytest.mark, tier))


def f32_tolerance(scale) -> float:
    """The float32 forward exactness bound (README, Exactness): 1e-5 × max(1, largest |logit|).
    Trained weights give logits of 10–20 whose float32 rounding differs by more than 1e-5."""
    import numpy as np

    return 1e-5 * max(1.0, float(np.max(np.abs(scale))))


# -- models: one cache instead of a Model.init per file ------------------------------------------
_MODELS: dict = {}


def plan_cli(args, env=None, timeout=600):
    """``python -m workbench plan ARGS`` in a subprocess (a GPU plan needs its own process)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "workbench", "plan", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def perturbed(model, seed: int = 1):
    """Random biases and running statistics, so no layer is an identity."""
    import jax.numpy as jnp
    import numpy as np

    from workbench.model.unet import Model

    rng = np.random.default_rng(seed)

    def jitter(path, leaf):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
        if "bias" in name or "mean" in name:
            return jnp.asarray(rng.normal(0, 0.1, leaf.shape), leaf.dtype)
        if "scale" in name:
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return leaf

    return Model(model.config, jax.tree_util.tree_map_with_path(jitter, model.variables))


@pytest.fixture(scope="session")
def make_model():
    """``make_model(config="small", seed=0, perturbed=False)``: a cached ``Model`` (a preset
    name or a ``UNetConfig``); ``perturbed`` randomises biases and norm statistics."""
    from workbench.model.unet import Model, UNetConfig

    def make(config="small", seed: int = 0, *, perturbed_model: bool = False):
        config = UNetConfig.preset(config) if isinstance(config, str) else config
        key = (config, seed, perturbed_model)
        if key not in _MODELS:
            model = Model.init(config, seed=seed)
            _MODELS[key] = perturbed(model) if perturbed_model else model
        return _MODELS[key]

    return make


@pytest.fixture(scope="session")
def nnunet_view_result(tmp_path_factory):
    """(channel files, result folder) of the fixture's 2-channel region nnU-Net model inferred
    with --reference (tests/test_viewer_channels.py), shared by the viewer and napari tests."""
    from test_viewer_channels import write_nnunet_result_folder

    return write_nnunet_result_folder(tmp_path_factory.mktemp("nnunet-view"))


@pytest.fixture(scope="session")
def small_model(make_model):
    """The small preset with random weights (seed 0)."""
    return make_model("small", 0)
