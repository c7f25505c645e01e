"""``pop3proxy serve`` as a whole: the POP3 listener plus the services that watch it.

The composition root. It builds the shared :class:`~pop3proxy.telemetry.Telemetry`, starts
every service in :data:`SERVICES` that the settings switch on (admin endpoint, inventory,
...), then the POP3 listener. Services see the proxy only through :class:`AppContext`: they
subscribe to session events, or read the settings; none reaches into the relay.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from pop3proxy.admin.http import admin_service
from pop3proxy.config import Settings
from pop3proxy.migration.inventory import inventory_service
from pop3proxy.telemetry import Telemetry

__all__ = ["SERVICES", "AppContext", "Service", "run"]


@dataclass(slots=True)
class AppContext:
    """What services share.

    Attributes:
        settings: the validated settings (replaced on SIGHUP reload).
        telemetry: subscribe with ``telemetry.add_sink`` to receive every session event.
        listeners: the bound POP3 addresses, once listening.
        started_at: ``trio.current_time()`` at start-up.
    """

    settings: Settings
    telemetry: Telemetry
    listeners: list[str] = field(default_factory=list)
    started_at: float = 0.0


#: A service runs until cancelled; it calls ``task_status.started()`` once it is ready, and
#: returns at once (after ``started()``) when the settings do not switch it on.
Service = Callable[[AppContext, trio.TaskStatus[None]], Awaitable[None]]

#: Started in this order before the POP3 listener; stopped when it stops.
SERVICES: list[Service] = [inventory_service, admin_service]


async def run(settings: Settings) -> None:
    """Run the proxy and its services until cancelled (Ctrl-C) or a service fails."""
    from pop3proxy.server import serve  # noqa: PLC0415 - keeps `pop3proxy --help` light

    context = AppContext(settings=settings, telemetry=Telemetry())
    context.started_at = trio.current_time()
    async with trio.open_nursery() as nursery:
        for service in SERVICES:
            await nursery.start(service, context)
        context.listeners = await nursery.start(
            functools.partial(serve, settings, telemetry=context.telemetry)
        )
