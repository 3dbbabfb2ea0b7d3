"""The Dagster UI driven as a user drives it: `dagster dev` on 127.0.0.1 with a temporary
DAGSTER_HOME, opened in headless Chromium (Debian's `chromium` and `chromium-driver`, driven
with Selenium; nothing is downloaded). One layer x polarity partition of `exemplars` is
launched from the asset's page, and the instance must then hold exactly that partition. The
HTML report of a finished tiny run is read the same way: index, a layer page, its sortable
table, a neuron page with its heat-maps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from neuron_assets.config import load_config
from tests.support.chromium import headless_chromium

LAYER, POLARITY = "1", "neg"  # the partition the test launches

@pytest.fixture
def browser():
    driver = headless_chromium()
    yield driver
    driver.quit()


@pytest.fixture
def dagster_ui(tiny_config, tmp_path):
    """`dagster dev` for a tiny config on a free port; yields (url, DAGSTER_HOME, config path)."""
    config = tiny_config(features__layers=[0, 1])
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = _free_port()
    dagster = Path(sys.executable).parent / "dagster"
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DAGSTER_HOME=str(home), NEURON_ASSETS_CONFIG=str(config),
               PYTHONPATH=str(repo), PATH=f"{dagster.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    # the corpus first, from the CLI into the same instance: the UI launch is one exemplars partition
    subprocess.run([sys.executable, "-m", "neuron_assets.cli", "--config", str(config), "run", "--select", "corpus"],
                   env=env, check=True, capture_output=True, timeout=120)
    log = open(tmp_path / "dagster_dev.log", "w")
    server = subprocess.Popen([str(dagster), "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(repo / "workspace.yaml")],
                              cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: _answers(url + "/server_info"), 240, server, tmp_path / "dagster_dev.log")
        yield url, home, config
    finally:
        os.killpg(server.pid, signal.SIGINT)  # dagster dev shuts its webserver, daemon and code server down on Ctrl-C
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)  # whatever of its group is left
        except ProcessLookupError:
            pass
        server.wait()
        log.close()


@pytest.mark.browser
def test_launch_one_exemplars_partition_from_the_ui(dagster_ui, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, home, config = dagster_ui
    started = time.monotonic()
    browser.get(url + "/assets/exemplars")
    _dismiss_first_visit_modal(browser)
    _click(browser, "//button[normalize-space(.)='Materialize…']")
    for dimension, value in (("layer", LAYER), ("polarity", POLARITY)):
        _click(browser, f"//span[normalize-space(.)='{dimension}']/ancestor::div[contains(@class,'Box_pt4')][1]"
                        "/following-sibling::div//div[contains(@class,'TagSelector_tagSelectorContainer')]")
        _click(browser, f"//div[@role='menuitem'][.//span[normalize-space(.)='{value}'] or .//*[normalize-space(text())='{value}']]")
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _wait_for(browser, "//*[normalize-space(.)='1 partition']")
    _click(browser, "//button[starts-with(normalize-space(.),'Launch')]")

    key = dg.MultiPartitionKey({"layer": LAYER, "polarity": POLARITY})
    with dg.DagsterInstance.from_config(str(home)) as instance:
        deadline = time.monotonic() + 120
        while not instance.get_materialized_partitions(dg.AssetKey("exemplars")):
            failed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
            assert not failed, f"the run launched from the UI failed: {failed[0].run_id}"
            assert time.monotonic() < deadline, "no exemplars partition materialized within 120 s of the launch"
            time.sleep(0.5)
        assert instance.get_materialized_partitions(dg.AssetKey("exemplars")) == {key}, "exactly that partition"
        [run] = [r for r in instance.get_runs() if dg.AssetKey("exemplars") in (r.asset_selection or ())]
    browser.get(f"{url}/runs/{run.run_id}")
    _wait_for(browser, "//*[normalize-space(.)='Success']")
    shot = _keep_screenshot(browser, tmp_path, "exemplars_partition_run.png")

    # the asset's page shows what the materialization recorded (the partition's metadata)
    browser.get(f"{url}/assets/exemplars?view=partitions&partition={key}")
    _wait_for(browser, "//*[normalize-space(.)='config_hash']")
    _wait_for(browser, f"//*[contains(normalize-space(.), '{load_config(str(config)).hash}')]")
    _keep_screenshot(browser, tmp_path, "exemplars_partition_metadata.png")
    print(f"UI test: {time.monotonic() - started:.1f} s in the browser; screenshot {shot}")


@pytest.mark.browser
def test_the_html_report_reads_in_the_browser(described_run, browser, tmp_path):
    """From the report's index to a layer page, sorted by test score with a click, then to the
    best neuron's page: its description, its heat-map tokens, nothing fetched from elsewhere."""
    from selenium.webdriver.common.by import By

    store_root = load_config(str(described_run)).root
    index = Path(store_root) / "report" / "index.html"
    assert index.is_file(), "the finished run built the report"
    browser.get(index.as_uri())
    _wait_for(browser, "//h1")
    _click(browser, "//a[starts-with(@href, 'layer-1-neg.html')]")
    _wait_for(browser, "//table[contains(@class,'sortable')]//th[normalize-space(.)='test']")

    def column(name: str) -> list[float]:
        table = browser.find_element(By.XPATH, "//h2[starts-with(., 'neurons')]/following::table[1]")
        at = [th.text.strip() for th in table.find_elements(By.TAG_NAME, "th")].index(name)
        return [float(row.find_elements(By.TAG_NAME, "td")[at].get_attribute("data-v") or "nan")
                for row in table.find_elements(By.XPATH, "./tbody/tr")]

    _click(browser, "//h2[starts-with(., 'neurons')]/following::table[1]//th[normalize-space(.)='test']")
    ascending = column("test")
    _click(browser, "//h2[starts-with(., 'neurons')]/following::table[1]//th[normalize-space(.)='test']")
    descending = column("test")
    assert len(descending) == 4 and ascending == sorted(ascending) and descending == sorted(descending, reverse=True)
    _keep_screenshot(browser, tmp_path, "report_layer_page.png")
    _click(browser, "//h2[starts-with(., 'neurons')]/following::table[1]/tbody/tr[1]//a[contains(@href, 'neurons/')]")
    _wait_for(browser, "//p[contains(@class, 'desc')]")
    tokens = [t for t in browser.find_elements(By.CSS_SELECTOR, "span.t") if t.is_displayed()]
    assert len(tokens) > 20 and any("background" in (t.get_attribute("style") or "") for t in tokens)
    assert browser.current_url.startswith(index.parent.as_uri()), "every link stays inside the report"
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert not [r for r in resources if not r.startswith(("file:", "data:"))], resources
    _keep_screenshot(browser, tmp_path, "report_neuron_page.png")


def _dismiss_first_visit_modal(browser, timeout: float = 20) -> None:
    """A fresh DAGSTER_HOME greets its first visitor with a "Join the Dagster community" dialog."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        skip = [b for b in browser.find_elements(By.XPATH, "//button[normalize-space(.)='Skip']") if b.is_displayed()]
        if skip:
            skip[0].click()
            return
        if browser.find_elements(By.XPATH, "//button[normalize-space(.)='Materialize…']") and time.monotonic() > deadline - timeout / 2:
            return
        time.sleep(0.3)


def _click(browser, xpath: str, timeout: float = 30) -> None:
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            for element in _visible(browser, xpath):
                if element.is_enabled():
                    element.click()
                    return
        except WebDriverException:  # re-rendered or covered meanwhile: look again
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing to click at {xpath} on {browser.current_url}")
        time.sleep(0.3)


def _wait_for(browser, xpath: str, timeout: float = 60) -> None:
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while True:
        try:
            if _visible(browser, xpath):
                return
        except WebDriverException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{xpath} did not appear on {browser.current_url}")
        time.sleep(0.3)


def _visible(browser, xpath: str) -> list:
    from selenium.webdriver.common.by import By

    return [element for element in browser.find_elements(By.XPATH, xpath) if element.is_displayed()]


def _keep_screenshot(browser, tmp_path: Path, name: str) -> Path:
    """Under the test's tmp path, and in $NEURON_ASSETS_ARTIFACTS when CI sets it."""
    shot = tmp_path / name
    browser.save_screenshot(str(shot))
    artifacts = os.environ.get("NEURON_ASSETS_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / name)
    print(f"screenshot: {shot}")
    return shot


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_until(condition, timeout: float, server, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"dagster dev did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.5)


def test_a_layer_range_for_both_polarities_launched_with_range_tags_is_one_run_and_one_pass(tiny_config):
    """What the Launchpad submits for a layer range x both polarities (README, "One forward pass
    for a layer range"): one run, one forward pass, every partition of the rectangle materialized."""
    from neuron_assets.defs.definitions import build_definitions
    from neuron_assets.defs.partitions import layer_range_tags

    path = tiny_config()
    defs = build_definitions(str(path))
    exemplars = defs.resolve_assets_def("exemplars")
    tags = layer_range_tags(exemplars.partitions_def, 0, 1)
    with dg.instance_for_test() as instance:
        assert dg.materialize([defs.resolve_assets_def("corpus")], instance=instance).success
        result = dg.materialize([exemplars], instance=instance, tags=tags)
        assert result.success
        assert len(instance.get_runs(filters=dg.RunsFilter(tags={"dagster/asset_partition_range_start": tags[
            "dagster/asset_partition_range_start"]}))) == 1
        wanted = {dg.MultiPartitionKey({"layer": str(layer), "polarity": polarity})
                  for layer in (0, 1) for polarity in ("pos", "neg")}
        assert instance.get_materialized_partitions(dg.AssetKey("exemplars")) == wanted, "layers 0-1, both polarities"
        [materialization] = [event for event in result.get_asset_materialization_events()][:1]
        metadata = materialization.materialization.metadata
        assert metadata["partitions"].value == 4 and metadata["passes"].value == 1, "one forward pass for all four"
