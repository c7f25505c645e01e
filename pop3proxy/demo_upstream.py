"""A small POP3S server with a built-in demo mailbox, for ``pop3proxy demo``.

It is a demo, not a product: one user (``demo``/``demo``), three short messages, everything in
memory. But what it does support follows RFC 1939 (POP3), RFC 2449 (CAPA, response codes),
RFC 5034 (SASL AUTH) and RFC 4616 (PLAIN), because the proxy in front of it parses every line:

- greeting with an APOP timestamp: ``+OK pop3proxy demo server ready <pid.time@localhost>``;
- AUTHORIZATION state: ``CAPA``, ``USER``/``PASS``, ``APOP``, ``AUTH`` (bare: list mechanisms;
  ``AUTH PLAIN`` with an initial response or a ``+ `` continuation), ``STLS`` (refused: TLS is
  already on; it is advertised so that the demo shows the proxy hiding it), ``QUIT``;
- TRANSACTION state: ``STAT``, ``LIST [n]``, ``UIDL [n]``, ``RETR n``, ``TOP n k``, ``DELE n``,
  ``RSET``, ``NOOP``, ``CAPA``, ``QUIT``;
- UPDATE state (``QUIT`` after login): deleted messages are removed from *this session's copy*
  of the mailbox, so every new session starts again with all three messages;
- bodies are dot-stuffed (RFC 1939 section 3), and one demo message has a line that starts
  with ``.`` to show it;
- commands may be pipelined (RFC 2449 PIPELINING): lines are cut from a receive buffer and
  answered in order.

Design: :class:`DemoSession` is the protocol (lines in, reply bytes out, no I/O), and
:func:`serve_demo_upstream` is a thin trio driver that feeds it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio

__all__ = [
    "DEMO_MAILBOX",
    "DEMO_PASSWORD",
    "DEMO_USER",
    "DemoMessage",
    "DemoSession",
    "handle_connection",
    "serve_demo_upstream",
]

DEMO_USER = "demo"
DEMO_PASSWORD = "demo"  # noqa: S105 - a published demo credential, for a loopback-only server

#: RFC 2449 section 4 allows command lines of 255 octets, but exempts SASL (RFC 5034 section 4);
#: a line longer than this (terminator included) ends the session.
MAX_LINE = 1024
#: Bounds on one session, so a misbehaving client cannot keep the demo busy forever.
MAX_COMMANDS = 1000
MAX_AUTH_FAILURES = 3
#: RFC 1939 section 3: an autologout timer must be at least 10 minutes.
IDLE_TIMEOUT = 600.0
#: How long a client gets to finish the TLS handshake.
HANDSHAKE_TIMEOUT = 10.0

CAPABILITIES = (
    "TOP",
    "UIDL",
    "USER",
    "SASL PLAIN",
    "PIPELINING",
    "RESP-CODES",
    "AUTH-RESP-CODE",
    "STLS",
)

log = structlog.get_logger("pop3proxy.demo_upstream")


@dataclass(frozen=True, slots=True)
class DemoMessage:
    """One message of the demo mailbox: a unique id and the RFC 5322 text with CRLF endings."""

    uid: str
    text: bytes

    @property
    def size(self) -> int:
        """Size in octets, as reported by LIST and STAT (before dot-stuffing)."""
        return len(self.text)


def _message(uid: str, subject: str, date: str, body: list[str]) -> DemoMessage:
    headers = [
        "From: pop3proxy demo <demo@localhost>",
        "To: demo@localhost",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{uid}@localhost>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
    ]
    return DemoMessage(
        uid=uid, text="".join(f"{line}\r\n" for line in [*headers, "", *body]).encode()
    )


DEMO_MAILBOX: tuple[DemoMessage, ...] = (
    _message(
        "welcome-1",
        "Welcome to pop3proxy",
        "Mon, 02 Jun 2025 09:00:00 +0000",
        [
            "Hello!",
            "",
            "You are reading this through pop3proxy: your client spoke plaintext POP3",
            "to the proxy, and the proxy fetched it over verified TLS from the demo",
            "server. Look at the JSON log to see every command (and no password).",
        ],
    ),
    _message(
        "dots-2",
        "A line that starts with a dot",
        "Mon, 02 Jun 2025 09:05:00 +0000",
        [
            "POP3 ends a multi-line reply with a line holding a single dot.",
            "So a line of the message that starts with a dot is sent with an extra one",
            "(dot-stuffing, RFC 1939 section 3); your client removes it again:",
            ".",
            ".hidden-file and ... are safe too.",
        ],
    ),
    _message(
        "bye-3",
        "Try DELE, RSET and QUIT",
        "Mon, 02 Jun 2025 09:10:00 +0000",
        [
            "DELE marks a message; RSET unmarks everything; QUIT applies the deletions.",
            "This demo mailbox is reset for every new session, so delete freely.",
        ],
    ),
)


class State(enum.Enum):
    """RFC 1939 section 3 session states."""

    AUTHORIZATION = "authorization"
    #: Waiting for the client's line after a ``+ `` continuation (RFC 5034 section 4).
    SASL_CONTINUATION = "sasl_continuation"
    TRANSACTION = "transaction"
    #: After QUIT; the connection is to be closed.
    DONE = "done"


def _ok(text: str) -> bytes:
    return f"+OK {text}\r\n".encode()


def _err(text: str) -> bytes:
    return f"-ERR {text}\r\n".encode()


def _multiline(first: str, lines: list[bytes]) -> bytes:
    """A positive multi-line reply, dot-stuffed and terminated (RFC 1939 section 3)."""
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    return b"".join([_ok(first), *(line + b"\r\n" for line in stuffed), b".\r\n"])


def _parse_number(arg: str) -> int | None:
    """A strictly decimal, positive number (no sign, no spaces), or None."""
    if not arg.isascii() or not arg.isdigit() or len(arg) > 9:
        return None
    return int(arg)


def make_timestamp() -> str:
    """An RFC 1939 section 7 APOP timestamp: unique per connection, ``<pid.clock@host>``."""
    return f"<{os.getpid()}.{time.time_ns()}@localhost>"


@dataclass
class DemoSession:
    """The POP3 server side of one connection, without I/O.

    Feed it complete command lines (without the CRLF) with :meth:`handle_line`; it returns the
    bytes to send. When :attr:`finished` is true the connection should be closed.
    """

    timestamp: str = field(default_factory=make_timestamp)
    state: State = State.AUTHORIZATION
    mailbox: list[DemoMessage] = field(default_factory=lambda: list(DEMO_MAILBOX))
    deleted: set[int] = field(default_factory=set)
    user: str | None = None
    commands: int = 0
    auth_failures: int = 0

    @property
    def finished(self) -> bool:
        """True once the session is over (QUIT, or too many failures)."""
        return self.state is State.DONE

    def greeting(self) -> bytes:
        """The server greeting, carrying the APOP timestamp."""
        return _ok(f"pop3proxy demo server ready {self.timestamp}")

    def handle_line(self, line: bytes) -> bytes:
        """Answer one client line (CRLF already removed)."""
        if self.state is State.DONE:
            return b""
        self.commands += 1
        if self.commands > MAX_COMMANDS:
            self.state = State.DONE
            return _err("[SYS/PERM] too many commands in one session")
        text = line.decode("utf-8", errors="replace")
        if self.state is State.SASL_CONTINUATION:
            return self._sasl_plain(text, continuation=True)
        word, _, rest = text.partition(" ")
        verb = word.upper()
        command = _COMMANDS.get(verb)
        if command is None:
            return _err(f"unknown command {verb[:40]}" if verb else "empty command")
        method, states = command
        if self.state not in states:
            why = "already logged in" if self.state is State.TRANSACTION else "log in first"
            return _err(f"{verb}: {why}")
        return method(self, rest.split(), rest)

    # -- both states ---------------------------------------------------------------------------

    def cmd_capa(self, args: list[str], rest: str) -> bytes:
        """CAPA (RFC 2449 section 5)."""
        if args:
            return _err("usage: CAPA")
        return _multiline("capability list follows", [c.encode() for c in CAPABILITIES])

    def cmd_quit(self, args: list[str], rest: str) -> bytes:
        """QUIT; after login it enters the UPDATE state (RFC 1939 section 6)."""
        if args:
            return _err("usage: QUIT")
        previous, self.state = self.state, State.DONE
        if previous is not State.TRANSACTION:
            return _ok("pop3proxy demo server signing off")
        removed = len(self.deleted)
        self.mailbox = [m for _, m in self._live()]
        self.deleted.clear()
        return _ok(
            f"pop3proxy demo server signing off ({removed} deleted, "
            f"{len(self.mailbox)} messages left)"
        )

    # -- AUTHORIZATION state -------------------------------------------------------------------

    def cmd_user(self, args: list[str], rest: str) -> bytes:
        """USER name (RFC 1939 section 7)."""
        if len(args) != 1:
            return _err("usage: USER name")
        self.user = args[0]
        return _ok("send PASS")

    def cmd_pass(self, args: list[str], rest: str) -> bytes:
        """PASS string; the password may contain spaces, so it is the rest of the line."""
        if self.user is None:
            return _err("send USER first")
        user, self.user = self.user, None
        return self._login(user, rest, "USER")

    def cmd_apop(self, args: list[str], rest: str) -> bytes:
        """APOP name digest: MD5 of the greeting's timestamp and the password, in hex."""
        if len(args) != 2:
            return _err("usage: APOP name digest")
        expected = hashlib.md5(
            (self.timestamp + DEMO_PASSWORD).encode(), usedforsecurity=False
        ).hexdigest()
        good = args[0] == DEMO_USER and hmac.compare_digest(args[1].lower(), expected)
        return self._login(args[0], DEMO_PASSWORD if good else None, "APOP")

    def cmd_auth(self, args: list[str], rest: str) -> bytes:
        """AUTH [mechanism [initial-response]] (RFC 5034); only PLAIN is offered."""
        if not args:
            # RFC 1734 usage that clients still probe: list the mechanisms.
            return _multiline("SASL mechanisms follow", [b"PLAIN"])
        if args[0].upper() != "PLAIN":
            return _err("unsupported SASL mechanism")
        if len(args) > 2:
            return _err("usage: AUTH PLAIN [initial-response]")
        if len(args) == 2:
            return self._sasl_plain(args[1], continuation=False)
        self.state = State.SASL_CONTINUATION
        return b"+ \r\n"

    def cmd_stls(self, args: list[str], rest: str) -> bytes:
        """STLS (RFC 2595) is advertised for the demo's sake, but TLS is already on."""
        return _err("TLS is already active (this is POP3S)")

    def _sasl_plain(self, response: str, *, continuation: bool) -> bytes:
        """Check a PLAIN response (RFC 4616): ``authzid NUL authcid NUL passwd``, base64."""
        self.state = State.AUTHORIZATION
        response = response.strip()
        if continuation and response == "*":
            return _err("AUTH cancelled")
        raw = b""  # RFC 5034 section 4: "=" is an empty initial response.
        if response != "=":
            try:
                raw = base64.b64decode(response, validate=True)
            except (binascii.Error, ValueError):
                return _err("invalid base64 in SASL response")
        parts = raw.split(b"\0")
        if len(parts) != 3:
            return self._login("", None, "PLAIN")
        authzid, authcid, passwd = (p.decode("utf-8", errors="replace") for p in parts)
        if authzid not in ("", authcid):
            return self._login(authcid, None, "PLAIN")
        return self._login(authcid, passwd, "PLAIN")

    def _login(self, user: str, password: str | None, mechanism: str) -> bytes:
        good = (
            password is not None
            and user == DEMO_USER
            and hmac.compare_digest(password.encode(), DEMO_PASSWORD.encode())
        )
        if not good:
            self.auth_failures += 1
            if self.auth_failures >= MAX_AUTH_FAILURES:
                self.state = State.DONE
                return _err("[AUTH] invalid user name or password; too many failures, bye")
            return _err("[AUTH] invalid user name or password")
        self.state = State.TRANSACTION
        count, octets = self._stat()
        return _ok(f"{mechanism} login accepted, maildrop has {count} messages ({octets} octets)")

    # -- TRANSACTION state ---------------------------------------------------------------------

    def _live(self) -> list[tuple[int, DemoMessage]]:
        return [(i, m) for i, m in enumerate(self.mailbox, 1) if i not in self.deleted]

    def _stat(self) -> tuple[int, int]:
        live = [m for _, m in self._live()]
        return len(live), sum(m.size for m in live)

    def _lookup(self, arg: str) -> DemoMessage | None:
        """The message numbered ``arg``, or None if there is none or it is marked deleted."""
        number = _parse_number(arg)
        if number is None or not 1 <= number <= len(self.mailbox) or number in self.deleted:
            return None
        return self.mailbox[number - 1]

    def cmd_stat(self, args: list[str], rest: str) -> bytes:
        """STAT: count and size of the messages not marked deleted."""
        if args:
            return _err("usage: STAT")
        count, octets = self._stat()
        return _ok(f"{count} {octets}")

    def cmd_list(self, args: list[str], rest: str) -> bytes:
        """LIST [msg]: sizes (a multi-line reply without argument)."""
        return self._listing("LIST", args, lambda m: str(m.size))

    def cmd_uidl(self, args: list[str], rest: str) -> bytes:
        """UIDL [msg]: unique ids (a multi-line reply without argument)."""
        return self._listing("UIDL", args, lambda m: m.uid)

    def _listing(self, verb: str, args: list[str], item: Callable[[DemoMessage], str]) -> bytes:
        if len(args) > 1:
            return _err(f"usage: {verb} [msg]")
        if args:
            message = self._lookup(args[0])
            if message is None:
                return _err("no such message")
            return _ok(f"{int(args[0])} {item(message)}")
        count, octets = self._stat()
        lines = [f"{i} {item(m)}".encode() for i, m in self._live()]
        return _multiline(f"{count} messages ({octets} octets)", lines)

    def cmd_retr(self, args: list[str], rest: str) -> bytes:
        """RETR msg: the whole message, dot-stuffed."""
        message = self._lookup(args[0]) if len(args) == 1 else None
        if message is None:
            return _err("no such message" if len(args) == 1 else "usage: RETR msg")
        return _multiline(f"{message.size} octets", message.text.split(b"\r\n")[:-1])

    def cmd_top(self, args: list[str], rest: str) -> bytes:
        """TOP msg n: the header, the blank line, and the first n body lines."""
        if len(args) != 2 or _parse_number(args[1]) is None:
            return _err("usage: TOP msg n")
        message = self._lookup(args[0])
        if message is None:
            return _err("no such message")
        head, _, body = message.text.partition(b"\r\n\r\n")
        body_lines = body.split(b"\r\n")[:-1][: int(args[1])]
        return _multiline("top of message follows", [*head.split(b"\r\n"), b"", *body_lines])

    def cmd_dele(self, args: list[str], rest: str) -> bytes:
        """DELE msg: mark the message; QUIT removes it, RSET unmarks it."""
        if len(args) != 1:
            return _err("usage: DELE msg")
        if self._lookup(args[0]) is None:
            return _err("no such message")
        number = int(args[0])
        self.deleted.add(number)
        return _ok(f"message {number} deleted")

    def cmd_rset(self, args: list[str], rest: str) -> bytes:
        """RSET: unmark every message marked as deleted."""
        if args:
            return _err("usage: RSET")
        self.deleted.clear()
        count, octets = self._stat()
        return _ok(f"maildrop has {count} messages ({octets} octets)")

    def cmd_noop(self, args: list[str], rest: str) -> bytes:
        """NOOP: nothing, positively."""
        return _err("usage: NOOP") if args else b"+OK\r\n"


_Handler = Callable[[DemoSession, list[str], str], bytes]
_AUTH = frozenset({State.AUTHORIZATION})
_TRANS = frozenset({State.TRANSACTION})
_BOTH = _AUTH | _TRANS

#: verb -> (handler, states where it is valid): RFC 1939 sections 4-7, RFC 2449, RFC 5034.
_COMMANDS: dict[str, tuple[_Handler, frozenset[State]]] = {
    "CAPA": (DemoSession.cmd_capa, _BOTH),
    "QUIT": (DemoSession.cmd_quit, _BOTH),
    "USER": (DemoSession.cmd_user, _AUTH),
    "PASS": (DemoSession.cmd_pass, _AUTH),
    "APOP": (DemoSession.cmd_apop, _AUTH),
    "AUTH": (DemoSession.cmd_auth, _AUTH),
    "STLS": (DemoSession.cmd_stls, _AUTH),
    "STAT": (DemoSession.cmd_stat, _TRANS),
    "LIST": (DemoSession.cmd_list, _TRANS),
    "UIDL": (DemoSession.cmd_uidl, _TRANS),
    "RETR": (DemoSession.cmd_retr, _TRANS),
    "TOP": (DemoSession.cmd_top, _TRANS),
    "DELE": (DemoSession.cmd_dele, _TRANS),
    "RSET": (DemoSession.cmd_rset, _TRANS),
    "NOOP": (DemoSession.cmd_noop, _TRANS),
}


class _LineTooLong(Exception):
    pass


def _take_line(buffer: bytearray) -> bytes | None:
    """Cut one line (CRLF, or a lone LF from a sloppy client) off the front of ``buffer``."""
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > MAX_LINE:
            raise _LineTooLong
        return None
    if end + 1 > MAX_LINE:
        raise _LineTooLong
    line = bytes(buffer[:end]).removesuffix(b"\r")
    del buffer[: end + 1]
    return line


async def _converse(stream: trio.SSLStream[trio.SocketStream], session: DemoSession) -> None:
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        await stream.do_handshake()
    await stream.send_all(session.greeting())
    buffer = bytearray()
    while not session.finished:
        line = _take_line(buffer)
        if line is None:
            with trio.fail_after(IDLE_TIMEOUT):
                data = await stream.receive_some(4096)
            if not data:
                return
            buffer += data
            continue
        # Pipelined commands are answered one at a time, in order (RFC 2449 section 6.6).
        await stream.send_all(session.handle_line(line))


async def handle_connection(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Serve one POP3S connection; never lets an error escape (one bad client must not stop the
    server)."""
    session = DemoSession()
    try:
        try:
            await _converse(stream, session)
        except _LineTooLong:
            await stream.send_all(_err("line too long"))
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        # The client went away (or stalled): normal for a server, nothing to report.
        await trio.aclose_forcefully(stream)
    except Exception as exc:
        await trio.aclose_forcefully(stream)
        log.warning("demo_upstream.session_error", error_type=type(exc).__name__)


async def serve_demo_upstream(
    ssl_context: ssl.SSLContext,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the demo POP3S server until cancelled.

    Args:
        ssl_context: the server TLS context (see :meth:`pop3proxy.demo_pki.DemoPKI.server_context`).
        host: address to bind; the demo only ever uses loopback.
        port: TCP port, 0 for an ephemeral one.
        task_status: receives the bound port, for ``nursery.start``.
    """
    listeners = await trio.open_ssl_over_tcp_listeners(port, ssl_context, host=host)
    transport = listeners[0].transport_listener
    if not isinstance(transport, trio.SocketListener):  # pragma: no cover - trio's contract
        raise TypeError("expected a TCP listener")
    bound_port: int = transport.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle_connection, listeners)
        task_status.started(bound_port)
