"""The POP3 protocol engine: sans-IO, no trio, no logging, no clock (RFC 1939, 2449, 5034, 2595).

Feed it the octets of each direction; it returns :mod:`events <pop3proxy.pop3.events>` and
tells you which octets to forward. See :class:`Pop3Conversation`.
"""

from __future__ import annotations

from pop3proxy.pop3.conversation import (
    KNOWN_VERBS,
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    MAX_STATUS_LINE,
    REFUSALS,
    SASL_REFUSAL,
    STLS_REFUSAL,
    UNKNOWN_VERB,
    XCLIENT_REFUSAL,
    Pop3Conversation,
    parse_status,
)
from pop3proxy.pop3.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
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
    "BodyChunk",
    "BodyEnd",
    "CapabilityLine",
    "Command",
    "CommandCompleted",
    "ConnectionClosed",
    "Event",
    "Greeting",
    "LocalProtocolError",
    "LocalReply",
    "LoginFailed",
    "LoginSucceeded",
    "Pop3Conversation",
    "ProtocolError",
    "RemoteProtocolError",
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
    "parse_status",
]
