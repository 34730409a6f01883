"""The README's playground screenshot: the shipped mixture served locally, the page in headless Chromium
generating 16 sevens, the experts panel refreshed. Writes benchmarks/results/playground.png.

    python scripts/playground_screenshot.py      # needs chromium + chromium-driver (apt) and selenium
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "playground.png"


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from local_serve import serve_shipped_mixture
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, stop = serve_shipped_mixture("mode-ray-shot-")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1020"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{url}/")
        for field, value in {"prompt": "seven", "num_images": "16", "seed": "0"}.items():
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 120).until(lambda d: d.find_element(By.ID, "status").text == "done")
        time.sleep(2.5)  # the experts panel refreshes every 2 s: show this request's rows and shares
        OUT.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(OUT))
        print(f"wrote {OUT}")
    finally:
        driver.quit()
        stop()


if __name__ == "__main__":
    main()
