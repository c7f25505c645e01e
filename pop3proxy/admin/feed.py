"""The live event feed behind ``/events``: session events fanned out to WebSocket watchers.

:meth:`Feed.sink` runs on the relay's task for every session event. It never waits: each
watcher has a bounded queue (:data:`QUEUE_SIZE` events) and an event that does not fit is
dropped for that watcher only, counted, and announced to it later as one ``feed.dropped``
message. A watcher whose socket accepts nothing for :data:`STALL_TIMEOUT` seconds is
disconnected. So a slow or stuck watcher costs the relay one failed ``send_nowait`` per event,
and the other watchers nothing.

Each WebSocket text message holds one or more events, one JSON object per line (events that
queued up while the previous message was being sent travel together, so a busy proxy costs a
watcher one write per batch, not per event). The events are the ones the log shows (same
redacted fields, same minimum level). The feed
also keeps the table of open sessions (and the last closed ones), so a new watcher starts
with a ``feed.snapshot`` message instead of an empty screen.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import structlog
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from pop3proxy.config import Settings
from pop3proxy.logs import LEVELS

__all__ = ["Feed", "FeedItem"]

log = structlog.get_logger("pop3proxy.admin")

#: Events buffered per watcher before events are dropped for it.
QUEUE_SIZE: Final = 512
#: Seconds one message may take to leave before the watcher is disconnected.
STALL_TIMEOUT: Final = 10.0
#: Most events, and octets, in one WebSocket message (events queued while the last message was
#: being sent go out together: one write instead of one per event).
MAX_BATCH: Final = 256
MAX_BATCH_OCTETS: Final = 64 * 1024
#: Most watchers at once; more are refused with 503.
MAX_WATCHERS: Final = 32
#: Open sessions tracked for the snapshot (the session limit keeps it far lower).
MAX_TRACKED: Final = 10_000
#: Closed sessions kept for the snapshot.
RECENT_CLOSED: Final = 50

#: Session states shown by the dashboard and ``watch``.
_STATES: Final = {
    "upstream.tls_established": "open",
    "upstream.failed": "upstream_failed",
}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


class FeedItem:
    """One event for the watchers; rendered to JSON once, on a watcher's task, not the relay's."""

    __slots__ = ("_text", "at", "event", "fields", "level")

    def __init__(self, event: str, level: str, fields: Mapping[str, Any], at: float) -> None:
        self.event = event
        self.level = level
        self.fields = fields
        self.at = at
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            record: dict[str, Any] = {
                "event": self.event,
                "level": self.level,
                "timestamp": _iso(self.at),
            }
            record.update((k, v) for k, v in self.fields.items() if k != "exc_info")
            self._text = json.dumps(record, default=_json_value, separators=(",", ":"))
        return self._text


def _batch(first: FeedItem, receive: trio.MemoryReceiveChannel[FeedItem]) -> str:
    """``first`` and the events already queued behind it, one JSON object per line."""
    lines = [first.text]
    size = len(lines[0])
    while len(lines) < MAX_BATCH and size < MAX_BATCH_OCTETS:
        try:
            item = receive.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        lines.append(item.text)
        size += len(item.text)
    return "\n".join(lines)


class _Watcher:
    __slots__ = ("dropped", "send")

    def __init__(self, send: trio.MemorySendChannel[FeedItem]) -> None:
        self.send = send
        self.dropped = 0


class Feed:
    """Fan-out of session events to WebSocket watchers, and the table of open sessions.

    Args:
        settings: returns the current settings (``log_level`` filters the events).
        on_watchers: called with the number of watchers when it changes (a metric).
        on_dropped: called with the number of events dropped for a slow watcher.
    """

    def __init__(
        self,
        settings: Callable[[], Settings],
        *,
        on_watchers: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        queue_size: int = QUEUE_SIZE,
        stall_timeout: float = STALL_TIMEOUT,
        max_watchers: int = MAX_WATCHERS,
    ) -> None:
        self._settings = settings
        self._on_watchers = on_watchers or (lambda n: None)
        self._on_dropped = on_dropped or (lambda n: None)
        self.queue_size = queue_size
        self.stall_timeout = stall_timeout
        self.max_watchers = max_watchers
        self._watchers: set[_Watcher] = set()
        self.sessions: dict[str, dict[str, Any]] = {}
        self.closed: deque[dict[str, Any]] = deque(maxlen=RECENT_CLOSED)

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    @property
    def full(self) -> bool:
        return len(self._watchers) >= self.max_watchers

    # -- the sink (relay's task) --------------------------------------------------------------

    def sink(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        """Telemetry sink: track the session table, queue the event for each watcher."""
        now = time.time()
        try:  # noqa: SIM105 - contextlib.suppress costs a context manager per event
            self._track(event, fields, now)
        except Exception:  # noqa: S110 - a malformed field must not cost the session
            pass
        if not self._watchers:
            return
        minimum = LEVELS.get(getattr(self._settings(), "log_level", "info"), 0)
        if LEVELS.get(level, 0) < minimum:
            return
        item = FeedItem(event, level, fields, now)
        for watcher in self._watchers:
            try:
                watcher.send.send_nowait(item)
            except trio.WouldBlock:
                watcher.dropped += 1
                self._on_dropped(1)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the watcher is leaving; its task removes it

    def _track(self, event: str, fields: Mapping[str, Any], now: float) -> None:
        session_id = fields.get("session_id")
        if not isinstance(session_id, str):
            return
        if event == "session.opened":
            if len(self.sessions) < MAX_TRACKED:
                self.sessions[session_id] = {
                    "session_id": session_id,
                    "client": fields.get("client"),
                    "opened_at": _iso(now),
                    "state": "connecting",
                    "user": None,
                    "commands": 0,
                    "last_command": None,
                    "tls_version": None,
                }
            return
        session = self.sessions.get(session_id)
        if session is None:
            return
        if event in _STATES:
            session["state"] = _STATES[event]
            if event == "upstream.tls_established":
                session["tls_version"] = fields.get("tls_version")
            else:
                session["reason"] = fields.get("reason")
        elif event == "pop3.login" and fields.get("result") == "success":
            session["user"] = fields.get("user")
            session["state"] = "authenticated"
        elif event == "pop3.command":
            session["commands"] += 1
            session["last_command"] = fields.get("verb")
        elif event == "session.closed":
            del self.sessions[session_id]
            session["state"] = "closed"
            session["reason"] = fields.get("reason")
            session["closed_at"] = _iso(now)
            for key in ("duration_s", "bytes_from_client", "bytes_to_client"):
                if key in fields:
                    session[key] = fields[key]
            self.closed.append(session)

    def snapshot(self) -> str:
        """The ``feed.snapshot`` message: open sessions and the last closed ones."""
        record = {
            "event": "feed.snapshot",
            "level": "info",
            "timestamp": _iso(time.time()),
            "sessions": list(self.sessions.values())[-1000:],
            "closed": list(self.closed),
        }
        return json.dumps(record, default=_json_value, separators=(",", ":"))

    # -- one watcher (its own task) -------------------------------------------------------------

    async def serve(self, ws: WebSocketConnection) -> bool:
        """Send the snapshot, then events, until the watcher leaves or stalls.

        Returns:
            True if the watcher stalled (its socket is then unusable: close it forcefully).
        """
        send, receive = trio.open_memory_channel[FeedItem](self.queue_size)
        watcher = _Watcher(send)
        self._watchers.add(watcher)
        self._on_watchers(len(self._watchers))
        stalled = False
        try:
            async with trio.open_nursery() as nursery:

                async def until_closed() -> None:
                    # Reading is how a close (or a vanished client) is noticed while idle.
                    try:
                        while True:
                            await ws.get_message()
                    except ConnectionClosed:
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_closed)
                try:
                    with trio.fail_after(self.stall_timeout):
                        await ws.send_message(self.snapshot())
                    async with receive:
                        async for item in receive:
                            batch = _batch(item, receive)
                            if watcher.dropped:
                                notice = {"event": "feed.dropped", "count": watcher.dropped}
                                batch = json.dumps(notice) + "\n" + batch
                                watcher.dropped = 0
                            with trio.fail_after(self.stall_timeout):
                                await ws.send_message(batch)
                except ConnectionClosed:
                    pass
                except trio.TooSlowError:
                    stalled = True
                    log.warning("admin.watcher_stalled", stall_timeout_s=self.stall_timeout)
                nursery.cancel_scope.cancel()
        finally:
            self._watchers.discard(watcher)
            send.close()
            self._on_watchers(len(self._watchers))
        return stalled
