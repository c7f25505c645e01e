"""A bare trio relay: plaintext in, TLS out, no POP3 parsing at all.

Not part of pop3proxy: a reference point for ``relay_bench.py``. It pumps octets both ways
over one of two data paths, both stdlib ``ssl`` under trio:

- ``sslstream`` (relay ``trio-bare``): ``trio.SocketStream`` and ``trio.SSLStream``, the
  straightforward trio relay;
- ``streams`` (relay ``streams-bare``): :mod:`pop3proxy.streams`, the streams pop3proxy uses.

The difference between ``streams-bare`` and pop3proxy is what pop3proxy's own work costs
(parsing, logging, metrics, policies); between ``trio-bare`` and ``streams-bare``, what the
data path costs; between either and stunnel, what trio and Python cost.

    python bench/bare_trio_relay.py LISTEN UPSTREAM CA_FILE SERVER_NAME [sslstream|streams]
"""

from __future__ import annotations

import ssl
import sys
from functools import partial

import trio

from pop3proxy.streams import SocketStream, TLSStream

RECEIVE_SIZE = 65536


async def pump(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream) -> None:
    while data := await source.receive_some(RECEIVE_SIZE):
        await sink.send_all(data)


async def handle(
    upstream_port: int,
    context: ssl.SSLContext,
    server_name: str,
    data_path: str,
    accepted: trio.SocketStream,
) -> None:
    tcp = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    client: trio.abc.Stream
    upstream: trio.abc.Stream
    if data_path == "streams":
        client = SocketStream.from_trio(accepted)
        tls = TLSStream(SocketStream.from_trio(tcp), context, server_hostname=server_name)
        await tls.do_handshake()
        upstream = tls
    else:
        client = accepted
        upstream = trio.SSLStream(tcp, context, server_hostname=server_name)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(upstream)
        await trio.aclose_forcefully(client)


def main() -> None:
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    data_path = sys.argv[5] if len(sys.argv) > 5 else "sslstream"
    if data_path not in {"sslstream", "streams"}:
        raise SystemExit(f"unknown data path {data_path!r}: sslstream or streams")
    context = ssl.create_default_context(cafile=sys.argv[3])
    handler = partial(handle, upstream_port, context, sys.argv[4], data_path)
    trio.run(partial(trio.serve_tcp, handler, listen_port, host="127.0.0.1"))


if __name__ == "__main__":
    main()
