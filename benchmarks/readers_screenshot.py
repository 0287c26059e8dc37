"""Screenshot of the reader-study page (``semrecon readers serve``) in headless Chromium for the README.

The kit holds dipy's T1 brain slice (the demo's anatomy, extra ``demo``) degraded two ways — Gaussian blur and
noise — on two cases, exported with ``semrecon readers export --method``; the page is shown to reader ``A`` after
two of the four criteria were scored with the keys 4 and 3. Writes ``benchmarks/results/readers_page.png``.

    python3 benchmarks/readers_screenshot.py
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from semrecon_core.commands.demo import demo_anatomy
from semrecon_core.commands.main import main

OUT = Path(__file__).parent / "results" / "readers_page.png"


def main_screenshot() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        brain = demo_anatomy(256)
        rng = np.random.default_rng(0)
        files: dict[str, list[str]] = {"blur": [], "noise": []}
        for case, flip in enumerate((False, True)):
            image = brain[:, ::-1] if flip else brain
            np.save(work / f"blur{case}.npy", gaussian_filter(image, 1.2))
            np.save(work / f"noise{case}.npy", np.abs(image + 0.04 * rng.standard_normal(image.shape)))
            files["blur"].append(str(work / f"blur{case}.npy"))
            files["noise"].append(str(work / f"noise{case}.npy"))
        kit = work / "kit"
        methods = [f"--method=demo/{m}={','.join(f)}" for m, f in files.items()]
        assert main(["readers", "export", *methods, "--out", str(kit), "--seed", "1"]) == 0
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "semrecon_core.commands.main",
                "readers",
                "serve",
                str(kit),
                "--readers",
                "A",
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            line = server.stdout.readline() if server.stdout else ""
            url = re.search(r"http://\S+", line)
            assert url, line
            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium") or "chromium"
            for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,720"):
                options.add_argument(argument)
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)
            try:
                driver.get(url[0])
                time.sleep(1.5)
                driver.find_element(By.TAG_NAME, "body").send_keys("43")
                time.sleep(0.3)
                OUT.parent.mkdir(exist_ok=True)
                driver.save_screenshot(str(OUT))
            finally:
                driver.quit()
        finally:
            server.terminate()
            server.wait(timeout=10)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main_screenshot()
