"""Tiny POP3S servers on loopback that record everything a client sends them.

They exist to show that the proxy refuses bad upstreams: a certificate from an unknown CA, a
certificate for another host name, an expired certificate, a server that only speaks TLS 1.1.
Each server runs TLS over memory BIOs in plain threads, so it sees every raw TCP byte the
proxy sends (before decryption) and can prove that no plaintext ever reached it.

A successful handshake is answered with ``+OK test``; afterwards ``QUIT`` gets ``+OK bye`` and
any other line ``-ERR test server``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import socket
import ssl
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import trustme

from tests.peers.threaded_server import ThreadedServer

__all__ = [
    "GREETING",
    "ConnectionRecord",
    "POP3STestServer",
    "expired_cert",
    "refused_port",
    "server_context",
    "tls11_client_context",
    "tls11_only_context",
]

GREETING = b"+OK test\r\n"

_TLS_HANDSHAKE_RECORD = 0x16
_MAX_LINE = 4096


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server context presenting ``cert`` (and its chain) with the library defaults."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    return ctx


def tls11_only_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    """A server context that offers TLS 1.1 and nothing newer.

    OpenSSL 3 refuses TLS 1.1 at its default security level, hence ``@SECLEVEL=0``. Setting
    the version is deprecated in Python, which is the point here, so that warning is muted.
    """
    ctx = server_context(cert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def tls11_client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A client context willing to speak TLS 1.1, to check a TLS 1.1 server really answers."""
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def expired_cert(ca: trustme.CA, *identities: str) -> trustme.LeafCert:
    """A leaf certificate from ``ca`` whose validity ended yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    return ca.issue_cert(
        *identities,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )


@contextlib.contextmanager
def refused_port(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    """A bound loopback socket that does not listen: a TCP connect to its port is refused.

    The port stays reserved (no other process can take it during the test) and the kernel
    answers every SYN with a reset. Hand the socket to `POP3STestServer` (``listener=``) to
    make the same port start serving.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        yield sock
    finally:
        sock.close()


@dataclass
class ConnectionRecord:
    """What one TCP connection to a test server did."""

    raw_received: bytearray = field(default_factory=bytearray)
    app_data: bytearray = field(default_factory=bytearray)
    handshake_ok: bool = False
    handshake_error: str | None = None
    tls_version: str | None = None
    finished: bool = False

    def starts_with_tls_record(self) -> bool:
        """True if the first byte the peer sent opens a TLS handshake record."""
        return len(self.raw_received) >= 3 and self.raw_received[0] == _TLS_HANDSHAKE_RECORD


class POP3STestServer(ThreadedServer):
    """A threaded POP3S server on an ephemeral loopback port; use it as a context manager.

    Args:
        context: the server-side TLS context (certificate, versions); `context` may be
            replaced while the server runs and applies to later connections.
        listener: a bound (not necessarily listening) socket to serve on instead of a new
            one on an ephemeral port of ``host``.
        max_connections: accept at most this many connections.
        io_timeout: per-connection bound on each socket read and on the handshake.
        lifetime: the accept loop stops after this many seconds whatever happens.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        host: str = "127.0.0.1",
        listener: socket.socket | None = None,
        max_connections: int = 32,
        io_timeout: float = 10.0,
        lifetime: float = 300.0,
    ) -> None:
        super().__init__(
            host=host,
            listener=listener,
            max_connections=max_connections,
            io_timeout=io_timeout,
            lifetime=lifetime,
        )
        self.context = context
        self._records: list[ConnectionRecord] = []

    @property
    def records(self) -> list[ConnectionRecord]:
        """A snapshot of the connections seen so far."""
        with self._lock:
            return list(self._records)

    def wait_finished(self, count: int, timeout: float = 10.0) -> list[ConnectionRecord]:
        """Wait until ``count`` connections have been handled to the end; return all records."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            records = self.records
            if len(records) >= count and all(r.finished for r in records[:count]):
                return records
            time.sleep(0.02)
        records = self.records
        raise AssertionError(
            f"expected {count} finished connections within {timeout}s, have {len(records)}: "
            f"{records!r}"
        )

    # -- internals --------------------------------------------------------------------------

    def _connection(self, sock: socket.socket, index: int) -> Callable[[], None]:
        record = ConnectionRecord()
        with self._lock:
            self._records.append(record)
        return functools.partial(self._handle, sock, record)

    def _handle(self, sock: socket.socket, record: ConnectionRecord) -> None:
        try:
            with sock:
                sock.settimeout(self.io_timeout)
                self._serve(sock, record)
        except OSError as exc:
            if record.handshake_ok:
                return
            record.handshake_error = record.handshake_error or f"{type(exc).__name__}: {exc}"
        finally:
            record.finished = True

    def _recv(self, sock: socket.socket, record: ConnectionRecord) -> bytes:
        data = sock.recv(65536)
        record.raw_received += data
        return data

    def _serve(self, sock: socket.socket, record: ConnectionRecord) -> None:
        incoming = ssl.MemoryBIO()
        outgoing = ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)

        def flush() -> None:
            pending = outgoing.read()
            if pending:
                sock.sendall(pending)

        deadline = time.monotonic() + self.io_timeout
        while True:
            if time.monotonic() > deadline:
                record.handshake_error = "handshake timed out"
                return
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                data = self._recv(sock, record)
                if not data:
                    record.handshake_error = "EOF during handshake"
                    return
                incoming.write(data)
            except ssl.SSLError as exc:
                record.handshake_error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(OSError):
                    flush()  # the alert, so the client learns why
                return
        flush()
        record.handshake_ok = True
        record.tls_version = tls.version()

        tls.write(GREETING)
        flush()
        self._dialogue(sock, record, tls, incoming, flush)

    def _dialogue(
        self,
        sock: socket.socket,
        record: ConnectionRecord,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        flush: Callable[[], None],
    ) -> None:
        buffer = b""
        for _ in range(1000):  # bounded number of reads per connection
            try:
                chunk = tls.read(65536)
            except ssl.SSLWantReadError:
                data = self._recv(sock, record)
                if not data:
                    return
                incoming.write(data)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return
            except ssl.SSLError:
                return
            if not chunk:
                return
            record.app_data += chunk
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.rstrip(b"\r").upper() == b"QUIT":
                    tls.write(b"+OK bye\r\n")
                    with contextlib.suppress(ssl.SSLError):
                        tls.unwrap()
                    flush()
                    return
                tls.write(b"-ERR test server\r\n")
                flush()
            if len(buffer) > _MAX_LINE:
                return
