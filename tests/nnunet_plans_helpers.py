"""Tiny nnU-Net plans files for training tests: nnU-Net's own plans (tests/fixtures/nnunet)
with the 3d_fullres network shrunk to 3 anisotropic stages (features 4/8/8)."""

import copy
import json
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "nnunet"
TINY_ARCH = {
    "n_stages": 3,
    "features_per_stage": [4, 8, 8],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2],
}


def tiny_plans(folder, dataset: str = "iso_ct", *, dataset_json: dict | None = None, **arch) -> Path:
    """Write ``folder/nnUNetPlans.json`` (``dataset``'s plans, the network shrunk) and its
    ``dataset.json`` (the fixture's, or ``dataset_json``); returns the plans path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plans = json.loads((FIXTURE / dataset / "nnUNetPlans.json").read_text())
    plans = copy.deepcopy(plans)
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs.update({**TINY_ARCH, **arch})
    path = folder / "nnUNetPlans.json"
    path.write_text(json.dumps(plans, indent=1))
    ds = dataset_json or json.loads((FIXTURE / dataset / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps(ds, indent=1))
    return path
