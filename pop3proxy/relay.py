"""One proxied POP3 session: the trio half of the design.

The handler accepts a plaintext client, opens verified TLS to the upstream, and runs two
pumps (client to upstream, upstream to client) plus a watchdog in one nursery. The
pumps only move octets: :class:`~pop3proxy.pop3.Pop3Conversation` decides what each octet
means and what to forward, and its events become log lines here. Every deadline of a session
(idle, command line, login, greeting, half-close, lifetime) is kept in one
:class:`SessionDeadlines`, which the watchdog enforces.

:meth:`Proxy.handle_client` is the error boundary: whatever goes wrong in one session is
logged once and ends that session only; nothing reaches the listener
(``trio.serve_listeners`` would let a handler's exception tear down every session).

Memory per session is bounded whatever the message size: one client read
(:data:`CLIENT_RECEIVE_SIZE`), one upstream batch (:data:`UPSTREAM_BATCH_LIMIT` of plaintext
plus one socket read of ciphertext, :data:`pop3proxy.streams.RECEIVE_SIZE`), and the engine's
line buffers. Bodies are
forwarded as they arrive; ``send_all`` to a slow client blocks the upstream pump, so the
upstream's TCP window, not our memory, absorbs the difference (back-pressure).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from pop3proxy.addresses import client_ip, format_address
from pop3proxy.admission import Gatekeeper
from pop3proxy.config import Settings
from pop3proxy.policy import IPAddress, Policy, Verdict
from pop3proxy.pop3 import (
    CapabilityLine,
    Command,
    CommandCompleted,
    ConnectionClosed,
    Event,
    Greeting,
    LocalReply,
    LoginFailed,
    LoginSucceeded,
    Pop3Conversation,
    RemoteProtocolError,
    SaslEnded,
    SaslStarted,
    State,
    UnsolicitedResponse,
    UserNamed,
)
from pop3proxy.streams import SocketStream, TLSStream
from pop3proxy.telemetry import SessionTelemetry, Telemetry
from pop3proxy.tls import UpstreamError, describe_peer, open_upstream

__all__ = [
    "CLIENT_RECEIVE_SIZE",
    "UPSTREAM_BATCH_LIMIT",
    "Proxy",
    "SessionDeadlines",
    "format_address",
]

#: Octets read from the client per call; clients send short command lines.
CLIENT_RECEIVE_SIZE = 16 * 1024
#: A larger batch goes to the client in pieces of this size, so that a slow reader's progress
#: shows as octets moved (the idle and close timers) while the batch is still being read.
CLIENT_SEND_PIECE = 64 * 1024
#: Most plaintext gathered from already-received TLS records before one send to the client.
UPSTREAM_BATCH_LIMIT = 256 * 1024
#: While a message body streams in small reads, wait this long before the next read so that
#: one wake-up relays a larger batch (the body is still forwarded as it arrives).
BODY_COALESCE_SECONDS = 0.001
BODY_COALESCE_OCTETS = 64 * 1024
#: How long a last line to a departing client (a refusal) may take to send.
CLOSE_TIMEOUT = 2.0
REFUSE_UNKNOWN = b"-ERR [SYS/PERM] cannot tell where you connect from\r\n"
NO_GREETING = b"-ERR [SYS/TEMP] the mail server closed the connection before greeting\r\n"
#: Not the upstream's fault: this process is out of file descriptors or memory.
OUT_OF_RESOURCES = b"-ERR [SYS/TEMP] the proxy is out of resources, try again later\r\n"
#: The last line for a session ended by one of its deadlines, when a line can still be sent
#: (RFC 3206 section 4: SYS/TEMP, the same request may work later). The idle and lifetime
#: limits close without one: RFC 1939 section 3 has the autologout timer send no response.
DEADLINE_GOODBYES = {
    "greeting_timeout": "-ERR [SYS/TEMP] the mail server did not greet within {:g} s, "
    "try again later",
    "login_timeout": "-ERR [SYS/TEMP] no login within {:g} s, closing",
    "command_timeout": "-ERR [SYS/TEMP] command line not completed within {:g} s, closing",
    "close_timeout": "-ERR [SYS/TEMP] the mail server did not answer within {:g} s, closing",
}


@dataclass(slots=True)
class SessionStats:
    """Totals for the closing log line (the "canonical log line" of the session)."""

    bytes_from_client: int = 0
    bytes_to_client: int = 0
    bytes_from_upstream: int = 0
    bytes_to_upstream: int = 0
    commands: int = 0
    user: str | None = None
    tls_version: str | None = None
    command_started: dict[int, float] = field(default_factory=dict)


@dataclass(slots=True)
class SessionDeadlines:
    """Every deadline of a relayed session, in one place: bookkeeping only, no I/O, no clock.

    The relay reports what happens, with the time it happened; :meth:`next_due` says which
    deadline comes first and what it is called (the session's close reason). Moving a
    deadline later needs nothing more: the watchdog reads them again whenever it wakes. A
    report that can bring one earlier (a line left open, the client's half-close) returns it,
    and the relay wakes the watchdog by it.

    - ``idle_timeout``: from the last octet moved in either direction (RFC 1939 section 3);
    - ``close_timeout``: once the client has half-closed, from the last octet moved, so a
      slow reader of a large reply keeps going while octets move;
    - ``command_timeout``: from the first octet of a client line to its LF, counted only while
      the proxy waits for the client (not while back-pressure stops it reading);
    - ``login_timeout``: from accept to the upstream's ``+OK`` to a login;
    - ``greeting_timeout``: from TLS up to the upstream's greeting;
    - ``session_timeout``: from accept, whatever happens (optional).
    """

    idle_timeout: float
    close_timeout: float
    command_timeout: float
    #: When an octet last moved, in either direction.
    last_moved: float
    greeting_due: float | None
    login_due: float | None
    session_due: float | None = None
    #: When the unfinished client line times out; None when the last octet read was an LF.
    line_due: float | None = None
    #: Since when the proxy has not been reading from the client (the line's clock is held).
    line_held_since: float | None = None
    client_done: bool = False

    def next_due(self) -> tuple[float, str]:
        """The earliest deadline and its name; on a tie, the more specific one."""
        due, reason = self.last_moved + self.idle_timeout, "idle_timeout"
        if self.client_done and self.last_moved + self.close_timeout <= due:
            due, reason = self.last_moved + self.close_timeout, "close_timeout"
        if self.line_due is not None and self.line_held_since is None and self.line_due <= due:
            due, reason = self.line_due, "command_timeout"
        if self.login_due is not None and self.login_due <= due:
            due, reason = self.login_due, "login_timeout"
        if self.greeting_due is not None and self.greeting_due <= due:
            due, reason = self.greeting_due, "greeting_timeout"
        if self.session_due is not None and self.session_due < due:
            due, reason = self.session_due, "session_timeout"
        return due, reason

    def client_read(self, data: bytes, now: float) -> float | None:
        """Octets from the client, just read; returns the line's deadline if one starts."""
        self.last_moved = now
        if data[-1] == 10:  # the read ends a line: the usual case, one whole command
            self.line_due = None
            return None
        self.line_held_since = now  # until the next read begins, the proxy is not waiting
        if self.line_due is None or b"\n" in data:  # a new line has started
            self.line_due = now + self.command_timeout
            return self.line_due
        return None

    def reading_client(self, now: float) -> float | None:
        """The proxy waits for the client again; returns the open line's (later) deadline."""
        held, self.line_held_since = self.line_held_since, None
        if held is None or self.line_due is None:
            return None
        self.line_due += now - held  # time spent not reading is not the client's
        return self.line_due

    def client_closed(self, now: float) -> float:
        """The client half-closed: its replies have ``close_timeout`` from the last octet."""
        self.last_moved = now
        self.client_done = True
        self.line_due = self.line_held_since = None  # a line that can no longer end
        return now + min(self.close_timeout, self.idle_timeout)


class Proxy:
    """Serves POP3 clients on behalf of one upstream; one instance per listener set.

    Args:
        settings: validated settings (upstream, timeouts).
        context: the upstream TLS context, built once (:func:`pop3proxy.tls.make_upstream_context`).
        listener: the listening address, for the logs.
        telemetry: where session events go (the log, and later metrics and feeds).
    """

    def __init__(
        self,
        settings: Settings,
        context: ssl.SSLContext,
        listener: str,
        telemetry: Telemetry | None = None,
        policies: Sequence[Policy] = (),
    ) -> None:
        self.listener = listener
        self.telemetry = telemetry or Telemetry()
        self.gatekeeper = Gatekeeper(settings, policies)
        self._use(settings, context)

    def reconfigure(
        self, settings: Settings, context: ssl.SSLContext, policies: Sequence[Policy] = ()
    ) -> None:
        """Use new settings, trust material and policies for new sessions (SIGHUP)."""
        self._use(settings, context)
        self.gatekeeper.reconfigure(settings, policies)

    def _use(self, settings: Settings, context: ssl.SSLContext) -> None:
        if settings.upstream is None:
            raise ValueError("settings.upstream is required")
        self.settings = settings
        self.upstream = settings.upstream
        self.context = context

    async def handle_client(
        self, accepted: trio.SocketStream, refusal: Verdict | None = None
    ) -> None:
        """Run one session from accept to close; never raises (the error boundary).

        ``refusal``: turn the client away with this verdict, whatever the gatekeeper says
        (the listener is out of file descriptors).
        """
        try:
            client = SocketStream.from_trio(accepted)
        except OSError:  # gone already
            await trio.aclose_forcefully(accepted)
            return
        session_id = secrets.token_hex(4)
        # Lines logged by libraries inside this task carry the session id too.
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(session_id=session_id)
        log = SessionTelemetry(self.telemetry, session_id)
        started = trio.current_time()
        stats = SessionStats()
        reason = "shutdown"  # kept only if the session is cancelled from outside
        try:
            sockaddr = client.socket.getpeername()
            peer, address = format_address(sockaddr), client_ip(sockaddr[0])
        except (OSError, ValueError):
            peer, address = "unknown", None
        log.info("session.opened", client=peer, listener=self.listener)
        gatekeeper = self.gatekeeper
        admitted = False
        try:
            verdict = refusal or Verdict("deny", "unknown_client", REFUSE_UNKNOWN)
            if address is not None and refusal is None:
                verdict = gatekeeper.admit(address, dt.datetime.now(dt.UTC))
            _log_verdict(log, verdict, None)
            if verdict.action == "deny" and not verdict.dry_run:
                reply = verdict.reply or REFUSE_UNKNOWN
                stats.bytes_to_client += await _send_quietly(client, reply)
                reason = f"refused_{verdict.reason}"
                return
            assert address is not None
            gatekeeper.session_started(address)
            admitted = True
            session = _Session(
                self,
                client,
                address=address,
                stats=stats,
                log=log,
                admission=verdict,
                opened_at=started,
            )
            reason = await session.run()
        except Exception as exc:  # the error boundary: one broken session never spreads
            reason = "internal_error"
            log.exception("session.error", error_type=type(exc).__name__)
            await _send_quietly(client, b"-ERR [SYS/TEMP] internal proxy error\r\n")
        finally:
            if admitted and address is not None:
                gatekeeper.session_ended(address)
            # Log before the last await: when the session is being cancelled (drain deadline,
            # shutdown), any checkpoint here re-raises Cancelled.
            log.info(
                "session.closed",
                reason=reason,
                user=stats.user,
                commands=stats.commands,
                bytes_from_client=stats.bytes_from_client,
                bytes_to_client=stats.bytes_to_client,
                bytes_from_upstream=stats.bytes_from_upstream,
                bytes_to_upstream=stats.bytes_to_upstream,
                tls_version=stats.tls_version,
                duration_s=round(trio.current_time() - started, 3),
            )
            await trio.aclose_forcefully(client)


def _gates_command(events: list[Event]) -> bool:
    """Whether observing ``events`` may stop the command from being sent (a login policy)."""
    return UserNamed in map(type, events)


def _command_fields(session_id: str, event: CommandCompleted, duration: float) -> dict[str, Any]:
    """The ``pop3.command`` line: one per command, so built in the telemetry batch."""
    command, status = event.command, event.status
    return {
        "session_id": session_id,
        "verb": command.verb,
        "args": command.loggable_args(),
        "status": status.indicator,
        "code": status.code,
        "reply_octets": event.reply_octets,
        "duration_ms": round(duration * 1000, 3),
    }


def _delays_reply(events: list[Event]) -> bool:
    """Whether observing ``events`` may hold back the reply (a failed login's penalty)."""
    return LoginFailed in map(type, events)


def _log_verdict(log: SessionTelemetry, verdict: Verdict, user: str | None) -> None:
    if verdict.action == "allow" and not verdict.dry_run:
        return
    level = log.warning if verdict.action == "deny" and not verdict.dry_run else log.info
    level(
        "policy.verdict",
        action=verdict.action,
        reason=verdict.reason,
        rule=verdict.rule,
        dry_run=verdict.dry_run,
        user=user,
    )


class _Session:
    """One admitted client: connect upstream, then relay until either side is done."""

    def __init__(
        self,
        proxy: Proxy,
        client: SocketStream,
        *,
        address: IPAddress,
        stats: SessionStats,
        log: SessionTelemetry,
        admission: Verdict,
        opened_at: float,
    ) -> None:
        # A session keeps the configuration it was admitted with, whatever SIGHUP brings.
        self.settings = proxy.settings
        self.context = proxy.context
        self.upstream_endpoint = proxy.upstream
        self.gatekeeper = proxy.gatekeeper
        self.client = client
        self.address = address
        self.stats = stats
        self.log = log
        self.admission = admission
        #: When the client was accepted: the login and lifetime deadlines count from here.
        self.opened_at = opened_at

    async def run(self) -> str:
        settings, log, endpoint = self.settings, self.log, self.upstream_endpoint
        try:
            upstream = await open_upstream(
                endpoint.host,
                endpoint.port,
                server_name=settings.tls_server_name,
                context=self.context,
                connect_timeout=settings.connect_timeout,
                handshake_timeout=settings.handshake_timeout,
            )
        except UpstreamError as exc:
            local = exc.reason == "local_resources"  # the proxy's own limits, not the server
            (log.error if local else log.warning)(
                "upstream.failed",
                upstream=str(endpoint),
                phase=exc.phase,
                reason=exc.reason,
                error=exc.message,
            )
            reply = (
                OUT_OF_RESOURCES
                if local
                else f"-ERR [SYS/TEMP] mail server unavailable ({exc.reason}), "
                "try again later\r\n".encode()
            )
            self.stats.bytes_to_client += await _send_quietly(self.client, reply)
            return "local_resources" if local else "upstream_failed"
        peer = describe_peer(upstream)
        self.stats.tls_version = peer["tls_version"]
        log.info("upstream.tls_established", upstream=str(endpoint), **peer)
        relay = _Relay(self, upstream)
        try:
            return await relay.run()
        finally:
            with (
                trio.move_on_after(settings.close_timeout, shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await upstream.aclose()
            await trio.aclose_forcefully(upstream)


async def _send_quietly(stream: SocketStream, data: bytes) -> int:
    """Best-effort send of a last line to a client that may already be gone."""
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return 0
        return len(data)
    return 0


class _OneWriter:
    """One task at a time sends to the client, so replies keep their order.

    Unlike ``trio.Lock``, taking it when it is free is not a checkpoint: a lock round trip
    through the scheduler on every reply was a measurable part of a command's latency.
    The send it guards is the checkpoint. ``busy``/``release`` are the same without the
    ``async with`` (two coroutines per reply) for the caller that found it free.
    """

    __slots__ = ("_waiting", "busy")

    def __init__(self) -> None:
        self.busy = False
        self._waiting = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self.busy:
            await self._waiting.park()
        self.busy = True

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        self.busy = False
        if self._waiting:  # rarely anyone: skip the call
            self._waiting.unpark()


class _Relay:
    """The two pumps and the watchdog of an established session."""

    def __init__(self, session: _Session, upstream: TLSStream) -> None:
        settings = session.settings
        self.session = session
        self.log = session.log
        self.client = session.client
        self.upstream = upstream
        self.stats = session.stats
        self.settings = settings
        now, opened = trio.current_time(), session.opened_at
        self.deadlines = SessionDeadlines(
            idle_timeout=settings.idle_timeout,
            close_timeout=settings.close_timeout,
            command_timeout=settings.command_timeout,
            last_moved=now,
            greeting_due=now + settings.greeting_timeout,
            login_due=opened + settings.login_timeout,
            session_due=None
            if settings.session_timeout is None
            else opened + settings.session_timeout,
        )
        #: The watchdog's sleep; a deadline brought earlier moves its end (see _wake_by).
        self.watch_scope: trio.CancelScope | None = None
        self.conversation = Pop3Conversation(
            max_command_line=settings.max_command_line,
            max_sasl_line=settings.max_auth_line,
            max_pipelined=settings.max_pipelined,
        )
        self.conversation.greeting_notice = session.admission.notice
        self.client_writer = _OneWriter()
        #: Where the client pump waits while pipelined commands fill the queue.
        self.reply_room = trio.lowlevel.ParkingLot()
        self.login_failures = 0
        #: Set when a login was refused here: the session ends once the refusal is sent.
        self.end_after_flush: str | None = None
        #: Seconds to hold back the next reply to the client (a failed login's penalty).
        self.reply_delay = 0.0
        self.reason: str | None = None
        self.cancel_scope = trio.CancelScope()
        self.observers: dict[type[Event], Callable[[Any], None]] = {
            Command: self._on_command,
            CommandCompleted: self._on_completed,
            LoginSucceeded: self._on_login_ok,
            LoginFailed: self._on_login_failed,
            Greeting: self._on_greeting,
            LocalReply: self._on_local_reply,
            UnsolicitedResponse: self._on_unsolicited,
            SaslStarted: self._on_sasl_started,
            SaslEnded: self._on_sasl_ended,
            CapabilityLine: self._on_capability,
            UserNamed: self._on_user_named,
        }

    async def run(self) -> str:
        with self.cancel_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._client_to_upstream)
                nursery.start_soon(self._upstream_to_client)
                nursery.start_soon(self._watchdog)
        ended_by_peer = self.reason in {"client_closed", "upstream_closed"}
        if ended_by_peer and self.conversation.quit_acknowledged:
            return "quit"
        return self.reason or "closed"

    def _finish(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.cancel_scope.cancel()

    # ------------------------------------------------------------------ pumps

    async def _client_to_upstream(self) -> None:
        conversation = self.conversation
        while True:
            if conversation.client_backlog:
                # RFC 2449 PIPELINING, bounded: read no more until replies make room.
                while conversation.client_paused:
                    await self.reply_room.park()
                data = b""
            else:
                received = await self._receive_from_client()
                if received is None:
                    return
                data = received
            try:
                events = conversation.receive_client(data)
            except RemoteProtocolError as exc:
                await self._protocol_error(exc)
                return
            if _gates_command(events):
                self._observe(events)  # a login policy may answer it here instead
                events = []
            outgoing = conversation.take_upstream_bytes()
            try:
                if outgoing:
                    await self.upstream.send_all(outgoing)
                    self.stats.bytes_to_upstream += len(outgoing)
                    self.deadlines.last_moved = trio.current_time()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._finish("upstream_reset")
                return
            finally:
                self._observe(events)  # after the send: off the command's round trip
            if conversation.owes_client:
                await self._flush_to_client()

    async def _receive_from_client(self) -> bytes | None:
        """The client's next octets; None once it has gone (the session's end is arranged)."""
        deadlines = self.deadlines
        if deadlines.line_held_since is not None:  # a line is open: its clock runs again
            self._wake_by(deadlines.reading_client(trio.current_time()))
        try:
            data = await self.client.receive_some(CLIENT_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._finish("client_reset")
            return None
        now = trio.current_time()
        if not data:
            self._observe(self.conversation.client_closed())
            self._wake_by(deadlines.client_closed(now))
            if not self.conversation.pending:
                self._finish("client_closed")
            return None
        line_due = deadlines.client_read(data, now)
        if line_due is not None:  # a line was left open: the watchdog must know by then
            self._wake_by(line_due)
        self.stats.bytes_from_client += len(data)
        return data

    def _wake_by(self, when: float | None) -> None:
        """Make the watchdog look again by ``when`` (a deadline that came earlier)."""
        scope = self.watch_scope
        if when is not None and scope is not None and when < scope.deadline:
            scope.deadline = when

    async def _upstream_to_client(self) -> None:
        conversation, stats, upstream = self.conversation, self.stats, self.upstream
        while True:
            try:
                data = await upstream.receive_some(UPSTREAM_BATCH_LIMIT)
            except trio.BrokenResourceError:
                # No TLS close_notify. Harmless after +OK to QUIT (many servers just close);
                # anywhere else the reply was cut short.
                await self._upstream_closed(tls_close_notify=False)
                return
            if not data:
                await self._upstream_closed(tls_close_notify=True)
                return
            self.deadlines.last_moved = trio.current_time()
            stats.bytes_from_upstream += len(data)
            try:
                events = conversation.receive_server(data)
            except RemoteProtocolError as exc:
                await self._protocol_error(exc)
                return
            if self.reply_room:
                self.reply_room.unpark_all()
            if _delays_reply(events):
                self._observe(events)
                await self._flush_to_client()
            else:
                # The reply first, then its log lines and metrics: they are off the client's
                # round trip (and still happen if the send fails or is cancelled).
                try:
                    await self._flush_to_client()
                finally:
                    self._observe(events)
            if self.deadlines.client_done and not conversation.pending:
                self._finish("client_closed")
                return
            if conversation.in_body and len(data) < BODY_COALESCE_OCTETS:
                # Mid-body, the server streams faster than one read each wake-up can take:
                # let the socket gather a larger batch instead of waking per record.
                await trio.sleep(BODY_COALESCE_SECONDS)

    async def _flush_to_client(self) -> None:
        """Send what the conversation owes the client; one writer at a time keeps the order."""
        if not self.conversation.owes_client:
            return
        writer = self.client_writer
        if not writer.busy and not self.reply_delay:  # the usual case, without the ceremony
            writer.busy = True
            try:
                await self._send_to_client()
            finally:
                writer.release()
            return
        async with writer:
            if self.reply_delay:
                delay, self.reply_delay = self.reply_delay, 0.0
                await trio.sleep(delay)
            await self._send_to_client()

    async def _send_to_client(self) -> None:
        if self.reason is not None:
            # The session is ending: after its last line (a goodbye, an error) nothing more
            # goes out, not even a reply a pump read just before the end was decided.
            return
        outgoing = self.conversation.take_client_bytes()
        if not outgoing:
            return
        try:
            if len(outgoing) <= CLIENT_SEND_PIECE:
                await self.client.send_all(outgoing)
                self.stats.bytes_to_client += len(outgoing)
            else:
                await self._send_in_pieces(outgoing)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._finish("client_reset")
            return
        self.deadlines.last_moved = trio.current_time()
        if self.end_after_flush is not None and not self.conversation.owes_client:
            self._finish(self.end_after_flush)  # the refusal itself has gone out

    async def _send_in_pieces(self, data: bytes) -> None:
        """A large batch, piece by piece: each piece a slow reader takes counts as progress."""
        view = memoryview(data)
        for start in range(0, len(view), CLIENT_SEND_PIECE):
            piece = view[start : start + CLIENT_SEND_PIECE]
            await self.client.send_all(piece)
            self.stats.bytes_to_client += len(piece)
            self.deadlines.last_moved = trio.current_time()

    async def _upstream_closed(self, *, tls_close_notify: bool) -> None:
        """The upstream ended the TLS stream: a normal end, or a cut to report.

        Normal: after ``+OK`` to QUIT (many servers skip close_notify then), or with
        close_notify and no reply outstanding (e.g. an autologout). Anything else, above
        all a bare TCP FIN without close_notify, may be a truncation by someone on the path
        (RFC 8446 section 6.1) and is logged as a warning. A client that has not even had
        a greeting is told why it is being dropped.
        """
        conversation = self.conversation
        await self._flush_to_client()  # whatever the upstream said last reaches the client
        greeted = conversation.state is not State.GREETING
        events = conversation.server_closed()
        clean = all(e.clean for e in events if isinstance(e, ConnectionClosed))
        if conversation.quit_acknowledged or (clean and tls_close_notify and greeted):
            self._finish("upstream_closed")
            return
        self.log.warning(
            "upstream.truncated",
            state="greeting" if not greeted else conversation.state.value,
            pending=conversation.pending,
            tls_close_notify=tls_close_notify,
            bytes_from_upstream=self.stats.bytes_from_upstream,
        )
        if not greeted:
            async with self.client_writer:
                self.stats.bytes_to_client += await _send_quietly(self.client, NO_GREETING)
        self._finish("upstream_truncated")

    async def _protocol_error(self, exc: RemoteProtocolError) -> None:
        self.log.warning("pop3.protocol_error", side=exc.side, error=exc.reason)
        async with self.client_writer:
            self.stats.bytes_to_client += await _send_quietly(self.client, exc.reply_hint)
        self._finish(f"{exc.side}_protocol_error")

    async def _watchdog(self) -> None:
        """Enforce :attr:`deadlines`: sleep until the first is due, then end the session.

        It reads the deadlines again each time it wakes, so one that moved later (octets
        moved, a line ended) costs nothing; one that moved earlier wakes it (:meth:`_wake_by`).
        """
        deadlines = self.deadlines
        while True:
            due, reason = deadlines.next_due()
            if trio.current_time() < due:
                with trio.CancelScope(deadline=due) as self.watch_scope:
                    await trio.sleep_forever()
                self.watch_scope = None
                continue
            # Let tasks woken at the same moment run first: a send that completed just now
            # moved octets, and must count before the timer does.
            await trio.lowlevel.checkpoint()
            due, reason = deadlines.next_due()
            if trio.current_time() >= due:
                await self._expire(reason)
                return

    async def _expire(self, reason: str) -> None:
        """A deadline passed: log it, say goodbye if a line can still be sent, and end."""
        log = self.log
        timeout: float = getattr(self.settings, reason)  # each deadline is named after its setting
        if reason == "greeting_timeout":
            log.warning(
                "upstream.failed",
                upstream=str(self.session.upstream_endpoint),
                phase="greeting",
                reason="timeout",
                error=f"no greeting within {timeout:g}s",
            )
        elif reason == "session_timeout":
            log.info("session.lifetime_exceeded", session_timeout_s=timeout)
        else:
            log.info(f"session.{reason}", timeout_s=timeout)
        goodbye = DEADLINE_GOODBYES.get(reason)
        conversation, writer = self.conversation, self.client_writer
        # Only between whole replies: never inside a message body, never ahead of queued octets.
        at_a_line_boundary = not (writer.busy or conversation.in_body or conversation.owes_client)
        if goodbye is not None and at_a_line_boundary:
            line = goodbye.format(timeout).encode() + b"\r\n"
            async with writer:
                self.stats.bytes_to_client += await _send_quietly(self.client, line)
        self._finish(reason)

    # ------------------------------------------------------------------ events to logs

    def _observe(self, events: list[Event]) -> None:
        observers = self.observers
        for event in events:
            observer = observers.get(type(event))
            if observer is not None:
                observer(event)

    def _on_command(self, event: Command) -> None:
        self.stats.commands += 1
        self.stats.command_started[event.seq] = trio.current_time()

    def _on_completed(self, event: CommandCompleted) -> None:
        started = self.stats.command_started.pop(event.command.seq, None)
        duration = trio.current_time() - started if started is not None else 0.0
        self.log.info_lazily("pop3.command", _command_fields, event, duration)

    def _on_login_ok(self, event: LoginSucceeded) -> None:
        self.deadlines.login_due = None
        self.stats.user = event.user
        self.log.info("pop3.login", user=event.user, mechanism=event.mechanism, result="success")

    def _on_user_named(self, event: UserNamed) -> None:
        """Refuse a login here, before the credential reaches the upstream, if policy says so."""
        session = self.session
        verdict = session.gatekeeper.check_login(
            session.address,
            event.user,
            session_failures=self.login_failures,
            monotonic=trio.current_time(),
            now=dt.datetime.now(dt.UTC),
        )
        # AUTH LOGIN's first line may be a confused client's password: keep it out of logs.
        _log_verdict(self.log, verdict, None if event.mechanism == "LOGIN" else event.user)
        if verdict.action != "deny" or verdict.dry_run:
            return
        refusal, reason = verdict.reply or b"", verdict.reason
        self._observe(self.conversation.answer_locally(event.command, refusal, reason=reason))
        # The session ends with this refusal: a credential pipelined behind it stays here.
        self.conversation.forward_nothing_after(event.command)
        self.end_after_flush = f"login_refused_{verdict.reason}"

    def _on_login_failed(self, event: LoginFailed) -> None:
        if not event.cancelled:  # a client that gives up with "*" guessed nothing
            self.login_failures += 1
            session = self.session
            delay = session.gatekeeper.record_login_failure(session.address, trio.current_time())
            self.reply_delay = max(self.reply_delay, delay)
        self.log.info(
            "pop3.login",
            user=event.user,
            mechanism=event.mechanism,
            result="cancelled" if event.cancelled else "failure",
            code=event.status.code,
        )

    def _on_greeting(self, event: Greeting) -> None:
        self.deadlines.greeting_due = None
        self.log.debug(
            "pop3.greeting",
            status=event.status.indicator,
            apop=event.apop_timestamp is not None,
        )

    def _on_local_reply(self, event: LocalReply) -> None:
        self.log.info(
            "pop3.local_reply",
            verb=event.command.verb,
            status=event.status.indicator,
            reason=event.reason,
        )

    def _on_unsolicited(self, event: UnsolicitedResponse) -> None:
        status = event.status
        self.log.info(
            "pop3.unsolicited", status=status.indicator, code=status.code, text=status.text
        )

    def _on_sasl_started(self, event: SaslStarted) -> None:
        self.log.debug(
            "pop3.sasl_started", mechanism=event.mechanism, initial_response=event.initial_response
        )

    def _on_sasl_ended(self, event: SaslEnded) -> None:
        self.log.debug(
            "pop3.sasl_ended",
            mechanism=event.mechanism,
            status=event.status.indicator,
            cancelled=event.cancelled,
        )

    def _on_capability(self, event: CapabilityLine) -> None:
        if event.hidden:
            self.log.debug("pop3.capability_hidden", capability=event.name)
