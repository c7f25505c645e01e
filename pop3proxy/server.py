"""The listener: accepts plaintext POP3 clients and hands each one to a relay session.

Out of file descriptors, ``accept(2)`` fails at once (EMFILE, ENFILE), whether a client
waits or not, and the client would wait unanswered in the kernel's queue. The accept loop
keeps one spare descriptor for that moment: it lets go of it, accepts the client, and the
client is told ``-ERR [SYS/TEMP]`` (the proxy is out of resources, close reason
``refused_local_resources``) rather than left hanging; then the spare is taken again.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Sequence

import structlog
import trio

from pop3proxy.addresses import format_address
from pop3proxy.config import Settings
from pop3proxy.policy import Policy, Verdict
from pop3proxy.relay import OUT_OF_RESOURCES, Proxy
from pop3proxy.telemetry import Telemetry
from pop3proxy.tls import make_upstream_context

__all__ = ["FDS_PER_SESSION", "FD_RESERVE", "build_proxy", "ensure_fd_limit", "serve"]

log = structlog.get_logger("pop3proxy.server")

#: accept(2) errors that mean "not now, this host is short of something" (as trio's own
#: ``serve_listeners`` treats them).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long to wait before accepting again when even the spare descriptor is in use.
ACCEPT_RETRY_SECONDS = 0.1
#: What a client accepted on the spare descriptor is told.
TURNED_AWAY = Verdict("deny", "local_resources", OUT_OF_RESOURCES)

#: File descriptors one session holds: the client's socket and the upstream's.
FDS_PER_SESSION = 2
#: Descriptors beyond the sessions': stdio, the event loop, the listeners and their spare
#: descriptors, the admin endpoint and its clients, readiness probes, the inventory database,
#: name lookups. (Idle, with the admin endpoint, the proxy holds 13.)
FD_RESERVE = 64


def ensure_fd_limit(settings: Settings) -> int:
    """Make RLIMIT_NOFILE fit ``max_sessions``, as far as the hard limit allows.

    Raises the soft limit toward what the sessions need (never beyond the hard limit, never
    lowers it) and warns, naming both numbers, when it still does not fit: past it, clients
    are told the proxy is out of resources (``local_resources``), and the log and metrics
    count them as such, not as an unreachable upstream. Returns the soft limit.
    """
    needed = settings.max_sessions * FDS_PER_SESSION + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if wanted > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            except (ValueError, OSError) as exc:
                log.warning("fd_limit.raise_failed", soft_limit=soft, wanted=wanted, error=str(exc))
            else:
                log.info(
                    "fd_limit.raised",
                    soft_limit=wanted,
                    previous=soft,
                    hard_limit=None if hard == resource.RLIM_INFINITY else hard,
                )
                soft = wanted
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "fd_limit.too_low",
            max_sessions=settings.max_sessions,
            needed=needed,
            soft_limit=soft,
            hard_limit=None if hard == resource.RLIM_INFINITY else hard,
            note="raise the hard limit (LimitNOFILE=, ulimit -Hn) or lower max_sessions",
        )
    return soft


def build_proxy(
    settings: Settings, telemetry: Telemetry | None = None, policies: Sequence[Policy] = ()
) -> Proxy:
    """The proxy for ``settings``, with its TLS context built once, now.

    Building the context here makes a bad CA file fail at start-up (or at SIGHUP, keeping
    the old one) rather than on the first client.
    """
    context = make_upstream_context(settings.upstream_ca_file, settings.tls_min_version)
    return Proxy(
        settings, context, listener=str(settings.listen), telemetry=telemetry, policies=policies
    )


async def serve(
    settings: Settings,
    *,
    telemetry: Telemetry | None = None,
    proxy: Proxy | None = None,
    handler_nursery: trio.Nursery | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``settings.listen`` and relay every client to ``settings.upstream``.

    Calls ``task_status.started`` with the bound addresses (useful with port 0). Cancelling
    this task stops accepting and closes the listeners; sessions run in ``handler_nursery``
    when one is given, so they can outlive it (graceful drain).
    """
    if proxy is None:
        proxy = build_proxy(settings, telemetry)
    listeners = await trio.open_tcp_listeners(settings.listen.port, host=settings.listen.host)
    addresses = [format_address(listener.socket.getsockname()) for listener in listeners]
    proxy.listener = ", ".join(addresses)
    for address in addresses:
        log.info(
            "listener.started",
            address=address,
            upstream=str(settings.upstream),
            tls_server_name=settings.tls_server_name,
            tls_min_version=settings.tls_min_version,
            upstream_ca_file=str(settings.upstream_ca_file or "system"),
        )
    task_status.started(addresses)
    async with trio.open_nursery() as accepting:
        sessions = handler_nursery or accepting
        for listener in listeners:
            accepting.start_soon(_accept_clients, listener, proxy, sessions)


class _SpareDescriptor:
    """One file descriptor held back for the moment the process has none left."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def take(self) -> None:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:  # none to be had yet: try again on the next accept
                self.fd = None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


async def _accept_clients(
    listener: trio.SocketListener, proxy: Proxy, sessions: trio.Nursery
) -> None:
    """Accept clients until cancelled; each runs :meth:`Proxy.handle_client` in ``sessions``."""
    spare = _SpareDescriptor()
    short = False  # in a shortage: logged when it begins and when it ends, not per client
    try:
        async with listener:
            while True:
                spare.take()
                accepted = await _accept(listener)
                if isinstance(accepted, str):
                    if not short:
                        short = True
                        log.error(
                            "listener.accept_failed",
                            address=format_address(listener.socket.getsockname()),
                            reason="local_resources",
                            error=accepted,
                            active_sessions=proxy.gatekeeper.active,
                        )
                    # accept(2) fails at once whether or not a client waits: wait for one
                    # (no busy loop), then try again, as a session may have ended meanwhile.
                    await trio.lowlevel.wait_readable(listener.socket)
                    accepted = await _accept(listener)
                if isinstance(accepted, str):
                    await _turn_away_one(listener, proxy, sessions, spare)
                    continue
                if short:
                    short = False
                    log.info("listener.accept_recovered", active_sessions=proxy.gatekeeper.active)
                sessions.start_soon(proxy.handle_client, accepted)
    finally:
        spare.release()


async def _accept(listener: trio.SocketListener) -> trio.SocketStream | str:
    """The next client, or what accept(2) ran short of (its errno, named and explained)."""
    try:
        return await listener.accept()
    except OSError as exc:
        if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
            raise
        return f"{errno.errorcode[exc.errno]}: {os.strerror(exc.errno)}"


async def _turn_away_one(
    listener: trio.SocketListener, proxy: Proxy, sessions: trio.Nursery, spare: _SpareDescriptor
) -> None:
    """accept(2) failed for want of a descriptor: answer the waiting client on the spare one."""
    if spare.fd is None:  # the spare still serves the last refusal: give it a moment
        await trio.sleep(ACCEPT_RETRY_SECONDS)
        return
    spare.release()
    # The accept(2) runs before this task yields: no other task takes the descriptor first.
    accepted = await _accept(listener)
    if isinstance(accepted, str):  # something else took it after all (a thread)
        await trio.sleep(ACCEPT_RETRY_SECONDS)
        return
    answered = trio.Event()
    sessions.start_soon(_refuse, proxy, accepted, answered)
    with trio.move_on_after(ACCEPT_RETRY_SECONDS):
        await answered.wait()  # its descriptor is free again: the spare can be taken back


async def _refuse(proxy: Proxy, client: trio.SocketStream, answered: trio.Event) -> None:
    try:
        await proxy.handle_client(client, refusal=TURNED_AWAY)
    finally:
        answered.set()
