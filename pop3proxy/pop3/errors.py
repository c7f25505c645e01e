"""Errors raised by the sans-IO POP3 engine.

Modelled on h11: :class:`ProtocolError` is abstract and splits into
:class:`LocalProtocolError` (the caller misused the engine) and
:class:`RemoteProtocolError` (a peer sent bytes that break the protocol).
Messages are always safe to log: they never contain a raw protocol line,
so they can never carry a credential.
"""

from __future__ import annotations

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """Base class; not raised directly."""

    def __init__(self, reason: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("ProtocolError is abstract; raise Local- or RemoteProtocolError")
        super().__init__(reason)
        #: A short, log-safe description such as ``"command line too long"``.
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """The engine was used wrongly (a bug in the caller, never the peer's fault)."""


class RemoteProtocolError(ProtocolError):
    """A peer broke the protocol.

    Args:
        reason: log-safe text.
        side: ``"client"`` or ``"server"``, whichever sent the offending bytes.
        reply_hint: the POP3 line the proxy should send the client before closing
            (with CRLF), e.g. ``b"-ERR [SYS/PERM] command line too long\\r\\n"``.
    """

    def __init__(self, reason: str, *, side: str, reply_hint: bytes) -> None:
        super().__init__(reason)
        self.side = side
        self.reply_hint = reply_hint
