"""The listener: accepts plaintext POP3 clients and hands each one to a relay session."""

from __future__ import annotations

import structlog
import trio

from pop3proxy.config import Settings
from pop3proxy.relay import Proxy, format_address
from pop3proxy.telemetry import Telemetry
from pop3proxy.tls import make_upstream_context

__all__ = ["serve"]

log = structlog.get_logger("pop3proxy.server")


async def serve(
    settings: Settings,
    *,
    telemetry: Telemetry | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``settings.listen`` and relay every client to ``settings.upstream``.

    The TLS context is built once, before listening, so a bad CA file fails at start-up
    rather than on the first client. Calls ``task_status.started`` with the bound addresses
    (useful with port 0).
    """
    if settings.upstream is None:
        raise ValueError("settings.upstream is required")
    context = make_upstream_context(settings.upstream_ca_file, settings.tls_min_version)
    listeners = await trio.open_tcp_listeners(settings.listen.port, host=settings.listen.host)
    addresses = [format_address(listener.socket.getsockname()) for listener in listeners]
    proxy = Proxy(settings, context, listener=", ".join(addresses), telemetry=telemetry)
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
    await trio.serve_listeners(proxy.handle_client, listeners)
