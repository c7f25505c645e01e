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
* commands named in ``local_replies`` (``STLS``, ``XCLIENT``) never reach the server; the
  conversation answers them itself, in their place in the reply order, so pipelining stays
  intact;
* command lines that the server might read differently from the proxy (a NUL, a bare CR,
  a TAB, a user name with spaces...) are answered the same way, with ``-ERR [SYS/PERM]``
  (see "Command lines" below and :data:`REFUSALS`).

Client lines may also wait (:attr:`~Pop3Conversation.client_paused`) and are forwarded
later, unchanged: behind a full pipeline, a pipelined QUIT behind earlier replies, and a
line in an AUTH exchange until the server has asked for it.

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
from collections.abc import Callable, Mapping
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
    "REFUSALS",
    "SASL_REFUSAL",
    "STLS_REFUSAL",
    "UNKNOWN_VERB",
    "XCLIENT_REFUSAL",
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

#: What a client that sends XCLIENT gets. XCLIENT (Dovecot, Postfix) tells a server the
#: client's real address; a server that trusts the proxy's address would believe a client's
#: own XCLIENT line and log, rate-limit and authorize it as whichever address it claims.
XCLIENT_REFUSAL = b"-ERR [SYS/PERM] XCLIENT is not accepted from clients of this proxy\r\n"
#: The verbs answered here by default, never forwarded.
DEFAULT_LOCAL_REPLIES: Mapping[str, bytes] = {"STLS": STLS_REFUSAL, "XCLIENT": XCLIENT_REFUSAL}

_TERMINATOR = b"\r\n.\r\n"
_APOP_TIMESTAMP = re.compile(rb"<[^<>\s]+>")

#: Commands whose positive reply is multi-line whatever their arguments (RFC 1939, RFC 2449).
_MULTILINE_ALWAYS = frozenset({"CAPA", "RETR", "TOP"})
#: Commands whose positive reply is multi-line only without an argument: ``LIST`` and ``UIDL``
#: (RFC 1939 section 5, 7), and ``AUTH`` which lists the mechanisms (RFC 1734 usage).
_MULTILINE_WITHOUT_ARGS = frozenset({"LIST", "UIDL", "AUTH"})
#: Verbs reported by name. Any other first word is reported as ``UNKNOWN`` with the whole
#: line as a secret: a confused client (or a person at telnet) may send a bare password.
#: RFC 1939, RFC 1081/1460 (RPOP, LAST), RFC 2449 (CAPA), RFC 2595 (STLS), RFC 5034 (AUTH),
#: RFC 6856 (UTF8, LANG), and extensions seen in the wild (XTND, XCLIENT).
#:
#: What the log shows of their arguments: only an argument that has the form its verb
#: defines. Anything else a client puts there is a :class:`Secret`, because a confused
#: client may type a password anywhere, and what no RFC defines cannot be known to be safe:
#:
#: * secret: PASS and RPOP (the rest of the line: a password may contain spaces, RFC 1939
#:   section 7), the APOP digest, the AUTH initial response and every SASL line after it;
#: * user name (personal data, not a secret: logged, pseudonymised by the telemetry when a
#:   key is set): the one argument of USER and the first of APOP; nothing after it is ever
#:   reported, since a line with more is refused (see :data:`REFUSALS`);
#: * a SASL mechanism name (RFC 4422 section 3.1): AUTH's first argument;
#: * decimal numbers (message numbers, TOP's line count): LIST, UIDL, RETR, DELE, TOP;
#: * a language tag or ``*`` (RFC 6856 section 3): LANG; a keyword: XTND;
#: * no argument at all (QUIT, STAT, NOOP, RSET, CAPA, STLS, LAST, UTF8) or attributes that
#:   may name a person or an address (XCLIENT): whatever follows the verb is one secret.
KNOWN_VERBS = frozenset(
    {
        "USER", "PASS", "APOP", "AUTH", "QUIT", "STAT", "LIST", "RETR", "DELE", "NOOP",
        "RSET", "TOP", "UIDL", "CAPA", "STLS", "RPOP", "LAST", "UTF8", "LANG", "XTND",
        "XCLIENT",
    }
)  # fmt: skip
UNKNOWN_VERB = "UNKNOWN"
#: The verb as sent (any case: RFC 2449 section 3 keywords are case-insensitive, compared in
#: ASCII as servers do) to its name; ``bytes.upper`` maps ASCII letters only.
_VERB_NAMES = {verb.encode("ascii"): verb for verb in KNOWN_VERBS}
#: Verbs that name the user or start a login: their lines are read strictly.
_LOGIN_START_VERBS = frozenset({"USER", "APOP", "AUTH"})
_NUMBER = re.compile(rb"[0-9]{1,20}")
#: The form of each argument the log may show, per verb; the other verbs show none.
_SHOWN_ARGUMENTS: Mapping[str, re.Pattern[bytes]] = {
    "LIST": _NUMBER,
    "UIDL": _NUMBER,
    "RETR": _NUMBER,
    "DELE": _NUMBER,
    "TOP": _NUMBER,
    "LANG": re.compile(rb"[A-Za-z]{1,8}(?:-[A-Za-z0-9]{1,8})*|\*"),  # RFC 5646 section 2.1
    "XTND": re.compile(rb"[A-Za-z]{1,20}"),
}
#: Several such arguments, separated by single SPs.
_SHOWN_LISTS = {
    verb: re.compile(rb"(?:%s)(?: (?:%s))+" % (form.pattern, form.pattern))
    for verb, form in _SHOWN_ARGUMENTS.items()
}

# Command lines: what the proxy refuses to forward (RFC 1939 section 3, RFC 2449, RFC 6856).
#
# The proxy must read every line exactly as the upstream will, or a policy decided on one
# reading (a user bound to a network, a user rule) is applied to a login the upstream reads
# as another. Servers disagree on everything RFC 1939 section 3 leaves out (keywords and
# arguments of printable characters, separated by a single SP, ended by CRLF). Dovecot 2.3,
# for one, ends a user name at a NUL (``USER alice\0`` logs alice in), skips a CR inside
# the verb before login (``US\rER alice`` is USER), keeps a TAB inside a word and a bare CR
# inside an argument, takes everything after USER's SP as the name, and skips white space
# inside an AUTH initial response; other servers split words at any white space, some of
# them (Python's ``str.split``) at Unicode white space such as U+00A0. So the engine reads
# a line the one way every server agrees on and answers anything else itself:
#
# * a line ends at LF; a CR right before it is part of the line end (CRLF, RFC 1939 section 3).
#   A bare LF ends a line too, as in Dovecot, Cyrus, Courier, qpopper and UW ipop3d, so the
#   proxy and the upstream cut lines at the same places;
# * before its end a line has no C0 control octet and no DEL: no NUL, no TAB (RFC 1939 has
#   SP only, servers disagree on TAB and no client sends it) and no CR;
# * words are split at each SP, exactly (an empty word is an empty word), the verb is the
#   first and is ASCII;
# * octets 0x80-0xFF elsewhere pass unchanged: UTF-8 user names and passwords (RFC 6856),
#   legacy 8-bit passwords;
# * the lines that name a user or start a login are read strictly: USER takes one name,
#   APOP a name and a digest, AUTH a mechanism and an optional base64 initial response;
#   a user name is printable UTF-8 (``str.isprintable``: no control or format character,
#   no white space of any script).
#
# A refused line never reaches the upstream, is answered in its place among the replies
# (pipelining keeps its order), and reports no user name (nothing for a policy to check).
# SASL continuation lines are checked in :meth:`Pop3Conversation._sasl_client_line`.
_CONTROL_OCTET = re.compile(rb"[\x00-\x1f\x7f]")
_SASL_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}")  # RFC 4422 section 3.1, any case
#: Base64 as RFC 4648 section 4 writes it, padding included: what the SASL user readers decode.
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
#: RFC 5034 section 4: an empty initial response is sent as ``=``; ``*`` cancels an exchange.
_EMPTY_RESPONSE = b"="
_CANCEL = b"*"

#: The reply to a refused command line, by reason (the stable word logged with it). The code
#: is RFC 3206 ``[SYS/PERM]``: the same line is always refused, so retrying it is pointless,
#: and it is not ``[AUTH]``, which tells a client that the credentials are wrong (many then
#: ask the user for a new password). The session goes on.
REFUSALS: Mapping[str, bytes] = {
    "control_character": b"-ERR [SYS/PERM] a command line may not contain control characters "
    b"(NUL, TAB, a CR before its end...; RFC 1939 section 3)\r\n",
    "malformed_verb": b"-ERR [SYS/PERM] a command line starts with its keyword, in ASCII "
    b"(RFC 1939 section 3)\r\n",
    "malformed_user": b"-ERR [SYS/PERM] USER takes one user name: printable UTF-8 without "
    b"spaces (RFC 1939 section 7, RFC 6856)\r\n",
    "malformed_apop": b"-ERR [SYS/PERM] APOP takes a user name and a digest, separated by one "
    b"space (RFC 1939 section 7)\r\n",
    "malformed_auth": b"-ERR [SYS/PERM] AUTH takes a mechanism name and an optional base64 "
    b"initial response, separated by one space (RFC 5034 section 4)\r\n",
}
#: What a client gets for a SASL line that is not base64 (the session then ends: the server
#: waits for that line, and no reply in its place could keep the exchange in step).
SASL_REFUSAL = (
    b"-ERR [SYS/PERM] an AUTH response must be one line of base64, or * to cancel "
    b"(RFC 5034 section 4)\r\n"
)

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
#: What may follow a verb of four letters on its line (a SP, or the line's end).
_VERB_ENDS = (b" ", b"\r", b"\n")  # a tuple: bytearray slices too
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
    if len(parts) != 3:
        return None
    authzid, authcid, _password = parts
    # A login that acts for another identity (a master user) opens authzid's mailbox with
    # authcid's credentials: neither name alone says who logs in, so report none.
    return authcid if not authzid or authzid == authcid else None


def _cram_md5_user(raw: bytes) -> bytes | None:
    user, _, _digest = raw.rpartition(b" ")  # user SP digest (RFC 2195 section 2)
    return user or None


def _xoauth2_user(raw: bytes) -> bytes | None:
    first = raw.split(b"\x01", 1)[0]  # user=...^Aauth=Bearer ...^A^A
    return first[5:] if first.startswith(b"user=") else None


def _gs2_attribute(raw: bytes, name: bytes) -> bytes | None:
    """An attribute of a GS2-style first message, ``gs2-header`` then ``,``-separated pairs.

    SCRAM's client-first-message is ``n,[a=authzid],n=user,r=nonce`` (RFC 5802 section 7);
    OAUTHBEARER's is ``n,a=user,^A...`` (RFC 7628 section 3.1). An authzid that differs from
    the SCRAM user is a login acting for someone else: no single name, as for PLAIN.
    """
    fields = raw.split(b"\x01", 1)[0].split(b",")
    values = {item[:2]: item[2:] for item in fields[1:] if item[1:2] == b"="}
    return values.get(name + b"=")


def _scram_user(raw: bytes) -> bytes | None:
    user, authzid = _gs2_attribute(raw, b"n"), _gs2_attribute(raw, b"a")
    if authzid and authzid != user:
        return None
    return user.replace(b"=2C", b",").replace(b"=3D", b"=") if user else None


def _oauthbearer_user(raw: bytes) -> bytes | None:
    user = _gs2_attribute(raw, b"a")
    return user.replace(b"=2C", b",").replace(b"=3D", b"=") if user else None


#: How to read the user name from the first client SASL message of each mechanism; the
#: first message of any other mechanism (GSSAPI, NTLM, EXTERNAL...) names no user we can read.
_SASL_USER_READERS = {
    "PLAIN": _plain_user,
    "LOGIN": lambda raw: raw,
    "CRAM-MD5": _cram_md5_user,
    "XOAUTH2": _xoauth2_user,
    "OAUTHBEARER": _oauthbearer_user,
    "SCRAM-SHA-1": _scram_user,
    "SCRAM-SHA-1-PLUS": _scram_user,
    "SCRAM-SHA-256": _scram_user,
    "SCRAM-SHA-256-PLUS": _scram_user,
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
    #: Bytes the proxy answers with instead of the server, or None; and why (``LocalReply``).
    local_reply: bytes | None = None
    local_reason: str = ""
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
            Default: :data:`DEFAULT_LOCAL_REPLIES` (``STLS`` with :data:`STLS_REFUSAL`,
            ``XCLIENT`` with :data:`XCLIENT_REFUSAL`).
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
        replies = DEFAULT_LOCAL_REPLIES if local_replies is None else local_replies
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
        #: Set by :meth:`forward_nothing_after`: the last command whose octets may go upstream.
        self._last_forwarded: int | None = None
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
        pending, the next line is a QUIT that waits for the replies before it, or it is in
        an AUTH exchange and the server has not asked for it yet."""
        return self.client_backlog and (
            self._pipeline_full() or self._sasl_waits() or self._quit_waits(self._client_buf, 0)
        )

    def _pipeline_full(self) -> bool:
        return self._open_auth is None and len(self._pending) >= self._pipeline_limit

    def _sasl_waits(self) -> bool:
        """In an AUTH exchange, a client line waits until the server has asked for it.

        Until the server answers the AUTH line (or the last SASL line), nobody can tell how it
        will read the next one: as SASL data after a ``+`` continuation request, or as a
        command once the exchange is over (RFC 5034 section 4). Read here as SASL data and
        upstream as a command, a ``USER`` pipelined behind a failing ``AUTH`` would reach the
        server without a policy ever seeing the name. Held, each line is read once the
        server's answer says what it is (the server always answers: nothing can deadlock).
        """
        auth = self._open_auth
        return auth is not None and auth.sasl_challenges <= auth.sasl_lines_sent

    def _quit_waits(self, buf: bytes | bytearray, start: int) -> bool:
        """A pipelined QUIT is held until every earlier reply is complete.

        A server may end the session as soon as it reads QUIT, discarding replies still in
        its output buffer: Dovecot 2.3 was seen to drop the end of a large RETR and its
        own ``+OK`` to a QUIT pipelined behind it when the reader was slow. Held here, QUIT
        reaches the server only after the last reply has reached the proxy (RFC 1939
        section 6: the UPDATE state is entered only with QUIT, so nothing is lost by waiting).
        """
        if not (
            self._pending
            and self._open_auth is None
            and buf[start : start + 4].upper() == b"QUIT"
            and buf[start + 4 : start + 5] in _VERB_ENDS
        ):
            return False
        # Only a QUIT that will reach the server: one refused here (a control octet) is
        # answered in its place at once. ``buf`` holds the whole line (a LF follows).
        end = buf.find(b"\n", start)
        end -= buf[end - 1 : end] == b"\r"
        return _CONTROL_OCTET.search(buf, start, end) is None

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
        auth = self._open_auth
        if (
            0 < end == len(data) <= self._short_line
            and not buf
            and (
                len(self._pending) < self._pipeline_limit and not self._quit_waits(data, 0)
                if auth is None
                else auth.sasl_challenges > auth.sasl_lines_sent
            )
        ):
            # The common read: exactly one line (its first LF is its last octet), within both
            # limits, nothing buffered before it, and nothing makes it wait (a full pipeline,
            # a pipelined QUIT, a SASL line the server has not asked for yet).
            # The loop below would copy it through the buffer only to find it valid: forward
            # data itself (bytes are immutable; body chunks are forwarded uncopied too).
            self._client_line(data, events)
            return events
        buf += data
        start = 0
        try:
            while True:
                newline = buf.find(b"\n", start)
                # The next line's length is checked even while it waits: the relay keeps
                # reading while only part of a line is buffered.
                length = (newline + 1 if newline >= 0 else len(buf)) - start
                self._check_client_line(bytes(buf[start : start + 5]), length)
                if newline < 0:
                    break
                if self._pipeline_full() or self._sasl_waits() or self._quit_waits(buf, start):
                    break
                line = bytes(buf[start : newline + 1])
                start = newline + 1
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

    def answer_locally(
        self, command: Command, reply: bytes, *, reason: str = "caller"
    ) -> list[Event]:
        """Answer ``command`` with ``reply`` instead of sending it to the server.

        For the caller's own policies (e.g. refusing a login by network). Must be called
        before the command's octets were taken with :meth:`take_upstream_bytes`. The reply
        still goes out in the command's place among the replies; its :class:`LocalReply`
        carries ``reason``.
        """
        kept = [(seq, chunk) for seq, chunk in self._to_server if seq != command.seq]
        if len(kept) == len(self._to_server):
            raise LocalProtocolError("command already sent upstream or unknown")
        self._to_server = kept
        for item in self._pending:
            if item.command.seq == command.seq:
                item.local_reply = reply
                item.local_reason = reason
                if self._open_auth is item:
                    self._open_auth = None
                break
        events: list[Event] = []
        self._flush_local_replies(events)
        return events

    def forward_nothing_after(self, command: Command) -> None:
        """Send the server nothing the client sent after ``command``, now or later.

        For a caller that ends the session once ``command`` is answered (a refused login):
        a credential pipelined behind it (``USER bob`` refused, ``PASS ...`` in the same
        read) must not leave the proxy. Octets of earlier commands still go, so their
        replies, and the refusal in its place behind them, still reach the client.
        """
        self._last_forwarded = command.seq
        self._to_server = [(seq, chunk) for seq, chunk in self._to_server if seq <= command.seq]

    def _forward(self, seq: int, line: bytes) -> None:
        if self._last_forwarded is None or seq <= self._last_forwarded:
            self._to_server.append((seq, line))

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
        command, has_arguments, refusal = _parse_command(self._seq, line)
        verb = command.verb
        multiline = verb in _MULTILINE_ALWAYS or (
            verb in _MULTILINE_WITHOUT_ARGS and not has_arguments
        )
        pending = _Pending(command, multiline)
        events.append(command)
        self._pending.append(pending)
        if refusal is not None:
            pending.local_reply = REFUSALS[refusal]
            pending.local_reason = refusal
            self._flush_local_replies(events)
            return
        if verb in self._local_replies:
            pending.local_reply = self._local_replies[verb]
            pending.local_reason = "local_verb"
            self._flush_local_replies(events)
            return
        if has_arguments and verb in _LOGIN_START_VERBS:
            # Read strictly by _parse_command: the name (USER, APOP), the mechanism and the
            # initial response (AUTH) are where they belong.
            first = str(command.args[0])
            if verb == "AUTH":
                initial = command.args[1] if len(command.args) > 1 else None
                pending.mechanism = first.upper()
                carries_data = isinstance(initial, Secret) and initial.reveal() != "="
                pending.sasl_first = (
                    initial if carries_data and isinstance(initial, Secret) else None
                )
                self._open_auth = pending
                events.append(
                    SaslStarted(command, pending.mechanism, initial_response=initial is not None)
                )
                self._name_sasl_user(pending, events)
            else:
                self.user = first
                events.append(UserNamed(command, first, verb))
        self._forward(command.seq, line)

    def _name_sasl_user(self, auth: _Pending, events: list[Event]) -> None:
        """The first SASL data is about to leave: say for whom, or that no name can be read."""
        if auth.sasl_first is None:
            return  # AUTH without an initial response: no credential yet
        user = _sasl_user(auth.mechanism or "", auth.sasl_first)
        events.append(UserNamed(auth.command, user, auth.mechanism or ""))

    def _sasl_client_line(self, auth: _Pending, line: bytes, events: list[Event]) -> None:
        """A line the server asked for with a continuation request: base64, ``*`` to cancel.

        Anything else ends the session (RFC 5034 section 4). A NUL, a CR or white space in
        it would be read differently upstream (Dovecot ends the line at a NUL and logs in
        with what came before), so the user name read here could be another one; and no
        reply in its place could keep the server's exchange in step.
        """
        body = line[: len(line) - (2 if line.endswith(b"\r\n") else 1)]
        if body not in (_CANCEL, _EMPTY_RESPONSE) and _BASE64.fullmatch(body) is None:
            self._broken = True
            raise RemoteProtocolError(
                "SASL response line is not base64", side="client", reply_hint=SASL_REFUSAL
            )
        data = Secret(body.decode("ascii"))
        cancelled = body == _CANCEL
        auth.sasl_lines_sent += 1
        auth.sasl_cancelled = auth.sasl_cancelled or cancelled
        events.append(SaslResponse(auth.command, data, cancelled=cancelled))
        self._forward(auth.command.seq, line)
        if auth.sasl_first is None and not cancelled and body != _EMPTY_RESPONSE:
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
        # Every SASL line answered a continuation request (_sasl_waits held the others): the
        # lines after the exchange are commands, read as such once they are released.

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
            events.append(LocalReply(head.command, status, head.local_reason))
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


#: A command line as read (see "Command lines" above): the command; whether something
#: follows the verb's SP (LIST, UIDL and AUTH replies then have no body); why the line is
#: answered here instead of forwarded (a key of REFUSALS), or None.
_Parsed = tuple[Command, bool, str | None]


def _parse_command(seq: int, line: bytes) -> _Parsed:
    """Read a command line (ending in LF) as every server does, or say why it is refused.

    Words are split at each SP and nowhere else (RFC 1939 section 3), in bytes: neither
    ``str.split`` (Unicode white space) nor Unicode case mapping (``"u\u017fer".upper()`` is
    ``"USER"``) may make this reading differ from the upstream's.
    """
    body = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    word, _space, rest = body.partition(b" ")
    verb = _VERB_NAMES.get(word.upper(), UNKNOWN_VERB)
    # Words of ASCII letters and digits (bytes.isalnum) hold no control octet: most lines
    # ("NOOP", "RETR 1") need no search.
    plain = word.isalnum() and (not rest or rest.isalnum())
    if not plain and _CONTROL_OCTET.search(body) is not None:
        return Command(seq, verb), False, "control_character"
    if verb == UNKNOWN_VERB:
        if body and not (word and word.isascii()):
            return Command(seq, verb), False, "malformed_verb"
        text = body.decode("utf-8", "replace")
        return Command(seq, verb, (Secret(text),) if text else ()), bool(rest), None
    if not rest:  # "LIST" or "LIST ": servers read both as LIST without an argument
        return Command(seq, verb), False, None
    return _ARGUMENT_READERS.get(verb, _parse_arguments)(seq, verb, rest)


def _parse_arguments(seq: int, verb: str, rest: bytes) -> _Parsed:
    """The arguments of a verb that names no user: shown if they have their verb's form."""
    shown = _SHOWN_ARGUMENTS.get(verb)
    if shown is None:
        return Command(seq, verb, (Secret(rest.decode("utf-8", "replace")),)), True, None
    if shown.fullmatch(rest):  # one argument, of its form: the usual case
        return Command(seq, verb, (rest.decode("ascii"),)), True, None
    if _SHOWN_LISTS[verb].fullmatch(rest):  # several, all of their form ("TOP 1 10")
        return Command(seq, verb, tuple(rest.decode("ascii").split(" "))), True, None
    args = tuple(
        word.decode("ascii") if not word or shown.fullmatch(word) else _hidden(word)
        for word in rest.split(b" ")
    )
    return Command(seq, verb, args), True, None


def _hidden(word: bytes) -> Secret:
    return Secret(word.decode("utf-8", "replace"))


def _parse_password(seq: int, verb: str, rest: bytes) -> _Parsed:
    """PASS and RPOP: the rest of the line is one secret (it may contain SP, RFC 1939 s. 7)."""
    return Command(seq, verb, (_hidden(rest),)), True, None


def _parse_user(seq: int, verb: str, rest: bytes) -> _Parsed:
    """``USER name`` (RFC 1939 section 7): exactly one name, nothing after it."""
    user = _user_name(rest)
    if user is None:
        return Command(seq, verb), False, "malformed_user"
    return Command(seq, verb, (user,)), True, None


def _parse_apop(seq: int, verb: str, rest: bytes) -> _Parsed:
    """``APOP name digest`` (RFC 1939 section 7): a name, one SP, the digest (secret)."""
    name, _space, digest = rest.partition(b" ")
    user = _user_name(name)
    if user is None or not digest or b" " in digest:
        return Command(seq, verb), False, "malformed_apop"
    return Command(seq, verb, (user, _hidden(digest))), True, None


def _parse_auth(seq: int, verb: str, rest: bytes) -> _Parsed:
    """``AUTH mechanism [initial-response]`` (RFC 5034 section 4), read strictly.

    The initial response must be base64 (or ``=``, empty): Dovecot skips white space inside
    it, and a response read here as ``AGFs`` alone would name no user to check.
    """
    mechanism, space, initial = rest.partition(b" ")
    if _SASL_MECHANISM.fullmatch(mechanism) is None or (
        space and initial != _EMPTY_RESPONSE and not (initial and _BASE64.fullmatch(initial))
    ):
        return Command(seq, verb), False, "malformed_auth"
    name = mechanism.decode("ascii")
    args = (name, Secret(initial.decode("ascii"))) if space else (name,)
    return Command(seq, verb, args), True, None


#: The verbs whose arguments are read their own way (the others: ``_parse_arguments``).
_ARGUMENT_READERS: Mapping[str, Callable[[int, str, bytes], _Parsed]] = {
    "PASS": _parse_password,
    "RPOP": _parse_password,
    "USER": _parse_user,
    "APOP": _parse_apop,
    "AUTH": _parse_auth,
}


def _user_name(word: bytes) -> str | None:
    """The user name USER or APOP carries: one word of printable UTF-8 (RFC 6856), or None.

    ``str.isprintable`` is false for controls, format characters (U+200B, U+FEFF) and every
    white space but SP (U+0085, U+00A0, U+2028...), which a server may strip or split at.
    """
    if not word or b" " in word:
        return None
    try:
        name = word.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return name if name.isprintable() else None


def _apop_timestamp(line: bytes) -> str | None:
    match = _APOP_TIMESTAMP.search(line)
    return match.group().decode("ascii", "replace") if match else None
