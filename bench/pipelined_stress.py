"""Stress: parallel sessions pipelining ``RETR <1 MiB>`` + ``QUIT``, each byte-compared.

Not a test: it runs for a while and prints what it saw. Run it as root from the project's
virtualenv::

    ./scripts/dev python bench/pipelined_stress.py                        # 16 at once, 60 s
    ./scripts/dev python bench/pipelined_stress.py --sessions 32 --seconds 600
    ./scripts/dev python bench/pipelined_stress.py --direct               # also without proxy

Reported once and never reproduced: under heavy parallel load a pipelined batch ending in
``RETR <1 MiB>`` + ``QUIT`` lost its last 21 octets (the ``.`` line and ``+OK Logging out.``).
One Dovecot serves POP3S on 127.0.0.1 and one ``pop3proxy serve --log-level warning`` runs in
front of it. Each round opens ``--sessions`` sessions at once through the proxy; each logs in,
writes ``RETR 1\\r\\nQUIT\\r\\n`` at once and reads to the end of the stream, every
``--slow-every``-th one slowly (8 KiB receive buffer, 4 KiB reads, 2 ms pause after each).
What each read after its login is compared octet for octet with the same commands sent
straight to Dovecot one at a time (see ``tests/peers/pipelined.py``). Rounds repeat until
``--seconds`` have passed. ``--direct`` runs every round a second time straight to Dovecot
(pipelined, same readers), to tell the proxy's losses from the server's own.

Exit status 0 if every session matched, 1 if any did not (each mismatch is printed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# The repository (for tests.peers) and this folder (for idle_sessions, run as a script too).
for folder in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import trio  # noqa: E402
import trustme  # noqa: E402
from idle_sessions import BenchError, bench_proxy  # noqa: E402

from tests.peers.dovecot import Dovecot, make_message  # noqa: E402
from tests.peers.pipelined import (  # noqa: E402
    Login,
    StressTally,
    reference_transcript,
    run_round,
)

MIB = 1024 * 1024
SESSION_TIMEOUT = 120.0
REPORT_EVERY = 30.0
PRINT_MISMATCHES = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sessions", type=int, default=16, help="sessions at once (16)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to run (60)")
    parser.add_argument("--max-rounds", type=int, default=1_000_000, help="at most this many")
    parser.add_argument("--slow-every", type=int, default=3, help="every Nth reads slowly (3)")
    parser.add_argument("--mailboxes", type=int, default=4, help="mailboxes, 1 message each")
    parser.add_argument("--size", type=int, default=MIB, help="message size in octets (1 MiB)")
    parser.add_argument("--direct", action="store_true", help="also run each round direct")
    parser.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 500 or args.seconds <= 0 or args.mailboxes < 1:
        parser.error("--sessions must be 1-500, --seconds positive, --mailboxes at least 1")
    return args


def summary(tally: StressTally, elapsed: float) -> dict[str, Any]:
    truncated = [m for m in tally.mismatches if m.is_truncation]
    return {
        "sessions": tally.sessions,
        "slow_sessions": tally.slow_sessions,
        "octets_compared": tally.octets_compared,
        "mismatches": len(tally.mismatches),
        "truncations": len(truncated),
        "octets_missing": sorted({m.expected - m.received for m in truncated}),
        "errors": sum(1 for m in tally.mismatches if m.error),
        "seconds": round(elapsed, 1),
        "sessions_per_s": round(tally.sessions / elapsed, 1) if elapsed else None,
        "details": [asdict(m) for m in tally.mismatches[:50]],
    }


def show(name: str, tally: StressTally, elapsed: float) -> None:
    s = summary(tally, elapsed)
    print(
        f"{name}: {s['sessions']} sessions ({s['slow_sessions']} slow readers) in "
        f"{s['seconds']} s, {s['octets_compared'] / MIB:.0f} MiB compared, "
        f"{s['mismatches']} mismatches ({s['truncations']} truncations, {s['errors']} errors)",
        flush=True,
    )


async def stress(args: argparse.Namespace, dovecot: Dovecot, proxy_port: int) -> dict[str, Any]:
    tls = dovecot.client_ssl_context()
    logins: list[tuple[Login, bytes]] = []
    for n in range(args.mailboxes):
        user, password = f"stress{n}", f"Stress-pw-{n}"
        dovecot.add_user(user, password, [make_message(args.size, subject=f"stress {n}")])
        login = Login(user, password)
        with trio.fail_after(SESSION_TIMEOUT):
            expected = await reference_transcript(
                dovecot.port, login, tls=tls, server_name=dovecot.server_name
            )
        logins.append((login, expected))
    ends = {expected[-40:] for _, expected in logins}
    print(f"reference transcripts: {[len(e) for _, e in logins]} octets, ending {ends}")

    tallies = {"proxy": StressTally()}
    if args.direct:
        tallies["direct"] = StressTally()
    printed = dict.fromkeys(tallies, 0)
    started = last_report = time.monotonic()
    rounds = 0
    while time.monotonic() - started < args.seconds and rounds < args.max_rounds:
        await run_round(
            tallies["proxy"],
            proxy_port,
            logins,
            parallel=args.sessions,
            slow_every=args.slow_every,
            session_timeout=SESSION_TIMEOUT,
        )
        if args.direct:
            await run_round(
                tallies["direct"],
                dovecot.port,
                logins,
                parallel=args.sessions,
                slow_every=args.slow_every,
                session_timeout=SESSION_TIMEOUT,
                tls=tls,
                server_name=dovecot.server_name,
            )
        rounds += 1
        for name, tally in tallies.items():  # the first few of each, as they come
            for mismatch in tally.mismatches[printed[name] : PRINT_MISMATCHES]:
                print(f"  {name} MISMATCH {mismatch.describe()}", flush=True)
            printed[name] = len(tally.mismatches)
        if time.monotonic() - last_report >= REPORT_EVERY:
            last_report = time.monotonic()
            for name, tally in tallies.items():
                show(name, tally, last_report - started)
    elapsed = time.monotonic() - started
    for name, tally in tallies.items():
        show(name, tally, elapsed)
    return {
        "args": vars(args),
        "rounds": rounds,
        **{name: summary(tally, elapsed) for name, tally in tallies.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pop3stress-"))
    workdir.chmod(0o755)  # Dovecot's mail user must traverse it
    dovecot = Dovecot(workdir, trustme.CA(), process_limit=4 * args.sessions + 100)
    proxy = bench_proxy(workdir, dovecot, sessions=2 * args.sessions, log_level="warning")
    try:
        dovecot.start()
        proxy.start()
        print(f"Dovecot on {dovecot.port}, pop3proxy on {proxy.port}; {workdir}", flush=True)
        result = trio.run(stress, args, dovecot, proxy.port)
    except BenchError as exc:
        print(f"pipelined_stress: {exc}", file=sys.stderr)
        return 2
    finally:
        proxy.stop()
        problems = dovecot.stop(check_log=False)
        shutil.rmtree(workdir, ignore_errors=True)
    result["dovecot_log_problems"] = problems[:20]
    if problems:
        print("Dovecot logged:", *problems[:20], sep="\n  ")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    failed = any(result[name]["mismatches"] for name in ("proxy", "direct") if name in result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
