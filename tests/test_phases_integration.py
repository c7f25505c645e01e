"""Enforcement phases end to end: ``pop3proxy serve`` with rules in front of the real Dovecot.

Clients connect from different loopback addresses (127.0.0.2, 127.0.0.3, ...) so that one
proxy can show every phase at once: ``deny`` (refused with ``-ERR [SYS/PERM]`` before the
upstream is contacted), ``warn`` (relayed, with the notice after ``+OK``), rules with a
``from`` date in the past and in the future, a user-name rule deciding at login, the
dry-run mode, and a SIGHUP reload that changes a rule. The inventory records the verdicts
and ``pop3proxy report`` shows the phases.

The rules name those addresses, so many sessions of the shared proxy come from each: a test
finds its own by the client's address and port among the sessions opened after a mark it
took before connecting (``ProxyProcess.session_id_for``), never by rule or address alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import poplib
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.peers.dovecot import Dovecot, MailboxFactory
from tests.peers.proxy import ProxyProcess

_REPO_ROOT = Path(__file__).resolve().parents[1]
NOTICE = "plaintext POP3 ends soon: switch to port 995 with TLS"
CONFIG = f"""
inventory_flush_interval = 0.1

[[rules]]
name = "deny-two"
networks = ["127.0.0.2/32"]
phase = "deny"

[[rules]]
name = "warn-three"
networks = ["127.0.0.3/32"]
phase = "warn"
notice = "{NOTICE}"

[[rules]]
name = "future-cut"
networks = ["127.0.0.4/32"]
phase = "deny"
from = 2099-01-01

[[rules]]
name = "past-cut"
networks = ["127.0.0.5/32"]
phase = "deny"
from = 2020-01-01

[[rules]]
name = "blocked-users"
users = ["blocked-*"]
phase = "deny"
"""


class SourcePOP3(poplib.POP3):
    """poplib.POP3 from a chosen loopback source address."""

    def __init__(self, port: int, source: str, timeout: float = 10.0) -> None:
        self._source = source
        super().__init__("127.0.0.1", port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


class FirstLine(NamedTuple):
    line: bytes
    closed: bool
    #: The client's (address, port), for ``ProxyProcess.session_id_for``.
    client: tuple[str, int]


def first_line(port: int, source: str, timeout: float = 10.0) -> FirstLine:
    """The proxy's first line to a client from ``source``, and whether it then closed."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    ) as sock:
        client = sock.getsockname()
        data = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in data and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\n", 1)[0] + b"\n"
        closed = False
        if line.startswith(b"-ERR"):
            sock.settimeout(5.0)
            with contextlib.suppress(OSError):
                closed = sock.recv(4096) == b""
        else:
            with contextlib.suppress(OSError):
                sock.sendall(b"QUIT\r\n")
        return FirstLine(line, closed, client)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def start_proxy(
    dovecot: Dovecot, folder: Path, config: str, extra: list[str] | None = None
) -> ProxyProcess:
    folder.mkdir(parents=True, exist_ok=True)
    proxy = ProxyProcess(
        folder / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=[
            "--config",
            str(write_config(folder / "proxy.toml", config)),
            "--state-dir",
            str(folder / "state"),
            *(extra or []),
        ],
    )
    proxy.start()
    return proxy


@pytest.fixture(scope="module")
def phased(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """One proxy with the rules of :data:`CONFIG`."""
    proxy = start_proxy(dovecot, tmp_path_factory.mktemp("phases"), CONFIG)
    try:
        yield proxy
    finally:
        proxy.stop()


def verdicts(proxy: ProxyProcess, rule: str) -> list[dict[str, Any]]:
    return proxy.find_events("policy.verdict", lambda e: e.get("rule") == rule)


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def verdict_of(proxy: ProxyProcess, session_id: str) -> dict[str, Any]:
    """A session's ``policy.verdict`` at connect (logged before the greeting or refusal)."""
    return proxy.wait_for_event(
        "policy.verdict", lambda e: e.get("session_id") == session_id and e.get("user") is None
    )


def test_deny_refuses_before_the_upstream(phased: ProxyProcess) -> None:
    mark = phased.mark()
    line, closed, client = first_line(phased.port, "127.0.0.2")
    assert line.startswith(b"-ERR [SYS/PERM] ")
    assert b"995" in line
    assert b"TLS" in line
    assert closed
    session_id = phased.session_id_for(client, since=mark)
    event = verdict_of(phased, session_id)
    assert (event["rule"], event["action"], event["dry_run"]) == ("deny-two", "deny", False)
    phased.wait_session_closed(session_id)
    assert not [
        e
        for e in phased.session_events(session_id)
        if e["event"] in {"upstream.tls_established", "upstream.failed"}
    ]


def test_warn_relays_with_the_notice(phased: ProxyProcess, mailbox: MailboxFactory) -> None:
    box = mailbox([b"Subject: w\r\n\r\nwarned\r\n"])
    mark = phased.mark()
    pop = SourcePOP3(phased.port, "127.0.0.3")
    try:
        session_id = phased.session_id_for(pop, since=mark)
        welcome = pop.getwelcome().decode()
        pop.user(box.user)
        pop.pass_(box.password)
        assert pop.stat()[0] == 1
    finally:
        pop.quit()
    assert welcome.startswith("+OK")
    assert NOTICE in welcome
    phased.wait_session_closed(session_id)
    found = [e for e in phased.session_events(session_id) if e.get("event") == "policy.verdict"]
    # At connect, and again at login (the rule still applies to the user).
    assert [(e["rule"], e["action"], e["dry_run"], e["user"]) for e in found] == [
        ("warn-three", "warn", False, None),
        ("warn-three", "warn", False, box.user),
    ]


def test_from_date_rules(phased: ProxyProcess, mailbox: MailboxFactory) -> None:
    # Deny from 2099: not in force yet, so the session goes through unhindered.
    box = mailbox()
    mark = phased.mark()
    pop = SourcePOP3(phased.port, "127.0.0.4")
    try:
        future_session = phased.session_id_for(pop, since=mark)
        assert pop.getwelcome().startswith(b"+OK")
        pop.user(box.user)
        pop.pass_(box.password)
    finally:
        pop.quit()
    # Deny from 2020: in force.
    mark = phased.mark()
    line, closed, client = first_line(phased.port, "127.0.0.5")
    assert line.startswith(b"-ERR [SYS/PERM] ")
    assert closed
    past_session = phased.session_id_for(client, since=mark)
    assert verdict_of(phased, past_session)["rule"] == "past-cut"
    # Allowed sessions log no verdict; one would have come before the greeting.
    phased.wait_session_closed(future_session)
    future_events = phased.session_events(future_session)
    assert not [e for e in future_events if e.get("event") == "policy.verdict"], future_events
    assert not verdicts(phased, "future-cut")


def test_user_rule_denies_at_login_without_the_credential(
    phased: ProxyProcess, dovecot: Dovecot
) -> None:
    user, password = f"blocked-{secrets.token_hex(3)}", f"Pw-{secrets.token_hex(8)}"
    dovecot.add_user(user, password, [])
    pop = SourcePOP3(phased.port, "127.0.0.1")
    replies: list[bytes] = []
    try:
        assert pop.getwelcome().startswith(b"+OK")
        for command in (pop.user, pop.pass_):
            try:
                replies.append(command(user if command == pop.user else password))
            except poplib.error_proto as exc:
                replies.append(exc.args[0])
                break
    finally:
        with contextlib.suppress(OSError, poplib.error_proto):
            pop.quit()
        pop.close()  # quit() leaves the socket open when the proxy hung up first
    assert replies[-1].startswith(b"-ERR [SYS/PERM] ")
    event = phased.wait_for_event(
        "policy.verdict", lambda e: e.get("rule") == "blocked-users" and e.get("user") == user
    )
    assert event["action"] == "deny"
    assert not phased.find_events(
        "pop3.login", lambda e: e.get("user") == user and e.get("result") == "success"
    )
    assert f"user=<{user}>" not in dovecot.log_text()  # Dovecot never saw a login attempt


def test_inventory_and_report_show_the_phases(phased: ProxyProcess) -> None:
    # Sessions of the other tests (or of this one, when run alone).
    first_line(phased.port, "127.0.0.2")
    first_line(phased.port, "127.0.0.3")
    config = Path(phased.extra_args[1])
    state = Path(phased.extra_args[3])

    def report() -> dict[str, Any]:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pop3proxy",
                "report",
                "--config",
                str(config),
                "--state-dir",
                str(state),
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            cwd=_REPO_ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")},
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            return {}
        data: dict[str, Any] = json.loads(done.stdout)
        return {row["name"]: row for row in data["clients"]}

    def recorded() -> bool:
        rows = report()
        two, three = rows.get("127.0.0.2"), rows.get("127.0.0.3")
        return bool(two and three and two["denied"] >= 1 and three["warned"] >= 1)

    wait_for("the verdicts in the inventory", recorded)
    rows = report()
    assert (rows["127.0.0.2"]["phase"], rows["127.0.0.2"]["rule"]) == ("deny", "deny-two")
    assert rows["127.0.0.2"]["last_action"] == "deny"
    assert (rows["127.0.0.3"]["phase"], rows["127.0.0.3"]["rule"]) == ("warn", "warn-three")


def test_dry_run_logs_would_deny_and_relays(
    dovecot: Dovecot, mailbox: MailboxFactory, tmp_path: Path
) -> None:
    proxy = start_proxy(dovecot, tmp_path, CONFIG, ["--dry-run", "on"])
    try:
        box = mailbox()
        pop = SourcePOP3(proxy.port, "127.0.0.2")
        try:
            welcome = pop.getwelcome()
            pop.user(box.user)
            pop.pass_(box.password)
        finally:
            pop.quit()
        assert welcome.startswith(b"+OK")
        event = proxy.wait_for_event("policy.verdict", lambda e: e.get("rule") == "deny-two")
        assert event["dry_run"] is True
        assert event["action"] != "deny"
        assert proxy.find_events("upstream.tls_established")
    finally:
        proxy.stop()


def test_sighup_reload_changes_a_rule(dovecot: Dovecot, tmp_path: Path) -> None:
    proxy = start_proxy(dovecot, tmp_path, CONFIG)
    try:
        assert first_line(proxy.port, "127.0.0.3").line.startswith(b"+OK")
        write_config(
            tmp_path / "proxy.toml",
            CONFIG.replace('phase = "warn"', 'phase = "deny"').replace("warn-three", "deny-three"),
        )
        process = proxy._proc
        assert process is not None
        process.send_signal(signal.SIGHUP)

        def refused() -> bool:
            return first_line(proxy.port, "127.0.0.3").line.startswith(b"-ERR [SYS/PERM] ")

        wait_for("the reloaded rule to refuse 127.0.0.3", refused)
        assert proxy.running
        assert proxy.find_events("policy.verdict", lambda e: e.get("rule") == "deny-three")
        # The rule for 127.0.0.2 did not change.
        assert first_line(proxy.port, "127.0.0.2").line.startswith(b"-ERR [SYS/PERM] ")
    finally:
        proxy.stop()
