"""Settings of pop3proxy, and how they are read.

Theory of operation: every setting is declared exactly once, as a field of :class:`Settings`
(name, type, default) whose metadata comes from :func:`setting` (parser, help text, metavar).
The table :data:`SETTINGS` is derived from those fields, and everything else comes from it:

- the command-line flag is ``--`` + the name with dashes (``--connect-timeout``);
- the environment variable is ``POP3PROXY_`` + the name in capitals (``POP3PROXY_CONNECT_TIMEOUT``);
- the TOML key is the name itself (``connect_timeout = 10``);
- ``--help`` shows the help text, the default and the environment variable.

So adding a setting is one new field.  Precedence is flags > environment > TOML file
(``--config FILE`` / ``POP3PROXY_CONFIG``) > defaults.  An empty environment variable counts as
unset; an unknown ``POP3PROXY_*`` one is an error, like an unknown key in the file.  A parser
receives the raw value (a string from a flag or the environment, or whatever type TOML
produced) and returns the typed value or raises ``ValueError`` with a short problem
description; :func:`load_settings` turns that into one :class:`ConfigError` whose one-line
message names the setting, where the value came from, the value and the problem.

Secrets are declared as such (``setting(..., secret=True)``): their value is never shown in
an error, and the secret itself (a key, a token) is read from the environment only
(``origins=ENV_ONLY``: a command line is visible to every local user, a config file to
whoever reads it), while a setting that names the file holding it may come from anywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pop3proxy.addresses import bracket_host
from pop3proxy.admin.auth import AdminToken, parse_admin_token, parse_admin_token_file
from pop3proxy.migration.pseudonym import (
    PseudonymKey,
    parse_pseudonym_key,
    parse_pseudonym_key_file,
)
from pop3proxy.migration.rules import Rule, parse_rules
from pop3proxy.policy import Network, parse_networks

__all__ = [
    "CONFIG_FILE",
    "SETTINGS",
    "ConfigError",
    "Endpoint",
    "Origin",
    "Setting",
    "Settings",
    "load_settings",
    "parse_endpoint",
    "setting",
]

ENV_PREFIX: Final = "POP3PROXY_"
DEFAULT_LISTEN_PORT: Final = 110  # RFC 1939 §3
DEFAULT_UPSTREAM_PORT: Final = 995  # RFC 8314 §7.3 (POP3 over implicit TLS)
TLS_VERSIONS: Final = ("1.2", "1.3")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "console", "auto")

_SPEC_KEY: Final = "pop3proxy.setting"


#: Who may speak plaintext to the proxy by default: loopback, RFC 1918 and RFC 4193 ranges.
DEFAULT_ALLOW: Final[tuple[Network, ...]] = tuple(
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


class ConfigError(Exception):
    """A setting has a bad value, or a required one is missing.

    Args:
        setting: the setting's name (``"upstream_ca_file"``, or ``"config"`` for the file
            itself); the message shows it as its flag.
        problem: what is wrong, without a trailing period.
        origin: where the bad value came from; ``None`` when it came from nowhere (missing).
        config_file: the TOML file, when ``origin`` is :attr:`Origin.FILE`.

    ``str(error)`` is one line, e.g. ``pop3proxy: --upstream-ca-file
    (POP3PROXY_UPSTREAM_CA_FILE): /x.pem: no such file``.
    """

    def __init__(
        self,
        setting: str,
        problem: str,
        *,
        origin: Origin | None = None,
        config_file: Path | None = None,
    ) -> None:
        self.setting = setting
        self.problem = problem
        self.origin = origin
        self.config_file = config_file
        super().__init__(f"pop3proxy: {self.label}: {problem}")

    @property
    def label(self) -> str:
        """The flag, plus the env var or file key when the value came from one."""
        return _label(self.setting, self.origin, self.config_file)


def _label(name: str, origin: Origin | None, config_file: Path | None) -> str:
    """How an error names a setting: see :attr:`ConfigError.label`.

    A setting read from the environment only has no flag: its env var names it.
    """
    flag = _flag_name(name)
    spec = _BY_NAME.get(name)
    if spec is not None and not spec.on_command_line and origin is not Origin.FLAG:
        return f"{name} in {config_file}" if origin is Origin.FILE else spec.env_var
    if origin is Origin.ENV:
        return f"{flag} ({_env_name(name)})"
    if origin is Origin.FILE:
        return f"{flag} ({name} in {config_file})"
    return flag


class Origin(enum.Enum):
    """Where a setting's value came from, highest precedence first."""

    FLAG = "flag"
    ENV = "environment"
    FILE = "config file"


#: Where most settings may come from.
EVERY_ORIGIN: Final = frozenset(Origin)
#: Where a secret itself may come from: not the command line (``ps`` and
#: ``/proc/PID/cmdline`` show it to every local user), not the config file (often readable
#: by many, checked in, or a ConfigMap).
ENV_ONLY: Final = frozenset({Origin.ENV})


# --------------------------------------------------------------------------------------------
# Value parsers.  Each takes the raw value and returns the typed value or raises ValueError.
# --------------------------------------------------------------------------------------------

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+\Z")


def _type_name(raw: object) -> str:
    """A TOML value's type with its article: ``an integer``."""
    names = {bool: "a boolean", int: "an integer", float: "a float", list: "an array"}
    return names.get(type(raw), "a table" if isinstance(raw, dict) else type(raw).__name__)


def _text(raw: object, expected: str) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError(f"expected {expected}, got {_type_name(raw)}")


def _host_problem(host: str) -> str | None:
    """Why ``host`` is not a host name or IP address literal, or None if it is one."""
    if not host:
        return "missing host"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if _DOTTED_NUMBERS.match(host):
        return "not a valid IPv4 address"
    if len(host) > 253 or not all(_HOST_LABEL.match(label) for label in host.split(".")):
        return "not a valid host name or IP address"
    return None


def parse_endpoint(text: str, *, default_port: int, allow_port_zero: bool = False) -> Endpoint:
    """Parse ``HOST[:PORT]``; IPv6 literals must be bracketed: ``[::1]:110``.

    Raises:
        ValueError: with a short description of the problem.
    """
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError("missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ValueError("not a valid IPv6 address between [ and ]") from None
        host = inside
        if rest and not rest.startswith(":"):
            raise ValueError("expected :PORT after ']'")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError("IPv6 addresses must be in brackets, e.g. [::1]:110")
    else:
        host, colon, port_text_or_empty = text.partition(":")
        port_text = port_text_or_empty if colon else None
        problem = _host_problem(host)
        if problem is not None:
            raise ValueError(problem)
    if port_text is None:
        return Endpoint(host, default_port)
    lowest = 0 if allow_port_zero else 1
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"the port must be a number from {lowest} to 65535")
    port = int(port_text)
    if not lowest <= port <= 65535:
        raise ValueError(f"port {port} is out of range ({lowest}-65535)")
    return Endpoint(host, port)


def _parse_listen(raw: object) -> Endpoint:
    text = _text(raw, "a string like HOST:PORT")
    return parse_endpoint(text, default_port=DEFAULT_LISTEN_PORT, allow_port_zero=True)


def _parse_upstream(raw: object) -> Endpoint:
    text = _text(raw, "a string like HOST:PORT")
    return parse_endpoint(text, default_port=DEFAULT_UPSTREAM_PORT)


def _parse_ca_file(raw: object) -> Path:
    path = Path(_text(raw, "a file name"))
    if not path.exists():
        raise ValueError("no such file")
    if path.is_dir():
        raise ValueError("is a directory, expected a PEM file")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror or exc}") from None
    # A bare context: create_default_context() would also load the system store and honour
    # SSLKEYLOGFILE, neither of which this check wants.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError:
        raise ValueError("no PEM certificate found") from None
    if context.cert_store_stats()["x509"] == 0:
        raise ValueError("no PEM certificate found")
    return path


def _parse_server_name(raw: object) -> str:
    name = _text(raw, "a host name")
    problem = _host_problem(name)
    if problem is not None:
        raise ValueError("must not be empty" if not name else problem)
    return name


def _parse_seconds(raw: object) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    else:
        text = _text(raw, "a number of seconds")
        try:
            value = float(text)
        except ValueError:
            raise ValueError("not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        text = _text(raw, "one of " + ", ".join(choices)).strip().lower()
        if text not in choices:
            raise ValueError("must be one of " + ", ".join(choices))
        return text

    return parse


def _parse_tls_version(raw: object) -> str:
    # TOML reads `tls_min_version = 1.2` as a float; accept that spelling too.
    return _choice(TLS_VERSIONS)(str(raw) if isinstance(raw, float) else raw)


def _parse_count(minimum: int) -> Callable[[object], int]:
    def parse(raw: object) -> int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        else:
            try:
                value = int(_text(raw, "a whole number"))
            except ValueError:
                raise ValueError("not a whole number") from None
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def _parse_seconds_or_off(raw: object) -> float | None:
    """Seconds, or 0 / ``off`` for no limit at all."""
    if isinstance(raw, str) and raw.strip().lower() in {"0", "off", "none"}:
        return None
    if isinstance(raw, int | float) and not isinstance(raw, bool) and raw == 0:
        return None
    return _parse_seconds(raw)


def _items(raw: object, what: str) -> list[str]:
    """A list setting's raw value: a flag list, a TOML array, or comma-separated text."""
    if isinstance(raw, str):
        parts = raw.split(",")
    elif isinstance(raw, list | tuple):
        parts = [piece for item in raw for piece in _text(item, what).split(",")]
    else:
        parts = _text(raw, what).split(",")  # raises the usual type error
    return [part.strip() for part in parts if part.strip()]


def _parse_networks(raw: object) -> tuple[Network, ...]:
    return parse_networks(_items(raw, "a network (CIDR)"))


def _parse_user_networks(raw: object) -> tuple[tuple[str, tuple[Network, ...]], ...]:
    """``GLOB=CIDR[,CIDR]`` items (flag, or ``;``-separated in the env), or a TOML table."""
    if isinstance(raw, dict):
        pairs = [(str(key), value) for key, value in raw.items()]
    else:
        texts = raw if isinstance(raw, list | tuple) else _text(raw, "GLOB=CIDR").split(";")
        pairs = []
        for text in texts:
            glob, sep, nets = _text(text, "GLOB=CIDR[,CIDR]").partition("=")
            if not sep or not glob.strip():
                raise ValueError(f"{text!r} is not GLOB=CIDR[,CIDR]")
            pairs.append((glob.strip(), nets))
    return tuple((glob, _parse_networks(nets)) for glob, nets in pairs)


def _parse_config_path(raw: object) -> Path:
    return Path(_text(raw, "a file name"))


# -- migration toolkit (issue 5) ---------------------------------------------------------------


def _parse_switch(raw: object) -> bool:
    """``true``/``false`` (TOML), or on/off, yes/no, 1/0 text."""
    if isinstance(raw, bool):
        return raw
    text = _text(raw, "true or false").strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false (on/off, yes/no)")


def _parse_state_dir(raw: object) -> Path:
    text = _text(raw, "a folder name or :memory:").strip()
    if not text:
        raise ValueError("must not be empty")
    path = Path(text)
    if text != ":memory:" and path.exists() and not path.is_dir():
        raise ValueError("exists and is not a folder")
    return path


# -- end of migration toolkit parsers ------------------------------------------------------------


# -- admin endpoint (issue 4) -------------------------------------------------------------------

DEFAULT_ADMIN_PORT: Final = 9110


def _parse_admin(raw: object) -> Endpoint | None:
    """``HOST:PORT`` (port 0 picks a free one), ``http://HOST:PORT``, or ``off``."""
    text = _text(raw, "a string like HOST:PORT, or off").strip()
    if text.lower() in {"off", "none", "no", "false"}:
        return None
    for scheme in ("http://", "ws://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :].rstrip("/")
            if "/" in text:
                raise ValueError("expected HOST:PORT, or http://HOST:PORT without a path")
            break
    return parse_endpoint(text, default_port=DEFAULT_ADMIN_PORT, allow_port_zero=True)


#: The admin token itself: from the environment only, never a flag (argv is visible to every
#: local user) and never echoed in an error.
ADMIN_TOKEN_ENV: Final = ENV_PREFIX + "ADMIN_TOKEN"


def _parse_host_names(raw: object) -> tuple[str, ...]:
    names = []
    for item in _items(raw, "a host name"):
        name = item.lower().removesuffix(".")
        problem = _host_problem(name)
        if problem is not None:
            raise ValueError(f"{item}: {problem}")
        names.append(name)
    return tuple(names)


def _parse_admin_token(raw: object) -> AdminToken:
    """The admin token itself (read from the environment only)."""
    text = _text(raw, "the token")
    return parse_admin_token(text.encode("utf-8", "surrogateescape"), "environment")


# -- end of admin endpoint parsers --------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# The declaration of a setting.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: name, parser, default, help; the flag and env var derive from the name."""

    name: str
    parse: Callable[[object], object]
    default: object
    help: str
    metavar: str
    default_text: str | None = None
    repeatable: bool = False
    secret: bool = False
    origins: frozenset[Origin] = EVERY_ORIGIN
    refused: str = ""
    excludes: str | None = None

    @property
    def on_command_line(self) -> bool:
        """Whether the flag is accepted (a secret's flag only exists to refuse it)."""
        return Origin.FLAG in self.origins

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--connect-timeout``."""
        return _flag_name(self.name)

    @property
    def env_var(self) -> str:
        """The environment variable, e.g. ``POP3PROXY_CONNECT_TIMEOUT``."""
        return _env_name(self.name)

    def describe_default(self, default: object = dataclasses.MISSING) -> str:
        """The default as shown in ``--help``."""
        if default is dataclasses.MISSING:
            default = self.default
            if self.default_text is not None:
                return self.default_text
        if default is None:
            return "none"
        if isinstance(default, float) and default.is_integer():
            return str(int(default))
        return str(default)


@dataclass(frozen=True, slots=True)
class _Declaration:
    parse: Callable[[object], object]
    help: str
    metavar: str
    default_text: str | None
    repeatable: bool
    secret: bool
    origins: frozenset[Origin]
    refused: str
    excludes: str | None


def _flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def setting(
    parse: Callable[[object], object],
    help: str,
    *,
    metavar: str,
    default_text: str | None = None,
    repeatable: bool = False,
    secret: bool = False,
    origins: frozenset[Origin] = EVERY_ORIGIN,
    refused: str = "",
    excludes: str | None = None,
) -> dict[str, object]:
    """The ``metadata`` that makes a :class:`Settings` field a setting.

    Use it as ``name: T = field(default=..., metadata=setting(parse, "help", metavar="M"))``.

    Args:
        parse: raw value (``str`` from flag/env, any TOML type from the file) -> typed value;
            raises ``ValueError(problem)``.
        help: one phrase for ``--help``, no trailing period.
        metavar: how the value is shown in ``--help``, e.g. ``HOST:PORT``.
        default_text: shown instead of ``str(default)`` in ``--help``.
        repeatable: the flag may be given several times; the parser then gets a list (from
            the environment it gets one string, which list parsers split at commas).
        secret: the value (a key, a token, or the name of the file holding one) never
            appears in an error message; the parser's problem text must not quote it either.
        origins: where the value may come from (:data:`ENV_ONLY` for a secret itself); a
            value from elsewhere is a configuration error, and ``--help`` hides a refused flag.
        refused: the problem shown for a value from a refused origin: what to use instead.
        excludes: another setting that must not be given as well (two ways to give one key).
    """
    declaration = _Declaration(
        parse, help, metavar, default_text, repeatable, secret, origins, refused, excludes
    )
    return {_SPEC_KEY: declaration}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host and TCP port; IPv6 literals are written ``[::1]:110``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{bracket_host(self.host)}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything ``pop3proxy serve`` needs, validated.

    Each field is a setting (see the module docstring): adding a field whose metadata comes
    from :func:`setting` adds its flag, env var, TOML key and ``--help`` entry.
    """

    listen: Endpoint = field(
        default=Endpoint("127.0.0.1", DEFAULT_LISTEN_PORT),
        metadata=setting(
            _parse_listen,
            "address for plaintext POP3 clients; port 0 picks a free port; port defaults to 110",
            metavar="HOST:PORT",
        ),
    )
    upstream: Endpoint | None = field(
        default=None,
        metadata=setting(
            _parse_upstream,
            "POP3S server (implicit TLS) to relay to; port defaults to 995",
            metavar="HOST:PORT",
        ),
    )
    upstream_ca_file: Path | None = field(
        default=None,
        metadata=setting(
            _parse_ca_file,
            "PEM file of the CA certificates the upstream certificate must chain to, "
            "used instead of the system trust store",
            metavar="FILE",
            default_text="the system trust store",
        ),
    )
    upstream_server_name: str | None = field(
        default=None,
        metadata=setting(
            _parse_server_name,
            "name the upstream certificate must match (also sent as SNI)",
            metavar="NAME",
            default_text="the upstream host",
        ),
    )
    tls_min_version: str = field(
        default="1.2",
        metadata=setting(_parse_tls_version, "lowest TLS version accepted", metavar="{1.2,1.3}"),
    )
    connect_timeout: float = field(
        default=10.0,
        metadata=setting(_parse_seconds, "seconds to connect to upstream", metavar="SECONDS"),
    )
    handshake_timeout: float = field(
        default=10.0,
        metadata=setting(_parse_seconds, "seconds for the TLS handshake", metavar="SECONDS"),
    )
    greeting_timeout: float = field(
        default=30.0,
        metadata=setting(
            _parse_seconds,
            "seconds the upstream may take to send its greeting once TLS is up",
            metavar="SECONDS",
        ),
    )
    idle_timeout: float = field(
        default=600.0,
        metadata=setting(
            _parse_seconds,
            "seconds a session may stay silent in either direction before it is closed "
            "(RFC 1939 asks for at least 600)",
            metavar="SECONDS",
        ),
    )
    command_timeout: float = field(
        default=60.0,
        metadata=setting(
            _parse_seconds,
            "seconds a client may take from the first octet of a command line to its end "
            "(slowloris); the session is closed with -ERR [SYS/TEMP]",
            metavar="SECONDS",
        ),
    )
    login_timeout: float = field(
        default=60.0,
        metadata=setting(
            _parse_seconds,
            "seconds from accepting a client to its successful login; the session is closed "
            "with -ERR [SYS/TEMP]",
            metavar="SECONDS",
        ),
    )
    session_timeout: float | None = field(
        default=None,
        metadata=setting(
            _parse_seconds_or_off,
            "longest a session may last in all, or 0 for no limit",
            metavar="SECONDS",
            default_text="no limit",
        ),
    )
    close_timeout: float = field(
        default=10.0,
        metadata=setting(
            _parse_seconds,
            "seconds to wait for outstanding replies after the client half-closes, and for "
            "a polite TLS close",
            metavar="SECONDS",
        ),
    )
    drain_timeout: float = field(
        default=30.0,
        metadata=setting(
            _parse_seconds,
            "on SIGTERM/SIGINT, seconds open sessions may take to finish before they are closed",
            metavar="SECONDS",
        ),
    )
    allow: tuple[Network, ...] = field(
        default=DEFAULT_ALLOW,
        metadata=setting(
            _parse_networks,
            "network allowed to use the plaintext listener; repeat or comma-separate; "
            "others get -ERR [SYS/PERM]",
            metavar="CIDR",
            default_text="loopback, RFC 1918 and RFC 4193 (fc00::/7) networks",
            repeatable=True,
        ),
    )
    user_networks: tuple[tuple[str, tuple[Network, ...]], ...] = field(
        default=(),
        metadata=setting(
            _parse_user_networks,
            "bind user names to networks: GLOB=CIDR[,CIDR] (repeat; ';' between items in the "
            "env; a table in TOML); a matching user logging in from elsewhere gets -ERR [AUTH]",
            metavar="GLOB=CIDR",
            default_text="none",
            repeatable=True,
        ),
    )
    max_sessions: int = field(
        default=1000,
        metadata=setting(_parse_count(1), "most concurrent sessions in all", metavar="N"),
    )
    max_sessions_per_client: int = field(
        default=50,
        metadata=setting(
            _parse_count(1), "most concurrent sessions from one client address", metavar="N"
        ),
    )
    max_command_line: int = field(
        default=255,
        metadata=setting(
            _parse_count(16),
            "longest client command line in octets with CRLF (RFC 2449 section 4: 255)",
            metavar="OCTETS",
        ),
    )
    max_auth_line: int = field(
        default=8192,
        metadata=setting(
            _parse_count(255),
            "longest AUTH command or SASL response line in octets (XOAUTH2 tokens are long)",
            metavar="OCTETS",
        ),
    )
    max_pipelined: int = field(
        default=100,
        metadata=setting(
            _parse_count(1),
            "most commands a client may send ahead of their replies (RFC 2449 PIPELINING)",
            metavar="N",
        ),
    )
    max_login_failures: int = field(
        default=3,
        metadata=setting(
            _parse_count(1),
            "failed logins after which a session is closed with -ERR [AUTH]",
            metavar="N",
        ),
    )
    client_login_failures: int = field(
        default=10,
        metadata=setting(
            _parse_count(1),
            "failed logins from one client address within --login-failure-window after which "
            "its logins are refused with -ERR [SYS/TEMP]",
            metavar="N",
        ),
    )
    login_failure_delay: float | None = field(
        default=8.0,
        metadata=setting(
            _parse_seconds_or_off,
            "longest delay before a failed-login reply once a client address keeps failing "
            "(doubling from 1 s after the second failure); 0 for none",
            metavar="SECONDS",
        ),
    )
    login_failure_window: float = field(
        default=600.0,
        metadata=setting(
            _parse_seconds,
            "seconds over which failed logins of a client address are counted",
            metavar="SECONDS",
        ),
    )
    log_level: str = field(
        default="info",
        metadata=setting(
            _choice(LOG_LEVELS), "lowest level logged", metavar="{debug,info,warning,error}"
        ),
    )
    log_format: str = field(
        default="auto",
        metadata=setting(
            _choice(LOG_FORMATS),
            "JSON lines, human-readable console, or auto (console if stdout is a terminal)",
            metavar="{json,console,auto}",
        ),
    )
    # -- migration toolkit (issue 5): inventory, pseudonyms, enforcement phases ----------------
    state_dir: Path | None = field(
        default=None,
        metadata=setting(
            _parse_state_dir,
            "folder for the client inventory (inventory.sqlite3), or :memory: to keep it in "
            "memory only",
            metavar="DIR",
            default_text="$XDG_DATA_HOME/pop3proxy, else ~/.local/share/pop3proxy",
        ),
    )
    inventory: bool = field(
        default=True,
        metadata=setting(
            _parse_switch,
            "record plaintext clients and users (first/last seen, logins, mechanisms, bytes) "
            "in the inventory",
            metavar="{on,off}",
            default_text="on",
        ),
    )
    inventory_flush_interval: float = field(
        default=10.0,
        metadata=setting(
            _parse_seconds,
            "seconds between inventory writes (also written after 1000 events)",
            metavar="SECONDS",
        ),
    )
    user_pseudonym_key_file: PseudonymKey | None = field(
        default=None,
        metadata=setting(
            parse_pseudonym_key_file,
            "file holding the secret key (16 to 4096 octets, e.g. from 'openssl rand -hex 32') "
            "for HMAC-SHA256 pseudonyms of user names in the log, the live feed and the "
            "inventory; a missing, empty or unreadable file stops the proxy; or give the key "
            "itself in the environment variable POP3PROXY_USER_PSEUDONYM_KEY",
            metavar="FILE",
            default_text="none: user names in clear",
            secret=True,
        ),
    )
    user_pseudonym_key: PseudonymKey | None = field(
        default=None,
        metadata=setting(
            parse_pseudonym_key,
            "the pseudonym key itself, from the environment only",
            metavar="KEY",
            default_text="none",
            secret=True,
            origins=ENV_ONLY,
            refused="the key itself is read only from the environment variable "
            "POP3PROXY_USER_PSEUDONYM_KEY (a command line is visible to every local user, a "
            "config file to whoever reads it); or put it in a file and give "
            "--user-pseudonym-key-file FILE",
            excludes="user_pseudonym_key_file",
        ),
    )
    rules: tuple[Rule, ...] = field(
        default=(),
        metadata=setting(
            parse_rules,
            "enforcement phase rule, e.g. 'phase=deny from=2027-03-01 networks=10.0.0.0/8 "
            "users=*@example.com'; repeat (';' between rules in the env; [[rules]] tables in "
            "TOML); the first rule in force that matches decides; SIGHUP reloads",
            metavar="RULE",
            default_text="none: every client allowed",
            repeatable=True,
        ),
    )
    dry_run: bool = field(
        default=False,
        metadata=setting(
            _parse_switch,
            "deny rules only log and count what they would refuse",
            metavar="{on,off}",
            default_text="off",
        ),
    )
    # -- end of migration toolkit settings ----------------------------------------------------

    # -- admin endpoint (issue 4) ------------------------------------------------------------
    admin: Endpoint | None = field(
        default=Endpoint("127.0.0.1", DEFAULT_ADMIN_PORT),
        metadata=setting(
            _parse_admin,
            "address of the admin HTTP endpoint (/healthz, /readyz, /metrics, /events and the "
            "dashboard); port 0 picks a free port; off switches it off",
            metavar="HOST:PORT",
            default_text="127.0.0.1:9110; if that port is taken: a warning, no endpoint",
        ),
    )
    admin_token_file: AdminToken | None = field(
        default=None,
        metadata=setting(
            parse_admin_token_file,
            "file holding the bearer token that /metrics, /events, /api/* and the dashboard "
            "then require (16 to 1024 printable characters; or the token itself in "
            f"{ADMIN_TOKEN_ENV}, never on the command line); SIGHUP re-reads it",
            metavar="FILE",
            default_text="none: no token asked for (a warning if --admin is not loopback)",
            secret=True,
        ),
    )
    admin_token: AdminToken | None = field(
        default=None,
        metadata=setting(
            _parse_admin_token,
            "the admin token itself, from the environment only",
            metavar="TOKEN",
            default_text="none",
            secret=True,
            origins=ENV_ONLY,
            refused=f"the token itself is read only from the environment variable "
            f"{ADMIN_TOKEN_ENV} (a command line is visible to every local user, a config file "
            "to whoever reads it); or put it in a file and give --admin-token-file FILE",
            excludes="admin_token_file",
        ),
    )
    admin_host_names: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            _parse_host_names,
            "host names by which browsers and scrapers may reach the admin endpoint, besides "
            "IP addresses, localhost and the --admin host; a request by another name gets 421 "
            "unless it carries the token (DNS rebinding); repeat or comma-separate",
            metavar="NAME",
            default_text="none",
            repeatable=True,
        ),
    )
    readiness_cache: float = field(
        default=5.0,
        metadata=setting(
            _parse_seconds,
            "seconds a /readyz answer is reused before the upstream is probed again",
            metavar="SECONDS",
        ),
    )
    # -- end of admin endpoint settings ---------------------------------------------------------

    @property
    def tls_server_name(self) -> str:
        """The name the upstream certificate must match: never empty (no skipped check)."""
        if self.upstream_server_name:
            return self.upstream_server_name
        if self.upstream is None:
            raise ValueError("no upstream configured")
        return self.upstream.host

    @property
    def pseudonym_key(self) -> PseudonymKey | None:
        """The key for user-name pseudonyms, from its file or the environment; None: none."""
        return self.user_pseudonym_key_file or self.user_pseudonym_key

    @property
    def admin_credential(self) -> AdminToken | None:
        """The token the admin endpoint asks for, from its file or the environment; None: none."""
        return self.admin_token_file or self.admin_token

    @property
    def minimum_tls_version(self) -> ssl.TLSVersion:
        """:attr:`tls_min_version` as the value for ``ssl.SSLContext.minimum_version``."""
        return ssl.TLSVersion.TLSv1_3 if self.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2


def _table() -> tuple[Setting, ...]:
    table = []
    for f in dataclasses.fields(Settings):
        declaration = f.metadata[_SPEC_KEY]
        assert isinstance(declaration, _Declaration)
        table.append(
            Setting(
                name=f.name,
                parse=declaration.parse,
                default=f.default,
                help=declaration.help,
                metavar=declaration.metavar,
                default_text=declaration.default_text,
                repeatable=declaration.repeatable,
                secret=declaration.secret,
                origins=declaration.origins,
                refused=declaration.refused,
                excludes=declaration.excludes,
            )
        )
    return tuple(table)


#: Every field of :class:`Settings`, in declaration order.
SETTINGS: Final[tuple[Setting, ...]] = _table()

#: ``--config FILE`` / ``POP3PROXY_CONFIG``: where to read the TOML file.  Not a field of
#: :class:`Settings` (and not a valid key inside the file), but read like one.
CONFIG_FILE: Final = Setting(
    name="config",
    parse=_parse_config_path,
    default=None,
    help="TOML file of settings (keys are the setting names with underscores, "
    'e.g. upstream = "mail.example.com:995"); flags and env vars override it',
    metavar="FILE",
)

_BY_NAME: Final = {spec.name: spec for spec in SETTINGS}


# --------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------


def _show(raw: object) -> str:
    """The raw value for an error message: as typed if plain, quoted if it could mislead."""
    if isinstance(raw, str):
        if raw and raw.isprintable() and raw.strip() == raw:
            return raw
        return repr(raw)
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return repr(raw)


def _read_config_file(path: Path, origin: Origin) -> dict[str, object]:
    def error(problem: str) -> ConfigError:
        return ConfigError(CONFIG_FILE.name, f"{path}: {problem}", origin=origin)

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise error("no such file") from None
    except IsADirectoryError:
        raise error("is a directory, expected a TOML file") from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error("not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"invalid TOML: {exc}") from None
    for key in data:
        if key not in _BY_NAME:
            close = difflib.get_close_matches(key, _BY_NAME, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise error(f'unknown key "{key}"{hint}')
    return data


#: ``POP3PROXY_*`` variables that are not settings but are read elsewhere: the test suite's
#: number of fuzz examples (``tests/pop3/test_fuzz.py``).
_OTHER_ENV_VARS: Final = frozenset({"POP3PROXY_FUZZ_EXAMPLES"})


class _UnknownEnvironmentVariable(ConfigError):
    """A ``POP3PROXY_*`` variable that no setting reads: a typo, like an unknown TOML key."""

    def __init__(self, variable: str, known: Collection[str]) -> None:
        self.variable = variable
        # Compared without the shared prefix (which would make every name look close).
        names = {name.removeprefix(ENV_PREFIX): name for name in known}
        typed = variable.removeprefix(ENV_PREFIX).upper()
        close = difflib.get_close_matches(typed, names, n=1) if typed else []
        hint = f" (did you mean {names[close[0]]}?)" if close else ""
        super().__init__("environment", f"unknown environment variable{hint}", origin=Origin.ENV)

    @property
    def label(self) -> str:
        return self.variable


def _check_environment(environ: Mapping[str, str]) -> None:
    """Every non-empty ``POP3PROXY_*`` variable must be one that pop3proxy reads.

    Whichever settings the command reads (``only``): the variables of the others are known
    all the same, since one environment usually serves several commands (``serve`` and the
    ``healthcheck`` of the same container). An empty one counts as unset, as for settings.
    """
    known = {spec.env_var for spec in (*SETTINGS, CONFIG_FILE)} | _OTHER_ENV_VARS
    for variable in sorted(environ):
        if variable.startswith(ENV_PREFIX) and variable not in known and environ[variable]:
            raise _UnknownEnvironmentVariable(variable, sorted(known - _OTHER_ENV_VARS))


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    only: Collection[str] | None = None,
    defaults: Mapping[str, object] | None = None,
    required: Collection[str] = (),
) -> Settings:
    """Build :class:`Settings` from flags > environment > TOML file > defaults.

    Args:
        flags: raw values given on the command line, by setting name (``"config"`` for the
            file); absent names were not given.
        environ: the environment; ``os.environ`` if None.
        only: the setting names this command reads (may include ``"config"``); None means all
            settings and the config file.  Other settings keep their defaults.
        defaults: per-command defaults that replace the declared ones.
        required: setting names that must end up with a value other than None.

    Raises:
        ConfigError: for the first bad or missing value, or a ``POP3PROXY_*`` environment
            variable that no setting reads (a typo would silently keep the default).
    """
    flags = flags or {}
    environ = os.environ if environ is None else environ
    defaults = defaults or {}
    _check_environment(environ)

    def wanted(name: str) -> bool:
        return only is None or name in only

    def raw_value(spec: Setting) -> tuple[object, Origin] | None:
        if spec.name in flags:
            return flags[spec.name], Origin.FLAG
        if environ.get(spec.env_var):
            return environ[spec.env_var], Origin.ENV
        return None

    file_values: dict[str, object] = {}
    config_path: Path | None = None
    if wanted(CONFIG_FILE.name):
        found = raw_value(CONFIG_FILE)
        if found is not None:
            raw, origin = found
            try:
                config_path = _parse_config_path(raw)
            except ValueError as exc:
                raise ConfigError(CONFIG_FILE.name, f"{_show(raw)}: {exc}", origin=origin) from None
            file_values = _read_config_file(config_path, origin)

    values: dict[str, Any] = {}  # checked by each setting's parser
    origins: dict[str, Origin] = {}
    for spec in SETTINGS:
        if not wanted(spec.name):
            continue
        found = raw_value(spec)
        if found is None and spec.name in file_values:
            found = file_values[spec.name], Origin.FILE
        if found is None:
            value = defaults.get(spec.name, spec.default)
        else:
            raw, origin = found
            origins[spec.name] = origin
            value = _parse_value(spec, raw, origin, config_path)
        if value is None and spec.name in required:
            raise ConfigError(
                spec.name,
                f"required; give {spec.flag} {spec.metavar}, set {spec.env_var}, "
                f"or set {spec.name} in the config file",
            )
        values[spec.name] = value
    _check_exclusions(origins, config_path)
    return dataclasses.replace(Settings(), **values)


def _parse_value(spec: Setting, raw: object, origin: Origin, config_path: Path | None) -> object:
    """``spec.parse(raw)``, or the one-line :class:`ConfigError` (never echoing a secret)."""
    if origin not in spec.origins:
        problem = spec.refused or f"not accepted from the {origin.value}"
        raise ConfigError(spec.name, problem, origin=origin, config_file=config_path)
    try:
        return spec.parse(raw)
    except ValueError as exc:
        shown = "" if spec.secret else f"{_show(raw)}: "
        raise ConfigError(
            spec.name, f"{shown}{exc}", origin=origin, config_file=config_path
        ) from None


def _check_exclusions(origins: Mapping[str, Origin], config_path: Path | None) -> None:
    """Two settings that give the same thing (a key, or its file) must not both be given."""
    for spec in SETTINGS:
        other = spec.excludes
        if other is not None and spec.name in origins and other in origins:
            raise ConfigError(
                spec.name,
                f"give it one way only, not also as {_label(other, origins[other], config_path)}",
                origin=origins[spec.name],
                config_file=config_path,
            )
