"""The proxy as a real subprocess (``python -m pop3proxy serve``), with its JSON log at hand.

All of the child's output (stdout and stderr) goes to one file, so tests can both read the
structured events and grep everything it ever wrote (the no-credential-leak tests do).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

__all__ = ["ProxyError", "ProxyProcess"]

Event = dict[str, Any]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_POLL = 0.02


class ProxyError(RuntimeError):
    """The proxy subprocess did not start, or an awaited event did not come."""


class ProxyProcess:
    """``pop3proxy serve`` in front of an upstream, listening on an ephemeral loopback port.

    Args:
        log_path: where the child's stdout and stderr go (appended to).
        upstream_port: the POP3S port on ``upstream_host``.
        ca_file: the CA the upstream certificate must chain to.
        server_name: the name the upstream certificate must match.
        extra_args: appended to the command line (e.g. ``["--log-level", "debug"]``).
        env: extra environment variables. ``POP3PROXY_*`` and ``SSLKEYLOGFILE`` variables of
            the test process are not passed on, so only what the test says applies.
    """

    def __init__(
        self,
        log_path: Path,
        *,
        upstream_port: int,
        ca_file: Path | None,
        upstream_host: str = "127.0.0.1",
        server_name: str | None = "pop.test",
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.log_path = Path(log_path)
        self.upstream_port = upstream_port
        self.ca_file = ca_file
        self.upstream_host = upstream_host
        self.server_name = server_name
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.listen = listen
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None
        self._log_offset = 0

    # -- lifecycle -------------------------------------------------------------------------

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "pop3proxy",
            "serve",
            "--listen",
            self.listen,
            "--upstream",
            f"{self.upstream_host}:{self.upstream_port}",
            "--log-format",
            "json",
            # Many proxies run at once in the suite: no fixed admin port, no shared inventory
            # file under the user's data directory. Tests that need them pass their own
            # (later flags win).
            "--admin",
            "off",
            "--state-dir",
            ":memory:",
        ]
        if self.ca_file is not None:
            cmd += ["--upstream-ca-file", str(self.ca_file)]
        if self.server_name is not None:
            cmd += ["--upstream-server-name", self.server_name]
        return cmd + self.extra_args

    def _environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("POP3PROXY_") and key != "SSLKEYLOGFILE"
        }
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 15.0) -> None:
        """Start the proxy and wait (at most ``timeout`` s) for its ``listener.started`` line."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            cwd=_REPO_ROOT,  # ``-m pop3proxy`` finds this checkout first
        )
        try:
            event = self.wait_for_event("listener.started", timeout=timeout)
            address = str(event["address"])
            self._port = int(address.rpartition(":")[2])
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL after ``timeout`` s; returns the exit status (None if not run)."""
        proc, self._proc = self._proc, None
        status: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
            status = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return status

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` (SIGTERM to drain, SIGHUP to reload) to the running proxy."""
        if self._proc is None:
            raise ProxyError("the proxy has not started")
        self._proc.send_signal(signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait for the proxy to exit by itself; its exit status."""
        if self._proc is None:
            raise ProxyError("the proxy has not started")
        return self._proc.wait(timeout=timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int:
        """The proxy process id (for /proc sampling)."""
        if self._proc is None:
            raise ProxyError("the proxy has not started")
        return self._proc.pid

    @property
    def port(self) -> int:
        if self._port is None:
            raise ProxyError("the proxy has not started")
        return self._port

    # -- output ------------------------------------------------------------------------------

    def log_bytes(self) -> bytes:
        """Everything the child wrote (stdout and stderr) since `start()`, as raw bytes."""
        if not self.log_path.exists():
            return b""
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            return f.read()

    def log_text(self) -> str:
        return self.log_bytes().decode("utf-8", "replace")

    def events(self) -> list[Event]:
        """The JSON objects among the output lines, in order (other lines are skipped)."""
        found: list[Event] = []
        for raw in self.log_text().splitlines():
            line = raw.strip()
            if not line.startswith("{"):
                continue
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                found.append(value)
        return found

    def find_events(
        self, name: str, predicate: Callable[[Event], bool] | None = None
    ) -> list[Event]:
        return [
            e
            for e in self.events()
            if e.get("event") == name and (predicate is None or predicate(e))
        ]

    def wait_for_event(
        self,
        name: str,
        predicate: Callable[[Event], bool] | None = None,
        timeout: float = 10.0,
    ) -> Event:
        """The first event called ``name`` (matching ``predicate``); waits up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            matches = self.find_events(name, predicate)
            if matches:
                return matches[0]
            proc = self._proc
            if proc is None or proc.poll() is not None:
                # One last look: the line may have landed just before the exit.
                matches = self.find_events(name, predicate)
                if matches:
                    return matches[0]
                status = None if proc is None else proc.returncode
                raise ProxyError(
                    f"the proxy is not running (exit status {status}) and logged no {name!r} "
                    f"event; command {self.command()}; output:\n{self.log_text()[-4000:]}"
                )
            if time.monotonic() >= deadline:
                raise ProxyError(
                    f"no {name!r} event within {timeout} s; output:\n{self.log_text()[-4000:]}"
                )
            time.sleep(_POLL)

    # -- sessions ------------------------------------------------------------------------------

    def session_id_for(self, client_port: int, timeout: float = 10.0) -> str:
        """The ``session_id`` of the session whose client used local port ``client_port``."""
        event = self.wait_for_event(
            "session.opened",
            lambda e: str(e.get("client", "")).rpartition(":")[2] == str(client_port),
            timeout=timeout,
        )
        return str(event["session_id"])

    def session_events(self, session_id: str) -> list[Event]:
        return [e for e in self.events() if e.get("session_id") == session_id]

    def wait_session_closed(self, session_id: str, timeout: float = 10.0) -> Event:
        return self.wait_for_event(
            "session.closed", lambda e: e.get("session_id") == session_id, timeout=timeout
        )
