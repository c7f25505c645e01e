"""Faults: each is answered and logged, other sessions go on, and the proxy keeps serving.

Upstream faults run against a scripted fake POP3S server (`tests.peers.faulty_upstream`):
connection 1 is a well-behaved *bystander* session opened before the fault, connection 2 is
the fault, and connection 3 is a *follow-up* session through the same proxy process, which
must work from greeting to QUIT. Client faults (hostile bytes, a client vanishing mid-RETR,
slowloris, a flood of pipelined commands) run against the real Dovecot, again with a
bystander session that must still work afterwards and a fresh session that must log in.

Timers are made short through the proxy's own settings (``--idle-timeout 1``...), so every
wait here is bounded by a second or two; there are no fixed sleeps beyond a client's pacing.
A short timer must not race a test's own steps: where one applies to every session (idle,
lifetime), the test needs no reply before it fires and checks that the proxy still serves
with :func:`still_serves` rather than a whole login; timers that only run in the fault's
own state (a greeting not yet sent, a half-close) leave the other sessions alone.
TLS failures (bad certificates, old versions) are in ``tests/test_tls_negative.py``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import socket
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trustme

from pop3proxy.tls import _connect_reason
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory, make_message
from tests.peers.faulty_upstream import (
    GREETING,
    MESSAGE,
    FaultyUpstream,
    Script,
    close_after_handshake,
    close_before_reply,
    close_mid_greeting,
    close_mid_retr,
    close_while_idle,
    dot_stuff,
    hold_after,
    never_greet,
    never_handshake,
    quit_without_notify,
    serve_normally,
)
from tests.peers.proxy import Event, ProxyProcess
from tests.peers.tls_servers import refused_port

SERVER_NAME = "pop.test"
CLIENT_TIMEOUT = 10.0
#: The most a client here reads before deciding the proxy misbehaves.
MAX_READ = 64 * 1024 * 1024
FAKE_USER = b"fault-user"
FAKE_PASSWORD = b"fault-password"


# -- a blocking POP3 client -----------------------------------------------------------------------


class Client:
    """A plain POP3 client on a blocking socket; every read is bounded by ``timeout``."""

    def __init__(self, port: int, *, timeout: float = CLIENT_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.local_port = int(self.sock.getsockname()[1])
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(256 * 1024)
        self.buffer += chunk
        return bool(chunk)

    def line(self) -> bytes:
        """The next line, CRLF included; raises EOFError if the proxy closes first."""
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > MAX_READ or not self._fill():
                raise EOFError(f"closed before a full line; have {self.buffer[-200:]!r}")
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def multiline(self) -> bytes:
        """The rest of a multi-line reply up to and including its ``.`` line."""
        while b"\r\n.\r\n" not in self.buffer:
            if len(self.buffer) > MAX_READ or not self._fill():
                raise EOFError(f"closed inside a multi-line reply; have {self.buffer[-200:]!r}")
        body, _, self.buffer = self.buffer.partition(b"\r\n.\r\n")
        return body + b"\r\n.\r\n"

    def read_to_eof(self) -> tuple[bytes, str]:
        """Everything until the proxy closes, and how: ``"eof"``, ``"reset"`` or ``"timeout"``."""
        how = "eof"
        while len(self.buffer) <= MAX_READ:
            try:
                if not self._fill():
                    break
            except ConnectionResetError:
                how = "reset"
                break
            except TimeoutError:
                how = "timeout"
                break
        data, self.buffer = self.buffer, b""
        return data, how

    def reset(self) -> None:
        """Abort the connection: RST instead of FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


# -- log checks -----------------------------------------------------------------------------------


def closed_event(proxy: ProxyProcess, client: Client, timeout: float = 10.0) -> Event:
    return proxy.wait_session_closed(proxy.session_id_for(client.local_port), timeout=timeout)


def events_named(proxy: ProxyProcess, session_id: str, name: str) -> list[Event]:
    return [e for e in proxy.session_events(session_id) if e.get("event") == name]


def still_serves(proxy: ProxyProcess) -> None:
    """A new client is accepted and gets its verified upstream connection (no reply needed
    in time, so this cannot race a short timer of the proxy under test)."""
    with Client(proxy.port) as client:
        session_id = proxy.session_id_for(client.local_port)
        proxy.wait_for_event("upstream.tls_established", lambda e: e["session_id"] == session_id)


def assert_no_crash(proxy: ProxyProcess) -> None:
    """No session hit the error boundary and nothing printed a traceback."""
    assert proxy.running, proxy.log_text()[-3000:]
    assert proxy.find_events("session.error") == [], proxy.find_events("session.error")
    assert "Traceback" not in proxy.log_text(), proxy.log_text()[-3000:]
    internal = proxy.find_events("session.closed", lambda e: e.get("reason") == "internal_error")
    assert internal == [], internal


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_pem(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def upstream_cert(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(SERVER_NAME, "127.0.0.1")


@pytest.fixture(scope="module")
def relay(dovecot: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """A proxy of this module's own in front of the real Dovecot (default timers)."""
    process = ProxyProcess(
        tmp_path_factory.mktemp("faults-relay") / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def proxy_for(
    tmp_path: Path,
    upstream_port: int,
    ca_file: Path,
    extra_args: Sequence[str] = (),
    *,
    upstream_host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
) -> Iterator[ProxyProcess]:
    process = ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=upstream_port,
        upstream_host=upstream_host,
        ca_file=ca_file,
        server_name=SERVER_NAME,
        extra_args=extra_args,
        env=env,
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@contextlib.contextmanager
def faulty(
    tmp_path: Path,
    cert: trustme.LeafCert,
    ca_pem: Path,
    scripts: Sequence[Script],
    extra_args: Sequence[str] = (),
) -> Iterator[tuple[FaultyUpstream, ProxyProcess]]:
    with (
        FaultyUpstream(cert, scripts, io_timeout=5.0, lifetime=60.0) as upstream,
        proxy_for(tmp_path, upstream.port, ca_pem, extra_args) as proxy,
    ):
        yield upstream, proxy


# -- sessions that must work ----------------------------------------------------------------------


def fake_login(client: Client) -> None:
    assert client.line() == GREETING
    assert client.command(b"USER " + FAKE_USER).startswith(b"+OK")
    assert client.command(b"PASS " + FAKE_PASSWORD).startswith(b"+OK")


def fake_session_works(proxy: ProxyProcess) -> None:
    """A whole session through ``proxy`` to the (by now well-behaved) fake upstream."""
    with Client(proxy.port) as client:
        fake_login(client)
        assert client.command(b"STAT") == b"+OK 1 %d\r\n" % len(MESSAGE)
        assert client.command(b"RETR 1") == b"+OK %d octets\r\n" % len(MESSAGE)
        assert client.multiline() == dot_stuff(MESSAGE)
        assert client.command(b"QUIT") == b"+OK bye\r\n"
        assert client.read_to_eof() == (b"", "eof")
        assert closed_event(proxy, client)["reason"] == "quit"


def dovecot_login(client: Client, box: Mailbox) -> None:
    assert client.line().startswith(b"+OK"), "no greeting"
    assert client.command(b"USER " + box.user.encode()).startswith(b"+OK")
    assert client.command(b"PASS " + box.password.encode()).startswith(b"+OK")


def dovecot_session_works(proxy: ProxyProcess, box: Mailbox) -> None:
    """A fresh session through ``proxy`` to Dovecot: login, STAT, RETR 1, QUIT."""
    with Client(proxy.port) as client:
        dovecot_login(client, box)
        assert client.command(b"STAT").startswith(b"+OK %d " % len(box.messages))
        assert client.command(b"RETR 1").startswith(b"+OK")
        assert client.multiline() == dot_stuff(box.messages[0])
        assert client.command(b"QUIT").startswith(b"+OK")
        assert client.read_to_eof()[0] == b""
        assert closed_event(proxy, client)["reason"] == "quit"


@contextlib.contextmanager
def dovecot_bystander(proxy: ProxyProcess, box: Mailbox) -> Iterator[None]:
    """A session logged in before the fault that must still work after it."""
    with Client(proxy.port) as client:
        dovecot_login(client, box)
        yield
        assert client.command(b"STAT").startswith(b"+OK %d " % len(box.messages))
        assert client.command(b"RETR 1").startswith(b"+OK")
        assert client.multiline() == dot_stuff(box.messages[0])
        assert client.command(b"QUIT").startswith(b"+OK")
        assert closed_event(proxy, client)["reason"] == "quit"


@pytest.fixture
def small_box(mailbox: MailboxFactory) -> Mailbox:
    return mailbox([make_message(2048, subject="fault bystander")])


# -- upstream refuses, does not answer, cannot be resolved ----------------------------------------


def assert_refused_with(proxy: ProxyProcess, reason: str, phase: str) -> None:
    """A client gets ``-ERR [SYS/TEMP]`` and EOF; the log says why."""
    with Client(proxy.port) as client:
        data, how = client.read_to_eof()
        assert data.startswith(b"-ERR [SYS/TEMP]"), data
        assert data.count(b"\r\n") == 1, data
        assert how in {"eof", "reset"}, how
        session_id = proxy.session_id_for(client.local_port)
        closed = proxy.wait_session_closed(session_id)
    failed = events_named(proxy, session_id, "upstream.failed")
    assert [(e["reason"], e["phase"]) for e in failed] == [(reason, phase)], failed
    assert failed[0]["level"] == "warning", failed
    assert failed[0]["error"], failed
    assert closed["reason"] == "upstream_failed", closed


def test_upstream_refuses(tmp_path: Path, ca_pem: Path) -> None:
    with refused_port() as sock, proxy_for(tmp_path, sock.getsockname()[1], ca_pem) as proxy:
        assert_refused_with(proxy, "refused", "connect")
        assert_refused_with(proxy, "refused", "connect")  # the listener goes on answering
        assert_no_crash(proxy)


def test_upstream_does_not_answer_connect(tmp_path: Path, ca_pem: Path) -> None:
    """A port whose accept queue is full drops SYNs, like a black-holed host: the connect
    timer fires, the client is answered."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        filler = stack.enter_context(socket.socket())
        filler.settimeout(2.0)
        filler.connect(("127.0.0.1", port))  # fills the queue of one; later SYNs are dropped
        proxy = stack.enter_context(proxy_for(tmp_path, port, ca_pem, ["--connect-timeout", "0.5"]))
        started = time.monotonic()
        assert_refused_with(proxy, "timeout", "connect")
        assert time.monotonic() - started < 5.0
        assert_refused_with(proxy, "timeout", "connect")
        assert_no_crash(proxy)


def test_upstream_never_completes_handshake(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path
) -> None:
    with faulty(
        tmp_path, upstream_cert, ca_pem, [never_handshake], ["--handshake-timeout", "0.5"]
    ) as (upstream, proxy):
        assert_refused_with(proxy, "timeout", "handshake")
        assert upstream.wait_finished(1).peer_closed  # the proxy hung up on it
        fake_session_works(proxy)
        assert_no_crash(proxy)


def test_upstream_name_does_not_resolve(tmp_path: Path, ca_pem: Path) -> None:
    """``.invalid`` never resolves (RFC 6761). ``RES_OPTIONS=attempts:0`` makes the C
    resolver of the proxy process fail without sending any query, so nothing leaves loopback
    (/etc/hosts is still read first)."""
    with proxy_for(
        tmp_path,
        995,
        ca_pem,
        upstream_host="nonexistent.invalid",
        env={"RES_OPTIONS": "attempts:0"},
    ) as proxy:
        assert_refused_with(proxy, "dns", "connect")
        assert_refused_with(proxy, "dns", "connect")
        assert_no_crash(proxy)


def connect_error(*errnos: int) -> OSError:
    """What ``trio.open_tcp_stream`` raises when every address failed: one OSError whose
    cause is the group of per-address errors."""
    group = ExceptionGroup("all failed", [OSError(code, os.strerror(code)) for code in errnos])
    error = OSError("all attempts to connect failed")
    error.__cause__ = group
    return error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (connect_error(errno.EMFILE), "local_resources"),
        (connect_error(errno.ENFILE, errno.ENFILE), "local_resources"),
        (connect_error(errno.ENOBUFS), "local_resources"),
        (connect_error(errno.EMFILE, errno.ECONNREFUSED), "local_resources"),  # no socket()
        (connect_error(errno.EADDRNOTAVAIL), "local_resources"),  # no local port left
        (connect_error(errno.EADDRNOTAVAIL, errno.ECONNREFUSED), "refused"),
        (connect_error(errno.ECONNREFUSED), "refused"),
        (connect_error(errno.ETIMEDOUT), "timeout"),
        (connect_error(errno.EHOSTUNREACH, errno.ENETUNREACH), "unreachable"),
        (OSError(errno.EMFILE, "Too many open files"), "local_resources"),  # getaddrinfo
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "dns"),
    ],
)
def test_connect_failures_name_the_proxy_s_own_shortage(error: OSError, reason: str) -> None:
    """Out of descriptors (or kernel memory, or local ports), the connect fails here, not at
    the mail server: it must never be reported as an unreachable upstream."""
    assert _connect_reason(error) == reason


# -- upstream closes at the wrong moment ----------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [close_mid_greeting, close_after_handshake],
    ids=["half-a-greeting", "no-greeting"],
)
def test_upstream_closes_before_the_greeting_is_complete(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path, script: Script
) -> None:
    """The client has received nothing yet: it must be answered ``-ERR [SYS/TEMP]`` (not a
    silent close, and never the half greeting), and the log must flag the fault."""
    with faulty(tmp_path, upstream_cert, ca_pem, [serve_normally, script]) as (upstream, proxy):
        with Client(proxy.port) as bystander:
            fake_login(bystander)
            with Client(proxy.port) as client:
                data, _ = client.read_to_eof()
                session_id = proxy.session_id_for(client.local_port)
                closed = proxy.wait_session_closed(session_id)
            upstream.wait_finished(2)
            assert not data.startswith(b"+OK"), data
            assert data.startswith(b"-ERR [SYS/TEMP]"), (
                f"the client got {data!r} instead of -ERR [SYS/TEMP]; session.closed: {closed}"
            )
            flagged = [
                e
                for e in proxy.session_events(session_id)
                if e.get("event") in {"upstream.truncated", "upstream.failed"}
            ]
            assert flagged, proxy.session_events(session_id)
            assert flagged[0]["level"] == "warning", flagged
            assert closed["reason"] in {"upstream_truncated", "upstream_failed"}, closed
            assert bystander.command(b"STAT") == b"+OK 1 %d\r\n" % len(MESSAGE)
            assert bystander.command(b"QUIT") == b"+OK bye\r\n"
        fake_session_works(proxy)
        assert_no_crash(proxy)


def test_upstream_never_greets(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path
) -> None:
    """TLS is up but no greeting comes: the greeting timer ends the session, the client is
    told (never a ``+OK``), and the upstream is hung up on."""
    args = ["--greeting-timeout", "1"]
    with faulty(tmp_path, upstream_cert, ca_pem, [never_greet], args) as (upstream, proxy):
        with Client(proxy.port) as client:
            data, how = client.read_to_eof()
            closed = closed_event(proxy, client)
        assert how != "timeout"
        assert (
            data == b"-ERR [SYS/TEMP] the mail server did not greet within 1 s, try again later\r\n"
        )
        assert closed["reason"] == "greeting_timeout", closed
        failed = events_named(proxy, closed["session_id"], "upstream.failed")
        assert [(e["phase"], e["reason"], e["level"]) for e in failed] == [
            ("greeting", "timeout", "warning")
        ]
        assert upstream.wait_finished(1).peer_closed
        fake_session_works(proxy)
        assert_no_crash(proxy)


def test_half_closed_client_is_answered_when_the_upstream_never_replies(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path
) -> None:
    """The client sends STAT and shuts its write side (SHUT_WR); the upstream never answers.
    ``--close-timeout 1`` after the last octet, the client gets an answer and the end, and
    the upstream is hung up on (it used to wait for the 600 s idle timer)."""
    scripts = [serve_normally, hold_after(b"STAT")]
    args = ["--close-timeout", "1"]
    with faulty(tmp_path, upstream_cert, ca_pem, scripts, args) as (upstream, proxy):
        with Client(proxy.port) as bystander:
            fake_login(bystander)
            with Client(proxy.port) as client:
                fake_login(client)
                client.send(b"STAT\r\n")
                client.sock.shutdown(socket.SHUT_WR)
                data, how = client.read_to_eof()
                closed = closed_event(proxy, client)
            assert how != "timeout"
            assert data == b"-ERR [SYS/TEMP] the mail server did not answer within 1 s, closing\r\n"
            assert closed["reason"] == "close_timeout", closed
            assert events_named(proxy, closed["session_id"], "session.close_timeout")
            assert upstream.wait_finished(2).peer_closed  # freed, not held until io_timeout
            assert bystander.command(b"STAT") == b"+OK 1 %d\r\n" % len(MESSAGE)
            assert bystander.command(b"QUIT") == b"+OK bye\r\n"
        fake_session_works(proxy)
        assert_no_crash(proxy)


@pytest.mark.parametrize("close_notify", [False, True], ids=["fin", "close_notify"])
def test_upstream_closes_mid_retr(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path, close_notify: bool
) -> None:
    """Half the body, then the upstream goes: the client must see a cut reply (no
    terminator, connection closed), never a fake ``.`` line."""
    scripts = [serve_normally, close_mid_retr(close_notify=close_notify)]
    with faulty(tmp_path, upstream_cert, ca_pem, scripts) as (_, proxy):
        with Client(proxy.port) as bystander:
            fake_login(bystander)
            with Client(proxy.port) as client:
                fake_login(client)
                status = client.command(b"RETR 1")
                body, how = client.read_to_eof()
                closed = closed_event(proxy, client)
            assert status == b"+OK %d octets\r\n" % len(MESSAGE)
            assert how in {"eof", "reset"}, how
            full = dot_stuff(MESSAGE)
            assert 0 < len(body) < len(full), len(body)
            assert full.startswith(body), "the relayed part differs from what was sent"
            assert b"\r\n.\r\n" not in body, body[-100:]
            assert not body.startswith(b".\r\n"), body[-100:]
            truncated = events_named(proxy, closed["session_id"], "upstream.truncated")
            assert len(truncated) == 1, proxy.session_events(closed["session_id"])
            assert truncated[0]["level"] == "warning"
            assert truncated[0]["tls_close_notify"] is close_notify, truncated
            assert closed["reason"] == "upstream_truncated", closed
            retr = events_named(proxy, closed["session_id"], "pop3.command")
            assert [e["verb"] for e in retr] == ["USER", "PASS"], retr  # RETR never completed
            assert bystander.command(b"RETR 1") == b"+OK %d octets\r\n" % len(MESSAGE)
            assert bystander.multiline() == full
            assert bystander.command(b"QUIT") == b"+OK bye\r\n"
        fake_session_works(proxy)
        assert_no_crash(proxy)


def test_upstream_closes_without_close_notify_after_quit(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path
) -> None:
    """Many servers drop TCP right after ``+OK`` to QUIT: a normal end, reason ``quit``."""
    with faulty(tmp_path, upstream_cert, ca_pem, [quit_without_notify]) as (upstream, proxy):
        with Client(proxy.port) as client:
            fake_login(client)
            assert client.command(b"QUIT") == b"+OK bye\r\n"
            assert client.read_to_eof()[0] == b""
            closed = closed_event(proxy, client)
        assert upstream.wait_finished(1).ended == "fin"
        assert closed["reason"] == "quit", closed
        assert events_named(proxy, closed["session_id"], "upstream.truncated") == []
        fake_session_works(proxy)
        assert_no_crash(proxy)


def test_upstream_closes_before_replying(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path
) -> None:
    """STAT sent, the upstream drops TCP without close_notify and without a reply."""
    scripts = [serve_normally, close_before_reply(b"STAT")]
    with faulty(tmp_path, upstream_cert, ca_pem, scripts) as (_, proxy):
        with Client(proxy.port) as bystander:
            fake_login(bystander)
            with Client(proxy.port) as client:
                fake_login(client)
                client.send(b"STAT\r\n")
                data, _ = client.read_to_eof()
                closed = closed_event(proxy, client)
            assert not data.startswith(b"+OK"), data
            truncated = events_named(proxy, closed["session_id"], "upstream.truncated")
            assert [e["tls_close_notify"] for e in truncated] == [False], truncated
            assert closed["reason"] == "upstream_truncated", closed
            assert bystander.command(b"QUIT") == b"+OK bye\r\n"
        fake_session_works(proxy)
        assert_no_crash(proxy)


def test_upstream_closes_without_close_notify_before_quit(
    tmp_path: Path, upstream_cert: trustme.LeafCert, ca_pem: Path
) -> None:
    """Logged in, no command waiting, and the upstream's TLS stream just stops (TCP FIN, no
    close_notify) before any QUIT: the session is over without its UPDATE state, and a
    TLS stream that ends without close_notify may have been cut by someone else. The proxy
    must close the client and flag the truncation in its log."""
    scripts = [serve_normally, close_while_idle(b"NOOP")]
    with faulty(tmp_path, upstream_cert, ca_pem, scripts) as (upstream, proxy):
        with Client(proxy.port) as bystander:
            fake_login(bystander)
            with Client(proxy.port) as client:
                fake_login(client)
                assert client.command(b"NOOP") == b"+OK\r\n"
                data, how = client.read_to_eof()
                closed = closed_event(proxy, client)
            assert upstream.wait_finished(2).ended == "fin"
            assert data == b"", data
            assert how in {"eof", "reset"}, how
            truncated = events_named(proxy, closed["session_id"], "upstream.truncated")
            assert [e.get("tls_close_notify") for e in truncated] == [False], (
                "no upstream.truncated event (tls_close_notify false) for a TLS stream that "
                f"ended without close_notify before QUIT; session.closed: {closed}"
            )
            assert closed["reason"] == "upstream_truncated", closed
            assert bystander.command(b"QUIT") == b"+OK bye\r\n"
        fake_session_works(proxy)
        assert_no_crash(proxy)


# -- the client goes away mid-RETR ----------------------------------------------------------------


def wait_dovecot_log(dovecot: Dovecot, user: str, needle: str, timeout: float = 10.0) -> str:
    """The first line Dovecot logged for ``user``'s POP3 session that contains ``needle``."""
    deadline = time.monotonic() + timeout
    while True:
        for line in dovecot.log_text().splitlines():
            if f"pop3({user})" in line and needle in line:
                return line
        if time.monotonic() > deadline:
            raise AssertionError(
                f"Dovecot logged no {needle!r} for {user} within {timeout} s:\n"
                + dovecot.log_text()[-3000:]
            )
        time.sleep(0.05)


def test_client_disconnects_mid_retr(
    relay: ProxyProcess,
    dovecot: Dovecot,
    mailbox: MailboxFactory,
    small_box: Mailbox,
    big_message: bytes,
) -> None:
    """The client reads the start of a 50 MiB RETR and aborts (RST): the proxy logs
    ``client_reset``, closes its upstream side, and Dovecot's session ends too."""
    box = mailbox([big_message])
    with dovecot_bystander(relay, small_box):
        client = Client(relay.port)
        try:
            dovecot_login(client, box)
            client.send(b"RETR 1\r\n")
            while len(client.buffer) < 256 * 1024:
                assert client._fill(), "closed early"
        finally:
            client.reset()
        closed = closed_event(relay, client)
        assert closed["reason"] == "client_reset", closed
        assert closed["bytes_to_client"] < len(big_message), closed
        retr = events_named(relay, closed["session_id"], "pop3.command")
        assert [e["verb"] for e in retr] == ["USER", "PASS"], retr
        wait_dovecot_log(dovecot, box.user, "Disconnected")
    dovecot_session_works(relay, small_box)
    assert_no_crash(relay)


# -- hostile bytes from the client ----------------------------------------------------------------

HOSTILE = {
    "nul": b"NOOP\x00\r\nST\x00AT\r\n\x00\x00\x00\r\nUSER a\x00b\r\n",
    "bare-lf": b"NOOP\nSTAT\nLIST 1\nNOOP\r\n\n",
    "non-utf8": b"NOOP \xff\xfe\r\nSTAT \xc3\x28\r\n\xe9t\xe9\r\nUIDL \x80\r\n",
    "binary": random.Random(1939).randbytes(4096),
    "binary-no-newline": bytes(b | 0x80 for b in random.Random(2449).randbytes(600)),
    "control-chars": bytes(range(1, 32)) + b"\r\n\x1b[2J\r\n\x7f\x7f\r\n",
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_client_bytes(
    relay: ProxyProcess, mailbox: MailboxFactory, small_box: Mailbox, payload: bytes
) -> None:
    """After the bytes come ``NOOP`` and ``QUIT``. The session either goes on (the last
    reply is QUIT's ``+OK``) or ends with a clear ``-ERR`` line; every reply is a status
    line; the proxy never crashes."""
    box = mailbox([make_message(1024, subject="hostile")])
    with dovecot_bystander(relay, small_box):
        with Client(relay.port) as client:
            dovecot_login(client, box)
            with contextlib.suppress(OSError):
                client.send(payload + b"\r\nNOOP\r\nQUIT\r\n")
            data, how = client.read_to_eof()
            closed = closed_event(relay, client)
        assert how != "timeout", data
        lines = data.split(b"\r\n")
        assert lines[-1] == b"", data[-200:]  # ends with a whole line
        lines.pop()
        assert lines, "no reply at all"
        assert all(line.startswith((b"+OK", b"-ERR")) for line in lines), lines
        if lines[-1].startswith(b"+OK"):
            assert closed["reason"] == "quit", closed
        else:
            assert closed["reason"] != "quit", closed
    dovecot_session_works(relay, small_box)
    assert_no_crash(relay)


# -- slow and flooding clients --------------------------------------------------------------------


def test_slowloris_is_closed_by_the_idle_timer(tmp_path: Path, dovecot: Dovecot) -> None:
    """A client that sends a byte and then waits longer than the idle timer is cut then,
    whether or not it would send another byte later (the line timer, 60 s, is not what
    cuts it)."""
    args = ["--idle-timeout", "1"]
    with proxy_for(tmp_path, dovecot.port, dovecot.ca_pem_path, args) as proxy:
        with Client(proxy.port) as client:
            client.send(b"U")  # at once: nothing here waits for a reply the timer could beat
            sent = time.monotonic()
            data, how = client.read_to_eof()
            waited = time.monotonic() - sent
            closed = closed_event(proxy, client)
        assert how in {"eof", "reset"}, how
        assert waited > 0.8, waited
        assert data == b"" or (data.startswith(b"+OK") and data.count(b"\r\n") == 1), data
        assert closed["reason"] == "idle_timeout", closed
        still_serves(proxy)
        assert_no_crash(proxy)


def test_slowloris_long_line_hits_the_line_limit(
    relay: ProxyProcess, small_box: Mailbox, mailbox: MailboxFactory
) -> None:
    """A line trickled in pieces, never ended: past 255 octets (RFC 2449) the proxy answers
    ``-ERR`` and closes, however slowly the octets came."""
    box = mailbox([make_message(1024, subject="trickle")])
    with dovecot_bystander(relay, small_box):
        with Client(relay.port) as client:
            dovecot_login(client, box)
            client.sock.settimeout(0.05)
            for _ in range(64):  # 64 x 16 = 1024 octets at most, about 3 s at most
                with contextlib.suppress(TimeoutError):
                    if not client._fill():
                        break
                if client.buffer:
                    break
                try:
                    client.send(b"NOOPxxxxxxxxxxxx" if not client.buffer else b"")
                except OSError:
                    break
            client.sock.settimeout(CLIENT_TIMEOUT)
            data, how = client.read_to_eof()
            closed = closed_event(relay, client)
        assert how != "timeout", data
        assert data.startswith(b"-ERR"), data
        assert data.count(b"\r\n") == 1, data
        errors = events_named(relay, closed["session_id"], "pop3.protocol_error")
        assert [e["side"] for e in errors] == ["client"], errors
        assert closed["reason"] == "client_protocol_error", closed
    dovecot_session_works(relay, small_box)
    assert_no_crash(relay)


def test_slowloris_is_closed_by_the_session_lifetime(tmp_path: Path, dovecot: Dovecot) -> None:
    """One byte every 0.3 s keeps the idle timer (1 s) from firing, and line after line stays
    short and ends in time; only ``--session-timeout`` ends such a session."""
    args = ["--idle-timeout", "1", "--session-timeout", "2.5"]
    with proxy_for(tmp_path, dovecot.port, dovecot.ca_pem_path, args) as proxy:
        started = time.monotonic()
        with Client(proxy.port) as client:
            client.sock.settimeout(0.3)
            trickle = b"CAPA\r\n" * 5
            for byte in trickle:  # 30 bytes, 9 s at most
                try:
                    if not client._fill():
                        break
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    break
                if time.monotonic() - started > 8.0:
                    break
                try:
                    client.send(bytes([byte]))
                except OSError:
                    break
            client.sock.settimeout(CLIENT_TIMEOUT)
            _, how = client.read_to_eof()
            lasted = time.monotonic() - started
            closed = closed_event(proxy, client)
        assert how != "timeout", (lasted, closed)
        assert lasted > 2.0, (lasted, closed)
        assert closed["reason"] == "session_timeout", closed
        still_serves(proxy)
        assert_no_crash(proxy)


def test_slow_reader_of_a_large_retr_after_a_half_close_gets_every_octet(
    tmp_path: Path, dovecot: Dovecot, mailbox: MailboxFactory, big_message: bytes
) -> None:
    """RETR of 50 MiB, then SHUT_WR, then reading slowly (64 KiB every 5 ms, about five
    seconds in all) with ``--close-timeout 1``: the close timer counts from the last octet
    moved, so as long as the reader keeps reading, every octet arrives."""
    box = mailbox([big_message])
    expected = dot_stuff(big_message)  # now: a reader that stops reading for a second is cut
    args = ["--close-timeout", "1"]
    with proxy_for(tmp_path, dovecot.port, dovecot.ca_pem_path, args) as proxy:
        with Client(proxy.port) as client:
            dovecot_login(client, box)
            client.send(b"RETR 1\r\n")
            client.sock.shutdown(socket.SHUT_WR)
            half_closed = time.monotonic()
            assert client.line().startswith(b"+OK")
            received = [client.buffer]
            total = len(client.buffer)
            while total <= len(expected):
                chunk = client.sock.recv(64 * 1024)
                if not chunk:
                    break
                received.append(chunk)
                total += len(chunk)
                time.sleep(0.005)
            took = time.monotonic() - half_closed
            closed = closed_event(proxy, client)
        body = b"".join(received)
        assert len(body) == len(expected), (len(body), len(expected), closed)
        assert body == expected
        assert took > 2.0, took  # far longer than the close timer: it was reset as octets moved
        assert closed["reason"] == "client_closed", closed
        assert_no_crash(proxy)


def test_flood_of_pipelined_commands(
    relay: ProxyProcess, mailbox: MailboxFactory, small_box: Mailbox
) -> None:
    """5,000 NOOPs and a QUIT in one write: answered in order, one ``+OK`` each (the proxy
    reads no further while its bound on unanswered commands is reached), or cut by that
    bound with a clear ``-ERR`` line."""
    count = 5000
    box = mailbox([make_message(1024, subject="flood")])
    with dovecot_bystander(relay, small_box):
        with Client(relay.port) as client:
            dovecot_login(client, box)
            client.send(b"NOOP\r\n" * count + b"QUIT\r\n")
            data, how = client.read_to_eof()
            assert how != "timeout", (
                f"the session stalled: {data.count(b'+OK')} replies to {count} NOOPs and a QUIT "
                f"in {CLIENT_TIMEOUT} s, then nothing (proxy options: {relay.extra_args})"
            )
            closed = closed_event(relay, client)
        lines = data.split(b"\r\n")
        assert lines.pop() == b"", data[-200:]
        oks = 0
        for line in lines:
            if not line.startswith(b"+OK"):
                break
            oks += 1
        if oks == len(lines):  # all answered: NOOPs, then QUIT
            assert oks == count + 1, oks
            assert closed["reason"] == "quit", closed
            noops = [
                e
                for e in events_named(relay, closed["session_id"], "pop3.command")
                if e["verb"] == "NOOP"
            ]
            assert len(noops) == count
            assert all(e["status"] == "+OK" for e in noops)
        else:  # cut by the pipelining bound: one -ERR, then nothing
            assert oks == len(lines) - 1, lines[oks:][:5]
            assert lines[-1].startswith(b"-ERR"), lines[oks:][:5]
            assert closed["reason"] != "quit", closed
    dovecot_session_works(relay, small_box)
    assert_no_crash(relay)
