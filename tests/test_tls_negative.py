"""The proxy refuses bad upstreams, says so once in its log, and keeps serving.

Each bad upstream is a `POP3STestServer` on loopback that would greet ``+OK test`` over TLS:
a certificate from a CA the proxy does not trust, a certificate for another name, an expired
certificate, a server that offers only TLS 1.1; and a port where nothing listens. For each, a
plain client must get a ``-ERR [SYS/TEMP]`` line, the log must carry one ``upstream.failed``
event with the right ``reason``, the bad server must never receive a byte of plaintext, and
the same proxy process must answer the next client the same way, then relay normally once the
upstream is fixed (the test server swaps in a good certificate, or starts listening).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from pop3proxy.tls import (
    UpstreamError,
    _handshake_reason,
    looks_like_tls,
    make_upstream_context,
    open_upstream,
)
from tests.peers.proxy import ProxyProcess
from tests.peers.threaded_server import ThreadedServer
from tests.peers.tls_servers import (
    GREETING,
    ConnectionRecord,
    POP3STestServer,
    expired_cert,
    refused_port,
    server_context,
    tls11_client_context,
    tls11_only_context,
)
from tests.test_admin import AdminProxy

SERVER_NAME = "pop.test"
CLIENT_TIMEOUT = 20.0
#: The longest reply we read from the proxy before deciding it misbehaves.
MAX_REPLY = 64 * 1024


@dataclass(frozen=True)
class Pki:
    """The CA the proxy trusts (its PEM on disk) and one it does not."""

    trusted: trustme.CA
    trusted_pem: Path
    untrusted: trustme.CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    trusted = trustme.CA()
    pem = tmp_path_factory.mktemp("pki") / "trusted-ca.pem"
    trusted.cert_pem.write_to_path(str(pem))
    return Pki(trusted=trusted, trusted_pem=pem, untrusted=trustme.CA())


@pytest.fixture
def proxy_log(tmp_path: Path) -> Path:
    return tmp_path / "proxy.log"


@dataclass(frozen=True)
class Exchange:
    """What a plain POP3 client saw from the proxy."""

    client_port: int
    first_line: bytes
    rest: bytes
    closed: bool


def talk(port: int, *, send_first: bytes = b"", then: bytes = b"") -> Exchange:
    """Connect to the proxy; send ``send_first`` at once (a pipelining client), read the first
    line, send ``then``, and read until the proxy closes (bounded in size and time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        client_port = int(sock.getsockname()[1])
        if send_first:
            sock.sendall(send_first)
        data = b""
        while b"\n" not in data and len(data) < MAX_REPLY:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        first, newline, rest = data.partition(b"\n")
        first += newline
        if then:
            # OSError: already closed by the proxy, which is what the refusal cases expect.
            with contextlib.suppress(OSError):
                sock.sendall(then)
        closed = False
        while len(rest) < MAX_REPLY:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            rest += chunk
            if then.upper().startswith(b"QUIT") and rest.endswith(b"\r\n"):
                break
        return Exchange(client_port, first, rest, closed)


def secret_bytes() -> tuple[bytes, bytes]:
    """A user name and password that must never reach a bad upstream, and the commands."""
    user = f"sentinel-{secrets.token_hex(6)}".encode()
    password = f"pw-{secrets.token_hex(8)}".encode()
    return user + b"\0" + password, b"USER " + user + b"\r\nPASS " + password + b"\r\n"


def assert_refused(proxy: ProxyProcess, exchange: Exchange, reason: str, phase: str) -> None:
    """The client got ``-ERR [SYS/TEMP]`` and EOF; the log explains why, once."""
    assert exchange.first_line.startswith(b"-ERR [SYS/TEMP]"), exchange
    assert exchange.first_line.endswith(b"\r\n"), exchange
    assert exchange.closed, exchange
    assert exchange.rest == b"", exchange
    session_id = proxy.session_id_for(exchange.client_port)
    closed = proxy.wait_session_closed(session_id)
    failures = [e for e in proxy.session_events(session_id) if e.get("event") == "upstream.failed"]
    assert len(failures) == 1, proxy.session_events(session_id)
    failure = failures[0]
    assert failure["reason"] == reason, failure
    assert failure["phase"] == phase, failure
    assert isinstance(failure["error"], str), failure
    assert failure["error"].strip(), failure
    assert failure["level"] in {"warning", "error"}, failure
    tls_ok = [
        e
        for e in proxy.session_events(session_id)
        if e.get("event") in {"upstream.tls_established", "pop3.command", "pop3.login"}
    ]
    assert tls_ok == [], tls_ok
    assert closed["commands"] == 0, closed


def assert_no_plaintext(record: ConnectionRecord, secrets_: bytes) -> None:
    """The server saw TLS records only: no decrypted data, no secret in the raw bytes."""
    assert not record.handshake_ok, record
    assert record.handshake_error, record
    assert bytes(record.app_data) == b"", record
    assert record.starts_with_tls_record(), bytes(record.raw_received[:16])
    raw = bytes(record.raw_received)
    for secret in secrets_.split(b"\0"):
        assert secret not in raw
    for verb in (b"USER ", b"PASS ", b"CAPA", b"QUIT"):
        assert verb not in raw


def assert_relays_good_upstream(proxy: ProxyProcess, server: POP3STestServer, seen: int) -> None:
    """The same proxy process now relays the greeting and a QUIT to the (fixed) upstream."""
    exchange = talk(proxy.port, then=b"QUIT\r\n")
    assert exchange.first_line == GREETING, exchange
    assert exchange.rest == b"+OK bye\r\n", exchange
    records = server.wait_finished(seen + 1)
    assert records[seen].handshake_ok, records[seen]
    assert bytes(records[seen].app_data) == b"QUIT\r\n", records[seen]
    session_id = proxy.session_id_for(exchange.client_port)
    proxy.wait_session_closed(session_id)
    established = [
        e for e in proxy.session_events(session_id) if e.get("event") == "upstream.tls_established"
    ]
    assert len(established) == 1, proxy.session_events(session_id)
    assert established[0]["tls_version"] in {"TLSv1.2", "TLSv1.3"}, established


# -- the bad upstreams ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BadUpstream:
    """A way to misconfigure the upstream, the reason the proxy must give, and the name the
    proxy checks (None: the upstream address, 127.0.0.1)."""

    reason: str
    make_context: Callable[[Pki], ssl.SSLContext]
    server_name: str | None = SERVER_NAME


BAD_UPSTREAMS = {
    "unknown-ca": BadUpstream(
        "unknown_ca",
        lambda pki: server_context(pki.untrusted.issue_cert(SERVER_NAME, "127.0.0.1")),
    ),
    "hostname-mismatch": BadUpstream(
        "hostname_mismatch",
        lambda pki: server_context(pki.trusted.issue_cert("other.test", "127.0.0.1")),
    ),
    "ip-address-mismatch": BadUpstream(
        "hostname_mismatch",
        lambda pki: server_context(pki.trusted.issue_cert(SERVER_NAME, "127.0.0.2")),
        server_name=None,
    ),
    "expired": BadUpstream(
        "expired",
        lambda pki: server_context(expired_cert(pki.trusted, SERVER_NAME, "127.0.0.1")),
    ),
    "tls-1.1-only": BadUpstream(
        "tls_version",
        lambda pki: tls11_only_context(pki.trusted.issue_cert(SERVER_NAME, "127.0.0.1")),
    ),
}


def good_context(pki: Pki) -> ssl.SSLContext:
    return server_context(pki.trusted.issue_cert(SERVER_NAME, "127.0.0.1"))


@pytest.fixture(params=sorted(BAD_UPSTREAMS))
def bad(request: pytest.FixtureRequest) -> BadUpstream:
    bad: BadUpstream = BAD_UPSTREAMS[request.param]
    return bad


@pytest.mark.parametrize("pipelined", [False, True], ids=["waits", "pipelines"])
def test_bad_upstream_certificate_or_version_is_refused(
    pki: Pki, bad: BadUpstream, proxy_log: Path, pipelined: bool
) -> None:
    with POP3STestServer(bad.make_context(pki)) as server:
        proxy = ProxyProcess(
            proxy_log,
            upstream_port=server.port,
            ca_file=pki.trusted_pem,
            server_name=bad.server_name,
        )
        with proxy:
            sessions = 2
            for n in range(sessions):
                secrets_, commands = secret_bytes()
                if pipelined:
                    exchange = talk(proxy.port, send_first=commands)
                else:
                    exchange = talk(proxy.port, then=commands)
                assert_refused(proxy, exchange, bad.reason, "handshake")
                records = server.wait_finished(n + 1)
                assert len(records) == n + 1, records
                assert_no_plaintext(records[n], secrets_)
            assert proxy.running

            # The upstream is fixed (a good certificate, modern TLS): the same process relays.
            server.context = good_context(pki)
            assert_relays_good_upstream(proxy, server, sessions)
            assert proxy.running


def test_tls11_server_really_offers_tls11(pki: Pki) -> None:
    """Guard for the TLS 1.1 case: the server handshakes with a client that allows TLS 1.1,
    so the proxy's refusal is about the version and nothing else."""
    ctx = tls11_client_context(pki.trusted)
    with POP3STestServer(
        tls11_only_context(pki.trusted.issue_cert(SERVER_NAME, "127.0.0.1"))
    ) as server:
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            assert tls.version() == "TLSv1.1"
            assert tls.recv(100) == GREETING
            tls.sendall(b"QUIT\r\n")
            assert tls.recv(100) == b"+OK bye\r\n"
        records = server.wait_finished(1)
        assert records[0].tls_version == "TLSv1.1"


def test_refused_upstream_port(pki: Pki, proxy_log: Path) -> None:
    with refused_port() as listener:
        port = int(listener.getsockname()[1])
        proxy = ProxyProcess(proxy_log, upstream_port=port, ca_file=pki.trusted_pem)
        with proxy:
            for _ in range(2):
                _, commands = secret_bytes()
                exchange = talk(proxy.port, send_first=commands)
                assert_refused(proxy, exchange, "refused", "connect")
            assert proxy.running

            # Something starts listening on that port: the same process relays to it.
            with POP3STestServer(good_context(pki), listener=listener) as server:
                assert server.port == port
                assert_relays_good_upstream(proxy, server, 0)
            assert proxy.running


# -- key logging -----------------------------------------------------------------------------------


@pytest.fixture
def good_server(pki: Pki) -> Iterator[POP3STestServer]:
    with POP3STestServer(good_context(pki)) as server:
        yield server


def test_sslkeylogfile_in_environment_is_ignored(
    pki: Pki, good_server: POP3STestServer, proxy_log: Path, tmp_path: Path
) -> None:
    """``ssl.create_default_context`` honours ``SSLKEYLOGFILE``; the proxy must not: a stray
    variable would write the keys of sessions that carry mailbox passwords to disk."""
    control = tmp_path / "control-keys.log"
    # Control: a stdlib client with this variable does write a key log here, so the variable
    # is live in this environment and the assertion below can fail.
    client = (
        "import socket, ssl, sys\n"
        "ctx = ssl.create_default_context(cafile=sys.argv[1])\n"
        "with socket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=10) as raw:\n"
        "    with ctx.wrap_socket(raw, server_hostname=sys.argv[3]) as tls:\n"
        "        assert tls.recv(100).startswith(b'+OK')\n"
        "        tls.sendall(b'QUIT\\r\\n'); tls.recv(100)\n"
    )
    subprocess.run(
        [sys.executable, "-c", client, str(pki.trusted_pem), str(good_server.port), SERVER_NAME],
        env={**os.environ, "SSLKEYLOGFILE": str(control)},
        check=True,
        timeout=30,
    )
    assert control.exists()
    assert b"CLIENT_" in control.read_bytes() or b"SECRET" in control.read_bytes()

    keylog = tmp_path / "proxy-keys.log"
    proxy = ProxyProcess(
        proxy_log,
        upstream_port=good_server.port,
        ca_file=pki.trusted_pem,
        env={"SSLKEYLOGFILE": str(keylog)},
    )
    with proxy:
        assert_relays_good_upstream(proxy, good_server, 1)
    written = keylog.read_bytes() if keylog.exists() else b""
    # First the harm itself: no session secrets on disk ...
    assert b"SECRET" not in written, written[:200]
    assert b"CLIENT_RANDOM" not in written, written[:200]
    # ... then not even the file: ``ssl.create_default_context()`` opens it (and writes its
    # header line) as soon as the variable is set, before any ``keylog_filename = None``.
    assert not keylog.exists(), f"the proxy created {keylog.name}: {written[:200]!r}"


# -- a port that does not speak TLS at all ---------------------------------------------------------
#
# The family: every way a server that does not speak TLS can answer a ClientHello. It greets
# first in plaintext (POP3 on 110), or answers the ClientHello in plaintext (a server that
# waits for its client), or sends a few octets and closes (fewer than a TLS record header), or
# answers in binary that is no TLS record. OpenSSL calls these "wrong version number",
# "record layer failure" (3.2+) or an EOF; each must be reported as ``not_tls``, while octets
# that do start a TLS record keep their own classes (the TLS 1.1 server above: tls_version).

PLAINTEXT_GREETING = b"+OK plaintext POP3 ready\r\n"


@dataclass(frozen=True)
class NotTls:
    """What the server sends: ``greeting`` on connect, ``answer`` to the first bytes it reads,
    then with ``close`` its end of stream (it hangs up). It reads until the client closes, so
    that it never resets the connection with unread data (which could overtake its octets)."""

    greeting: bytes = b""
    answer: bytes = b""
    close: bool = False
    shown: str | None = None  # the text the message must quote, if any


NOT_TLS = {
    "pop3-greeting": NotTls(greeting=PLAINTEXT_GREETING, shown="+OK plaintext POP3 ready"),
    "answers-the-hello": NotTls(answer=b"-ERR unknown command\r\n", shown="-ERR unknown command"),
    "few-octets-then-close": NotTls(greeting=b"+OK", close=True, shown="+OK"),
    "binary": NotTls(greeting=b"\x00\x00\x00\x01binary protocol", close=True),
}


class PlaintextServer(ThreadedServer):
    """A server on loopback that answers like ``behaviour`` and records what it received."""

    def __init__(self, behaviour: NotTls) -> None:
        super().__init__(max_connections=32, io_timeout=10.0, lifetime=300.0)
        self.behaviour = behaviour
        self.received: list[bytearray] = []

    def _connection(self, sock: socket.socket, index: int) -> Callable[[], None]:
        received = bytearray()
        self.received.append(received)

        def serve() -> None:
            behaviour = self.behaviour
            with sock, contextlib.suppress(OSError):
                sock.settimeout(self.io_timeout)
                if behaviour.greeting:
                    sock.sendall(behaviour.greeting)
                if behaviour.answer:
                    received.extend(sock.recv(65536))
                    sock.sendall(behaviour.answer)
                if behaviour.close:
                    sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    received.extend(chunk)

        return serve


@pytest.fixture(params=sorted(NOT_TLS))
def not_tls(request: pytest.FixtureRequest) -> NotTls:
    behaviour: NotTls = NOT_TLS[request.param]
    return behaviour


def assert_says_not_tls(message: str, port: int, behaviour: NotTls) -> None:
    assert f"the server at 127.0.0.1:{port} does not speak TLS" in message, message
    if behaviour.shown is not None:
        assert f"it sent {behaviour.shown!r} in plaintext" in message, message
        assert "110 instead of 995" in message, message
    else:
        assert "are not TLS" in message, message
    assert "version" not in message, message


@pytest.mark.parametrize("pipelined", [False, True], ids=["waits", "pipelines"])
def test_a_plaintext_upstream_is_reported_as_not_tls(
    pki: Pki, not_tls: NotTls, proxy_log: Path, pipelined: bool
) -> None:
    with PlaintextServer(not_tls) as server:
        proxy = ProxyProcess(proxy_log, upstream_port=server.port, ca_file=pki.trusted_pem)
        with proxy:
            for _ in range(2):
                secrets_, commands = secret_bytes()
                if pipelined:
                    exchange = talk(proxy.port, send_first=commands)
                else:
                    exchange = talk(proxy.port, then=commands)
                assert exchange.first_line == (
                    b"-ERR [SYS/TEMP] mail server unavailable (not_tls), try again later\r\n"
                )
                assert_refused(proxy, exchange, "not_tls", "handshake")
                session_id = proxy.session_id_for(exchange.client_port)
                failure = next(
                    e
                    for e in proxy.session_events(session_id)
                    if e.get("event") == "upstream.failed"
                )
                assert_says_not_tls(failure["error"], server.port, not_tls)
                for secret in secrets_.split(b"\0"):
                    assert all(secret not in bytes(r) for r in server.received)
            assert proxy.running


def test_readyz_and_check_say_not_tls(pki: Pki, not_tls: NotTls, tmp_path: Path) -> None:
    with PlaintextServer(not_tls) as server:
        proxy = ProxyProcess(
            tmp_path / "proxy.log",
            upstream_port=server.port,
            ca_file=pki.trusted_pem,
            extra_args=["--admin", "127.0.0.1:0"],
        )
        with proxy:
            admin = AdminProxy(proxy)
            ready = admin.request("/readyz")
            assert ready.status == 503, ready
            detail = ready.json()
            assert (detail["reason"], detail["phase"]) == ("not_tls", "handshake"), detail
            assert_says_not_tls(str(detail["error"]), server.port, not_tls)

        command = [sys.executable, "-m", "pop3proxy", "check", "--json"]
        command += ["--upstream", f"127.0.0.1:{server.port}"]
        command += ["--upstream-ca-file", str(pki.trusted_pem)]
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            cwd=Path(__file__).resolve().parents[1],
            env={k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")},
            check=False,
        )
    assert done.returncode == 1, done
    report = json.loads(done.stdout)
    tls = [f for f in report["findings"] if f["check"] == "tls"]
    assert [f["status"] for f in tls] == ["fail"], report["findings"]
    assert_says_not_tls(tls[0]["message"], server.port, not_tls)


# -- the same classification in process, fast: open_upstream against a trio loopback server ------


async def serve_once(behaviour: NotTls, task_status: trio.TaskStatus[int]) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    stream = await listeners[0].accept()
    async with stream:
        if behaviour.greeting:
            await stream.send_all(behaviour.greeting)
        if behaviour.answer:
            await stream.receive_some()
            await stream.send_all(behaviour.answer)
        if behaviour.close:
            await stream.send_eof()
        with contextlib.suppress(trio.BrokenResourceError):
            while await stream.receive_some():
                pass
    for listener in listeners:
        await listener.aclose()


async def test_open_upstream_classifies_a_plaintext_port(pki: Pki, not_tls: NotTls) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_once, not_tls)
        with pytest.raises(UpstreamError) as failure, trio.fail_after(CLIENT_TIMEOUT):
            await open_upstream(
                "127.0.0.1",
                port,
                server_name=SERVER_NAME,
                context=make_upstream_context(pki.trusted_pem),
                connect_timeout=CLIENT_TIMEOUT,
                handshake_timeout=CLIENT_TIMEOUT,
            )
    assert (failure.value.phase, failure.value.reason) == ("handshake", "not_tls")
    assert_says_not_tls(failure.value.message, port, not_tls)


@pytest.mark.parametrize(
    ("first", "tls"),
    [
        (b"", True),  # nothing seen: no evidence
        (b"\x16", True),
        (b"\x16\x03\x01\x00\x2a", True),  # a handshake record
        (b"\x15\x03\x03\x00\x02\x02\x46", True),  # an alert (e.g. protocol_version)
        (b"\x17\x03\x03", True),
        (b"\x16\x02\x00", False),  # a handshake type with SSL 2 as major version
        (b"\x80\x2e\x01", False),  # an SSL 2 record header: not TLS either
        (b"+OK ready\r\n", False),
        (b"-ERR", False),
        (b"HTTP/1.1 400 Bad Request\r\n", False),
        (b"\x00\x00\x00\x01", False),
    ],
)
def test_looks_like_tls(first: bytes, tls: bool) -> None:
    assert looks_like_tls(first) is tls


def test_a_tls_record_with_a_bad_header_is_not_called_plaintext() -> None:
    """Octets that start a TLS record keep OpenSSL's own reason, whatever follows."""
    cause = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    cause.reason = "WRONG_VERSION_NUMBER"
    assert _handshake_reason(cause, b"\x16\x03\x09\x00\x10", "h:995")[0] == "tls_version"
    assert _handshake_reason(cause, b"+OK hi\r\n", "h:995")[0] == "not_tls"
