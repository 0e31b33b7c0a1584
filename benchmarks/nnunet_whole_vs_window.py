"""An nnU-Net-trained model: the workbench's whole-volume partitioned prediction against
nnU-Net's own sliding-window prediction of the same cases (issue 23, item 4).

One command drives both environments (the torch steps run in ``.venv-nnunet``, see
tests/fixtures/nnunet/README.md; the rest in the project's venv):

    python benchmarks/nnunet_whole_vs_window.py all --work /tmp/nnwv [--train-minutes 35]

Steps (each skipped when its output exists in ``--work``):

1. ``data``: a phantom dataset in nnU-Net's raw layout, ``Dataset950_PhantomWV``: CT
   phantoms of ``data_tools.synthetic`` (organ 1, lesions 2, no vessels), 64×128×128 at
   6.25×3.125×3.125 mm, 20 training cases (seeds 0–19) and 5 test cases (seeds 100–104)
   with their labels.
2. ``train`` (torch): nnU-Net's fingerprint and ``ExperimentPlanner``, then the plans'
   ``3d_fullres`` patch and network are made smaller so that the sliding window matters and
   training fits the CPU: patch 32×64×64 (nnU-Net plans the whole 64×128×128), batch 2, a
   4-stage PlainConvUNet (features 8, 16, 32, 64; kernels (1,3,3), (3,3,3)×3; strides
   (1,1,1), (1,2,2), (2,2,2)×2; nnU-Net's own rules for this spacing). Then nnU-Net's
   preprocessing and its ``nnUNetTrainer`` on CPU, one thread, fold 0 (16 training cases,
   4 validation cases), with a time budget: 50 iterations per epoch and as many epochs as
   fit ``--train-minutes`` (the poly learning-rate schedule is stretched over them after the
   first epoch). The weights are also written as ``checkpoint_final_network_weights.npz`` for
   the torch-free workbench.
3. ``nnunet`` (torch): ``nnUNetPredictor`` (tile_step_size 0.5, Gaussian, on CPU), without
   and with mirroring, per test case: the segmentation, the seconds and the peak resident
   memory above the process's level before the case, and the sliding-window tile starts.
4. ``workbench``: ``predict_nnunet`` on the whole volume, mesh 2x2x2 (8 simulated CPU
   devices), without and with ``--mirror``; the first case is run once more untimed to
   compile. The same measurements.
5. ``compare``: per case and mean: Dice of each prediction against the ground truth (per
   class), Dice between the two, the fraction of voxels that differ and where (distance to
   the nearest inner tile border of the sliding window, to the volume's faces, to a label
   edge), seconds and peak memory and their ratios. Writes
   ``benchmarks/results/nnunet_whole_vs_window_<date>.json`` and ``…_<date>.png`` (a slice:
   image, both predictions, their difference, the tile borders), and one viewer result folder
   per mirroring setting (``workbench infer … --compare-with``) under ``--work``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NNUNET_PYTHON = ROOT / ".venv-nnunet" / "bin" / "python"
DATASET = "Dataset950_PhantomWV"
DATASET_ID = 950
SHAPE = (64, 128, 128)
TRAIN_SEEDS = list(range(20))
TEST_SEEDS = list(range(100, 105))
PATCH = [32, 64, 64]
ARCH = {  # the 3d_fullres network the plans get (nnU-Net's conventions, fewer features and stages)
    "n_stages": 4,
    "features_per_stage": [8, 16, 32, 64],
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2],
}
TRAINER = "nnUNetTrainerTimed"
CLASSES = ("background", "organ", "lesion")
BAND = 3  # voxels: "near" a tile border, a volume face or a label edge


def env_for(work: Path) -> dict:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(work / "raw"),
        nnUNet_preprocessed=str(work / "preprocessed"),
        nnUNet_results=str(work / "results"),
        nnUNet_n_proc_DA="1",  # the planner needs >= 1; training sets 0 (augmentation in-process)
        OMP_NUM_THREADS="1",
        nnUNet_compile="f",
        MKL_NUM_THREADS="1",
    )
    return env


def model_folder(work: Path) -> Path:
    return work / "results" / DATASET / f"{TRAINER}__nnUNetPlans__3d_fullres"


class PeakRSS:
    """Peak resident memory of this process above its level at the start (sampled every 5 ms)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.base) / 2**20


# -- 1. the dataset (project venv) -------------------------------------------------------------------
def make_data(work: Path) -> Path:
    from data_tools.io import write_volume
    from data_tools.synthetic.raster import make_phantom
    from data_tools.volume import Volume

    raw = work / "raw" / DATASET
    if (raw / "dataset.json").is_file():
        return raw
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for seed in TRAIN_SEEDS + TEST_SEEDS:
        phantom = make_phantom(SHAPE, seed=seed, vessels=False)
        images, labels = ("imagesTs", "labelsTs") if seed in TEST_SEEDS else ("imagesTr", "labelsTr")
        name = f"phantom_{seed:03d}"
        hu = np.rint(phantom.array).astype(np.int16)
        write_volume(Volume(hu, spacing=phantom.spacing, affine=phantom.affine), raw / images / f"{name}_0000.nii.gz")
        write_volume(Volume(phantom.labels.astype(np.uint8), spacing=phantom.spacing, affine=phantom.affine),
                     raw / labels / f"{name}.nii.gz")  # fmt: skip
    spec = {"channel_names": {"0": "CT"}, "labels": {n: i for i, n in enumerate(CLASSES)},
            "numTraining": len(TRAIN_SEEDS), "file_ending": ".nii.gz",
            "description": f"data_tools.synthetic CT phantoms {SHAPE}, seeds {TRAIN_SEEDS[0]}-{TRAIN_SEEDS[-1]} "
            f"(train), {TEST_SEEDS[0]}-{TEST_SEEDS[-1]} (test)"}  # fmt: skip
    (raw / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return raw


# -- 2. training (nnU-Net's venv) ----------------------------------------------------------------
def torch_train(work: Path, minutes: float) -> None:
    import torch

    torch.set_num_threads(1)
    env = env_for(work)
    os.environ.update(env)
    bindir = Path(sys.executable).parent
    pre = work / "preprocessed" / DATASET
    plans_file = pre / "nnUNetPlans.json"
    if not (pre / "nnUNetPlans_3d_fullres").is_dir():
        run = [str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-np", "1", "-npfp", "1"]
        subprocess.run(run + ["--no_pp", "--verify_dataset_integrity"], check=True, env=env)
        plans = json.loads(plans_file.read_text())
        config = plans["configurations"]["3d_fullres"]
        planned = {"patch_size": config["patch_size"], "batch_size": config["batch_size"],
                   "arch_kwargs": dict(config["architecture"]["arch_kwargs"])}  # fmt: skip
        config["patch_size"] = PATCH
        config["batch_size"] = 2
        config["architecture"]["arch_kwargs"].update(ARCH)
        plans["workbench_comparison_note"] = {"as_planned_by_nnunet": planned, "replaced_by": {"patch_size": PATCH,
                                              "batch_size": 2, "arch_kwargs": ARCH}}  # fmt: skip
        plans_file.write_text(json.dumps(plans, indent=4))
        subprocess.run([str(bindir / "nnUNetv2_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1"],
                       check=True, env=env)  # fmt: skip
    folder = model_folder(work)
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cpu = torch.device("cpu")

    class Stop(Exception):
        pass

    class nnUNetTrainerTimed(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming
        """nnUNetTrainer with 50 iterations per epoch and as many epochs as fit the budget."""

        def __init__(
            self,
            plans: dict,
            configuration: str,
            fold: int,
            dataset_json: dict,
            device: torch.device = cpu,
        ):  # nnU-Net reads this signature (my_init_kwargs): no *args
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = 50
            self.num_val_iterations_per_epoch = 5
            self.num_epochs = 10_000  # replaced after the first epoch
            self.budget_s = minutes * 60.0
            self.started = None

        def on_epoch_start(self):
            if self.started is None:
                self.started = time.time()
            super().on_epoch_start()

        def on_epoch_end(self):
            super().on_epoch_end()  # current_epoch is now the number of epochs done
            mean = (time.time() - self.started) / self.current_epoch
            remaining = int((self.budget_s - (time.time() - self.started)) // mean)
            if remaining <= 0:
                raise Stop
            # re-estimated every epoch (the machine is shared): the poly schedule ends where the budget does
            self.num_epochs = self.current_epoch + remaining
            self.lr_scheduler.max_steps = self.num_epochs
            self.print_to_log_file(f"time budget {self.budget_s:.0f} s: {self.num_epochs} epochs expected")

        def run_training(self):
            try:
                super().run_training()
            except Stop:
                self.on_train_end()

    os.environ["nnUNet_n_proc_DA"] = "0"  # SingleThreadedAugmenter: no worker processes
    plans = load_json(str(plans_file))
    plans["continue_training"] = False  # what nnUNetv2_train's get_trainer_from_args puts there
    dataset_json = load_json(str(pre / "dataset.json"))
    trainer = nnUNetTrainerTimed(plans, "3d_fullres", 0, dataset_json, device=cpu)
    t0 = time.time()
    trainer.run_training()
    seconds = time.time() - t0
    final = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(final, map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = "nnUNetTrainer"  # the network is nnUNetTrainer's; the predictor must find the class
    torch.save(checkpoint, final)
    weights = {k: v.detach().float().numpy() for k, v in checkpoint["network_weights"].items()}
    np.savez(folder / "fold_0" / "checkpoint_final_network_weights.npz", **weights)
    (folder / "fold_0" / "training_time.json").write_text(
        json.dumps({"seconds": seconds, "epochs": trainer.current_epoch, "iterations_per_epoch": 50}) + "\n"
    )


def whole_volume_segmentation(predictor, data, props, mirror: bool = False):
    """nnU-Net's network on the whole preprocessed volume at once (float32, no tiles), with
    nnU-Net's own preprocessing and segmentation export: what the workbench computes."""
    import torch
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    pre, _, properties = DefaultPreprocessor(verbose=False).run_case_npy(
        data, None, dict(props), predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
    )
    x = torch.from_numpy(np.ascontiguousarray(pre))[None].float()
    net = predictor.network.eval()
    with torch.inference_mode():
        predictor.network.load_state_dict(predictor.list_of_parameters[0])
        logits = net(x)[0]
        if mirror:  # nnU-Net's order: every non-empty combination of the three axes, then the mean
            combos = [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
            for axes in combos:
                logits += torch.flip(net(torch.flip(x, axes)), axes)[0]
            logits /= len(combos) + 1
    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties
    )


# -- 3. nnU-Net's predictions (nnU-Net's venv) -----------------------------------------------------
N_CASES = [len(TEST_SEEDS)]  # --cases: the first N test cases (a quick run)
N_MIRROR = [2]  # --mirror-cases: with mirroring (8 passes per tile or volume) the first N of those


def test_cases(work: Path) -> list[str]:
    return [f"phantom_{seed:03d}" for seed in TEST_SEEDS[: N_CASES[0]]]


def cases_for(work: Path, mirror: bool) -> list[str]:
    """The test cases of a setting: with mirroring (8 passes) the first ``--mirror-cases``."""
    cases = test_cases(work)
    return cases[: N_MIRROR[0]] if mirror else cases


def torch_predict(work: Path, mirror: bool) -> None:
    """Per test case: nnU-Net's sliding window as nnU-Net runs it (timed; its peak memory over
    all cases), then, untimed: without mirroring the same sliding window with its accumulators in
    float32 instead of nnU-Net's float16, and nnU-Net's network on the whole volume at once."""
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference import predict_from_raw_data as pfr
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    torch.set_num_threads(os.cpu_count() or 1)
    out = work / "pred" / f"nnunet_m{int(mirror)}"
    out.mkdir(parents=True, exist_ok=True)
    predictor = pfr.nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirror,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    allow_tqdm=False)  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(model_folder(work)), use_folds=(0,))
    raw = work / "raw" / DATASET / "imagesTs"
    io = SimpleITKIO()
    inputs = {case: io.read_images([str(raw / f"{case}_0000.nii.gz")]) for case in cases_for(work, mirror)}
    rows = {}
    with PeakRSS() as total:
        first = next(iter(inputs.values()))
        predictor.use_mirroring = False  # a warm-up call (no mirroring: eager torch compiles nothing)
        predictor.predict_single_npy_array(*first)
        predictor.use_mirroring = mirror
        for case, (data, props) in inputs.items():
            t0 = time.perf_counter()
            seg = predictor.predict_single_npy_array(data, props)
            rows[case] = {"seconds": time.perf_counter() - t0,
                          "tile_starts": compute_steps_for_sliding_window(data.shape[1:], PATCH, 0.5)}  # fmt: skip
            np.save(out / f"{case}_sw.npy", seg.astype(np.uint8))
            io.write_seg(seg.astype(np.uint8), str(out / f"{case}.nii.gz"), props)
    for case, (data, props) in inputs.items():
        if not mirror:
            half = torch.half
            try:  # the same sliding window, its accumulators in float32 instead of nnU-Net's float16
                torch.half = torch.float32
                seg32 = predictor.predict_single_npy_array(data, props)
            finally:
                torch.half = half
            np.save(out / f"{case}_sw_fp32acc.npy", seg32.astype(np.uint8))
        whole = whole_volume_segmentation(predictor, data, props, mirror=mirror)
        np.save(out / f"{case}_whole.npy", np.asarray(whole, np.uint8))
    from importlib.metadata import version

    meta = {"cases": rows, "peak_rss_mib": total.mib, "torch_threads": torch.get_num_threads(), "mirror": mirror,
            "versions": {"torch": torch.__version__, "nnunetv2": version("nnunetv2")}}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# -- 4. the workbench's predictions (project venv, 8 simulated devices) ---------------------------------
def workbench_predict(work: Path, mirror: bool, mesh: str = "2x2x2") -> None:
    """Per test case: predict_nnunet on the whole volume (timed), after one untimed call that
    compiles; the peak memory over all calls, the compiling one included."""
    from benchmarks._common import start

    start(8)
    from data_tools.io import load_input
    from workbench.app.nnunet import _load_model, open_nnunet_folder, predict_nnunet

    out = work / "pred" / f"workbench_m{int(mirror)}"
    out.mkdir(parents=True, exist_ok=True)
    folder = open_nnunet_folder(model_folder(work), fold=0)
    model = _load_model(folder)
    raw = work / "raw" / DATASET / "imagesTs"
    volumes = {case: load_input(raw / f"{case}_0000.nii.gz") for case in cases_for(work, mirror)}
    rows = {}
    with PeakRSS() as total:
        t0 = time.perf_counter()
        predict_nnunet(folder.path, next(iter(volumes.values())), mesh, mirror=mirror, model=model)
        compile_run = time.perf_counter() - t0
        for case, volume in volumes.items():
            t0 = time.perf_counter()
            run = predict_nnunet(folder.path, volume, mesh, mirror=mirror, model=model)
            rows[case] = {"seconds": time.perf_counter() - t0,
                          "peak_bytes_per_device": run.report.get("peak_bytes_per_device"),
                          "network_shape": run.report["network_shape"]}  # fmt: skip
            np.save(out / f"{case}.npy", run.segmentation.astype(np.uint8))
    meta = {"cases": rows, "peak_rss_mib": total.mib, "compile_run_seconds": compile_run, "mesh": mesh,
            "mirror": mirror}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


# -- 5. the comparison (project venv) ------------------------------------------------------------------
def compare(work: Path, out_dir: Path, train_info: dict) -> dict:
    from data_tools.io import read_volume
    from workbench.app.nnunet_compare import compare_labels, dice_per_class, sliding_window_starts, tile_borders

    date = datetime.date.today().isoformat()
    settings = {}
    for mirror in (False, True):
        nn_dir, wb_dir = work / "pred" / f"nnunet_m{int(mirror)}", work / "pred" / f"workbench_m{int(mirror)}"
        nn_meta = json.loads((nn_dir / "meta.json").read_text())
        wb_meta = json.loads((wb_dir / "meta.json").read_text())
        cases = {}
        for case in cases_for(work, mirror):
            truth = np.asarray(read_volume(work / "raw" / DATASET / "labelsTs" / f"{case}.nii.gz").array, np.uint8)
            wb = np.load(wb_dir / f"{case}.npy")
            sw = np.load(nn_dir / f"{case}_sw.npy")
            whole = np.load(nn_dir / f"{case}_whole.npy")
            tiles = tile_borders(truth.shape, PATCH, 0.5)
            starts = nn_meta["cases"][case]["tile_starts"]  # nnU-Net's compute_steps_for_sliding_window
            assert sliding_window_starts(truth.shape, PATCH, 0.5) == starts, (case, starts)
            nn_s, wb_s = nn_meta["cases"][case]["seconds"], wb_meta["cases"][case]["seconds"]
            row = {
                "dice_vs_truth": {"nnunet_sliding_window": dice_per_class(sw, truth, CLASSES),
                                  "workbench_whole_volume": dice_per_class(wb, truth, CLASSES),
                                  "nnunet_network_whole_volume": dice_per_class(whole, truth, CLASSES)},
                "workbench_vs_nnunet_sliding_window": compare_labels(wb, sw, CLASSES, tiles=tiles, band=BAND),
                "workbench_vs_nnunet_network_whole_volume": compare_labels(wb, whole, CLASSES, band=BAND),
                "seconds": {"nnunet": nn_s, "workbench": wb_s, "ratio_workbench_over_nnunet": wb_s / nn_s},
                "workbench_peak_bytes_per_device": wb_meta["cases"][case]["peak_bytes_per_device"],
            }  # fmt: skip
            if not mirror:
                sw32 = np.load(nn_dir / f"{case}_sw_fp32acc.npy")
                row["dice_vs_truth"]["nnunet_sliding_window_fp32_accumulation"] = dice_per_class(sw32, truth, CLASSES)
                row["workbench_vs_nnunet_fp32_accumulation"] = compare_labels(wb, sw32, CLASSES, tiles=tiles, band=BAND)
                row["nnunet_fp16_vs_fp32_accumulation"] = compare_labels(sw, sw32, CLASSES, tiles=tiles, band=BAND)
            cases[case] = row
        nn_mib, wb_mib = nn_meta["peak_rss_mib"], wb_meta["peak_rss_mib"]
        settings["mirror" if mirror else "no_mirror"] = {
            "cases": cases, "mean": _means(cases),
            "peak_rss_mib": {"nnunet": nn_mib, "workbench": wb_mib, "ratio_workbench_over_nnunet": wb_mib / nn_mib,
                             "what": "peak resident memory above the level after loading the model, over a warm-up "
                             "call and every case (the workbench's includes XLA's compilation)"},
            "workbench_compile_run_seconds": wb_meta["compile_run_seconds"],
            "torch_threads": nn_meta["torch_threads"], "versions": nn_meta["versions"]}  # fmt: skip
    from benchmarks._common import machine

    result = {"date": date, "command": "python benchmarks/nnunet_whole_vs_window.py all --work WORK",
              "dataset": {"name": DATASET, "shape": SHAPE, "spacing_mm": [6.25, 3.125, 3.125],
                          "train_cases": len(TRAIN_SEEDS), "test_cases": len(TEST_SEEDS),
                          "generator": "data_tools.synthetic.make_phantom(vessels=False)"},
              "plans": {"patch_size": PATCH, "batch_size": 2, "arch_kwargs": ARCH,
                        "as_planned_by_nnunet": train_info.get("as_planned_by_nnunet")},
              "training": train_info, "tile_step_size": 0.5, "use_gaussian": True, "mesh": "2x2x2",
              "band_voxels": BAND, "settings": settings, "machine": machine()}  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"nnunet_whole_vs_window_{date}.json").write_text(json.dumps(result, indent=1) + "\n")
    figure(work, out_dir / f"nnunet_whole_vs_window_{date}.png")
    return result


def _means(cases: dict) -> dict:
    """The mean over cases of every number in the per-case rows (None where a case has None)."""

    def walk(rows):
        first = rows[0]
        if isinstance(first, dict):
            return {k: walk([r[k] for r in rows]) for k in first if k != "borders"}
        if isinstance(first, (int, float)) and not isinstance(first, bool) and all(r is not None for r in rows):
            return float(np.mean(rows))
        return None

    return walk(list(cases.values()))


def figure(work: Path, path: Path) -> None:
    """One slice of the case where the two differ most: image, nnU-Net's sliding window, the
    workbench's whole volume, their difference, with the inner tile borders drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from data_tools.io import read_volume
    from workbench.app.nnunet_compare import tile_borders

    best = None
    for case in test_cases(work):
        wb = np.load(work / "pred" / "workbench_m0" / f"{case}.npy")
        sw = np.load(work / "pred" / "nnunet_m0" / f"{case}_sw.npy")
        per_slice = (wb != sw).sum(axis=(1, 2))
        z = int(per_slice.argmax())
        if best is None or per_slice[z] > best[0]:
            best = (per_slice[z], case, z, wb, sw)
    _, case, z, wb, sw = best
    image = np.asarray(read_volume(work / "raw" / DATASET / "imagesTs" / f"{case}_0000.nii.gz").array)
    truth = np.asarray(read_volume(work / "raw" / DATASET / "labelsTs" / f"{case}.nii.gz").array)
    labels = ListedColormap(["none", "tab:green", "tab:red"])
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    tiles = tile_borders(wb.shape, PATCH, 0.5)
    panels = [("image, ground truth", truth), ("nnU-Net sliding window", sw), ("workbench whole volume", wb),
              ("differ (red), tile borders", None)]  # fmt: skip
    for ax, (title, lab) in zip(axes, panels):
        ax.imshow(image[z], cmap="gray", vmin=-200, vmax=250)
        if lab is not None:
            ax.imshow(np.ma.masked_equal(lab[z], 0), cmap=labels, vmin=0, vmax=2, alpha=0.5, interpolation="nearest")
        else:
            ax.imshow(np.ma.masked_equal((wb[z] != sw[z]).astype(int), 0), cmap=ListedColormap(["red"]),
                      interpolation="nearest")  # fmt: skip
            for b in tiles[1]:
                ax.axhline(b - 0.5, color="yellow", lw=0.6)
            for b in tiles[2]:
                ax.axvline(b - 0.5, color="yellow", lw=0.6)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case}, slice z={z} (of {wb.shape[0]}; z tile borders at {tiles[0]}): organ green, lesion red; "
                 f"{int((wb != sw).sum())} voxels differ in the volume", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- the test fixture (nnU-Net's venv): tests/fixtures/nnunet_window ------------------------------
FIXTURE_MODEL = (ROOT / "tests" / "fixtures" / "nnunet" / "results" / "Dataset903_ThickMRI"
                 / "nnUNetTrainer__nnUNetPlans__3d_fullres")  # fmt: skip
FIXTURE_OUT = ROOT / "tests" / "fixtures" / "nnunet_window"
FIXTURE_CASES = {"single": (8, 32, 32), "window": (16, 64, 48)}  # one tile of [8, 32, 32]; 3×3×2 tiles
STEP_CHECKS = [((16, 64, 48), (8, 32, 32)), ((64, 128, 128), (32, 64, 64)), ((110, 37, 8), (64, 20, 8)),
               ((13, 100, 97), (8, 32, 32))]  # fmt: skip


def torch_fixture() -> None:
    """nnU-Net's sliding-window segmentation (no mirroring) of two small 2-channel cases with
    the golden fixture's model (tests/fixtures/nnunet/results, random weights), and its network
    on the whole volume at once, for the torch-free test of ``workbench infer --compare-with``
    (tests/test_nnunet_compare.py)."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    torch.set_num_threads(1)
    FIXTURE_OUT.mkdir(parents=True, exist_ok=True)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)  # fmt: skip
    predictor.initialize_from_trained_model_folder(str(FIXTURE_MODEL), use_folds=(0,))
    meta = {"model": str(FIXTURE_MODEL.relative_to(ROOT)), "tile_step_size": 0.5, "use_gaussian": True,
            "use_mirroring": False, "cases": {}, "steps": []}  # fmt: skip
    rng = np.random.default_rng(23)
    for name, shape in FIXTURE_CASES.items():
        z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
        blob = (z / 0.7) ** 2 + (y / 0.5) ** 2 + (x / 0.6) ** 2 < 1
        files = []
        for c, (inside, outside) in enumerate(((400, 150), (900, 1300))):
            image = np.where(blob, inside, outside) + rng.normal(0, 40, shape)
            img = sitk.GetImageFromArray(np.rint(image).astype(np.int16))
            img.SetSpacing((0.6, 0.6, 4.0))
            files.append(FIXTURE_OUT / f"{name}_{c:04d}.nii.gz")
            sitk.WriteImage(img, str(files[-1]), True)
        data, props = SimpleITKIO().read_images([str(f) for f in files])
        seg = predictor.predict_single_npy_array(data, props)
        SimpleITKIO().write_seg(seg.astype(np.uint8), str(FIXTURE_OUT / f"{name}_nnunet.nii.gz"), props)
        whole = whole_volume_segmentation(predictor, data, props)
        SimpleITKIO().write_seg(whole.astype(np.uint8), str(FIXTURE_OUT / f"{name}_nnunet_whole.nii.gz"), props)
        meta["cases"][name] = {
            "shape": list(shape),
            "labels": {str(k): int(v) for k, v in zip(*np.unique(seg, return_counts=True))},  # fmt: skip
            "steps": compute_steps_for_sliding_window(shape, [8, 32, 32], 0.5),
        }
    for size, patch in STEP_CHECKS:
        meta["steps"].append({"size": list(size), "patch": list(patch),
                              "starts": compute_steps_for_sliding_window(size, patch, 0.5)})  # fmt: skip
    meta["versions"] = {m: __import__(m).__version__ for m in ("torch", "numpy", "SimpleITK")}
    from importlib.metadata import version

    meta["versions"]["nnunetv2"] = version("nnunetv2")
    (FIXTURE_OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = ["all", "data", "train", "_torch-train", "_torch-predict", "_workbench", "_torch-fixture"]
    p.add_argument("step", choices=steps, help="all: every step (each skipped when its output exists)")
    p.add_argument("--work", type=Path, default=Path("/tmp/nnwv"), help="the datasets, model and predictions")
    p.add_argument("--train-minutes", type=float, default=36.0, help="nnU-Net's training time budget")
    p.add_argument("--mirror", type=int, default=0)
    p.add_argument("--cases", type=int, default=len(TEST_SEEDS), help="compare the first N test cases only")
    p.add_argument("--mirror-cases", type=int, default=2, help="with mirroring, the first N of those (default 2)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    work = args.work.resolve()
    N_CASES[0], N_MIRROR[0] = args.cases, args.mirror_cases
    if args.step == "_torch-fixture":
        torch_fixture()
    elif args.step == "_torch-train":
        torch_train(work, args.train_minutes)
    elif args.step == "_torch-predict":
        torch_predict(work, bool(args.mirror))
    elif args.step == "_workbench":
        workbench_predict(work, bool(args.mirror))
    elif args.step == "data":
        make_data(work)
    elif args.step == "train":
        make_data(work)
        train(work, args.train_minutes)
    else:
        make_data(work)
        train(work, args.train_minutes)
        for mirror in (0, 1):
            if not (work / "pred" / f"nnunet_m{mirror}" / "meta.json").is_file():
                _call(NNUNET_PYTHON, "_torch-predict", work, mirror, args.cases)
            if not (work / "pred" / f"workbench_m{mirror}" / "meta.json").is_file():
                _call(sys.executable, "_workbench", work, mirror, args.cases)
        result = compare(work, args.out, training_info(work))
        viewer_folders(work)
        print_table(result)
    return 0


def _call(python, step: str, work: Path, mirror: int, cases: int) -> None:
    env = env_for(work)
    env["PYTHONPATH"] = str(ROOT)
    argv = [str(python), __file__, step, "--work", str(work), "--mirror", str(mirror), "--cases", str(cases),
            "--mirror-cases", str(N_MIRROR[0])]  # fmt: skip
    subprocess.run(argv, check=True, env=env)


def train(work: Path, minutes: float) -> None:
    if not (model_folder(work) / "fold_0" / "checkpoint_final_network_weights.npz").is_file():
        cmd = [str(NNUNET_PYTHON), __file__, "_torch-train", "--work", str(work), "--train-minutes", str(minutes)]
        subprocess.run(cmd, check=True, env=env_for(work))


def training_info(work: Path) -> dict:
    """Seconds, epochs and nnU-Net's last validation pseudo-Dice, from the training folder."""
    import re

    fold = model_folder(work) / "fold_0"
    info = json.loads((fold / "training_time.json").read_text())
    logs = sorted(fold.glob("training_log_*.txt"))
    dice = re.findall(r"Pseudo dice \[(.*)\]", logs[-1].read_text()) if logs else []
    if dice:
        info["last_pseudo_dice_organ_lesion"] = [float(v) for v in re.findall(r"\(([-0-9.e]+)\)", dice[-1])]
    plans = json.loads((model_folder(work) / "plans.json").read_text())
    info["as_planned_by_nnunet"] = (plans.get("workbench_comparison_note") or {}).get("as_planned_by_nnunet")
    info["trainer"] = f"{TRAINER}: nnUNetTrainer, 50 iterations/epoch, 5 validation iterations, CPU, 1 thread"
    return info


def viewer_folders(work: Path) -> None:
    """``workbench infer … --compare-with`` on the first test case, without and with mirroring:
    result folders that ``workbench view`` / napari open with nnU-Net's labels as the comparison."""
    case = test_cases(work)[0]
    for mirror in (0, 1):
        out = work / "view" / f"{case}_m{mirror}"
        if (out / "report.json").is_file():
            continue
        cmd = [str(Path(sys.executable).parent / "workbench"), "infer",
               str(work / "raw" / DATASET / "imagesTs" / f"{case}_0000.nii.gz"), "--checkpoint", str(model_folder(work)),
               "--mesh", "2x2x2", "--compare-with", str(work / "pred" / f"nnunet_m{mirror}" / f"{case}.nii.gz"),
               "--out", str(out)] + (["--mirror"] if mirror else [])  # fmt: skip
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def print_table(result: dict) -> None:
    from benchmarks._common import table

    for name, setting in result["settings"].items():
        rows = []
        for case, row in list(setting["cases"].items()) + [("mean", setting["mean"])]:
            d = row["dice_vs_truth"]
            between = row["workbench_vs_nnunet_sliding_window"]
            tile = between["where"]["tile_border"]
            rows.append([case, d["nnunet_sliding_window"]["organ"], d["workbench_whole_volume"]["organ"],
                         d["nnunet_sliding_window"]["lesion"], d["workbench_whole_volume"]["lesion"],
                         between["dice_between"]["organ"], between["dice_between"]["lesion"],
                         100 * between["differ_fraction"], None if tile["differ_fraction_within"] is None else
                         100 * tile["differ_fraction_within"], 100 * tile["volume_fraction_within"],
                         row["seconds"]["nnunet"], row["seconds"]["workbench"]])  # fmt: skip
        print(f"\n{name}")
        print(table(["case", "organ SW", "organ WV", "lesion SW", "lesion WV", "Dice organ", "Dice lesion",
                     "% differ", "% near tile", "% vol near tile", "s SW", "s WV"], rows,
                    ["s", ".4f", ".4f", ".4f", ".4f", ".4f", ".4f", ".3f", ".0f", ".0f", ".2f", ".2f"]))  # fmt: skip
        print(f"peak memory above the loaded model (MiB): {setting['peak_rss_mib']}")


if __name__ == "__main__":
    sys.exit(main())
