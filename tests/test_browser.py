"""The real-browser check: JupyterLab + headless Chromium run the quickstart notebook.

Starts JupyterLab (this environment, the ``workbench`` kernel that ``make install``
registers) on a free localhost port with a token, serving a temporary copy of
``notebooks/01_quickstart.ipynb`` (so autosave never touches the repository), opens it
in Debian's Chromium through Selenium + ``/usr/bin/chromedriver`` (nothing is
downloaded), runs all cells from the *Run* menu, waits for the widget panel and the last
cell's output, and saves a screenshot under the test's tmp folder (and at
``$WORKBENCH_BROWSER_SCREENSHOT`` when set, e.g. ``docs/quickstart_browser.png``).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KERNEL = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "workbench" / "kernel.json"
RUN_TIMEOUT = 300  # seconds for all cells (about a minute on a quiet 2-core machine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a free port, isolated config, serving a copy of the quickstart."""
    for path, fix in (
        (CHROMIUM, "make install (Debian package chromium)"),
        (CHROMEDRIVER, "make install (Debian package chromium-driver)"),
        (KERNEL, "make install (registers the 'workbench' Jupyter kernel)"),
    ):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing; run {fix}")
    tmp = tmp_path_factory.mktemp("lab")
    work = tmp / "notebooks"
    work.mkdir()
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", work)
    settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    notification = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # render every cell (no virtual scrolling), so every output is in the page; start the
    # notebook's kernel ('workbench') without asking
    (settings / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none", "autoStartDefaultKernel": True})
    )
    env = dict(
        os.environ,
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
    )
    port, token = _free_port(), "workbench-browser-test"
    log = tmp / "lab.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--no-browser",
                f"--port={port}",
                "--ip=127.0.0.1",
                f"--IdentityProvider.token={token}",
                f"--ServerApp.root_dir={work}",
                "--LabApp.news_url=None",
                "--LabApp.extension_manager=readonly",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
                "--ServerApp.port_retries=0",
            ]
            + (["--allow-root"] if os.geteuid() == 0 else []),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=work,
        )
    try:
        _wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", proc, log)
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "tmp": tmp, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1600",
        f"--user-data-dir={lab['tmp'] / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _settled_session(lab, timeout: float = 120, stable: float = 5) -> dict:
    """The notebook's kernel session once JupyterLab stops switching kernels: one session,
    the same kernel id and idle for ``stable`` seconds."""
    url = f"{lab['url']}/api/sessions?token={lab['token']}"
    deadline, seen, since = time.monotonic() + timeout, None, 0.0
    sessions = []
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as response:
            sessions = json.load(response)
        key = (
            (len(sessions), sessions[0]["kernel"]["id"], sessions[0]["kernel"]["execution_state"]) if sessions else None
        )
        if key != seen:
            seen, since = key, time.monotonic()
        elif key and key[0] == 1 and key[2] == "idle" and time.monotonic() - since >= stable:
            return sessions[0]
        time.sleep(0.5)
    raise AssertionError(f"the notebook's kernel did not settle in {timeout} s: {sessions}; see {lab['log']}")


def _click_menu(driver, wait, menu: str, item: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait.until(
        EC.element_to_be_clickable((By.XPATH, f"//li[contains(@class, 'lm-MenuBar-item')][.//div[text()='{menu}']]"))
    ).click()
    wait.until(
        EC.element_to_be_clickable((By.XPATH, f"//li[contains(@class, 'lm-Menu-item')][.//div[text()='{item}']]"))
    ).click()


def test_quickstart_runs_in_jupyterlab_and_shows_the_panel(lab, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    shot = tmp_path / "quickstart_browser.png"
    driver.get(f"{lab['url']}/lab/tree/01_quickstart.ipynb?token={lab['token']}")

    def wait_for(xpath: str, what: str, timeout: float = 120):
        try:
            return WebDriverWait(driver, timeout).until(EC.presence_of_element_located((By.XPATH, xpath)))
        except TimeoutException:
            raise AssertionError(f"{what} did not appear within {timeout} s; see {shot} and {lab['log']}") from None

    try:
        wait_for("//*[contains(@class, 'jp-Notebook')]//*[contains(@class, 'jp-Cell')]", "the notebook")
        # the notebook's kernel ('workbench', registered by make install) started and is idle
        session = _settled_session(lab)
        assert session["kernel"]["name"] == "workbench"
        wait_for("//*[contains(@class, 'jp-Notebook-ExecutionIndicator')][@data-status='idle']", "an idle kernel")
        dialogs = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog")
        assert dialogs == [], f"JupyterLab asks: {dialogs[0].text!r}"
        # Run → Run All Cells; a click made while the kernel connection is still settling is
        # dropped by JupyterLab, so click again until the first cell has started (3 tries)
        for _attempt in range(3):
            _click_menu(driver, WebDriverWait(driver, 30), "Run", "Run All Cells")
            try:
                WebDriverWait(driver, 30).until(
                    EC.presence_of_element_located(
                        (By.XPATH, "//*[contains(@class, 'jp-InputPrompt')][contains(., '[*]') or contains(., '[1]')]")
                    )
                )
                break
            except TimeoutException:
                continue
        else:
            raise AssertionError(f"Run All Cells started no cell in 3 tries; see {shot}")
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
        # every cell ran: the comparison and the last cell's picture
        wait_for(
            "//*[contains(@class, 'jp-OutputArea-output')]"
            "[contains(., 'partitioned equals the reference (max |Δ| < 1e-4): True')]",
            "the comparison with the reference",
            RUN_TIMEOUT,
        )
        wait_for(
            "//*[contains(@class, 'jp-OutputArea-output')][contains(., 'shards.png (')]",
            "the shards picture (last cell)",
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
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = {b.text.strip() for b in driver.find_elements(By.CSS_SELECTOR, "button.jupyter-button")}
    assert {"Run inference", "Compare with reference", "Train N steps", "Open in napari"} <= texts
