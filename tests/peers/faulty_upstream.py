"""A scripted fake POP3S upstream for fault injection.

`FaultyUpstream` listens on an ephemeral loopback port and runs one *script* per accepted
connection, in order: connection 1 runs ``scripts[0]``, connection 2 ``scripts[1]``, and every
connection after the list runs `serve_normally`. So a test can put a well-behaved bystander
first, the fault second, and check that a follow-up session through the same proxy works::

    with FaultyUpstream(cert, [serve_normally, close_mid_retr(close_notify=False)]) as up:
        ...  # proxy --upstream 127.0.0.1:{up.port}

A script is a plain function of an `UpstreamConnection` (blocking sockets in a thread of
its own, every read bounded by ``io_timeout``). The building blocks say exactly how a
connection ends: `UpstreamConnection.close_notify` (TLS close_notify, then TCP FIN),
`UpstreamConnection.close_without_notify` (TCP FIN and no close_notify: what a truncation
attack or a crashing server looks like) and `UpstreamConnection.reset` (TCP RST).

The well-behaved dialogue knows USER, PASS, STAT, LIST, UIDL, NOOP, RETR (with
dot-stuffing) and QUIT, with one message (`MESSAGE` unless given).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trustme

from tests.peers.threaded_server import ThreadedServer

__all__ = [
    "GREETING",
    "MESSAGE",
    "ConnectionLog",
    "FaultyUpstream",
    "Script",
    "UpstreamConnection",
    "close_after_handshake",
    "close_before_reply",
    "close_mid_greeting",
    "close_mid_retr",
    "close_while_idle",
    "dot_stuff",
    "hold_after",
    "never_greet",
    "never_handshake",
    "quit_without_notify",
    "serve_normally",
]

GREETING = b"+OK faulty upstream ready\r\n"
MESSAGE = (
    b"From: fault@example.test\r\nSubject: fault injection\r\n\r\n"
    + b"".join(
        b"line %05d of the test message, padded to a fair length ....\r\n" % i for i in range(2000)
    )
    + b".starts with a dot\r\n.\r\nlast line\r\n"
)
_MAX_LINE = 8192
_MAX_LINES = 10_000


def dot_stuff(message: bytes) -> bytes:
    """The RETR body on the wire: dot-stuffed lines and the ``.`` terminator line."""
    lines = message.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


class _Closed(Exception):
    """The proxy closed its side (or the connection broke)."""


@dataclass
class ConnectionLog:
    """What one connection saw: the lines the proxy sent, and how it ended."""

    index: int
    lines: list[bytes] = field(default_factory=list)
    handshake_ok: bool = False
    peer_closed: bool = False
    ended: str | None = None  # how the script ended it: "close_notify", "fin", "rst", ...
    error: str | None = None
    finished: bool = False


class UpstreamConnection:
    """The server side of one accepted connection, for scripts."""

    def __init__(
        self,
        raw: socket.socket,
        context: ssl.SSLContext,
        log: ConnectionLog,
        *,
        stop: threading.Event,
        io_timeout: float,
        message: bytes,
    ) -> None:
        self.raw = raw
        self.context = context
        self.log = log
        self.stop = stop
        self.io_timeout = io_timeout
        self.message = message
        self.tls: ssl.SSLSocket | None = None
        self._buffer = b""

    # -- TLS and I/O -------------------------------------------------------------------------

    def handshake(self) -> None:
        self.raw.settimeout(self.io_timeout)
        self.tls = self.context.wrap_socket(self.raw, server_side=True)
        # wrap_socket detaches the plain socket: the SSLSocket is the only handle now. Its
        # close() and shutdown() never send a close_notify; only unwrap() does.
        self.raw = self.tls
        self.log.handshake_ok = True

    def _sock(self) -> socket.socket:
        return self.tls if self.tls is not None else self.raw

    def send(self, data: bytes) -> None:
        try:
            self._sock().sendall(data)
        except OSError as exc:
            raise _Closed(str(exc)) from None

    def recv_line(self) -> bytes:
        """The next line the proxy sent, without CRLF; raises `_Closed` at EOF."""
        deadline = time.monotonic() + self.io_timeout
        while b"\n" not in self._buffer:
            if len(self._buffer) > _MAX_LINE or time.monotonic() > deadline:
                raise _Closed("line too long or too slow")
            try:
                data = self._sock().recv(65536)
            except (OSError, ssl.SSLError) as exc:
                raise _Closed(str(exc)) from None
            if not data:
                self.log.peer_closed = True
                raise _Closed("EOF")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        line = line.rstrip(b"\r")
        self.log.lines.append(line)
        return line

    # -- endings ------------------------------------------------------------------------------

    def close_notify(self) -> None:
        """TLS close_notify, then close the socket."""
        self.log.ended = "close_notify"
        if self.tls is not None:
            with contextlib.suppress(OSError, ssl.SSLError, ValueError):
                self.tls.settimeout(1.0)  # unwrap() waits for the peer's close_notify
                self.tls.unwrap()
        self.raw.close()

    def close_without_notify(self) -> None:
        """Close TCP (FIN) without a TLS close_notify: the TLS stream just stops."""
        self.log.ended = "fin"
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)
        self.raw.close()

    def reset(self) -> None:
        """Abort the TCP connection (RST)."""
        self.log.ended = "rst"
        with contextlib.suppress(OSError):
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.raw.close()

    def hold(self, limit: float) -> None:
        """Say nothing until the proxy closes, the server stops, or ``limit`` seconds pass."""
        self.log.ended = "held"
        deadline = time.monotonic() + limit
        sock = self._sock()
        sock.settimeout(0.05)
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                self.log.peer_closed = True
                break
            if not data:
                self.log.peer_closed = True
                break
            self.log.lines.append(data)
        self.raw.close()

    # -- the POP3 dialogue -----------------------------------------------------------------------

    def dialogue(self, until: Callable[[bytes], bool] | None = None) -> bytes | None:
        """Answer like a small POP3 server; return the first line for which ``until`` is true
        (unanswered), or None once QUIT was answered (the script then ends the connection)."""
        for _ in range(_MAX_LINES):
            line = self.recv_line()
            if until is not None and until(line):
                return line
            verb, _, arg = line.partition(b" ")
            verb = verb.upper()
            size = len(self.message)
            if verb in (b"USER", b"PASS", b"NOOP"):
                self.send(b"+OK\r\n")
            elif verb == b"STAT":
                self.send(b"+OK 1 %d\r\n" % size)
            elif verb == b"LIST":
                self.send(b"+OK 1 %d\r\n" % size if arg else b"+OK\r\n1 %d\r\n.\r\n" % size)
            elif verb == b"UIDL":
                self.send(b"+OK 1 uid1\r\n" if arg else b"+OK\r\n1 uid1\r\n.\r\n")
            elif verb == b"RETR" and arg == b"1":
                self.send(b"+OK %d octets\r\n" % size + dot_stuff(self.message))
            elif verb == b"QUIT":
                self.send(b"+OK bye\r\n")
                return None
            else:
                self.send(b"-ERR not here\r\n")
        raise _Closed("too many lines")


Script = Callable[[UpstreamConnection], None]


def serve_normally(conn: UpstreamConnection) -> None:
    """A well-behaved server: greeting, the dialogue, close_notify after QUIT."""
    conn.handshake()
    conn.send(GREETING)
    conn.dialogue()
    conn.close_notify()


def never_handshake(conn: UpstreamConnection) -> None:
    """Accept TCP and never start TLS (the proxy's handshake timer must fire)."""
    conn.hold(limit=conn.io_timeout)


def close_after_handshake(conn: UpstreamConnection) -> None:
    """Complete TLS, then close without a word (no greeting, no close_notify)."""
    conn.handshake()
    conn.close_without_notify()


def close_mid_greeting(conn: UpstreamConnection) -> None:
    """Send half a greeting line, then close without close_notify."""
    conn.handshake()
    conn.send(GREETING[:10])
    time.sleep(0.05)  # let the half line reach the proxy on its own
    conn.close_without_notify()


def never_greet(conn: UpstreamConnection) -> None:
    """Complete TLS, then say nothing at all until the proxy gives up."""
    conn.handshake()
    conn.hold(limit=conn.io_timeout)


def close_mid_retr(*, close_notify: bool, fraction: float = 0.5) -> Script:
    """Serve normally until RETR, send its status line and part of the body, then close."""

    def script(conn: UpstreamConnection) -> None:
        conn.handshake()
        conn.send(GREETING)
        if conn.dialogue(until=lambda line: line.upper().startswith(b"RETR")) is None:
            conn.close_notify()
            return
        body = dot_stuff(conn.message)
        conn.send(b"+OK %d octets\r\n" % len(conn.message) + body[: int(len(body) * fraction)])
        time.sleep(0.05)
        if close_notify:
            conn.close_notify()
        else:
            conn.close_without_notify()

    return script


def quit_without_notify(conn: UpstreamConnection) -> None:
    """Serve normally, but after ``+OK`` to QUIT close TCP without close_notify (common)."""
    conn.handshake()
    conn.send(GREETING)
    conn.dialogue()
    time.sleep(0.05)
    conn.close_without_notify()


def close_before_reply(verb: bytes) -> Script:
    """Serve normally until the client sends ``verb``; leave it unanswered and close (FIN, no
    close_notify)."""

    def script(conn: UpstreamConnection) -> None:
        conn.handshake()
        conn.send(GREETING)
        if conn.dialogue(until=lambda line: line.upper().startswith(verb)) is None:
            conn.close_notify()
            return
        conn.close_without_notify()

    return script


def hold_after(verb: bytes) -> Script:
    """Serve normally until the client sends ``verb``; never answer it, and keep the
    connection open (saying nothing) until the proxy hangs up or ``io_timeout`` passes."""

    def script(conn: UpstreamConnection) -> None:
        conn.handshake()
        conn.send(GREETING)
        if conn.dialogue(until=lambda line: line.upper().startswith(verb)) is None:
            conn.close_notify()
            return
        conn.hold(limit=conn.io_timeout)

    return script


def close_while_idle(after: bytes) -> Script:
    """Serve normally; once the reply to ``after`` is sent, close (FIN, no close_notify)
    while no command is waiting: the session ends before any QUIT."""

    def script(conn: UpstreamConnection) -> None:
        conn.handshake()
        conn.send(GREETING)
        line = conn.dialogue(until=lambda line: line.upper().startswith(after))
        if line is None:
            conn.close_notify()
            return
        conn.send(b"+OK\r\n")
        time.sleep(0.2)
        conn.close_without_notify()

    return script


class FaultyUpstream(ThreadedServer):
    """A POP3S server on an ephemeral port of 127.0.0.1 that runs one script per connection.

    Args:
        cert: the server certificate (from the CA the proxy trusts).
        scripts: the scripts of connections 1, 2, ...; later connections get `serve_normally`.
        message: the one message in the mailbox.
        io_timeout: bound on each read and on `UpstreamConnection.hold`.
        max_connections: accept at most this many connections.
        lifetime: the accept loop stops after this many seconds whatever happens.
    """

    def __init__(
        self,
        cert: trustme.LeafCert,
        scripts: Sequence[Script] = (),
        *,
        message: bytes = MESSAGE,
        io_timeout: float = 10.0,
        max_connections: int = 64,
        lifetime: float = 120.0,
    ) -> None:
        super().__init__(max_connections=max_connections, io_timeout=io_timeout, lifetime=lifetime)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.scripts = list(scripts)
        self.message = message
        self._logs: list[ConnectionLog] = []

    @property
    def connections(self) -> list[ConnectionLog]:
        with self._lock:
            return list(self._logs)

    def wait_finished(self, index: int, timeout: float = 10.0) -> ConnectionLog:
        """Wait until connection ``index`` (1-based) has run its script to the end."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logs = self.connections
            if len(logs) >= index and logs[index - 1].finished:
                return logs[index - 1]
            time.sleep(0.02)
        raise AssertionError(
            f"upstream connection {index} did not finish within {timeout} s: {self.connections!r}"
        )

    def _connection(self, sock: socket.socket, index: int) -> Callable[[], None]:
        log = ConnectionLog(index=index)
        script = self.scripts[index - 1] if index <= len(self.scripts) else serve_normally
        with self._lock:
            self._logs.append(log)
        return functools.partial(self._run, sock, script, log)

    def _run(self, sock: socket.socket, script: Script, log: ConnectionLog) -> None:
        sock.settimeout(self.io_timeout)
        conn = UpstreamConnection(
            sock,
            self.context,
            log,
            stop=self._stop,
            io_timeout=self.io_timeout,
            message=self.message,
        )
        try:
            script(conn)
        except (_Closed, OSError, ssl.SSLError) as exc:
            log.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(OSError):
                conn.raw.close()
            with contextlib.suppress(OSError):
                sock.close()
            log.finished = True
