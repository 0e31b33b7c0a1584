"""The real-browser check: JupyterLab + headless Chromium run the quickstart notebook.

Starts JupyterLab (this environment, the ``workbench`` kernel that ``make install``
registers) on a free localhost port with a token, serving a temporary copy of
``notebooks/01_quickstart.ipynb`` (so autosave never touches the repository), opens it
in Debian's Chromium through Selenium + ``/usr/bin/chromedriver`` (nothing is
downloaded; ``benchmarks/_browser.py`` starts both), runs all cells from the *Run* menu,
waits for the widget panel and the last cell's output, and saves a screenshot under the
test's tmp folder (and at ``$WORKBENCH_BROWSER_SCREENSHOT`` when set, e.g.
``docs/quickstart_browser.png``). The same run then reads the notebook viewer's pixels
(:mod:`workbench.ui.notebook_viewer`): the volume is drawn, each shard's colour lies on
its boundary in the current slice and nowhere else, and a slice change through the
widget changes the picture.
"""

import importlib.util
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_browser", ROOT / "benchmarks" / "_browser.py")
B = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(B)
RUN_TIMEOUT = 300  # seconds for all cells (about a minute on a quiet 2-core machine)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port, isolated config, serving a copy of the quickstart."""
    problems = B.missing_requirements()
    if problems:
        pytest.fail("; ".join(problems))
    tmp = tmp_path_factory.mktemp("lab")
    work = tmp / "notebooks"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", work)
    # the kernel imports this checkout's package (as the rest of the tests do)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    with B.jupyter_lab(work, tmp, env_extra={"PYTHONPATH": path}) as server:
        yield server


@pytest.fixture(scope="module")
def browser(lab):
    with B.chromium(lab["tmp"] / "chromium-profile") as driver:
        yield driver


@pytest.fixture(scope="module")
def quickstart(lab, browser, tmp_path_factory):
    """The quickstart notebook, run once in the browser: (driver, screenshot path)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    shot = tmp_path_factory.mktemp("shots") / "quickstart_browser.png"
    driver.get(f"{lab['url']}/lab/tree/01_quickstart.ipynb?token={lab['token']}")

    def wait_for(xpath: str, what: str, timeout: float = 120):
        try:
            return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.XPATH, xpath)))
        except TimeoutException:
            raise AssertionError(f"{what} did not appear within {timeout} s; see {shot} and {lab['log']}") from None

    try:
        wait_for("//*[contains(@class, 'jp-Notebook')]//*[contains(@class, 'jp-Cell')]", "the notebook")
        # the notebook's kernel ('workbench', registered by make install) started and is idle
        session = B.settled_session(lab)
        assert session["kernel"]["name"] == "workbench"
        wait_for("//*[contains(@class, 'jp-Notebook-ExecutionIndicator')][@data-status='idle']", "an idle kernel")
        dialogs = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
        assert dialogs == [], f"JupyterLab asks: {dialogs[0].text!r}"
        B.run_all_cells(driver, shot)
        # the widget panel rendered: its button and its memory estimate
        wait_for(
            "//button[contains(@class, 'jupyter-button')][contains(., 'Run inference')]",
            "the widget panel",
            RUN_TIMEOUT,
        )
        wait_for(
            "//*[contains(@class, 'widget-html')][contains(., 'per device: fits')]",
            "the panel's memory estimate",
            RUN_TIMEOUT,
        )
        # every cell ran: the picture, then the closing checks (the comparison with the reference among them)
        wait_for(
            "//*[contains(@class, 'jp-OutputArea-output')][contains(., 'shards.png (')]",
            "the shards picture",
            RUN_TIMEOUT,
        )
        wait_for(
            "//*[contains(@class, 'jp-OutputArea-output')][contains(., 'all 4 checks passed')]",
            "the notebook's checks (last cell)",
            RUN_TIMEOUT,
        )
        errors = driver.find_elements(
            By.XPATH, "//*[contains(@class, 'jp-OutputArea-output')][contains(., 'Traceback')]"
        )
        assert errors == [], errors[0].text[:2000]
        title = driver.find_element(
            By.XPATH, "//*[contains(@class, 'widget-html')][contains(., 'Partitioned U-Net workbench')]"
        )
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", title)
        time.sleep(0.5)
    finally:
        driver.save_screenshot(str(shot))
        keep = os.environ.get("WORKBENCH_BROWSER_SCREENSHOT")
        if keep and shot.exists():
            shutil.copy(shot, keep)
    return driver, shot


def test_quickstart_runs_in_jupyterlab_and_shows_the_panel(quickstart):
    from selenium.webdriver.common.by import By

    driver, shot = quickstart
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = {b.text.strip() for b in driver.find_elements(By.CSS_SELECTOR, "button.jupyter-button")}
    assert {"Run inference", "Compare with reference", "Train N steps", "View", "Open in napari"} <= texts


# Every button and label of the panel whose text its box cuts (ipywidgets ellipsize with
# overflow: hidden, so a cut shows as scrollWidth > clientWidth).
_CUT_LABELS = """
const panel = arguments[0];
return Array.from(panel.querySelectorAll('button, .widget-label, .widget-label-basic'))
  .filter(el => el.offsetParent !== null && el.textContent.trim())
  .map(el => ({text: el.textContent.trim(), scroll: el.scrollWidth, client: el.clientWidth}))
  .filter(r => r.scroll > r.client);
"""


@pytest.mark.parametrize("width", [1200, 1400, 1600])
def test_the_panel_cuts_no_button_or_label(quickstart, width):
    """At common window widths (JupyterLab's side bar open) the panel's rows wrap instead of
    cutting a button or a control's label; every button stays whole."""
    driver, _ = quickstart
    size = driver.get_window_size()
    driver.set_window_size(width, size["height"])
    try:
        cut = _cut_labels(driver, width)
    finally:
        driver.set_window_size(size["width"], size["height"])
        time.sleep(0.5)
    assert cut == [], f"at {width} px: {cut}"


def _cut_labels(driver, width: int) -> list:
    from selenium.webdriver.common.by import By

    time.sleep(0.8)
    panel = driver.find_element(
        By.XPATH,
        "//*[contains(@class, 'widget-vbox')][.//*[contains(., 'Partitioned U-Net workbench')]]"
        "[.//button[contains(., 'Run inference')]]",
    )
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", panel)
    inner = driver.execute_script("return window.innerWidth;")
    assert abs(inner - width) <= 40, f"window is {inner} px wide, asked {width}"
    buttons = panel.find_elements(By.CSS_SELECTOR, "button.jupyter-button")
    assert len(buttons) >= 6
    return driver.execute_script(_CUT_LABELS, panel)


# -- the notebook viewer's pixels -----------------------------------------------------------------
TOLERANCE = 6  # per channel, 0-255: the page's pixels against a shard's colour


def _picture(canvas):
    """The canvas as the page shows it (a screenshot of the element), (H, W, 3) uint8."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB"))


def _strips(geometry: dict, box, width: int, shape) -> np.ndarray:
    """Where a shard's boundary is drawn in a view: a ``width``-pixel band inside the
    projection of its box (two shards meeting at a face show both colours)."""
    h, w = shape
    mask = np.zeros((h, w), bool)
    ra, ca = geometry["rowsAxis"], geometry["colsAxis"]
    x0, x1 = (round(c * geometry["width"] / geometry["cols"]) for c in box[ca])
    y0, y1 = (round(r * geometry["height"] / geometry["rows"]) for r in box[ra])
    mask[y0:y1, x0:x1] = True
    mask[y0 + width : y1 - width, x0 + width : x1 - width] = False
    return mask


def _matches(picture: np.ndarray, rgb) -> np.ndarray:
    return (np.abs(picture.astype(int) - np.asarray(rgb)[None, None, :]) <= TOLERANCE).all(-1)


def _check_view(canvas, layout, colors) -> dict:
    """The volume is drawn; each shard whose box holds the view's slice shows its colour
    along the projection of that box, and no shard colour appears anywhere else."""
    geometry = json.loads(canvas.get_attribute("data-geometry"))
    width = int(canvas.get_attribute("data-line-width"))
    picture = _picture(canvas)
    assert picture.shape[:2] == (geometry["height"], geometry["width"])
    axis, index = geometry["axis"], geometry["index"]
    inside = [s for s in layout.shards() if s.valid_box[axis][0] <= index < s.valid_box[axis][1]]
    assert inside, f"no shard holds slice {index} of axis {axis}"
    drawn = np.zeros(picture.shape[:2], bool)
    for shard in inside:
        strip = _strips(geometry, shard.valid_box, width, picture.shape[:2])
        drawn |= strip
        on_line = _matches(picture, colors[shard.index])[strip].mean()
        assert on_line > 0.85, f"shard {shard.index}: only {on_line:.0%} of its boundary has its colour"
    for shard in layout.shards():
        elsewhere = _matches(picture, colors[shard.index]) & ~drawn
        assert not elsewhere.any(), (
            f"shard {shard.index}'s colour at {np.argwhere(elsewhere)[:5].tolist()} off the boundaries"
        )
        if shard not in inside:
            assert not _matches(picture, colors[shard.index]).any(), f"shard {shard.index} is not in slice {index}"
    interior = picture[~drawn].astype(float).mean(-1)
    assert (interior > 20).mean() > 0.3 and interior.std() > 10, "the slice shows no volume"
    return {"index": index, "picture": picture, "shards": [s.index for s in inside]}


def test_the_notebook_viewer_draws_the_shards_and_follows_its_slider(quickstart, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from workbench.mesh import ShardLayout
    from workbench.ui.napari.layers import shard_colors

    driver, _ = quickstart
    layout = ShardLayout((32, 32, 32), "2x2x2")  # the notebook's RESOLUTION and MESH
    colors = np.rint(shard_colors(len(layout.shards()))[:, :3] * 255).astype(int)
    WebDriverWait(driver, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "canvas.wbv-canvas[data-geometry]")) == 3
    )
    canvases = driver.find_elements(By.CSS_SELECTOR, "canvas.wbv-canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvases[0])
    time.sleep(0.5)
    try:
        views = [_check_view(c, layout, colors) for c in canvases]
        assert [v["index"] for v in views] == [16, 16, 16]  # the centre of 32³
        assert views[0]["shards"] == [4, 5, 6, 7]  # z = 16 is in the upper half of the z split
        # one step down through the z slider: the other half's shards, another picture
        slider = driver.find_element(By.CSS_SELECTOR, "input.wbv-slider[data-axis='0']")
        driver.execute_script("arguments[0].focus();", slider)
        ActionChains(driver).send_keys(Keys.ARROW_LEFT).perform()
        WebDriverWait(driver, 30).until(lambda d: canvases[0].get_attribute("data-index") == "15")
        time.sleep(0.3)
        after = _check_view(canvases[0], layout, colors)
        assert after["shards"] == [0, 1, 2, 3]
        changed = np.abs(after["picture"].astype(int) - views[0]["picture"].astype(int)).max(-1) > 8
        assert changed.mean() > 0.05, f"only {changed.mean():.1%} of the pixels changed"
        label = driver.find_element(By.CSS_SELECTOR, ".wbv-view[data-axis='0'] .wbv-label").text
        assert label == "z = 15 / 31"
        # the voxel under the mouse names its shard and that shard's error; its table row lights up
        size = canvases[0].size
        ActionChains(driver).move_to_element_with_offset(
            canvases[0],
            int(24.5 * size["width"] / 32 - size["width"] / 2),
            int(8.5 * size["height"] / 32 - size["height"] / 2),
        ).perform()
        info = driver.find_element(By.CSS_SELECTOR, ".wbv-info")
        WebDriverWait(driver, 10).until(lambda d: info.get_attribute("data-shard") == "1")
        assert info.text.startswith("z 15 y 8 x 24") and "shard 1 (z0 y0 x1): max |Δ|" in info.text
        lit = driver.find_elements(By.CSS_SELECTOR, "table.wbv-shards tr.wbv-here")
        assert [row.get_attribute("data-shard") for row in lit] == ["1"]
        # an overlay switched on is fetched then: the halo band appears along the seams
        before = _picture(canvases[0])
        driver.find_element(By.CSS_SELECTOR, "input[data-overlay='halo band']").click()
        WebDriverWait(driver, 30).until(lambda d: np.abs(_picture(canvases[0]).astype(int) - before).max() > 8)
    finally:
        driver.save_screenshot(str(tmp_path / "viewer.png"))
