"""Events the POP3 engine reports, and the :class:`Secret` type.

Events are facts about the conversation, named as nouns (h11 style), frozen, and
free of raw protocol lines: bytes that must reach a peer are taken from
:class:`~pop3proxy.pop3.conversation.Pop3Conversation` separately, so an event can
be logged, put in an exception or printed without ever carrying a credential.
Anything secret travels as :class:`Secret`, whose ``str``/``repr`` is ``***``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "BodyChunk",
    "BodyEnd",
    "CapabilityLine",
    "Command",
    "CommandCompleted",
    "ConnectionClosed",
    "Event",
    "Greeting",
    "LocalReply",
    "LoginFailed",
    "LoginSucceeded",
    "Response",
    "SaslChallenge",
    "SaslEnded",
    "SaslResponse",
    "SaslStarted",
    "Secret",
    "State",
    "Status",
    "UnsolicitedResponse",
    "UserNamed",
]


class Secret:
    """A credential: PASS argument, APOP digest, SASL data.

    ``str()``, ``repr()`` and ``format()`` all give ``***`` so the value cannot slip
    into a log line, an f-string or a traceback; :meth:`reveal` is the one way out.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself. Only the engine's user-name extraction needs it."""
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> str:
        raise TypeError("a Secret cannot be pickled")

    def __copy__(self) -> Secret:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Secret:
        return self  # immutable; lets dataclasses.asdict() work on events


class State(enum.Enum):
    """Session states of RFC 1939 section 3 (plus the greeting wait before them)."""

    #: Waiting for the server greeting (RFC 1939 section 4).
    GREETING = "greeting"
    #: AUTHORIZATION state: USER/PASS, APOP, AUTH (RFC 1939 section 4, RFC 5034).
    AUTHORIZATION = "authorization"
    #: TRANSACTION state: the maildrop is locked (RFC 1939 section 5).
    TRANSACTION = "transaction"
    #: UPDATE state: QUIT was accepted in TRANSACTION (RFC 1939 section 6).
    UPDATE = "update"
    #: The conversation is over; nothing more is expected from either side.
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Status:
    """A parsed status indicator line (RFC 1939 section 3).

    Attributes:
        ok: ``True`` for ``+OK``, ``False`` for ``-ERR``.
        code: the RFC 2449 section 8 response code without brackets, e.g.
            ``"SYS/TEMP"``, ``"AUTH"`` (RFC 3206), ``"IN-USE"``, ``"LOGIN-DELAY"``; or None.
        text: the human-readable rest of the line (decoded, CRLF stripped).
    """

    ok: bool
    code: str | None
    text: str

    @property
    def indicator(self) -> str:
        return "+OK" if self.ok else "-ERR"


class Event:
    """Base class of everything the engine reports."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Greeting(Event):
    """The server's first line (RFC 1939 section 4).

    ``apop_timestamp`` is the ``<...>`` token of RFC 1939 section 7, if present.
    """

    status: Status
    apop_timestamp: str | None


@dataclass(frozen=True, slots=True)
class Command(Event):
    """A client command line (RFC 1939 section 3).

    Attributes:
        seq: position of the command in the conversation, from 1; a key for timing.
        verb: the keyword, upper-cased (``"RETR"``); unknown verbs pass as they are.
        args: the arguments; secret ones (PASS, the APOP digest, an AUTH initial
            response) are :class:`Secret`.
    """

    seq: int
    verb: str
    args: tuple[str | Secret, ...] = ()

    @property
    def has_secret(self) -> bool:
        return any(isinstance(a, Secret) for a in self.args)

    def loggable_args(self) -> list[str]:
        """The arguments as strings, with every secret shown as ``***``."""
        return [str(a) for a in self.args]


@dataclass(frozen=True, slots=True)
class LocalReply(Event):
    """The proxy answered ``command`` itself; it never reached the server.

    ``reason`` is a stable word for logs and metrics: ``local_verb`` (a verb the proxy always
    answers, STLS by default), ``caller`` (or the caller's own word:
    :meth:`~pop3proxy.pop3.Pop3Conversation.answer_locally`), or why the line was refused
    (a key of :data:`~pop3proxy.pop3.conversation.REFUSALS`, e.g. ``control_character``).
    A refused command has no arguments: what its line carried is neither trusted nor shown.
    """

    command: Command
    status: Status
    reason: str


@dataclass(frozen=True, slots=True)
class Response(Event):
    """The status line that answers ``command``; a body follows when ``multiline``."""

    command: Command
    status: Status
    multiline: bool


@dataclass(frozen=True, slots=True)
class BodyChunk(Event):
    """Part of a multi-line response body, still dot-stuffed as on the wire.

    Chunk boundaries follow the reads, not lines; the terminating ``.CRLF`` is not
    included (it is reported as :class:`BodyEnd`).
    """

    command: Command
    data: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class BodyEnd(Event):
    """The ``.CRLF`` that ends a multi-line response (RFC 1939 section 3)."""

    command: Command


@dataclass(frozen=True, slots=True)
class CapabilityLine(Event):
    """One line of a CAPA response (RFC 2449 section 5).

    ``hidden`` is true when the engine removed it from what the client sees
    (``STLS`` on a plaintext listener).
    """

    command: Command
    name: str
    params: tuple[str, ...]
    hidden: bool


@dataclass(frozen=True, slots=True)
class CommandCompleted(Event):
    """The whole reply to ``command`` has been relayed: one event per command.

    ``reply_octets`` counts the octets sent to the client for the reply, status line
    and body included.
    """

    command: Command
    status: Status
    reply_octets: int


@dataclass(frozen=True, slots=True)
class SaslStarted(Event):
    """An AUTH exchange begins (RFC 5034 section 4)."""

    command: Command
    mechanism: str
    initial_response: bool


@dataclass(frozen=True, slots=True)
class SaslChallenge(Event):
    """The server sent a continuation request (``+ base64``, RFC 5034 section 4)."""

    command: Command


@dataclass(frozen=True, slots=True)
class SaslResponse(Event):
    """The client answered a challenge; ``cancelled`` when it sent ``*``."""

    command: Command
    data: Secret
    cancelled: bool


@dataclass(frozen=True, slots=True)
class SaslEnded(Event):
    """The server ended the AUTH exchange with ``+OK`` or ``-ERR``."""

    command: Command
    mechanism: str
    status: Status
    cancelled: bool


@dataclass(frozen=True, slots=True)
class UserNamed(Event):
    """The client named the user it wants to log in as, before its credential went upstream.

    Reported for USER and APOP, and for AUTH with the first SASL data the client sends (the
    initial response, or the first continuation line). The caller may still refuse the
    login with :meth:`~pop3proxy.pop3.Pop3Conversation.answer_locally`. With AUTH LOGIN
    the name is the client's first line, unconfirmed: log it only once the login succeeded.

    ``user`` is None when a credential is about to leave for a user the engine cannot read
    (a mechanism such as GSSAPI or NTLM, a PLAIN login acting for someone else): a policy
    bound to user names must then fail closed.
    """

    command: Command
    user: str | None
    mechanism: str


@dataclass(frozen=True, slots=True)
class LoginSucceeded(Event):
    """The server accepted PASS, APOP or AUTH: the session is in TRANSACTION state.

    ``mechanism`` is ``"USER"`` for USER/PASS, ``"APOP"``, or the SASL mechanism name.
    ``user`` is None when it could not be read without decoding a secret.
    """

    user: str | None
    mechanism: str


@dataclass(frozen=True, slots=True)
class LoginFailed(Event):
    """The server refused PASS, APOP or AUTH, or the client cancelled AUTH with ``*``."""

    user: str | None
    mechanism: str
    status: Status
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class UnsolicitedResponse(Event):
    """A status line with no command waiting for it (e.g. an autologout notice)."""

    status: Status


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """One side closed its direction.

    ``clean`` is true when nothing was cut short: the server closed after answering
    QUIT (or after refusing in its greeting), or the client closed with no reply
    outstanding.
    """

    side: str
    clean: bool
    state: State
