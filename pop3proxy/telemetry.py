"""Session events fan out from one place to every consumer: the log, metrics, live feed, inventory.

The relay describes what happens as named events with plain, already log-safe fields
(``pop3.command`` with ``verb``, ``args``, ``status``...). :class:`Telemetry` scrubs them
once more with the same backstop the log uses, then hands the same mapping to each sink,
so the live feed can never show more than the log does.

A sink is any callable ``sink(event, level, fields)``; it runs on the relay's task, so it
must be quick and must not raise (a failing sink is dropped from that event, never from
the session).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from pop3proxy import logs
from pop3proxy.logs import LEVELS, redact_secrets

__all__ = ["FieldTransform", "SessionTelemetry", "Sink", "Telemetry", "log_sink"]

Sink = Callable[[str, str, Mapping[str, Any]], None]

_log = structlog.get_logger("pop3proxy")


def log_sink(event: str, level: str, fields: Mapping[str, Any]) -> None:
    """Write the event as a structlog line (JSON on stdout in production)."""
    number = LEVELS[level]
    if number >= logs.threshold:  # cheaper than structlog's own check, which packs kwargs
        _log.log(number, event, **fields)


#: Rewrites an event's fields for every consumer, e.g. user names to keyed pseudonyms.
FieldTransform = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


class Telemetry:
    """The fan-out point. ``emit`` is called on the relay's hot path: keep sinks cheap.

    Args:
        sinks: consumers; default: the log only.
        transform: applied to every event's fields after redaction and before any sink
            (GDPR pseudonymisation of user names: ``user_pseudonym_key``).
    """

    def __init__(
        self, sinks: list[Sink] | None = None, *, transform: FieldTransform | None = None
    ) -> None:
        self.sinks: list[Sink] = [log_sink] if sinks is None else list(sinks)
        self.transform = transform
        self.errors = 0

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        self.sinks.remove(sink)

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.publish(event, level, fields)

    def publish(self, event: str, level: str, fields: dict[str, Any]) -> None:
        """:meth:`emit` with the fields as a dict the caller hands over (it is modified)."""
        scrubbed: Mapping[str, Any] = redact_secrets(None, level, fields)
        if self.transform is not None:
            scrubbed = self.transform(event, scrubbed)
        for sink in self.sinks:
            try:
                sink(event, level, scrubbed)
            except Exception as exc:  # one broken consumer must not end a session
                self.errors += 1
                if sink is not log_sink:
                    _log.warning("telemetry.sink_failed", sink=repr(sink), error=type(exc).__name__)


class SessionTelemetry:
    """``Telemetry`` bound to one session: every event carries its ``session_id``."""

    __slots__ = ("session_id", "telemetry")

    def __init__(self, telemetry: Telemetry, session_id: str) -> None:
        self.telemetry = telemetry
        self.session_id = session_id

    def debug(self, event: str, **fields: Any) -> None:
        self._publish(event, "debug", fields)

    def info(self, event: str, **fields: Any) -> None:
        self._publish(event, "info", fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._publish(event, "warning", fields)

    def error(self, event: str, **fields: Any) -> None:
        self._publish(event, "error", fields)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback being handled (rendered without local variables)."""
        self._publish(event, "error", {**fields, "exc_info": True})

    def _publish(self, event: str, level: str, fields: dict[str, Any]) -> None:
        self.telemetry.publish(event, level, {"session_id": self.session_id, **fields})
