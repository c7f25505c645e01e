"""The plaintext client inventory: the sink's aggregates, SQLite merging, and the real proxy.

The end-to-end test runs sessions from two loopback client addresses (127.0.0.2 and
127.0.0.3) and two users through ``pop3proxy serve`` to Dovecot, reads the rows back, and
then breaks the database under the running proxy (read-only, deleted) to show that
sessions go on and the inventory catches up once it can write again.
"""

from __future__ import annotations

import base64
import concurrent.futures
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
    MAX_FAILED_NAMES,
    Inventory,
    InventoryStore,
    Tally,
    database_path,
    default_state_dir,
)
from pop3proxy.migration.pseudonym import Pseudonymizer
from pop3proxy.telemetry import Telemetry
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
    assert six.failed_names == {"bob": (1, NOW)}
    assert list(batch.users) == ["alice"]  # bob never logged in
    assert batch.users["alice"].last_peer == "10.0.0.1"
    assert batch.daily[("2026-05-04", "client", "10.0.0.1")] == 2
    assert batch.daily[("2026-05-04", "user", "alice")] == 1
    assert inventory.sessions == {}
    assert not inventory.take()


def keyed(
    inventory: Inventory, key: bytes = b"0123456789abcdef"
) -> tuple[Telemetry, Pseudonymizer]:
    """The inventory behind the telemetry fan-out with a pseudonym key, as ``serve`` runs it."""
    pseudonymizer = Pseudonymizer(key)
    return Telemetry([inventory.sink], transform=pseudonymizer.event_fields), pseudonymizer


def publish(telemetry: Telemetry, events: list[tuple[str, dict[str, Any]]]) -> None:
    for event, fields in events:
        telemetry.publish(event, "info", dict(fields))


def test_users_are_pseudonymised_once_on_the_way_in() -> None:
    inventory = Inventory(clock=lambda: NOW)
    telemetry, pseudonymizer = keyed(inventory)
    publish(
        telemetry,
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


def test_a_pseudonym_sent_as_a_name_is_pseudonymised_like_any_name() -> None:
    """USER <alice's pseudonym> with a wrong password leaves alice's row alone."""
    inventory = Inventory(clock=lambda: NOW)
    telemetry, pseudonymizer = keyed(inventory)
    alice = pseudonymizer.pseudonym("alice")
    ok = {"user": "alice", "mechanism": "USER", "result": "success"}
    publish(telemetry, session("a", "10.0.0.1:5000", [("USER", ["alice"])], ok))
    for n, mechanism in enumerate(("USER", "APOP", "PLAIN", "XOAUTH2")):
        spoof = {"user": alice, "mechanism": mechanism, "result": "failure"}
        publish(telemetry, session(f"s{n}", "10.0.0.66:5000", [], spoof))
    batch = inventory.take()
    assert list(batch.users) == [alice]
    assert (batch.users[alice].logins_ok, batch.users[alice].logins_failed) == (1, 0)
    spoofer = batch.clients["10.0.0.66"]
    assert spoofer.logins_failed == 4
    assert list(spoofer.failed_names) == [pseudonymizer.pseudonym(alice)]
    assert pseudonymizer.user(alice) != alice


def junk_sessions(count: int, client: str = "10.0.0.9") -> list[tuple[str, dict[str, Any]]]:
    """``count`` distinct never-authenticated names, through every way a name arrives."""
    mechanisms = ("USER", "APOP", "PLAIN", "XOAUTH2", "CRAM-MD5")
    events: list[tuple[str, dict[str, Any]]] = []
    for n in range(count):
        sid, name = f"junk{n}", f"junk-{n}"
        events.append(("session.opened", {"session_id": sid, "client": f"{client}:{n + 1}"}))
        events.append(("pop3.command", {"session_id": sid, "verb": "USER", "args": [name]}))
        verdict = {"session_id": sid, "action": "warn", "rule": "r", "dry_run": n % 2 == 0}
        events.append(("policy.verdict", {**verdict, "user": name}))
        if n % 3 == 0:  # refused at USER, before the upstream saw a credential
            refused = {"action": "deny", "reason": "phase", "rule": "r", "dry_run": False}
            events.append(("policy.verdict", {"session_id": sid, **refused, "user": name}))
        else:
            result = "cancelled" if n % 3 == 1 and n % 2 else "failure"
            mechanism = mechanisms[n % len(mechanisms)]
            login = {"session_id": sid, "user": name, "mechanism": mechanism, "result": result}
            events.append(("pop3.login", login))
        closed = {"session_id": sid, "user": name, "bytes_from_client": 10, "bytes_to_client": 9}
        events.append(("session.closed", closed))
    return events


def test_unauthenticated_names_create_no_user_rows(tmp_path: Path) -> None:
    """500 distinct junk names: one client row, no user row, five failed names kept."""
    inventory = Inventory(clock=lambda: NOW)
    store = InventoryStore(str(tmp_path / DATABASE_NAME))
    events = junk_sessions(500)
    for start in range(0, len(events), 700):  # several batches: the store's cap holds too
        feed(inventory, events[start : start + 700])
        batch = inventory.take()
        assert batch.users == {}
        assert not [key for key in batch.daily if key[1] == "user"]
        assert len(batch.clients["10.0.0.9"].failed_names) <= MAX_FAILED_NAMES
        store.write(batch)
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        assert db.execute("SELECT count(*) FROM users").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM mechanisms WHERE kind = 'user'").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM fingerprints WHERE kind = 'user'").fetchone() == (
            0,
        )
        assert db.execute("SELECT count(*) FROM daily WHERE kind = 'user'").fetchone() == (0,)
        assert db.execute(
            "SELECT sessions, logins_ok, logins_failed, denied FROM clients"
        ).fetchall() == [(500, 0, 333, 167)]
        names = db.execute("SELECT user, attempts FROM failed_names ORDER BY user").fetchall()
    assert names == [(f"junk-{n}", 1) for n in range(495, 500)]
    store.close()


def test_failed_names_keep_the_most_recent_per_client() -> None:
    tally = Tally(first_seen=NOW, last_seen=NOW)
    for name in ["a", "b", "c", "a", "d", "e", "f", "g"]:
        tally.failed_name(name, NOW)
    assert list(tally.failed_names) == ["a", "d", "e", "f", "g"]
    newer = Tally(first_seen=NOW, last_seen=NOW)
    newer.failed_name("c", "2026-05-04T11:00:00Z")
    newer.failed_name("g", "2026-05-04T11:00:00Z")
    newer.merge_older(tally)
    assert list(newer.failed_names.items()) == [
        ("d", (1, NOW)),
        ("e", (1, NOW)),
        ("f", (1, NOW)),
        ("c", (1, "2026-05-04T11:00:00Z")),
        ("g", (2, "2026-05-04T11:00:00Z")),
    ]


def test_a_login_proves_the_name_and_its_verdicts(tmp_path: Path) -> None:
    """A user row comes with the first successful login; then its failures count there too."""
    inventory = Inventory(clock=lambda: NOW)
    fail = {"user": "alice", "mechanism": "USER", "result": "failure"}
    feed(inventory, session("a", "10.0.0.1:1", [("USER", ["alice"])], fail))
    assert inventory.batch.users == {}
    verdict = {"session_id": "b", "action": "warn", "rule": "nag", "dry_run": False}
    ok = {"user": "alice", "mechanism": "PLAIN", "result": "success"}
    feed(inventory, [("session.opened", {"session_id": "b", "client": "10.0.0.2:1"})])
    feed(inventory, [("policy.verdict", {**verdict, "user": "alice"})])
    feed(inventory, session("b", "10.0.0.2:1", [("AUTH", ["PLAIN", "***"])], ok)[1:])
    feed(inventory, session("c", "10.0.0.3:1", [("USER", ["alice"])], fail))
    batch = inventory.take()
    alice = batch.users["alice"]
    assert (alice.sessions, alice.logins_ok, alice.logins_failed) == (1, 1, 1)
    assert (alice.warned, alice.last_action, alice.last_rule) == (1, "warn", "nag")
    assert alice.last_peer == "10.0.0.2"  # the failure from 10.0.0.3 does not move it
    assert alice.fingerprints == {"AUTH PLAIN": 1}
    assert alice.bytes_to_client == 400
    assert batch.clients["10.0.0.3"].failed_names == {"alice": (1, NOW)}

    # A restarted proxy knows alice from the database.
    store = InventoryStore(str(tmp_path / DATABASE_NAME))
    store.write(batch)
    restarted = Inventory(clock=lambda: NOW)
    restarted.know_users(store.known_users())
    assert restarted.known_users == {"alice"}
    feed(restarted, session("d", "10.0.0.3:2", [("USER", ["alice"])], fail))
    feed(restarted, session("e", "10.0.0.3:3", [("USER", ["bob"])], {**fail, "user": "bob"}))
    assert list(restarted.batch.users) == ["alice"]
    assert restarted.batch.users["alice"].logins_failed == 1
    store.close()


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
    # bob's failed session is not one of his sessions, but it is his failure: he had
    # logged in before (a name that never logged in gets no row at all).
    assert users == {alice.user: (2, 2, 0, "127.0.0.2"), bob.user: (1, 1, 1, "127.0.0.3")}
    fingerprints = set(query(db, "SELECT kind, key, fingerprint, sessions FROM fingerprints"))
    assert fingerprints == {
        ("client", "127.0.0.2", "CAPA,USER,PASS", 1),
        ("client", "127.0.0.2", "USER,PASS", 1),
        ("client", "127.0.0.3", "AUTH PLAIN", 1),
        ("client", "127.0.0.3", "USER,PASS", 1),
        ("user", alice.user, "CAPA,USER,PASS", 1),
        ("user", alice.user, "USER,PASS", 1),
        ("user", bob.user, "AUTH PLAIN", 1),
    }
    mechanisms = set(query(db, "SELECT kind, key, mechanism, uses FROM mechanisms"))
    assert ("client", "127.0.0.3", "PLAIN", 1) in mechanisms
    assert ("client", "127.0.0.3", "USER", 1) in mechanisms
    assert ("user", alice.user, "USER", 2) in mechanisms
    assert ("user", bob.user, "USER", 1) in mechanisms
    days = query(db, "SELECT kind, count(*), sum(sessions) FROM daily GROUP BY kind ORDER BY kind")
    assert days == [("client", 2, 4), ("user", 2, 3)]
    assert query(db, "SELECT address, user, attempts FROM failed_names") == [
        ("127.0.0.3", bob.user, 1)
    ]


#: Refused names in the end-to-end bound test, three per session (``max_login_failures``).
REFUSED_NAMES = 100


def test_refused_names_through_the_proxy_create_no_user_rows(
    dovecot: Dovecot, mailbox: MailboxFactory, tmp_path: Path
) -> None:
    """100 distinct names refused by Dovecot: no user row, five names kept for the client."""
    state = tmp_path / "state"
    db = state / DATABASE_NAME
    box = mailbox()
    args = ["--state-dir", str(state), "--inventory-flush-interval", "0.1"]
    # No per-client lock-out or delay: all 100 must reach Dovecot, and quickly.
    args += ["--client-login-failures", "1000", "--login-failure-delay", "0"]
    with ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=args,
    ) as proxy:
        assert login_session(proxy.port, "127.0.0.2", box)
        names = [f"junk-{n}" for n in range(REFUSED_NAMES)]

        def refused(chunk: list[str]) -> list[bytes]:
            pop = SourcePOP3("127.0.0.1", proxy.port, "127.0.0.3")
            replies = []
            try:
                for name in chunk:
                    pop.user(name)
                    with pytest.raises(poplib.error_proto) as refusal:
                        pop.pass_("Wrong-password-1")
                    replies.append(refusal.value.args[0])
            finally:
                with contextlib.suppress(OSError, poplib.error_proto):
                    pop.quit()
                pop.close()
            return replies

        # Dovecot takes about 0.5 s to refuse a password: ten sessions at a time.
        with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
            chunks = [names[start : start + 3] for start in range(0, len(names), 3)]
            replies = [reply for done in pool.map(refused, chunks) for reply in done]
        assert len(replies) == REFUSED_NAMES
        assert all(reply.startswith(b"-ERR") for reply in replies)
        wait_until(
            "every refused login in the inventory",
            lambda: (
                query(db, "SELECT logins_failed FROM clients WHERE address = '127.0.0.3'")
                == [(REFUSED_NAMES,)]
            ),
            timeout=30,
        )
        failures = proxy.find_events("pop3.login", lambda e: e.get("result") == "failure")
        assert len(failures) == REFUSED_NAMES
    assert query(db, "SELECT user, logins_ok, logins_failed FROM users") == [(box.user, 1, 0)]
    assert query(db, "SELECT count(*) FROM daily WHERE kind = 'user'") == [(1,)]
    kept = query(db, "SELECT user FROM failed_names WHERE address = '127.0.0.3'")
    assert len(kept) == MAX_FAILED_NAMES
    assert {name for (name,) in kept} <= set(names)


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
