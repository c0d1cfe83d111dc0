"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium):
upload a photo, wait for the answer, compare the top-1 label with ``Runtime.predict``, keep a screenshot in docs/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvt_deploy import Runtime
from tests.test_serve import REPO, Server, start_server

SCREENSHOT = REPO / "docs" / "serve-page.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium and chromium-driver (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def served(tiny_export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    folder = tmp_path_factory.mktemp("browser")
    model_dir = Path(shutil.copytree(tiny_export_dir, folder / "model"))
    running = start_server(model_dir, folder)
    yield running, model_dir
    assert running.stop() == 0


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1200,1080", "--force-device-scale-factor=1"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def test_page_shows_runtime_top1_and_heatmaps(served: tuple[Server, Path], browser, photo_paths: list[Path]) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, model_dir = served
    photo = photo_paths[2]
    browser.get(server.url + "/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 60).until(
        lambda driver: driver.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error")
    )
    status = browser.find_element(By.ID, "status")
    assert status.get_attribute("data-state") == "done", status.text
    expected = Runtime(model_dir, device="cpu").predict(photo, top_k=5)[0]
    assert browser.find_element(By.ID, "top1").text == expected[0][0]
    rows = browser.find_elements(By.CSS_SELECTOR, "#results li .label")
    assert [row.text for row in rows] == [label for label, _ in expected]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmaps canvas")) == 4  # stage1..stage4
    assert browser.execute_script("return document.getElementById('photo').naturalWidth") > 0
    SCREENSHOT.parent.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(SCREENSHOT)) and SCREENSHOT.stat().st_size > 10_000
