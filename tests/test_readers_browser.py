"""``semrecon readers serve`` end to end in a real headless Chromium (selenium on Debian's chromium-driver).

Two readers score a 2-method × 3-case kit with the keyboard only; the server process is killed (SIGKILL) after
some screens and started again, each reader goes on from where they stopped through the URL the restarted server
prints, and ``semrecon readers analyze`` on the database gives the numbers a hand computation gives on the scores
the readers typed. Skipped when chromium, chromedriver or selenium is missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from semrecon_core.commands import main as cli
from tests.helpers import check_reader_analysis, planned_score, reader_study_inputs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
selenium = pytest.importorskip("selenium", reason="needs selenium (pip install 'semrecon[test]')")
pytest.importorskip("flask")

CRITERIA = ("artifacts", "sharpness", "confidence", "quality")
LEAKS = (b"unet", b"semantic", b"patient", b"doe_", b".npy", b"case 1")


class Server:
    """``semrecon readers serve KIT --readers A,B --port 0`` as a child process; its URLs per reader."""

    def __init__(self, kit: Path) -> None:
        command = [sys.executable, "-m", "semrecon_core.commands.main", "readers", "serve", str(kit)]
        self.process = subprocess.Popen(
            [*command, "--readers", "A,B", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout or []], daemon=True).start()
        self.urls: dict[str, str] = {}
        while len(self.urls) < 2:
            try:
                line = lines.get(timeout=30)
            except queue.Empty:
                self.kill()
                raise AssertionError("the server printed no URLs within 30 s") from None
            if match := re.match(r"(\w+): (http://127\.0\.0\.1:\d+/r/[\w-]+/)", line):
                self.urls[match[1]] = match[2]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout: float = 10.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def _score(driver, url: str, reader: str, key: dict, screens: int, typed: list) -> str:
    """Open the reader's URL and score ``screens`` screens with the keyboard; returns the progress text after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    for _ in range(screens):
        progress = _wait(
            driver,
            lambda d: (
                d.find_element(By.ID, "progress").text
                if d.find_elements(By.CSS_SELECTOR, ".view canvas[data-image]")
                else False
            ),
        )
        image = driver.find_element(By.CSS_SELECTOR, ".view canvas").get_attribute("data-image")
        body = driver.find_element(By.TAG_NAME, "body")
        for criterion in CRITERIA:  # the page moves to the next criterion after each digit
            value = planned_score(reader, key[image]["method"], key[image]["case"], criterion)
            body.send_keys(str(value))
            typed.append((reader, key[image]["method"], key[image]["case"], criterion, value))
        chosen = driver.find_elements(By.CSS_SELECTOR, ".scale button.chosen")
        assert [b.text for b in chosen] == [str(t[-1]) for t in typed[-4:]]
        body.send_keys(Keys.ENTER)
        _wait(driver, lambda d, before=progress: d.find_element(By.ID, "progress").text != before)
    return driver.find_element(By.ID, "progress").text


def test_two_readers_score_with_the_keyboard_across_a_server_restart(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    inputs = reader_study_inputs(tmp_path)
    kit = tmp_path / "kit"
    methods = [f"--method={m}={','.join(map(str, files))}" for m, files in inputs.items()]
    assert cli.main(["readers", "export", *methods, "--out", str(kit), "--seed", "11"]) == 0
    key = json.loads((kit / "key.json").read_text())["images"]
    typed: list[tuple[str, str, str, str, int]] = []

    server = Server(kit)
    try:
        assert _score(browser, server.urls["A"], "A", key, 3, typed) == "4 of 6"
        # window/level and zoom from the keyboard change the display, not the scores
        before = browser.find_element(By.ID, "wl").text
        browser.find_element(By.TAG_NAME, "body").send_keys("]]++,")
        assert browser.find_element(By.ID, "wl").text != before
        assert _score(browser, server.urls["B"], "B", key, 2, typed) == "3 of 6"
        # what a reader's browser gets from the live server names no method, file or patient
        for url in (server.urls["A"], server.urls["A"] + "api/state"):
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read().lower() + str(dict(response.headers)).lower().encode()
            assert not [w for w in LEAKS if w in body]
    finally:
        server.kill()  # mid-study, without warning
    server = Server(kit)
    try:
        assert _score(browser, server.urls["A"], "A", key, 3, typed) == "6 of 6 done"
        assert _score(browser, server.urls["B"], "B", key, 4, typed) == "6 of 6 done"
        assert "Thank you" in browser.find_element(By.ID, "done").text
    finally:
        server.kill()

    assert len(typed) == 2 * 6 * 4 and len({t[:4] for t in typed}) == len(typed)  # nobody scored an image twice
    assert cli.main(["readers", "analyze", str(kit)]) == 0
    document = json.loads((kit / "analysis" / "readers.json").read_text())
    assert document["finished"]
    with (kit / "analysis" / "scores.csv").open() as handle:
        stored = sorted(tuple(line.split(",")[i] for i in (0, 2, 4, 6, 7)) for line in list(handle)[1:])
    assert stored == sorted((r, m, c, k, str(s)) for r, m, c, k, s in typed)
    check_reader_analysis(document, typed)


def test_side_by_side_screens_are_scored_panel_by_panel(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from semrecon_core.readers.store import ScoreStore

    inputs = reader_study_inputs(tmp_path, cases=1)
    kit = tmp_path / "kit"
    methods = [f"--method={m}={','.join(map(str, files))}" for m, files in inputs.items()]
    assert cli.main(["readers", "export", *methods, "--out", str(kit), "--layout", "side-by-side"]) == 0
    server = Server(kit)
    try:
        browser.get(server.urls["A"])
        _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".view canvas[data-image]")) == 2)
        assert browser.find_element(By.ID, "progress").text == "1 of 1"
        images = [c.get_attribute("data-image") for c in browser.find_elements(By.CSS_SELECTOR, ".view canvas")]
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys("1234" + "5432" + Keys.ENTER)  # left panel's four criteria, then the right one's
        _wait(browser, lambda d: d.find_elements(By.ID, "done"))
    finally:
        server.kill()
    stored = {(s.image, s.criterion): s.score for s in ScoreStore(kit / "scores.sqlite").scores()}
    assert [stored[(images[0], c)] for c in CRITERIA] == [1, 2, 3, 4]
    assert [stored[(images[1], c)] for c in CRITERIA] == [5, 4, 3, 2]
