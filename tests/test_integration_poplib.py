"""The stdlib ``poplib`` through the proxy, checked against the same client straight to Dovecot.

Every test drives a real ``pop3proxy serve`` subprocess in front of a real Dovecot (see
``conftest.py``) and compares what a plaintext client gets through the proxy with what a POP3S
client gets directly: the proxy must be invisible apart from STLS, and must log each command,
each login and each session's totals.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import poplib
import re
import signal
import socket
import ssl
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.peers.clients import DevicePOP3, connect_from_device
from tests.peers.dovecot import Dovecot, Mailbox, MailboxFactory
from tests.peers.proxy import Event, ProxyError, ProxyProcess

TIMEOUT = 30.0
MAX_LINE = 2048  # poplib's own limit

# How each login flow is named in ``pop3.login`` events.
MECHANISMS = {
    "USER": "USER",
    "APOP": "APOP",
    "PLAIN-initial": "PLAIN",
    "PLAIN-continuation": "PLAIN",
    "LOGIN": "LOGIN",
    "CRAM-MD5": "CRAM-MD5",
}
APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+@[^<>\s]+>")


# -- clients -----------------------------------------------------------------------------------


@contextlib.contextmanager
def via_proxy(proxy: ProxyProcess) -> Iterator[poplib.POP3]:
    """poplib through the proxy, from a loopback address of its own (see `session_of`)."""
    pop = DevicePOP3("127.0.0.1", proxy.port, timeout=TIMEOUT)
    try:
        yield pop
    finally:
        pop.close()


@contextlib.contextmanager
def direct(dovecot: Dovecot) -> Iterator[poplib.POP3_SSL]:
    pop = dovecot.direct_pop3s(timeout=TIMEOUT)
    try:
        yield pop
    finally:
        pop.close()


def session_of(proxy: ProxyProcess, pop: poplib.POP3 | socket.socket) -> str:
    """The proxy's ``session_id`` for a connected client (its address and port are unique)."""
    return proxy.session_id_for(pop)


def shortcmd(pop: poplib.POP3, line: str) -> bytes:
    """Send one raw command line, return the one-line reply; ``-ERR`` raises like poplib."""
    pop.sock.sendall(line.encode("utf-8") + b"\r\n")
    reply = pop.file.readline(MAX_LINE + 1)
    if not reply:
        raise poplib.error_proto("-ERR EOF")
    reply = reply.rstrip(b"\r\n")
    if not reply.startswith(b"+"):
        raise poplib.error_proto(reply)
    return reply


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def login(pop: poplib.POP3, flow: str, user: str, password: str) -> bytes:
    """Log in with one of the `MECHANISMS` flows; ``-ERR`` raises `poplib.error_proto`."""
    if flow == "USER":
        pop.user(user)
        return pop.pass_(password)
    if flow == "APOP":
        return pop.apop(user, password)  # digest over the greeting's timestamp
    plain = b64(b"\0" + user.encode() + b"\0" + password.encode())
    if flow == "PLAIN-initial":
        return shortcmd(pop, f"AUTH PLAIN {plain}")
    if flow == "PLAIN-continuation":
        assert shortcmd(pop, "AUTH PLAIN").startswith(b"+")
        return shortcmd(pop, plain)
    if flow == "LOGIN":
        assert shortcmd(pop, "AUTH LOGIN").startswith(b"+ ")
        assert shortcmd(pop, b64(user)).startswith(b"+ ")
        return shortcmd(pop, b64(password))
    if flow == "CRAM-MD5":
        challenge = base64.b64decode(shortcmd(pop, "AUTH CRAM-MD5")[2:])
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        return shortcmd(pop, b64(f"{user} {digest}"))
    raise AssertionError(f"unknown login flow {flow}")


def retr_bytes(pop: poplib.POP3, which: int) -> bytes:
    """The message as poplib returns it (dot-unstuffed), with its CRLF line ends put back."""
    _resp, lines, _octets = pop.retr(which)
    return b"".join(line + b"\r\n" for line in lines)


def command_events(proxy: ProxyProcess, session_id: str) -> list[Event]:
    return [e for e in proxy.session_events(session_id) if e.get("event") == "pop3.command"]


# -- raw sockets (pipelining, exact byte counts) -----------------------------------------------


@contextlib.contextmanager
def raw_proxy(proxy: ProxyProcess) -> Iterator[socket.socket]:
    with connect_from_device(proxy.port, timeout=TIMEOUT) as sock:
        yield sock


@contextlib.contextmanager
def raw_direct(dovecot: Dovecot) -> Iterator[ssl.SSLSocket]:
    ctx = dovecot.client_ssl_context()
    with (
        socket.create_connection(("127.0.0.1", dovecot.port), timeout=TIMEOUT) as tcp,
        ctx.wrap_socket(tcp, server_hostname=dovecot.server_name) as tls,
    ):
        yield tls


def read_line(sock: socket.socket) -> bytes:
    """One line, read byte by byte so that nothing after it is consumed."""
    line = bytearray()
    while not line.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk or len(line) > MAX_LINE:
            raise AssertionError(f"no complete line: {bytes(line)!r}")
        line += chunk
    return bytes(line)


def read_until_eof(sock: socket.socket, limit: int) -> bytes:
    data = bytearray()
    while len(data) <= limit:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return bytes(data)
        data += chunk
    raise AssertionError(f"more than {limit} bytes before EOF")


def read_multiline(sock: socket.socket, limit: int) -> bytes:
    """A whole multi-line reply, status line to the terminating ``.``, as on the wire."""
    data = bytearray(read_line(sock))
    if not data.startswith(b"+OK"):
        return bytes(data)
    while not data.endswith(b"\r\n.\r\n"):
        chunk = sock.recv(1 << 16)
        if not chunk or len(data) > limit:
            raise AssertionError(f"multi-line reply cut after {len(data)} bytes")
        data += chunk
    return bytes(data)


def split_replies(data: bytes, multiline: Sequence[bool]) -> list[bytes]:
    """Cut a pipelined reply stream into one reply per command, exactly covering it."""
    replies = []
    pos = 0
    for multi in multiline:
        end = data.index(b"\r\n", pos) + 2
        if multi and data.startswith(b"+OK", pos):
            end = data.index(b"\r\n.\r\n", end - 2) + 5
        replies.append(data[pos:end])
        pos = end
    assert pos == len(data), f"{len(data) - pos} unexpected bytes after the last reply"
    return replies


def status_of(reply: bytes) -> bytes:
    """``+OK`` or ``-ERR``: the first word of a reply's status line."""
    return reply.split(b"\r\n", 1)[0].split(b" ", 1)[0]


def unstuff(reply: bytes) -> bytes:
    """The content of a raw multi-line reply: no status line, no terminator, dots unstuffed."""
    assert reply.endswith(b"\r\n.\r\n")
    content = reply[reply.index(b"\r\n") + 2 : -3]
    return re.sub(rb"(?m)^\.", b"", content)


# -- logins --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flow", list(MECHANISMS))
def test_login_flows_through_proxy_and_direct(
    flow: str,
    proxy: ProxyProcess,
    dovecot: Dovecot,
    mailbox: MailboxFactory,
    corpus: tuple[bytes, ...],
) -> None:
    box = mailbox([corpus[0], corpus[3]])
    expected_stat = (2, len(corpus[0]) + len(corpus[3]))

    with direct(dovecot) as pop:
        assert login(pop, flow, box.user, box.password).startswith(b"+OK")
        assert pop.stat() == expected_stat
        pop.quit()

    with via_proxy(proxy) as pop:
        session_id = session_of(proxy, pop)
        assert login(pop, flow, box.user, box.password).startswith(b"+OK")
        assert pop.stat() == expected_stat
        assert pop.quit().startswith(b"+OK")

    proxy.wait_session_closed(session_id)
    logins = [e for e in proxy.session_events(session_id) if e.get("event") == "pop3.login"]
    assert [(e.get("user"), e.get("mechanism"), e.get("result")) for e in logins] == [
        (box.user, MECHANISMS[flow], "success")
    ]


@pytest.mark.parametrize("flow", list(MECHANISMS))
def test_failed_login_gets_err_and_session_goes_on(
    flow: str, proxy: ProxyProcess, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    box = mailbox([corpus[0]])
    with via_proxy(proxy) as pop:
        session_id = session_of(proxy, pop)
        with pytest.raises(poplib.error_proto) as failure:
            login(pop, flow, box.user, f"wrong-{box.password}")
        assert failure.value.args[0].startswith(b"-ERR")
        # Same connection, right password this time.
        login(pop, "USER", box.user, box.password)
        assert pop.stat() == (1, len(corpus[0]))
        pop.quit()

    proxy.wait_session_closed(session_id)
    logins = [e for e in proxy.session_events(session_id) if e.get("event") == "pop3.login"]
    # A failed AUTH LOGIN's first line is not known to be a user name (a confused client may
    # send its password first), so the proxy does not log it.
    failed_user = None if flow == "LOGIN" else box.user
    assert [(e.get("user"), e.get("mechanism"), e.get("result")) for e in logins] == [
        (failed_user, MECHANISMS[flow], "failure"),
        (box.user, "USER", "success"),
    ]


def test_greeting_carries_dovecot_apop_timestamp(proxy: ProxyProcess, dovecot: Dovecot) -> None:
    with direct(dovecot) as pop:
        direct_greeting = pop.getwelcome()
    with via_proxy(proxy) as first, via_proxy(proxy) as second:
        greetings = [first.getwelcome(), second.getwelcome()]

    stamps = []
    for greeting in greetings:
        match = APOP_TIMESTAMP.search(greeting)
        assert match is not None, greeting
        stamps.append(match.group())
        # Apart from the per-connection timestamp, Dovecot's greeting passes unchanged.
        assert APOP_TIMESTAMP.sub(b"<>", greeting) == APOP_TIMESTAMP.sub(b"<>", direct_greeting)
    # A timestamp per upstream connection, not one made up or cached by the proxy (APOP
    # logins through the proxy, tested above, only work with Dovecot's own).
    assert stamps[0] != stamps[1]


# -- transaction commands ------------------------------------------------------------------------


def transaction_snapshot(pop: poplib.POP3, count: int) -> dict[str, object]:
    """Everything a read-only pass over the mailbox returns, for comparing two sessions."""
    snapshot: dict[str, object] = {
        "stat": pop.stat(),
        "list": pop.list(),
        "uidl": pop.uidl(),
        "noop": pop.noop(),
    }
    for n in range(1, count + 1):
        snapshot[f"list {n}"] = pop.list(n)
        snapshot[f"uidl {n}"] = pop.uidl(n)
        snapshot[f"top {n} 0"] = pop.top(n, 0)
        snapshot[f"top {n} 5"] = pop.top(n, 5)
        snapshot[f"retr {n}"] = pop.retr(n)
    return snapshot


def test_transaction_commands_match_direct_pop3s(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    box = mailbox(corpus)
    count = len(corpus)

    with direct(dovecot) as pop:
        login(pop, "USER", box.user, box.password)
        expected = transaction_snapshot(pop, count)
        pop.quit()

    with via_proxy(proxy) as pop:
        session_id = session_of(proxy, pop)
        login(pop, "USER", box.user, box.password)
        got = transaction_snapshot(pop, count)
        for n, original in enumerate(corpus, 1):
            assert retr_bytes(pop, n) == original, f"message {n} differs from the original"
        pop.quit()

    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], f"{key} through the proxy differs from direct POP3S"
    assert got["stat"] == (count, sum(map(len, corpus)))

    proxy.wait_session_closed(session_id)
    verbs = [e.get("verb") for e in command_events(proxy, session_id)]
    per_message = ["LIST", "UIDL", "TOP", "TOP", "RETR"]
    assert verbs == [
        "USER",
        "PASS",
        "STAT",
        "LIST",
        "UIDL",
        "NOOP",
        *per_message * count,
        *["RETR"] * count,
        "QUIT",
    ]


def test_dele_rset_and_quit_commit(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    box = mailbox(corpus[:3])
    sizes = [len(m) for m in corpus[:3]]

    with via_proxy(proxy) as pop:
        session_id = session_of(proxy, pop)
        login(pop, "USER", box.user, box.password)
        assert pop.dele(1).startswith(b"+OK")
        assert pop.stat() == (2, sizes[1] + sizes[2])
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop.list(1)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            pop.retr(1)
        assert pop.rset().startswith(b"+OK")
        assert pop.stat() == (3, sum(sizes))
        assert retr_bytes(pop, 1) == corpus[0]
        assert pop.dele(2).startswith(b"+OK")
        assert pop.quit().startswith(b"+OK")

    # QUIT went through: the deletion is committed upstream.
    with direct(dovecot) as pop:
        login(pop, "USER", box.user, box.password)
        assert pop.stat() == (2, sizes[0] + sizes[2])
        assert retr_bytes(pop, 1) == corpus[0]
        assert retr_bytes(pop, 2) == corpus[2]
        pop.quit()

    closed = proxy.wait_session_closed(session_id)
    statuses = [(e.get("verb"), e.get("status")) for e in command_events(proxy, session_id)]
    assert statuses == [
        ("USER", "+OK"),
        ("PASS", "+OK"),
        ("DELE", "+OK"),
        ("STAT", "+OK"),
        ("LIST", "-ERR"),
        ("RETR", "-ERR"),
        ("RSET", "+OK"),
        ("STAT", "+OK"),
        ("RETR", "+OK"),
        ("DELE", "+OK"),
        ("QUIT", "+OK"),
    ]
    assert closed.get("commands") == len(statuses)
    assert int(closed["bytes_to_client"]) > sizes[0]


def test_pipelined_quit_from_a_half_closed_client_still_commits(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    """``DELE`` + ``RETR`` + ``QUIT`` in one write, then the client closes its sending side.

    The proxy holds the pipelined QUIT until the RETR reply is complete; it must still send
    it after the client's end of stream, or the server never enters the UPDATE state
    (RFC 1939 section 6) and the deletion is lost.
    """
    box = mailbox(corpus[:2])
    with raw_proxy(proxy) as sock:
        read_line(sock)
        sock.sendall(f"USER {box.user}\r\n".encode())
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(f"PASS {box.password}\r\n".encode())
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"DELE 1\r\nRETR 2\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        replies = read_until_eof(sock, 4 * len(corpus[1]) + 65536)
    dele, retr, quit_ = split_replies(replies, [False, True, False])
    assert status_of(dele) == b"+OK"
    assert unstuff(retr) == corpus[1]
    assert status_of(quit_) == b"+OK"
    with direct(dovecot) as pop:
        login(pop, "USER", box.user, box.password)
        assert pop.stat()[0] == 1, "QUIT never reached the server: the DELE was not committed"
        assert retr_bytes(pop, 1) == corpus[1]
        pop.quit()


# -- STLS ---------------------------------------------------------------------------------------


def test_capa_through_proxy_lacks_only_stls(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory
) -> None:
    box = mailbox([])
    with direct(dovecot) as pop:
        direct_before = pop.capa()
        login(pop, "USER", box.user, box.password)
        direct_after = pop.capa()
        pop.quit()
    with via_proxy(proxy) as pop:
        before = pop.capa()
        login(pop, "USER", box.user, box.password)
        after = pop.capa()
        pop.quit()

    assert "STLS" not in before
    assert "STLS" not in after
    direct_before.pop("STLS", None)
    direct_after.pop("STLS", None)
    assert before == direct_before
    assert after == direct_after


def test_client_stls_gets_err_and_session_goes_on(
    proxy: ProxyProcess, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    box = mailbox([corpus[0]])
    with via_proxy(proxy) as pop:
        session_id = session_of(proxy, pop)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            shortcmd(pop, "STLS")
        # Still plaintext, still talking POP3.
        login(pop, "USER", box.user, box.password)
        with pytest.raises(poplib.error_proto, match="-ERR"):
            shortcmd(pop, "STLS")
        assert retr_bytes(pop, 1) == corpus[0]
        pop.quit()

    proxy.wait_session_closed(session_id)
    statuses = [(e.get("verb"), e.get("status")) for e in command_events(proxy, session_id)]
    assert statuses == [
        ("STLS", "-ERR"),
        ("USER", "+OK"),
        ("PASS", "+OK"),
        ("STLS", "-ERR"),
        ("RETR", "+OK"),
        ("QUIT", "+OK"),
    ]


# -- pipelining and byte accounting --------------------------------------------------------------


def test_pipelined_batch_is_byte_identical_to_direct(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory, corpus: tuple[bytes, ...]
) -> None:
    box = mailbox(corpus)
    batch = [
        (f"USER {box.user}", False),
        (f"PASS {box.password}", False),
        ("STAT", False),
        ("LIST", True),
        ("UIDL", True),
        ("RETR 1", True),
        ("RETR 2", True),
        ("TOP 3 0", True),
        ("LIST 2", False),
        ("RETR 99", True),  # -ERR: a one-line reply to a multi-line command
        ("NOOP", False),
        ("RETR 3", True),
        ("QUIT", False),
    ]
    wire = b"".join(line.encode() + b"\r\n" for line, _ in batch)
    limit = 4 * sum(map(len, corpus)) + 65536

    # The reference is the same commands sent to Dovecot one at a time: Dovecot itself drops
    # the end of a reply still buffered when it reads a pipelined QUIT (about one direct
    # pipelined session in 25 loses its last 21 octets; bench/README.md), so a pipelined
    # direct session is no reference. The proxy holds QUIT until the replies before it are in.
    with raw_direct(dovecot) as tls:
        read_line(tls)
        direct = bytearray()
        for line, multiline in batch:
            tls.sendall(line.encode() + b"\r\n")
            direct += read_multiline(tls, limit) if multiline else read_line(tls)
        direct_replies = bytes(direct) + read_until_eof(tls, limit)
    with raw_proxy(proxy) as sock:
        session_id = session_of(proxy, sock)
        greeting = read_line(sock)
        sock.sendall(wire)
        proxied_replies = read_until_eof(sock, limit)

    if proxied_replies != direct_replies:  # say what the proxy saw, to tell relay from upstream
        proxy.wait_session_closed(session_id)
        seen = [e for e in proxy.session_events(session_id)
                if e.get("event") in {"upstream.truncated", "session.closed"}]  # fmt: skip
        pytest.fail(
            f"proxied {len(proxied_replies)} octets, direct {len(direct_replies)}; "
            f"missing tail {direct_replies[len(proxied_replies) :][:60]!r}; proxy: {seen}"
        )

    replies = split_replies(proxied_replies, [multi for _, multi in batch])
    assert [status_of(r) for r in replies] == [
        b"+OK",
        b"+OK",
        b"+OK",
        b"+OK",
        b"+OK",
        b"+OK",
        b"+OK",
        b"+OK",
        b"+OK",
        b"-ERR",
        b"+OK",
        b"+OK",
        b"+OK",
    ]
    assert unstuff(replies[5]) == corpus[0]
    assert unstuff(replies[6]) == corpus[1]
    assert unstuff(replies[11]) == corpus[2]
    headers, _, _ = corpus[2].partition(b"\r\n\r\n")
    assert unstuff(replies[7]) == headers + b"\r\n\r\n"

    closed = proxy.wait_session_closed(session_id)
    events = command_events(proxy, session_id)
    assert [e.get("verb") for e in events] == [line.split()[0] for line, _ in batch]
    assert [e.get("status") for e in events] == [status_of(r).decode() for r in replies]
    assert [e.get("reply_octets") for e in events] == [len(r) for r in replies]
    assert events[1].get("args") == ["***"]
    assert closed.get("bytes_from_client") == len(wire)
    assert closed.get("bytes_to_client") == len(greeting) + len(proxied_replies)
    assert closed.get("commands") == len(batch)
    assert closed.get("reason") is not None


# -- a big message --------------------------------------------------------------------------------


@pytest.mark.slow
def test_fifty_mib_message_is_byte_identical(
    proxy: ProxyProcess, dovecot: Dovecot, mailbox: MailboxFactory, big_message: bytes
) -> None:
    box = mailbox([big_message])
    limit = 2 * len(big_message)
    login_lines = f"USER {box.user}\r\nPASS {box.password}\r\n".encode()

    def fetch(sock: socket.socket) -> bytes:
        read_line(sock)
        sock.sendall(login_lines)
        assert read_line(sock).startswith(b"+OK")
        assert read_line(sock).startswith(b"+OK")
        sock.sendall(b"RETR 1\r\n")
        reply = read_multiline(sock, limit)
        sock.sendall(b"QUIT\r\n")
        assert read_line(sock).startswith(b"+OK")
        return reply

    with raw_direct(dovecot) as tls:
        direct_reply = fetch(tls)
    with raw_proxy(proxy) as sock:
        session_id = session_of(proxy, sock)
        proxied_reply = fetch(sock)

    assert len(proxied_reply) == len(direct_reply)
    assert hashlib.sha256(proxied_reply).digest() == hashlib.sha256(direct_reply).digest()
    assert unstuff(proxied_reply) == big_message  # compared by value; no diff on 50 MiB

    with via_proxy(proxy) as pop:
        login(pop, "USER", box.user, box.password)
        assert shortcmd(pop, "LIST 1").split()[-1] == str(len(big_message)).encode()
        fetched = retr_bytes(pop, 1)
        pop.quit()
    assert len(fetched) == len(big_message)
    assert fetched == big_message

    proxy.wait_session_closed(session_id)
    retrs = [e for e in command_events(proxy, session_id) if e.get("verb") == "RETR"]
    assert [e.get("reply_octets") for e in retrs] == [len(proxied_reply)]


# -- finding a session in the log ----------------------------------------------------------------


def test_a_client_port_that_comes_back_is_not_taken_for_the_first_session(
    proxy: ProxyProcess,
) -> None:
    """The kernel hands a client port out again sooner or later; here at once (same source
    port, SO_REUSEADDR). A lookup by port must fail loudly, not return the first session;
    a lookup by the whole address from a mark taken before connecting finds the second."""

    def connect(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(TIMEOUT)
        sock.bind(("127.0.0.1", port))
        sock.connect(("127.0.0.1", proxy.port))
        return sock

    with connect(0) as first:
        port = first.getsockname()[1]
        read_line(first)
        first.sendall(b"QUIT\r\n")
        assert read_line(first).startswith(b"+OK")
        assert first.recv(1) == b""  # the proxy closed first: no TIME_WAIT on this side
        first_id = proxy.session_id_for(first)
    proxy.wait_session_closed(first_id)

    mark = proxy.mark()
    with connect(port) as second:
        read_line(second)  # the greeting comes after session.opened: both are logged now
        with pytest.raises(ProxyError, match="2 sessions of client"):
            proxy.session_id_for(port)
        with pytest.raises(ProxyError, match="2 sessions of client"):
            proxy.session_id_for(second)
        second_id = proxy.session_id_for(second, since=mark)
        second.sendall(b"QUIT\r\n")
        assert read_line(second).startswith(b"+OK")
    assert second_id != first_id
    assert proxy.sessions_opened(since=mark) == [second_id]


def test_drain_started_comes_after_the_commands_completed_before_sigterm(
    dovecot: Dovecot, mailbox: MailboxFactory, tmp_path: Path
) -> None:
    """``pop3.command`` lines wait for a batch; ``drain.started`` must not overtake them, so a
    log reader can take it as a cut-off."""
    box = mailbox([])
    with ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
    ) as proxy:
        with via_proxy(proxy) as pop:
            session_id = session_of(proxy, pop)
            login(pop, "USER", box.user, box.password)
            assert pop.noop().startswith(b"+OK")  # completed: its line is logged or waiting
            proxy.send_signal(signal.SIGTERM)
            proxy.wait_for_event("drain.started")
            assert pop.quit().startswith(b"+OK")  # a drain lets open sessions finish
        assert proxy.wait_exit() == 0
        events = proxy.events()
    cut = next(n for n, e in enumerate(events) if e.get("event") == "drain.started")
    before = [e.get("verb") for e in events[:cut] if e.get("event") == "pop3.command"]
    after = [e.get("verb") for e in events[cut:] if e.get("event") == "pop3.command"]
    assert (before, after) == (["USER", "PASS", "NOOP"], ["QUIT"]), events
    assert all(e.get("session_id") == session_id for e in events if e.get("verb"))


def test_mailbox_fixture_gives_fresh_users(mailbox: MailboxFactory) -> None:
    first: Mailbox = mailbox([])
    second: Mailbox = mailbox([])
    assert first.user != second.user
    assert first.password != second.password
