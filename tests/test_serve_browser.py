"""The explorer driven as a user drives it, in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium; nothing is downloaded): search from the form, open a
result, see its highlighted exemplars, steer from the feature's page, and open the link the
Dagster UI's metadata shows. Every resource the pages load comes from the explorer itself."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import polars as pl
import pytest

from tests.support.chromium import headless_chromium
from tests.support.explorer import running_explorer, searchable_copy


@pytest.fixture(scope="module")
def explorer_url(described_run, tmp_path_factory):
    path = searchable_copy(described_run, tmp_path_factory.mktemp("explorer-browser"))
    with running_explorer(path) as (url, _):
        yield url, path


@pytest.fixture(scope="module")
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


@pytest.mark.browser
def test_search_open_a_result_see_highlighted_exemplars_and_steer(explorer_url, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, _ = explorer_url
    browser.get(url + "/")
    box = wait_for(browser, "//input[@name='q']")
    box.send_keys("words")
    browser.find_element(By.XPATH, "//select[@name='mode']/option[@value='text']").click()
    browser.find_element(By.XPATH, "//button[normalize-space(.)='Search']").click()
    first = wait_for(browser, "//a[contains(@class,'hit-link')]")
    assert "q=words" in browser.current_url and "mode=text" in browser.current_url
    assert len(browser.find_elements(By.CSS_SELECTOR, "a.hit-link")) > 3
    keep_screenshot(browser, tmp_path, "explorer_search.png")
    description = first.text
    first.click()

    shown = wait_for(browser, "//p[@id='description']")
    assert "/features/" in browser.current_url and shown.text == description
    tokens = [t for t in browser.find_elements(By.CSS_SELECTOR, "#exemplars span.t") if t.is_displayed()]
    assert len(tokens) > 20 and any("background" in (t.get_attribute("style") or "") for t in tokens)
    assert browser.find_elements(By.XPATH, "//table[@id='candidates']//td[normalize-space(.)='*']")
    assert "not computed" in browser.find_element(By.ID, "effects").text
    browser.find_element(By.XPATH, "//div[@class='tabs']/button[normalize-space(.)='test']").click()
    assert "· test" in wait_for(browser, "//div[@id='exemplars']/h3").text
    keep_screenshot(browser, tmp_path, "explorer_feature.png")

    pytest.importorskip("neuron_assets.steer")
    tokens_box = browser.find_element(By.ID, "steer-tokens")
    tokens_box.clear()
    tokens_box.send_keys("4")
    browser.find_element(By.ID, "steer-button").click()
    steered = wait_for(browser, "//div[@id='steer-steered']", timeout=180)
    baseline = browser.find_element(By.ID, "steer-baseline")
    assert steered.text.startswith("The weather today is") and baseline.text.startswith("The weather today is")
    keep_screenshot(browser, tmp_path, "explorer_steer.png")
    assert_only_own_resources(browser, url)


@pytest.mark.browser
def test_the_link_in_dagster_metadata_opens_the_feature(explorer_url, browser, monkeypatch, tmp_path):
    """The url value neuron_descriptions records (report.metadata.explorer_links, shown by the
    Dagster UI as a link) opens the best feature's page; the layers overview links onward."""
    from selenium.webdriver.common.by import By

    from neuron_assets.config import load_config
    from neuron_assets.report.metadata import explorer_links
    from neuron_assets.store import Store

    url, path = explorer_url
    monkeypatch.setenv("NEURON_ASSETS_EXPLORER_URL", url)
    store = Store(load_config(str(path)).store_root)
    rows = store.read("neuron_descriptions", 0, "pos").with_columns(pl.lit(0).alias("layer"), pl.lit("pos").alias("polarity"))
    links = explorer_links(rows)
    browser.get(links["explorer_best_feature"])
    best = rows.sort("test_score", descending=True).row(0, named=True)
    assert wait_for(browser, "//p[@id='description']").text == best["description"]
    browser.get(links["explorer"])
    wait_for(browser, f"//a[@href='/features/0/pos/{best['neuron']}']").click()
    wait_for(browser, "//p[@id='description']")
    browser.get(url + "/layers")
    assert len(wait_for(browser, "//table").find_elements(By.XPATH, "./tbody/tr")) == 4
    browser.get(url + "/clusters")
    wait_for(browser, "//p[@id='not-computed']")
    keep_screenshot(browser, tmp_path, "explorer_layer.png")


def assert_only_own_resources(browser, url: str) -> None:
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and not [r for r in resources if not r.startswith(url)], resources


def wait_for(browser, xpath: str, timeout: float = 60):
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while True:
        try:
            shown = [e for e in browser.find_elements(By.XPATH, xpath) if e.is_displayed()]
            if shown:
                return shown[0]
        except WebDriverException:
            pass
        if time.monotonic() > deadline:
            errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".error")]
            raise AssertionError(f"{xpath} did not appear on {browser.current_url} {errors}")
        time.sleep(0.2)


def keep_screenshot(browser, tmp_path: Path, name: str) -> Path:
    """Under the test's tmp path, and in $NEURON_ASSETS_ARTIFACTS when CI sets it."""
    shot = tmp_path / name
    browser.save_screenshot(str(shot))
    artifacts = os.environ.get("NEURON_ASSETS_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / name)
    return shot
