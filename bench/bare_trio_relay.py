"""A bare trio relay: plaintext in, ``trio.SSLStream`` out, no POP3 parsing at all.

Not part of pop3proxy: a reference point for ``relay_bench.py --relays ...,trio-bare``. It
uses the same TLS data path as pop3proxy (``trio.SSLStream`` over the stdlib ``ssl``), so the
difference between the two is what pop3proxy adds (parsing, logging, metrics, policies), and
the difference between it and stunnel is what the trio data path itself costs.

    python bench/bare_trio_relay.py LISTEN_PORT UPSTREAM_PORT CA_FILE SERVER_NAME
"""

from __future__ import annotations

import ssl
import sys
from functools import partial

import trio

RECEIVE_SIZE = 65536


async def pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    while data := await source.receive_some(RECEIVE_SIZE):
        await sink.send_all(data)


async def handle(
    upstream_port: int, context: ssl.SSLContext, server_name: str, client: trio.SocketStream
) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    upstream = trio.SSLStream(tcp, context, server_hostname=server_name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(upstream)


def main() -> None:
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    context = ssl.create_default_context(cafile=sys.argv[3])
    handler = partial(handle, upstream_port, context, sys.argv[4])
    trio.run(partial(trio.serve_tcp, handler, listen_port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
