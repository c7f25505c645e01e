"""No credential reaches any sink: the log, ``/events``, ``/metrics``, ``/api/summary``, the
inventory file and the three report formats.

For each mode (user names as they are, and keyed pseudonyms), one proxy with every sink on
(debug-level log, the admin endpoint on an ephemeral port, an inventory in a fresh state
directory) relays every login flow of ``test_no_leak.py``, succeeding and failing, and each of
its odd command lines (a bare CR, a NUL, a TAB, USER with two words, lower case, odd SASL
lines, a password typed as a command), each with its own random password, while a WebSocket
watcher follows ``/events``. Then each sink's output is searched for every secret form
(plaintext, base64, hex, in any letter case) and, with a key, for every user name. Each sink
must also show the sessions, so that finding nothing means something.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import poplib
import secrets
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from pop3proxy.migration.inventory import database_path
from tests.conftest import SHARED_PROXY_ARGS
from tests.peers.dovecot import Dovecot
from tests.peers.proxy import ProxyProcess
from tests.test_no_leak import (
    FLOWS,
    ODD_SHAPES,
    Secrets,
    add_odd_secrets,
    leaks,
    login,
    odd_session,
    session,
)

TIMEOUT = 30.0
REPO_ROOT = Path(__file__).resolve().parents[1]
#: Given in the environment: the flag for it is changing (a key file only), the variable is not.
PSEUDONYM_KEY = "no-leak-sinks-test-key-0123456789"
MODES = ["names", "pseudonyms"]
SINKS = [
    "log",
    "feed",
    "metrics",
    "summary",
    "inventory",
    "report-table",
    "report-csv",
    "report-json",
]


@dataclass
class Collected:
    """What one proxy's sinks showed after all the sessions."""

    mode: str
    secrets: Secrets = field(default_factory=Secrets)
    users: list[str] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    logins: int = 0
    feed: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, bytes] = field(default_factory=dict)

    @property
    def forbidden(self) -> dict[bytes, str]:
        """The secret forms; with a key, the user names as well (personal data)."""
        names = {u.encode(): f"user name {u}" for u in self.users}
        return {**self.secrets.forms, **(names if self.mode == "pseudonyms" else {})}


def new_user(dovecot: Dovecot) -> tuple[str, str]:
    user, password = f"leak{secrets.token_hex(5)}", f"Pw-{secrets.token_hex(8)}"
    dovecot.add_user(user, password, [b"Subject: hello\r\n\r\nbody\r\n"])
    return user, password


def run_sessions(proxy: ProxyProcess, dovecot: Dovecot, collected: Collected) -> None:
    """Every login flow, succeeding and failing, and every odd shape: one session each."""
    for flow in FLOWS:
        for succeed in (True, False):
            user, password = new_user(dovecot)
            sent = password if succeed else f"Pw-{secrets.token_hex(8)}"
            collected.users.append(user)
            with session(proxy) as (pop, session_id):
                try:
                    login(collected.secrets, pop, flow, user, sent)
                    collected.logins += 1
                    pop.stat()
                except poplib.error_proto:
                    assert not succeed, flow
                with contextlib.suppress(poplib.error_proto, OSError):
                    pop.quit()
            collected.session_ids.append(session_id)
    for shape in ODD_SHAPES:
        user, password = new_user(dovecot)
        collected.users.append(user)
        add_odd_secrets(collected.secrets, user, password)
        collected.session_ids.append(odd_session(proxy, shape, user, password))
        collected.logins += shape.logs_in


async def follow_feed(url: str, collected: Collected, sessions_done: trio.Event) -> None:
    """Read ``/events`` until it has shown the end of every session (bounded in time)."""
    raw: list[bytes] = []
    with trio.fail_after(3 * TIMEOUT):
        async with open_websocket_url(url, connect_timeout=5, disconnect_timeout=2) as ws:
            while True:
                text = await ws.get_message()
                assert isinstance(text, str)
                raw.append(text.encode())
                collected.feed += [json.loads(line) for line in text.split("\n")]
                if sessions_done.is_set() and set(collected.session_ids) <= closed_in(
                    collected.feed
                ):
                    break
    collected.outputs["feed"] = b"\n".join(raw)


def closed_in(events: list[dict[str, Any]]) -> set[str]:
    return {str(e.get("session_id")) for e in events if e.get("event") == "session.closed"}


async def collect(proxy: ProxyProcess, dovecot: Dovecot, admin: str, collected: Collected) -> None:
    done = trio.Event()

    async def sessions() -> None:
        await trio.to_thread.run_sync(run_sessions, proxy, dovecot, collected)
        done.set()
        # The last session may already have been shown: one more session wakes the watcher.
        await trio.to_thread.run_sync(poke, proxy)

    async with trio.open_nursery() as nursery:
        # The watcher's first message is the snapshot: once it is in, it misses nothing.
        nursery.start_soon(follow_feed, f"ws://{admin}/events", collected, done)
        with trio.fail_after(TIMEOUT):
            while not collected.feed:  # noqa: ASYNC110 - polls the watcher task's list
                await trio.sleep(0.02)
        nursery.start_soon(sessions)


def poke(proxy: ProxyProcess) -> None:
    with session(proxy) as (pop, _session_id):
        pop.quit()


def http_get(admin: str, path: str) -> bytes:
    host, _, port = admin.rpartition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (path, response.status, body[:200])
        return body
    finally:
        connection.close()


def inventory_text(state: Path) -> bytes:
    """Every row of every table, and the database files' raw octets (free pages included)."""
    path = Path(database_path(state))
    rows: list[str] = []
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = [
            name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        for table in tables:
            rows += [f"{table}: {row!r}" for row in db.execute(f"SELECT * FROM {table}")]
    raw = b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))
    return "\n".join(rows).encode() + b"\n" + raw


def report(state: Path, fmt: str) -> bytes:
    done = subprocess.run(
        [sys.executable, "-m", "pop3proxy", "report", "--state-dir", str(state), "--format", fmt],
        capture_output=True,
        cwd=REPO_ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module", params=MODES)
def collected(
    request: pytest.FixtureRequest, dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory
) -> Collected:
    mode: str = request.param
    folder = tmp_path_factory.mktemp(f"sinks-{mode}")
    state = folder / "state"
    proxy = ProxyProcess(
        folder / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=[
            *SHARED_PROXY_ARGS,
            *("--log-level", "debug", "--admin", "127.0.0.1:0", "--state-dir", str(state)),
            *("--inventory-flush-interval", "0.2"),
        ],
        env={"POP3PROXY_USER_PSEUDONYM_KEY": PSEUDONYM_KEY} if mode == "pseudonyms" else {},
    )
    result = Collected(mode)
    proxy.start()
    try:
        admin = str(proxy.wait_for_event("admin.started")["address"])
        trio.run(collect, proxy, dovecot, admin, result)
        result.outputs["metrics"] = http_get(admin, "/metrics")
        result.outputs["summary"] = http_get(admin, "/api/summary")
    finally:
        status = proxy.stop()  # SIGINT: the inventory is written before the exit
    result.outputs["log"] = proxy.log_bytes()  # shutdown included
    assert status == 0, result.outputs["log"][-2000:]
    result.outputs["inventory"] = inventory_text(state)
    for fmt in ("table", "csv", "json"):
        result.outputs[f"report-{fmt}"] = report(state, fmt)
    return result


@pytest.mark.parametrize("sink", SINKS)
def test_no_secret_reaches_the_sink(collected: Collected, sink: str) -> None:
    found = leaks(collected.forbidden, collected.outputs[sink])
    assert not found, f"{sink} ({collected.mode}) shows:\n" + "\n".join(found)


@pytest.mark.parametrize("sink", SINKS)
def test_the_sink_shows_the_sessions(collected: Collected, sink: str) -> None:
    """The control: each sink saw these sessions, so a clean search above means something."""
    output, count = collected.outputs[sink], len(collected.session_ids)
    if sink == "log":
        logged = [json.loads(line) for line in output.splitlines() if line.startswith(b"{")]
        assert set(collected.session_ids) <= closed_in(logged)
    elif sink == "feed":
        assert set(collected.session_ids) <= closed_in(collected.feed)
    elif sink == "metrics":
        text = output.decode()
        assert "pop3proxy_sessions_closed_total" in text
        assert 'pop3proxy_logins_total{mechanism="USER",result="success"}' in text
    elif sink == "summary":
        summary = json.loads(output)
        assert sum(summary["sessions"]["closed"].values()) >= count
        assert summary["logins"]["success"] >= collected.logins
    elif sink == "inventory":
        assert b"clients: ('127.0.0.1'" in output
        users = [line for line in output.splitlines() if line.startswith(b"users: ")]
        assert users
        if collected.mode == "pseudonyms":
            assert all(line.startswith(b"users: ('u-") for line in users), users
    elif sink == "report-json":
        clients = {row["name"]: row for row in json.loads(output)["clients"]}
        assert clients["127.0.0.1"]["sessions"] >= count
    else:
        assert b"127.0.0.1" in output


def test_the_battery_is_as_large_as_it_says(collected: Collected) -> None:
    """Every flow twice, every odd shape once; each password in five forms, for eight sinks."""
    assert len(collected.session_ids) == 2 * len(FLOWS) + len(ODD_SHAPES)
    assert len(collected.secrets.forms) >= 5 * len(collected.session_ids)
    print(  # shown with -s: the size of the battery
        f"\n{collected.mode}: {len(collected.session_ids)} sessions, "
        f"{len(collected.forbidden)} forms, {len(SINKS)} sinks, "
        f"{len(collected.forbidden) * len(SINKS)} searches"
    )
