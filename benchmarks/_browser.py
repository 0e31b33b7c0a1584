"""JupyterLab + Debian's headless Chromium, for the browser test and the viewer benchmark.

Nothing is downloaded: JupyterLab from this environment (the ``workbench`` kernel that
``make install`` registers), ``/usr/bin/chromium`` driven by ``/usr/bin/chromedriver``
through Selenium. Every server runs on a free localhost port with a token and its own
config, data, runtime and settings folders, so nothing of the user's is read or written.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
KERNEL = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "workbench" / "kernel.json"
REQUIREMENTS = (
    (CHROMIUM, "make install (Debian package chromium)"),
    (CHROMEDRIVER, "make install (Debian package chromium-driver)"),
    (KERNEL, "make install (registers the 'workbench' Jupyter kernel)"),
)

# Counts what the page receives over its WebSockets (the kernel's messages), installed
# before any page script runs: window.__wsBytes.
COUNT_WEBSOCKET_BYTES = """
(() => {
  window.__wsBytes = 0;
  const Native = window.WebSocket;
  window.WebSocket = function (...args) {
    const ws = new Native(...args);
    ws.addEventListener('message', (e) => {
      const d = e.data;
      window.__wsBytes += typeof d === 'string' ? new TextEncoder().encode(d).length : (d.byteLength ?? d.size ?? 0);
    });
    return ws;
  };
  window.WebSocket.prototype = Native.prototype;
  Object.assign(window.WebSocket, {CONNECTING: 0, OPEN: 1, CLOSING: 2, CLOSED: 3});
})();
"""


def missing_requirements() -> list[str]:
    return [f"{path} is missing; run {fix}" for path, fix in REQUIREMENTS if not Path(path).exists()]


def free_port() -> int:
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


@contextlib.contextmanager
def jupyter_lab(work: Path, tmp: Path, *, env_extra: dict | None = None):
    """A JupyterLab server serving ``work``; yields ``{url, token, tmp, log}``."""
    settings = tmp / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True, exist_ok=True)
    notification = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True, exist_ok=True)
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
        **(env_extra or {}),
    )
    port, token = free_port(), "workbench-browser-test"
    log = tmp / "lab.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--LabApp.news_url=None",
             "--LabApp.extension_manager=readonly",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--ServerApp.port_retries=0"]
            + (["--allow-root"] if os.geteuid() == 0 else []),
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=work,
        )  # fmt: skip
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


@contextlib.contextmanager
def chromium(profile: Path, *, count_bytes: bool = False, size=(1400, 1600)):
    """Headless Chromium under Selenium (software WebGL works: NiiVue renders too)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--force-device-scale-factor=1", f"--window-size={size[0]},{size[1]}",
                 f"--user-data-dir={profile}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        if count_bytes:
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COUNT_WEBSOCKET_BYTES})
        yield driver
    finally:
        driver.quit()


def settled_session(lab, timeout: float = 120, stable: float = 5) -> dict:
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


def click_menu(driver, wait, menu: str, item: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait.until(
        EC.element_to_be_clickable((By.XPATH, f"//li[contains(@class, 'lm-MenuBar-item')][.//div[text()='{menu}']]"))
    ).click()
    wait.until(
        EC.element_to_be_clickable((By.XPATH, f"//li[contains(@class, 'lm-Menu-item')][.//div[text()='{item}']]"))
    ).click()


def run_all_cells(driver, shot: Path | None = None) -> None:
    """Run → Run All Cells, again until the first cell has started (a click made while the
    kernel connection is still settling is dropped by JupyterLab; 3 tries)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    for _attempt in range(3):
        click_menu(driver, WebDriverWait(driver, 30), "Run", "Run All Cells")
        try:
            WebDriverWait(driver, 30).until(
                EC.presence_of_element_located(
                    (By.XPATH, "//*[contains(@class, 'jp-InputPrompt')][contains(., '[*]') or contains(., '[1]')]")
                )
            )
            return
        except TimeoutException:
            continue
    raise AssertionError(f"Run All Cells started no cell in 3 tries; see {shot}")


def canvas_rgba(driver, canvas):
    """The pixels of a 2D ``<canvas>`` element as a (H, W, 4) uint8 array."""
    import base64

    import numpy as np

    data = driver.execute_script(
        "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let s = ''; for (let i = 0; i < d.length; i += 32768) s += String.fromCharCode.apply(null, d.subarray(i, i + 32768));"
        "return [c.width, c.height, btoa(s)];",
        canvas,
    )
    width, height, b64 = data
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(height, width, 4)
