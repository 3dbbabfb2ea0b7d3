"""The browser tier's driver: Debian's headless Chromium through its own chromedriver (an
explicit path, so Selenium Manager looks for, and would download, nothing)."""

import shutil
from pathlib import Path

import pytest

CHROMEDRIVER = Path("/usr/bin/chromedriver")


def headless_chromium():
    """A headless Chromium WebDriver; fails the test (never skips) when Chromium is missing."""
    if shutil.which("chromium") is None or not CHROMEDRIVER.exists():
        pytest.fail("the browser tier needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    return driver
