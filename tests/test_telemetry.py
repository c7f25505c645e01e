"""Telemetry's batched delivery: command events wait at most BATCH_INTERVAL, order never changes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio
import trio.testing

from pop3proxy.telemetry import (
    BATCH_INTERVAL,
    BATCH_LIMIT,
    SessionTelemetry,
    Telemetry,
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
