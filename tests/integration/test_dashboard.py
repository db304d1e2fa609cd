"""The dashboard in a real browser: Debian's chromium, headless, driven by Playwright.

A daemon with two workers gets known traffic; the test signs in on /dashboard/, checks that
the charts are drawn with data points and that the totals shown are the traffic sent, and
saves a screenshot as tests/artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright import sync_api as playwright_api

from .harness import REPO_ROOT, Daemon

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ADMIN = "admin-key-for-the-dashboard"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}
EMBEDDING = {"model": "text-embedding-3-small", "input": "Hello!"}
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
CHARTS = (
    "chart-rps",
    "chart-latency",
    "chart-errors",
    "chart-model-tokens",
    "chart-model-cost",
    "chart-user-tokens",
    "chart-user-cost",
)


def post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def counted_tokens(document: Any) -> int:
    """What MPC-API counts: prompt plus completion tokens (an embedding has no completion)."""
    usage = document["usage"]
    return int(usage.get("prompt_tokens") or 0) + int(usage.get("completion_tokens") or 0)


@pytest.fixture
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        # .ci/run installs it; on a machine without it, say how rather than fail obscurely.
        message = "needs Debian's chromium: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


def test_dashboard_shows_the_traffic_live(
    start_mpcapi: Callable[..., Daemon], browser: Any
) -> None:
    daemon = start_mpcapi(MPCAPI_WORKERS="2", MPCAPI_ADMIN_KEY=ADMIN)
    sent = {"chats": 0, "embeddings": 0, "invalid": 0, "tokens": 0}

    def traffic(chats: int) -> None:
        for _ in range(chats):
            status, document = post(daemon.api_base + "/chat/completions", CHAT)
            assert status == 200
            sent["chats"] += 1
            sent["tokens"] += counted_tokens(document)
        status, document = post(daemon.api_base + "/embeddings", EMBEDDING)
        assert status == 200
        sent["embeddings"] += 1
        sent["tokens"] += counted_tokens(document)
        status, _ = post(daemon.api_base + "/chat/completions", {**CHAT, "temperature": 5})
        assert status == 400
        sent["invalid"] += 1

    traffic(5)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    try:
        page.goto(daemon.url + "/dashboard/")

        # A wrong key is refused and forgotten; the right one opens the dashboard.
        page.fill("#admin-key", "not-the-key")
        page.click("#login button[type=submit]")
        page.wait_for_function("() => document.getElementById('login-error').textContent !== ''")
        assert page.evaluate("sessionStorage.getItem('mpcapi-admin-key')") is None
        page.fill("#admin-key", ADMIN)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#dashboard-view:not([hidden])")
        assert ADMIN not in page.url
        assert page.evaluate("sessionStorage.getItem('mpcapi-admin-key')") == ADMIN

        page.wait_for_function("() => window.mpcapiDashboard.readings >= 2")
        traffic(8)  # while the page watches: the rate chart sees it
        total = sent["chats"] + sent["embeddings"] + sent["invalid"]
        page.wait_for_function(
            f"() => document.getElementById('total-requests').textContent === '{total}'",
            timeout=15000,
        )
        page.wait_for_function("() => window.mpcapiDashboard.readings >= 4", timeout=15000)

        assert page.text_content("#total-tokens") == f"{sent['tokens']:,}"
        expected_rate = 100 * sent["invalid"] / total
        assert page.text_content("#error-rate") == f"{expected_rate:.1f} %"
        assert page.text_content("#p50").endswith(" ms")
        rows = page.eval_on_selector_all(
            "#models tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        by_model = {row[0]: row for row in rows}
        assert by_model["gpt-4o-mini"][1] == str(sent["chats"])
        assert by_model["text-embedding-3-small"][1] == str(sent["embeddings"])
        assert by_model["(none)"][2] == str(sent["invalid"])  # rejected before the model was read
        users = page.eval_on_selector_all(
            "#users tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        assert users[0][:2] == ["anonymous", str(total)]
        errors = page.eval_on_selector_all("#errors tbody tr", "rows => rows.length")
        assert errors == sent["invalid"]
        # The ledger's own totals, read from GET /api/usage (rows land within a second).
        page.wait_for_function(
            "total => { const row = document.querySelector('#ledger-users tbody tr');"
            " return row && row.cells[1].textContent === String(total); }",
            arg=total,
            timeout=15000,
        )
        ledger = page.eval_on_selector_all(
            "#ledger-users tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
        )
        assert ledger[0][:4] == ["(no key)", str(total), str(sent["invalid"]), str(sent["tokens"])]

        for chart in CHARTS:
            box = page.eval_on_selector(
                f"#{chart} canvas",
                "c => { const r = c.getBoundingClientRect(); return [r.width, r.height]; }",
            )
            assert box[0] > 100 and box[1] > 100, (chart, box)
            points = page.evaluate(f"window.mpcapiDashboard.charts['{chart}'].plot.data[0].length")
            assert points >= 4, (chart, points)
        rates = page.evaluate("window.mpcapiDashboard.charts['chart-rps'].plot.data[1]")
        assert any(rate and rate > 0 for rate in rates), rates
        tokens = page.evaluate(
            "window.mpcapiDashboard.charts['chart-model-tokens'].plot.series.map(s => s.label)"
        )
        assert "gpt-4o-mini" in tokens
        assert problems == []

    finally:  # also when a check fails: the picture shows why
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

    page.click("#logout")
    assert page.evaluate("sessionStorage.getItem('mpcapi-admin-key')") is None
    assert page.is_visible("#login")
