"""The dashboard in a real browser: headless Chromium loads ``/`` from a real proxy, the page
shows a session this test runs through the proxy (from the live feed) and the charts fill in
(from ``/api/summary``). Any JavaScript exception, ``console.error`` or browser error entry
fails the test. A screenshot is saved as ``artifacts/dashboard.png`` (git-ignored) for CI.

With an admin token, the browser is asked to log in (HTTP Basic) as a person would be: the
test answers the browser's prompt (CDP ``Fetch.authRequired``) with any user name and the
token as the password, and the page's own ``fetch`` calls and its WebSocket must then get in
with the credentials the browser saved.

Chromium is driven over the Chrome DevTools Protocol with the trio-websocket client.
Debian's ``chromium`` package is installed by ``scripts/test``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import poplib
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.conftest import KIB
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory, make_message
from tests.test_admin import REPO_ROOT, AdminProxy, start_admin_proxy

TIMEOUT = 30.0
ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # runs as root in CI containers
    "--disable-gpu",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1280,1000",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)

Message = dict[str, Any]


class Cdp:
    """A minimal Chrome DevTools Protocol client: commands, and every event kept for later.

    With ``credentials`` (user, password), it answers the browser's login prompts with them
    and lets every request it intercepts go on (``Fetch.enable`` on a page session).
    """

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.events: list[Message] = []
        self.credentials: tuple[str, str] | None = None
        self.challenges: list[Message] = []
        self._next_id = 0

    async def _receive(self) -> Message:
        message = json.loads(await self.ws.get_message())
        assert isinstance(message, dict)
        if str(message.get("method", "")).startswith("Fetch."):
            await self._answer_fetch(message)
        return message

    async def _answer_fetch(self, message: Message) -> None:
        params, session = message["params"], message.get("sessionId")
        answer: Message = {"requestId": params["requestId"]}
        if message["method"] == "Fetch.authRequired":
            self.challenges.append(params["authChallenge"])
            assert self.credentials is not None, "the browser asked for credentials"
            user, password = self.credentials
            answer["authChallengeResponse"] = {
                "response": "ProvideCredentials",
                "username": user,
                "password": password,
            }
            await self._send("Fetch.continueWithAuth", answer, session)
        else:  # Fetch.requestPaused: no change
            await self._send("Fetch.continueRequest", answer, session)

    async def _send(self, method: str, params: Message, session: str | None) -> int:
        self._next_id += 1
        request: Message = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            request["sessionId"] = session
        await self.ws.send_message(json.dumps(request))
        return self._next_id

    async def call(
        self, method: str, params: Message | None = None, session: str | None = None
    ) -> Message:
        request_id = await self._send(method, params or {}, session)
        with trio.fail_after(TIMEOUT):
            while True:
                message = await self._receive()
                if message.get("id") == request_id:
                    if "error" in message:
                        raise AssertionError(f"{method}: {message['error']}")
                    result: Message = message.get("result", {})
                    return result
                self.events.append(message)

    async def wait_event(self, method: str) -> Message:
        with trio.fail_after(TIMEOUT):
            while True:
                for event in self.events:
                    if event.get("method") == method:
                        return event
                self.events.append(await self._receive())

    async def evaluate(self, expression: str, session: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, session: str, what: str) -> Any:
        """Evaluate ``expression`` every 100 ms until it is truthy; fails after a while."""
        with trio.move_on_after(TIMEOUT):
            while True:
                found = await self.evaluate(expression, session)
                if found:
                    return found
                errors = self.page_errors()
                assert errors == [], json.dumps(errors, indent=1)[:4000]  # fail fast
                await trio.sleep(0.1)
        text = await self.evaluate("document.body.innerText", session)
        pytest.fail(f"the dashboard never showed {what}; page text:\n{text}")

    def page_errors(self) -> list[Message]:
        """JavaScript exceptions, console errors, and browser errors (CSP, failed loads)."""
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            thrown = method == "Runtime.exceptionThrown"
            console = method == "Runtime.consoleAPICalled" and params.get("type") in {
                "error",
                "assert",
            }
            logged = method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error"
            if thrown or console or logged:
                errors.append(event)
        return errors


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed (scripts/test installs Debian's 'chromium')")
    return path


DASHBOARD_TOKEN = "dashboard-" + "k3" * 12


@pytest.fixture(scope="module", params=["open", "token"])
def dashboard_proxy(
    request: pytest.FixtureRequest, dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdminProxy]:
    """The proxy without an admin token, then with one (``--admin-token-file``)."""
    folder = tmp_path_factory.mktemp("dash")
    extra: list[str] = []
    token = None
    if request.param == "token":
        token = DASHBOARD_TOKEN
        (folder / "admin-token").write_text(token + "\n")
        extra = ["--admin-token-file", str(folder / "admin-token")]
    with start_admin_proxy(dovecot, folder / "proxy.log", *extra) as proxy:
        yield AdminProxy(proxy, token=token)


@contextlib.asynccontextmanager
async def browser(chromium: str, profile: Path) -> AsyncIterator[Cdp]:
    """Headless Chromium with a fresh profile; yields a CDP client of the browser target."""
    log = (profile.parent / "chromium.log").open("wb")
    process = await trio.lowlevel.open_process(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: its helpers are stopped with it
    )
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.fail_after(TIMEOUT):
            while not (port_file.exists() and len(port_file.read_text().split()) == 2):
                if process.poll() is not None:
                    pytest.fail(f"chromium exited with {process.returncode}; see {log.name}")
                await trio.sleep(0.1)
        port, path = port_file.read_text().split()
        async with open_websocket_url(
            f"ws://127.0.0.1:{port}{path}",
            connect_timeout=TIMEOUT,
            disconnect_timeout=2,
            max_message_size=64 * 1024 * 1024,
        ) as ws:
            yield Cdp(ws)
        # The client closed first (trio-websocket leaks the socket when the server does).
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with trio.CancelScope(shield=True):
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        log.close()


def pop3_session(admin: AdminProxy, box: Mailbox) -> str:
    pop = poplib.POP3("127.0.0.1", admin.proxy.port, timeout=TIMEOUT)
    session_id = admin.proxy.session_id_for(pop.sock.getsockname()[1])
    pop.user(box.user)
    pop.pass_(box.password)
    pop.stat()
    pop.retr(1)
    pop.quit()
    return session_id


async def test_the_dashboard_shows_a_live_session_without_errors(
    chromium: str, dashboard_proxy: AdminProxy, mailbox: MailboxFactory, tmp_path: Path
) -> None:
    admin = dashboard_proxy
    box = mailbox([make_message(8 * KIB, subject="dashboard")])
    profile = tmp_path / "profile"
    profile.mkdir()
    async with browser(chromium, profile) as cdp:
        target = await cdp.call("Target.createTarget", {"url": "about:blank"})
        attached = await cdp.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            await cdp.call(f"{domain}.enable", session=session)
        if admin.token is not None:  # the person at the browser knows the token
            cdp.credentials = ("admin", admin.token)
            await cdp.call(
                "Fetch.enable",
                {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]},
                session,
            )
        await cdp.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1500, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        await cdp.call("Page.navigate", {"url": f"http://{admin.endpoint}/"}, session)
        await cdp.wait_event("Page.loadEventFired")
        await cdp.wait_for(
            "document.getElementById('feed-status').dataset.state === 'live'",
            session,
            "the feed connected",
        )

        # A session while the page is open: the live feed must bring it in.
        session_id = await trio.to_thread.run_sync(pop3_session, admin, box)
        selector = f'tr[data-session="{session_id}"][data-state="closed"]'
        cells = await cdp.wait_for(
            f"(row => row && Array.from(row.cells, c => c.textContent))"
            f"(document.querySelector({json.dumps(selector)}))",
            session,
            f"session {session_id} closed",
        )
        assert cells[0] == session_id
        assert cells[1].startswith("127.0.0.1:")
        assert cells[2:6] == [box.user, "closed (quit)", "5", "QUIT"]
        assert cells[6].startswith("TLSv1.")
        # The charts fill in from /api/summary (polled every 2 s).
        await cdp.wait_for(
            "!!document.querySelector('#chart-commands .row[data-name=\"RETR\"]')",
            session,
            "RETR among the top commands",
        )
        await cdp.wait_for(
            "!!document.querySelector('#chart-networks .row[data-name=\"127.0.0.0/8\"]')",
            session,
            "the loopback network among the client networks",
        )
        await cdp.wait_for(
            "document.getElementById('ready-status').dataset.state === 'ready'",
            session,
            "the upstream as ready",
        )
        sessions_card = await cdp.evaluate(
            "document.getElementById('card-sessions').textContent", session
        )
        assert int(sessions_card) >= 1
        events = await cdp.evaluate("document.getElementById('events').innerText", session)
        assert f"{session_id}  pop3.login" in events
        assert box.password not in await cdp.evaluate("document.body.innerText", session)

        shot = await cdp.call(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session
        )
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(shot["data"])
        name = "dashboard.png" if admin.token is None else "dashboard-token.png"
        (ARTIFACTS / name).write_bytes(png)
        assert png.startswith(b"\x89PNG")
        errors = cdp.page_errors()
        assert errors == [], json.dumps(errors, indent=1)[:4000]
        # The page's own error banner (window.onerror, unhandledrejection) stayed hidden.
        banner = "document.getElementById('page-error')"
        assert await cdp.evaluate(f"{banner}.hidden", session), await cdp.evaluate(
            f"{banner}.textContent", session
        )
    if admin.token is not None:
        # The browser asked once, for the page, and then sent what it saved by itself with
        # the fetch calls and the WebSocket (the feed went live, the charts filled in).
        assert [c["scheme"] for c in cdp.challenges] == ["basic"], cdp.challenges
        assert cdp.challenges[0]["realm"] == "pop3proxy"
        assert admin.proxy.find_events("admin.unauthorized")[0]["path"] == "/"
