"""``mediround app`` in a real browser (issue #32): headless Debian Chromium, driven by selenium through
Debian's chromedriver, uploads a real slice, asks two questions (the second referring to the first by a
click on its history item), sees two overlays, downloads the session and replays its dialogue through
``mediround infer`` to the same masks. Every request the browser makes goes to the app's own address.

Needs ``apt-get install chromium chromium-driver`` and ``pip install -e ".[app,app-test]"`` (``.ci/run``
does both); without them the test fails saying so. ``MEDIROUND_APP_SCREENSHOT=PATH`` also saves the
screenshot taken after two rounds there (docs/images/app.png is made so).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from click.testing import CliRunner

from mediround.data.images import load_mask
from mediround_cli.main import cli

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1300")
SLICE = ("sam-med2d-demo", "data_demo", "images", "amos_0006_90.png")
QUESTIONS = ("Segment the liver.", "Segment the organ beside it.")
BETA = "0.95"
WAIT = 120.0
"""Seconds to wait for one thing on a loaded 2-core machine (the server's start is most of it)."""


def browser_tools():
    """selenium's pieces; the test fails (never skips) when the browser or selenium is missing."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install -y chromium chromium-driver (.ci/run does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
    except ImportError:
        pytest.fail('selenium missing: pip install -e ".[app,app-test]" (.ci/run does)')
    try:
        import gradio  # noqa: F401  (the server imports it; fail here with the fix, not in its log)
    except ImportError:
        pytest.fail('gradio missing: pip install -e ".[app,app-test]" (.ci/run does)')
    return webdriver, Service, By


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition, what: str, timeout: float = WAIT):
    """``condition()``'s first truthy value, polled; fails naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def app_url(tmp_path):
    """``mediround app`` as a user starts it, on 127.0.0.1 and a free port; stopped with Ctrl-C (SIGINT)
    unless the test stopped it."""
    port = free_port()
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, "-m", "mediround_cli.main", "app", "--port", str(port), "--beta",
                                   BETA, "--jcm-rounds", "referred"], cwd=tmp_path, env=env, stdout=output,
                                  stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if server.poll() is not None:
            pytest.fail(f"mediround app exited {server.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(up, f"the app at {url}")
        yield url, server, log
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


@pytest.mark.slow
def test_two_rounds_in_a_real_browser_replay_through_infer(app_url, shared_data, tmp_path):
    webdriver, Service, By = browser_tools()
    url, server, log = app_url
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get(url)

        def text(element_id: str) -> str:
            return driver.find_element(By.ID, element_id).text

        def thumbnails():
            return driver.find_elements(By.CSS_SELECTOR, "#history button.thumbnail-item")

        def ask(question: str) -> None:
            box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
            box.clear()
            box.send_keys(question)
            driver.find_element(By.ID, "ask").click()

        def answered(rounds: int) -> None:
            wait_for(lambda: len(thumbnails()) == rounds and f"round {rounds}" in text("status"), f"round {rounds}")

        upload = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"), "the upload")
        upload[0].send_keys(str(shared_data(*SLICE)))
        wait_for(lambda: "amos_0006_90.png: ready" in text("status"), "the upload to be read")
        ask(QUESTIONS[0])
        answered(1)
        assert "image encoded once" in text("status") and "JCM: not judged yet" in text("status")
        thumbnails()[0].click()  # refer to round 1 by clicking it in the history strip
        wait_for(lambda: "refers to round 1" in text("reference"), "round 1 to be selected")
        ask(QUESTIONS[1])
        answered(2)
        status = text("status")
        assert "round 1 judged now: JCM" in status and "round 2 (refers to round 1)" in status, status
        overlays = driver.find_elements(By.CSS_SELECTOR, "#history button.thumbnail-item img")
        assert len(overlays) == 2
        widths = wait_for(lambda: [driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                                         img) for img in overlays if img] if all(
            driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
            for img in overlays) else None, "both overlays to load")
        assert widths == [512, 512]  # the overlays at the slice's own size
        assert [img.get_attribute("alt") for img in overlays] == [
            f"R1: {QUESTIONS[0]}", f"R2 (ref 1): {QUESTIONS[1]}"]
        driver.save_screenshot(str(tmp_path / "app.png"))
        if os.environ.get("MEDIROUND_APP_SCREENSHOT"):
            shutil.copy(tmp_path / "app.png", os.environ["MEDIROUND_APP_SCREENSHOT"])

        ask("@5 Segment it.")  # bad input: one line in the page, the two rounds stay
        wait_for(lambda: text("status").startswith("error: @5: there is no round 5"), "the error line")
        assert "Traceback" not in driver.page_source and len(thumbnails()) == 2

        driver.find_element(By.CSS_SELECTOR, "#download").click()
        archive = wait_for(lambda: [p for p in downloads.glob("*.zip")], "the download")[0]
        wait_for(lambda: not list(downloads.glob("*.crdownload")), "the download to finish")
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    finally:
        driver.quit()

    fetched = [urlparse(m["params"]["request"]["url"] if "request" in m["params"] else m["params"]["url"])
               for m in requests if m["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated")]
    network = {f"{u.scheme}://{u.netloc}" for u in fetched if u.scheme in ("http", "https", "ws", "wss")}
    assert network == {url.rstrip("/")}, network  # nothing from outside (chrome:// pages are the browser's own)

    session = tmp_path / "session"
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(session)
    [folder] = session.iterdir()
    assert folder.name == "mediround-session-amos_0006_90"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "amos_0006_90.png", "rounds/round-1-overlay.png", "rounds/round-1.png", "rounds/round-2-overlay.png",
        "rounds/round-2.png", "session.json", "session.jsonl"]
    [record] = [json.loads(line) for line in (folder / "session.jsonl").read_text().splitlines()]
    assert [(r["query"], r.get("ref")) for r in record["rounds"]] == [(QUESTIONS[0], None), (QUESTIONS[1], 1)]
    replay = json.loads((folder / "session.json").read_text())["replay"].split()
    assert replay[:3] == ["mediround", "infer", "session.jsonl"]
    replayed = tmp_path / "replayed"
    result = CliRunner().invoke(cli, [*replay[1:2], str(folder / "session.jsonl"), *replay[3:], "--out",
                                      str(replayed)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (replayed / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    for number, line in enumerate(lines, start=1):
        assert np.array_equal(load_mask(replayed / line["mask"]), load_mask(folder / "rounds" / f"round-{number}.png"))

    server.send_signal(signal.SIGTERM)  # as Ctrl-C: the server stops and removes its uploads and sessions
    server.wait(timeout=30)
    [kept] = [line.split("kept in ")[1].split()[0] for line in log.read_text().splitlines() if "kept in " in line]
    assert "mediround-app-" in kept and not Path(kept).exists()
