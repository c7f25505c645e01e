"""The relay's own streams (pop3proxy.streams) against a scripted TLS server in this process.

The server side is ``trio.SSLStream`` with a trustme certificate, so every byte the client
stream produces is checked by an independent TLS implementation of the same protocol. The
cases are the ones a relay depends on: data intact both ways under back-pressure, several
records in one read, a clean close told from a truncation, close_notify on ``aclose``, a
cancelled read losing nothing, and closed or reset sockets raising trio's exceptions.
"""

from __future__ import annotations

import secrets
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trustme

from pop3proxy.streams import SocketStream, TLSStream
from pop3proxy.tls import make_upstream_context

SERVER_NAME = "pop.test"
ServerHandler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def client_context(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    pem = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return make_upstream_context(pem)


@pytest.fixture(scope="module")
def context(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return client_context(ca, tmp_path_factory)


@asynccontextmanager
async def tls_server(
    ca: trustme.CA, handler: ServerHandler, *, version: ssl.TLSVersion | None = None
) -> AsyncIterator[int]:
    """A one-connection-at-a-time TLS server on 127.0.0.1; yields its port."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(SERVER_NAME).configure_cert(server_ctx)
    if version is not None:
        server_ctx.minimum_version = server_ctx.maximum_version = version

    async def serve_one(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, server_ctx, server_side=True)
        try:
            await stream.do_handshake()
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def connect(port: int, context: ssl.SSLContext) -> TLSStream:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = TLSStream(SocketStream.from_trio(tcp), context, server_hostname=SERVER_NAME)
    await stream.do_handshake()
    return stream


async def receive_exactly(stream: TLSStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"stream ended after {len(data)} of {size} octets"
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_large_data_both_ways_intact_under_back_pressure(
    ca: trustme.CA, context: ssl.SSLContext, version: ssl.TLSVersion
) -> None:
    upload = secrets.token_bytes(3 * 1024 * 1024 + 17)
    download = secrets.token_bytes(5 * 1024 * 1024 + 3)
    received = bytearray()
    all_received = trio.Event()

    async def echo_size(stream: trio.SSLStream[trio.SocketStream]) -> None:
        async def read_all() -> None:
            while len(received) < len(upload):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                received.extend(chunk)
                await trio.lowlevel.checkpoint()  # a slowish reader: the client waits
            all_received.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await stream.send_all(download)

    async with tls_server(ca, echo_size, version=version) as port:
        stream = await connect(port, context)
        assert stream.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2"}.get(version, "TLSv1.3")
        got = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, upload)
            got = await receive_exactly(stream, len(download))
        with trio.fail_after(30):
            await all_received.wait()
        await stream.aclose()
    assert got == download
    assert bytes(received) == upload


async def test_one_receive_returns_every_record_already_received(
    ca: trustme.CA, context: ssl.SSLContext
) -> None:
    records = [b"+OK %d\r\n" % i for i in range(50)]
    sent = trio.Event()

    async def fifty_records(stream: trio.SSLStream[trio.SocketStream]) -> None:
        for record in records:
            await stream.send_all(record)  # one TLS record each
        sent.set()
        await trio.sleep_forever()

    async with tls_server(ca, fifty_records) as port:
        stream = await connect(port, context)
        await sent.wait()
        await trio.sleep(0.2)  # all of them in this host's socket buffer
        first = await stream.receive_some(1024 * 1024)
        rest = await receive_exactly(stream, len(b"".join(records)) - len(first))
        await stream.aclose()
    assert first + rest == b"".join(records)
    assert first == b"".join(records), "records already received came in several reads"


async def test_receive_some_respects_max_bytes(ca: trustme.CA, context: ssl.SSLContext) -> None:
    payload = secrets.token_bytes(100_000)

    async def send(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(payload)
        await trio.sleep_forever()

    async with tls_server(ca, send) as port:
        stream = await connect(port, context)
        chunks: list[bytes] = []
        while sum(len(chunk) for chunk in chunks) < len(payload):
            chunk = await stream.receive_some(1000)
            assert 0 < len(chunk) <= 1000
            chunks.append(chunk)
        await stream.aclose()
    assert b"".join(chunks) == payload


async def test_close_notify_is_a_clean_end(ca: trustme.CA, context: ssl.SSLContext) -> None:
    async def say_bye(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(b"+OK bye\r\n")
        await stream.aclose()  # close_notify, then TCP close

    async with tls_server(ca, say_bye) as port:
        stream = await connect(port, context)
        assert await receive_exactly(stream, 9) == b"+OK bye\r\n"
        assert await stream.receive_some() == b""
        assert await stream.receive_some() == b"", "the end is reported again, not an error"
        await stream.aclose()


async def test_tcp_close_without_close_notify_is_broken(
    ca: trustme.CA, context: ssl.SSLContext
) -> None:
    async def cut(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.send_all(b"+OK 100 octets\r\nhalf a mess")
        await stream.transport_stream.aclose()  # TCP FIN, no close_notify

    async with tls_server(ca, cut) as port:
        stream = await connect(port, context)
        assert await receive_exactly(stream, 27) == b"+OK 100 octets\r\nhalf a mess"
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"QUIT\r\n")
        await stream.aclose()


async def test_aclose_sends_close_notify(ca: trustme.CA, context: ssl.SSLContext) -> None:
    seen: list[bytes] = []
    ended = trio.Event()

    async def read_to_end(stream: trio.SSLStream[trio.SocketStream]) -> None:
        while chunk := await stream.receive_some():  # raises BrokenResourceError without it
            seen.append(bytes(chunk))
        seen.append(b"<close_notify>")
        ended.set()

    async with tls_server(ca, read_to_end) as port:
        stream = await connect(port, context)
        await stream.send_all(b"QUIT\r\n")
        await stream.aclose()
        with trio.fail_after(10):
            await ended.wait()
        with pytest.raises(trio.ClosedResourceError):
            await stream.receive_some()
    assert seen == [b"QUIT\r\n", b"<close_notify>"]


async def test_a_cancelled_receive_loses_nothing(ca: trustme.CA, context: ssl.SSLContext) -> None:
    go = trio.Event()

    async def late(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await go.wait()
        await stream.send_all(b"+OK late\r\n")
        await trio.sleep_forever()

    async with tls_server(ca, late) as port:
        stream = await connect(port, context)
        with trio.move_on_after(0.1) as scope:
            await stream.receive_some()
        assert scope.cancelled_caught
        go.set()
        assert await receive_exactly(stream, 10) == b"+OK late\r\n"
        await stream.aclose()


async def test_wrong_host_name_fails_the_handshake_with_the_verifier_cause(
    ca: trustme.CA, context: ssl.SSLContext
) -> None:
    async def never(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await trio.sleep_forever()

    async with tls_server(ca, never) as port:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TLSStream(SocketStream.from_trio(tcp), context, server_hostname="other.test")
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.do_handshake()
        await stream.aclose()
    cause = info.value.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError)
    assert cause.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH


def test_the_upstream_context_refuses_renegotiation(context: ssl.SSLContext) -> None:
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED


# -- the plain socket stream --------------------------------------------------------------------


async def socket_pair() -> tuple[SocketStream, socket.socket]:
    """A SocketStream and a blocking stdlib peer, connected over loopback TCP."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        tcp = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
        peer, _ = listener.accept()
    return SocketStream.from_trio(tcp), peer


async def test_socket_stream_send_waits_for_a_slow_reader() -> None:
    stream, peer = await socket_pair()
    payload = secrets.token_bytes(8 * 1024 * 1024)  # far more than the socket buffers
    received = bytearray()

    def read_slowly() -> None:
        while len(received) < len(payload):
            chunk = peer.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    with peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, read_slowly)
            await stream.send_all(payload)
        await stream.aclose()
    assert bytes(received) == payload


async def test_socket_stream_end_reset_and_close() -> None:
    stream, peer = await socket_pair()
    peer.sendall(b"USER a\r\n")
    assert await stream.receive_some() == b"USER a\r\n"
    peer.shutdown(socket.SHUT_WR)
    assert await stream.receive_some() == b""
    # An RST: SO_LINGER with a zero timeout makes close() reset the connection.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()
    await trio.sleep(0.05)
    with pytest.raises(trio.BrokenResourceError):  # noqa: PT012 - the kernel may take a send
        for _ in range(100):
            await stream.send_all(b"+OK\r\n" * 1000)
            await trio.sleep(0.01)
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_closing_wakes_a_waiting_reader() -> None:
    stream, peer = await socket_pair()
    with peer:
        async with trio.open_nursery() as nursery:

            async def reader() -> None:
                with pytest.raises(trio.ClosedResourceError):
                    await stream.receive_some()

            nursery.start_soon(reader)
            await trio.sleep(0.05)
            stream.close()


async def test_using_the_stream_before_the_handshake_is_a_programming_error(
    ca: trustme.CA, context: ssl.SSLContext
) -> None:
    async def never(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await trio.sleep_forever()

    async with tls_server(ca, never) as port:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TLSStream(SocketStream.from_trio(tcp), context, server_hostname=SERVER_NAME)
        with pytest.raises(RuntimeError, match="do_handshake"):
            await stream.receive_some()
        with pytest.raises(RuntimeError, match="do_handshake"):
            await stream.send_all(b"NOOP\r\n")
        await stream.aclose()
