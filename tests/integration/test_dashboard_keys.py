"""The dashboard's Keys page in a real browser (Debian's chromium, headless, via Playwright):
teams and keys listed with spend against budget, a key created and revoked from the page,
and what the page did checked through the API and with the key itself. Saves a screenshot as
tests/artifacts/keys.png."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import Daemon
from .test_dashboard import ARTIFACTS, browser  # noqa: F401 (the fixture)

ADMIN = "admin-key-for-the-keys-page"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello!"}]}


def send(daemon: Daemon, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(daemon.url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def rows(page: Any, table: str) -> list[list[str]]:
    return page.eval_on_selector_all(  # type: ignore[no-any-return]
        f"#{table} tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
    )


def test_keys_page_lists_creates_and_revokes(
    start_mpcapi: Callable[..., Daemon],
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    daemon = start_mpcapi(
        MPCAPI_AUTH="keys",
        MPCAPI_ADMIN_KEY=ADMIN,
        MPCAPI_DATABASE_URL=f"sqlite:///{tmp_path / 'keys.db'}",
    )
    _, team = send(daemon, "POST", "/admin/teams", {"name": "research", "budget_usd": 1,
                                                      "budget_period": "month"})  # fmt: skip
    _, key = send(daemon, "POST", "/admin/keys", {"user": "alice", "team_id": team["id"],
                                                    "budget_usd": 0.001})  # fmt: skip
    for _ in range(3):
        assert send(daemon, "POST", "/api/chat/completions", CHAT, token=key["secret"])[0] == 200
    # The ledger stores the rows within a second; the API's spend is the database's.
    deadline = time.monotonic() + 10
    while send(daemon, "GET", f"/admin/keys/{key['id']}")[1]["spend_usd"] <= 0:
        assert time.monotonic() < deadline, "no spend recorded"
        time.sleep(0.2)

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("dialog", lambda dialog: dialog.accept())  # "Revoke …?"
    try:
        page.goto(daemon.url + "/dashboard/keys.html")
        page.fill("#admin-key", "wrong")
        page.click("#login button[type=submit]")
        page.wait_for_function("() => document.getElementById('login-error').textContent !== ''")
        page.fill("#admin-key", ADMIN)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#keys-view:not([hidden])")
        page.wait_for_function("() => window.mpcapiKeys.loads >= 1")

        (team_row,) = rows(page, "teams")
        assert team_row[:2] == [team["id"], "research"] and team_row[5] == "1"
        assert "/ $1" in team_row[6] and team_row[7].endswith("-01T00:00:00.000Z")
        (key_row,) = rows(page, "keys")
        assert key_row[0] == key["id"] and key_row[2] == "alice" and key_row[3] == "research"
        assert key_row[5] == "active" and "/ $0.001" in key_row[7]
        spend = float(key_row[7].split("/")[0].strip().lstrip("$"))
        assert spend > 0
        # The bar is the share of the budget spent.
        width = page.eval_on_selector(
            f"#keys tr[data-id='{key['id']}'] .bar span", "s => parseFloat(s.style.width)"
        )
        assert abs(width - 100 * spend / 0.001) < 1, (width, spend)

        # A key made on the page: its secret is shown once, and works.
        page.fill("#key-user", "bob")
        page.fill("#key-alias", "bob-ci")
        page.select_option("#key-team", team["id"])
        page.fill("#key-budget", "2")
        page.select_option("#key-period", "week")
        page.fill("#key-models", "gpt-4o-mini, openai/*")
        page.fill("#key-expires", "30d")
        page.click("#create-key button[type=submit]")
        page.wait_for_selector("#new-secret:not([hidden])")
        new_id = page.text_content("#new-secret-id")
        secret = page.text_content("#new-secret-value")
        assert secret and secret.startswith("sk-mpc-")
        page.wait_for_function("() => window.mpcapiKeys.keys.length === 2")
        status, made = send(daemon, "GET", f"/admin/keys/{new_id}")
        assert status == 200 and made["alias"] == "bob-ci" and made["team_id"] == team["id"]
        assert made["budget_usd"] == 2 and made["budget_period"] == "week"
        assert made["models"] == ["gpt-4o-mini", "openai/*"] and made["expires_at"]
        assert send(daemon, "POST", "/api/chat/completions", CHAT, token=secret)[0] == 200

        # A bad input is shown as the API's message.
        page.fill("#key-user", "carol")
        page.fill("#key-budget", "-3")
        page.click("#create-key button[type=submit]")
        page.wait_for_function(
            "() => document.getElementById('keys-error').textContent.includes('budget_usd')"
        )

        # Revoked from the page: the API says so and the key is refused at once.
        page.click(f"#keys tr[data-id='{new_id}'] button.revoke")
        page.wait_for_function(
            f"() => window.mpcapiKeys.keys.some(k => k.id === '{new_id}' && k.state === 'revoked')"
        )
        assert send(daemon, "GET", f"/admin/keys/{new_id}")[1]["state"] == "revoked"
        assert send(daemon, "POST", "/api/chat/completions", CHAT, token=secret)[0] == 401
        revoked_row = next(r for r in rows(page, "keys") if r[0] == new_id)
        assert revoked_row[5] == "revoked" and revoked_row[9] == ""  # no button any more

        # Creating a team from the page.
        page.fill("#team-name", "ops")
        page.fill("#team-budget", "10")
        page.click("#create-team button[type=submit]")
        page.wait_for_function("() => window.mpcapiKeys.teams.length === 2")
        assert [t["name"] for t in send(daemon, "GET", "/admin/teams")[1]["data"]] == [
            "research",
            "ops",
        ]
        assert problems == []
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "keys.png"), full_page=True)
