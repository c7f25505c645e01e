"""A thread-per-connection TCP server on loopback: the scaffolding of the scripted test peers.

Subclasses say what one connection does (:meth:`ThreadedServer._connection`); this class
owns the listener, the accept loop (bounded in connections and in time) and a bounded
shutdown, so that no test can leave a server or its threads behind.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

__all__ = ["ThreadedServer"]


class ThreadedServer:
    """Serve each accepted connection in a daemon thread; use it as a context manager.

    Args:
        listener: a bound (not necessarily listening) socket to serve on instead of a new
            one on an ephemeral port of ``host``.
        max_connections: accept at most this many connections.
        io_timeout: per-connection bound on each socket operation; also bounds shutdown.
        lifetime: the accept loop stops after this many seconds whatever happens.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        listener: socket.socket | None = None,
        max_connections: int,
        io_timeout: float,
        lifetime: float,
    ) -> None:
        self.io_timeout = io_timeout
        self._max_connections = max_connections
        self._lifetime = lifetime
        if listener is None:
            listener = socket.create_server((host, 0))
        else:
            listener.listen()
        self._listener = listener
        self._listener.settimeout(0.05)
        address = listener.getsockname()
        self.host: str = str(address[0])
        self.port: int = int(address[1])
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> Self:
        self._acceptor.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, wait (bounded) for the handlers, and close the listener."""
        self._stop.set()
        if self._acceptor.is_alive():
            self._acceptor.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=self.io_timeout + 1)
        self._listener.close()

    def _connection(self, sock: socket.socket, index: int) -> Callable[[], None]:
        """What to run in a thread for accepted connection ``index`` (1-based)."""
        raise NotImplementedError

    def _accept_loop(self) -> None:
        deadline = time.monotonic() + self._lifetime
        accepted = 0
        while not self._stop.is_set() and accepted < self._max_connections:
            if time.monotonic() > deadline:
                return
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted += 1
            thread = threading.Thread(target=self._connection(sock, accepted), daemon=True)
            self._threads.append(thread)
            thread.start()
