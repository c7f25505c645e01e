"""Benchmark: a soak of at least 1,000,000 relayed commands; the proxy's RSS and fds over it.

Not a test: it measures and prints. Run it as root from the project's virtualenv::

    ./scripts/dev python bench/soak.py                          # 1,000,000 commands
    ./scripts/dev python bench/soak.py --commands 100000        # shorter
    ./scripts/dev python bench/soak.py --log-level info         # with a log line per command

One Dovecot serves POP3S on 127.0.0.1, one ``pop3proxy serve`` runs in front of it
(``--log-level warning`` by default, so the figures are the relay's and not the log's).
``--sessions`` sessions (default 32) log in and then send ``NOOP``, ``STAT``, ``LIST 1`` and
``UIDL 1`` in pipelined batches of ``--batch`` commands (default 50, below the proxy's
``--max-pipelined`` bound of 100), each batch written at once and all its replies read and
checked (``+OK``) before the next, until ``--commands`` commands have been relayed in all.
The proxy's RSS (``VmRSS``) and open descriptors (``/proc/PID/fd``) are sampled once all
sessions are logged in (*start*), every few seconds, after the last batch (*end*), and after
every session has quit (descriptors back to the baseline of before the sessions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository (for tests.peers) and this folder (for idle_sessions, run as a script too).
for folder in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import trio  # noqa: E402
import trustme  # noqa: E402
from idle_sessions import (  # noqa: E402
    BenchError,
    LineStream,
    QuietProxy,
    bench_proxy,
    fd_count,
    proxy_pid,
    raise_fd_limit,
    vm_rss,
)

from tests.peers.dovecot import Dovecot, make_message  # noqa: E402

KIB = 1024
MIB = 1024 * KIB
COMMANDS = (b"NOOP\r\n", b"STAT\r\n", b"LIST 1\r\n", b"UIDL 1\r\n")
IO_TIMEOUT = 60.0
SAMPLE_EVERY = 5.0
SETTLE_TIMEOUT = 30.0


@dataclass
class Sample:
    at_s: float
    commands: int
    rss: int
    fds: int


@dataclass
class Result:
    sessions: int
    batch: int
    target: int
    log_level: str
    commands: int = 0
    seconds: float = 0.0
    fds_baseline: int = 0
    fds_after_quit: int = 0
    rss_after_quit: int = 0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def peers(args: argparse.Namespace, workdir: Path) -> Iterator[tuple[Dovecot, QuietProxy]]:
    ca = trustme.CA()
    dovecot = Dovecot(workdir, ca, process_limit=args.sessions + 100)
    proxy = bench_proxy(workdir, dovecot, sessions=args.sessions, log_level=args.log_level)
    dovecot.start()
    try:
        for n in range(args.sessions):
            dovecot.add_user(f"soak{n}", f"Soak-pw-{n}", [make_message(4096, subject=f"s{n}")])
        with proxy:
            yield dovecot, proxy
    finally:
        # Not check_log: without CAP_SYS_RESOURCE Dovecot logs an error when it cannot
        # raise RLIMIT_NPROC for large process limits; report, do not fail, on such lines.
        for problem in dovecot.stop(check_log=False):
            print(f"Dovecot: {problem}", file=sys.stderr)


async def login(port: int, n: int) -> LineStream:
    with trio.fail_after(IO_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        lines = LineStream(stream)
        replies = [
            await lines.line(),
            await lines.command(f"USER soak{n}".encode()),
            await lines.command(f"PASS Soak-pw-{n}".encode()),
        ]
    if not all(r.startswith(b"+OK") for r in replies):
        await trio.aclose_forcefully(stream)
        raise BenchError(f"session {n} could not log in: {replies!r}")
    return lines


async def read_replies(lines: LineStream, count: int) -> list[bytes]:
    """``count`` single-line replies (bounded reads)."""
    for _ in range(100_000):
        if lines.buffer.count(b"\r\n") >= count:
            break
        chunk = await lines.stream.receive_some(65536)
        if not chunk:
            raise EOFError("the proxy closed the session")
        lines.buffer += chunk
    parts = bytes(lines.buffer).split(b"\r\n")
    replies, rest = parts[:count], parts[count:]
    lines.buffer = bytearray(b"\r\n".join(rest))
    return replies


async def soak(args: argparse.Namespace, proxy: QuietProxy) -> Result:
    pid = proxy_pid(proxy)
    result = Result(args.sessions, args.batch, args.commands, args.log_level)
    result.fds_baseline = fd_count(pid)
    sessions = [await login(proxy.port, n) for n in range(args.sessions)]
    per_session = math.ceil(args.commands / args.sessions / args.batch)
    batch_bytes = b"".join(COMMANDS[i % len(COMMANDS)] for i in range(args.batch))
    started = time.monotonic()

    def sample() -> None:
        now = time.monotonic() - started
        result.samples.append(Sample(now, result.commands, vm_rss(pid), fd_count(pid)))
        s = result.samples[-1]
        print(
            f"{s.at_s:7.1f} s  {s.commands:>9} commands  RSS {s.rss / MIB:6.1f} MiB  {s.fds} fds",
            flush=True,
        )

    sample()

    async def worker(n: int, lines: LineStream) -> None:
        for _ in range(per_session):
            with trio.fail_after(IO_TIMEOUT):
                await lines.stream.send_all(batch_bytes)
                replies = await read_replies(lines, args.batch)
            bad = [r for r in replies if not r.startswith(b"+OK")]
            if bad:
                result.errors.append(f"session {n}: {bad[:3]!r}")
                return
            result.commands += args.batch

    async def sampler() -> None:
        while True:
            await trio.sleep(SAMPLE_EVERY)
            sample()

    try:
        with trio.fail_after(args.timeout):
            async with trio.open_nursery() as outer:
                outer.start_soon(sampler)
                async with trio.open_nursery() as nursery:
                    for n, lines in enumerate(sessions):
                        nursery.start_soon(worker, n, lines)
                outer.cancel_scope.cancel()
    except (trio.TooSlowError, OSError, EOFError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - started
    sample()

    for lines in sessions:
        with trio.move_on_after(IO_TIMEOUT), contextlib.suppress(OSError, EOFError):
            await lines.command(b"QUIT")
        await trio.aclose_forcefully(lines.stream)
    settle = time.monotonic()
    while time.monotonic() - settle < SETTLE_TIMEOUT:
        result.fds_after_quit = fd_count(pid)
        if result.fds_after_quit <= result.fds_baseline:
            break
        await trio.sleep(0.1)
    result.rss_after_quit = vm_rss(pid)
    return result


def report(result: Result) -> None:
    start, end = result.samples[0], result.samples[-1]
    rate = result.commands / result.seconds if result.seconds else 0.0
    print()
    print(f"commands relayed       {result.commands} of {result.target} ({rate:,.0f}/s)")
    print(f"sessions x batch       {result.sessions} x {result.batch}")
    print(f"duration               {result.seconds:.1f} s")
    print(f"proxy log level        {result.log_level}")
    print(f"RSS start / end        {start.rss / MIB:.1f} / {end.rss / MIB:.1f} MiB")
    print(
        f"RSS min / max          {min(s.rss for s in result.samples) / MIB:.1f} / "
        f"{max(s.rss for s in result.samples) / MIB:.1f} MiB"
    )
    print(f"fds start / end        {start.fds} / {end.fds}")
    print(
        f"after QUIT             {result.fds_after_quit} fds (baseline {result.fds_baseline}), "
        f"RSS {result.rss_after_quit / MIB:.1f} MiB"
    )
    if result.errors:
        print(f"errors                 {len(result.errors)}; first: {result.errors[:3]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--commands", type=int, default=1_000_000, help="commands to relay")
    parser.add_argument("--sessions", type=int, default=32, help="concurrent sessions")
    parser.add_argument("--batch", type=int, default=50, help="commands per pipelined write")
    parser.add_argument("--log-level", default="warning", choices=("info", "warning"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="bound on the soak (s)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 1000 or not 1 <= args.batch <= 10_000:
        parser.error("--sessions must be 1-1000 and --batch 1-10000")
    if not 1 <= args.commands <= 100_000_000:
        parser.error("--commands must be 1-100000000")
    if os.geteuid() != 0:
        parser.error("run as root (Dovecot needs it)")

    raise_fd_limit(4 * args.sessions + 1024)
    workdir = Path(tempfile.mkdtemp(prefix="soakbench-"))
    workdir.chmod(0o755)
    try:
        with peers(args, workdir) as (_, proxy):
            result = trio.run(soak, args, proxy)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
    return 0 if result.commands >= args.commands and not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
