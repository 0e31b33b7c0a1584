"""The GPU check script keeps working as the code changes (dry run on CPU devices).

Its GPU results are in the README; here it runs one training phase at 16³ and one
mocked-mesh plan scaled down to 32³, each in its own process as on the GPU.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--allow-cpu"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gpu_check_training_phase_dry_run():
    r = _run("--phase", "train:explicit", "--size", "16")
    assert r["phase"] == "train:explicit" and r["size"] == 16
    assert r["seconds"] > 0 and r["xla_bytes"] > 0
    # 3 classes, random labels, fresh model: the loss is finite and near CE(ln 3) + Dice(~1)
    assert math.isfinite(r["loss"]) and 0.5 < r["loss"] < 4.0


def test_gpu_check_plan_dry_run_uses_the_mesh_it_names():
    r = _run("--plan", "512³ train 1x4x4", "--mock", "16", "--plan-scale", "16")
    assert r["devices_seen"] == 16 and r["mesh_text"] == "1x4x4"
    assert r["resolution"] == [32, 32, 32]
    assert r["bytes_per_device"] == r["memory"]["peak"] > 0
