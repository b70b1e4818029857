"""Open report.html in headless Chromium: no console errors, every plot loads, a screenshot is saved."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from torchslim.report.jsonio import write_report
from torchslim.report.record import RunRecord

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER and importlib.util.find_spec("selenium")),
                                reason="chromium, chromedriver (Debian) or selenium not installed (make setup)")


def _browser(width: int = 1280, height: int = 2400):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)


def test_report_renders_in_chromium_without_errors(record: RunRecord, tmp_path: Path) -> None:
    write_report(record, tmp_path)
    driver = _browser()
    try:
        driver.get((tmp_path / "report.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.alt]);")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        tables = driver.execute_script("return document.querySelectorAll('table').length;")
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    assert images, "the report has no plots"
    assert all(done and width > 0 for done, width, _ in images), images
    assert not errors, errors
    assert tables >= 2
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
