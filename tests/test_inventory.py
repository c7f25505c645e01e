"""The plaintext client inventory: the sink's aggregates, SQLite merging, and the real proxy.

The end-to-end test runs sessions from two loopback client addresses (127.0.0.2 and
127.0.0.3) and two users through ``pop3proxy serve`` to Dovecot, reads the rows back, and
then breaks the database under the running proxy (read-only, deleted) to show that
sessions go on and the inventory catches up once it can write again.
"""

from __future__ import annotations

import base64
import contextlib
import os
import poplib
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pop3proxy.migration.inventory import (
    DATABASE_NAME,
    Inventory,
    InventoryStore,
    database_path,
    default_state_dir,
)
from pop3proxy.migration.pseudonym import Pseudonymizer
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory
from tests.peers.proxy import ProxyProcess

NOW = "2026-05-04T10:00:00Z"


class SourcePOP3(poplib.POP3):
    """poplib.POP3 from a chosen loopback source address."""

    def __init__(self, host: str, port: int, source: str, timeout: float = 15.0) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


def feed(inventory: Inventory, events: list[tuple[str, dict[str, Any]]]) -> None:
    for event, fields in events:
        inventory.sink(event, "info", fields)


def session(
    sid: str, client: str, verbs: list[tuple[str, list[str]]], login: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = [
        ("session.opened", {"session_id": sid, "client": client, "listener": "x"})
    ]
    for verb, args in verbs:
        events.append(("pop3.command", {"session_id": sid, "verb": verb, "args": args}))
    if login is not None:
        events.append(("pop3.login", {"session_id": sid, **login}))
    events.append(
        (
            "session.closed",
            {"session_id": sid, "bytes_from_client": 40, "bytes_to_client": 400, "user": None},
        )
    )
    return events


# -- unit: the sink and the store ----------------------------------------------------------------


def test_sink_aggregates_and_fingerprints() -> None:
    inventory = Inventory(clock=lambda: NOW)
    feed(
        inventory,
        session(
            "a",
            "10.0.0.1:5000",
            [("CAPA", []), ("USER", ["alice"])],
            {"user": "alice", "mechanism": "USER", "result": "success"},
        )
        + session(
            "b",
            "[fd00::1]:6000",
            [("AUTH", ["PLAIN", "***"])],
            {"user": "bob", "mechanism": "PLAIN", "result": "failure"},
        )
        + session("c", "10.0.0.1:5001", [("CAPA", []), ("QUIT", [])], None),
    )
    batch = inventory.take()
    one, six = batch.clients["10.0.0.1"], batch.clients["fd00::1"]
    assert (one.sessions, one.logins_ok, one.logins_failed) == (2, 1, 0)
    assert one.fingerprints == {"CAPA,USER,PASS": 1}
    assert one.mechanisms == {"USER": 1}
    assert one.bytes_from_client == 80
    assert one.last_peer == "alice"
    assert (six.sessions, six.logins_failed) == (1, 1)
    assert six.fingerprints == {"AUTH PLAIN": 1}
    assert batch.users["bob"].last_peer == "fd00::1"
    assert batch.daily[("2026-05-04", "client", "10.0.0.1")] == 2
    assert batch.daily[("2026-05-04", "user", "alice")] == 1
    assert inventory.sessions == {}
    assert not inventory.take()


def test_sink_pseudonymises_users() -> None:
    pseudonymizer = Pseudonymizer(b"0123456789abcdef")
    inventory = Inventory(clock=lambda: NOW, pseudonymizer=pseudonymizer)
    feed(
        inventory,
        session(
            "a",
            "10.0.0.1:5000",
            [("USER", ["alice"])],
            {"user": "alice", "mechanism": "USER", "result": "success"},
        ),
    )
    batch = inventory.take()
    assert list(batch.users) == [pseudonymizer.pseudonym("alice")]
    assert batch.clients["10.0.0.1"].last_peer == pseudonymizer.pseudonym("alice")


def test_sink_is_bounded_and_never_raises() -> None:
    inventory = Inventory(clock=lambda: NOW, max_keys=3, max_sessions=2)
    for n in range(10):
        inventory.sink("session.opened", "info", {"session_id": f"s{n}", "client": f"10.0.0.{n}:1"})
    assert len(inventory.sessions) == 2
    assert inventory.batch.keys() <= 3
    assert inventory.batch.dropped > 0
    inventory.sink("pop3.login", "info", {"session_id": "s9", "mechanism": object()})
    inventory.sink("session.closed", "info", {"session_id": 5})
    inventory.sink("session.opened", "info", {"session_id": "x", "client": None})


def test_store_merges_batches_and_survives_deletion(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / DATABASE_NAME)
    store = InventoryStore(path)
    inventory = Inventory(clock=lambda: NOW)
    events = session(
        "a",
        "10.0.0.1:5000",
        [("USER", ["alice"])],
        {"user": "alice", "mechanism": "USER", "result": "success"},
    )
    feed(inventory, events)
    store.write(inventory.take())
    feed(inventory, [(e, {**f, "session_id": "b"}) for e, f in events])
    store.write(inventory.take())
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT sessions, logins_ok FROM clients").fetchall() == [(2, 2)]
        assert db.execute("SELECT sessions FROM fingerprints WHERE kind='user'").fetchall() == [
            (2,)
        ]
    os.unlink(path)
    feed(inventory, [(e, {**f, "session_id": "c"}) for e, f in events])
    store.write(inventory.take())
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT sessions FROM clients").fetchall() == [(1,)]
    store.close()


def test_paths() -> None:
    assert database_path(Path(":memory:")) == ":memory:"
    assert default_state_dir({"XDG_DATA_HOME": "/srv/data"}) == Path("/srv/data/pop3proxy")
    assert default_state_dir({}).parts[-3:] == (".local", "share", "pop3proxy")
    assert database_path(Path("/x")) == f"/x/{DATABASE_NAME}"


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def inventory_proxy(dovecot: Dovecot, tmp_path: Path) -> Iterator[tuple[ProxyProcess, Path]]:
    state = tmp_path / "state"
    proxy = ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=["--state-dir", str(state), "--inventory-flush-interval", "0.1"],
    )
    proxy.start()
    try:
        yield proxy, state / DATABASE_NAME
    finally:
        proxy.stop()


def login_session(
    port: int, source: str, box: Mailbox, *, capa: bool = False, password: str | None = None
) -> bool:
    """One USER/PASS session from ``source``; returns whether the login succeeded."""
    pop = SourcePOP3("127.0.0.1", port, source)
    try:
        if capa:
            pop.capa()
        pop.user(box.user)
        try:
            pop.pass_(password or box.password)
        except poplib.error_proto:
            return False
        pop.stat()
        return True
    finally:
        pop.quit()


def plain_session(port: int, source: str, box: Mailbox) -> None:
    pop = SourcePOP3("127.0.0.1", port, source)
    try:
        token = base64.b64encode(f"\0{box.user}\0{box.password}".encode()).decode()
        reply = pop._shortcmd(f"AUTH PLAIN {token}")  # type: ignore[attr-defined]
        assert reply.startswith(b"+OK")
        pop.stat()
    finally:
        pop.quit()


def query(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return db.execute(sql, params).fetchall()


def wait_until(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            if condition():
                return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_inventory_through_the_proxy(
    inventory_proxy: tuple[ProxyProcess, Path], mailbox: MailboxFactory
) -> None:
    proxy, db = inventory_proxy
    alice, bob = mailbox([b"Subject: a\r\n\r\nhi\r\n"]), mailbox()
    assert login_session(proxy.port, "127.0.0.2", alice, capa=True)
    assert login_session(proxy.port, "127.0.0.2", alice)
    plain_session(proxy.port, "127.0.0.3", bob)
    assert not login_session(proxy.port, "127.0.0.3", bob, password="Wrong-password-1")

    # session.closed is each session's last event: once the stored bytes agree with the
    # proxy's own session.closed lines, every event of the four sessions is in.
    deadline = time.monotonic() + 10
    while len(proxy.find_events("session.closed")) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    opened = {
        e["session_id"]: e["client"].rpartition(":")[0] for e in proxy.find_events("session.opened")
    }
    expected: dict[str, int] = {}
    for event in proxy.find_events("session.closed"):
        client = opened[event["session_id"]]
        expected[client] = expected.get(client, 0) + event["bytes_to_client"]
    assert set(expected) == {"127.0.0.2", "127.0.0.3"}
    wait_until(
        "the sessions' bytes in the inventory",
        lambda: dict(query(db, "SELECT address, bytes_to_client FROM clients")) == expected,
    )
    clients = {
        row[0]: row[1:]
        for row in query(
            db,
            "SELECT address, sessions, logins_ok, logins_failed, last_peer FROM clients",
        )
    }
    assert clients == {
        "127.0.0.2": (2, 2, 0, alice.user),
        "127.0.0.3": (2, 1, 1, bob.user),
    }
    users = {
        row[0]: row[1:]
        for row in query(
            db, "SELECT user, sessions, logins_ok, logins_failed, last_peer FROM users"
        )
    }
    assert users == {alice.user: (2, 2, 0, "127.0.0.2"), bob.user: (2, 1, 1, "127.0.0.3")}
    fingerprints = set(query(db, "SELECT kind, key, fingerprint, sessions FROM fingerprints"))
    assert fingerprints == {
        ("client", "127.0.0.2", "CAPA,USER,PASS", 1),
        ("client", "127.0.0.2", "USER,PASS", 1),
        ("client", "127.0.0.3", "AUTH PLAIN", 1),
        ("client", "127.0.0.3", "USER,PASS", 1),
        ("user", alice.user, "CAPA,USER,PASS", 1),
        ("user", alice.user, "USER,PASS", 1),
        ("user", bob.user, "AUTH PLAIN", 1),
        ("user", bob.user, "USER,PASS", 1),
    }
    mechanisms = set(query(db, "SELECT kind, key, mechanism, uses FROM mechanisms"))
    assert ("client", "127.0.0.3", "PLAIN", 1) in mechanisms
    assert ("client", "127.0.0.3", "USER", 1) in mechanisms
    assert ("user", alice.user, "USER", 2) in mechanisms
    days = query(db, "SELECT kind, count(*), sum(sessions) FROM daily GROUP BY kind ORDER BY kind")
    assert days == [("client", 2, 4), ("user", 2, 4)]


def _make_read_only(path: Path) -> Callable[[], None]:
    """Make ``path`` unwritable even for root; returns the undo. Skips if impossible."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        return lambda: path.chmod(0o644)
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot make a file read-only as root here: {done.stderr!r}")

    def undo() -> None:
        subprocess.run(["chattr", "-i", str(path)], check=True)

    return undo


def test_proxy_keeps_relaying_when_the_database_breaks(
    inventory_proxy: tuple[ProxyProcess, Path], mailbox: MailboxFactory
) -> None:
    proxy, db = inventory_proxy
    box = mailbox([b"Subject: x\r\n\r\nbody\r\n"])
    assert login_session(proxy.port, "127.0.0.2", box)
    wait_until("the first session", lambda: query(db, "SELECT sessions FROM clients") == [(1,)])

    undo = _make_read_only(db)
    try:
        assert login_session(proxy.port, "127.0.0.2", box)
        assert login_session(proxy.port, "127.0.0.3", box)
        failed = proxy.wait_for_event("inventory.write_failed", timeout=10)
        assert failed["level"] == "warning"
        assert str(db) in failed["path"]
    finally:
        undo()
    # Writable again: the kept batch is written with the next one.
    proxy.wait_for_event("inventory.write_recovered", timeout=10)
    wait_until(
        "the kept sessions", lambda: query(db, "SELECT sum(sessions) FROM clients") == [(3,)]
    )

    db.unlink()
    assert login_session(proxy.port, "127.0.0.3", box)
    wait_until(
        "a recreated database",
        lambda: (
            db.exists() and query(db, "SELECT address, sessions FROM clients") == [("127.0.0.3", 1)]
        ),
    )
    assert proxy.running
    warnings = proxy.find_events("inventory.write_failed")
    assert all(e["level"] == "warning" for e in warnings)
    assert not proxy.find_events("session.error")
