"""The web console (/console/) in a real headless Chromium, against a real gateway, worker and trainer.

Chromium is Debian's (`apt-get install chromium`; .ci/run installs it), driven by Playwright's Python
package; Playwright's own browser download is never used. A missing browser fails the test: the console
would otherwise go untested without anyone noticing. Screenshots land in test-output/console/.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from services.models.registry import Registry
from services.trainer.worker import Trainer
from services.training.paths import Roots
from tests.helpers import API_KEY, Gateway, NatsServer
from tests.trainer.helpers import running_trainer, unique, varied_rows, write_jsonl

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A busy shared machine: give the page time (expect's own default is 5 s).
expect.set_options(timeout=30_000)
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "console"


@pytest.fixture(scope="module")
def chromium() -> str:
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    return CHROMIUM


@pytest.fixture(scope="module")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


@pytest.fixture(scope="module")
async def page(browser: Browser, gw: Gateway) -> AsyncIterator[Page]:
    """The console, loaded without a key, the key entered in its dialog."""
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    await page.goto(f"{gw.api_url}/console/")
    await expect(page.locator("#key-dialog")).to_be_visible()
    await page.fill("#key-input", "not-the-key")
    await page.click("#key-submit")
    await expect(page.locator("#key-error")).to_contain_text("invalid API key")
    await page.fill("#key-input", API_KEY)
    await page.click("#key-submit")
    await expect(page.locator("#key-dialog")).to_be_hidden()
    errors.clear()  # Chromium logs the wrong key's 401 as a console error; from here on, none is expected
    yield page
    await context.close()
    assert errors == [], errors


async def shot(page: Page, name: str) -> None:
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    print(f"\nscreenshot: {path}")


async def test_the_console_loads_without_a_key_but_its_api_calls_need_one(gw: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gw.api_url) as client:
        index = await client.get("/console/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in index.headers["content-security-policy"]
        script = await client.get("/console/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        assert (await client.get("/console", follow_redirects=False)).headers["location"] == "/console/"
        # Only the files in the folder are served: a name that climbs out is just an unknown file.
        assert (await client.get("/console/..%2F__init__.py")).status_code == 404
        assert (await client.get("/console/nope.js")).json()["error"]["code"] == "INVALID_REQUEST"
        assert (await client.post("/console/")).status_code == 405
        assert (await client.get("/api/v1/models")).status_code == 401


async def test_a_chat_message_streams_its_answer_into_the_page(page: Page) -> None:
    await page.click("[data-tab=chat]")
    await expect(page.locator("#model")).to_have_value("tiny")
    await page.fill("#maxNewTokens", "32")
    await page.fill("#temperature", "0.8")
    # Count how many times the answer grows: a streamed answer grows chunk by chunk, not in one piece.
    await page.evaluate(
        """() => {
            window.growth = new Set();
            new MutationObserver(() => {
                const answer = document.querySelector('.turn.assistant:last-child .text');
                if (answer) window.growth.add(answer.textContent.length);
            }).observe(document.querySelector('#transcript'), {subtree: true, childList: true, characterData: true});
        }"""
    )
    await page.fill("#prompt", "Tell me a short story about a robot.")
    await page.click("#send")
    answer = page.locator(".turn.assistant").last
    await expect(answer).to_have_attribute("data-finish", re.compile("^(length|stop)$"))
    text = await answer.inner_text()
    growth = await page.evaluate("window.growth.size")
    assert text.strip() and growth >= 3, (text, growth)
    await expect(page.locator("#chat-stats")).to_contain_text("chunks in")
    await expect(page.locator("#stop")).to_be_disabled()

    # Stop aborts the fetch mid-answer: the answer ends there, marked stopped.
    await page.fill("#maxNewTokens", "200")
    await page.fill("#prompt", "Now a long one, please.")
    await page.click("#send")
    stopped = page.locator(".turn.assistant").last
    await expect(stopped).not_to_have_text("")
    await page.click("#stop")
    await expect(stopped).to_have_attribute("data-finish", "stopped")
    await expect(page.locator("#chat-stats")).to_contain_text("stopped:")
    await expect(page.locator("#send")).to_be_enabled()
    await shot(page, "chat")


async def test_a_started_job_draws_its_loss_curve_live_and_pauses_and_resumes(
    page: Page, roots: Roots, nats_server: NatsServer, registry: Registry
) -> None:
    dataset = write_jsonl(roots, varied_rows(16))
    async with running_trainer(nats_server.url, registry, roots) as trainer:
        await _train(page, dataset, trainer)


async def _train(page: Page, dataset: str, trainer: Trainer) -> None:
    await page.click("[data-tab=training]")
    await expect(page.locator("#t-baseModel")).to_have_value("tiny")
    fields = {
        "datasetPath": dataset,
        "outputDir": unique("console-out"),
        "adapterName": unique("console-bot"),
        "epochs": "10",
        "batchSize": "4",
        "learningRate": "0.01",
        "maxSeqLength": "64",
        "r": "8",
        "loraAlpha": "16",
        "saveSteps": "1000",
        "evalSteps": "3",
        "evalSplit": "0.25",  # 12 training rows: 3 steps per epoch, 30 in all
    }
    for name, value in fields.items():
        await page.fill(f"#t-{name}", value)
    await page.click("#start-form button[type=submit]")
    await expect(page.locator("#start-result")).to_contain_text("queued")
    chart = page.locator("#loss-chart")
    await expect(page.locator("#job-title")).to_have_text(re.compile("^job-"))  # the new job is selected
    job_id = await page.locator("#job-title").inner_text()
    await expect(page.locator(f"#jobs tr[data-job='{job_id}']")).to_be_visible()

    # The plot grows while the job runs: sample the number of points until it has grown at least twice.
    seen: list[int] = []
    deadline = time.monotonic() + 40
    while len(set(seen) - {0}) < 3 and time.monotonic() < deadline:
        seen.append(int(await chart.get_attribute("data-loss-points") or 0))
        await page.wait_for_timeout(100)
    assert len(set(seen) - {0}) >= 3, seen
    await shot(page, "training-running")

    await page.click("#job-pause")
    await expect(page.locator("#job-status")).to_have_text("paused")
    paused_at = int(await chart.get_attribute("data-loss-points") or 0)
    await expect(page.locator("#job-resume")).to_be_enabled()
    await page.click("#job-resume")
    await expect(page.locator("#job-status")).to_have_text("completed", timeout=45_000)
    points = int(await chart.get_attribute("data-loss-points") or 0)
    evals = int(await chart.get_attribute("data-eval-points") or 0)
    assert points >= 30 and points > paused_at and evals >= 5, (points, paused_at, evals)
    await expect(page.locator("#job-cancel")).to_be_disabled()
    await expect(page.locator(f"#jobs tr[data-job='{job_id}'] td[data-state]")).to_have_text("completed")
    await shot(page, "training-completed")
    print(f"job {job_id}: {points} loss points, {evals} eval points, paused after {paused_at}")


async def test_the_status_page_shows_the_worker_queue_and_models(page: Page) -> None:
    await page.click("[data-tab=status]")
    await expect(page.locator("#overall")).to_have_text("UP")
    workers = page.locator("#workers")
    await expect(workers).to_have_text(re.compile(r"^[1-9]\d* / \d+ healthy$"))
    await expect(page.locator("#queue")).to_have_text(re.compile(r"^\d+ / \d+ pending$"))
    await expect(page.locator("#models-table tr[data-model=tiny] td").nth(1)).to_have_text("ready")
    worker = page.locator("#workers-table tr[data-worker=tiny-w1] td")  # from the gateway's /metrics
    await expect(worker.nth(1)).to_have_text("tiny")
    await expect(worker.nth(3)).to_have_text("healthy")
    await expect(worker.nth(4)).to_have_text(re.compile(r"^\d+ / 8$"))
    # A rate needs two polls; the detail adds the chat test's answer (same page, earlier in this module).
    await expect(page.locator("#throughput")).to_have_text(re.compile(r"^\d+\.\d\d req/s$"))
    await expect(page.locator("#throughput-detail")).to_contain_text("chunks/s")
    await shot(page, "status")
