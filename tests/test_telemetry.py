"""Telemetry's batched delivery: command events wait at most BATCH_INTERVAL, order never changes
(not even for a line logged past the sinks), and one broken event costs only itself."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from pop3proxy import logs
from pop3proxy.telemetry import (
    BATCH_INTERVAL,
    BATCH_LIMIT,
    SessionTelemetry,
    Telemetry,
    log_sink,
)

Record = list[tuple[str, dict[str, Any]]]


def recorder() -> tuple[Record, Telemetry]:
    seen: Record = []

    def sink(event: str, level: str, fields: Mapping[str, Any]) -> None:
        seen.append((event, dict(fields)))

    return seen, Telemetry([sink])


async def test_commands_wait_for_the_batch_and_other_events_keep_the_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen, telemetry = recorder()
    log = SessionTelemetry(telemetry, "s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        log.info("pop3.command", verb="NOOP")
        log.info("pop3.command", verb="STAT")
        assert seen == []  # queued
        await trio.sleep(BATCH_INTERVAL * 1.5)
        assert [f["verb"] for _, f in seen] == ["NOOP", "STAT"]
        log.info("pop3.command", verb="QUIT")
        log.info("session.closed", reason="quit")  # delivers the queue first, then itself
        assert [e for e, _ in seen] == ["pop3.command"] * 3 + ["session.closed"]
        log.info("pop3.command", verb="LAST")
        nursery.cancel_scope.cancel()
    assert seen[-1][1]["verb"] == "LAST", "stopping delivers what was still queued"
    log.info("pop3.command", verb="AFTER")
    assert seen[-1][1]["verb"] == "AFTER", "with no batch task, events go out at once"


async def test_a_full_batch_goes_out_at_once(autojump_clock: trio.testing.MockClock) -> None:
    seen, telemetry = recorder()
    log = SessionTelemetry(telemetry, "s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        for n in range(BATCH_LIMIT):
            log.info("pop3.command", n=n)
        assert len(seen) == BATCH_LIMIT
        nursery.cancel_scope.cancel()


async def test_secrets_are_redacted_in_batches_too(autojump_clock: trio.testing.MockClock) -> None:
    seen, telemetry = recorder()
    log = SessionTelemetry(telemetry, "s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        log.info("pop3.command", verb="UNKNOWN", line="PASS hunter2", password="hunter2")
        await trio.sleep(BATCH_INTERVAL * 2)
        nursery.cancel_scope.cancel()
    assert "hunter2" not in repr(seen)
    assert seen[0][1]["password"] == "***"


def test_an_exception_is_kept_for_a_later_rendering() -> None:
    seen, telemetry = recorder()
    log = SessionTelemetry(telemetry, "s1")
    try:
        int("boom")
    except ValueError:
        log.exception("session.error")
    exc = seen[0][1]["exc_info"]
    assert isinstance(exc, ValueError)
    assert exc.__traceback__ is not None


# -- the log's order: a line logged directly never overtakes a waiting event -------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """``configure_logging`` (JSON) into a buffer; the previous configuration is put back."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level, threshold = root.handlers[:], root.level, logs.threshold
    stream = io.StringIO()
    logs.configure_logging("debug", "json", stream)
    try:
        yield stream
    finally:
        structlog.configure(**saved)
        root.handlers[:], logs.threshold = handlers, threshold
        root.setLevel(level)


def logged(stream: io.StringIO) -> list[tuple[str, str | None]]:
    """(event, verb) of every line written so far."""
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [(line["event"], line.get("verb")) for line in lines]


async def test_a_line_logged_directly_comes_after_the_events_before_it(
    autojump_clock: trio.testing.MockClock, json_log: io.StringIO
) -> None:
    """``drain.started`` (structlog) and a library's line (stdlib logging, through structlog's
    ProcessorFormatter) deliver the commands waiting for a batch first."""
    telemetry = Telemetry()
    log = SessionTelemetry(telemetry, "s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        log.info("pop3.command", verb="USER")
        log.info("pop3.command", verb="NOOP")
        structlog.get_logger("pop3proxy.app").info("drain.started")
        log.info("pop3.command", verb="STAT")
        logging.getLogger("trio-websocket").warning("library.line")
        log.info("pop3.command", verb="QUIT")
        assert logged(json_log)[-1] == ("library.line", None)  # QUIT still waits
        nursery.cancel_scope.cancel()
    assert logged(json_log) == [
        ("pop3.command", "USER"),
        ("pop3.command", "NOOP"),
        ("drain.started", None),
        ("pop3.command", "STAT"),
        ("library.line", None),
        ("pop3.command", "QUIT"),
    ]


async def test_a_sink_that_logs_directly_does_not_deliver_twice(
    autojump_clock: trio.testing.MockClock, json_log: io.StringIO
) -> None:
    """A sink may log while a batch is being delivered: no recursion, every event once."""
    seen: list[str] = []
    direct = structlog.get_logger("pop3proxy.sink")

    def chatty_sink(event: str, level: str, fields: Mapping[str, Any]) -> None:
        seen.append(fields["verb"])
        direct.info("sink.saw", verb=fields["verb"])
        logging.getLogger("a.library").info("library.saw")

    telemetry = Telemetry([chatty_sink])
    log = SessionTelemetry(telemetry, "s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        for verb in ("USER", "PASS", "STAT"):
            log.info("pop3.command", verb=verb)
        direct.info("drain.started")
        nursery.cancel_scope.cancel()
    assert seen == ["USER", "PASS", "STAT"]
    assert [event for event, _ in logged(json_log)] == [
        *["sink.saw", "library.saw"] * 3,
        "drain.started",
    ]


async def test_a_line_from_a_worker_thread_leaves_the_batch_to_trio(
    mock_clock: trio.testing.MockClock, json_log: io.StringIO
) -> None:
    """Sinks run in trio's thread only (the feed's channels are not thread-safe): a line
    logged by a worker thread does not deliver the batch from there."""
    threads: list[int] = []
    telemetry = Telemetry(
        [log_sink, lambda _event, _level, _fields: threads.append(threading.get_ident())]
    )
    log = SessionTelemetry(telemetry, "s1")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        log.info("pop3.command", verb="NOOP")
        await trio.to_thread.run_sync(structlog.get_logger("x").info, "from.thread")
        await trio.to_thread.run_sync(logging.getLogger("x").warning, "from.thread")
        assert threads == []  # the clock stands still: still waiting for its batch
        mock_clock.jump(BATCH_INTERVAL * 1.5)
        await trio.testing.wait_all_tasks_blocked()
        assert threads == [threading.get_ident()]
        nursery.cancel_scope.cancel()
    assert [event for event, _ in logged(json_log)] == [
        "from.thread",
        "from.thread",
        "pop3.command",
    ]


# -- an event whose fields fail to build --------------------------------------------------------


def failing_fields(session_id: str, detail: str) -> dict[str, Any]:
    raise ValueError(f"cannot build {detail}")


def good_fields(session_id: str, verb: str) -> dict[str, Any]:
    return {"session_id": session_id, "verb": verb}


async def test_an_event_that_fails_to_build_is_dropped_alone_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The rest of its batch is delivered, and nothing raises into the session whose event
    happened to deliver the batch (here s2's ``session.closed``)."""
    seen, telemetry = recorder()
    one, two = SessionTelemetry(telemetry, "s1"), SessionTelemetry(telemetry, "s2")
    with structlog.testing.capture_logs() as captured:
        async with trio.open_nursery() as nursery:
            await nursery.start(telemetry.deliver_in_batches)
            one.info_lazily("pop3.command", good_fields, "USER")
            one.info_lazily("pop3.command", failing_fields, "hunter2-field-value")
            one.info_lazily("pop3.command", good_fields, "QUIT")
            two.info("session.closed", reason="quit")
            nursery.cancel_scope.cancel()
    assert [(e, f.get("verb")) for e, f in seen] == [
        ("pop3.command", "USER"),
        ("pop3.command", "QUIT"),
        ("session.closed", None),
    ]
    assert telemetry.dropped_events == 1
    warnings = [c for c in captured if c["event"] == "telemetry.event_dropped"]
    assert warnings == [
        {
            "event": "telemetry.event_dropped",
            "log_level": "warning",
            "dropped_event": "pop3.command",
            "error_type": "ValueError",
            "session_id": None,  # not s2, whose task delivered the batch
        }
    ]
    assert "hunter2" not in repr(captured)


async def test_a_failing_event_in_a_full_batch_or_on_the_timer_harms_nobody(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen, telemetry = recorder()
    one, two = SessionTelemetry(telemetry, "s1"), SessionTelemetry(telemetry, "s2")
    async with trio.open_nursery() as nursery:
        await nursery.start(telemetry.deliver_in_batches)
        # On the timer: the batch task must survive it.
        one.info_lazily("pop3.command", failing_fields, "x")
        one.info_lazily("pop3.command", good_fields, "NOOP")
        await trio.sleep(BATCH_INTERVAL * 1.5)
        assert [f["verb"] for _, f in seen] == ["NOOP"]
        # A full batch, filled up by another session's command.
        one.info_lazily("pop3.command", failing_fields, "x")
        for _ in range(BATCH_LIMIT - 1):
            two.info_lazily("pop3.command", good_fields, "STAT")
        assert len(seen) == BATCH_LIMIT
        # And once more on the timer, so the task is still delivering.
        one.info_lazily("pop3.command", good_fields, "QUIT")
        await trio.sleep(BATCH_INTERVAL * 1.5)
        assert seen[-1][1]["verb"] == "QUIT"
        nursery.cancel_scope.cancel()
    assert telemetry.dropped_events == 2


def test_a_transform_that_fails_drops_that_event_only() -> None:
    def transform(event: str, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        if fields.get("user") == "weird":
            raise UnicodeError("no pseudonym")
        return fields

    seen: Record = []
    telemetry = Telemetry([lambda e, _level, f: seen.append((e, dict(f)))], transform=transform)
    log = SessionTelemetry(telemetry, "s1")
    log.info("pop3.login", user="weird")
    log.info("pop3.login", user="alice")
    assert [f["user"] for _, f in seen] == ["alice"]
    assert telemetry.dropped_events == 1
