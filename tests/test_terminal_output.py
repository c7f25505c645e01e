"""What reaches an operator's terminal: control characters from clients and servers escaped.

User names, command arguments, greetings and server replies are controlled by whoever is at
the other end of a connection. ``--log-format console``, ``check``, ``healthcheck`` (and
``report`` and ``watch``, tested with them) show them escaped, so no ESC sequence reaches the
terminal;
the JSON log needs nothing (``json.dumps`` escapes control characters).
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from pop3proxy import logs
from pop3proxy.admin import healthcheck
from pop3proxy.config import Endpoint
from pop3proxy.migration import check
from pop3proxy.terminal import printable

#: Every way text can drive a terminal: CSI and OSC sequences, BEL, a C1 CSI, DEL, a
#: bidirectional override, a line separator, a NUL.
HOSTILE = "eve\x1b[2J\x1b]0;owned\x07\x9b31m\x7f\u202e\u2028\x00"
ESCAPED = "eve\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\x7f\\u202e\\u2028\\x00"
#: The colour codes structlog's console renderer writes itself.
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def test_printable_escapes_what_a_terminal_acts_on() -> None:
    assert printable(HOSTILE) == ESCAPED
    assert printable("plain text, spaces and ümlauts") == "plain text, spaces and ümlauts"
    assert printable("a\nb\tc", keep="\n") == "a\nb\\x09c"
    assert printable("\U000e0001") == "\\U000e0001"  # a tag character (format, Cf)
    for code in [*range(0x20), *range(0x7F, 0xA0)]:
        assert printable(chr(code)).isprintable()


def _fail(message: str) -> None:
    raise ValueError(message)


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """``--log-format console`` into a buffer; the previous configuration restored after."""
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level, threshold = root.handlers[:], root.level, logs.threshold
    stream = io.StringIO()
    logs.configure_logging("debug", "console", stream)
    try:
        yield stream
    finally:
        structlog.configure(**saved)
        root.handlers[:], logs.threshold = handlers, threshold
        root.setLevel(level)


def test_console_log_escapes_control_characters(console: io.StringIO) -> None:
    log = structlog.get_logger("pop3proxy")
    log.info("pop3.login", user=HOSTILE, mechanism="USER", result="failure")
    log.info("pop3.command", verb="USER", args=[HOSTILE])
    log.warning("upstream.failed", error=HOSTILE, **{HOSTILE: 1})
    try:
        _fail(HOSTILE)
    except ValueError:
        log.exception("session.error")
    logging.getLogger("trio-websocket").warning("peer said %s", HOSTILE)
    text = _SGR.sub("", console.getvalue())
    assert text.count(ESCAPED) >= 5
    lines = text.splitlines()
    assert all(line.isprintable() for line in lines), [
        line for line in lines if not line.isprintable()
    ]
    assert "Traceback (most recent call last):" in lines  # line breaks of a traceback stay


def test_json_log_escapes_control_characters() -> None:
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level, threshold = root.handlers[:], root.level, logs.threshold
    stream = io.StringIO()
    logs.configure_logging("info", "json", stream)
    try:
        structlog.get_logger("pop3proxy").info("pop3.login", user=HOSTILE)
    finally:
        structlog.configure(**saved)
        root.handlers[:], logs.threshold = handlers, threshold
        root.setLevel(level)
    line = stream.getvalue()
    assert line.isascii()
    assert line.count("\n") == 1
    assert json.loads(line)["user"] == HOSTILE  # escaped, not rewritten


def test_check_text_escapes_what_the_server_sent() -> None:
    report = check.CheckReport("mail.example:995", "mail.example", "the system store")
    report.greeting = HOSTILE
    report.add("greeting", "ok", f"{HOSTILE} (no APOP timestamp)")
    report.capabilities = [HOSTILE, "USER"]
    report.add("login", "fail", f"alice was refused: {HOSTILE}")
    report.chain = [
        check.CertInfo(
            subject=f"CN={HOSTILE}",
            issuer=f"CN={HOSTILE}",
            not_before="2026-01-01T00:00:00+00:00",
            not_after="2027-01-01T00:00:00+00:00",
            days_left=300,
            sha256="00",
            self_signed=True,
            names=(HOSTILE,),
        )
    ]
    text = report.text()
    assert all(line.isprintable() for line in text.splitlines())
    assert text.count(ESCAPED) == 6  # 2 findings, subject, issuer, names, CAPA
    as_json = json.dumps(report.as_json())
    assert as_json.isascii()


def test_check_password_file_errors_never_echo_the_value(tmp_path: Path) -> None:
    for source, problem in (
        ("Hunter2-typed-as-a-file-name", "cannot read it: No such file or directory"),
        (str(tmp_path), "cannot read it: Is a directory"),
        ("pass\0word", "not a file name"),
    ):
        with pytest.raises(check.UsageError) as raised:
            check.read_password(source)
        assert str(raised.value) == f"pop3proxy check: --password-file: {problem}"
    latin = tmp_path / "latin-1"
    latin.write_bytes(b"caf\xe9\n")
    with pytest.raises(check.UsageError, match=r"--password-file: not UTF-8$"):
        check.read_password(str(latin))


def test_healthcheck_escapes_what_readyz_relays_from_the_upstream() -> None:
    """``/readyz`` carries the upstream's or the verifier's own words in ``error``."""
    body = json.dumps({"ready": False, "reason": "bad_greeting", "error": HOSTILE}).encode()

    class NotReady(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotReady) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        out = io.StringIO()
        try:
            status = healthcheck.check(Endpoint("127.0.0.1", server.server_address[1]), out=out)
        finally:
            server.shutdown()
            thread.join(timeout=10)
    assert status == healthcheck.EXIT_NOT_READY
    assert out.getvalue() == f"not ready: HTTP 503 bad_greeting: {ESCAPED}\n"
