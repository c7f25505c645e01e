"""``pop3proxy serve`` as a whole: the POP3 listener plus the services that watch it.

The composition root. It builds the shared :class:`~pop3proxy.telemetry.Telemetry`, starts
every service in :data:`SERVICES` that the settings switch on (admin endpoint, inventory,
...), then the POP3 listener. Services see the proxy only through :class:`AppContext`: they
subscribe to session events, or read the settings; none reaches into the relay.
"""

from __future__ import annotations

import dataclasses
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from pop3proxy.admin.http import admin_service
from pop3proxy.config import ConfigError, Settings
from pop3proxy.migration.inventory import inventory_service, pseudonymizer_for
from pop3proxy.migration.rules import RuleSet
from pop3proxy.policy import Policy
from pop3proxy.relay import Proxy
from pop3proxy.server import build_proxy, ensure_fd_limit, serve
from pop3proxy.telemetry import Telemetry
from pop3proxy.tls import make_upstream_context

__all__ = ["SERVICES", "AppContext", "Service", "policies", "run"]

_log = structlog.get_logger("pop3proxy.app")


@dataclass(slots=True)
class AppContext:
    """What services share.

    Attributes:
        settings: the validated settings (replaced on SIGHUP reload).
        telemetry: subscribe with ``telemetry.add_sink`` to receive every session event.
        listeners: the bound POP3 addresses, once listening.
        started_at: ``trio.current_time()`` at start-up.
        draining: set once SIGTERM/SIGINT started the graceful drain (readiness fails).
        upstream_context: the TLS context new sessions use (replaced with ``settings`` on
            SIGHUP), so that every consumer of the trust material (readiness, the metrics it
            feeds) trusts exactly what the sessions trust.
    """

    settings: Settings
    telemetry: Telemetry
    listeners: list[str] = field(default_factory=list)
    started_at: float = 0.0
    draining: bool = False
    upstream_context: ssl.SSLContext | None = None


#: A service runs until cancelled; it calls ``task_status.started()`` once it is ready, and
#: returns at once (after ``started()``) when the settings do not switch it on.
Service = Callable[[AppContext, trio.TaskStatus[None]], Awaitable[None]]


async def telemetry_service(context: AppContext, task_status: trio.TaskStatus[None]) -> None:
    """Session events reach the log, metrics, feed and inventory in batches (see telemetry)."""
    await context.telemetry.deliver_in_batches(task_status)


#: Started in this order before the POP3 listener; stopped when it stops.
SERVICES: list[Service] = [telemetry_service, inventory_service, admin_service]


async def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> None:
    """Run the proxy and its services until a signal stops them.

    SIGTERM or SIGINT: stop accepting, let open sessions finish for up to ``drain_timeout``,
    close the rest, return (exit 0); a second one closes every session at once. SIGHUP:
    ``reload()`` the settings and use the new trust material, allow list and rules for new
    sessions; open sessions keep theirs.
    """
    ensure_fd_limit(settings)  # before anything opens a file or socket
    pseudonymizer = pseudonymizer_for(settings)
    telemetry = Telemetry(transform=pseudonymizer.event_fields if pseudonymizer else None)
    context = AppContext(settings=settings, telemetry=telemetry)
    context.started_at = trio.current_time()
    proxy = build_proxy(settings, context.telemetry, policies(settings))
    context.upstream_context = proxy.context
    async with trio.open_nursery() as services:
        for service in SERVICES:
            await services.start(service, context)
        async with trio.open_nursery() as sessions:
            accepting = trio.CancelScope()
            drain = _Drain(context, proxy, accepting, sessions.cancel_scope, reload)
            services.start_soon(drain.watch_signals)

            async def accept(task_status: trio.TaskStatus[list[str]]) -> None:
                with accepting:
                    await serve(
                        settings, proxy=proxy, handler_nursery=sessions, task_status=task_status
                    )

            context.listeners = await sessions.start(accept)
        telemetry.flush()  # the last sessions' events, while every sink is still there
        _log.info("proxy.stopped", reason="drained" if context.draining else "stopped")
        services.cancel_scope.cancel()


def policies(settings: Settings) -> list[Policy]:
    """The policies beyond the built-in access control: the migration phases (rules)."""
    rules = RuleSet.from_settings(settings)
    return [rules] if len(rules) else []


#: Settings read once at start (the listener, the admin endpoint, the inventory service,
#: logging, the pseudonym transform): a reload that changes one keeps the running value and
#: says so, instead of seeming to apply it. ``listen`` has its own event.
RESTART_ONLY = (
    "admin",
    "state_dir",
    "inventory",
    "inventory_flush_interval",
    "user_pseudonym_key_file",
    "user_pseudonym_key",
    "log_level",
    "log_format",
)


class _Drain:
    """Signal handling: graceful drain on SIGTERM/SIGINT, reload on SIGHUP."""

    def __init__(
        self,
        context: AppContext,
        proxy: Proxy,
        accepting: trio.CancelScope,
        sessions: trio.CancelScope,
        reload: Callable[[], Settings] | None,
    ) -> None:
        self.context = context
        self.proxy = proxy
        self.accepting = accepting
        self.sessions = sessions
        self.reload = reload

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reconfigure()
                elif not self.context.draining:
                    self.start_drain(signal.Signals(signum).name)
                else:
                    _log.warning(
                        "drain.aborted",
                        signal=signal.Signals(signum).name,
                        active_sessions=self.proxy.gatekeeper.active,
                    )
                    self.sessions.cancel()

    def start_drain(self, signal_name: str) -> None:
        timeout = self.context.settings.drain_timeout
        self.context.draining = True
        _log.info(
            "drain.started",
            signal=signal_name,
            active_sessions=self.proxy.gatekeeper.active,
            drain_timeout_s=timeout,
        )
        self.accepting.cancel()
        self.sessions.deadline = trio.current_time() + timeout

    def reconfigure(self) -> None:
        if self.reload is None:
            _log.warning("reload.unsupported")
            return
        old = self.context.settings
        try:
            new = self.reload()
            tls = make_upstream_context(new.upstream_ca_file, new.tls_min_version)
            rules = policies(new)
        except (ConfigError, ValueError, OSError) as exc:  # ssl.SSLError is an OSError
            _log.error("reload.failed", error=str(exc), kept="previous settings")
            return
        if new.listen != old.listen:
            _log.warning(
                "reload.listen_unchanged",
                listen=str(old.listen),
                wanted=str(new.listen),
                note="a new listen address needs a restart",
            )
            new = dataclasses.replace(new, listen=old.listen)
        changed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        if changed:
            # Named, never shown: a key or its file name is a secret.
            _log.warning(
                "reload.restart_needed",
                settings=changed,
                note="these take effect at the next start; the running ones are kept",
            )
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in changed})
        if new.max_sessions > old.max_sessions:
            ensure_fd_limit(new)
        self.proxy.reconfigure(new, tls, rules)
        self.context.settings, self.context.upstream_context = new, tls
        _log.info(
            "reload.done",
            allow=[str(n) for n in new.allow],
            rules=len(rules),
            upstream=str(new.upstream),
        )
