"""Issue 18: the dashboard in a real Chromium (Debian's ``chromium``, driven by Playwright's Python package) against
a real ``bitplan serve`` with API keys: start a sweep of three budgets on a tiny model registered under a model
root, watch it reach 100% over the live event stream, read the frontier (predicted and measured points), open one
point's heatmap, download a file and check its sha256, cancel a second job. Screenshots of the main views go to
``$BITPLAN_TEST_ARTIFACTS/dashboard`` (default ``test-artifacts/dashboard``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from bitplan.service.client import Client
from tests.service.test_processes import free_port, kill_group, start, wait_until_up

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[2]
KEY = "dashboard-test-key"
SHOTS = Path(os.environ.get("BITPLAN_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "dashboard"
Expect = Callable[..., Any]  # playwright's ``expect``


def chromium() -> str:
    for name in (os.environ.get("BITPLAN_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = name and shutil.which(name)
        if found:
            return found
    pytest.skip("no Chromium found (.ci/run installs Debian's chromium with apt-get; or set BITPLAN_CHROMIUM)")


@pytest.fixture()
def served(tmp_path: Path, tiny_llama_dir: Path) -> Iterator[str]:
    """``bitplan serve`` with one API key and the tiny model's folder as a model root."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    port = free_port()
    log = tmp_path / "serve.log"
    process = start(["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--model-root",
                     str(tiny_llama_dir.parent), "--api-keys", str(keys)], log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, log)
        yield url
    finally:
        kill_group(process, signal.SIGTERM)


def _enter_the_key(page: Page, expect: Expect, model_id: str) -> None:
    """Without the key the service's own 401 reason shows; with it, the registered model is offered."""
    expect(page.locator("#jobs-error")).to_contain_text("API key")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    expect(page.locator("#key-state")).to_contain_text("key set")
    expect(page.locator(f"#models option[value='{model_id}']")).to_have_count(1)


def _run_a_sweep(page: Page, expect: Expect, url: str, registered: dict, streams: list[str]) -> str:
    """A refused field's reason beside it, then a sweep of three budgets to 100% over the event stream: its id."""
    page.fill("#f-model", registered["id"])
    page.fill("#f-budgets", "3, 4, 6")
    page.check("#f-tie")
    page.click("details summary")
    page.fill("#f-seq-len", "32")
    page.fill("#f-group-size", "64")
    page.fill("#f-samples", "0")  # refused by the service: its reason appears beside the field
    page.click("#start")
    field_error = page.locator(".field[data-param='num_samples'] .error")
    expect(field_error).to_contain_text("num_samples")
    page.fill("#f-samples", "2")
    page.click("#start")
    expect(page.locator("#form-state")).to_contain_text("started")
    job_id = page.locator("#form-state").inner_text().split()[-1]
    row = page.locator(f"#job-{job_id}")
    expect(row.locator(".status")).to_have_text("succeeded", timeout=240_000)
    expect(row.locator(".pct")).to_have_text("100%")
    assert any(f"/v1/jobs/{job_id}/events/stream" in u for u in streams), streams
    with Client(url, api_key=KEY) as client:  # the Python client sees the same job, frontier and models
        assert len(client.jobs.frontier(job_id)["measured"]) == 3
        assert registered["id"] in {m["id"] for m in client.models.list()}
        assert client.models.get(registered["id"])["reference"] == registered["reference"]
    return job_id


def _read_the_frontier(page: Page, expect: Expect, job_id: str) -> None:
    """The job's frontier chart: predicted and measured points, the uniform baselines, hover, the x-axis switch."""
    page.locator(f"#job-{job_id}").locator("button.view").click()
    chart = page.locator("#chart svg")
    expect(chart.locator("path.front")).to_have_count(1)
    expect(chart.locator("circle.meas")).to_have_count(3)
    expect(chart.locator("circle.pred")).to_have_count(3)
    assert chart.locator("rect.uni").count() == 4  # uniform 2, 3, 4 and 8 bits
    expect(page.locator("#point-table tbody tr")).to_have_count(3)
    chart.locator("circle.meas").first.hover()
    expect(page.locator("#hover-info")).to_contain_text("measured KL")
    page.screenshot(path=str(SHOTS / "frontier-1280.png"), full_page=True)
    # the frontier along decode time needs a job with a latency budget: this one had none, and says so
    page.select_option("#x-axis", "latency_ms")
    expect(page.locator("#frontier-error")).to_contain_text("no latency budget")
    page.select_option("#x-axis", "bits_per_weight")
    expect(chart.locator("circle.meas")).to_have_count(3)
    expect(page.locator("#frontier-error")).to_have_text("")


def _open_a_heatmap(page: Page, expect: Expect) -> None:
    """A point chosen with the keyboard opens its heatmap (two blocks of seven layer kinds) and certificate."""
    page.locator("#chart svg").locator("circle.meas").nth(1).focus()
    page.keyboard.press("Enter")  # the keyboard selects a point too
    expect(page.locator("#point")).to_be_visible()
    expect(page.locator("#heatmap tbody tr")).to_have_count(2)  # two blocks
    expect(page.locator("#heatmap tbody td")).to_have_count(14)  # seven layer kinds each
    expect(page.locator("#heatmap thead th.tie-qkv")).to_have_count(3)
    expect(page.locator("#certificate")).to_contain_text("optimal")
    page.screenshot(path=str(SHOTS / "heatmap-1280.png"), full_page=True)


def _download_a_file(page: Page, expect: Expect, url: str, auth: dict[str, str], job_id: str) -> None:
    """The downloaded file has the sha256 the artifact lists, and the page says it checked it."""
    artifact = httpx.get(f"{url}/v1/artifacts/{job_id}-1", headers=auth).json()
    sha = {f["name"]: f["sha256"] for f in artifact["files"]}["quantized.safetensors"]
    with page.expect_download() as download:
        page.click("button.download[data-file='quantized.safetensors']")
    path = download.value.path()
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
    expect(page.locator("#download-state")).to_contain_text("sha256 checked")


def _cancel_a_long_job(page: Page, expect: Expect, job_id: str) -> None:
    """A second, long job, cancelled from its row once it runs."""
    page.fill("#f-budgets", "4")
    page.uncheck("#f-tie")
    page.fill("#f-samples", "400")
    page.fill("#f-seq-len", "64")
    page.click("#start")
    expect(page.locator("#form-state")).to_contain_text("started")
    second = page.locator("#form-state").inner_text().split()[-1]
    assert second != job_id
    long_row = page.locator(f"#job-{second}")
    expect(long_row.locator(".status")).to_have_text("running", timeout=120_000)
    long_row.locator("button.cancel").click()
    expect(long_row.locator(".status")).to_have_text("cancelled", timeout=120_000)


def _fit_a_phone_screen(page: Page, expect: Expect, job_id: str) -> None:
    """At 390 px wide the frontier still shows and the page does not scroll sideways."""
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator(f"#job-{job_id} button.view").click()
    expect(page.locator("#chart svg circle.meas")).to_have_count(3)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at 390 px ({width} px wide)"
    page.screenshot(path=str(SHOTS / "dashboard-390.png"), full_page=True)


def test_issue18_dashboard_sweep_frontier_heatmap_download_cancel(served: str, tiny_llama_dir: Path) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    executable = chromium()
    url = served
    auth = {"Authorization": f"Bearer {KEY}"}
    registered = httpx.post(f"{url}/v1/models", json={"reference": tiny_llama_dir.name, "name": "tiny llama"},
                            headers=auth).json()
    root = httpx.get(f"{url}/", follow_redirects=True)
    assert root.status_code == 200 and root.headers["content-type"].startswith("text/html")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/events/stream" in r.url else None)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{url}/")
        expect = playwright_api.expect
        _enter_the_key(page, expect, registered["id"])
        job_id = _run_a_sweep(page, expect, url, registered, streams)
        _read_the_frontier(page, expect, job_id)
        _open_a_heatmap(page, expect)
        _download_a_file(page, expect, url, auth, job_id)
        _cancel_a_long_job(page, expect, job_id)
        _fit_a_phone_screen(page, expect, job_id)
        browser.close()
    assert not errors, errors
