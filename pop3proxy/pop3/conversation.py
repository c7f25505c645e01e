"""The POP3 conversation between one client and one server, as a sans-IO state machine.

Theory of operation
-------------------
The proxy feeds every octet it reads from the client to :meth:`Pop3Conversation.receive_client`
and every octet it reads from the server to :meth:`Pop3Conversation.receive_server`. Each call
returns the :mod:`events <pop3proxy.pop3.events>` those octets completed, and queues the octets
to forward: the caller sends :meth:`take_upstream_bytes` to the server and
:meth:`take_client_bytes` to the client. What is forwarded is exactly what was received,
except where this module rewrites on purpose:

* ``CAPA`` lines named in ``hidden_capabilities`` (``STLS``: the client side is plaintext by
  design) are dropped;
* commands named in ``local_replies`` (``STLS``) never reach the server; the conversation
  answers them itself, in their place in the reply order, so pipelining stays intact.

Rule 1: nothing here does I/O, reads a clock or logs. Rule 2: every state transition lives in
``_TRANSITIONS`` below; everything else only reads ``state``.

POP3 has no framing of its own: whether a reply has a body depends on the command that it
answers and on that command's arguments (RFC 1939 section 3). Commands therefore enter a FIFO
queue when the client sends them, and each status line from the server answers the command
at the head of the queue. The queue is what makes RFC 2449 PIPELINING work: a client may send
many commands in one write, and the replies come back in the same order.

Message bodies are never held: a body is scanned for the CRLF.CRLF terminator (RFC 1939
section 3; dot-stuffing guarantees it appears nowhere else) and forwarded as the read
delivered it, whatever its size. Only status lines, CAPA lines and client lines are
buffered, each up to a named limit.
"""

from __future__ import annotations

import base64
import binascii
import re
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

from pop3proxy.pop3.errors import LocalProtocolError, RemoteProtocolError
from pop3proxy.pop3.events import (
    BodyChunk,
    BodyEnd,
    CapabilityLine,
    Command,
    CommandCompleted,
    ConnectionClosed,
    Event,
    Greeting,
    LocalReply,
    LoginFailed,
    LoginSucceeded,
    Response,
    SaslChallenge,
    SaslEnded,
    SaslResponse,
    SaslStarted,
    Secret,
    State,
    Status,
    UnsolicitedResponse,
    UserNamed,
)

__all__ = [
    "KNOWN_VERBS",
    "MAX_COMMAND_LINE",
    "MAX_SASL_LINE",
    "MAX_STATUS_LINE",
    "STLS_REFUSAL",
    "UNKNOWN_VERB",
    "Pop3Conversation",
    "parse_status",
]

#: RFC 2449 section 4: a command line is at most 255 octets, CRLF included.
MAX_COMMAND_LINE = 255
#: RFC 5034 section 4 sets no bound on AUTH lines; XOAUTH2 tokens run to a few KiB.
MAX_SASL_LINE = 8192
#: RFC 2449 section 4 allows 512 octets per response line; real servers send longer
#: greetings and CAPA lines, so be lenient but bounded.
MAX_STATUS_LINE = 4096

#: What a client that sends STLS gets. fetchmail >= 6.4 sends STLS even when CAPA does not
#: offer it, and gives up on -ERR; it must be configured with ``sslproto ''``.
STLS_REFUSAL = (
    b"-ERR STLS is not available on this plaintext port: pop3proxy already relays the session "
    b"to the server over TLS (fetchmail: set sslproto '')\r\n"
)

_TERMINATOR = b"\r\n.\r\n"
_APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+>")

#: Commands whose positive reply is multi-line whatever their arguments (RFC 1939, RFC 2449).
_MULTILINE_ALWAYS = frozenset({"CAPA", "RETR", "TOP"})
#: Commands whose positive reply is multi-line only without an argument: ``LIST`` and ``UIDL``
#: (RFC 1939 section 5, 7), and ``AUTH`` which lists the mechanisms (RFC 1734 usage).
_MULTILINE_WITHOUT_ARGS = frozenset({"LIST", "UIDL", "AUTH"})
#: Commands whose arguments are all secret. RPOP (RFC 1081) is obsolete but carries a
#: credential-like token.
_ALL_ARGS_SECRET = frozenset({"PASS", "RPOP"})

#: Verbs reported by name. Any other first word is reported as ``UNKNOWN`` with the whole
#: line as a secret: a confused client (or a person at telnet) may send a bare password.
#: RFC 1939, RFC 1081/1460 (RPOP, LAST), RFC 2449 (CAPA), RFC 2595 (STLS), RFC 5034 (AUTH),
#: RFC 6856 (UTF8, LANG), and extensions seen in the wild (XTND, XCLIENT).
KNOWN_VERBS = frozenset(
    {
        "USER", "PASS", "APOP", "AUTH", "QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP",
        "RSET", "TOP", "UIDL", "CAPA", "STLS", "RPOP", "LAST", "UTF8", "LANG", "XTND",
        "XCLIENT",
    }
)  # fmt: skip
UNKNOWN_VERB = "UNKNOWN"
_FIRST_WORD = re.compile(r"(\S*)\s?(.*)", re.DOTALL)

#: Pseudo verb for the state table: AUTH with a mechanism is a login, AUTH alone is a listing.
_SASL = "AUTH <mechanism>"

#: (state, verb, positive reply) -> new state. RFC 1939 sections 4-6, RFC 5034 section 4.
_TRANSITIONS: Mapping[tuple[State, str, bool], State] = {
    (State.AUTHORIZATION, "PASS", True): State.TRANSACTION,
    (State.AUTHORIZATION, "APOP", True): State.TRANSACTION,
    (State.AUTHORIZATION, _SASL, True): State.TRANSACTION,
    (State.AUTHORIZATION, "QUIT", True): State.CLOSED,
    (State.TRANSACTION, "QUIT", True): State.UPDATE,
}
#: Verbs whose reply decides a login (RFC 1939 section 7, RFC 5034).
_LOGIN_VERBS = frozenset({"PASS", "APOP", _SASL})
#: Verbs whose reply has an effect beyond its events: every verb of ``_TRANSITIONS``, and USER.
#: Replies to any other verb (most of them) skip the per-verb checks.
_EFFECT_VERBS = frozenset({"USER", *(verb for _state, verb, _ok in _TRANSITIONS)})

#: Status lines without text (``+OK`` to NOOP is the most common reply): one shared instance
#: each, as Status is frozen.
_BARE_OK = Status(ok=True, code=None, text="")
_BARE_ERR = Status(ok=False, code=None, text="")
#: Status indicators (RFC 1939 section 3).
_INDICATORS = (b"+OK", b"-ERR")
#: What may follow a verb of four letters on its line (white space, or the line's end).
_VERB_ENDS = (b" ", b"\t", b"\r", b"\n", b"\x0b", b"\x0c")  # a tuple: bytearray slices too
_UNUSABLE = "conversation already failed with a protocol error"


def parse_status(line: bytes) -> Status | None:
    """Parse a ``+OK``/``-ERR`` line, with its RFC 2449 section 8 response code; None if neither."""
    # RFC 1939 section 3 indicators are upper case; upper-casing is for servers that differ.
    # Neither indicator contains CR or LF: testing the line with its CRLF gives the same answer.
    if not line.startswith(_INDICATORS) and not line[:4].upper().startswith(_INDICATORS):
        return None
    ok = line[:1] == b"+"
    rest = (line[3:] if ok else line[4:]).rstrip(b"\r\n").lstrip(b" ")
    if not rest:
        return _BARE_OK if ok else _BARE_ERR
    code: str | None = None
    if rest.startswith(b"["):
        end = rest.find(b"]")
        if end > 1:
            code = rest[1:end].decode("ascii", "replace")
            rest = rest[end + 1 :].lstrip(b" ")
    return Status(ok=ok, code=code, text=rest.decode("utf-8", "replace"))


def _is_sasl_challenge(line: bytes) -> bool:
    """A continuation request, ``+`` [SP base64] CRLF, not ``+OK`` (RFC 5034 section 4)."""
    return line.startswith(b"+") and line[:3].upper() != b"+OK"


def _plain_user(raw: bytes) -> bytes | None:
    parts = raw.split(b"\0")  # authzid NUL authcid NUL passwd (RFC 4616 section 2)
    return parts[1] if len(parts) == 3 else None


def _cram_md5_user(raw: bytes) -> bytes | None:
    user, _, _digest = raw.rpartition(b" ")  # user SP digest (RFC 2195 section 2)
    return user or None


def _xoauth2_user(raw: bytes) -> bytes | None:
    first = raw.split(b"\x01", 1)[0]  # user=...^Aauth=Bearer ...^A^A
    return first[5:] if first.startswith(b"user=") else None


#: How to read the user name from the first client SASL message of each mechanism.
_SASL_USER_READERS = {
    "PLAIN": _plain_user,
    "LOGIN": lambda raw: raw,
    "CRAM-MD5": _cram_md5_user,
    "XOAUTH2": _xoauth2_user,
}


def _sasl_user(mechanism: str, first_client_data: Secret | None) -> str | None:
    """The user name carried in the first SASL message, for logging; never the credential."""
    reader = _SASL_USER_READERS.get(mechanism)
    if reader is None or first_client_data is None:
        return None
    try:
        raw = base64.b64decode(first_client_data.reveal(), validate=True)
        user = reader(raw)
        text = user.decode("utf-8") if user else None
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return text if text and text.isprintable() else None


@dataclass(slots=True)
class _Pending:
    """A command waiting for its reply, with what its reply needs to be understood."""

    command: Command
    multiline: bool
    #: Bytes the proxy answers with instead of the server, or None.
    local_reply: bytes | None = None
    #: For AUTH with a mechanism: the SASL exchange.
    mechanism: str | None = None
    sasl_first: Secret | None = None
    sasl_lines_sent: int = 0
    sasl_challenges: int = 0
    sasl_cancelled: bool = False
    reply_octets: int = 0
    #: The status line of a multi-line reply, kept until its body ends.
    status: Status | None = None


class Pop3Conversation:
    """Both directions of one POP3 session, seen from the middle.

    Args:
        hidden_capabilities: CAPA lines (by capability name) removed from what the client
            sees. Default: ``STLS``, because the client side is plaintext (RFC 2595 section 4).
        local_replies: verbs the proxy answers itself, mapped to the complete reply line.
            Default: ``STLS`` answered with :data:`STLS_REFUSAL`.
        max_command_line: client command line limit, CRLF included (RFC 2449 section 4).
        max_sasl_line: limit for ``AUTH`` command lines and SASL continuation lines.
        max_status_line: limit for server status lines and CAPA lines.
        max_pipelined: most commands waiting for replies; further complete lines stay
            buffered (:attr:`client_paused`) until replies arrive. None: no bound.
    """

    def __init__(
        self,
        *,
        hidden_capabilities: frozenset[str] = frozenset({"STLS"}),
        local_replies: Mapping[str, bytes] | None = None,
        max_command_line: int = MAX_COMMAND_LINE,
        max_sasl_line: int = MAX_SASL_LINE,
        max_status_line: int = MAX_STATUS_LINE,
        max_pipelined: int | None = None,
    ) -> None:
        self._hidden = frozenset(c.upper() for c in hidden_capabilities)
        replies = {"STLS": STLS_REFUSAL} if local_replies is None else local_replies
        self._local_replies = {verb.upper(): line for verb, line in replies.items()}
        self._max_command_line = max_command_line
        self._max_sasl_line = max_sasl_line
        self._max_status_line = max_status_line
        #: ``max_pipelined`` as a number: no bound is more than can ever be pending.
        self._pipeline_limit = sys.maxsize if max_pipelined is None else max_pipelined
        #: A line no longer than this is within both line limits, whatever its verb.
        self._short_line = min(max_command_line, max_sasl_line)
        #: Text inserted after ``+OK`` in the greeting (a migration notice), or None. Set it
        #: before the greeting arrives; the APOP timestamp is kept.
        self.greeting_notice: str | None = None

        #: RFC 1939 section 3 state, as far as the replies have shown it.
        self.state = State.GREETING
        #: The user name of the current or last login attempt (PII, not a secret).
        self.user: str | None = None
        #: The server answered QUIT with +OK: it will close, and may skip TLS close_notify.
        self.quit_acknowledged = False
        self._seq = 0
        self._pending: deque[_Pending] = deque()
        self._open_auth: _Pending | None = None
        self._client_buf = bytearray()
        self._server_buf = bytearray()
        #: The multi-line reply being relayed, and how: CAPA line by line, the rest streamed.
        self._body: _Pending | None = None
        self._body_by_line = False
        self._tail = b""
        self._held = b""
        self._to_server: list[tuple[int, bytes]] = []
        self._to_client: list[bytes] = []
        self._broken = False

    # ------------------------------------------------------------------ public API

    @property
    def pending(self) -> int:
        """Commands sent by the client whose reply has not been completed."""
        return len(self._pending)

    @property
    def in_body(self) -> bool:
        """A multi-line reply body is being relayed (RETR, TOP, LIST...)."""
        return self._body is not None

    @property
    def client_backlog(self) -> bool:
        """Complete client lines are buffered, unprocessed: call ``receive_client(b"")``
        (once :attr:`client_paused` is false) before reading more from the client."""
        return b"\n" in self._client_buf

    @property
    def client_paused(self) -> bool:
        """Buffered client lines must wait for replies: ``max_pipelined`` commands are
        pending, or the next line is a QUIT that waits for the replies before it."""
        return self.client_backlog and (
            self._pipeline_full() or self._quit_waits(self._client_buf, 0)
        )

    def _pipeline_full(self) -> bool:
        return self._open_auth is None and len(self._pending) >= self._pipeline_limit

    def _quit_waits(self, buf: bytes | bytearray, start: int) -> bool:
        """A pipelined QUIT is held until every earlier reply is complete.

        A server may end the session as soon as it reads QUIT, discarding replies still in
        its output buffer: Dovecot 2.3 was seen to drop the end of a large RETR and its
        own ``+OK`` to a QUIT pipelined behind it when the reader was slow. Held here, QUIT
        reaches the server only after the last reply has reached the proxy (RFC 1939
        section 6: the UPDATE state is entered only with QUIT, so nothing is lost by waiting).
        """
        return (
            bool(self._pending)
            and self._open_auth is None
            and buf[start : start + 4].upper() == b"QUIT"
            and buf[start + 4 : start + 5] in _VERB_ENDS
        )

    def receive_client(self, data: bytes) -> list[Event]:
        """Feed octets from the client; return the events they complete.

        Raises:
            RemoteProtocolError: a client line is over its limit.
        """
        if self._broken:
            raise LocalProtocolError(_UNUSABLE)
        events: list[Event] = []
        buf = self._client_buf
        end = data.find(b"\n") + 1
        if (
            0 < end == len(data) <= self._short_line
            and not buf
            and (self._open_auth is not None or len(self._pending) < self._pipeline_limit)
            and not self._quit_waits(data, 0)
        ):
            # The common read: exactly one line (its first LF is its last octet), within both
            # limits, nothing buffered before it, room in the pipeline (not _pipeline_full).
            # The loop below would copy it through the buffer only to find it valid: forward
            # data itself (bytes are immutable; body chunks are forwarded uncopied too).
            self._client_line(data, events)
            return events
        buf += data
        start = 0
        try:
            while not self._pipeline_full():
                newline = buf.find(b"\n", start)
                if newline < 0:
                    self._check_client_line(bytes(buf[start : start + 5]), len(buf) - start)
                    break
                if self._quit_waits(buf, start):
                    break
                line = bytes(buf[start : newline + 1])
                start = newline + 1
                self._check_client_line(line, len(line))
                self._client_line(line, events)
        finally:
            del buf[:start]
        return events

    def receive_server(self, data: bytes) -> list[Event]:
        """Feed octets from the server; return the events they complete.

        Raises:
            RemoteProtocolError: the server sent something that is not POP3.
        """
        if self._broken:
            raise LocalProtocolError(_UNUSABLE)
        events: list[Event] = []
        limit = self._max_status_line
        pos, end = 0, len(data)
        while pos < end:
            if self._body is not None and not self._body_by_line:
                pos = self._stream_body(data, pos, events)
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._server_buf += data[pos:]
                if len(self._server_buf) > limit:
                    self._server_line_too_long()
                break
            if self._server_buf:
                line = bytes(self._server_buf) + data[pos : newline + 1]
                self._server_buf.clear()
            else:
                line = data[pos : newline + 1]  # all of data, not a copy, when it is one line
            pos = newline + 1
            if len(line) > limit:
                self._server_line_too_long()
            self._server_line(line, events)
        return events

    def client_closed(self) -> list[Event]:
        """The client closed its side; clean when no reply was outstanding."""
        clean = not self._pending and not self._client_buf
        return [ConnectionClosed(side="client", clean=clean, state=self.state)]

    def server_closed(self) -> list[Event]:
        """The server closed its side.

        Clean when nothing was cut short: no command waiting, no reply half sent. This is
        how the caller tells a server that closes after ``+OK`` to QUIT without a TLS
        close_notify (common, harmless) from a truncated reply (an error).
        """
        clean = not self._pending and not self._server_buf and self._body is None
        self.state = State.CLOSED
        return [ConnectionClosed(side="server", clean=clean, state=self.state)]

    def take_upstream_bytes(self) -> bytes:
        """Octets to send to the server, in order; empties the queue."""
        out = self._to_server
        if not out:
            return b""
        data = out[0][1] if len(out) == 1 else b"".join([chunk for _seq, chunk in out])
        out.clear()
        return data

    @property
    def owes_client(self) -> bool:
        """Octets for the client are queued (not yet taken with :meth:`take_client_bytes`)."""
        return bool(self._to_client)

    def take_client_bytes(self) -> bytes:
        """Octets to send to the client, in order; empties the queue."""
        out = self._to_client
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def answer_locally(self, command: Command, reply: bytes) -> list[Event]:
        """Answer ``command`` with ``reply`` instead of sending it to the server.

        For the caller's own policies (e.g. refusing a login by network). Must be called
        before the command's octets were taken with :meth:`take_upstream_bytes`. The reply
        still goes out in the command's place among the replies.
        """
        kept = [(seq, chunk) for seq, chunk in self._to_server if seq != command.seq]
        if len(kept) == len(self._to_server):
            raise LocalProtocolError("command already sent upstream or unknown")
        self._to_server = kept
        for item in self._pending:
            if item.command.seq == command.seq:
                item.local_reply = reply
                if self._open_auth is item:
                    self._open_auth = None
                break
        events: list[Event] = []
        self._flush_local_replies(events)
        return events

    # ------------------------------------------------------------------ client side

    def _check_client_line(self, head: bytes, length: int) -> None:
        in_sasl = self._open_auth is not None or head[:5].upper() == b"AUTH "
        limit = self._max_sasl_line if in_sasl else self._max_command_line
        if length > limit:
            self._broken = True
            raise RemoteProtocolError(
                f"command line longer than {limit} octets",
                side="client",
                reply_hint=f"-ERR command line too long (limit {limit} octets)\r\n".encode(),
            )

    def _client_line(self, line: bytes, events: list[Event]) -> None:
        auth = self._open_auth
        if auth is not None:
            self._sasl_client_line(auth, line, events)
            return
        self._seq += 1
        command = _parse_command(self._seq, line)
        verb = command.verb
        multiline = verb in _MULTILINE_ALWAYS or (
            verb in _MULTILINE_WITHOUT_ARGS and not command.args
        )
        pending = _Pending(command, multiline)
        events.append(command)
        self._pending.append(pending)
        if verb in self._local_replies:
            pending.local_reply = self._local_replies[verb]
            self._flush_local_replies(events)
            return
        if verb == "AUTH" and command.args:
            pending.mechanism = str(command.args[0]).upper()
            initial = command.args[1] if len(command.args) > 1 else None
            pending.sasl_first = initial if isinstance(initial, Secret) else None
            self._open_auth = pending
            events.append(
                SaslStarted(command, pending.mechanism, initial_response=initial is not None)
            )
            self._name_sasl_user(pending, events)
        elif verb in {"USER", "APOP"} and command.args:
            self.user = str(command.args[0])
            events.append(UserNamed(command, self.user, "APOP" if verb == "APOP" else "USER"))
        self._to_server.append((command.seq, line))

    def _name_sasl_user(self, auth: _Pending, events: list[Event]) -> None:
        user = _sasl_user(auth.mechanism or "", auth.sasl_first)
        if user is not None:
            events.append(UserNamed(auth.command, user, auth.mechanism or ""))

    def _sasl_client_line(self, auth: _Pending, line: bytes, events: list[Event]) -> None:
        data = Secret(line.rstrip(b"\r\n").decode("utf-8", "replace"))
        cancelled = data.reveal() == "*"
        auth.sasl_lines_sent += 1
        auth.sasl_cancelled = auth.sasl_cancelled or cancelled
        events.append(SaslResponse(auth.command, data, cancelled=cancelled))
        self._to_server.append((auth.command.seq, line))
        if auth.sasl_first is None and not cancelled:
            auth.sasl_first = data
            self._name_sasl_user(auth, events)

    # ------------------------------------------------------------------ server side

    def _server_line_too_long(self) -> NoReturn:
        self._broken = True
        raise RemoteProtocolError(
            f"server line longer than {self._max_status_line} octets",
            side="server",
            reply_hint=b"-ERR [SYS/TEMP] the mail server sent an invalid reply\r\n",
        )

    def _server_line(self, line: bytes, events: list[Event]) -> None:
        if self._body is not None:
            self._capa_line(self._body, line, events)
            return
        if self.state is State.GREETING:
            self._greeting(line, events)
            return
        if not self._pending:
            events.append(UnsolicitedResponse(self._require_status(line)))
            self._to_client.append(line)
            return
        head = self._pending[0]
        head.reply_octets += len(line)
        self._to_client.append(line)
        if head.mechanism is not None and _is_sasl_challenge(line):
            head.sasl_challenges += 1
            events.append(SaslChallenge(head.command))
            return
        status = parse_status(line)
        if status is None:
            self._not_a_status_line()
        multiline = status.ok and head.multiline
        events.append(Response(head.command, status, multiline))
        if multiline:
            head.status = status
            self._body = head
            self._body_by_line = head.command.verb == "CAPA"
            self._tail = line[-4:]
        else:
            self._complete(status, events)

    def _greeting(self, line: bytes, events: list[Event]) -> None:
        status = self._require_status(line)
        events.append(Greeting(status, _apop_timestamp(line)))
        if status.ok and self.greeting_notice:
            line = b"+OK " + self.greeting_notice.encode() + b" " + line[3:].lstrip(b" ")
        self._to_client.append(line)
        self.state = State.AUTHORIZATION if status.ok else State.CLOSED
        self._flush_local_replies(events)

    def _capa_line(self, head: _Pending, line: bytes, events: list[Event]) -> None:
        """One line of a CAPA body (RFC 2449 section 5), filtered by ``hidden_capabilities``."""
        if line in (b".\r\n", b".\n"):
            head.reply_octets += len(line)
            self._to_client.append(line)
            self._end_body(events)
            return
        words = line.rstrip(b"\r\n").decode("utf-8", "replace").split()
        name = words[0].upper() if words else ""
        hidden = name in self._hidden
        events.append(CapabilityLine(head.command, name, tuple(words[1:]), hidden))
        if not hidden:
            head.reply_octets += len(line)
            self._to_client.append(line)

    def _stream_body(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Forward body octets from ``data[pos:]`` up to the terminator; return where it stopped.

        Only the last four octets of the body so far are kept, to find a terminator split
        across two reads; the body itself is never copied into a buffer. Octets are
        forwarded at once, but a read that ends in what may be the start of the terminator
        (``CRLF .`` or ``CRLF . CR``) holds those octets back from its :class:`BodyChunk`
        until the next read tells whether they were body or terminator.
        """
        head = self._body
        if head is None:  # pragma: no cover - guarded by the caller
            raise LocalProtocolError("no body in progress")
        tail, held = self._tail, self._held
        probe = tail + data[pos : pos + 4]
        found = probe.find(_TERMINATOR)
        if found >= 0:  # the terminator began in an earlier read: what was held is part of it
            end = pos + found + len(_TERMINATOR) - len(tail)
            held = b""
        elif len(self._pending) == 1:
            # Nothing else is outstanding, and a POP3 server speaks only when spoken to
            # (RFC 1939 section 3): the terminator can only end the read. Checking the end
            # instead of scanning every octet is most of the relay's CPU per GiB.
            end = len(data) if data.endswith(_TERMINATOR) and len(data) - pos >= 5 else -1
        else:
            found = data.find(_TERMINATOR, pos)
            end = found + len(_TERMINATOR) if found >= 0 else -1
        if end < 0:
            chunk = data if pos == 0 else data[pos:]
            head.reply_octets += len(chunk)
            self._to_client.append(chunk)
            self._tail = tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
            hold = 2 if tail == b"\r\n.\r" else 1 if tail.endswith(b"\r\n.") else 0
            body = held + chunk if held else chunk
            self._held = body[len(body) - hold :] if hold else b""
            if len(body) > hold:
                events.append(BodyChunk(head.command, body[: len(body) - hold] if hold else body))
            return len(data)
        chunk = data[pos:end]
        head.reply_octets += len(chunk)
        self._to_client.append(chunk)
        body = held + data[pos : max(pos, end - 3)]
        if body:
            events.append(BodyChunk(head.command, body))
        self._end_body(events)
        return end

    def _end_body(self, events: list[Event]) -> None:
        head = self._body
        if head is None:  # pragma: no cover - guarded by the callers
            raise LocalProtocolError("no body in progress")
        self._body = None
        self._tail = self._held = b""
        events.append(BodyEnd(head.command))
        self._complete(head.status or _BARE_OK, events)

    def _complete(self, status: Status, events: list[Event]) -> None:
        """The head command's reply is complete: apply its effects, then release local replies."""
        pending = self._pending
        head = pending.popleft()
        command = head.command
        verb = _SASL if head.mechanism is not None else command.verb
        if verb in _EFFECT_VERBS:
            if head.mechanism is not None:
                self._end_sasl(head, status, events)
            elif verb == "PASS":
                self._login_result(status, "USER", self.user, events)
            elif verb == "APOP":
                self._login_result(status, "APOP", self.user, events)
            elif verb == "USER" and not status.ok:
                self.user = None
            elif verb == "QUIT" and status.ok:
                self.quit_acknowledged = True
            self.state = _TRANSITIONS.get((self.state, verb, status.ok), self.state)
        events.append(CommandCompleted(command, status, head.reply_octets))
        if pending and pending[0].local_reply is not None:  # rare: skip the call otherwise
            self._flush_local_replies(events)

    def _end_sasl(self, head: _Pending, status: Status, events: list[Event]) -> None:
        mechanism = head.mechanism or ""
        if self._open_auth is head:
            self._open_auth = None
        events.append(SaslEnded(head.command, mechanism, status, cancelled=head.sasl_cancelled))
        # LOGIN's first line is only known to be a user name once the server accepted it: a
        # confused client may send its password first.
        trusted = status.ok or mechanism != "LOGIN"
        self.user = _sasl_user(mechanism, head.sasl_first) if trusted else None
        self._login_result(status, mechanism, self.user, events, cancelled=head.sasl_cancelled)
        # Lines the client sent that no challenge asked for are read by the server as
        # commands; queue them so that their replies are matched (RFC 5034 forbids this,
        # but a confused client must not desynchronise the queue).
        for _ in range(max(0, head.sasl_lines_sent - head.sasl_challenges)):
            self._seq += 1
            orphan = Command(self._seq, UNKNOWN_VERB, (Secret("unsolicited SASL line"),))
            self._pending.appendleft(_Pending(command=orphan, multiline=False))

    def _login_result(
        self,
        status: Status,
        mechanism: str,
        user: str | None,
        events: list[Event],
        *,
        cancelled: bool = False,
    ) -> None:
        if status.ok:
            events.append(LoginSucceeded(user=user, mechanism=mechanism))
        else:
            events.append(LoginFailed(user, mechanism, status, cancelled=cancelled))

    def _flush_local_replies(self, events: list[Event]) -> None:
        """Send the replies the proxy owes, once every earlier reply has gone out."""
        if self.state is State.GREETING:
            return
        while self._pending and self._pending[0].local_reply is not None and self._body is None:
            head = self._pending.popleft()
            reply = head.local_reply or b""
            status = parse_status(reply) or _BARE_ERR
            self._to_client.append(reply)
            events.append(LocalReply(head.command, status))
            events.append(CommandCompleted(head.command, status, len(reply)))

    def _require_status(self, line: bytes) -> Status:
        status = parse_status(line)
        if status is None:
            self._not_a_status_line()
        return status

    def _not_a_status_line(self) -> NoReturn:
        self._broken = True
        raise RemoteProtocolError(
            "server line is neither +OK nor -ERR",
            side="server",
            reply_hint=b"-ERR [SYS/TEMP] the mail server sent an invalid reply\r\n",
        )


def _parse_command(seq: int, line: bytes) -> Command:
    """Split a command line into verb and arguments, marking secrets (RFC 1939 section 3).

    The verb ends at the first white space of any kind: a server that splits on TAB must
    not see a login here that the log shows as something else.
    """
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    # A verb is usually alphanumeric, so holds no white space, and SP (if any) ends it; the
    # regular expression finds the end of anything else.
    word, _space, rest = text.partition(" ")
    if not word.isalnum():
        match = _FIRST_WORD.match(text)
        word, rest = (match.group(1), match.group(2)) if match else ("", "")
    verb = word.upper()
    if verb not in KNOWN_VERBS:
        return Command(seq, UNKNOWN_VERB, (Secret(text),) if text else ())
    if verb in _ALL_ARGS_SECRET:
        # RFC 1939 section 7: a password may contain spaces; it is the rest of the line.
        return Command(seq, verb, (Secret(rest),) if rest else ())
    if not rest:
        return Command(seq, verb)
    words = rest.split()
    args: tuple[str | Secret, ...]
    if verb == "APOP" and len(words) >= 2:
        args = (*words[:-1], Secret(words[-1]))
    elif verb == "AUTH" and len(words) >= 2:
        args = (words[0], *(Secret(w) for w in words[1:]))
    else:
        args = tuple(words)
    return Command(seq, verb, args)


def _apop_timestamp(line: bytes) -> str | None:
    match = _APOP_TIMESTAMP.search(line)
    return match.group().decode("ascii", "replace") if match else None
