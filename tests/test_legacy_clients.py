"""Real legacy clients (fetchmail, getmail6) through the proxy against a real Dovecot.

The mailbox holds messages of 1 KiB, 64 KiB and 1 MiB with lines that start with dots and
8-bit bytes, plus a plain 7-bit one.

- fetchmail is configured to leave messages alone (no ``Received:`` of its own, no address
  rewriting, CRLF kept, see `tests.peers.clients`), so every delivery must equal the stored
  message byte for byte, in order.
- getmail6 rewrites what it delivers (LF endings, refolded headers, its own trace fields), so
  its deliveries through the proxy are compared with its deliveries over a direct POP3S
  connection to Dovecot: equal after removing exactly the three trace fields it prepends.

The clients cannot be told to connect from an address of their own, so a test finds its
session as the one opened after a mark it took before running the client (tests run one
after another), and reads its events once ``session.closed`` has delivered them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.peers.clients import (
    ClientMissingError,
    ClientRun,
    require_client,
    run_fetchmail,
    run_getmail,
    split_getmail_trace,
)
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory
from tests.peers.proxy import ProxyProcess

pytestmark = pytest.mark.slow

Event = dict[str, Any]


@pytest.fixture(scope="module", autouse=True)
def _clients_installed() -> None:
    for name in ("fetchmail", "getmail"):
        try:
            require_client(name)
        except ClientMissingError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def loaded_mailbox(mailbox: MailboxFactory, corpus: Sequence[bytes]) -> Mailbox:
    # Guard: the corpus must keep exercising dot-stuffing, 8-bit bytes and a large message.
    assert any(b"\r\n." in m for m in corpus)
    assert any(any(byte >= 0x80 for byte in m) for m in corpus)
    assert max(len(m) for m in corpus) >= 1024 * 1024
    return mailbox(list(corpus))


def login_session(proxy: ProxyProcess, since: int, user: str) -> tuple[Event, list[Event]]:
    """The one ``pop3.login`` of ``user`` logged after mark ``since``, and its whole session."""
    proxy.wait_for_event("pop3.login", lambda e: e.get("user") == user, since=since)
    logins = proxy.find_events("pop3.login", lambda e: e.get("user") == user, since=since)
    assert len(logins) == 1, logins
    session_id = str(logins[0]["session_id"])
    proxy.wait_session_closed(session_id)  # delivers its batched pop3.command lines
    return logins[0], proxy.session_events(session_id)


def only_session(proxy: ProxyProcess, since: int) -> list[Event]:
    """The events of the one session opened after mark ``since``, once it has closed."""
    proxy.wait_for_event("session.opened", since=since)
    opened = proxy.sessions_opened(since=since)
    assert len(opened) == 1, opened
    proxy.wait_session_closed(opened[0])
    return proxy.session_events(opened[0])


def retr_commands(session: list[Event]) -> list[Event]:
    return [e for e in session if e.get("event") == "pop3.command" and e.get("verb") == "RETR"]


def assert_no_password_logged(proxy: ProxyProcess, password: str) -> None:
    assert password.encode() not in proxy.log_bytes()


# -- fetchmail ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("auth", "mechanism"),
    [(None, "CRAM-MD5"), ("password", "USER")],
    ids=["auth-as-offered", "auth-password"],
)
def test_fetchmail_delivers_byte_identical_messages(
    proxy: ProxyProcess,
    loaded_mailbox: Mailbox,
    tmp_path: Path,
    auth: str | None,
    mechanism: str,
) -> None:
    since = proxy.mark()
    run = run_fetchmail(
        tmp_path,
        port=proxy.port,
        user=loaded_mailbox.user,
        password=loaded_mailbox.password,
        auth=auth,
    )
    assert run.returncode == 0, run.summary()
    assert len(run.messages) == len(loaded_mailbox.messages), run.summary()
    for number, (got, want) in enumerate(
        zip(run.messages, loaded_mailbox.messages, strict=True), start=1
    ):
        assert got == want, f"message {number} differs ({len(got)} vs {len(want)} bytes)"

    login, session = login_session(proxy, since, loaded_mailbox.user)
    assert login["result"] == "success", login
    assert login["mechanism"] == mechanism, login
    retrs = retr_commands(session)
    assert [e["args"] for e in retrs] == [[str(n)] for n in range(1, len(run.messages) + 1)]
    assert all(e["status"] == "+OK" for e in retrs), retrs
    assert not [e for e in session if e.get("verb") == "STLS"], "fetchmail sent STLS"
    assert_no_password_logged(proxy, loaded_mailbox.password)


def test_fetchmail_daily_poll_remembers_seen_messages(
    proxy: ProxyProcess, loaded_mailbox: Mailbox, tmp_path: Path
) -> None:
    """Without ``fetchall`` (a user's usual rc file) fetchmail asks ``LAST`` (RFC 1460, which
    Dovecot refuses) and then ``UIDL``: the first poll gets everything, the second nothing."""
    first_since = proxy.mark()
    first = run_fetchmail(
        tmp_path,
        port=proxy.port,
        user=loaded_mailbox.user,
        password=loaded_mailbox.password,
        fetchall=False,
    )
    assert first.returncode == 0, first.summary()
    assert first.messages == list(loaded_mailbox.messages), first.summary()
    _, first_session = login_session(proxy, first_since, loaded_mailbox.user)
    commands = [e for e in first_session if e.get("event") == "pop3.command"]
    assert [e["status"] for e in commands if e["verb"] == "LAST"] == ["-ERR"], commands
    assert [e["status"] for e in commands if e["verb"] == "UIDL"] == ["+OK"], commands
    assert len(retr_commands(first_session)) == len(loaded_mailbox.messages)

    second_since = proxy.mark()
    second = run_fetchmail(
        tmp_path,
        port=proxy.port,
        user=loaded_mailbox.user,
        password=loaded_mailbox.password,
        fetchall=False,
    )
    # fetchmail's exit status 1 means "no new mail".
    assert second.returncode == 1, second.summary()
    assert second.messages == [], second.summary()
    _, second_session = login_session(proxy, second_since, loaded_mailbox.user)
    assert not retr_commands(second_session), second_session
    uidl = [e for e in second_session if e.get("event") == "pop3.command" and e["verb"] == "UIDL"]
    assert [e["status"] for e in uidl] == ["+OK"], second_session


def test_fetchmail_without_sslproto_trips_on_stls(
    proxy: ProxyProcess, loaded_mailbox: Mailbox, tmp_path: Path
) -> None:
    """The trap: fetchmail >= 6.4 sends STLS unasked and gives up on the proxy's -ERR.

    ``sslproto ''`` in the rc file (the other fetchmail test) is the documented cure.
    """
    since = proxy.mark()
    run = run_fetchmail(
        tmp_path,
        port=proxy.port,
        user=loaded_mailbox.user,
        password=loaded_mailbox.password,
        sslproto_off=False,
    )
    assert run.returncode != 0, run.summary()
    assert run.messages == [], run.summary()
    assert "STLS" in run.output, run.summary()

    # fetchmail may be gone before the proxy has seen the end of the session: the STLS line
    # is delivered with its batch, at the latest by session.closed.
    session = only_session(proxy, since)
    stls = [e for e in session if e.get("event") == "pop3.command" and e.get("verb") == "STLS"]
    assert len(stls) == 1, session
    assert stls[0]["status"] == "-ERR", stls[0]
    assert not [e for e in session if e.get("event") == "pop3.login"], session
    assert not retr_commands(session), session
    assert_no_password_logged(proxy, loaded_mailbox.password)


# -- getmail6 ----------------------------------------------------------------------------------


def split_all(run: ClientRun) -> tuple[list[bytes], list[bytes], list[bytes]]:
    """(Received fields, other trace fields, message remainders sorted) of a getmail run."""
    received: list[bytes] = []
    other: list[bytes] = []
    rests: list[bytes] = []
    for message in run.messages:
        trace, rest = split_getmail_trace(message)
        received.append(trace.received)
        other += [trace.return_path, trace.delivered_to]
        rests.append(rest)
    return received, sorted(other), sorted(rests)


def message_ids(messages: Sequence[bytes]) -> list[bytes]:
    found = []
    for message in messages:
        header = message.replace(b"\r\n", b"\n").partition(b"\n\n")[0]
        ids = [
            line.partition(b":")[2].strip()
            for line in header.split(b"\n")
            if line.lower().startswith(b"message-id:")
        ]
        assert len(ids) == 1, header[:500]
        found.append(ids[0])
    return sorted(found)


def test_getmail_through_proxy_matches_direct_pop3s(
    proxy: ProxyProcess, dovecot: Dovecot, loaded_mailbox: Mailbox
) -> None:
    count = len(loaded_mailbox.messages)
    direct = run_getmail(
        port=dovecot.port,
        user=loaded_mailbox.user,
        password=loaded_mailbox.password,
        ssl_ca_file=dovecot.ca_pem_path,
    )
    assert direct.returncode == 0, direct.summary()
    assert len(direct.messages) == count, direct.summary()

    since = proxy.mark()
    proxied = run_getmail(
        port=proxy.port, user=loaded_mailbox.user, password=loaded_mailbox.password
    )
    assert proxied.returncode == 0, proxied.summary()
    assert len(proxied.messages) == count, proxied.summary()

    direct_received, direct_other, direct_rests = split_all(direct)
    proxied_received, proxied_other, proxied_rests = split_all(proxied)
    # Each Received field names the server getmail talked to, and how.
    for field in direct_received:
        assert f"(127.0.0.1:{dovecot.port})".encode() in field, field
        assert b" with POP3-SSL " in field, field
    for field in proxied_received:
        assert f"(127.0.0.1:{proxy.port})".encode() in field, field
        assert b" with POP3 " in field, field
    assert proxied_other == direct_other
    # The right messages (not, say, empty or truncated ones) ...
    assert message_ids(proxied_rests) == message_ids(loaded_mailbox.messages)
    # ... and through the proxy exactly what getmail makes of them over a direct connection.
    for got, want in zip(proxied_rests, direct_rests, strict=True):
        assert got == want, f"a delivery differs ({len(got)} vs {len(want)} bytes)"

    login, session = login_session(proxy, since, loaded_mailbox.user)
    assert login["result"] == "success", login
    assert login["mechanism"] == "USER", login
    retrs = retr_commands(session)
    assert sorted(e["args"][0] for e in retrs) == sorted(str(n) for n in range(1, count + 1))
    assert all(e["status"] == "+OK" for e in retrs), retrs
    assert_no_password_logged(proxy, loaded_mailbox.password)
