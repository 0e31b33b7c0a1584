"""Training at full resolution: train state, partitioned train step, loop, evaluation.

Reads top to bottom in stages: config → optimiser → train state → set up mesh and
step → shard and transfer → update loop (checkpoints, signals, NaN guard) → evaluate.

The step runs the partitioned forward of :func:`workbench.execute.run.make_forward` (``explicit``
shard_map + halos, ``gspmd``, or the single-device ``reference``) under one ``jax.jit``:
the loss (:mod:`workbench.training.losses`) is reduced over the whole padded global array with
the padding masked, the gradients of the replicated parameters are summed over shards
and the ``data`` axis by the partitioner, batch-norm statistics come back replicated,
and the optax update runs on replicated parameters and optimiser state. So every
backend and mesh follows the same trajectory as the single-device reference.

Example
-------
>>> cfg = TrainConfig(data="phantom", resolution=32, mesh="2x2x2", steps=4, model_overrides={"depth": 2})
>>> result = train_and_evaluate(cfg, "/tmp/run")          # doctest: +SKIP
>>> result["eval"]["dice"]["organ"]                        # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TrainConfig",
    "NonFiniteLossError",
    "make_optimizer",
    "model_config",
    "create_train_state",
    "abstract_train_state",
    "TrainStep",
    "build_train_step",
    "step_memory",
    "evaluate",
    "train_and_evaluate",
    "restore_model",
    "PAPER_CLASS_WEIGHTS",
]

PAPER_CLASS_WEIGHTS = (1.0, 8.0, 16.0)  # background, organ, lesion (Hou et al.)
OPTIMIZERS = ("adam", "adafactor", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run (JSON-able via :meth:`as_dict`). Derived values are properties."""

    data: Any = "phantom"
    resolution: int | None = None
    mesh: str = "2x2x2"
    data_parallel: int = 1
    backend: str = "explicit"
    model: str = "small"
    model_overrides: dict = field(default_factory=dict)
    steps: int = 100
    batch: int = 1
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    clip_norm: float = 1.0
    class_weights: tuple | None = None
    dice_weight: float = 0.2
    augment: bool = True
    checkpoint_every: int = 50
    keep: int = 3
    eval_every: int = 0
    eval_cases: int = 4
    seed: int = 0

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ValueError(msg)

        check(isinstance(self.steps, int) and self.steps >= 1, f"steps={self.steps!r} must be an integer >= 1")
        check(isinstance(self.batch, int) and 1 <= self.batch <= 64, f"batch={self.batch!r} must be in 1..64")
        check(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}; use one of {OPTIMIZERS}")
        check(self.schedule in SCHEDULES, f"schedule={self.schedule!r}; use one of {SCHEDULES}")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate),
              f"learning_rate={self.learning_rate!r} must be a positive number")
        check(self.backend in ("explicit", "gspmd", "reference"),
              f"backend={self.backend!r}; use explicit, gspmd or reference")
        check(isinstance(self.data_parallel, int) and self.data_parallel >= 1,
              f"data_parallel={self.data_parallel!r} must be an integer >= 1")
        check(self.batch % self.data_parallel == 0,
              f"batch {self.batch} does not split over data-parallel {self.data_parallel}; "
              f"use a batch that is a multiple of {self.data_parallel}")
        check(self.checkpoint_every >= 1 and self.keep >= 1, "checkpoint_every and keep must be >= 1")
        check(self.eval_every >= 0 and self.eval_cases >= 0, "eval_every and eval_cases must be >= 0")
        check(self.dice_weight >= 0 and self.clip_norm >= 0, "dice_weight and clip_norm must be >= 0")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = self.data if isinstance(self.data, str) else [str(getattr(v, "path", v)) for v in self.data]
        d["class_weights"] = None if self.class_weights is None else list(self.class_weights)
        return d

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def mesh_spec(self):
        from workbench.mesh import MeshSpec, parse_mesh

        spec = parse_mesh(self.mesh)
        if self.data_parallel > 1:
            if spec.data not in (1, self.data_parallel):
                raise ValueError(f"mesh {self.mesh} has data={spec.data} but data_parallel={self.data_parallel}")
            spec = MeshSpec(spec.z, spec.y, spec.x, data=self.data_parallel)
        return spec


# -- optimiser ------------------------------------------------------------------------------
def learning_rate_schedule(tc: TrainConfig):
    import optax

    if tc.schedule == "constant":
        return optax.constant_schedule(tc.learning_rate)
    if tc.schedule == "cosine":
        return optax.cosine_decay_schedule(tc.learning_rate, decay_steps=tc.steps, alpha=0.05)
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, warmup_steps=max(1, tc.warmup_steps or tc.steps // 20),
        decay_steps=tc.steps, end_value=0.05 * tc.learning_rate,
    )


def make_optimizer(tc: TrainConfig, config=None):
    """optax chain: optional global-norm clipping, then Adam / Adafactor / SGD-momentum.

    With batch or instance norm, the bias of each convolution feeding a norm layer is
    frozen (``optax.set_to_zero``): the norm subtracts it again, so its gradient is zero
    in exact arithmetic, and Adam would turn the rounding noise left in it into full-size
    steps that differ between meshes (summation order). Freezing it changes no output.
    """
    import optax

    lr = learning_rate_schedule(tc)
    if tc.optimizer == "adam":
        opt = optax.adam(lr)
    elif tc.optimizer == "adafactor":
        opt = optax.adafactor(lr, multiply_by_parameter_scale=False)
    else:
        opt = optax.sgd(lr, momentum=0.9)
    if tc.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(tc.clip_norm), opt)
    if config is None or config.norm not in ("batch", "instance"):
        return opt
    return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, _frozen_labels)


def _frozen_labels(params):
    """'frozen' for the biases of convolutions followed by a norm layer, else 'train'."""
    import jax

    def label(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        conv_bias = len(keys) >= 3 and keys[-1] == "bias" and keys[-2].startswith("conv") \
            and keys[-3].startswith(("down", "dec"))
        return "frozen" if conv_bias else "train"

    return jax.tree_util.tree_map_with_path(label, params)


# -- train state ----------------------------------------------------------------------------
def model_config(tc: TrainConfig, num_classes: int):
    from workbench.model.unet import UNetConfig

    return UNetConfig.preset(tc.model, **{"num_classes": num_classes, **tc.model_overrides})


def create_train_state(config, tc: TrainConfig, *, variables=None) -> dict:
    """{params, batch_stats?, opt_state, step, rng}: a plain pytree that orbax saves."""
    import jax
    import jax.numpy as jnp

    from workbench.model.unet import Model

    if variables is None:
        variables = Model.init(config, seed=tc.seed).variables
    params = variables["params"]
    state = {
        "params": params,
        "opt_state": make_optimizer(tc, config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(tc.seed + 1)),
    }
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    return state


def abstract_train_state(config, tc: TrainConfig, sharding=None):
    """Shapes/dtypes (with ``sharding``) of :func:`create_train_state`, allocating nothing."""
    import jax

    shapes = jax.eval_shape(lambda: create_train_state(config, tc))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def variables_of(state) -> dict:
    out = {"params": state["params"]}
    if "batch_stats" in state:
        out["batch_stats"] = state["batch_stats"]
    return out


# -- set up mesh and step ---------------------------------------------------------------------
@dataclass
class TrainStep:
    """A jitted ``fn(state, images, labels) -> (state, metrics)`` and its shardings."""

    fn: Any
    layout: Any
    backend: str
    mesh: Any
    state_sharding: Any
    image_sharding: Any
    label_sharding: Any

    @property
    def target_shape(self):
        return self.layout.reference_shape if self.backend == "reference" else self.layout.padded_shape


_STEP_CACHE: dict = {}


def build_train_step(config, tc: TrainConfig, layout, *, backend: str | None = None, class_weights=None,
                     devices=None) -> TrainStep:
    """The partitioned train step for ``layout`` (volume shape + mesh) on ``backend``.

    Cached on everything the compiled step depends on, so a resumed or repeated run in
    the same process (tests, notebooks) reuses the compilation.
    """
    backend = backend or tc.backend
    key = (config, backend, layout.volume_shape, layout.mesh, tc.optimizer, tc.learning_rate, tc.schedule,
           tc.warmup_steps, tc.steps if tc.schedule != "constant" else None, tc.clip_norm, tc.dice_weight,
           None if class_weights is None else tuple(float(w) for w in class_weights),
           None if devices is None else tuple(devices))
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) > 16:
            _STEP_CACHE.clear()
        _STEP_CACHE[key] = _build_train_step(config, tc, layout, backend, class_weights, devices)
    return _STEP_CACHE[key]


def _build_train_step(config, tc, layout, backend, class_weights, devices) -> TrainStep:
    import jax
    import optax

    from workbench.training.losses import confusion_counts, segmentation_loss
    from workbench.execute.run import make_forward

    fn, mesh, image_sharding, state_sharding = make_forward(config, layout, backend=backend, train=True,
                                                            devices=devices)
    label_sharding = image_sharding
    if backend != "reference":
        label_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*image_sharding.spec[:4]))
    tx = make_optimizer(tc, config)
    volume_shape = layout.volume_shape
    weights = tuple(float(w) for w in (class_weights or (1.0,) * config.num_classes))
    if len(weights) != config.num_classes:
        raise ValueError(f"class_weights {weights} must have one weight per class ({config.num_classes})")

    def step(state, images, labels):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_fn(params):
            variables = {**variables_of(state), "params": params}
            logits, updates = fn(variables, images, rng)
            loss, parts = segmentation_loss(logits, labels, volume_shape, class_weights=weights,
                                            dice_weight=tc.dice_weight)
            return loss, (updates, parts, confusion_counts(logits, labels, volume_shape))

        (loss, (updates, parts, counts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        deltas, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {**state, "params": optax.apply_updates(state["params"], deltas), "opt_state": opt_state,
               "step": state["step"] + 1}
        if "batch_stats" in state:
            new["batch_stats"] = updates["batch_stats"]
        metrics = {"loss": loss, **parts, "grad_norm": optax.global_norm(grads),
                   "inter": counts[0], "pred": counts[1], "true": counts[2]}
        return new, metrics

    jitted = jax.jit(step, in_shardings=(state_sharding, image_sharding, label_sharding),
                     out_shardings=(state_sharding, state_sharding), donate_argnums=0)
    return TrainStep(jitted, layout, backend, mesh, state_sharding, image_sharding, label_sharding)


def step_memory(config, tc: TrainConfig, layout, *, backend: str = "explicit") -> dict:
    """Per-device bytes of the whole compiled train step (optimizer state included), AOT."""
    import jax
    import jax.numpy as jnp

    from workbench.execute.run import memory_stats

    ts = build_train_step(config, tc, layout, backend=backend)
    state = abstract_train_state(config, tc, ts.state_sharding)
    batch = tc.batch
    images = jax.ShapeDtypeStruct((batch, *ts.target_shape, config.in_channels), jnp.float32,
                                  sharding=ts.image_sharding)
    labels = jax.ShapeDtypeStruct((batch, *ts.target_shape), jnp.int32, sharding=ts.label_sharding)
    return memory_stats(ts.fn.lower(state, images, labels).compile())


def put_batch(ts: TrainStep, images: np.ndarray, labels: np.ndarray):
    """Pad a host batch to the step's shape and place each shard on its device."""
    from workbench.training.data import pad_to, place

    return place(pad_to(images, ts.target_shape), ts.image_sharding), \
        place(pad_to(labels, ts.target_shape), ts.label_sharding)


# -- evaluation -------------------------------------------------------------------------------
def evaluate(model, cases, mesh="1x1x1", *, backend: str = "explicit", class_names=None,
             hd95: bool = True) -> dict:
    """Dice per class per case and pooled, accuracy and HD95 (mm) of ``model`` on ``cases``.

    Runs the partitioned inference (running batch-norm statistics) at each case's full
    resolution on the spatial part of ``mesh``.
    """
    from workbench.training.losses import accuracy, dice_per_class, hausdorff95
    from workbench.mesh import MeshSpec, parse_mesh
    from workbench.execute.run import run

    spec = parse_mesh(mesh)
    spatial = MeshSpec(spec.z, spec.y, spec.x) if backend != "reference" else None
    k = model.config.num_classes
    names = tuple(class_names or [f"class{i}" for i in range(k)])
    per_case, inter, psum, tsum, accs, hds = [], np.zeros(k), np.zeros(k), np.zeros(k), [], []
    for case in cases:
        logits = run(model, case.image, spatial, backend=backend).output
        pred = logits.argmax(-1)
        truth = case.labels
        per_case.append(dice_per_class(pred, truth, k))
        for c in range(k):
            p, t = pred == c, truth == c
            inter[c] += np.sum(p & t)
            psum[c] += p.sum()
            tsum[c] += t.sum()
        accs.append(accuracy(pred, truth))
        if hd95:
            hds.append([hausdorff95(pred == c, truth == c, case.spacing) for c in range(1, k)])
    per_case = np.asarray(per_case)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.where(psum + tsum > 0, 2 * inter / (psum + tsum), np.nan)
    out = {
        "cases": [c.name for c in cases],
        "dice": {n: _nanmean(per_case[:, i]) for i, n in enumerate(names)},
        "dice_per_case": {n: [_num(v) for v in per_case[:, i]] for i, n in enumerate(names)},
        "pooled_dice": {n: _num(pooled[i]) for i, n in enumerate(names)},
        "accuracy": float(np.mean(accs)) if accs else None,
    }
    if hd95 and hds:
        hds = np.asarray(hds)
        out["hd95_mm"] = {n: _nanmean(hds[:, i - 1]) for i, n in enumerate(names) if i > 0}
    return out


def _num(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _nanmean(values) -> float | None:
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


# -- checkpoints -------------------------------------------------------------------------------
def restore_model(ckpt_dir, *, log=print):
    """(Model, meta) from the newest readable orbax checkpoint in ``ckpt_dir``."""
    from workbench.training.checkpoint import Checkpoints
    from workbench.model.unet import Model, UNetConfig

    ckpts = Checkpoints(ckpt_dir)
    steps = ckpts.steps()
    if not steps:
        raise FileNotFoundError(f"{ckpt_dir} holds no checkpoint; pass a folder written by workbench train")
    meta = None
    for step in reversed(steps):
        try:
            meta = ckpts.read_meta(step)
            break
        except Exception:  # noqa: BLE001 - restore() below reports the skipped steps
            continue
    if meta is None:
        ckpts.restore(None, log=log)  # raises the "no readable checkpoint" error
    config = UNetConfig(**meta["model"])
    tc = TrainConfig(**_train_config_fields(meta["train"]))
    import jax

    device = jax.devices()[0]
    abstract = abstract_train_state(config, tc, jax.sharding.SingleDeviceSharding(device))
    state, meta, step = ckpts.restore(abstract, expect_model=config.as_dict(), log=log)
    ckpts.close()
    meta = {**meta, "step": step}
    return Model(config, variables_of(state)), meta


def _train_config_fields(d: dict) -> dict:
    d = dict(d)
    if d.get("class_weights") is not None:
        d["class_weights"] = tuple(d["class_weights"])
    if isinstance(d.get("data"), list):
        d["data"] = tuple(d["data"])
    return {k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__}


# -- the loop ----------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT / SIGTERM set a flag; the loop checkpoints and returns after the current step."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_history(workdir: Path, history: dict) -> None:
    _write_atomic(workdir / "history.json", json.dumps(history, indent=1) + "\n")
    rows = history["train"]
    evals = {e["step"]: e for e in history["eval"]}
    keys = list(rows[0]) if rows else ["step"]
    ekeys = sorted({k for e in history["eval"] for k in e if k != "step"})
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(keys + [f"eval_{k}" for k in ekeys])
    for row in rows:
        e = evals.get(row["step"], {})
        writer.writerow([row.get(k) for k in keys] + [e.get(k) for k in ekeys])
    _write_atomic(workdir / "history.csv", buf.getvalue())


def plot_history(history: dict, path) -> Path:
    """Loss and Dice curves (train batches and held-out evaluations) as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows, evals = history["train"], history["eval"]
    names = history.get("class_names", [])[1:]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    ax1.plot(steps, [r["loss"] for r in rows], lw=0.8, label="loss")
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training loss (CE + w·Dice)")
    for n in names:
        ax2.plot(steps, [r.get(f"dice_{n}") for r in rows], lw=0.6, alpha=0.6, label=f"train batch {n}")
        pts = [(e["step"], e.get(f"dice_{n}")) for e in evals if e.get(f"dice_{n}") is not None]
        if pts:
            ax2.plot(*zip(*pts), "o-", label=f"held-out {n}")
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_title("Dice")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _train_row(step: int, metrics: dict, class_names, seconds: float, lr: float) -> dict:
    from workbench.training.losses import dice_from_counts

    dice = dice_from_counts(metrics["inter"], metrics["pred"], metrics["true"])["pooled"]
    row = {"step": step, "loss": float(metrics["loss"]), "ce": float(metrics["ce"]),
           "dice_loss": float(metrics["dice_loss"]), "grad_norm": float(metrics["grad_norm"]),
           "lr": lr, "seconds": seconds}
    for i, n in enumerate(class_names):
        if i:
            row[f"dice_{n}"] = _num(dice[i])
    return row


def _eval_row(step: int, result: dict) -> dict:
    row = {"step": step, "accuracy": result["accuracy"]}
    for n, v in result["dice"].items():
        row[f"dice_{n}"] = v
    for n, v in result["pooled_dice"].items():
        row[f"pooled_dice_{n}"] = v
    for n, v in result.get("hd95_mm", {}).items():
        row[f"hd95_{n}"] = v
    return row


def train_and_evaluate(config: TrainConfig, workdir, *, resume: bool = False, progress: bool = True,
                       log=print, source=None) -> dict:
    """Train ``config`` into ``workdir`` (checkpoints, history, plot, final weights) and evaluate.

    Returns a dict with ``history``, ``eval`` (final held-out metrics), ``step``,
    ``interrupted`` (signal name or None), ``params_steps_per_second`` and the paths written.
    A run interrupted by SIGINT/SIGTERM writes a checkpoint and returns; ``resume=True``
    continues from the newest readable checkpoint, exactly.
    """
    import jax

    from workbench.training.checkpoint import Checkpoints, save_weights
    from workbench.training.data import BatchStream, make_source
    from workbench.mesh import ShardLayout, parse_mesh
    from workbench.model.unet import Model

    tc = config
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"--checkpoint-dir {workdir} is a file; choose a folder path")
    # -- data and model ---------------------------------------------------------------------
    spec = tc.mesh_spec if tc.backend != "reference" else parse_mesh("1x1x1")
    if tc.backend != "reference":
        parse_mesh(spec, n_devices=None)
        if spec.n_devices > len(jax.devices()):
            parse_mesh(spec, n_devices=len(jax.devices()))  # the helpful error
    if tc.batch % spec.data:
        raise ValueError(f"batch {tc.batch} does not split over data={spec.data}; use a multiple of {spec.data}")
    source = source or make_source(tc.data, tc.resolution)
    cfg = model_config(tc, source.num_classes)
    weights = tc.class_weights
    if weights is None:
        weights = PAPER_CLASS_WEIGHTS if source.num_classes == 3 and "phantom" in source.description \
            else (1.0,) * source.num_classes
    if len(weights) != source.num_classes:
        raise ValueError(f"class_weights {tuple(weights)} must have {source.num_classes} entries "
                         f"({', '.join(source.class_names)})")
    layout = ShardLayout(source.shape, spec, multiple=cfg.multiple)
    meta = {"model": cfg.as_dict(), "train": tc.as_dict(), "class_names": list(source.class_names),
            "class_weights": list(weights), "data": source.description}
    # -- checkpoints: fresh or resume ---------------------------------------------------------
    ckpt_dir = workdir / "checkpoints"
    existing = []
    if ckpt_dir.is_dir():
        probe = Checkpoints(ckpt_dir, keep=tc.keep)
        existing = probe.steps()
        probe.close()
    if existing and not resume:
        raise FileExistsError(
            f"{workdir} already holds a training run (checkpoints at steps {existing}); pass --resume "
            "to continue it or choose a new --checkpoint-dir"
        )
    # -- set up mesh and step -------------------------------------------------------------------
    ts = build_train_step(cfg, tc, layout, class_weights=weights)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpts = Checkpoints(ckpt_dir, keep=tc.keep, writer=True)
    state, start = None, 0
    history = {"config": tc.as_dict(), "model": cfg.as_dict(), "class_names": list(source.class_names),
               "data": source.description, "train": [], "eval": []}
    if resume and existing:
        abstract = abstract_train_state(cfg, tc, ts.state_sharding)
        state, _, start = ckpts.restore(abstract, expect_model=cfg.as_dict(), log=log)
        if (workdir / "history.json").is_file():
            old = json.loads((workdir / "history.json").read_text())
            history["train"] = [r for r in old.get("train", []) if r["step"] <= start]
            history["eval"] = [r for r in old.get("eval", []) if r["step"] <= start]
        log(f"resumed from {ckpt_dir} step {start}")
    elif resume:
        log(f"no checkpoint in {ckpt_dir} to resume; starting at step 0")
    if state is None:
        state = jax.device_put(create_train_state(cfg, tc), ts.state_sharding)
    # -- update loop (from here on SIGINT/SIGTERM mean "checkpoint and return") -------------
    interrupted, step, last_good, final_eval = None, start, start, None
    stream = bar = None
    schedule = learning_rate_schedule(tc)

    def save(step):
        ckpts.save(step, state, meta)
        _write_history(workdir, history)

    def run_eval(step):
        model = Model(cfg, variables_of(state))
        result = evaluate(model, eval_cases, spec, backend=tc.backend, class_names=source.class_names)
        history["eval"].append(_eval_row(step, result))
        return result

    t_loop = time.perf_counter()
    with _StopFlag() as stop:
        try:
            _write_atomic(workdir / "config.json", json.dumps(meta, indent=1) + "\n")
            eval_cases = source.eval_cases(tc.eval_cases) if tc.eval_cases else []
            stream = BatchStream(source, tc.batch, start=start, seed=tc.seed, augment_data=tc.augment)
            bar = _progress(progress, tc.steps, start, source.description, spec)
            while step < tc.steps:
                images, labels = stream.next()
                t0 = time.perf_counter()
                x, y = put_batch(ts, images, labels)
                state, metrics = ts.fn(state, x, y)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                if not np.isfinite(metrics["loss"]):
                    raise NonFiniteLossError(
                        f"loss became {float(metrics['loss'])} at step {step + 1}; training stopped and the "
                        f"last good checkpoint (step {last_good}) in {ckpt_dir} is kept; lower the learning "
                        "rate or check the data, then --resume"
                    )
                step += 1
                row = _train_row(step, metrics, source.class_names, seconds, float(schedule(step - 1)))
                history["train"].append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(_postfix(row, source.class_names))
                if tc.eval_every and step % tc.eval_every == 0 and eval_cases and step < tc.steps:
                    run_eval(step)
                if step % tc.checkpoint_every == 0 or step == tc.steps or stop.signal:
                    save(step)
                    last_good = step
                if stop.signal:
                    interrupted = stop.signal
                    break
        finally:
            if stream is not None:
                stream.close()
            if bar is not None:
                bar.close()
    loop_seconds = time.perf_counter() - t_loop
    result = {"step": step, "interrupted": interrupted, "workdir": str(workdir), "history": history,
              "loop_seconds": loop_seconds}
    if interrupted:
        ckpts.close()
        log(f"{interrupted} at step {step}: checkpoint written to {ckpt_dir}; continue with --resume")
        return result
    if eval_cases:
        final_eval = run_eval(step)
    _write_history(workdir, history)
    ckpts.close()
    model = Model(cfg, jax.device_get(variables_of(state)))
    save_weights(workdir / "model.msgpack", model, {**meta, "step": step, "eval": final_eval})
    plot_history(history, workdir / "curves.png")
    result.update(eval=final_eval, model=model,
                  files=[str(workdir / n) for n in ("history.json", "history.csv", "curves.png", "model.msgpack")])
    return result


def _postfix(row: dict, class_names) -> dict:
    out = {"loss": f"{row['loss']:.3f}"}
    for n in class_names[1:]:
        v = row.get(f"dice_{n}")
        out[n[:6]] = "-" if v is None else f"{v:.2f}"
    out["s/step"] = f"{row['seconds']:.2f}"
    return out


def _progress(enabled: bool, total: int, initial: int, description: str, spec):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"train {description} on {spec}", unit="step")
