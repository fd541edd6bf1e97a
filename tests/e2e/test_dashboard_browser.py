"""The dashboard in a real headless browser (Debian's chromium + chromium-driver, Selenium)
while a real daemon trains the miniature model: live progress, the job page with its
comparison image, a cancel from the page that changes the dataset's marker, the LoRA library.
Screenshots of each page land in the test's temp dir."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import hold_training_at, wait_for, wait_held

from daemon.sample import make_dataset

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and DRIVER.exists()) or shutil.which("chromedriver") is None,
        reason="needs Debian's chromium and chromium-driver (.ci/run installs them)",
    ),
]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(str(DRIVER)), options=options
    )  # no driver download: the Debian one
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _text(driver, selector: str) -> str:
    """The element's text, "" when it is absent or was just replaced by a live update (the page
    re-renders rows from the event stream; a reference taken before that goes stale)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0].text if found else ""
    except StaleElementReferenceException:
        return ""


def _click(driver, selector: str) -> bool:
    """Click the element; False (try again) when a live update replaced it meanwhile."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        if found:
            found[0].click()
            return True
    except StaleElementReferenceException:
        pass
    return False


def _attr(driver, selector: str, name: str) -> str:
    """An attribute, read the same stale-tolerant way; "" until the element holds still."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return (found[0].get_attribute(name) or "") if found else ""
    except StaleElementReferenceException:
        return ""


def test_dashboard_in_a_browser_while_the_tiny_model_trains(daemon_factory, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = daemon_factory(
        engine="mflux", model="tiny-z-image", extra_env={"LORAD_RAM_GB": "128", "LORAD_UI": "127.0.0.1:0"}
    )
    held = hold_training_at(d, 2)  # the first job holds after step 2 until it is stopped (cancelled here)
    d.start()
    url = d.ui_url()
    shots = tmp_path / "screenshots"
    shots.mkdir()

    browser.get(url)
    wait_for(lambda: "live" in _text(browser, "#live"), 30, message="the page's event stream connected")
    browser.execute_script("window.__loaded_once = true")  # gone if the page reloads

    first = make_dataset(d.training_data / "ohwx_bob", images=2)
    (first / "READY").write_text("")
    wait_held(held)
    job_id = wait_for(
        lambda: d.job_states().get("ohwx_bob") == "training" and d.jobs()[0]["id"], 30, message="job row"
    )
    row = f'tr[data-id="{job_id}"]'
    # The row appeared and its progress moved to the held step without a reload.
    wait_for(
        lambda: _text(browser, f"{row} .steps").startswith("2/"), 10, message="progress 2/N on the queue page"
    )
    wait_for(
        lambda: "training" in _text(browser, f"{row} .state"), 10, message="state training on the queue page"
    )
    wait_for(
        lambda: float(_attr(browser, f"{row} progress", "value") or 0) > 0, 10, message="progress bar moved"
    )
    assert browser.execute_script("return window.__loaded_once === true")
    second = make_dataset(d.training_data / "ohwx_carol", images=2)  # waits behind the first
    (second / "READY").write_text("")
    wait_for(lambda: "ohwx_carol" in _text(browser, "#queue"), 30, message="second job listed live")
    browser.save_screenshot(str(shots / "queue.png"))

    # The job page, then cancel from it (confirm step), and the dataset's marker changes.
    wait_for(lambda: _click(browser, f"{row} .id a"), 20, message="the job's link clicked")
    wait_for(lambda: browser.find_elements(By.ID, "steps"), 20, message="the job page")
    wait_for(lambda: _text(browser, "#steps").startswith("2/"), 10, message="job page progress")
    # Samples during training: mflux's preview at step 0 (and after) in the grid, step × prompt.
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, '#samplegrid tr[data-step="0"] img.sample'),
        30,
        message="the step-0 sample in the grid while the job trains",
    )
    assert "ohwx, portrait photo" in _text(browser, "#samplegrid thead")
    browser.save_screenshot(str(shots / "job-training.png"))
    assert (first / "TRAINING").is_file()
    browser.find_element(By.ID, "action-cancel").click()
    wait_for(lambda: browser.find_elements(By.ID, "confirm"), 20, message="the confirmation page")
    assert "Cancel" in browser.find_element(By.TAG_NAME, "h1").text
    browser.save_screenshot(str(shots / "confirm-cancel.png"))
    browser.find_element(By.ID, "confirm").click()
    wait_for(
        lambda: "cancelling" in _text(browser, "#flash"), 20, message="the page says what the cancel did"
    )
    wait_for(lambda: (first / "CANCELLED").is_file(), 60, message="CANCELLED marker in the dataset folder")
    assert not (first / "TRAINING").exists()
    wait_for(lambda: _text(browser, "#state") == "cancelled", 10, message="cancelled shown live")

    # The second job trains to the end; its page shows the base-vs-LoRA comparison.
    browser.get(url)
    second_id = wait_for(lambda: next((j["id"] for j in d.jobs() if j["dataset"] == "ohwx_carol"), None), 30)
    wait_for(
        lambda: _click(browser, f'tr[data-id="{second_id}"] .id a'),
        20,
        message="the second job's link clicked",
    )
    wait_for(lambda: browser.find_elements(By.ID, "state"), 20, message="the second job's page")
    browser.execute_script("window.__job_page_once = true")  # gone if the page reloads
    wait_for(
        lambda: _text(browser, "#state") == "done", 300, interval=0.5, message="second job done, shown live"
    )
    # The last step's sample joins the grid without a reload (samples.json, fetched on live updates).
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, '#samplegrid tr[data-step="4"] img.sample'),
        30,
        message="the final sample in the grid, live",
    )
    assert browser.execute_script("return window.__job_page_once === true")
    compare = browser.find_element(By.ID, "compare")
    wait_for(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", compare), 20,
             message="comparison image loaded")  # fmt: skip
    assert browser.execute_script("return arguments[0].naturalWidth", compare) > 0  # shown live, no reload
    browser.refresh()  # the page as rendered for a finished job: its log lines up to job.done
    assert "job.done" in browser.find_element(By.CSS_SELECTOR, "pre.log").text
    compare = browser.find_element(By.ID, "compare")
    wait_for(
        lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", compare),
        20,
    )
    assert "carol.safetensors" in browser.page_source  # the output paths
    assert browser.find_elements(By.CSS_SELECTOR, "#losschart polyline")  # the loss curve has points
    # The chart: axes with values, raw points faint, a smoothed line bold; caption first → last (smoothed).
    assert browser.find_elements(By.CSS_SELECTOR, "#losschart circle.lossraw")
    assert browser.find_elements(By.CSS_SELECTOR, "#losschart polyline.losssmooth")
    ticks = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#losschart text.ytick")]
    assert len(ticks) == 5 and all(float(t) > 0 for t in ticks), ticks
    assert browser.find_elements(By.CSS_SELECTOR, "#losschart text.xtick")
    caption = _text(browser, "#losscount")
    assert "→" in caption and caption.endswith("(smoothed)"), caption
    carol = next(j for j in d.jobs() if j["dataset"] == "ohwx_carol")
    first, last = (float(v) for v in caption.split("loss ")[-1].split(" (")[0].split(" → "))
    series = carol["metrics"]["loss_curve"]  # the same smoothing as metrics.json's curve
    assert first == pytest.approx(series[0][1], rel=0.01) and last == pytest.approx(series[-1][1], rel=0.01)
    # The learning metrics, the report's loss.html and metrics.json, and the finished samples grid.
    assert "steps" in _text(browser, "#metricsline") and "LoRA effect" in _text(browser, "#metricsline")
    links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#reportlinks a")]
    assert any(h.endswith("/carol.report/loss.html") for h in links), links
    assert any(h.endswith("/carol.report/metrics.json") for h in links), links
    assert browser.find_elements(By.CSS_SELECTOR, "#samplegrid img.sample")
    browser.save_screenshot(str(shots / "job-done.png"))

    browser.find_element(By.LINK_TEXT, "LoRA library").click()
    wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#lora-carol img"), 20, message="the library page"
    )
    image = browser.find_element(By.CSS_SELECTOR, "#lora-carol img")
    wait_for(
        lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image), 20
    )
    assert "lorad.job_id" in browser.page_source
    # The daemon's real state (the live marker connects here too), the trigger word, the metrics
    # line and download links for the LoRA and its renders.
    wait_for(lambda: "live" in _text(browser, "#live"), 30, message="the library page's live marker")
    assert "ohwx" in _text(browser, "#lora-carol .trigger")
    assert "loss" in _text(browser, "#lora-carol .metrics")
    downloads = [
        a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#lora-carol .downloads a")
    ]
    for name in ("carol.safetensors", "carol.png", "carol.compare.png"):
        assert any(h.endswith(f"/files/loras/{name}") for h in downloads), downloads
    browser.save_screenshot(str(shots / "loras.png"))
    for name in ("queue", "job-training", "confirm-cancel", "job-done", "loras"):
        assert (shots / f"{name}.png").stat().st_size > 1000
    print(f"screenshots: {shots}")
