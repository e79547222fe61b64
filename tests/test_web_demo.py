"""web_demo.py in a real browser: headless Chromium (a 1280x800 viewport) uploads demo clips, asks, reads the
streamed answer, and checks what the page says when a turn is refused. One server and one browser per module.

Needs Debian's `chromium` + `chromium-driver` and the `selenium` package; skipped, saying which is missing,
when they are absent. Screenshots land in the test's tmp folder (their paths are printed; `pytest -s` shows them).
"""
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

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
VIEWPORT = (1280, 800)


def demo_wavs() -> list[str]:
    """The first test dialogue's turn files (absolute, canonical: chromedriver refuses paths with '..')."""
    ann_path = REPO / "data/demo/ann/test.json"
    turns = json.loads(ann_path.read_text())["annotation"][0]["turns"]
    return [str((ann_path.parent / turn["path"]).resolve()) for turn in turns]


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


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    user_data = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={user_data}",
                 f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    width, height = VIEWPORT  # the window includes no toolbar headless, but pin the viewport itself
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    yield driver
    driver.quit()
    shutil.rmtree(user_data, ignore_errors=True)


@pytest.fixture()
def page(server, browser):
    """A freshly loaded page (nothing uploaded, nothing asked)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"))
    return browser


@pytest.fixture(scope="module")
def reference():
    """The CLI's side: the server's model (same config, same seed) answering with the page's default settings."""
    import torch

    from inference import Assistant, load_inference_config, load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the demo config's paths are relative to the repository
        cfg = load_inference_config(None, [])
        assistant = Assistant(load_model(cfg, torch.device("cpu")), cfg, {})
    settings = without_unused_sampling({**cfg.generate, "num_beams": 1, "max_new_tokens": MAX_NEW_TOKENS})
    return lambda wavs: "".join(assistant.answer(wavs, web_demo.DEFAULT_PROMPT, settings))


def wait(driver, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout)


def upload(driver, turn: int, path: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#turn{turn} input[type=file]").send_keys(path)


def upload_and_wait_for_player(driver, turn: int, path: str) -> None:
    from selenium.webdriver.common.by import By

    upload(driver, turn, path)
    wait(driver).until(lambda d: not d.find_elements(By.CSS_SELECTOR, f"#turn{turn} input[type=file]"))


def open_more_turns(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#more_turns button").click()
    wait(driver).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turn5 input[type=file]"))


def message(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "status").text


def answer_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")


def wait_for_answer(driver, expected: str) -> None:
    """Until the streamed answer is complete (equals the expected one), else the difference."""
    from selenium.common.exceptions import TimeoutException

    try:
        wait(driver, 60).until(lambda d: answer_text(d) == expected)
    except TimeoutException:
        assert answer_text(driver) == expected


def ask(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "ask").click()


def rect(driver, selector: str) -> dict:
    return driver.execute_script("return document.querySelector(arguments[0]).getBoundingClientRect().toJSON()",
                                 selector)


def in_viewport(driver, selector: str) -> bool:
    box, (width, height) = rect(driver, selector), driver.execute_script("return [innerWidth, innerHeight]")
    return box["top"] >= 0 and box["left"] >= 0 and box["bottom"] <= height and box["right"] <= width


@needs_browser
def test_page_answers_an_uploaded_clip(page, reference, tmp_path):
    upload_and_wait_for_player(page, 1, demo_wavs()[0])
    expected = reference(demo_wavs()[:1])
    ask(page)
    wait_for_answer(page, expected)
    screenshot = tmp_path / "web_demo.png"
    page.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
    assert message(page) == ""


@needs_browser
def test_asking_without_audio_or_with_oversized_audio_gives_a_message(page, tmp_path):
    from selenium.webdriver.common.by import By

    big = tmp_path / "ten_seconds.wav"  # 320 kB of 16-bit PCM > the server's 200 kB limit
    sf.write(big, np.zeros(160_000, dtype=np.float32), 16_000)
    ask(page)
    wait(page).until(lambda d: message(d) == "error: upload or record at least one audio turn")
    upload(page, 1, str(big))  # refused by the browser: Gradio's toast, kept in the message box
    wait(page).until(lambda d: "exceed the maximum allowed size" in message(d) and "ten_seconds.wav" in message(d))
    assert page.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"), "the upload should not be kept"
    ask(page)  # the next question replaces the message
    wait(page).until(lambda d: message(d) == "error: upload or record at least one audio turn")
    upload(page, 1, str(big))  # the same refusal again shows again
    wait(page).until(lambda d: "exceed the maximum allowed size" in message(d))


@needs_browser
def test_a_text_file_named_wav_is_refused_on_upload_and_the_message_stays(page, tmp_path):
    from selenium.webdriver.common.by import By

    fake = tmp_path / "notes.wav"
    fake.write_text("not audio, only a renamed text file\n")
    upload(page, 1, str(fake))
    wait(page, 30).until(lambda d: message(d).startswith("error: turn 1: cannot read notes.wav as audio"))
    shown_at, text = time.monotonic(), message(page)
    assert "/" not in text, f"the message should name the file, not a server path: {text}"
    assert page.find_elements(By.CSS_SELECTOR, "#turn1 input[type=file]"), "the refused file should not be kept"
    time.sleep(max(0.0, 15 - (time.monotonic() - shown_at)))
    assert message(page) == text
    assert page.find_element(By.ID, "status").is_displayed() and in_viewport(page, "#status")


@needs_browser
def test_five_turn_slots_filled_in_order(page, reference):
    from selenium.webdriver.common.by import By

    open_more_turns(page)
    labels = [page.find_element(By.CSS_SELECTOR, f"#turn{n} [data-testid=block-label]").text for n in range(1, 6)]
    assert labels == [f"Turn {n}" for n in range(1, 6)]
    wavs = (demo_wavs() * 5)[:5]
    upload_and_wait_for_player(page, 3, wavs[2])
    ask(page)
    wait(page).until(lambda d: message(d) == "error: turn 1 is empty: fill the turns in order (turn 3 holds a file)")
    assert answer_text(page) == ""
    for turn in [1, 2, 4, 5]:
        upload_and_wait_for_player(page, turn, wavs[turn - 1])
    expected = reference(wavs)
    ask(page)
    wait_for_answer(page, expected)
    assert message(page) == ""


@needs_browser
def test_answer_stays_in_view_with_the_turns_open_and_settings_are_readable(page, tmp_path):
    from selenium.webdriver.common.by import By

    assert page.execute_script("return [innerWidth, innerHeight]") == list(VIEWPORT)
    assert "assets/tiny/salmonn_tiny.pth" in page.find_element(By.ID, "checkpoint").text  # the demo's checkpoint
    open_more_turns(page)
    page.execute_script("window.scrollTo(0, 0)")
    assert in_viewport(page, "#answer"), rect(page, "#answer")
    screenshot = tmp_path / "web_demo_turns_open.png"
    page.save_screenshot(str(screenshot))
    print(f"screenshot: {screenshot}")

    page.find_element(By.CSS_SELECTOR, "#settings button").click()
    wait(page).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#settings [data-testid=block-info]"))
    labels = page.execute_script("""return [...document.querySelectorAll('#settings [data-testid=block-info]')]
        .map(e => [e.innerText, e.scrollWidth <= e.clientWidth, e.closest('.block').getBoundingClientRect().width])""")
    assert {text for text, _, _ in labels} >= {"max_new_tokens", "num_beams", "temperature", "top_p",
                                                "repetition_penalty", "length_penalty"}
    assert all(fits and width >= 250 for _, fits, width in labels), labels
    page.execute_script("document.querySelector('#settings').scrollIntoView()")
    page.save_screenshot(str(tmp_path / "web_demo_settings.png"))
    print(f"screenshot: {tmp_path / 'web_demo_settings.png'}")


def test_turns_must_be_filled_in_order_and_be_short_readable_audio(tmp_path):
    wav = demo_wavs()[0]
    long_turn = tmp_path / "long.wav"
    sf.write(long_turn, np.zeros(1000 * 61, dtype=np.float32), 1000)  # 61 s at 1 kHz: small file, long audio
    assert web_demo.filled_turns([wav, wav, None, None], max_seconds=60) == [wav, wav]
    with pytest.raises(web_demo.RequestError, match=r"turn 2 \(long.wav\) is 61 s long; this demo accepts at most "
                                                    "60 s per turn"):
        web_demo.filled_turns([wav, str(long_turn)], max_seconds=60)
    with pytest.raises(web_demo.RequestError, match="^turn 2 is empty: fill the turns in order"):
        web_demo.filled_turns([wav, None, wav], max_seconds=60)
    with pytest.raises(web_demo.RequestError, match="upload or record at least one audio turn"):
        web_demo.filled_turns([None] * 5, max_seconds=60)


def test_refusals_name_the_uploaded_file_not_the_server_path(tmp_path):
    upload_dir = tmp_path / "gradio" / "3f2a9c"  # where Gradio keeps an upload, under its own name
    upload_dir.mkdir(parents=True)
    (upload_dir / "notes.wav").write_text("text\n")
    sf.write(upload_dir / "empty.wav", np.zeros(0, dtype=np.float32), 16_000)
    for name, reason in [("notes.wav", "turn 3: cannot read notes.wav as audio: Format not recognised"),
                         ("empty.wav", "turn 3: audio file has no samples: empty.wav")]:
        with pytest.raises(web_demo.RequestError) as refused:
            web_demo.turn_seconds(str(upload_dir / name), 3, max_seconds=60)
        assert str(refused.value).startswith(reason) and str(tmp_path) not in str(refused.value)


def test_checkpoint_line_names_the_checkpoint_and_its_size(tmp_path):
    ckpt = tmp_path / "checkpoint_best.pth"
    ckpt.write_bytes(b"\0" * 2_500_000)
    line = web_demo.checkpoint_line(OmegaConf.create({"model": {"ckpt": str(ckpt)}}))
    assert line == f"**Checkpoint:** `{ckpt}` (2.5 MB)"
    assert "no checkpoint" in web_demo.checkpoint_line(OmegaConf.create({"model": {"ckpt": ""}}))


def test_command_line_defaults_and_refusals(capsys):
    args = web_demo.parse_args([])
    assert (args.host, args.turns) == ("127.0.0.1", 5)
    with pytest.raises(SystemExit) as refused:
        web_demo.parse_args(["--turns", "0"])
    assert refused.value.code == 2 and "--turns must be at least 1, got 0" in capsys.readouterr().err
