"""The relay's byte streams: a plain TCP socket and TLS over one, each at most one wake-up per read.

Why not ``trio.SocketStream`` and ``trio.SSLStream``: a POP3 command is a few octets each way,
so a relay's latency is the fixed cost of every read and write, not the copying. Measured
with ``bench/relay_bench.py`` against the same Dovecot (NOOP round trip, lock-step):

- ``trio.SocketStream`` tries ``recv`` first (an ``EAGAIN`` on every command), and yields to
  the scheduler after each successful ``send``;
- ``trio.SSLStream`` takes a ``trio.Lock`` around every transport read and write (a yield
  each), and ``receive_some`` returns one TLS record per call whatever the size asked for.

A bare ``SSLStream`` pump with no POP3 parsing at all round-trips at about 1.5x stunnel's time;
the same pump over these streams at about 1.25x, with a third less CPU per command. The TLS
itself is unchanged: stdlib ``ssl`` (``SSLContext.wrap_bio``), the same ``SSLObject`` and
memory BIOs that ``trio.SSLStream`` drives, verification and all.

Both classes follow trio's stream contract where the relay relies on it: ``receive_some``
returns ``b""`` at a clean end and raises :class:`trio.BrokenResourceError` otherwise (for TLS:
a TCP close without ``close_notify``, RFC 8446 section 6.1); every call can be cancelled; a
send interrupted half-way leaves the stream broken. They differ in one way, on purpose: a
``send_all`` that the kernel accepts at once, and a ``receive_some`` that finds data already
decrypted, do not yield to the scheduler or look for a cancellation. Each relay pump waits
for its peer's next read on every round, and that wait is the round's scheduling point and
cancellation point.
"""

from __future__ import annotations

import contextlib
import socket
import ssl

import trio
from trio.lowlevel import (
    ParkingLot,
    checkpoint,
    notify_closing,
    wait_readable,
    wait_writable,
)

__all__ = ["RECEIVE_SIZE", "SocketStream", "TLSStream"]

#: Octets asked of the kernel per read.
RECEIVE_SIZE = 64 * 1024
#: Largest plaintext of one TLS record (RFC 8446 section 5.1). ``SSLObject.read(n)``
#: allocates ``n`` octets up front, so a read never asks for more than one record.
_TLS_RECORD_PLAINTEXT = 16 * 1024


class SocketStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket; one task may receive while another sends.

    Owns the socket: :meth:`aclose` closes it.
    """

    __slots__ = ("_closed", "socket")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Commands and status lines are single small writes: never hold them back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._closed = False

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> SocketStream:
        """Take over the socket of a stream trio accepted or connected (``detach`` is public)."""
        return cls(socket.socket(fileno=stream.socket.detach()))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Wait until the peer has sent something, then read it; ``b""`` at its end."""
        sock, max_bytes = self.socket, max_bytes or RECEIVE_SIZE
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            await wait_readable(sock)
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:  # woken, but another reader took it: wait again
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(exc.strerror or str(exc)) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Hand all of ``data`` to the kernel; waits only while its send buffer is full."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        sock = self.socket
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise trio.BrokenResourceError(exc.strerror or str(exc)) from exc
        if sent == len(data):
            return
        with memoryview(data) as view:
            remaining = view[sent:]
            while remaining:
                await wait_writable(sock)
                try:
                    remaining = remaining[sock.send(remaining) :]
                except BlockingIOError:
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(exc.strerror or str(exc)) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await wait_writable(self.socket)

    async def send_eof(self) -> None:
        """Half-close: the peer reads end of stream, and may still answer."""
        await checkpoint()
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            notify_closing(self.socket)  # a task waiting on it gets ClosedResourceError
            self.socket.close()

    async def aclose(self) -> None:
        self.close()  # before the checkpoint: closes even when cancelled (aclose_forcefully)
        await checkpoint()


class TLSStream(trio.abc.Stream):
    """The client side of TLS over a :class:`SocketStream`, driven through memory BIOs.

    One task may receive while another sends. Data the TLS layer has to send on its own
    (a TLS 1.3 KeyUpdate answer, the handshake) goes out in order through one flush at a
    time. Renegotiation is refused by the context (``OP_NO_RENEGOTIATION``, see
    :func:`pop3proxy.tls.make_upstream_context`), so a write never has to wait for a read.

    Args:
        transport: the connected socket, owned from now on.
        context: a client context; ``server_hostname`` is what its host name check and SNI use.
    """

    __slots__ = (
        "_broken",
        "_closed",
        "_flushed",
        "_flushing",
        "_handshook",
        "_incoming",
        "_outgoing",
        "_ssl",
        "transport",
    )

    def __init__(
        self, transport: SocketStream, context: ssl.SSLContext, *, server_hostname: str
    ) -> None:
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname
        )
        self._flushing = False
        self._flushed = ParkingLot()
        self._handshook = False
        self._broken: str | None = None
        self._closed = False

    # -- what the handshake settled (for the logs) ---------------------------------------------

    def version(self) -> str | None:
        return self._ssl.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._ssl.cipher()

    def getpeercert(self, binary_form: bool = True) -> bytes | None:
        """The leaf certificate in DER (only the binary form is offered)."""
        del binary_form
        return self._ssl.getpeercert(binary_form=True)

    # -- the stream -----------------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the handshake; verification failures raise ``BrokenResourceError`` from the cause."""
        self._check_open()
        while True:
            try:
                self._ssl.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError as exc:
                raise self._fail(exc) from exc
        self._handshook = True
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of plaintext: every record already received, or the next one.

        Returns ``b""`` once the server has closed with ``close_notify``.
        """
        max_bytes = max_bytes or RECEIVE_SIZE
        self._check_usable()
        while True:
            plaintext = self._decrypt_buffered(max_bytes)
            if self._outgoing.pending:  # the read produced an answer (TLS 1.3 KeyUpdate)
                await self._flush()
            if plaintext is not None:
                return plaintext
            await self._fill()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        try:
            with memoryview(data) as view:
                written = 0
                while written < len(view):
                    written += self._ssl.write(view[written:])
        except ssl.SSLError as exc:  # SSLWantReadError too: renegotiation is refused
            raise self._fail(exc) from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Send ``close_notify`` (best effort, not waiting for the server's), then close."""
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        try:
            if self._handshook and self._broken is None and not self._flushing:
                with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: their reply, unread
                    self._ssl.unwrap()
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._flush()
        finally:
            await self.transport.aclose()

    # -- moving octets ----------------------------------------------------------------------------

    def _decrypt_buffered(self, limit: int) -> bytes | None:
        """Plaintext of the records already received, up to ``limit``; ``None``: need more."""
        incoming, tls = self._incoming, self._ssl
        chunks: list[bytes] = []
        total = 0
        # Only when there is something to read: a read that finds nothing raises
        # SSLWantReadError, and building that exception costs more than the read.
        while total < limit and (incoming.pending or tls.pending() or incoming.eof):
            try:
                chunk = tls.read(min(_TLS_RECORD_PLAINTEXT, limit - total))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as exc:  # SSLEOFError: TCP closed without close_notify
                if chunks:
                    break  # deliver what came before; the next call raises
                raise self._fail(exc) from exc
            if not chunk:  # close_notify
                if chunks:
                    break
                return b""
            chunks.append(chunk)
            total += len(chunk)
        if not chunks:
            return None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _fill(self) -> None:
        """Wait for the next octets from the server into the incoming BIO."""
        try:
            data = await self.transport.receive_some(RECEIVE_SIZE)
        except trio.BrokenResourceError as exc:
            self._broken = str(exc)
            raise
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()  # the next read tells close_notify from truncation

    async def _flush(self) -> None:
        """Send everything in the outgoing BIO, in order, one flusher at a time."""
        while self._flushing:  # the other flusher sends ours too: it drains the BIO to empty
            await self._flushed.park()
        if not self._outgoing.pending:
            return
        self._flushing = True
        try:
            while self._outgoing.pending:
                await self.transport.send_all(self._outgoing.read())
        except BaseException as exc:
            # Part of a record may be on the wire: nothing after it can be sent correctly.
            self._broken = f"send interrupted ({type(exc).__name__})"
            raise
        finally:
            self._flushing = False
            if self._flushed:  # rarely anyone: skip the call
                self._flushed.unpark_all()

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(f"the TLS stream is broken: {self._broken}")

    def _check_usable(self) -> None:
        self._check_open()
        if not self._handshook:  # no implicit handshake: it has its own deadline and errors
            raise RuntimeError("TLSStream: call do_handshake() first")

    def _fail(self, exc: ssl.SSLError) -> trio.BrokenResourceError:
        self._broken = exc.reason or type(exc).__name__
        return trio.BrokenResourceError(str(exc))
