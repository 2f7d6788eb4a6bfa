"""The page for people at /ui, driven in a real headless Chromium (Debian's chromium and chromium-driver, through
Selenium): choose a model, upload a file, read the rendered result. Screenshots are kept in artifacts/.

Skipped only where no Chromium is installed, unless IMAGEAI_REQUIRE_BROWSER=1 (set by .ci/run, which installs it).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, Server

ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM and CHROMEDRIVER):
        message = "needs Chromium and its driver: apt-get install chromium chromium-driver"
        if os.environ.get("IMAGEAI_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1100,950"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _upload(driver, server: Server, model: str, image: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(server.url + "/ui")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"#model option[value='{model}']"))
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    driver.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda d: "done" in d.find_element(By.ID, "status").text or "error" in d.find_element(
        By.ID, "status").get_attribute("class"))  # fmt: skip
    assert "done" in driver.find_element(By.ID, "status").text, driver.find_element(By.ID, "status").text


@pytest.mark.slow
def test_the_page_shows_label_probabilities_threshold_and_explanation(server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    pixels = np.full((64, 64), 200, dtype=np.uint8)
    pixels[8:24, 36:52] = 255
    image = tmp_path / "chest.png"
    Image.fromarray(pixels).save(image)
    _upload(browser, server, "chest_xray", image)

    assert browser.find_element(By.ID, "label").text == "normal"
    assert "0.500" in browser.find_element(By.ID, "threshold").text
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert [bar.get_attribute("data-class") for bar in bars] == ["normal", "pneumonia"]
    assert browser.find_elements(By.CSS_SELECTOR, "#bars .bar .threshold")
    expected = httpx.post(server.url + "/chest_xray/proba", files={"image": image.read_bytes()}).json()
    assert f"{100 * expected['probabilities']['normal']:.1f}%" in bars[0].text
    overlay = browser.find_element(By.ID, "overlay")
    assert overlay.is_displayed() and browser.execute_script("return arguments[0].naturalWidth", overlay) == 256
    assert "not a medical device" in browser.find_element(By.CLASS_NAME, "warning").text
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "ui.png"))


@pytest.mark.slow
def test_the_page_shows_an_autoencoders_reconstruction(server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[6:22, 12:16] = 255
    image = tmp_path / "digit.png"
    Image.fromarray(digit).save(image)
    _upload(browser, server, "mnist_autoencoder", image)

    reconstruction = browser.find_element(By.ID, "reconstruction")
    assert reconstruction.is_displayed()
    assert browser.execute_script("return arguments[0].naturalWidth", reconstruction) == 28
    assert browser.find_element(By.ID, "input").is_displayed()
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "ui-autoencoder.png"))


@pytest.mark.slow
def test_the_page_is_served_self_contained(server: Server) -> None:
    response = httpx.get(server.url + "/ui")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "<script src" not in response.text and "<link" not in response.text  # no build step, nothing fetched
