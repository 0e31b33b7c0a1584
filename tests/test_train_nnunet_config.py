"""Model descriptions with a schema: checkpoints written by main before it (fixture) still load,
resume and predict; the shipped weights predict bit for bit; entries are compared as configs."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from workbench.model.spec import NetworkSpec
from workbench.model.unet import Model, UNetConfig
from workbench.training import TrainConfig, train_and_evaluate
from workbench.training.checkpoint import (
    WEIGHTS_DIR,
    CheckpointMismatchError,
    load_model,
    load_weights,
    pretrained,
    save_weights,
)
from workbench.training.models import (
    MODEL_SCHEMA,
    NNUNetConfig,
    check_same_model,
    describe_model,
    init_model,
    parse_model,
)

OLD_RUN = Path(__file__).parent / "fixtures" / "checkpoints" / "paper_main_54e522c"
SPEC = NetworkSpec.residual(
    in_channels=2,
    num_outputs=2,
    kernels=[(1, 3, 3), (3, 3, 3)],
    strides=[(1, 1, 1), (1, 2, 2)],
    features=[4, 8],
    blocks=[1, 2],
    output_kind="sigmoid",
    output_names=("whole", "core"),
    regions_class_order=(1, 2),
)
NNCONFIG = NNUNetConfig(SPEC, regions=((1, 2), (2,)), batch_dice=False)


def _leaves(tree):
    return [np.asarray(a) for a in jax.tree.leaves(tree)]


def test_model_entries_are_parsed_into_configs():
    old = json.loads((OLD_RUN / "config.json").read_text())["model"]
    assert "schema" not in old  # the fixture is the old format
    assert parse_model(old) == UNetConfig(depth=2, base_filters=2, norm="batch")
    for config in (UNetConfig(depth=2), NNCONFIG):
        entry = json.loads(json.dumps(describe_model(config)))  # lists, as a checkpoint stores them
        assert entry["schema"] == MODEL_SCHEMA and entry["kind"] in ("unet", "nnunet")
        parsed = parse_model(entry)
        assert parsed == config and type(parsed) is type(config)
    nn = parse_model(json.loads(json.dumps(describe_model(NNCONFIG))))
    assert nn.spec.stages[1].kernel == (3, 3, 3) and nn.regions == ((1, 2), (2,))  # tuples again
    # a field added later keeps its default; an unknown one (a newer version) is refused
    entry = describe_model(UNetConfig(depth=2))
    del entry["config"]["remat"]
    assert parse_model(entry).remat is False
    entry["config"]["future_field"] = 1
    with pytest.raises(ValueError, match="future_field"):
        parse_model(entry)
    with pytest.raises(ValueError, match="newer workbench"):
        parse_model({**describe_model(UNetConfig()), "schema": MODEL_SCHEMA + 1})


def test_checkpoints_are_compared_as_configs():
    old = json.loads((OLD_RUN / "config.json").read_text())["model"]
    check_same_model(old, UNetConfig(depth=2, base_filters=2, norm="batch"), where="old")  # no error
    with pytest.raises(CheckpointMismatchError, match="base_filters: checkpoint 2 vs requested 4"):
        check_same_model(old, UNetConfig(depth=2, base_filters=4, norm="batch"), where="old")
    with pytest.raises(CheckpointMismatchError, match="a paper U-Net vs requested an nnU-Net network"):
        check_same_model(old, NNCONFIG, where="old")
    other = NNCONFIG.replace(batch_dice=True)
    with pytest.raises(CheckpointMismatchError, match="batch_dice: checkpoint False vs requested True"):
        check_same_model(describe_model(NNCONFIG), other, where="new")


def test_checkpoint_of_main_54e522c_loads_resumes_and_predicts(tmp_path):
    work = tmp_path / "run"
    shutil.copytree(OLD_RUN, work)
    model, meta = load_model(work, log=lambda m: None)
    assert meta["step"] == 2 and model.config == UNetConfig(depth=2, base_filters=2, norm="batch")
    weights, _ = load_weights(work / "model.msgpack")  # written at the end of the same run: step 2
    for a, b in zip(_leaves(model.variables), _leaves(weights.variables)):
        np.testing.assert_array_equal(a, b)
    tc = TrainConfig.from_dict(json.loads((work / "config.json").read_text())["train"]).replace(steps=3)
    logs = []
    resumed = train_and_evaluate(tc, work, resume=True, progress=False, log=logs.append)
    assert resumed["step"] == 3 and any("step 2" in m for m in logs)
    assert [r["step"] for r in resumed["history"]["train"]] == [1, 2, 3]
    # the resumed step is the step the current code takes from that state: a straight run agrees
    straight = train_and_evaluate(tc, tmp_path / "straight", progress=False)
    for a, b in zip(_leaves(resumed["model"].variables), _leaves(straight["model"].variables)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(b).max())))
    entry = json.loads((work / "config.json").read_text())["model"]
    assert entry["schema"] == MODEL_SCHEMA and entry["kind"] == "unet"  # rewritten in the new format


def test_shipped_weights_predict_bit_for_bit_as_before():
    """The old reader (``UNetConfig(**json)``) and the new one give the same model and logits."""
    from flax import serialization

    from workbench.execute.run import run

    path = WEIGHTS_DIR / "phantom_small.msgpack"
    payload = serialization.msgpack_restore(path.read_bytes())
    old = Model(UNetConfig(**json.loads(payload["config"])), payload["variables"])
    new = pretrained("phantom")
    assert new.config == old.config
    volume = np.random.default_rng(0).normal(0, 1, (16, 16, 16)).astype(np.float32)
    a = run(old, volume, None, backend="reference").output
    b = run(new, volume, None, backend="reference").output
    np.testing.assert_array_equal(a, b)


def test_nnunet_weights_round_trip(tmp_path):
    model = init_model(NNCONFIG, seed=3)
    model.config = NNCONFIG
    path = save_weights(tmp_path / "nn.msgpack", model, {"task": "test"})
    loaded, meta = load_weights(path)
    assert loaded.config == NNCONFIG and loaded.spec == SPEC and meta == {"task": "test"}
    for a, b in zip(_leaves(loaded.variables), _leaves(model.variables)):
        np.testing.assert_array_equal(a, b)


def test_cli_trains_resumes_and_evaluates_a_plans_network(tmp_path, capsys):
    """``workbench train --data DIR --fold 0 --plans PLANS`` (nnU-Net's iso_ct plans, shrunk to 3
    anisotropic stages) on a phantom dataset folder: history, checkpoints with the spec inside,
    resume, held-out evaluation; then ``workbench evaluate`` of the run (Dice per class, HD95)."""
    from nnunet_plans_helpers import tiny_plans

    from data_tools.synthetic.dataset import write_phantom_dataset
    from workbench.cli import main

    data = write_phantom_dataset(tmp_path / "Task01_Phantom", cases=5, test=0, shapes=16)
    plans = tiny_plans(tmp_path / "plans")
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--fold", "0", "--plans", str(plans), "--resolution", "16", "--mesh", "2x2x1",
            "--eval-cases", "1", "--checkpoint-every", "1", "--keep", "1", "--no-progress", "--checkpoint-dir", str(run)]  # fmt: skip
    assert main([*argv, "--steps", "1"]) == 0
    meta = json.loads((run / "config.json").read_text())
    assert meta["model"]["kind"] == "nnunet" and meta["model"]["spec"]["kernels"][0] == [1, 3, 3]
    assert meta["model"]["plans"]["configuration"] == "3d_fullres" and meta["class_names"] == [
        "background",
        "organ",
        "lesion",
    ]
    assert main([*argv, "--steps", "2", "--resume", "--force"]) == 0  # the memory check compiled the step above
    out = capsys.readouterr().out
    assert "resumed from" in out and "held-out Dice: background" in out
    history = json.loads((run / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2] and {"dice_organ", "dice_lesion", "ce"} <= set(
        history["train"][1]
    )
    model, _ = load_model(run, log=lambda m: None)
    assert isinstance(model.config, NNUNetConfig) and model.spec.multiple == (2, 4, 4)
    final, _ = load_weights(run / "model.msgpack")
    for a, b in zip(_leaves(model.variables), _leaves(final.variables)):
        np.testing.assert_array_equal(a, b)
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--mesh", "2x2x1", "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["split"] == "fold 0" and set(summary["mean_dice"]) == {"organ", "lesion"}
    assert all(0.0 <= v <= 1.0 for v in summary["mean_dice"].values() if v is not None)
    assert "dice_organ" in (tmp_path / "ev" / "cases.csv").read_text().splitlines()[0]


def test_cli_trains_and_evaluates_the_two_channel_region_dataset(tmp_path, capsys):
    """The 2-channel tumour phantom (T2 + ADC, regions whole = {1, 2} and core = {2}) through
    ``workbench train --data DIR --fold 0 --plans P`` (the plans of nnU-Net's fixture model),
    ``workbench evaluate`` (class Dice on the painted map, region Dice) and a fine-tune of
    nnU-Net's trained model (``--checkpoint NNUNET_FOLDER``)."""
    from data_tools.synthetic.dataset import write_phantom_dataset
    from workbench.cli import main

    folder = Path(__file__).parent / "fixtures" / "nnunet" / "results" / "Dataset903_ThickMRI"
    folder = folder / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    data = write_phantom_dataset(tmp_path / "tumour", cases=5, test=0, shapes=16, task="tumour", layout="nnunet")
    common = ["--data", str(data), "--fold", "0", "--steps", "1", "--mesh", "2x2x1", "--eval-cases", "1",
              "--no-progress", "--lr", "1e-4"]  # fmt: skip
    assert main(["train", *common, "--plans", str(folder / "plans.json"), "--checkpoint-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "held-out region Dice: whole" in out
    history = json.loads((tmp_path / "a" / "history.json").read_text())
    assert {"dice_whole", "dice_core"} <= set(history["train"][0])  # a step's Dice per region
    assert {"region_dice_whole", "region_dice_core"} <= set(history["eval"][0])
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    assert meta["model"]["regions"] == [[1, 2], [2]] and meta["model"]["spec"]["in_channels"] == 2
    assert main(["evaluate", "--checkpoint", str(tmp_path / "a"), "--data", str(data), "--mesh", "2x2x1",
                 "--out", str(tmp_path / "ev"), "--no-progress"]) == 0  # fmt: skip
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["mean_region_dice"]) == {"whole", "core"}
    assert all(v is None or 0.0 <= v <= 1.0 for v in summary["mean_region_dice"].values())
    assert "region_dice_whole" in (tmp_path / "ev" / "cases.csv").read_text().splitlines()[0]
    # fine-tuning nnU-Net's trained model: its plans and fold 0's weights (the step compiled above is reused)
    ft = ["train", *common, "--checkpoint", str(folder), "--weights-fold", "0", "--force", "--checkpoint-dir"]
    assert main([*ft, str(tmp_path / "b")]) == 0
    tuned, meta = load_model(tmp_path / "b", log=lambda m: None)
    assert meta["step"] == 1 and tuned.spec.num_outputs == 2
