"""web_demo.py in a real browser: headless Chromium uploads a demo clip, asks, and reads the streamed answer.

Needs Debian's `chromium` + `chromium-driver` and the `selenium` package; skipped, saying which is missing,
when they are absent. The screenshot lands in the test's tmp folder (its path is printed; `pytest -s` shows it).
"""
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile as sf

import web_demo
from inference import without_unused_sampling

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [what for what, absent in [
    ("Chromium (apt-get install -y chromium)", CHROMIUM is None),
    ("chromedriver (apt-get install -y chromium-driver)", CHROMEDRIVER is None),
    ("selenium (pip install selenium)", importlib.util.find_spec("selenium") is None)] if absent]
needs_browser = pytest.mark.skipif(bool(MISSING), reason="browser test needs " + ", ".join(MISSING))
MAX_NEW_TOKENS = 8
UPLOAD_LIMIT_KB = 200


def first_demo_wav() -> str:
    ann_path = REPO / "data/demo/ann/test.json"
    turn = json.loads(ann_path.read_text())["annotation"][0]["turns"][0]
    return str((ann_path.parent / turn["path"]).resolve())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"web_demo.py exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"web_demo.py did not answer on {url} within {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("web_demo") / "server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "web_demo.py", "--port", str(port), "--num-beams", "1", "--max-new-tokens",
             str(MAX_NEW_TOKENS), "--max-file-size", f"{UPLOAD_LIMIT_KB}kb"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/", proc, log_path)
            yield f"http://127.0.0.1:{port}/"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    user_data = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_data}",
                 "--window-size=1280,900"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(user_data, ignore_errors=True)


def upload_turn1(driver, path: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#turn1 input[type=file]").send_keys(path)


def toast_texts(driver) -> str:
    from selenium.webdriver.common.by import By

    return "\n".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-body]"))


@needs_browser
def test_page_answers_an_uploaded_clip(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"))
    upload_turn1(browser, first_demo_wav())
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"))  # player replaces it
    browser.find_element(By.ID, "ask").click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value"))
    screenshot = tmp_path / "web_demo.png"
    browser.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert answer == expected_answer(first_demo_wav())


def expected_answer(wav: str) -> str:
    """What the server's model (same config, same seed) answers with the page's default settings."""
    import torch

    from inference import Assistant, load_inference_config, load_model

    cwd = os.getcwd()
    os.chdir(REPO)  # the demo config's paths are relative to the repository
    try:
        cfg = load_inference_config(None, [])
        session = Assistant(load_model(cfg, torch.device("cpu")), cfg, {})
    finally:
        os.chdir(cwd)
    settings = {**cfg.generate, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS}
    return "".join(session.answer([wav], web_demo.DEFAULT_PROMPT, without_unused_sampling(settings)))


@needs_browser
def test_asking_without_audio_or_with_oversized_audio_gives_a_message(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    big = tmp_path / "ten_seconds.wav"  # 320 kB of 16-bit PCM > the server's 200 kB limit
    sf.write(big, np.zeros(160_000, dtype=np.float32), 16_000)
    wait = WebDriverWait(browser, 60)
    browser.get(server)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"))
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: "Upload or record at least one audio turn" in toast_texts(d))
    upload_turn1(browser, str(big))
    wait.until(lambda d: "exceed the maximum allowed size" in toast_texts(d))
    assert browser.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"), "the upload should not be kept"


def test_turns_longer_than_the_limit_are_refused(tmp_path):
    long_turn = tmp_path / "long.wav"
    sf.write(long_turn, np.zeros(1000 * 61, dtype=np.float32), 1000)  # 61 s at 1 kHz: small file, long audio
    web_demo.check_durations([first_demo_wav()], max_seconds=60)
    with pytest.raises(gr.Error, match="Turn 2 is 61 s long; this demo accepts at most 60 s per turn"):
        web_demo.check_durations([first_demo_wav(), str(long_turn)], max_seconds=60)


def test_binds_to_localhost_by_default():
    args = web_demo.parse_args([])
    assert args.host == "127.0.0.1"
