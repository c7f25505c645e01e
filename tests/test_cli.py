"""The command line: one-line errors with exit status 2, --help, and how subcommands are run."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

import pop3proxy
from pop3proxy.cli import main
from pop3proxy.config import CONFIG_FILE, SETTINGS, Endpoint, Settings

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pop3proxy", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO_ROOT,
        env=clean_env() if env is None else env,
        check=False,
    )


# --- usage and config errors: status 2, one line on stderr -----------------------------------


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["serve"], {}, ["--upstream", "required"]),
        (["serve", "--upstream", "h", "--listen", "127.0.0.1:99999"], {}, ["--listen", "99999"]),
        (["serve", "--upstream", "h:0"], {}, ["--upstream", "port 0"]),
        (
            ["serve", "--upstream", "h"],
            {"POP3PROXY_CONNECT_TIMEOUT": "0"},
            ["--connect-timeout (POP3PROXY_CONNECT_TIMEOUT)", "positive"],
        ),
        (
            ["serve", "--upstream", "h", "--upstream-ca-file", "missing-ca.pem"],
            {},
            ["--upstream-ca-file", "missing-ca.pem: no such file"],
        ),
        (["serve", "--upstream", "h", "--tls-min-version", "1.0"], {}, ["--tls-min-version"]),
        (["serve", "--upstream", "h", "--log-format", "xml"], {}, ["--log-format", "xml"]),
        (
            ["serve", "--upstream", "h", "--upstream-server-name", ""],
            {},
            ["--upstream-server-name"],
        ),
        (["serve", "--upstream", "h", "--bogus"], {}, ["unrecognized", "--bogus"]),
        (["serve", "--upstream"], {}, ["--upstream", "expected one argument"]),
        (["serve", "--up", "h"], {}, ["unrecognized", "--up"]),  # no abbreviations
        ([], {}, ["COMMAND", "required"]),
        (["frobnicate"], {}, ["invalid choice", "frobnicate"]),
        (["demo", "--upstream", "h"], {}, ["pop3proxy demo", "--upstream"]),
        (["demo"], {"POP3PROXY_LOG_LEVEL": "loud"}, ["--log-level (POP3PROXY_LOG_LEVEL)"]),
    ],
)
def test_usage_and_config_errors_are_one_line_with_status_2(
    args: list[str], env: dict[str, str], names: list[str]
) -> None:
    result = run_cli(*args, env=clean_env(**env))
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pop3proxy")
    for name in names:
        assert name in lines[0]
    assert result.stdout == ""


def test_config_file_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('upstream = "h"\ntimeout = 3\n', encoding="utf-8")
    broken = tmp_path / "broken.toml"
    broken.write_text('upstream = "h\n', encoding="utf-8")
    bad_value = tmp_path / "bad_value.toml"
    bad_value.write_text('upstream = "h"\nidle_timeout = -1\n', encoding="utf-8")
    cases = [
        (["serve", "--config", str(unknown)], clean_env(), 'unknown key "timeout"'),
        (["serve"], clean_env(POP3PROXY_CONFIG=str(broken)), "invalid TOML"),
        (["serve", "--config", str(bad_value)], clean_env(), "--idle-timeout (idle_timeout in"),
    ]
    for args, env, expected in cases:
        result = run_cli(*args, env=env)
        assert result.returncode == 2, result
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert expected in result.stderr


def test_errors_in_process_return_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--listen", "nope:x"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("pop3proxy: --listen: nope:x: ")


# --- help and version -------------------------------------------------------------------------


def test_top_level_help_says_what_it_is_and_lists_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "plaintext POP3" in result.stdout
    assert "POP3S" in result.stdout
    for command in ["serve", "demo", "--version"]:
        assert command in result.stdout


def test_serve_help_explains_every_setting() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # undo argparse's line wrapping
    for spec in [*SETTINGS, CONFIG_FILE]:
        assert spec.env_var in text
        if spec.on_command_line:
            assert f"{spec.flag} {spec.metavar}" in text
            assert spec.help.split()[0] in text
        else:  # a secret itself: its flag is refused, so not offered
            assert f"{spec.flag} {spec.metavar}" not in text
    assert "default: 127.0.0.1:110" in text
    assert "default: 10;" in text


def test_demo_help_lists_its_options_and_demo_default() -> None:
    result = run_cli("demo", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in ["--listen", "--log-level", "--log-format"]:
        assert option in text
    assert "default: 127.0.0.1:8110" in text
    assert "--upstream" not in text


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pop3proxy {pop3proxy.__version__}"


def test_help_in_process_returns_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--help"]) == 0
    assert "--upstream" in capsys.readouterr().out


# --- running subcommands (with stand-ins for the modules others write) -------------------------

Calls = list[tuple[str, object]]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Calls:
    """Stand-in ``pop3proxy.logs`` that records configure_logging calls."""
    # ``serve`` creates its inventory folder before it starts: not in the user's home.
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    recorded: Calls = []
    logs = types.ModuleType("pop3proxy.logs")

    def configure_logging(level: str, fmt: str) -> None:
        recorded.append(("configure_logging", (level, fmt)))

    logs.configure_logging = configure_logging  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pop3proxy.logs", logs)
    for var in [s.env_var for s in SETTINGS] + [CONFIG_FILE.env_var]:
        monkeypatch.delenv(var, raising=False)
    return recorded


def fake_module(
    monkeypatch: pytest.MonkeyPatch, name: str, attr: str, fn: Callable[..., Awaitable[None]]
) -> None:
    module = types.ModuleType(name)
    setattr(module, attr, fn)
    monkeypatch.setitem(sys.modules, name, module)


def test_serve_configures_logging_then_runs_server(
    monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    async def serve(settings: Settings, reload: object = None) -> None:
        await trio.lowlevel.checkpoint()
        calls.append(("serve", settings))
        assert callable(reload)  # SIGHUP re-reads the same command line
        calls.append(("reload", reload()))

    fake_module(monkeypatch, "pop3proxy.app", "run", serve)
    status = main(
        ["serve", "--upstream", "[::1]:2995", "--log-level", "debug", "--log-format", "json"]
    )
    assert status == 0
    assert calls[0] == ("configure_logging", ("debug", "json"))
    assert calls[1][0] == "serve"
    settings = calls[1][1]
    assert isinstance(settings, Settings)
    assert settings.upstream == Endpoint("::1", 2995)
    assert calls[2] == ("reload", settings)


@pytest.mark.parametrize("in_group", [False, True])
def test_ctrl_c_exits_0_quietly(
    monkeypatch: pytest.MonkeyPatch,
    calls: Calls,
    capsys: pytest.CaptureFixture[str],
    in_group: bool,
) -> None:
    async def interrupted() -> None:
        await trio.lowlevel.checkpoint()
        raise KeyboardInterrupt

    async def serve(settings: Settings, reload: object = None) -> None:
        if in_group:  # as it arrives from inside a nursery
            async with trio.open_nursery() as nursery:
                nursery.start_soon(interrupted)
        else:
            await interrupted()

    fake_module(monkeypatch, "pop3proxy.app", "run", serve)
    assert main(["serve", "--upstream", "h"]) == 0
    assert capsys.readouterr().err == ""


def test_listen_address_in_use_exits_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, calls: Calls, capsys: pytest.CaptureFixture[str]
) -> None:
    async def serve(settings: Settings, reload: object = None) -> None:
        await trio.lowlevel.checkpoint()
        raise OSError(errno.EADDRINUSE, "address already in use")

    fake_module(monkeypatch, "pop3proxy.app", "run", serve)
    assert main(["serve", "--upstream", "h", "--listen", "127.0.0.1:2110"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("pop3proxy: cannot listen on 127.0.0.1:2110: ")


def test_other_errors_propagate(monkeypatch: pytest.MonkeyPatch, calls: Calls) -> None:
    async def serve(settings: Settings, reload: object = None) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("bug")

    fake_module(monkeypatch, "pop3proxy.app", "run", serve)
    with pytest.raises(RuntimeError, match="bug"):
        main(["serve", "--upstream", "h"])


def test_demo_runs_run_demo_with_its_defaults(
    monkeypatch: pytest.MonkeyPatch, calls: Calls
) -> None:
    async def run_demo(settings: Settings) -> None:
        await trio.lowlevel.checkpoint()
        calls.append(("run_demo", settings))

    fake_module(monkeypatch, "pop3proxy.demo", "run_demo", run_demo)
    monkeypatch.setenv("POP3PROXY_UPSTREAM", "ignored.example")  # demo does not read it
    assert main(["demo", "--log-format", "console"]) == 0
    assert calls[0] == ("configure_logging", ("info", "console"))
    settings = calls[1][1]
    assert isinstance(settings, Settings)
    assert settings.listen == Endpoint("127.0.0.1", 8110)
    assert settings.upstream is None
    assert main(["demo", "--listen", "127.0.0.1:0"]) == 0
    last = calls[-1][1]
    assert isinstance(last, Settings)
    assert last.listen == Endpoint("127.0.0.1", 0)


# --- the real thing ---------------------------------------------------------------------------


def read_events_until(proc: subprocess.Popen[bytes], wanted: str, timeout: float) -> list[str]:
    """JSON log events from ``proc``'s stdout until ``wanted`` appears, EOF, or ``timeout``."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    events: list[str] = []
    buffer = b""
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while wanted not in events and (remaining := deadline - time.monotonic()) > 0:
            if not selector.select(timeout=remaining):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, buffer = (buffer + chunk).split(b"\n")
            events += [json.loads(line)["event"] for line in lines if line.strip()]
    return events


@contextlib.contextmanager
def sigint_not_ignored() -> Iterator[None]:
    """Children inherit an ignored SIGINT (as under ``pytest &``), and Python then never raises
    KeyboardInterrupt; a handled one becomes the default in the child."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_real_serve_exits_0_on_sigint(tmp_path: Path) -> None:
    """End to end with the real server: listening, then Ctrl-C, then a quiet exit 0."""
    args = ["serve", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--log-format", "json"]
    args += ["--state-dir", str(tmp_path)]  # the inventory is created at start: not in ~
    with sigint_not_ignored():
        proc = subprocess.Popen(
            [sys.executable, "-m", "pop3proxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO_ROOT,
            env=clean_env(),
        )
    try:
        events = read_events_until(proc, "listener.started", TIMEOUT)
        assert "listener.started" in events, events
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0
        assert stderr == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
