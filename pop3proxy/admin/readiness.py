"""``/readyz``: is the upstream reachable, verified, and greeting? Probed on demand, cached briefly.

Ready means exactly what a session needs: a TCP connection to the upstream, a TLS handshake
with the chain and the host name verified (the same context and checks as the relay, from
:func:`pop3proxy.tls.open_upstream`), and a ``+OK`` greeting. The probe then says ``QUIT``
and closes politely, so the upstream logs an ordinary short session.

One probe runs at a time; concurrent requests wait for it and share its answer, which is
reused for ``readiness_cache`` seconds, so probes from several orchestrators never hammer
the upstream. Before the POP3 listener is up, the answer is "not ready" without a probe.

The probe uses the sessions' own TLS context (:attr:`pop3proxy.app.AppContext.upstream_context`),
not one of its own: a CA file replaced in place and reloaded with SIGHUP changes what both
trust at the same moment. An answer is only reused while the settings it was probed with are
in force, so the first request after a reload probes again.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import trio

from pop3proxy.tls import UpstreamError, describe_peer, make_upstream_context, open_upstream

if TYPE_CHECKING:
    from pop3proxy.app import AppContext
    from pop3proxy.config import Settings

__all__ = ["Readiness", "ReadinessResult"]

#: Longest greeting (or QUIT reply) line read; RFC 2449 allows 512 octets.
MAX_LINE: Final = 512
#: Seconds for the polite QUIT and TLS close after the greeting.
GOODBYE_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class ReadinessResult:
    """One probe's outcome. ``reason`` is ``ok`` when ready, else a short class of failure."""

    ready: bool
    reason: str
    checked_at: float
    upstream: str | None = None
    phase: str | None = None
    error: str | None = None
    tls_version: str | None = None

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "reason": self.reason,
            "phase": self.phase,
            "error": self.error,
            "upstream": self.upstream,
            "tls_version": self.tls_version,
            "age_s": round(max(0.0, now - self.checked_at), 3),
        }


def _printable(data: bytes, limit: int = 120) -> str:
    text = data.decode("ascii", "replace").strip()
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buffer = bytearray()
    while b"\n" not in buffer and len(buffer) < MAX_LINE:
        chunk = await stream.receive_some(MAX_LINE)
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


class Readiness:
    """The cached readiness probe.

    Args:
        ctx: the app context (current settings, whether the POP3 listener is up, telemetry
            for ``readiness.changed`` events).
        on_result: called with each fresh result (metrics: ready gauge, certificate expiry).
    """

    def __init__(
        self,
        ctx: AppContext,
        on_result: Callable[[ReadinessResult, dict[str, str | None] | None], None] | None = None,
    ) -> None:
        self.ctx = ctx
        self._on_result = on_result or (lambda result, peer: None)
        self._lock = trio.Lock()
        self._last: ReadinessResult | None = None
        #: The settings ``_last`` was probed with: a reload makes it stale at once.
        self._last_settings: Settings | None = None

    @property
    def last(self) -> ReadinessResult | None:
        return self._last

    async def check(self) -> ReadinessResult:
        """The cached answer if fresh, else a new probe (one at a time)."""
        if not self.ctx.listeners:
            now = trio.current_time()
            return ReadinessResult(False, "starting", now, error="not listening yet")
        if self.ctx.draining:
            return ReadinessResult(False, "draining", trio.current_time(), error="shutting down")
        async with self._lock:
            settings = self.ctx.settings
            last = self._last
            if (
                last is not None
                and self._last_settings is settings
                and trio.current_time() - last.checked_at
                < max(0.0, getattr(settings, "readiness_cache", 5.0))
            ):
                return last
            result, peer = await self._probe()
            self._last_settings = settings
            self._record(result, peer)
            return result

    def _record(self, result: ReadinessResult, peer: dict[str, str | None] | None) -> None:
        previous, self._last = self._last, result
        if previous is None or previous.ready != result.ready or previous.reason != result.reason:
            self.ctx.telemetry.emit(
                "readiness.changed",
                "info" if result.ready else "warning",
                ready=result.ready,
                reason=result.reason,
                phase=result.phase,
                error=result.error,
                upstream=result.upstream,
            )
        with contextlib.suppress(Exception):
            self._on_result(result, peer)

    def _tls_context(self) -> ssl.SSLContext:
        """The context sessions use now; built afresh (never cached) when there is none."""
        current = self.ctx.upstream_context
        if current is not None:
            return current
        settings = self.ctx.settings
        return make_upstream_context(settings.upstream_ca_file, settings.tls_min_version)

    async def _probe(self) -> tuple[ReadinessResult, dict[str, str | None] | None]:
        settings = self.ctx.settings
        upstream = settings.upstream
        if upstream is None:
            return ReadinessResult(False, "no_upstream", trio.current_time()), None

        def failed(reason: str, phase: str, error: str) -> ReadinessResult:
            return ReadinessResult(
                False, reason, trio.current_time(), str(upstream), phase=phase, error=error
            )

        try:
            stream = await open_upstream(
                upstream.host,
                upstream.port,
                server_name=settings.tls_server_name,
                context=self._tls_context(),
                connect_timeout=settings.connect_timeout,
                handshake_timeout=settings.handshake_timeout,
            )
        except UpstreamError as exc:
            return failed(exc.reason, exc.phase, exc.message), None
        peer: dict[str, str | None] | None = None
        try:
            peer = describe_peer(stream)
            with trio.move_on_after(settings.handshake_timeout) as scope:
                greeting = await _read_line(stream)
            if scope.cancelled_caught:
                timeout = settings.handshake_timeout
                return failed("timeout", "greeting", f"no greeting within {timeout:g}s"), peer
            if not greeting.startswith(b"+OK"):
                what = _printable(greeting) or "the server closed the connection"
                return failed("bad_greeting", "greeting", what), peer
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            return failed("closed", "greeting", str(exc) or type(exc).__name__), peer
        else:
            with (
                trio.move_on_after(GOODBYE_TIMEOUT),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await stream.send_all(b"QUIT\r\n")
                await _read_line(stream)  # greeted: a rude goodbye does not make it unready
            ready = ReadinessResult(
                True, "ok", trio.current_time(), str(upstream), tls_version=peer.get("tls_version")
            )
            return ready, peer
        finally:
            with (
                trio.move_on_after(GOODBYE_TIMEOUT, shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await stream.aclose()
            await trio.aclose_forcefully(stream)
