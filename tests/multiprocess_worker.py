"""One process of a multi-process test run (started by ``workbench.cli.launch.launch``
with ``program=[python, this file]``), or a single process when no ``WORKBENCH_*``
variables are set.

Usage: ``python tests/multiprocess_worker.py '{"config": {...}, "workdir": ..., "resume": false,
"x64": true, "devices": 8}'``: trains ``TrainConfig.from_dict(config)`` into ``workdir``
(float64 models need ``x64``, which must be set before anything is traced). Exit status
as ``workbench train``: 0, or 130 / 143 when interrupted.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy


def main(argv) -> int:
    spec = json.loads(argv[0])
    from workbench.execute.distributed import initialize_from_env

    if not initialize_from_env():
        from workbench.execute.devices import configure_cpu_devices

        configure_cpu_devices(int(spec.get("devices", 8)))
    import jax

    if spec.get("x64"):
        jax.config.update("jax_enable_x64", True)
    from workbench.training import TrainConfig, train_and_evaluate

    result = train_and_evaluate(
        TrainConfig.from_dict(spec["config"]), spec["workdir"], resume=bool(spec.get("resume")), progress=False
    )
    if result["interrupted"]:
        return 130 if result["interrupted"] == "SIGINT" else 143
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
