"""Structured logging: one JSON object per line on stdout, and a redaction backstop.

Which values are secret is decided by the POP3 engine (it wraps them in
:class:`~pop3proxy.pop3.Secret`, including SASL continuation lines, which only the state
machine can recognise). :func:`redact_secrets` is the last processor before rendering
and catches what slipped through anyway: a ``Secret`` object, a key that names a
credential, or a string that looks like a raw ``PASS``/``APOP``/``AUTH`` line.
Tracebacks are rendered without local variables, which could hold a password.

``--log-format console`` is for a terminal, and user names, arguments and server replies
came from the network: its renderer shows control characters as escapes (``\\x1b``), so a
client cannot drive the operator's terminal (JSON lines are escaped by ``json.dumps``).

Session events may wait for a batch (:mod:`pop3proxy.telemetry`); every other line, logged
with structlog or through stdlib logging, first delivers them (:func:`deliver_waiting_events`,
the first processor of both chains), so lines reach the stream in the order things happened.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, ExcInfo, Processor, WrappedLogger

from pop3proxy.pop3 import Secret
from pop3proxy.terminal import printable

__all__ = [
    "LEVELS",
    "PrintableConsoleRenderer",
    "before_direct_line",
    "configure_logging",
    "deliver_waiting_events",
    "redact_secrets",
]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_REDACTED = "***"

#: The configured level: events below it are dropped before anything is built for them.
threshold = LEVELS["debug"]
#: Delivers the session events waiting for a batch: set by ``Telemetry`` when a batch begins,
#: cleared when it is delivered, so the lines of the batch itself never call it.
before_direct_line: Callable[[], None] | None = None
_SECRET_KEYS = frozenset(
    {"password", "pass", "passwd", "secret", "sasl", "auth_data", "authorization", "apop_digest"}
)
_SECRET_LINE = re.compile(r"^\s*(PASS|RPOP|APOP\s+\S+|AUTH\s+\S+)\s+\S", re.IGNORECASE)
#: The shortest string :data:`_SECRET_LINE` matches (``PASS x``).
_SHORTEST_LINE = 6
#: Field types that cannot hold a secret (exact types: a subclass gets the full look).
_PLAIN: frozenset[type] = frozenset({int, float, bool, type(None)})


def _scrub(value: Any) -> Any:
    if type(value) is str:  # most values. A match needs white space after the keyword, so a
        # short or alphanumeric string (a verb, an id, a number) is not even tried.
        plain = len(value) < _SHORTEST_LINE or value.isalnum() or not _SECRET_LINE.match(value)
        return value if plain else "[REDACTED LINE]"
    if isinstance(value, Secret):
        return _REDACTED
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    if isinstance(value, str):
        return "[REDACTED LINE]" if _SECRET_LINE.match(value) else value
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value] if value else []  # most commands: none
    if isinstance(value, dict):
        return {k: _REDACTED if k in _SECRET_KEYS else _scrub(v) for k, v in value.items()}
    return value


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the backstop that masks anything credential-shaped."""
    for key, value in event_dict.items():
        if key in _SECRET_KEYS:
            event_dict[key] = _REDACTED
        elif type(value) not in _PLAIN:  # numbers and None cannot hold a secret
            event_dict[key] = _scrub(value)
    return event_dict


def _printable_traceback(out: TextIO, exc_info: ExcInfo) -> None:
    """structlog's plain traceback, with control characters escaped (line breaks kept)."""
    text = io.StringIO()
    structlog.dev.plain_traceback(text, exc_info)
    out.write(printable(text.getvalue(), keep="\n"))


class PrintableConsoleRenderer:
    """structlog's ``ConsoleRenderer`` for people, fed only printable text.

    Every text key and value is escaped before rendering (values that are not text are
    shown by their ``repr``, which escapes control characters itself); the renderer's own
    colours are its only escape sequences.
    """

    def __init__(self) -> None:
        self._render = structlog.dev.ConsoleRenderer(exception_formatter=_printable_traceback)

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        clean: EventDict = {
            (printable(key) if isinstance(key, str) else key): (
                printable(value, keep="\n" if key in {"exception", "stack"} else "")
                if isinstance(value, str)
                else value
            )
            for key, value in event_dict.items()
        }
        return self._render(logger, name, clean)


def deliver_waiting_events(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor, first of every chain: events that happened before this line go first.

    Runs before the time stamp, so the line's ``timestamp`` follows theirs too.
    """
    deliver = before_direct_line
    if deliver is not None:
        deliver()
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO = sys.stdout) -> None:
    """Configure structlog and route stdlib logging (trio, trio-websocket) the same way.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json``; ``console`` for people; ``auto`` picks console on a terminal.
        stream: where lines go; stdout in production (containers collect it).
    """
    global threshold  # noqa: PLW0603 - one process, one logging configuration
    threshold = LEVELS[level]
    use_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    shared: list[Processor] = [
        deliver_waiting_events,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor
    exceptions: list[Processor]
    if use_console:
        renderer = PrintableConsoleRenderer()
        exceptions = []
    else:
        renderer = structlog.processors.JSONRenderer()
        exceptions = [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False))
        ]
    structlog.configure(
        processors=[*shared, *exceptions, redact_secrets, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, *exceptions],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redact_secrets,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
