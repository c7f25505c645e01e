"""``pop3proxy demo``: the real proxy in front of an embedded demo POP3S server.

It is the first thing a newcomer runs, so it needs no configuration and no network:

1. a throwaway CA and server certificate are made in a temporary directory
   (:mod:`pop3proxy.demo_pki`), removed again when the demo stops;
2. the demo POP3S server (:mod:`pop3proxy.demo_upstream`) starts on an ephemeral loopback port;
3. the real proxy (:func:`pop3proxy.server.serve`, unchanged) starts in front of it and verifies
   its certificate against the demo CA and the name ``localhost``, exactly as in production;
4. instructions go to stderr, so stdout stays a pure log stream (JSON lines, or the console
   renderer on a terminal); then it runs until cancelled (Ctrl-C: the CLI turns the
   ``KeyboardInterrupt`` into exit status 0; SIGTERM stops it the same way, so the
   temporary directory is always removed).
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import tempfile
from pathlib import Path
from typing import TextIO

import structlog
import trio

from pop3proxy.config import Endpoint, Settings
from pop3proxy.demo_pki import DEMO_SERVER_NAME, DemoPKI
from pop3proxy.demo_upstream import DEMO_PASSWORD, DEMO_USER, serve_demo_upstream
from pop3proxy.server import serve

__all__ = ["connect_hint", "instructions", "run_demo"]

log = structlog.get_logger("pop3proxy.demo")

#: Where the demo upstream listens; the proxy dials it over TLS.
UPSTREAM_HOST = "127.0.0.1"

#: Wildcard listen addresses, and the loopback address a local client should dial instead.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def connect_hint(address: str) -> tuple[str, int]:
    """The host and port a local client should connect to for a bound ``address``.

    ``address`` is as :func:`pop3proxy.server.serve` reports it: ``"127.0.0.1:8110"`` or
    ``"[::1]:8110"``. A wildcard host (``0.0.0.0``) becomes the matching loopback address.
    """
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return _WILDCARDS.get(host, host), int(port)


def instructions(proxy_address: str, upstream_address: str, ca_file: Path) -> str:
    """The text shown to the user once both servers are listening."""
    host, port = connect_hint(proxy_address)
    rule = "-" * 78
    return f"""{rule}
pop3proxy demo is running.

  proxy, plaintext POP3 (connect here):  {proxy_address}
  demo upstream, POP3S:                  {upstream_address}
  upstream certificate for "{DEMO_SERVER_NAME}", issued by a throwaway CA:
    {ca_file}

Try it by hand:
    telnet {host} {port}          or:  nc -C {host} {port}
  then type, one line at a time:
    CAPA              the upstream offers STLS; the proxy hides it
    USER {DEMO_USER}
    PASS {DEMO_PASSWORD}         the log shows the command, never the password
    STAT
    LIST
    RETR 2            a message with dot-stuffed lines
    TOP 1 2
    QUIT

Or use a mail client: POP3, no encryption, host {host}, port {port},
user name "{DEMO_USER}", password "{DEMO_PASSWORD}".

The proxy's log follows on stdout, one line per event. Press Ctrl-C to stop.
{rule}"""


async def _stop_on_sigterm(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Cancel ``scope`` on the first SIGTERM."""
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        task_status.started()
        async for _ in signals:
            log.info("demo.stopping", signal="SIGTERM")
            scope.cancel()
            return


async def run_demo(
    settings: Settings,
    *,
    stream: TextIO | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the demo upstream and the proxy in front of it until cancelled.

    Args:
        settings: the proxy settings; ``listen`` and the logging settings are used, the
            upstream ones are replaced by the demo server's.
        stream: where the instructions go (default: ``sys.stderr`` at call time).
        task_status: receives the proxy's bound addresses, for ``nursery.start``.
    """
    out = stream if stream is not None else sys.stderr
    # The PEM files (with the server's private key) live only as long as the demo. Ctrl-C
    # unwinds through this ``with``; SIGTERM (``kill``, ``docker stop``) would end the process
    # without unwinding, so it is turned into a clean stop too.
    with tempfile.TemporaryDirectory(prefix="pop3proxy-demo-") as tmp:
        pki = DemoPKI.create(Path(tmp))
        async with trio.open_nursery() as nursery:
            await nursery.start(_stop_on_sigterm, nursery.cancel_scope)
            upstream_port: int = await nursery.start(
                functools.partial(serve_demo_upstream, pki.server_context(), host=UPSTREAM_HOST)
            )
            upstream = Endpoint(UPSTREAM_HOST, upstream_port)
            log.info(
                "demo.upstream_started",
                address=str(upstream),
                upstream_ca_file=str(pki.ca_cert_path),
                tls_server_name=DEMO_SERVER_NAME,
            )
            proxy_settings = dataclasses.replace(
                settings,
                upstream=upstream,
                upstream_ca_file=pki.ca_cert_path,
                upstream_server_name=DEMO_SERVER_NAME,
            )
            addresses: list[str] = await nursery.start(serve, proxy_settings)
            print(instructions(addresses[0], str(upstream), pki.ca_cert_path), file=out, flush=True)
            task_status.started(addresses)
