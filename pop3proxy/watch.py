"""``pop3proxy watch``: follow a running proxy's sessions live, in the terminal.

It connects to the admin endpoint's ``/events`` WebSocket (trio-websocket) and prints one line
per event: sessions as they open, establish TLS upstream, log in, run commands, and close.
When the proxy goes away (restart, deploy) it reconnects with exponential back-off and
jitter, saying so on stderr; Ctrl-C ends it with exit status 0.

Every value printed comes from POP3 clients at some point (user names, arguments), so
control characters are escaped: a client cannot drive the operator's terminal.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final, TextIO

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    open_websocket_url,
)

from pop3proxy.admin.auth import AdminToken
from pop3proxy.admin.healthcheck import base_url
from pop3proxy.config import Endpoint
from pop3proxy.terminal import printable

__all__ = ["WatchError", "follow", "format_event", "json_line", "run_watch"]

INITIAL_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 10.0
CONNECT_TIMEOUT: Final = 5.0
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class WatchError(Exception):
    """Following cannot go on (the endpoint refuses us for good)."""


def _clean(value: object) -> str:
    """``value`` as text with control characters escaped (no terminal escape sequences)."""
    return printable(value if isinstance(value, str) else json.dumps(value, default=str))


def json_line(record: str) -> str:
    """A received JSON line for ``--json``, with what a terminal acts on as JSON escapes.

    The proxy's ``json.dumps`` escapes every control character already; this holds for
    any sender. In valid JSON such characters can only be inside strings, where ``\\u009b``
    means the same, so a valid line stays valid and equal.
    """
    if record.isprintable():
        return record
    return "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in record)


def _time(event: Mapping[str, Any]) -> str:
    stamp = event.get("timestamp")
    if isinstance(stamp, str):
        try:
            return datetime.fromisoformat(stamp).astimezone().strftime("%H:%M:%S")
        except ValueError:
            pass
    return datetime.now().astimezone().strftime("%H:%M:%S")


def _size(octets: object) -> str:
    if not isinstance(octets, int | float):
        return "?"
    size = float(octets)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return "?"  # pragma: no cover


def _opened(e: Mapping[str, Any]) -> str:
    return f"opened   client {_clean(e.get('client'))}"


def _tls(e: Mapping[str, Any]) -> str:
    return f"upstream {_clean(e.get('tls_version'))} {_clean(e.get('cipher'))}"


def _failed(e: Mapping[str, Any]) -> str:
    phase, reason, error = (_clean(e.get(k)) for k in ("phase", "reason", "error"))
    return f"upstream FAILED in {phase}: {reason} ({error})"


def _login(e: Mapping[str, Any]) -> str:
    user, mechanism, result = (_clean(e.get(k)) for k in ("user", "mechanism", "result"))
    return f"login    {user} {mechanism} {result}"


def _command(e: Mapping[str, Any]) -> str:
    args = e.get("args") or []
    words = " ".join(_clean(a) for a in args) if isinstance(args, list) else _clean(args)
    command = f"{_clean(e.get('verb'))} {words}".strip()
    status = _clean(e.get("status"))
    code = f" [{_clean(e.get('code'))}]" if e.get("code") else ""
    return f"command  {command:<16} {status}{code} {_size(e.get('reply_octets'))}"


def _closed(e: Mapping[str, Any]) -> str:
    received, sent = _size(e.get("bytes_from_client")), _size(e.get("bytes_to_client"))
    return (
        f"closed   {_clean(e.get('reason'))}: {_clean(e.get('commands'))} commands, "
        f"{received} in, {sent} out, {_clean(e.get('duration_s'))} s"
    )


_FORMATS: Final[Mapping[str, Callable[[Mapping[str, Any]], str]]] = {
    "session.opened": _opened,
    "upstream.tls_established": _tls,
    "upstream.failed": _failed,
    "pop3.login": _login,
    "pop3.command": _command,
    "session.closed": _closed,
}


def format_event(event: Mapping[str, Any]) -> list[str]:
    """The lines ``watch`` prints for one feed message."""
    name = str(event.get("event", "?"))
    if name == "feed.snapshot":
        sessions = event.get("sessions") or []
        lines = [f"{_time(event)}  -- {len(sessions)} open session(s)"]
        for s in sessions if isinstance(sessions, list) else []:
            if isinstance(s, dict):
                who = _clean(s.get("user") or "-")
                lines.append(
                    f"{_time(event)}  {_clean(s.get('session_id'))}  open     "
                    f"client {_clean(s.get('client'))} user {who} {_clean(s.get('state'))}"
                )
        return lines
    if name == "feed.dropped":
        return [f"{_time(event)}  -- {_clean(event.get('count'))} event(s) skipped (too slow)"]
    session = _clean(event.get("session_id") or "-")
    render = _FORMATS.get(name)
    if render is not None:
        text = render(event)
    else:
        skip = {"event", "level", "timestamp", "session_id"}
        extra = " ".join(f"{_clean(k)}={_clean(v)}" for k, v in event.items() if k not in skip)
        text = f"{_clean(name)} {extra}".rstrip()
    return [f"{_time(event)}  {session:<8}  {text}"]


def _show(record: str, out: TextIO, *, as_json: bool) -> None:
    if as_json:
        print(json_line(record), file=out, flush=True)
        return
    try:
        event = json.loads(record)
    except ValueError:
        return
    if isinstance(event, dict):
        for line in format_event(event):
            print(line, file=out, flush=True)


async def follow(
    url: str,
    *,
    out: TextIO,
    err: TextIO,
    as_json: bool = False,
    max_backoff: float = MAX_BACKOFF,
    token: AdminToken | None = None,
) -> None:
    """Print the feed at ``url`` (``ws://HOST:PORT/events``) until cancelled; reconnect on loss.

    ``token`` is sent as ``Authorization: Bearer`` (the proxy's ``--admin-token-file``).

    Raises:
        WatchError: the endpoint rejected the WebSocket with a 4xx status (wrong address,
            path or token: retrying would not help).
    """
    backoff = INITIAL_BACKOFF
    headers = [] if token is None else [(b"Authorization", token.header().encode("ascii"))]
    while True:
        try:
            async with open_websocket_url(
                url,
                extra_headers=headers,
                connect_timeout=CONNECT_TIMEOUT,
                disconnect_timeout=2,
                max_message_size=16 * 1024 * 1024,
            ) as ws:
                print(f"watch: connected to {url}", file=err, flush=True)
                backoff = INITIAL_BACKOFF
                while True:
                    message = await ws.get_message()
                    if isinstance(message, bytes):
                        message = message.decode("utf-8", "replace")
                    text = message
                    for record in text.split("\n"):  # one or more events, one per line
                        _show(record, out, as_json=as_json)
        except ConnectionRejected as exc:
            if 400 <= exc.status_code < 500:
                hint = _REJECTION_HINTS.get(exc.status_code, "")
                raise WatchError(
                    f"{url} refused the WebSocket: HTTP {exc.status_code}{hint}"
                ) from None
            problem = f"HTTP {exc.status_code}"
        except ConnectionClosed as exc:
            name = exc.reason.name if exc.reason is not None else "no reason"
            problem = f"connection closed ({name})"
        except HandshakeError as exc:
            problem = f"handshake failed ({type(exc).__name__})"
        except OSError as exc:
            problem = exc.strerror or str(exc) or type(exc).__name__
        delay = backoff * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography
        print(f"watch: {problem}; retrying in {delay:.1f} s", file=err, flush=True)
        await trio.sleep(delay)
        backoff = min(backoff * 2, max_backoff)


_REJECTION_HINTS: Final = {
    401: (
        " (the proxy asks for its admin token: give the same --admin-token-file, or set "
        "POP3PROXY_ADMIN_TOKEN)"
    ),
    421: (
        " (without its token the proxy answers only by IP address, localhost or a name in "
        "its --admin-host-names)"
    ),
}


def run_watch(
    endpoint: Endpoint | None, *, as_json: bool = False, token: AdminToken | None = None
) -> int:
    """``pop3proxy watch``: follow until Ctrl-C (exit 0); 1 if refused; 2 without an endpoint."""
    if endpoint is None or endpoint.port == 0:
        print(
            "pop3proxy watch: --admin: give the HOST:PORT of a running proxy's admin endpoint",
            file=sys.stderr,
        )
        return EXIT_USAGE
    url = base_url(endpoint, "ws") + "/events"
    try:
        trio.run(lambda: follow(url, out=sys.stdout, err=sys.stderr, as_json=as_json, token=token))
    except BaseException as exc:
        leaves = _leaves(exc)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return EXIT_OK
        refused = [leaf for leaf in leaves if isinstance(leaf, WatchError)]
        if refused:
            print(f"pop3proxy watch: {refused[0]}", file=sys.stderr)
            return EXIT_FAILED
        raise
    return EXIT_OK


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
