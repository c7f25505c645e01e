"""Benchmark: the proxy's memory and file descriptors for many idle logged-in sessions.

Not a test: it measures and prints. Run it as root from the project's virtualenv::

    ./scripts/dev python bench/idle_sessions.py                      # 10,000 sessions
    ./scripts/dev python bench/idle_sessions.py --sessions 2000      # smaller
    ./scripts/dev python bench/idle_sessions.py --json idle.json

One Dovecot serves POP3S on 127.0.0.1 and one ``pop3proxy serve`` (``--log-level warning``,
caps raised above the load) runs in front of it. The benchmark records the proxy's RSS
(``VmRSS``) and open descriptors (``/proc/PID/fd``) after one warm-up session (*before*),
then opens ``--sessions`` sessions from 127.0.0.1-127.0.0.8 (``--ramp`` of them connecting
and logging in at a time), each logged in with USER/PASS and then silent; with all of them
open it samples RSS for a few seconds (*during*), checks every session with a NOOP, sends
QUIT on all, and waits for the descriptors to come back to the baseline (*after*). The
figure of merit is (during - before) / sessions: RSS per idle session, goal <= 64 KiB.

Dovecot forks a ``pop3`` process per session by default (about 5 MB RSS, 0.5 MB PSS each);
10,000 of them plus their ``pop3-login`` processes would need most of this machine's 32,768
pids. ``--clients-per-process`` (default 100) sets ``service pop3 { client_limit = N;
service_count = 0 }`` so that one Dovecot process serves several sessions (possible here
because every mailbox belongs to the same system user; ``service_count`` must be 0, pop3's
default of 1 means one client per process whatever ``client_limit`` says).
``--clients-per-process 1`` gives Dovecot's default layout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trio  # noqa: E402
import trustme  # noqa: E402

from tests.peers.dovecot import Dovecot, make_message  # noqa: E402
from tests.peers.proxy import ProxyProcess  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
SOURCE_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(1, 9))
USERS = 100
IO_TIMEOUT = 60.0
PHASE_TIMEOUT = 600.0
SETTLE_TIMEOUT = 60.0


class BenchError(RuntimeError):
    """The benchmark could not run as asked."""


# -- /proc ---------------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """``VmRSS`` of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KIB
    raise BenchError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to ``wanted`` (children inherit it), the hard limit too if allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        except (ValueError, OSError):
            raise BenchError(
                f"need {wanted} file descriptors, and the hard limit RLIMIT_NOFILE is {hard}, "
                "which this process may not raise (no CAP_SYS_RESOURCE)"
            ) from None
    elif soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: The proxy's descriptors besides two per session (listener, log, epoll, pipes, ...).
PROXY_FD_MARGIN = 100


def max_sessions_for_fds() -> int:
    """The most sessions the proxy can hold within the hard RLIMIT_NOFILE (two fds each)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 1_000_000
    return (hard - PROXY_FD_MARGIN) // 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class QuietProxy(ProxyProcess):
    """``ProxyProcess`` on a fixed port, for log levels that do not log ``listener.started``
    (it is an info event): start-up is detected by connecting to the port instead."""

    def __init__(self, log_path: Path, **kwargs: Any) -> None:
        self.fixed_port = free_port()
        super().__init__(log_path, listen=f"127.0.0.1:{self.fixed_port}", **kwargs)

    def wait_for_event(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
        *,
        since: int | None = None,
    ) -> dict[str, Any]:
        if name != "listener.started":
            return super().wait_for_event(name, predicate, timeout, since=since)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise BenchError(f"the proxy exited: {self.log_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.fixed_port), timeout=1.0),
            ):
                return {"event": name, "address": f"127.0.0.1:{self.fixed_port}"}
            time.sleep(0.05)
        raise BenchError(f"the proxy did not listen within {timeout} s")


def proxy_pid(proxy: ProxyProcess) -> int:
    proc = proxy._proc
    if proc is None:
        raise BenchError("the proxy is not running")
    return proc.pid


# -- peers -----------------------------------------------------------------------------------------


class MultiplexingDovecot(Dovecot):
    """The test Dovecot, with ``service pop3 { client_limit }`` above 1 when asked."""

    def __init__(self, root: Path, ca: trustme.CA, *, sessions: int, per_process: int) -> None:
        limit = sessions + 500
        super().__init__(
            root,
            ca,
            process_limit=limit,
            # Also the stats service's limit: every pop3/pop3-login process holds a connection.
            client_limit=3 * limit,
            userip_connections=limit,
        )
        self.per_process = per_process
        self.pop3_processes = math.ceil(sessions / per_process) + 50

    def _config(self) -> str:
        extra = ""
        if self.per_process > 1:
            extra = (
                "service pop3 {\n"
                # service_count defaults to 1 for pop3: a process would serve one client
                # in its life whatever client_limit says.
                "  service_count = 0\n"
                f"  client_limit = {self.per_process}\n"
                f"  process_limit = {self.pop3_processes}\n"
                "}\n"
            )
        return super()._config() + extra


def bench_proxy(workdir: Path, dovecot: Dovecot, *, sessions: int, log_level: str) -> QuietProxy:
    """The proxy under measurement: session caps above the load, no admin endpoint."""
    caps = str(2 * sessions + 100)
    return QuietProxy(
        workdir / "proxy.log",
        upstream_port=dovecot.port,
        ca_file=dovecot.ca_pem_path,
        server_name=dovecot.server_name,
        extra_args=["--admin", "off", "--log-level", log_level,
                    "--max-sessions", caps, "--max-sessions-per-client", caps],
    )  # fmt: skip


@contextlib.contextmanager
def peers(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[Dovecot, ProxyProcess]]:
    ca = trustme.CA()
    dovecot = MultiplexingDovecot(
        workdir, ca, sessions=args.sessions, per_process=args.clients_per_process
    )
    proxy = bench_proxy(workdir, dovecot, sessions=args.sessions, log_level=args.log_level)
    dovecot.start()
    try:
        for n in range(USERS):
            dovecot.add_user(f"idle{n}", f"Idle-pw-{n}", [make_message(1024, subject=f"i{n}")])
        with proxy:
            yield dovecot, proxy
    finally:
        # Not check_log: without CAP_SYS_RESOURCE Dovecot logs an error when it cannot
        # raise RLIMIT_NPROC for large process limits; report, do not fail, on such lines.
        for problem in dovecot.stop(check_log=False):
            print(f"Dovecot: {problem}", file=sys.stderr)


# -- clients ---------------------------------------------------------------------------------------


class LineStream:
    """Lines from a trio stream (bounded reads)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        for _ in range(1000):
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                data = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                return data
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("closed")
            self.buffer += chunk
        raise BenchError("no line in 1000 reads")

    async def command(self, line: bytes) -> bytes:
        await self.stream.send_all(line + b"\r\n")
        return await self.line()


async def open_session(port: int, index: int, ramp: trio.Semaphore) -> LineStream:
    user, password = f"idle{index % USERS}", f"Idle-pw-{index % USERS}"
    async with ramp:
        with trio.fail_after(IO_TIMEOUT):
            stream = await trio.open_tcp_stream(
                "127.0.0.1", port, local_address=SOURCE_ADDRESSES[index % len(SOURCE_ADDRESSES)]
            )
            lines = LineStream(stream)
            try:
                replies = [
                    await lines.line(),
                    await lines.command(f"USER {user}".encode()),
                    await lines.command(f"PASS {password}".encode()),
                ]
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    if not all(reply.startswith(b"+OK") for reply in replies):
        await trio.aclose_forcefully(stream)
        raise BenchError(f"session {index}: {replies!r}")
    return lines


@dataclass
class Result:
    sessions: int
    clients_per_process: int
    log_level: str
    opened: int = 0
    open_seconds: float = 0.0
    rss_before: int = 0
    rss_during: list[int] = field(default_factory=list)
    rss_after: int = 0
    fds_before: int = 0
    fds_during: int = 0
    fds_after: int = 0
    fds_settle_seconds: float = 0.0
    noop_ok: int = 0
    dovecot_pop3_processes: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def rss_per_session(self) -> float:
        during = statistics.median(self.rss_during) if self.rss_during else 0
        return (during - self.rss_before) / max(self.opened, 1)


def count_dovecot_pop3(dovecot: Dovecot) -> int:
    """Dovecot ``pop3`` processes of this instance (by the binary in their command line)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        first = cmdline.split(b"\0", 1)[0]
        if first.endswith(b"/pop3") or first == b"dovecot/pop3":
            count += 1
    return count


async def run_load(args: argparse.Namespace, proxy: ProxyProcess, dovecot: Dovecot) -> Result:
    pid = proxy_pid(proxy)
    result = Result(args.sessions, args.clients_per_process, args.log_level)

    # Warm-up: one whole session, so that the baseline includes the code paths of a session.
    warm = await open_session(proxy.port, 0, trio.Semaphore(1))
    await warm.command(b"QUIT")
    await warm.stream.aclose()
    await trio.sleep(0.5)
    result.rss_before, result.fds_before = vm_rss(pid), fd_count(pid)
    print(f"before: RSS {result.rss_before / MIB:.1f} MiB, {result.fds_before} fds", flush=True)

    sessions: list[LineStream] = []
    ramp = trio.Semaphore(args.ramp)
    started = time.monotonic()

    async def opener(index: int) -> None:
        try:
            sessions.append(await open_session(proxy.port, index, ramp))
        except (OSError, EOFError, BenchError, trio.TooSlowError) as exc:
            result.errors.append(f"session {index}: {type(exc).__name__}: {exc}")

    with trio.move_on_after(PHASE_TIMEOUT) as scope:
        async with trio.open_nursery() as nursery:
            for index in range(args.sessions):
                nursery.start_soon(opener, index)
    if scope.cancelled_caught:
        result.errors.append(f"opening stopped after {PHASE_TIMEOUT} s")
    result.opened = len(sessions)
    result.open_seconds = time.monotonic() - started
    print(
        f"opened {result.opened}/{args.sessions} sessions in {result.open_seconds:.1f} s "
        f"({len(result.errors)} errors)",
        flush=True,
    )

    try:
        # During: all sessions idle; sample RSS for a few seconds.
        for _ in range(args.samples):
            await trio.sleep(0.5)
            result.rss_during.append(vm_rss(pid))
        result.fds_during = fd_count(pid)
        result.dovecot_pop3_processes = count_dovecot_pop3(dovecot)
        print(
            f"during: RSS median {statistics.median(result.rss_during) / MIB:.1f} MiB, "
            f"{result.fds_during} fds; {result.dovecot_pop3_processes} Dovecot pop3 processes",
            flush=True,
        )

        # Every session is still alive.
        async def noop(lines: LineStream) -> None:
            with trio.move_on_after(IO_TIMEOUT):
                if (await lines.command(b"NOOP")).startswith(b"+OK"):
                    result.noop_ok += 1

        noop_ramp = trio.CapacityLimiter(args.ramp * 4)

        async def limited_noop(lines: LineStream) -> None:
            async with noop_ramp:
                await noop(lines)

        async with trio.open_nursery() as nursery:
            for lines in sessions:
                nursery.start_soon(limited_noop, lines)
    finally:
        # QUIT everywhere (and close in any case).
        async def quit_(lines: LineStream) -> None:
            with trio.move_on_after(IO_TIMEOUT), contextlib.suppress(OSError, EOFError):
                await lines.command(b"QUIT")
            await trio.aclose_forcefully(lines.stream)

        quit_limit = trio.CapacityLimiter(args.ramp * 4)

        async def limited_quit(lines: LineStream) -> None:
            async with quit_limit:
                await quit_(lines)

        async with trio.open_nursery() as nursery:
            for lines in sessions:
                nursery.start_soon(limited_quit, lines)

    # After: descriptors back to the baseline (bounded wait), then RSS.
    settle = time.monotonic()
    while time.monotonic() - settle < SETTLE_TIMEOUT:
        result.fds_after = fd_count(pid)
        if result.fds_after <= result.fds_before:
            break
        await trio.sleep(0.1)
    result.fds_settle_seconds = time.monotonic() - settle
    await trio.sleep(1.0)
    result.rss_after = vm_rss(pid)
    return result


def report(result: Result) -> None:
    during = statistics.median(result.rss_during) if result.rss_during else 0
    print()
    print(f"sessions opened        {result.opened} of {result.sessions}")
    print(f"open phase             {result.open_seconds:.1f} s")
    print(f"Dovecot clients/proc   {result.clients_per_process}")
    print(f"Dovecot pop3 procs     {result.dovecot_pop3_processes}")
    print(f"proxy log level        {result.log_level}")
    print(f"RSS before             {result.rss_before / MIB:.1f} MiB")
    print(
        f"RSS during (median)    {during / MIB:.1f} MiB "
        f"(min {min(result.rss_during, default=0) / MIB:.1f}, "
        f"max {max(result.rss_during, default=0) / MIB:.1f})"
    )
    print(f"RSS after              {result.rss_after / MIB:.1f} MiB")
    print(
        f"RSS per idle session   {result.rss_per_session / KIB:.1f} KiB "
        f"(goal <= 64 KiB: {'met' if result.rss_per_session <= 64 * KIB else 'NOT met'})"
    )
    print(
        f"fds before/during/after {result.fds_before}/{result.fds_during}/{result.fds_after} "
        f"(back to baseline: {'yes' if result.fds_after <= result.fds_before else 'NO'}, "
        f"{result.fds_settle_seconds:.1f} s)"
    )
    print(f"NOOP answered          {result.noop_ok} of {result.opened}")
    if result.errors:
        print(f"errors                 {len(result.errors)}; first: {result.errors[:3]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=10_000, help="idle sessions to hold")
    parser.add_argument("--ramp", type=int, default=64, help="sessions logging in at a time")
    parser.add_argument(
        "--clients-per-process",
        type=int,
        default=100,
        help="Dovecot 'service pop3 { client_limit }' (1: a process per session)",
    )
    parser.add_argument("--samples", type=int, default=6, help="RSS samples, 0.5 s apart")
    parser.add_argument("--log-level", default="warning", choices=("info", "warning"))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 30_000:
        parser.error("--sessions must be 1-30000")
    if os.geteuid() != 0:
        parser.error("run as root (Dovecot needs it)")

    # The proxy holds two descriptors per session (client and upstream); this process one.
    try:
        limit = raise_fd_limit(2 * args.sessions + PROXY_FD_MARGIN)
    except BenchError as exc:
        print(
            f"idle_sessions: {args.sessions} sessions are not possible here: {exc}; "
            f"at most {max_sessions_for_fds()} sessions fit (try --sessions "
            f"{max_sessions_for_fds()})",
            file=sys.stderr,
        )
        return 2
    print(f"RLIMIT_NOFILE {limit}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="idlebench-"))
    workdir.chmod(0o755)
    try:
        with peers(args, workdir) as (dovecot, proxy):
            result = trio.run(run_load, args, proxy, dovecot)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        figures = asdict(result) | {"rss_per_session": result.rss_per_session}
        args.json.write_text(json.dumps(figures, indent=2), encoding="utf-8")
    return 0 if result.opened == args.sessions and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
