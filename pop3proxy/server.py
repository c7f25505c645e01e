"""The listener: accepts plaintext POP3 clients and hands each one to a relay session."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
import trio

from pop3proxy.config import Settings
from pop3proxy.policy import Policy
from pop3proxy.relay import Proxy, format_address
from pop3proxy.telemetry import Telemetry
from pop3proxy.tls import make_upstream_context

__all__ = ["build_proxy", "serve"]

log = structlog.get_logger("pop3proxy.server")


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
    await trio.serve_listeners(proxy.handle_client, listeners, handler_nursery=handler_nursery)
