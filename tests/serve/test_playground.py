"""The playground page at `/`, driven in headless Chromium (Selenium + the system chromedriver) against a
running cluster: generate, see the progress, the grid and the routing heatmap, check the numbers the page
shows against the JSON API's trace, see a bad input's message, refresh the experts panel, and fit a
phone-width screen. A screenshot is saved to benchmarks/results/playground-test.png (git-ignored).

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); without them the test is skipped
and says why."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from tests.conftest import REPO_ROOT
from tests.serve.conftest import tiny_app
from tests.tiny import build_tiny_mixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if os.environ.get("MODE_RAY_REQUIRE_BROWSER") == "1" and (CHROMIUM is None or CHROMEDRIVER is None):
    raise RuntimeError("MODE_RAY_REQUIRE_BROWSER=1 (CI) but chromium / chromedriver are not installed")
pytestmark = [
    pytest.mark.serve,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="no Chromium on this machine: apt-get install chromium chromium-driver (.ci/run installs them)",
    ),
]
SCREENSHOT = REPO_ROOT / "benchmarks" / "results" / "playground-test.png"  # an artifact (git-ignored)


@pytest.fixture(scope="module")
def page(serve_cluster, tmp_path_factory):  # noqa: ANN001, ANN201
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    model = build_tiny_mixture(tmp_path_factory.mktemp("playground"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    with tiny_app(serve_cluster, model):
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield serve_cluster, driver
        finally:
            driver.quit()


def wait(driver, condition, what: str, timeout: float = 60.0):  # noqa: ANN001, ANN201
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        lambda d: condition(d), message=f"timed out waiting for {what}"
    )


def fill(driver, values: dict[str, str]) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    for field, value in values.items():
        box = driver.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)


def mean_weights(trace: list[dict]) -> dict[str, float]:
    """What the page computes: each expert's weight averaged over rows, then over evaluations."""
    total: dict[str, float] = {}
    for t in trace:
        n = max(1, len(t["experts"]))
        for names, weights in zip(t["experts"], t["weights"], strict=True):
            for name, w in zip(names, weights, strict=True):
                total[name] = total.get(name, 0.0) + w / n
    return {k: v / len(trace) for k, v in total.items()}


def test_generate_shows_the_grid_the_heatmap_and_the_apis_numbers(page) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    sc, driver = page
    driver.get(f"{sc.http_url}/")
    assert "mode_ray" in driver.title
    fill(driver, {"prompt": "3", "num_images": "2", "seed": "21", "steps": "3"})
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: d.find_element(By.ID, "status").text == "done", "the generation to finish")
    assert driver.find_element(By.ID, "grid").get_attribute("src").startswith("data:image/png;base64,")
    assert driver.find_element(By.ID, "error").text == ""
    assert int(driver.find_element(By.ID, "heatmap").get_attribute("width")) >= 5 * 12  # 5 evaluations
    shown = {
        cell.get_attribute("data-expert"): float(cell.text)
        for cell in driver.find_elements(By.CSS_SELECTOR, "#shares td[data-expert]")
    }
    body = {"prompt": "3", "num_images": 2, "seed": 21, "steps": 3, "output": "json"}
    api = httpx.post(f"{sc.http_url}/v1/generate", json=body, timeout=120).json()
    expected = mean_weights(api["trace"])
    assert shown.keys() == expected.keys()
    assert all(abs(shown[k] - expected[k]) <= 5e-5 for k in expected), (shown, expected)
    rows = driver.find_elements(By.CSS_SELECTOR, "#carried tbody tr")
    assert len(rows) == 2 and all("%" in r.text for r in rows)  # which experts carried each image
    wait(
        driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#experts-table tbody tr")) == 3, "the experts"
    )
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOT))


def test_a_bad_input_shows_the_servers_message_not_a_traceback(page) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    sc, driver = page
    driver.get(f"{sc.http_url}/")
    fill(driver, {"prompt": "3", "num_images": "0"})
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: d.find_element(By.ID, "error").text != "", "the error message")
    message = driver.find_element(By.ID, "error").text
    assert "num_images" in message and "Traceback" not in message
    fill(driver, {"num_images": "1", "experts": "no-such-expert"})
    driver.find_element(By.ID, "generate").click()
    wait(
        driver,
        lambda d: "no-such-expert" in d.find_element(By.ID, "error").text,
        "the unknown-expert message",
    )


def test_without_a_prompt_the_page_sends_the_chosen_unconditional_mode(page) -> None:  # noqa: ANN001
    """The tiny mixture's default is the null condition; choosing 'prior' draws each image's class, and the
    per-image table shows the classes the API draws for the same request."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sc, driver = page
    driver.get(f"{sc.http_url}/")
    fill(driver, {"num_images": "3", "seed": "4", "steps": "2"})
    driver.find_element(By.ID, "prompt").clear()
    Select(driver.find_element(By.ID, "unconditional")).select_by_value("prior")
    driver.find_element(By.ID, "generate").click()
    wait(driver, lambda d: d.find_element(By.ID, "status").text == "done", "the generation to finish")
    shown = [
        r.find_elements(By.TAG_NAME, "td")[1].text
        for r in driver.find_elements(By.CSS_SELECTOR, "#carried tbody tr")
    ]
    body = {"num_images": 3, "seed": 4, "steps": 2, "unconditional": "prior", "output": "json"}
    labels = httpx.post(f"{sc.http_url}/v1/generate", json=body, timeout=120).json()["labels"]
    assert min(labels) >= 0 and shown == [str(c) for c in labels]


def test_the_page_fits_a_phone_width_screen(page) -> None:  # noqa: ANN001
    sc, driver = page
    driver.set_window_size(390, 844)
    try:
        driver.get(f"{sc.http_url}/")
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
    finally:
        driver.set_window_size(1280, 1000)
