"""Benchmark: pop3proxy against stunnel4 as plaintext-to-TLS POP3 relays in front of one Dovecot.

Not a test: it measures and reports, it does not assert (except with ``--check``). Run it as root
(Dovecot needs that) from the project's virtualenv::

    ./scripts/dev python bench/relay_bench.py                 # full run, about two minutes
    ./scripts/dev python bench/relay_bench.py --quick         # smoke run, small sizes
    ./scripts/dev python bench/relay_bench.py --json out.json

One Dovecot serves implicit TLS (POP3S) on 127.0.0.1. In front of it run, side by side, stunnel4
in client mode (verified chain and host name) and ``pop3proxy serve`` (at ``--log-level warning``,
and a second instance at ``info`` reported separately). Plain-socket clients speaking raw POP3
lines measure, for each relay and interleaved round by round:

* RETR throughput of one large message (MiB/s);
* NOOP round-trip latency, one command at a time (median and p99, microseconds);
* sessions per second (connect, greeting, USER, PASS, QUIT);
* the relay process's CPU seconds per GiB relayed (``/proc/PID/stat`` utime + stime around
  the RETR phase). Dovecot caps RETR near 90-100 MiB/s on two cores, so this is the figure
  that compares the relays themselves.

Targets for pop3proxy (at warning level) relative to stunnel: relay CPU per GiB <= 1.0x and
NOOP round-trip median <= 1.5x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import trustme  # noqa: E402

from tests.peers.dovecot import Dovecot, make_message  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVER_NAME = "pop.test"
BULK_USER, BULK_PASSWORD = "bulk", "bulk-password"
LOGIN_USER, LOGIN_PASSWORD = "login", "login-password"

# Bounds: every loop below stops on a count and on one of these deadlines.
IO_TIMEOUT = 30.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
RETR_TIMEOUT = 300.0
PHASE_TIMEOUT = 120.0
MAX_LINE = 64 * 1024

RELAY_NAMES = ("stunnel", "pop3proxy", "pop3proxy-info", "streams-bare", "trio-bare")
#: pop3proxy from another checkout (``--base-tree``), to compare two versions in one run.
BASE_RELAY = "pop3proxy-base"
BASELINE = "stunnel"


class BenchError(RuntimeError):
    """The benchmark could not run (a relay did not start, a reply was wrong, ...)."""


# -- sizes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sizes:
    message_bytes: int
    noops: int
    sessions: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(message_bytes=50 * MIB, noops=5000, sessions=200)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(message_bytes=4 * MIB, noops=500, sessions=20)


# -- relays ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (all its threads, live and exited)."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # Field 2 (comm) may contain spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    return sum(cpu_times(pid))


@dataclass
class Relay:
    """A relay process listening for plaintext POP3 on 127.0.0.1:``port``."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] | None = None
    #: Where the relay runs: for ``pop3proxy-base``, the other checkout (``python -m``
    #: imports the package of the working directory first).
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited during start-up; its output:\n{self.log_tail()}"
                )
            try:
                with PopClient.connect(self.port, timeout=5.0) as client:
                    client.expect_ok(client.readline(), "greeting")
                    client.command(b"QUIT")
            except (OSError, BenchError) as exc:
                last = exc
            else:
                return
            time.sleep(0.05)
        raise BenchError(
            f"{self.name} did not greet on 127.0.0.1:{self.port} within {START_TIMEOUT} s "
            f"(last error: {last!r}); its output:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, limit: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text("utf-8", "replace")[-limit:]

    def log_lines(self) -> int:
        if not self.log_path.exists():
            return 0
        with self.log_path.open("rb") as f:
            return sum(1 for _ in f)


def stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        found = shutil.which(name)
        if found:
            return found
    raise BenchError("stunnel4 is not installed (apt-get install -y stunnel4)")


def make_stunnel(workdir: Path, dovecot: Dovecot) -> Relay:
    port = free_port()
    conf = workdir / "stunnel.conf"
    conf.write_text(
        f"""\
foreground = yes
pid = {workdir / "stunnel.pid"}
output = {workdir / "stunnel.log"}
; warning: like pop3proxy at --log-level warning, no line per connection
debug = warning

[pop3]
client = yes
accept = 127.0.0.1:{port}
connect = 127.0.0.1:{dovecot.port}
verifyChain = yes
CAfile = {dovecot.ca_pem_path}
checkHost = {SERVER_NAME}
sslVersionMin = TLSv1.2
""",
        encoding="utf-8",
    )
    return Relay(
        name="stunnel",
        argv=[stunnel_binary(), str(conf)],
        port=port,
        log_path=workdir / "stunnel.console",
    )


def make_bare_trio(workdir: Path, dovecot: Dovecot, name: str) -> Relay:
    """A pump with no POP3 parsing: over trio.SSLStream, or over pop3proxy's own streams."""
    port = free_port()
    script = Path(__file__).with_name("bare_trio_relay.py")
    argv = [sys.executable, str(script), str(port), str(dovecot.port)]
    argv += [str(dovecot.ca_pem_path), SERVER_NAME]
    argv.append("streams" if name == "streams-bare" else "sslstream")
    return Relay(name=name, argv=argv, port=port, log_path=workdir / f"{name}.log")


def make_pop3proxy(
    workdir: Path, dovecot: Dovecot, name: str, log_level: str, tree: Path | None = None
) -> Relay:
    """``pop3proxy serve`` as shipped; from the checkout ``tree`` when given."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    return Relay(
        name=name,
        argv=[
            sys.executable,
            "-m",
            "pop3proxy",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"127.0.0.1:{dovecot.port}",
            "--upstream-ca-file",
            str(dovecot.ca_pem_path),
            "--upstream-server-name",
            SERVER_NAME,
            "--log-level",
            log_level,
            "--log-format",
            "json",
            # The product as shipped: metrics (admin endpoint) and the inventory stay on,
            # on ports and files of this run's own.
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            str(workdir / f"{name}-state"),
        ],
        port=port,
        log_path=workdir / f"{name}.log",
        env=env,
        cwd=tree,
    )


# -- a raw POP3 client ---------------------------------------------------------------------------


class PopClient:
    """POP3 over a plain blocking socket, lines in lock-step, nothing more (low overhead)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    @classmethod
    @contextlib.contextmanager
    def connect(cls, port: int, *, timeout: float = IO_TIMEOUT) -> Iterator[PopClient]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            yield cls(sock)
        finally:
            sock.close()

    def readline(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > MAX_LINE:
                raise BenchError("reply line too long")
            data = self.sock.recv(65536)
            if not data:
                raise BenchError("connection closed while waiting for a reply")
            self.buf += data

    @staticmethod
    def expect_ok(line: bytes, what: str) -> bytes:
        if not line.startswith(b"+OK"):
            raise BenchError(f"{what}: expected +OK, got {line[:200]!r}")
        return line

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.expect_ok(self.readline(), line.split(b" ", 1)[0].decode())

    def login(self, user: str, password: str) -> None:
        self.expect_ok(self.readline(), "greeting")
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + password.encode())

    def retr(self, msgno: int, *, keep: bool = False) -> tuple[int, bytes]:
        """RETR ``msgno``; return the octets received and (with ``keep``) the whole reply."""
        if self.buf:
            raise BenchError("unexpected data before RETR")
        self.sock.sendall(b"RETR %d\r\n" % msgno)
        buf = bytearray(MIB)
        view = memoryview(buf)
        kept = bytearray()
        total = 0
        tail = b""
        deadline = time.monotonic() + RETR_TIMEOUT
        while time.monotonic() < deadline:
            n = self.sock.recv_into(buf)
            if n == 0:
                raise BenchError(f"connection closed after {total} octets of RETR")
            if total == 0 and not buf.startswith(b"+OK"):
                raise BenchError(f"RETR: {bytes(view[: min(n, 200)])!r}")
            total += n
            if keep:
                kept += view[:n]
            # The dot-stuffed body never holds CRLF.CRLF: it can only be the terminator.
            tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
            if tail == b"\r\n.\r\n":
                return total, bytes(kept)
        raise BenchError(f"RETR did not finish within {RETR_TIMEOUT} s")


def unstuff_multiline(reply: bytes) -> bytes:
    """The message in a ``+OK`` multi-line reply: status line, terminator, dot-stuffing off."""
    status_end = reply.index(b"\r\n") + 2
    body = reply[status_end : -len(b".\r\n")]
    if body.startswith(b".."):
        body = body[1:]
    return body.replace(b"\r\n..", b"\r\n.")


# -- measurements ----------------------------------------------------------------------------


@dataclass
class RoundResult:
    relay: str
    round: int
    retr_octets: int = 0
    retr_seconds: float = 0.0
    retr_cpu_seconds: float = 0.0
    retr_sys_seconds: float = 0.0
    noop_count: int = 0
    noop_rtt_us: list[float] = field(default_factory=list)
    noop_cpu_seconds: float = 0.0
    sessions: int = 0
    sessions_seconds: float = 0.0
    sessions_cpu_seconds: float = 0.0

    @property
    def retr_mib_s(self) -> float:
        return self.retr_octets / MIB / self.retr_seconds

    @property
    def cpu_s_per_gib(self) -> float:
        return self.retr_cpu_seconds / (self.retr_octets / GIB)

    @property
    def sessions_per_s(self) -> float:
        return self.sessions / self.sessions_seconds

    def summary(self) -> dict[str, float]:
        return {
            "retr_mib_s": self.retr_mib_s,
            "cpu_s_per_gib": self.cpu_s_per_gib,
            "noop_rtt_median_us": statistics.median(self.noop_rtt_us),
            "noop_rtt_p99_us": percentile(self.noop_rtt_us, 99),
            "sessions_per_s": self.sessions_per_s,
        }


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    index = max(0, math.ceil(pct / 100 * len(ordered)) - 1)
    return ordered[index]


def measure_bulk(relay: Relay, sizes: Sizes, result: RoundResult) -> None:
    """One session: RETR the big message (throughput, CPU), then NOOPs in lock-step."""
    with PopClient.connect(relay.port) as client:
        client.login(BULK_USER, BULK_PASSWORD)

        user0, sys0 = cpu_times(relay.pid)
        t0 = time.perf_counter()
        octets, _ = client.retr(1)
        result.retr_seconds = time.perf_counter() - t0
        user1, sys1 = cpu_times(relay.pid)
        result.retr_cpu_seconds = (user1 - user0) + (sys1 - sys0)
        result.retr_sys_seconds = sys1 - sys0
        result.retr_octets = octets
        if octets < sizes.message_bytes:
            raise BenchError(f"{relay.name}: RETR gave {octets} octets, fewer than the message")

        sock, noop = client.sock, b"NOOP\r\n"
        rtts: list[float] = []
        cpu0 = cpu_seconds(relay.pid)
        deadline = time.monotonic() + PHASE_TIMEOUT
        for _ in range(sizes.noops):
            t0_ns = time.perf_counter_ns()
            sock.sendall(noop)
            line = client.readline()
            rtts.append((time.perf_counter_ns() - t0_ns) / 1000)
            if not line.startswith(b"+OK"):
                raise BenchError(f"{relay.name}: NOOP got {line[:200]!r}")
            if time.monotonic() > deadline:
                break
        result.noop_cpu_seconds = cpu_seconds(relay.pid) - cpu0
        result.noop_count = len(rtts)
        result.noop_rtt_us = rtts
        client.command(b"QUIT")


def measure_sessions(relay: Relay, sizes: Sizes, result: RoundResult) -> None:
    """Whole short sessions one after another: connect, greeting, USER, PASS, QUIT."""
    cpu0 = cpu_seconds(relay.pid)
    t0 = time.perf_counter()
    deadline = time.monotonic() + PHASE_TIMEOUT
    done = 0
    for _ in range(sizes.sessions):
        with PopClient.connect(relay.port) as client:
            client.login(LOGIN_USER, LOGIN_PASSWORD)
            client.command(b"QUIT")
        done += 1
        if time.monotonic() > deadline:
            break
    result.sessions_seconds = time.perf_counter() - t0
    result.sessions_cpu_seconds = cpu_seconds(relay.pid) - cpu0
    result.sessions = done


def verify_relay(relay: Relay, message: bytes) -> None:
    """Unmeasured warm-up: the relay must deliver the message byte for byte."""
    with PopClient.connect(relay.port) as client:
        client.login(BULK_USER, BULK_PASSWORD)
        _, reply = client.retr(1, keep=True)
        client.command(b"QUIT")
    if unstuff_multiline(reply) != message:
        raise BenchError(f"{relay.name} delivered a different message than Dovecot holds")
    for _ in range(5):
        with PopClient.connect(relay.port) as client:
            client.login(LOGIN_USER, LOGIN_PASSWORD)
            client.command(b"QUIT")


# -- report ----------------------------------------------------------------------------------

METRICS: tuple[tuple[str, str, str], ...] = (
    # key, label, format
    ("retr_mib_s", "RETR throughput, MiB/s (median)", "{:.1f}"),
    ("cpu_s_per_gib", "relay CPU s per GiB relayed", "{:.2f}"),
    ("sys_cpu_s_per_gib", "  of which system (kernel)", "{:.2f}"),
    ("noop_rtt_median_us", "NOOP round trip median, us", "{:.0f}"),
    ("noop_rtt_p99_us", "NOOP round trip p99, us", "{:.0f}"),
    ("sessions_per_s", "sessions per second (median)", "{:.1f}"),
    ("noop_cpu_us", "relay CPU us per NOOP", "{:.1f}"),
    ("session_cpu_ms", "relay CPU ms per session", "{:.2f}"),
)
TARGETS = {"cpu_s_per_gib": 1.0, "noop_rtt_median_us": 1.5}


def aggregate(results: Sequence[RoundResult]) -> dict[str, float]:
    """One figure per metric: medians over rounds; CPU figures from sums (less tick noise)."""
    per_round = [r.summary() for r in results]
    out = {key: statistics.median(s[key] for s in per_round) for key in per_round[0]}
    octets = sum(r.retr_octets for r in results)
    out["cpu_s_per_gib"] = sum(r.retr_cpu_seconds for r in results) / (octets / GIB)
    out["sys_cpu_s_per_gib"] = sum(r.retr_sys_seconds for r in results) / (octets / GIB)
    noops = sum(r.noop_count for r in results)
    out["noop_cpu_us"] = sum(r.noop_cpu_seconds for r in results) / noops * 1e6
    sessions = sum(r.sessions for r in results)
    out["session_cpu_ms"] = sum(r.sessions_cpu_seconds for r in results) / sessions * 1e3
    return out


def render_table(summary: dict[str, dict[str, float]]) -> str:
    relays = list(summary)
    others = [name for name in relays if name != BASELINE] if BASELINE in summary else []
    # Each relay against stunnel; and this checkout against the other one, when both ran.
    pairs = [(name, BASELINE) for name in others]
    if "pop3proxy" in summary and BASE_RELAY in summary:
        pairs.append(("pop3proxy", BASE_RELAY))
    header = ["metric", *relays, *(f"{name}/{base}" for name, base in pairs)]
    rows = [header]
    for key, label, fmt in METRICS:
        row = [label, *(fmt.format(summary[name][key]) for name in relays)]
        for name, base_name in pairs:
            base = summary[base_name][key]
            row.append(f"{summary[name][key] / base:.2f}x" if base else "n/a")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check_targets(summary: dict[str, dict[str, float]], relay: str) -> list[tuple[str, bool, str]]:
    verdicts = []
    labels = {key: label for key, label, _ in METRICS}
    for key, limit in TARGETS.items():
        ratio = summary[relay][key] / summary[BASELINE][key]
        ok = ratio <= limit
        verdicts.append((key, ok, f"{labels[key]}: {ratio:.2f}x stunnel (target <= {limit:.1f}x)"))
    return verdicts


# -- driver ----------------------------------------------------------------------------------


def tool_versions() -> dict[str, str]:
    def version_line(argv: list[str], prefix: str = "") -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        lines = (done.stdout + done.stderr).splitlines()
        return next((ln.strip() for ln in lines if ln.startswith(prefix) and ln.strip()), "?")

    return {
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "stunnel": version_line([stunnel_binary(), "-version"], "stunnel "),
        "dovecot": version_line(["dovecot", "--version"]),
        "cpus": str(os.cpu_count()),
    }


def make_relay(name: str, workdir: Path, dovecot: Dovecot, base_tree: Path | None) -> Relay:
    """The relay called ``name`` (one of :data:`RELAY_NAMES`, or :data:`BASE_RELAY`)."""
    if name == "stunnel":
        return make_stunnel(workdir, dovecot)
    if name in {"trio-bare", "streams-bare"}:
        return make_bare_trio(workdir, dovecot, name)
    if name == BASE_RELAY:
        return make_pop3proxy(workdir, dovecot, name, "warning", base_tree)
    level = "info" if name.endswith("-info") else "warning"
    return make_pop3proxy(workdir, dovecot, name, level)


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    sizes = Sizes.quick() if args.quick else Sizes.full()
    sizes = Sizes(
        message_bytes=sizes.message_bytes
        if args.message_mib is None
        else int(args.message_mib * MIB),
        noops=sizes.noops if args.noops is None else args.noops,
        sessions=sizes.sessions if args.sessions is None else args.sessions,
    )
    names = [name.strip() for name in args.relays.split(",") if name.strip()]
    unknown = sorted(set(names) - set(RELAY_NAMES))
    if unknown or not names:
        raise BenchError(f"--relays: unknown {unknown}; choose from {', '.join(RELAY_NAMES)}")
    if args.base_tree is not None:
        if not (args.base_tree / "pop3proxy" / "__main__.py").is_file():
            raise BenchError(f"--base-tree: {args.base_tree} is not a pop3proxy checkout")
        names.append(BASE_RELAY)

    log(f"building a {sizes.message_bytes / MIB:.0f} MiB test message ...")
    message = make_message(sizes.message_bytes, subject="relay benchmark")

    workdir = Path(tempfile.mkdtemp(prefix="p3bench-"))
    relays: list[Relay] = []
    try:
        workdir.chmod(0o755)  # Dovecot's mail user must traverse it
        dovecot_root = workdir / "dovecot"
        dovecot_root.mkdir(mode=0o755)
        with Dovecot(dovecot_root, trustme.CA(), server_name=SERVER_NAME) as dovecot:
            dovecot.add_user(BULK_USER, BULK_PASSWORD, [message])
            dovecot.add_user(LOGIN_USER, LOGIN_PASSWORD, [])
            log(f"dovecot listening on 127.0.0.1:{dovecot.port}")
            relays.extend(make_relay(name, workdir, dovecot, args.base_tree) for name in names)
            for relay in relays:
                relay.start()
                log(f"{relay.name} (pid {relay.pid}) listening on 127.0.0.1:{relay.port}")
            for relay in relays:
                verify_relay(relay, message)
            log("every relay delivered the message byte for byte; measuring ...")

            results = measure_rounds(relays, sizes, args.rounds, log)
            log_lines = {relay.name: relay.log_lines() for relay in relays}
            for relay in relays:
                if relay.proc is not None and relay.proc.poll() is not None:
                    raise BenchError(f"{relay.name} died:\n{relay.log_tail()}")
    finally:
        for relay in relays:
            relay.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = {
        relay.name: aggregate([r for r in results if r.relay == relay.name]) for relay in relays
    }
    return {
        "sizes": asdict(sizes),
        "rounds": args.rounds,
        "versions": tool_versions(),
        "summary": summary,
        "relay_log_lines": log_lines,
        "rounds_detail": [{**asdict(r), "noop_rtt_us": None, **r.summary()} for r in results],
    }


def measure_rounds(
    relays: Sequence[Relay], sizes: Sizes, rounds: int, log: Callable[[str], None]
) -> list[RoundResult]:
    """Interleave the relays: every round measures each once, the starting relay rotating."""
    results: list[RoundResult] = []
    for number in range(rounds):
        order = [relays[(number + i) % len(relays)] for i in range(len(relays))]
        for relay in order:
            result = RoundResult(relay=relay.name, round=number)
            measure_bulk(relay, sizes, result)
            measure_sessions(relay, sizes, result)
            results.append(result)
            s = result.summary()
            log(
                f"round {number + 1}/{rounds} {relay.name:>15}: "
                f"{s['retr_mib_s']:6.1f} MiB/s  {s['cpu_s_per_gib']:6.2f} CPU s/GiB  "
                f"NOOP {s['noop_rtt_median_us']:5.0f}/{s['noop_rtt_p99_us']:5.0f} us  "
                f"{s['sessions_per_s']:6.1f} sessions/s"
            )
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="pop3proxy vs stunnel4 relay benchmark against a local Dovecot (run as root)."
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument(
        "--relays",
        default=",".join(RELAY_NAMES),
        help=f"comma-separated subset of {','.join(RELAY_NAMES)} (default: all)",
    )
    parser.add_argument("--message-mib", type=float, help="size of the RETR message in MiB")
    parser.add_argument("--noops", type=int, help="NOOPs per relay and round (default 5000)")
    parser.add_argument("--sessions", type=int, help="sessions per relay and round (default 200)")
    parser.add_argument(
        "--base-tree",
        type=Path,
        help=f"also run pop3proxy from this other checkout as {BASE_RELAY!r} (e.g. a "
        "`git worktree add` of an earlier commit), interleaved with the rest",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when pop3proxy misses a target (CPU/GiB, NOOP median)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be 1..100")
    if args.message_mib is not None and not 0.01 <= args.message_mib <= 1024:
        parser.error("--message-mib must be 0.01..1024")
    if args.noops is not None and not 1 <= args.noops <= 1_000_000:
        parser.error("--noops must be 1..1000000")
    if args.sessions is not None and not 1 <= args.sessions <= 100_000:
        parser.error("--sessions must be 1..100000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("relay_bench: run as root (Dovecot needs it)", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        report = run(args, log)
    except BenchError as exc:
        print(f"relay_bench: {exc}", file=sys.stderr)
        return 1

    summary: dict[str, dict[str, float]] = report["summary"]
    sizes = report["sizes"]
    print()
    print(
        f"pop3proxy vs stunnel, {report['rounds']} interleaved rounds; RETR of "
        f"{sizes['message_bytes'] / MIB:.0f} MiB, {sizes['noops']} NOOPs, "
        f"{sizes['sessions']} sessions per relay and round"
    )
    print(", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    print()
    print(render_table(summary))
    print()
    missed = False
    if BASELINE in summary and "pop3proxy" in summary:
        print("targets for pop3proxy (--log-level warning) relative to stunnel:")
        for _, ok, text in check_targets(summary, "pop3proxy"):
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
            missed = missed or not ok
    lines = report["relay_log_lines"]
    print("relay log lines written: " + ", ".join(f"{k} {v}" for k, v in lines.items()))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
