#!/usr/bin/env bash
# GPU check (NOT RUN YET: the session that wrote it had no GPU machine).
#
# Paper model (depth 4, 32 filters, batch norm, bfloat16) at 256³ on ONE GPU:
# inference and one training step (loss, gradients, Adam), step time (median of 3
# after a warm-up) and peak device memory (XLA's accounting and the allocator's
# peak), plus the explicit backend's overhead on a 1-device mesh vs the reference.
# Under 5 minutes on an H100. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
exec timeout 300 "$PY" - <<'PYEOF'
import statistics, time
import jax, jax.numpy as jnp, numpy as np
from workbench.mesh import ShardLayout
from workbench.run import make_forward, memory_stats
from workbench.train import TrainConfig, build_train_step, create_train_state
from workbench.unet import Model, UNetConfig

dev = jax.devices()[0]
print(f"device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
if dev.platform != "gpu":
    raise SystemExit("no GPU visible to JAX; this check is for a GPU machine")
cfg = UNetConfig.preset("paper")
N = 256
model = Model.init(cfg, seed=0)
x = np.random.default_rng(0).standard_normal((1, N, N, N, 1)).astype(np.float32)

def timed(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); jax.block_until_ready(fn(*args)); times.append(time.perf_counter() - t0)
    return statistics.median(times)

rows = []
for backend, mesh in (("reference", "1x1x1"), ("explicit", "1x1x1")):
    layout = ShardLayout((N, N, N), mesh, multiple=cfg.multiple)
    fn, _, xs, vs = make_forward(cfg, layout, backend=backend)
    v, xd = jax.device_put(model.variables, vs), jax.device_put(x, xs)
    mem = memory_stats(fn.lower(v, xd).compile())["peak"]
    rows.append((f"inference {backend}", timed(fn, v, xd), mem))

layout = ShardLayout((N, N, N), "1x1x1", multiple=cfg.multiple)
tc = TrainConfig(mesh="1x1x1", backend="explicit")
ts = build_train_step(cfg, tc, layout)
state = jax.device_put(create_train_state(cfg, tc, variables=model.variables), ts.state_sharding)
labels = jax.device_put(np.zeros((1, N, N, N), np.int32), ts.label_sharding)
images = jax.device_put(x, ts.image_sharding)
compiled = ts.fn.lower(state, images, labels).compile()
mem = memory_stats(compiled)["peak"]
state, _ = compiled(state, images, labels)
jax.block_until_ready(state)
times = []
for _ in range(3):
    t0 = time.perf_counter(); state, _ = compiled(state, images, labels); jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
rows.append(("training step explicit", statistics.median(times), mem))
stats = dev.memory_stats() or {}
print(f"{'step':<26}{'seconds':>9}{'XLA peak GiB':>14}")
for name, sec, mem in rows:
    print(f"{name:<26}{sec:>9.3f}{mem / 2**30:>14.2f}")
print(f"explicit ÷ reference on a 1-device mesh (inference time): {rows[1][1] / rows[0][1]:.3f}")
print(f"allocator peak: {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")
PYEOF
