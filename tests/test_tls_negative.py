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
import trustme

from tests.peers.proxy import ProxyProcess
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
