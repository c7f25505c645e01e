"""Session events fan out from one place to every consumer: the log, metrics, live feed, inventory.

The relay describes what happens as named events with plain, already log-safe fields
(``pop3.command`` with ``verb``, ``args``, ``status``...). :class:`Telemetry` scrubs them
once more with the same backstop the log uses, then hands the same mapping to each sink,
so the live feed can never show more than the log does.

A sink is any callable ``sink(event, level, fields)``; it must be quick and must not raise
(a failing sink is dropped from that event, never from the session).

While :meth:`Telemetry.deliver_in_batches` runs (``pop3proxy serve`` runs it), the one event
of every command, ``pop3.command``, is queued and handed to the sinks every
:data:`BATCH_INTERVAL`; any other event first delivers the queue, so the order never changes.
A command's log line and metrics are then off its round trip, and delivering many in a row
keeps that code in the CPU's caches (in the relay benchmark this took about a third off the
proxy's CPU time per NOOP). The cost: command lines reach stdout up to 0.1 s late (their
``timestamp`` is when they are written), and a process killed with SIGKILL loses that much.
A line logged past the sinks (``drain.started``, ``reload.*``, the admin endpoint's and the
inventory's own lines, a library's stdlib logging) delivers the waiting batch first
(:data:`pop3proxy.logs.before_direct_line`), so the log's order is the order things happened
and a reader may take ``drain.started`` as a cut-off.

An event whose fields cannot be built (a builder, the redaction or the transform raises) is
dropped alone: counted in :attr:`Telemetry.dropped_events`, logged as
``telemetry.event_dropped`` with the exception's type only (its message may quote a field),
and never raised into whichever session's task delivered the batch.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import structlog
import trio

from pop3proxy import logs
from pop3proxy.logs import LEVELS, redact_secrets

__all__ = ["BATCH_INTERVAL", "FieldTransform", "SessionTelemetry", "Sink", "Telemetry", "log_sink"]

#: How long an event may wait before it reaches the sinks when delivered in batches (a trio
#: timer costs a few hundred microseconds of CPU: one per batch, none while idle).
BATCH_INTERVAL = 0.1
#: A batch this large is delivered at once, whatever the interval. At most half a live-feed
#: watcher's queue (``admin.feed.QUEUE_SIZE``): a watcher that keeps up never drops events.
BATCH_LIMIT = 256
#: The events that may wait for a batch: one per command, the bulk of all events.
BATCHED_EVENTS = frozenset({"pop3.command"})

Sink = Callable[[str, str, Mapping[str, Any]], None]

_log = structlog.get_logger("pop3proxy")


def log_sink(event: str, level: str, fields: Mapping[str, Any]) -> None:
    """Write the event as a structlog line (JSON on stdout in production)."""
    number = LEVELS[level]
    if number >= logs.threshold:  # cheaper than structlog's own check, which packs kwargs
        _log.log(number, event, **fields)


#: Makes an event's fields from what the caller had at hand (see ``publish_lazily``).
FieldBuilder = Callable[..., dict[str, Any]]
#: Rewrites an event's fields for every consumer, e.g. user names to keyed pseudonyms.
FieldTransform = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """The builder of fields that are already built."""
    return fields


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
        #: Sink calls that raised.
        self.errors = 0
        #: Events dropped because their fields could not be built (for the metrics).
        self.dropped_events = 0
        #: Events waiting for the next batch; None: delivered as they are published.
        self._batch: list[tuple[str, str, FieldBuilder, tuple[Any, ...]]] | None = None
        #: Where the batch task waits for a batch to begin.
        self._batch_begun = trio.lowlevel.ParkingLot()
        #: Set while :meth:`flush` runs: a line a sink logs then must not start another.
        self._flushing = False
        #: The thread of the batch task (trio's): the only one that may deliver.
        self._thread: int | None = None
        #: One bound method, so that :meth:`flush` can tell whether it is the armed one.
        self._before_direct_line = self._deliver_before_direct_line

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: Sink) -> None:
        self.sinks.remove(sink)

    def emit(self, event: str, level: str = "info", **fields: Any) -> None:
        self.publish(event, level, fields)

    def publish(self, event: str, level: str, fields: dict[str, Any]) -> None:
        """:meth:`emit` with the fields as a dict the caller hands over (it is modified)."""
        self.publish_lazily(event, level, _given, fields)

    def publish_lazily(self, event: str, level: str, build: FieldBuilder, *args: Any) -> None:
        """:meth:`publish` the fields ``build(*args)`` returns, built when delivered.

        A batched event then costs its caller one list append; building its fields runs
        with the rest of the batch.
        """
        batch = self._batch
        if batch is None or event not in BATCHED_EVENTS:
            if batch:
                self.flush()
            self._deliver(event, level, build, args)
            return
        batch.append((event, level, build, args))
        if len(batch) == 1:  # the first of a batch: lines logged directly now wait for it
            logs.before_direct_line = self._before_direct_line
            if self._batch_begun:  # and its timer starts
                self._batch_begun.unpark()
        elif len(batch) >= BATCH_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Deliver the events waiting for the next batch now, in order.

        Events published while it runs (by a sink) go out in the same call, after it.
        """
        if self._flushing:  # called again by a line a sink logs: the batch is on its way
            return
        batch = self._batch
        if not batch:
            return
        self._flushing = True
        try:
            while batch:
                self._batch = []
                if logs.before_direct_line is self._before_direct_line:
                    logs.before_direct_line = None
                for event, level, build, args in batch:
                    self._deliver(event, level, build, args)
                batch = self._batch
        finally:
            self._flushing = False

    def _deliver_before_direct_line(self) -> None:
        """:data:`pop3proxy.logs.before_direct_line` while events wait for their batch."""
        if threading.get_ident() == self._thread:  # a worker thread's line leaves it to trio
            self.flush()

    async def deliver_in_batches(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver :data:`BATCHED_EVENTS` every :data:`BATCH_INTERVAL` until cancelled."""
        self._batch = []
        self._thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                if not self._batch:
                    await self._batch_begun.park()
                await trio.sleep(BATCH_INTERVAL)
                self.flush()
        finally:
            self.flush()
            self._batch = None
            if logs.before_direct_line is self._before_direct_line:
                logs.before_direct_line = None

    def _deliver(self, event: str, level: str, build: FieldBuilder, args: tuple[Any, ...]) -> None:
        try:
            scrubbed: Mapping[str, Any] = redact_secrets(None, level, build(*args))
            if self.transform is not None:
                scrubbed = self.transform(event, scrubbed)
        except Exception as exc:  # one broken event must not cost the batch or a session
            self.dropped_events += 1
            # The type only: a message may quote a field. No session id either: the current
            # task's (bound by the relay) would name whichever session delivered the batch.
            _log.warning(
                "telemetry.event_dropped",
                dropped_event=event,
                error_type=type(exc).__name__,
                session_id=None,
            )
            return
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

    def info_lazily(self, event: str, build: FieldBuilder, *args: Any) -> None:
        """An info event whose fields are ``build(session_id, *args)``, built when delivered."""
        self.telemetry.publish_lazily(event, "info", build, self.session_id, *args)

    def exception(self, event: str, **fields: Any) -> None:
        """An error with the traceback being handled (rendered without local variables).

        The exception itself is kept, not ``exc_info=True``: the line may be rendered later.
        """
        self._publish(event, "error", {**fields, "exc_info": sys.exc_info()[1] or True})

    def _publish(self, event: str, level: str, fields: dict[str, Any]) -> None:
        self.telemetry.publish(event, level, {"session_id": self.session_id, **fields})
