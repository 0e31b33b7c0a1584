"""nnU-Net's full-size planned networks against the workbench's, by hand (needs nnU-Net's venv).

The golden fixture (tests/fixtures/nnunet) checks logits on two small networks. This script
checks two full-size plans of the fixture: ResEnc L for the anisotropic CT (6 stages, features
up to 320, 101,858,479 parameters) and the plain net for the 2-channel region MRI. It runs in
two steps, in two environments:

    .venv-nnunet/bin/python benchmarks/nnunet_full_plans.py torch OUT   # nnU-Net builds, inits, runs
    .venv/bin/python benchmarks/nnunet_full_plans.py jax OUT            # the workbench loads, compares

The torch step builds each network with nnU-Net's ``get_network_from_plans`` (random weights,
no identity norms), runs it on a random input and writes the whole state_dict (aliases
included) with the input and every deep-supervision output. The jax step loads that
state_dict with ``load_nnunet_weights``, runs the reference and a partitioned run, and prints
each head's max error relative to the largest |logit|. Both steps use float32. Nothing fails
on a threshold; read the table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nnunet"
# (dataset folder, plans file stem, input shape (N, C, z, y, x), output channels, mesh)
CASES = [
    ("aniso_ct", "nnUNetResEncUNetLPlans", (1, 1, 16, 64, 64), 3, "2x2x2"),
    ("thick_mri", "nnUNetPlans", (1, 2, 8, 64, 96), 2, "1x2x4"),
]


def run_torch(out: Path) -> None:
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for folder, stem, shape, n_out, _ in CASES:
        arch = json.loads((FIXTURE / folder / f"{stem}.json").read_text())["configurations"]["3d_fullres"]
        arch = arch["architecture"]
        torch.manual_seed(0)
        net = get_network_from_plans(
            arch["network_class_name"],
            arch["arch_kwargs"],
            arch["_kw_requires_import"],
            shape[1],
            n_out,
            allow_init=True,
            deep_supervision=True,
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # no zero bias, no identity norm
            for name, p in net.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
                elif p.ndim == 1:
                    p.copy_(torch.rand(p.shape, generator=generator) + 0.5)
        net.eval()
        x = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            outputs = [o.numpy() for o in net(torch.from_numpy(x))]
        np.savez(out / f"{folder}_{stem}_io.npz", input=x, **{f"output_{i}": o for i, o in enumerate(outputs)})
        np.savez(out / f"{folder}_{stem}_weights.npz", **{k: v.numpy() for k, v in net.state_dict().items()})
        print(f"{folder}/{stem}: {sum(p.numel() for p in net.parameters()):,} parameters, {len(outputs)} heads")


def run_jax(out: Path) -> None:
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.config.jax_platforms == "cpu":
        jax.config.update("jax_num_cpu_devices", 8)
    from workbench.execute.nnunet import apply_nnunet
    from workbench.model.nnunet import NNUNetModel, load_nnunet_weights
    from workbench.model.nnunet_plans import from_nnunet_plans

    print("| plans | state_dict keys | backend | mesh | seconds | max error / max abs logit, per head |")
    print("| --- | --- | --- | --- | --- | --- |")
    for folder, stem, _, _, mesh in CASES:
        spec = from_nnunet_plans(FIXTURE / folder / f"{stem}.json", FIXTURE / folder / "dataset.json")
        with np.load(out / f"{folder}_{stem}_weights.npz") as data:
            weights = {k: data[k] for k in data.files}
        with np.load(out / f"{folder}_{stem}_io.npz") as data:
            io = {k: data[k] for k in data.files}
        model = NNUNetModel(spec, {"params": load_nnunet_weights(spec, weights)})
        x = io["input"].transpose(0, 2, 3, 4, 1)
        for backend, m in (("reference", None), ("explicit", mesh)):
            start = time.perf_counter()
            heads = apply_nnunet(model, x, m, backend=backend, deep_supervision=True)
            seconds = time.perf_counter() - start
            errors = []
            for i, head in enumerate(heads):
                ref = io[f"output_{i}"].transpose(0, 2, 3, 4, 1)
                errors.append(float(np.abs(head - ref).max()) / float(np.abs(ref).max()))
            shown = ", ".join(f"{e:.1e}" for e in errors)
            print(f"| {folder}/{stem} | {len(weights)} | {backend} | {m or '-'} | {seconds:.1f} | {shown} |")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("torch", "jax"):
        print(__doc__)
        return 2
    (run_torch if argv[0] == "torch" else run_jax)(Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
