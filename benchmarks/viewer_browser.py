"""The notebook viewer in a real browser: bytes sent, time to first picture, time per slice change.

Compares the workbench's viewer (:mod:`workbench.ui.notebook_viewer`: slices streamed on
demand) with ipyniivue (NiiVue as an anywidget: whole volumes sent up front, rendered
with WebGL) on synthetic result folders of 256³ and 512³ (phantom image and labels, an
error map that decays away from the seams of a 2×2×2 mesh; written once under
``--data``). Each case runs in JupyterLab in Debian's headless Chromium (``_browser.py``):

* **first picture**: from the Shift+Enter that runs the viewer cell (the imports ran in
  the cell before) to the first animation frame in which the viewer's canvases show the
  volume (at least 10% of a 64×64 sample of each canvas not black); the cell itself
  loads the result folder, so reading and checking it is included;
* **bytes**: what the page received over its WebSockets from that key press until the
  picture (and, for NiiVue, until the transfer ended);
* **slice change**: from the key press on the z slider (workbench viewer) or the click
  in the axial view (NiiVue) to the first frame whose pixels differ.

Each figure is the median of ``--repeats`` runs with its range. Needs ``ipyniivue``
(``pip install ipyniivue``) for the comparison; ``--only workbench`` runs without it.

    python benchmarks/viewer_browser.py --sizes 256 512 --repeats 3 --json viewer.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _browser as B  # noqa: E402
from _common import ROOT, machine  # noqa: E402

# Installed in the page before anything runs: WebGL canvases keep their pixels (so both
# viewers are read the same way), Shift+Enter / slider keys / clicks start a timer, and a
# frame loop records when the watched canvases show a picture or change.
PAGE_PROBE = """
(() => {
  const getContext = HTMLCanvasElement.prototype.getContext;
  HTMLCanvasElement.prototype.getContext = function (kind, attrs) {
    if (kind === 'webgl' || kind === 'webgl2') attrs = Object.assign({}, attrs, {preserveDrawingBuffer: true});
    return getContext.call(this, kind, attrs);
  };
  const probe = window.__probe = {t0: null, first: null, changed: null, bytes0: 0, mode: null, before: null,
                                   selector: null, count: 1};
  const tiny = document.createElement('canvas'); tiny.width = tiny.height = 64;
  const tctx = tiny.getContext('2d', {willReadFrequently: true});
  probe.sample = (c) => { tctx.clearRect(0, 0, 64, 64); tctx.drawImage(c, 0, 0, 64, 64); return tctx.getImageData(0, 0, 64, 64).data; };
  probe.lit = (d) => { let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60 && d[i + 3] > 0) n++; return n / (d.length / 4); };
  probe.start = (mode) => { probe.mode = mode; probe.t0 = performance.now(); probe.first = probe.changed = null;
                            probe.bytes0 = window.__wsBytes || 0;
                            probe.old = new Set(mode === 'first' ? document.querySelectorAll(probe.selector) : []);
                            if (mode === 'change') probe.before = probe.sample(document.querySelector(probe.selector)); };
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && e.shiftKey) probe.start('first');
    else if (e.key.startsWith('Arrow')) probe.start('change');
  }, true);
  document.addEventListener('pointerdown', (e) => { if (e.target.tagName === 'CANVAS') probe.start('change'); }, true);
  const loop = () => {
    try {
      if (probe.mode === 'first' && probe.first === null) {
        const canvases = [...document.querySelectorAll(probe.selector)].filter((c) => !probe.old.has(c));  // the new viewer's
        if (canvases.length >= probe.count && canvases.every((c) => c.width > 0 && probe.lit(probe.sample(c)) >= 0.1)) {
          probe.first = performance.now() - probe.t0; probe.firstBytes = (window.__wsBytes || 0) - probe.bytes0;
        }
      } else if (probe.mode === 'change' && probe.changed === null) {
        const d = probe.sample(document.querySelector(probe.selector));
        for (let i = 0; i < d.length; i++) if (d[i] !== probe.before[i]) { probe.changed = performance.now() - probe.t0; break; }
      }
    } catch (err) { probe.error = String(err); }
    requestAnimationFrame(loop);
  };
  requestAnimationFrame(loop);
})();
"""

NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on screen
WORKBENCH_CELL = """from workbench.ui.notebook_viewer import viewer
v = viewer({folder!r})
v"""
NIIVUE_IMPORTS = """import nibabel as nib
import numpy as np
from ipyniivue import NiiVue
from workbench.app import load_result
from workbench.ui.notebook_viewer.scene import quantise_image
from workbench.ui.napari.volumes import _percentile_limits

def nifti(array, spacing, step):
    a = np.ascontiguousarray(np.asarray(array)[::step, ::step, ::step].transpose(2, 1, 0))  # NIfTI is x, y, z
    return nib.Nifti1Image(a, np.diag([spacing[2] * step, spacing[1] * step, spacing[0] * step, 1.0])).to_bytes()"""
NIIVUE_CELL = """r = load_result({folder!r})
step = {step}
image = quantise_image(r.image, _percentile_limits(r.image))
error = np.clip(np.abs(np.asarray(r.signed)) * (255 / max(r.signed.max(), -r.signed.min())), 0, 255).astype(np.uint8)
nv = NiiVue(height=400)
nv.load_volumes([{{"data": nifti(image, r.spacing, step), "name": "image.nii", "colormap": "gray"}},
                 {{"data": nifti(r.prediction, r.spacing, step), "name": "prediction.nii", "colormap": "random", "opacity": 0.4}},
                 {{"data": nifti(error, r.spacing, step), "name": "error.nii", "colormap": "magma", "cal_min": 8, "opacity": 0.8}}])
nv"""


# -- synthetic result folders ---------------------------------------------------------------------
def make_result(folder: Path, n: int, mesh: str = "2x2x2") -> Path:
    """A result folder of an ``n``³ phantom (written once; kept for the next run)."""
    import numpy as np

    from data_tools.synthetic import make_phantom
    from workbench.analysis.compare import seam_distance
    from workbench.app.results import write_report
    from workbench.mesh import ShardLayout

    folder = folder / f"result{n}"
    if (folder / "report.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    phantom = make_phantom(n)
    np.save(tmp / "image.npy", np.asarray(phantom.array, np.float32))
    labels = np.asarray(phantom.labels, np.uint8)
    for name in ("prediction.npy", "ground_truth.npy", "reference_prediction.npy"):
        np.save(tmp / name, labels)
    del phantom, labels
    layout = ShardLayout((n, n, n), mesh)
    error = np.lib.format.open_memmap(tmp / "error.npy", "w+", np.float32, (n, n, n))
    rng = np.random.default_rng(0)
    for z0 in range(0, n, 32):
        box = ((z0, min(n, z0 + 32)), (0, n), (0, n))
        d = seam_distance(layout, box)
        noise = rng.standard_normal(d.shape, dtype=np.float32)
        error[z0 : z0 + 32] = 1e-2 * np.exp(-np.minimum(d, 64) / 2.0).astype(np.float32) * noise
    error.flush()
    del error
    shards = [{"index": s.index, "coords": list(s.coords), "box": [list(b) for b in s.valid_box],
               "max_abs_diff": None, "mean_abs_diff": None, "rms_diff": None, "voxels_over_tolerance": None}
              for s in layout.shards()]  # fmt: skip
    write_report(tmp, {"input_shape": [n, n, n], "mesh": layout.mesh.as_dict(), "halo": 4, "per_shard": shards,
                       "prediction": "prediction.npy", "spacing": [1.0, 1.0, 1.0], "model": {"depth": 1}})  # fmt: skip
    tmp.rename(folder)
    return folder


# -- one case in the browser ----------------------------------------------------------------------
def _notebook(path: Path, cells: list[str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "workbench", "display_name": "Python (workbench)", "language": "python"}
    nbformat.write(nb, path)


def _wait(driver, script: str, timeout: float, what: str):
    """Poll ``script`` until it returns a value (times are measured in the page, so a page
    too busy to answer for a while only delays the poll, not the figure)."""
    from urllib3.exceptions import ReadTimeoutError

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = driver.execute_script(script)
        except ReadTimeoutError:
            continue
        if value is not None:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what} not within {timeout} s")


def _run_cell(driver, index: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    cell = driver.find_elements(By.CSS_SELECTOR, f"{NOTEBOOK} .jp-CodeCell")[index]
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", cell)
    cell.find_element(By.CSS_SELECTOR, ".jp-InputArea-editor").click()  # edit mode in that cell
    time.sleep(0.3)
    ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()


def _sessions(lab) -> list[dict]:
    import urllib.request

    with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
        return json.load(r)


def _session_for(lab, path: str, timeout: float = 120, stable: float = 3) -> None:
    """Wait until ``path``'s kernel is the same one and idle for ``stable`` seconds."""
    deadline, seen, since = time.monotonic() + timeout, None, 0.0
    while time.monotonic() < deadline:
        mine = [s for s in _sessions(lab) if s["path"] == path]
        key = (mine[0]["kernel"]["id"], mine[0]["kernel"]["execution_state"]) if len(mine) == 1 else None
        if key != seen:
            seen, since = key, time.monotonic()
        elif key and key[1] == "idle" and time.monotonic() - since >= stable:
            return
        time.sleep(0.3)
    raise TimeoutError(f"the kernel of {path} did not settle in {timeout} s")


def _idle(lab, timeout=600) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
            sessions = json.load(r)
        if sessions and all(s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        time.sleep(0.3)
    raise TimeoutError("the kernel stayed busy")


def measure_case(lab, driver, work: Path, library: str, n: int, folder: Path, repeats: int, changes: int,
                 first_timeout: float) -> dict:  # fmt: skip

    name = f"{library}_{n}.ipynb"
    step = 1
    if library == "workbench":
        cells = ["import workbench.ui.notebook_viewer", WORKBENCH_CELL.format(folder=str(folder))]
        selector, count = f"{NOTEBOOK} canvas.wbv-canvas", 3
    else:
        step = 2 if library == "niivue-half" else 1
        cells = [NIIVUE_IMPORTS, NIIVUE_CELL.format(folder=str(folder), step=step)]
        selector, count = f"{NOTEBOOK} .jp-OutputArea canvas", 1
    _notebook(work / name, cells)
    driver.get(f"{lab['url']}/lab/tree/{name}?reset&token={lab['token']}")  # reset: only this notebook open
    _wait(driver, f"return document.querySelector('{NOTEBOOK} .jp-CodeCell') ? 1 : null", 120, "the notebook")
    _session_for(lab, name)
    driver.execute_script(f"window.__probe.selector = {json.dumps(selector)}; window.__probe.count = {count};")
    _run_cell(driver, 0)
    time.sleep(1)
    _idle(lab)
    row = {"library": library, "size": n, "float32_bytes": 4 * n**3, "step": step, "first_s": [], "first_bytes": [],
           "settled_bytes": [], "change_ms": []}  # fmt: skip
    for _ in range(repeats):
        _run_cell(driver, 1)
        first = _wait(driver, "return window.__probe.first", first_timeout, f"{library} {n}³ first picture")
        row["first_s"].append(first / 1000)
        row["first_bytes"].append(driver.execute_script("return window.__probe.firstBytes"))
        _idle(lab)
        before = -1
        while True:  # until the transfer ended (2 s without a byte)
            now = driver.execute_script("return window.__wsBytes - window.__probe.bytes0")
            if now == before:
                break
            before = now
            time.sleep(2)
        row["settled_bytes"].append(before)
    try:
        _slice_changes(driver, row, library, selector, changes)
    except Exception as err:  # keep what was measured
        row["change_error"] = str(err)[:300]
    _screenshot(driver, work / f"{library}_{n}.png")
    return row


def _slice_changes(driver, row: dict, library: str, selector: str, changes: int) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    canvases = driver.find_elements(By.CSS_SELECTOR, selector)
    if library == "workbench":  # each slider in turn: z, y, x (y and x slices read across the file)
        row["change_axis"] = []
        for i in range(changes):
            axis = i % 3
            slider = driver.find_elements(By.CSS_SELECTOR, f"{NOTEBOOK} input.wbv-slider[data-axis='{axis}']")[-1]
            view = json.dumps(f'{selector}[data-axis="{axis}"]')
            driver.execute_script(f"window.__probe.selector = {view};")
            driver.execute_script("arguments[0].focus();", slider)
            ActionChains(driver).send_keys(Keys.ARROW_RIGHT if (i // 3) % 2 == 0 else Keys.ARROW_LEFT).perform()
            row["change_ms"].append(_wait(driver, "return window.__probe.changed", 30, "a slice change"))
            row["change_axis"].append("zyx"[axis])
            time.sleep(0.3)
    else:
        canvas = canvases[-1]
        w = canvas.size["width"]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas)
        driver.execute_script(f"window.__probe.selector = {json.dumps(selector)};")
        time.sleep(0.5)
        for i in range(changes):  # clicks in the first (axial) view at different places: the crosshair moves
            ActionChains(driver).move_to_element_with_offset(
                canvas, -w // 2 + w // 8 + 9 * (i % 5) - 18, 11 * (i % 3) - 11
            ).click().perform()
            row["change_ms"].append(_wait(driver, "return window.__probe.changed", 30, "a slice change"))
            time.sleep(0.3)


def _page_state(driver) -> str | None:
    """What the probe saw (for a failed case), or None when the page does not answer."""
    try:
        return driver.execute_script("const p = window.__probe; return JSON.stringify({mode: p.mode, first: p.first, "
                                     "changed: p.changed, error: p.error, selector: p.selector})")  # fmt: skip
    except Exception:
        return None


def _screenshot(driver, path: Path) -> None:
    try:
        driver.save_screenshot(str(path))
    except Exception:  # a page too busy to answer
        pass


def _summary(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    p.add_argument("--only", nargs="+", default=["workbench", "niivue", "niivue-half"],
                   choices=["workbench", "niivue", "niivue-half"])  # fmt: skip
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--changes", type=int, default=12)
    p.add_argument("--first-timeout", type=float, default=240.0)
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "workbench-viewer-bench"))
    p.add_argument("--screenshots", default=None, help="keep each case's screenshot in this folder")
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="64³ only, workbench viewer only, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.only, args.repeats, args.changes = [64], ["workbench"], 1, 3
    problems = B.missing_requirements()
    if problems:
        print("\n".join(problems))
        return 1
    data = Path(args.data)
    folders = {n: make_result(data, n) for n in args.sizes}
    rows = []
    with tempfile.TemporaryDirectory(prefix="viewer-bench-") as tmp:
        tmp = Path(tmp)
        work = tmp / "notebooks"
        work.mkdir()
        with B.jupyter_lab(work, tmp, env_extra={"PYTHONPATH": str(ROOT)}) as lab:
            for library in args.only:
                for n in args.sizes:
                    if library == "niivue-half" and n < 512:
                        continue
                    with B.chromium(tmp / f"profile-{library}-{n}", count_bytes=True) as driver:
                        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PAGE_PROBE})
                        driver.set_script_timeout(args.first_timeout)  # a page busy decoding volumes answers late
                        try:
                            row = measure_case(lab, driver, work, library, n, folders[n], args.repeats, args.changes,
                                               args.first_timeout)  # fmt: skip
                        except Exception as err:  # a case that fails is reported, the others still run
                            row = {"library": library, "size": n, "float32_bytes": 4 * n**3, "error": str(err)[:300],
                                   "state": _page_state(driver)}  # fmt: skip
                            _screenshot(driver, work / f"{library}_{n}.png")
                    _shutdown_kernels(lab)  # with the page closed, so it does not start another
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    shot = work / f"{library}_{n}.png"
                    if args.screenshots and shot.exists():
                        Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                        shutil.copy(shot, Path(args.screenshots) / shot.name)
    print(
        "\n| viewer | volume | first picture (s) | bytes sent (MiB) | of float32 | slice change (ms) | by axis z / y / x |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['library']} | {r['size']}³ | failed: {r['error'][:80]} | | | | |")
            continue
        mib = [b / 2**20 for b in r["settled_bytes"]]
        frac = statistics.median(r["settled_bytes"]) / r["float32_bytes"]
        axes = r.get("change_axis")
        by_axis = " / ".join(
            f"{statistics.median([t for t, a in zip(r['change_ms'], axes) if a == name]):.0f}" for name in "zyx"
        ) if axes else "–"  # fmt: skip
        print(f"| {r['library']} | {r['size']}³ | {_summary(r['first_s'])} | {_summary(mib)} | {frac:.4f} | "
              f"{_summary(r['change_ms'])} | {by_axis} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    return 0


def _shutdown_kernels(lab) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as r:
        sessions = json.load(r)
    for s in sessions:
        req = urllib.request.Request(f"{lab['url']}/api/sessions/{s['id']}?token={lab['token']}", method="DELETE")
        urllib.request.urlopen(req, timeout=30).close()


if __name__ == "__main__":
    sys.exit(main())
