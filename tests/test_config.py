"""Settings loading: flags > env > TOML file > defaults, value parsing, and error messages."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import ssl
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import trustme

from pop3proxy.config import (
    CONFIG_FILE,
    SETTINGS,
    ConfigError,
    Endpoint,
    Origin,
    Settings,
    load_settings,
)
from tests.peers.proxy import ProxyProcess


def write_toml(tmp_path: Path, text: str, name: str = "pop3proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(
    flags: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> ConfigError:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(flags, environ or {})
    return excinfo.value


@pytest.fixture(scope="module")
def ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


# --- the table --------------------------------------------------------------------------------


def test_every_settings_field_is_a_declared_setting() -> None:
    assert [s.name for s in SETTINGS] == [f.name for f in dataclasses.fields(Settings)]
    assert [s.default for s in SETTINGS] == [f.default for f in dataclasses.fields(Settings)]


@pytest.mark.parametrize(
    ("name", "flag", "env_var"),
    [
        ("listen", "--listen", "POP3PROXY_LISTEN"),
        ("upstream", "--upstream", "POP3PROXY_UPSTREAM"),
        ("upstream_ca_file", "--upstream-ca-file", "POP3PROXY_UPSTREAM_CA_FILE"),
        ("upstream_server_name", "--upstream-server-name", "POP3PROXY_UPSTREAM_SERVER_NAME"),
        ("tls_min_version", "--tls-min-version", "POP3PROXY_TLS_MIN_VERSION"),
        ("connect_timeout", "--connect-timeout", "POP3PROXY_CONNECT_TIMEOUT"),
        ("handshake_timeout", "--handshake-timeout", "POP3PROXY_HANDSHAKE_TIMEOUT"),
        ("idle_timeout", "--idle-timeout", "POP3PROXY_IDLE_TIMEOUT"),
        ("log_level", "--log-level", "POP3PROXY_LOG_LEVEL"),
        ("log_format", "--log-format", "POP3PROXY_LOG_FORMAT"),
        ("config", "--config", "POP3PROXY_CONFIG"),
    ],
)
def test_flag_and_env_var_names_derive_from_the_setting_name(
    name: str, flag: str, env_var: str
) -> None:
    spec = {s.name: s for s in [*SETTINGS, CONFIG_FILE]}[name]
    assert (spec.flag, spec.env_var) == (flag, env_var)
    assert spec.help


# --- precedence ---------------------------------------------------------------------------------


def test_defaults_when_nothing_is_given() -> None:
    settings = load_settings({}, {})
    assert settings == Settings()
    assert settings.listen == Endpoint("127.0.0.1", 110)
    assert settings.upstream is None
    assert settings.connect_timeout == 10.0
    assert settings.log_format == "auto"


def test_os_environ_is_the_default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POP3PROXY_IDLE_TIMEOUT", "42")
    assert load_settings().idle_timeout == 42.0


# (setting, flag value, env value, file line, and the parsed value of each)
PRECEDENCE_CASES = [
    (
        "listen",
        ("127.0.0.1:1001", "127.0.0.2:1002", 'listen = "127.0.0.3:1003"'),
        (Endpoint("127.0.0.1", 1001), Endpoint("127.0.0.2", 1002), Endpoint("127.0.0.3", 1003)),
    ),
    (
        "connect_timeout",
        ("1.5", "2", "connect_timeout = 3"),
        (1.5, 2.0, 3.0),
    ),
    (
        "log_level",
        ("debug", "warning", 'log_level = "error"'),
        ("debug", "warning", "error"),
    ),
    (
        "tls_min_version",
        ("1.3", "1.2", "tls_min_version = 1.3"),
        ("1.3", "1.2", "1.3"),
    ),
]


@pytest.mark.parametrize(("name", "raw", "parsed"), PRECEDENCE_CASES)
def test_flags_beat_env_beats_file_beats_default(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    raw: tuple[str, str, str],
    parsed: tuple[object, object, object],
) -> None:
    flag_value, env_value, file_line = raw
    env_var = "POP3PROXY_" + name.upper()
    default = getattr(Settings(), name)
    config = write_toml(tmp_path, file_line + "\n")
    for var in [env_var, "POP3PROXY_CONFIG"]:
        monkeypatch.delenv(var, raising=False)

    assert getattr(load_settings({}), name) == default
    monkeypatch.setenv("POP3PROXY_CONFIG", str(config))
    assert getattr(load_settings({}), name) == parsed[2]
    monkeypatch.setenv(env_var, env_value)
    assert getattr(load_settings({}), name) == parsed[1]
    assert getattr(load_settings({name: flag_value}), name) == parsed[0]


def test_each_setting_comes_from_its_own_highest_source(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path,
        'listen = "127.0.0.1:2110"\nupstream = "mail.example.com"\nidle_timeout = 30\n'
        'log_format = "console"\n',
    )
    settings = load_settings(
        {"config": str(config), "log_format": "json"},
        {"POP3PROXY_IDLE_TIMEOUT": "5", "POP3PROXY_HANDSHAKE_TIMEOUT": "7"},
    )
    assert settings.listen == Endpoint("127.0.0.1", 2110)  # file
    assert settings.upstream == Endpoint("mail.example.com", 995)  # file
    assert settings.idle_timeout == 5.0  # env over file
    assert settings.handshake_timeout == 7.0  # env over default
    assert settings.log_format == "json"  # flag over file
    assert settings.connect_timeout == 10.0  # default


def test_config_flag_beats_config_env_var(tmp_path: Path) -> None:
    from_flag = write_toml(tmp_path, "idle_timeout = 1\n", "flag.toml")
    from_env = write_toml(tmp_path, "idle_timeout = 2\n", "env.toml")
    settings = load_settings({"config": str(from_flag)}, {"POP3PROXY_CONFIG": str(from_env)})
    assert settings.idle_timeout == 1.0


def test_empty_env_var_counts_as_unset() -> None:
    settings = load_settings({}, {"POP3PROXY_LISTEN": "", "POP3PROXY_UPSTREAM_SERVER_NAME": ""})
    assert settings.listen == Settings().listen
    assert settings.upstream_server_name is None


def test_only_limits_the_settings_read_and_defaults_override(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "idle_timeout = 1\n")
    environ = {"POP3PROXY_CONFIG": str(config), "POP3PROXY_CONNECT_TIMEOUT": "3"}
    settings = load_settings(
        {},
        environ,
        only=["listen", "log_level"],
        defaults={"listen": Endpoint("127.0.0.1", 8110)},
    )
    assert settings.listen == Endpoint("127.0.0.1", 8110)
    assert settings.connect_timeout == 10.0  # not read: env ignored
    assert settings.idle_timeout == 600.0  # not read: no config file either


def test_required_setting_missing() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings({}, {}, required=["upstream"])
    message = str(excinfo.value)
    assert message.startswith("pop3proxy: --upstream: required")
    assert "POP3PROXY_UPSTREAM" in message
    assert excinfo.value.origin is None
    assert load_settings({"upstream": "h"}, {}, required=["upstream"]).upstream == Endpoint(
        "h", 995
    )


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("listen", "0.0.0.0:110", Endpoint("0.0.0.0", 110)),
        ("listen", "127.0.0.1:0", Endpoint("127.0.0.1", 0)),
        ("listen", "[::1]:2110", Endpoint("::1", 2110)),
        ("listen", "[::]", Endpoint("::", 110)),
        ("listen", "localhost", Endpoint("localhost", 110)),
        ("upstream", "mail.example.com:995", Endpoint("mail.example.com", 995)),
        ("upstream", "mail.example.com", Endpoint("mail.example.com", 995)),
        ("upstream", "[2001:db8::1]", Endpoint("2001:db8::1", 995)),
        ("upstream", "192.0.2.7:65535", Endpoint("192.0.2.7", 65535)),
        ("upstream_server_name", "pop.example.com", "pop.example.com"),
        ("upstream_server_name", "192.0.2.7", "192.0.2.7"),
        ("upstream_server_name", "::1", "::1"),
        ("tls_min_version", "1.2", "1.2"),
        ("connect_timeout", "0.25", 0.25),
        ("idle_timeout", "1e3", 1000.0),
        ("log_level", "WARNING", "warning"),
        ("log_format", "console", "console"),
    ],
)
def test_valid_values(name: str, raw: str, expected: object) -> None:
    assert getattr(load_settings({name: raw}, {}), name) == expected


def test_endpoint_str_round_trips() -> None:
    for text in ["127.0.0.1:110", "[::1]:995", "mail.example.com:1"]:
        assert str(load_settings({"listen": text}, {}).listen) == text


def test_ca_file_with_a_certificate_is_accepted(ca_file: Path) -> None:
    settings = load_settings({}, {"POP3PROXY_UPSTREAM_CA_FILE": str(ca_file)})
    assert settings.upstream_ca_file == ca_file


def test_tls_server_name_defaults_to_upstream_host() -> None:
    settings = load_settings({"upstream": "mail.example.com"}, {})
    assert settings.tls_server_name == "mail.example.com"
    named = load_settings({"upstream": "192.0.2.1", "upstream_server_name": "pop.example"}, {})
    assert named.tls_server_name == "pop.example"


def test_minimum_tls_version() -> None:
    assert Settings().minimum_tls_version is ssl.TLSVersion.TLSv1_2
    assert Settings(tls_min_version="1.3").minimum_tls_version is ssl.TLSVersion.TLSv1_3


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("listen", "127.0.0.1:65536", "127.0.0.1:65536: port 65536 is out of range (0-65535)"),
        ("listen", "127.0.0.1:http", "127.0.0.1:http: the port must be a number from 0 to 65535"),
        ("listen", "::1:110", "::1:110: IPv6 addresses must be in brackets, e.g. [::1]:110"),
        ("listen", "[::1:110", "[::1:110: missing ']' after the IPv6 address"),
        ("listen", "[mail]:110", "[mail]:110: not a valid IPv6 address between [ and ]"),
        ("listen", ":110", ":110: missing host"),
        ("listen", "300.1.2.3:110", "300.1.2.3:110: not a valid IPv4 address"),
        ("upstream", "mail.example.com:0", "mail.example.com:0: port 0 is out of range (1-65535)"),
        ("upstream", "[::1]:0", "[::1]:0: port 0 is out of range (1-65535)"),
        ("upstream", "mail_ex!:995", "mail_ex!:995: not a valid host name or IP address"),
        ("upstream", "mail.example.com:-1", "the port must be a number from 1 to 65535"),
        ("upstream_server_name", "", "'': must not be empty"),
        ("upstream_server_name", "bad name", "bad name: not a valid host name or IP address"),
        ("upstream_server_name", "-x.example", "-x.example: not a valid host name or IP address"),
        ("upstream_ca_file", "/nonexistent/ca.pem", "/nonexistent/ca.pem: no such file"),
        ("tls_min_version", "1.1", "1.1: must be one of 1.2, 1.3"),
        ("connect_timeout", "0", "0: must be a positive number of seconds"),
        ("handshake_timeout", "-1", "-1: must be a positive number of seconds"),
        ("idle_timeout", "inf", "inf: must be a positive number of seconds"),
        ("idle_timeout", "nan", "nan: must be a positive number of seconds"),
        ("connect_timeout", "ten", "ten: not a number"),
        ("log_level", "verbose", "verbose: must be one of debug, info, warning, error"),
        ("log_format", "xml", "xml: must be one of json, console, auto"),
    ],
)
def test_bad_flag_value(name: str, raw: str, problem: str) -> None:
    error = load_error({name: raw})
    flag = "--" + name.replace("_", "-")
    assert error.setting == name
    assert error.origin is Origin.FLAG
    assert str(error).startswith(f"pop3proxy: {flag}: ")
    assert str(error).endswith(problem)
    assert "\n" not in str(error)


def test_bad_env_value_names_flag_and_env_var() -> None:
    error = load_error({}, {"POP3PROXY_UPSTREAM_CA_FILE": "/x.pem"})
    assert str(error) == (
        "pop3proxy: --upstream-ca-file (POP3PROXY_UPSTREAM_CA_FILE): /x.pem: no such file"
    )
    assert error.origin is Origin.ENV


def test_bad_file_value_names_the_key_and_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "connect_timeout = -3\n")
    error = load_error({"config": str(config)})
    assert str(error) == (
        f"pop3proxy: --connect-timeout (connect_timeout in {config}): "
        "-3: must be a positive number of seconds"
    )
    assert error.origin is Origin.FILE


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("listen = 110", "110: expected a string like HOST:PORT, got an integer"),
        ("connect_timeout = true", "true: expected a number of seconds, got a boolean"),
        ("connect_timeout = 0", "0: must be a positive number of seconds"),
        ("tls_min_version = 1.1", "1.1: must be one of 1.2, 1.3"),
        (
            'log_level = ["info"]',
            "['info']: expected one of debug, info, warning, error, got an array",
        ),
    ],
)
def test_wrong_toml_types(tmp_path: Path, line: str, problem: str) -> None:
    config = write_toml(tmp_path, line + "\n")
    error = load_error({"config": str(config)})
    assert str(error).endswith(problem), str(error)


def test_valid_toml_native_types(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path, "connect_timeout = 10\nidle_timeout = 0.5\ntls_min_version = 1.3\n"
    )
    settings = load_settings({"config": str(config)}, {})
    assert (settings.connect_timeout, settings.idle_timeout) == (10.0, 0.5)
    assert settings.tls_min_version == "1.3"


def test_ca_file_that_is_a_directory(tmp_path: Path) -> None:
    error = load_error({"upstream_ca_file": str(tmp_path)})
    assert (
        str(error)
        == f"pop3proxy: --upstream-ca-file: {tmp_path}: is a directory, expected a PEM file"
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not a certificate\n",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_ca_file_without_a_certificate(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(content)
    error = load_error({"upstream_ca_file": str(path)})
    assert str(error) == f"pop3proxy: --upstream-ca-file: {path}: no PEM certificate found"


def test_ca_file_with_only_a_private_key(tmp_path: Path) -> None:
    ca = trustme.CA()
    path = tmp_path / "key.pem"
    ca.private_key_pem.write_to_path(str(path))
    error = load_error({"upstream_ca_file": str(path)})
    assert str(error).endswith("no PEM certificate found")


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'upstream = "mail.example.com"\nlisten_adress = "x"\n')
    error = load_error({"config": str(config)})
    assert str(error) == (
        f'pop3proxy: --config: {config}: unknown key "listen_adress" (did you mean "listen"?)'
    )


def test_config_is_not_a_key_in_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'config = "other.toml"\n')
    assert 'unknown key "config"' in str(load_error({"config": str(config)}))


def test_bad_toml_syntax(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'upstream = "mail.example.com"\nlisten 127.0.0.1\n')
    error = load_error({}, {"POP3PROXY_CONFIG": str(config)})
    message = str(error)
    assert message.startswith(f"pop3proxy: --config (POP3PROXY_CONFIG): {config}: invalid TOML: ")
    assert "line 2" in message
    assert "\n" not in message


def test_config_file_missing_or_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert str(load_error({"config": str(missing)})) == (
        f"pop3proxy: --config: {missing}: no such file"
    )
    assert str(load_error({"config": str(tmp_path)})).endswith(
        "is a directory, expected a TOML file"
    )
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    assert str(load_error({"config": str(binary)})).endswith("not UTF-8 text")


def test_unprintable_value_is_quoted_on_one_line() -> None:
    error = load_error({"listen": "127.0.0.1:110\nX"})
    assert "\n" not in str(error)
    assert "'127.0.0.1:110\\nX'" in str(error)


def test_first_bad_setting_wins_and_later_sources_are_not_consulted() -> None:
    # A bad env value is reported even when the file would be fine; a good flag hides a bad env.
    assert load_error({}, {"POP3PROXY_LOG_LEVEL": "loud"}).setting == "log_level"
    settings = load_settings({"log_level": "debug"}, {"POP3PROXY_LOG_LEVEL": "loud"})
    assert settings.log_level == "debug"


# --- secrets: the user-name pseudonym key ---------------------------------------------------------

KEY = "0123456789abcdef-a-secret-key"
#: Settings whose value is (or names the file of) a secret; a new one must be declared secret.
_SECRET_WORDS = ("key", "token", "password", "secret", "credential")


def test_every_secret_setting_is_declared_secret() -> None:
    """The class guard: a setting named like a secret never echoes its value in an error."""
    named = {s.name for s in SETTINGS if any(word in s.name for word in _SECRET_WORDS)}
    assert named >= {"user_pseudonym_key", "user_pseudonym_key_file"}
    assert {s.name for s in SETTINGS if s.secret} == named
    for spec in SETTINGS:
        if spec.secret and not spec.on_command_line:
            assert spec.refused  # says what to use instead


def _key_problem(tmp_path: Path, make: str) -> tuple[str, str]:
    """A bad key file value of kind ``make``, and the problem expected for it."""
    path = tmp_path / "pseudonym.key"
    if make == "missing":
        return str(tmp_path / "unmounted" / "key"), "no such file (is the secret mounted?)"
    if make == "directory":  # a secret volume mounted without the key in it
        return str(tmp_path), "is a directory, expected a file holding the key"
    if make == "fifo":
        os.mkfifo(path)
        return str(path), "not a regular file, expected a file holding the key"
    if make == "nul":
        return f"{tmp_path}/x\0y", "not a valid file name"
    if make == "empty name":
        return "", "empty: expected the name of a file holding the key"
    contents = {
        "empty": (b"", "the key file is empty"),
        "blank": (b" \n\t\n", "the key file is empty"),
        "short": (b"short-key\n", "the key file holds fewer than 16 octets"),
        "large": (b"k" * 4097, "the key file is larger than 4096 octets: not a key"),
    }
    data, problem = contents[make]
    path.write_bytes(data)
    return str(path), problem


@pytest.mark.parametrize(
    "make",
    ["missing", "directory", "fifo", "nul", "empty name", "empty", "blank", "short", "large"],
)
def test_pseudonym_key_file_must_be_a_regular_file_with_a_key(tmp_path: Path, make: str) -> None:
    raw, problem = _key_problem(tmp_path, make)
    for flags, environ, label in (
        ({"user_pseudonym_key_file": raw}, {}, "--user-pseudonym-key-file"),
        (
            {},
            {"POP3PROXY_USER_PSEUDONYM_KEY_FILE": raw} if raw else {},
            "--user-pseudonym-key-file (POP3PROXY_USER_PSEUDONYM_KEY_FILE)",
        ),
    ):
        if not raw and not flags:
            continue  # an empty env var counts as unset
        error = load_error(flags, environ)
        assert error.setting == "user_pseudonym_key_file"
        message = str(error)
        assert message.startswith(f"pop3proxy: {label}: ")
        assert problem in message
        assert "\n" not in message
        if raw:
            assert raw not in message  # the value is never echoed: it may be a key


def test_unreadable_pseudonym_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pseudonym.key"
    path.write_text(KEY)
    real_open = Path.open

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", refuse)
    message = str(load_error({"user_pseudonym_key_file": str(path)}))
    assert message.endswith("cannot read the key file: Permission denied")
    assert str(path) not in message


def test_pseudonym_key_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    path.write_text(f"  {KEY}\n")
    from_file = load_settings({"user_pseudonym_key_file": str(path)}, {}).pseudonym_key
    assert from_file is not None
    assert (from_file.value, from_file.source) == (KEY.encode(), "file")
    assert KEY not in repr(from_file)
    from_env = load_settings({}, {"POP3PROXY_USER_PSEUDONYM_KEY": KEY}).pseudonym_key
    assert from_env is not None
    assert (from_env.value, from_env.source) == (KEY.encode(), "environment")
    config = write_toml(tmp_path, f'user_pseudonym_key_file = "{path}"\n')
    from_toml = load_settings({"config": str(config)}, {}).pseudonym_key
    assert from_toml is not None
    assert from_toml.value == KEY.encode()
    assert load_settings({}, {}).pseudonym_key is None


def test_the_key_itself_is_refused_on_the_command_line_and_in_the_file(tmp_path: Path) -> None:
    error = load_error({"user_pseudonym_key": KEY})
    message = str(error)
    assert message.startswith("pop3proxy: --user-pseudonym-key: the key itself is read only ")
    assert "POP3PROXY_USER_PSEUDONYM_KEY" in message
    assert "--user-pseudonym-key-file FILE" in message
    assert KEY not in message
    config = write_toml(tmp_path, f'user_pseudonym_key = "{KEY}"\n')
    message = str(load_error({"config": str(config)}))
    assert message.startswith(f"pop3proxy: user_pseudonym_key in {config}: the key itself ")
    assert KEY not in message


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("/run/secrets/pseudonym-key", "looks like a file name, not a key"),
        ("./pseudonym.key-of-some-length", "looks like a file name, not a key"),
        ("~/pseudonym.key-of-some-length", "looks like a file name, not a key"),
        ("short-secret", "shorter than 16 octets"),
    ],
)
def test_bad_key_in_the_environment_is_never_echoed(raw: str, problem: str) -> None:
    message = str(load_error({}, {"POP3PROXY_USER_PSEUDONYM_KEY": raw}))
    assert message.startswith("pop3proxy: POP3PROXY_USER_PSEUDONYM_KEY: ")
    assert problem in message
    assert raw not in message


def test_the_key_is_given_one_way_only(tmp_path: Path) -> None:
    path = tmp_path / "pseudonym.key"
    path.write_text(KEY)
    error = load_error(
        {"user_pseudonym_key_file": str(path)}, {"POP3PROXY_USER_PSEUDONYM_KEY": KEY}
    )
    assert str(error) == (
        "pop3proxy: POP3PROXY_USER_PSEUDONYM_KEY: give it one way only, not also as "
        "--user-pseudonym-key-file"
    )


def test_serve_exits_2_on_an_unmounted_key_without_echoing_it(tmp_path: Path) -> None:
    """The Kubernetes case: the secret's folder is there, the key file in it is not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    for args in (
        ["--user-pseudonym-key-file", str(tmp_path)],
        ["--user-pseudonym-key-file", str(tmp_path / "key")],
        ["--user-pseudonym-key", KEY],
        ["--user-pseudonym-key", str(tmp_path / "key")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "pop3proxy", "serve", "--upstream", "127.0.0.1:995", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            check=False,
        )
        assert done.returncode == 2, done
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1
        assert args[1] not in done.stderr
        assert done.stderr.startswith(f"pop3proxy: {args[0]}: ")


# --- the inventory's state dir: checked when serve starts ------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
#: How long a proxy that should have refused to start may run before the test gives up.
START_TIMEOUT = 20.0


def serve_until_exit(*args: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """``pop3proxy serve`` with ``args`` on a free port; fails the test if it keeps running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    env.update(env_vars)
    command = [sys.executable, "-m", "pop3proxy", "serve", "--upstream", "127.0.0.1:995"]
    command += ["--listen", "127.0.0.1:0", "--admin", "off", "--log-format", "json", *args]
    try:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            cwd=REPO_ROOT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the proxy started and ran for {START_TIMEOUT} s: {exc.stdout!r}")


def unwritable_state_dirs(tmp_path: Path) -> list[tuple[str, str]]:
    """Every way the first inventory write would fail, as (--state-dir, the problem)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    db_is_a_folder = tmp_path / "db-is-a-folder"
    (db_is_a_folder / "inventory.sqlite3").mkdir(parents=True)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "inventory.sqlite3").write_bytes(b"not SQLite at all\n" * 512)
    cases = [
        ("/proc/nope", "/proc/nope: cannot create the folder: No such file or directory"),
        (f"{a_file}/inventory", f"{a_file}/inventory: cannot create the folder: Not a directory"),
        # sysfs never lets anyone (root included) create a file in it.
        ("/sys", "/sys: cannot write in the folder: Permission denied"),
        (
            str(db_is_a_folder),
            f"{db_is_a_folder}/inventory.sqlite3: cannot write the inventory database: "
            "unable to open database file",
        ),
        (
            str(corrupt),
            f"{corrupt}/inventory.sqlite3: cannot write the inventory database: "
            "file is not a database",
        ),
    ]
    if os.geteuid() != 0:  # root writes in a folder of mode 0500 all the same
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        cases.append(
            (str(read_only), f"{read_only}: cannot write in the folder: Permission denied")
        )
    return cases


def test_a_state_dir_that_cannot_be_written_stops_serve_with_one_line(tmp_path: Path) -> None:
    for state_dir, problem in unwritable_state_dirs(tmp_path):
        result = serve_until_exit("--state-dir", state_dir)
        assert result.returncode == 2, (state_dir, result)
        assert result.stderr == f"pop3proxy: --state-dir: {problem}\n", state_dir
        assert "listener.started" not in result.stdout


def test_the_default_state_dir_is_checked_too(tmp_path: Path) -> None:
    blocked = tmp_path / "data-home"
    blocked.write_text("a file where the data folder should be\n")
    result = serve_until_exit(XDG_DATA_HOME=str(blocked))
    assert result.returncode == 2, result
    assert result.stderr == (
        f"pop3proxy: --state-dir: {blocked}/pop3proxy: cannot create the folder: Not a directory\n"
    )


def test_a_missing_state_dir_is_created_private_at_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "state"
    proxy = ProxyProcess(
        tmp_path / "proxy.log",
        upstream_port=995,
        ca_file=None,
        extra_args=["--state-dir", str(state_dir)],
    )
    with proxy:
        # Before any session: the folder (0700) and a database that can be written.
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        database = state_dir / "inventory.sqlite3"
        with sqlite3.connect(database) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert {"clients", "users", "daily"} <= tables
    assert [p.name for p in state_dir.iterdir()] == ["inventory.sqlite3"]  # no probe left


def test_inventory_off_or_in_memory_needs_no_state_dir(tmp_path: Path) -> None:
    for args in (["--inventory", "off", "--state-dir", "/proc/nope"], ["--state-dir", ":memory:"]):
        proxy = ProxyProcess(
            tmp_path / "proxy.log", upstream_port=995, ca_file=None, extra_args=args
        )
        with proxy:
            assert proxy.running, args


def test_report_does_not_create_the_state_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "never-ran"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    result = subprocess.run(
        [sys.executable, "-m", "pop3proxy", "report", "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        cwd=REPO_ROOT,
        env=env,
        check=False,
    )
    assert result.returncode != 0, result
    assert "no inventory at" in result.stderr, result
    assert not state_dir.exists()


# --- unknown POP3PROXY_* environment variables: an error, like unknown TOML keys ---------------


@pytest.mark.parametrize(
    ("variable", "hint"),
    [
        ("POP3PROXY_IDLE_TIMOUT", " (did you mean POP3PROXY_IDLE_TIMEOUT?)"),
        ("POP3PROXY_UPSTREAM_CAFILE", " (did you mean POP3PROXY_UPSTREAM_CA_FILE?)"),
        ("POP3PROXY_CONFIG_FILE", " (did you mean POP3PROXY_CONFIG?)"),
        ("POP3PROXY_listen", " (did you mean POP3PROXY_LISTEN?)"),
        ("POP3PROXY_", ""),
        ("POP3PROXY_ZZZZZZZZZZZZZZZZZZZZZZ", ""),
    ],
)
def test_an_unknown_env_var_is_named_with_a_hint(variable: str, hint: str) -> None:
    error = load_error({}, {variable: "42"})
    assert str(error) == f"pop3proxy: {variable}: unknown environment variable{hint}"
    assert error.origin is Origin.ENV


def test_an_unknown_env_var_is_an_error_whatever_the_command_reads() -> None:
    for only in (None, ["admin", "config"], ["listen", "log_level", "log_format"]):
        with pytest.raises(ConfigError, match="POP3PROXY_IDLE_TIMOUT: unknown"):
            load_settings({}, {"POP3PROXY_IDLE_TIMOUT": "5"}, only=only)


def test_env_vars_of_settings_another_command_reads_are_known() -> None:
    """One environment serves several commands (``serve``, and ``healthcheck`` in the same
    container): a variable of a setting this command does not read is not a typo."""
    environ = {spec.env_var: "" for spec in SETTINGS}
    environ |= {"POP3PROXY_UPSTREAM": "mail.example.com", "POP3PROXY_STATE_DIR": "/var/lib/x"}
    environ |= {"POP3PROXY_IDLE_TIMEOUT": "5", "POP3PROXY_ADMIN": "127.0.0.1:9110"}
    settings = load_settings({}, environ, only=["admin"])
    assert settings.admin == Endpoint("127.0.0.1", 9110)
    assert settings.idle_timeout == 600.0  # known, but not read by this command


def test_env_vars_read_elsewhere_and_empty_unknown_ones_pass(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "idle_timeout = 7\n")
    environ = {
        "POP3PROXY_CONFIG": str(config),  # the config file, not a field of Settings
        "POP3PROXY_FUZZ_EXAMPLES": "5000",  # the test suite's fuzzing budget
        "POP3PROXY_IDLE_TIMOUT": "",  # empty counts as unset, for unknown names too
        "POP3PROXY": "x",  # not of the form POP3PROXY_NAME
        "XPOP3PROXY_IDLE_TIMOUT": "x",
    }
    assert load_settings({}, environ).idle_timeout == 7.0


def test_the_first_unknown_env_var_in_name_order_is_reported() -> None:
    error = load_error({}, {"POP3PROXY_ZETA": "1", "POP3PROXY_ALPHA": "1"})
    assert str(error).startswith("pop3proxy: POP3PROXY_ALPHA: ")


def run_until_exit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "pop3proxy", *args],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            cwd=REPO_ROOT,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{args} ran for {START_TIMEOUT} s: {exc.stdout!r} {exc.stderr!r}")


#: Each subcommand with arguments that would otherwise let it run (to a refused port).
COMMAND_LINES = {
    "serve": ["serve", "--upstream", "127.0.0.1:995", "--listen", "127.0.0.1:0", "--admin", "off"],
    "demo": ["demo", "--listen", "127.0.0.1:0"],
    "check": ["check", "--upstream", "127.0.0.1:995"],
    "report": ["report", "--state-dir", ":memory:"],
    "watch": ["watch", "--admin", "127.0.0.1:9"],
    "healthcheck": ["healthcheck", "--admin", "127.0.0.1:9"],
}


def test_command_lines_cover_every_command() -> None:
    from pop3proxy.cli import COMMANDS

    assert sorted(COMMAND_LINES) == sorted(c.name for c in COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
def test_every_command_exits_2_on_an_unknown_env_var(command: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POP3PROXY_")}
    env |= {"POP3PROXY_IDLE_TIMOUT": "5", "XDG_DATA_HOME": str(tmp_path)}
    result = run_until_exit(COMMAND_LINES[command], env)
    assert result.returncode == 2, result
    assert result.stderr == (
        "pop3proxy: POP3PROXY_IDLE_TIMOUT: unknown environment variable "
        "(did you mean POP3PROXY_IDLE_TIMEOUT?)\n"
    )
    assert result.stdout == ""
