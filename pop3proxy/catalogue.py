"""Every telemetry event a session can produce, its fields, and every way a session can end.

One module, so that producers (the session layer, readiness) and consumers (the log, metrics,
the live feed, the inventory, ``watch``, pseudonyms) agree by construction instead of by
matching string literals. :class:`EventName` names the events that travel through
:class:`~pop3proxy.telemetry.Telemetry`; :data:`FIELDS` gives the :class:`~typing.TypedDict` of
each one's fields (``session_id`` included where the event belongs to a session);
:class:`CloseReason` is the ``reason`` of ``session.closed``; :class:`VerdictReason` the
``reason`` of a policy decision.

Lines a process writes about itself rather than about a session (``listener.started``,
``drain.started``, ``reload.*``, ``inventory.*``, ``admin.*``) are plain structlog lines, not
telemetry events: no sink consumes them, and they are not listed here.

Nothing here imports from the rest of the package: it is the bottom of the layering.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, Literal, TypedDict

__all__ = [
    "FIELDS",
    "CapabilityHidden",
    "CloseReason",
    "EventName",
    "PolicyVerdict",
    "Pop3Command",
    "Pop3Greeting",
    "Pop3LocalReply",
    "Pop3Login",
    "Pop3ProtocolError",
    "Pop3SaslEnded",
    "Pop3SaslStarted",
    "Pop3Unsolicited",
    "ReadinessChanged",
    "SessionClosed",
    "SessionError",
    "SessionOpened",
    "SessionTimedOut",
    "UpstreamFailed",
    "UpstreamTlsEstablished",
    "UpstreamTruncated",
    "VerdictReason",
]


class EventName(enum.StrEnum):
    """The name of a telemetry event (the ``event`` of its log line)."""

    #: A client connected (before any decision).
    SESSION_OPENED = "session.opened"
    #: The canonical line of a session: why it ended, totals.
    SESSION_CLOSED = "session.closed"
    #: An unexpected exception ended the session (the error boundary caught it).
    SESSION_ERROR = "session.error"
    #: A deadline ended the session (one event name per deadline, all with ``timeout_s``).
    SESSION_IDLE_TIMEOUT = "session.idle_timeout"
    SESSION_CLOSE_TIMEOUT = "session.close_timeout"
    SESSION_COMMAND_TIMEOUT = "session.command_timeout"
    SESSION_LOGIN_TIMEOUT = "session.login_timeout"
    SESSION_LIFETIME_EXCEEDED = "session.lifetime_exceeded"
    #: A policy decided something other than a plain allow (warn, deny, dry-run deny).
    POLICY_VERDICT = "policy.verdict"
    UPSTREAM_TLS_ESTABLISHED = "upstream.tls_established"
    UPSTREAM_FAILED = "upstream.failed"
    UPSTREAM_TRUNCATED = "upstream.truncated"
    #: One per command, once its reply is complete (delivered in batches).
    POP3_COMMAND = "pop3.command"
    POP3_LOGIN = "pop3.login"
    POP3_GREETING = "pop3.greeting"
    POP3_LOCAL_REPLY = "pop3.local_reply"
    POP3_UNSOLICITED = "pop3.unsolicited"
    POP3_SASL_STARTED = "pop3.sasl_started"
    POP3_SASL_ENDED = "pop3.sasl_ended"
    POP3_CAPABILITY_HIDDEN = "pop3.capability_hidden"
    POP3_PROTOCOL_ERROR = "pop3.protocol_error"
    #: The admin endpoint's upstream probe changed its answer.
    READINESS_CHANGED = "readiness.changed"


class VerdictReason(enum.StrEnum):
    """Why a policy refused (or would refuse, or warned about) a session or a login."""

    #: The client's network is not in ``allow``.
    ACL = "acl"
    CAPACITY = "capacity"
    CLIENT_CAPACITY = "client_capacity"
    #: The client's address could not be read.
    UNKNOWN_CLIENT = "unknown_client"
    #: The proxy itself is out of file descriptors (the listener turns clients away).
    LOCAL_RESOURCES = "local_resources"
    USER_NETWORK = "user_network"
    #: A user policy applies, but the login's user name cannot be read (fail closed).
    USER_UNKNOWN = "user_unknown"
    SESSION_LOGIN_FAILURES = "session_login_failures"
    CLIENT_LOGIN_FAILURES = "client_login_failures"
    #: A migration rule (its phase) decided.
    PHASE = "phase"


class CloseReason(enum.StrEnum):
    """The ``reason`` of ``session.closed``: how a session ended.

    The ``REFUSED_*`` members are sessions turned away at admission (before any upstream
    connection), the ``LOGIN_REFUSED_*`` ones logins refused before the credential left;
    :attr:`refusal` tells them from the others without parsing the name.
    """

    QUIT = "quit"
    CLIENT_CLOSED = "client_closed"
    CLIENT_RESET = "client_reset"
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_TRUNCATED = "upstream_truncated"
    UPSTREAM_FAILED = "upstream_failed"
    LOCAL_RESOURCES = "local_resources"
    CLIENT_PROTOCOL_ERROR = "client_protocol_error"
    SERVER_PROTOCOL_ERROR = "server_protocol_error"
    IDLE_TIMEOUT = "idle_timeout"
    CLOSE_TIMEOUT = "close_timeout"
    COMMAND_TIMEOUT = "command_timeout"
    LOGIN_TIMEOUT = "login_timeout"
    GREETING_TIMEOUT = "greeting_timeout"
    SESSION_TIMEOUT = "session_timeout"
    #: Cancelled from outside (drain deadline, second signal).
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    #: Both sides done, but by none of the ways above (kept for completeness).
    CLOSED = "closed"
    REFUSED_ACL = "refused_acl"
    REFUSED_CAPACITY = "refused_capacity"
    REFUSED_CLIENT_CAPACITY = "refused_client_capacity"
    REFUSED_UNKNOWN_CLIENT = "refused_unknown_client"
    REFUSED_LOCAL_RESOURCES = "refused_local_resources"
    REFUSED_PHASE = "refused_phase"
    LOGIN_REFUSED_USER_NETWORK = "login_refused_user_network"
    LOGIN_REFUSED_USER_UNKNOWN = "login_refused_user_unknown"
    LOGIN_REFUSED_SESSION_LOGIN_FAILURES = "login_refused_session_login_failures"
    LOGIN_REFUSED_CLIENT_LOGIN_FAILURES = "login_refused_client_login_failures"
    LOGIN_REFUSED_PHASE = "login_refused_phase"

    @property
    def refusal(self) -> VerdictReason | None:
        """The policy reason of a ``refused_*``/``login_refused_*`` close; None for others."""
        return _REFUSALS.get(self)

    @classmethod
    def refused(cls, reason: str) -> CloseReason:
        """The close reason of a session turned away at admission for ``reason``."""
        return cls(f"refused_{VerdictReason(reason)}")

    @classmethod
    def login_refused(cls, reason: str) -> CloseReason:
        """The close reason of a session that ends because its login was refused."""
        return cls(f"login_refused_{VerdictReason(reason)}")


_REFUSALS: Final[Mapping[CloseReason, VerdictReason]] = {
    member: VerdictReason(member.value.partition("refused_")[2])
    for member in CloseReason
    if member.value.startswith(("refused_", "login_refused_"))
}


# -- the fields of each event -------------------------------------------------------------------
# ``total=False`` where a field is sometimes left out; every value is log-safe (secrets are
# already ``***``) and JSON-ready. ``session_id`` is added by SessionTelemetry.

Level = Literal["debug", "info", "warning", "error"]


class _InSession(TypedDict):
    session_id: str


class SessionOpened(_InSession):
    client: str
    listener: str


class SessionClosed(_InSession):
    reason: str  # a CloseReason
    user: str | None
    commands: int
    bytes_from_client: int
    bytes_to_client: int
    bytes_from_upstream: int
    bytes_to_upstream: int
    tls_version: str | None
    duration_s: float


class SessionError(_InSession):
    error_type: str


class SessionTimedOut(_InSession, total=False):
    timeout_s: float
    session_timeout_s: float


class PolicyVerdict(_InSession):
    action: str
    reason: str  # a VerdictReason
    rule: str | None
    dry_run: bool
    user: str | None


class UpstreamTlsEstablished(_InSession):
    upstream: str
    tls_version: str | None
    cipher: str | None
    peer_subject: str | None
    peer_sha256: str | None
    peer_not_after: str | None


class UpstreamFailed(_InSession):
    upstream: str
    phase: str
    reason: str
    error: str


class UpstreamTruncated(_InSession):
    state: str
    pending: int
    tls_close_notify: bool
    bytes_from_upstream: int


class Pop3Command(_InSession):
    verb: str
    args: list[str]
    status: str
    code: str | None
    reply_octets: int
    duration_ms: float


class Pop3Login(_InSession, total=False):
    user: str | None
    mechanism: str
    result: str
    code: str | None


class Pop3Greeting(_InSession):
    status: str
    apop: bool


class Pop3LocalReply(_InSession):
    verb: str
    status: str
    reason: str


class Pop3Unsolicited(_InSession):
    status: str
    code: str | None
    text: str


class Pop3SaslStarted(_InSession):
    mechanism: str
    initial_response: bool


class Pop3SaslEnded(_InSession):
    mechanism: str
    status: str
    cancelled: bool


class CapabilityHidden(_InSession):
    capability: str


class Pop3ProtocolError(_InSession):
    side: str
    error: str


class ReadinessChanged(TypedDict):
    ready: bool
    reason: str
    phase: str | None
    error: str | None
    upstream: str | None


#: The fields of every event.
FIELDS: Final[Mapping[EventName, type]] = {
    EventName.SESSION_OPENED: SessionOpened,
    EventName.SESSION_CLOSED: SessionClosed,
    EventName.SESSION_ERROR: SessionError,
    EventName.SESSION_IDLE_TIMEOUT: SessionTimedOut,
    EventName.SESSION_CLOSE_TIMEOUT: SessionTimedOut,
    EventName.SESSION_COMMAND_TIMEOUT: SessionTimedOut,
    EventName.SESSION_LOGIN_TIMEOUT: SessionTimedOut,
    EventName.SESSION_LIFETIME_EXCEEDED: SessionTimedOut,
    EventName.POLICY_VERDICT: PolicyVerdict,
    EventName.UPSTREAM_TLS_ESTABLISHED: UpstreamTlsEstablished,
    EventName.UPSTREAM_FAILED: UpstreamFailed,
    EventName.UPSTREAM_TRUNCATED: UpstreamTruncated,
    EventName.POP3_COMMAND: Pop3Command,
    EventName.POP3_LOGIN: Pop3Login,
    EventName.POP3_GREETING: Pop3Greeting,
    EventName.POP3_LOCAL_REPLY: Pop3LocalReply,
    EventName.POP3_UNSOLICITED: Pop3Unsolicited,
    EventName.POP3_SASL_STARTED: Pop3SaslStarted,
    EventName.POP3_SASL_ENDED: Pop3SaslEnded,
    EventName.POP3_CAPABILITY_HIDDEN: CapabilityHidden,
    EventName.POP3_PROTOCOL_ERROR: Pop3ProtocolError,
    EventName.READINESS_CHANGED: ReadinessChanged,
}
