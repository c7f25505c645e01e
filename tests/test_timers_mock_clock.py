"""Timers at their real, long defaults, on trio's mock clock: ten minutes take no time.

Everything runs in one trio run: the demo POP3S upstream (real TLS on loopback), the real
proxy, and a raw client. The clock autojumps only after 0.1 s of real idleness, so loopback
I/O completes before virtual time moves.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from pop3proxy import demo_upstream
from pop3proxy.config import Settings, load_settings
from pop3proxy.demo_pki import DemoPKI
from pop3proxy.server import serve
from pop3proxy.telemetry import Telemetry

Events = list[tuple[str, dict[str, Any]]]


class LineClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                return b""
            self.buffer += data
        end = self.buffer.index(b"\n") + 1
        line = bytes(self.buffer[:end])
        del self.buffer[:end]
        return line

    async def command(self, text: str) -> bytes:
        await self.stream.send_all(text.encode() + b"\r\n")
        return await self.line()


@asynccontextmanager
async def proxy_and_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **flags: str
) -> AsyncIterator[tuple[LineClient, Events]]:
    # The demo upstream's own limits must not be what the test sees.
    monkeypatch.setattr(demo_upstream, "IDLE_TIMEOUT", 24 * 3600.0)
    monkeypatch.setattr(demo_upstream, "MAX_AUTH_FAILURES", 100)
    pki = DemoPKI.create(tmp_path)
    events: Events = []

    def record(event: str, level: str, fields: Mapping[str, Any]) -> None:
        events.append((event, dict(fields)))

    async with trio.open_nursery() as nursery:
        upstream_port = await nursery.start(
            functools.partial(demo_upstream.serve_demo_upstream, pki.server_context())
        )
        settings: Settings = load_settings(
            {
                "listen": "127.0.0.1:0",
                "upstream": f"127.0.0.1:{upstream_port}",
                "upstream_ca_file": str(pki.ca_cert_path),
                "upstream_server_name": "localhost",
                **flags,
            },
            {},
        )
        addresses = await nursery.start(
            functools.partial(serve, settings, telemetry=Telemetry([record]))
        )
        port = int(addresses[0].rpartition(":")[2])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            yield LineClient(stream), events
        nursery.cancel_scope.cancel()


def closed_reasons(events: Events) -> list[object]:
    return [fields.get("reason") for event, fields in events if event == "session.closed"]


async def test_default_idle_timeout_is_ten_minutes_of_silence(
    mock_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mock_clock.autojump_threshold = 0.1
    async with proxy_and_client(tmp_path, monkeypatch) as (client, events):
        assert (await client.line()).startswith(b"+OK")
        assert (await client.command("USER demo")).startswith(b"+OK")
        assert (await client.command("PASS demo")).startswith(b"+OK")
        await trio.sleep(599)  # RFC 1939 section 3: at least 10 minutes
        assert (await client.command("NOOP")).startswith(b"+OK")  # traffic restarts the timer
        quiet_since = trio.current_time()
        assert await client.line() == b""  # the proxy hangs up...
        assert 600 <= trio.current_time() - quiet_since < 601  # ...after exactly 600 s
        await trio.sleep(1)
    assert closed_reasons(events) == ["idle_timeout"]
    assert any(event == "session.idle_timeout" for event, _ in events)


async def test_repeated_failed_logins_are_delayed_more_and_more(
    mock_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mock_clock.autojump_threshold = 0.1
    async with proxy_and_client(tmp_path, monkeypatch, max_login_failures="10") as (client, _):
        assert (await client.line()).startswith(b"+OK")
        waited = []
        for _ in range(5):
            assert (await client.command("USER demo")).startswith(b"+OK")
            sent = trio.current_time()
            assert (await client.command("PASS wrong")).startswith(b"-ERR")
            waited.append(round(trio.current_time() - sent))
        assert waited == [0, 0, 1, 2, 4]  # two free failures, then doubling (default cap 8 s)
        assert (await client.command("QUIT")).startswith(b"+OK")
