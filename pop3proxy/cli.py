"""The ``pop3proxy`` command line: subcommands, their options, and exit statuses.

Each subcommand is one :class:`Command` entry in :data:`COMMANDS`: which settings it reads
(flags, env vars and ``--help`` come from :data:`pop3proxy.config.SETTINGS`), per-command
defaults, required settings, and the function that runs it.  Modules that do the work
(``logs``, ``server``, ``demo``) are imported inside those functions, so a usage or config error
never depends on them.

Exit statuses: 0 on success and on Ctrl-C, 1 when the proxy cannot start (e.g. the listen
address is in use), 2 on any usage or configuration error, which is reported as exactly one
line on stderr.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio

from pop3proxy import __version__
from pop3proxy.config import (
    CONFIG_FILE,
    SETTINGS,
    ConfigError,
    Endpoint,
    Setting,
    Settings,
    load_settings,
)

__all__ = [
    "COMMANDS",
    "Command",
    "Option",
    "UsageError",
    "build_parser",
    "main",
    "parse_command_line",
]

PROG = "pop3proxy"
EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2

DESCRIPTION = (
    "pop3proxy accepts plaintext POP3 clients and relays each session over implicit TLS, with "
    "the certificate chain and host name verified, to an upstream POP3S server. "
    "It logs every session and command as JSON lines on stdout and never logs a credential."
)

ENV_EPILOG = (
    "Each option can also be set by the environment variable shown with it. "
    "Flags override environment variables, which override the defaults."
)
CONFIG_EPILOG = (
    "Each option can also be set by the environment variable shown with it, or by a key with "
    "the setting's name in the TOML file given by --config, e.g. "
    'upstream = "mail.example.com:995" or connect_timeout = 10. Flags override environment '
    "variables, which override the file, which overrides the defaults."
)


class UsageError(Exception):
    """A command line argparse rejected; the message is one line."""


@dataclass(frozen=True, slots=True)
class Option:
    """A subcommand option that is not a setting (e.g. ``check --json``).

    ``flags`` and ``kwargs`` go to ``ArgumentParser.add_argument``; ``kwargs`` must include
    ``dest`` and ``help``. The parsed value reaches ``Command.run`` in its ``options`` mapping.
    """

    flags: tuple[str, ...]
    kwargs: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand.

    Attributes:
        name: as typed after ``pop3proxy``.
        summary: one line for ``pop3proxy --help``.
        description: the subcommand's own ``--help`` text.
        run: does the work with the settings and the values of ``options``; returns the
            exit status.
        settings: names of the settings it reads (``"config"`` for ``--config``); None for all.
        defaults: defaults that differ from the declared ones.
        required: settings that must be given.
        options: options of this command that are not settings.
    """

    name: str
    summary: str
    description: str
    run: Callable[[Settings, Mapping[str, Any]], int]
    settings: tuple[str, ...] | None = None
    defaults: Mapping[str, object] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()

    def specs(self) -> list[Setting]:
        """The settings this command reads, in declaration order (``--config`` last)."""
        table = [*SETTINGS, CONFIG_FILE]
        return [s for s in table if self.settings is None or s.name in self.settings]


# --------------------------------------------------------------------------------------------
# Subcommands.
# --------------------------------------------------------------------------------------------


#: Errors from binding the listener: the proxy cannot start, and a traceback would not help.
_BIND_ERRNOS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _run_trio(main: Callable[[Settings], Awaitable[None]], settings: Settings) -> int:
    """Configure logging, then ``trio.run(main, settings)``; Ctrl-C is a normal exit."""
    logs = importlib.import_module("pop3proxy.logs")
    logs.configure_logging(settings.log_level, settings.log_format)
    try:
        trio.run(main, settings)
    except BaseException as exc:
        leaves = _leaves(exc)
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return EXIT_OK
        if all(isinstance(leaf, OSError) and leaf.errno in _BIND_ERRNOS for leaf in leaves):
            first = leaves[0]
            assert isinstance(first, OSError)
            # The admin endpoint names its own address in the error; the POP3 listener does not.
            names_itself = str(first.strerror or "").startswith("admin endpoint")
            where = "" if names_itself else f" on {settings.listen}"
            print(_one_line(f"{PROG}: cannot listen{where}: {first}"), file=sys.stderr)
            return EXIT_START_FAILED
        raise
    return EXIT_OK


def run_serve(settings: Settings, options: Mapping[str, Any]) -> int:
    """``pop3proxy serve``: run the proxy until a signal drains it (SIGHUP reloads)."""
    if settings.inventory:  # a state dir that cannot be written is a configuration error
        inventory = importlib.import_module("pop3proxy.migration.inventory")
        try:
            inventory.prepare_state_dir(settings.state_dir)
        except ValueError as exc:
            print(_one_line(str(ConfigError("state_dir", str(exc)))), file=sys.stderr)
            return EXIT_USAGE
    app = importlib.import_module("pop3proxy.app")
    reload = options.get("reload_settings")
    return _run_trio(functools.partial(app.run, reload=reload), settings)


def run_demo(settings: Settings, options: Mapping[str, Any]) -> int:
    """``pop3proxy demo``: run an embedded demo upstream and the proxy in front of it."""
    demo = importlib.import_module("pop3proxy.demo")
    return _run_trio(demo.run_demo, settings)


def run_check(settings: Settings, options: Mapping[str, Any]) -> int:
    """``pop3proxy check``: the pre-flight test of the upstream (migration toolkit)."""
    check = importlib.import_module("pop3proxy.migration.check")
    status: int = check.main(settings, options)
    return status


def run_report(settings: Settings, options: Mapping[str, Any]) -> int:
    """``pop3proxy report``: migration progress from the inventory (migration toolkit)."""
    report = importlib.import_module("pop3proxy.migration.report")
    status: int = report.main(settings, options)
    return status


def _since_date(text: str) -> object:
    report = importlib.import_module("pop3proxy.migration.report")
    return report.parse_since(text)


# -- admin endpoint clients (issue 4) ------------------------------------------------------------


def run_watch(settings: Settings, options: Mapping[str, Any]) -> int:
    """``pop3proxy watch``: follow the live session events of a running proxy."""
    watch = importlib.import_module("pop3proxy.watch")
    status: int = watch.run_watch(
        settings.admin, as_json=bool(options.get("json")), token=settings.admin_credential
    )
    return status


def run_healthcheck(settings: Settings, options: Mapping[str, Any]) -> int:
    """``pop3proxy healthcheck``: exit 0 if ``/readyz`` answers 200, else 1."""
    healthcheck = importlib.import_module("pop3proxy.admin.healthcheck")
    if settings.admin is None or settings.admin.port == 0:
        print(f"{PROG} healthcheck: --admin: the admin endpoint is off", file=sys.stderr)
        return EXIT_START_FAILED
    status: int = healthcheck.check(
        settings.admin, token=settings.admin_credential, timeout=float(options["timeout"])
    )
    return status


# -- end of admin endpoint clients ----------------------------------------------------------------


COMMANDS: tuple[Command, ...] = (
    Command(
        name="serve",
        summary="run the proxy",
        description="Accept plaintext POP3 clients on --listen and relay each session over "
        "verified implicit TLS to --upstream, logging every command.",
        run=run_serve,
        required=("upstream",),
    ),
    Command(
        name="demo",
        summary="run a self-contained demo: a fake POP3S server and the proxy in front of it",
        description="Start an embedded demo POP3S upstream (with a throw-away CA) and the proxy "
        "in front of it on --listen, so you can point a POP3 client at it and watch the logs.",
        run=run_demo,
        settings=("listen", "log_level", "log_format"),
        defaults={"listen": Endpoint("127.0.0.1", 8110)},
    ),
    # -- migration toolkit (issue 5) ----------------------------------------------------------
    Command(
        name="check",
        summary="pre-flight test of the upstream: TLS chain, host name, expiry, greeting, login",
        description="Connect to --upstream the way the proxy does and report TCP time, TLS "
        "version and cipher, the certificate chain the server sends, whether it verifies "
        "(naming a missing issuer), the host name match, certificates expiring within 30 "
        "days, the SPKI pin, the greeting and CAPA, and optionally a login. Exit status 0: "
        "all good; 1: a check failed; 2: usage error.",
        run=run_check,
        settings=(
            "upstream",
            "upstream_ca_file",
            "upstream_server_name",
            "tls_min_version",
            "connect_timeout",
            "handshake_timeout",
            "config",
        ),
        required=("upstream",),
        options=(
            Option(
                ("--user",),
                {
                    "dest": "user",
                    "metavar": "USER",
                    "default": None,
                    "help": "also test a login as USER (needs --password-file)",
                },
            ),
            Option(
                ("--password-file",),
                {
                    "dest": "password_file",
                    "metavar": "FILE",
                    "default": None,
                    "help": "read the login test's password from FILE, or from standard input "
                    "for '-' (never give a password on the command line)",
                },
            ),
            Option(
                ("--json",),
                {"dest": "json", "action": "store_true", "help": "print JSON, not text"},
            ),
        ),
    ),
    Command(
        name="report",
        summary="migration progress: plaintext clients and users, their phase, totals per day",
        description="Read the client inventory in --state-dir and print who still uses "
        "plaintext POP3, when last seen, how they log in, their phase under the configured "
        "rules, and totals per day.",
        run=run_report,
        settings=(
            "state_dir",
            "rules",
            "dry_run",
            "user_pseudonym_key_file",
            "user_pseudonym_key",
            "config",
        ),
        options=(
            Option(
                ("--user",),
                {
                    "dest": "user",
                    "metavar": "NAME",
                    "default": None,
                    "help": "only user NAME and the clients that logged in or failed as NAME "
                    "(with a pseudonym key: as its pseudonym)",
                },
            ),
            Option(
                ("--format",),
                {
                    "dest": "format",
                    "choices": ("table", "csv", "json"),
                    "default": "table",
                    "help": "output format (default: table)",
                },
            ),
            Option(
                ("--since",),
                {
                    "dest": "since",
                    "metavar": "DATE",
                    "default": None,
                    "type": _since_date,
                    "help": "only clients and users seen on or after DATE (2026-03-01), and "
                    "totals from that day",
                },
            ),
        ),
    ),
    # -- admin endpoint clients (issue 4) ---------------------------------------------------------
    Command(
        name="watch",
        summary="follow a running proxy's sessions live (its /events feed)",
        description="Connect to the admin endpoint of a running proxy (--admin, as given to "
        "serve) and print its sessions as they open, log in, run commands and close. "
        "Reconnects with back-off when the proxy restarts; Ctrl-C stops.",
        run=run_watch,
        settings=("admin", "admin_token_file", "admin_token", "config"),
        options=(
            Option(
                ("--json",),
                {
                    "dest": "json",
                    "action": "store_true",
                    "help": "print the events as JSON lines, as received",
                },
            ),
        ),
    ),
    Command(
        name="healthcheck",
        summary="exit 0 if a running proxy is ready (its /readyz answers 200), else 1",
        description="Ask the admin endpoint of a running proxy (--admin, as given to serve) "
        "whether it is ready: its upstream accepts verified TLS and greets +OK. For a Docker "
        "HEALTHCHECK; needs no curl.",
        run=run_healthcheck,
        settings=("admin", "admin_token_file", "admin_token", "config"),
        options=(
            Option(
                ("--timeout",),
                {
                    "dest": "timeout",
                    "metavar": "SECONDS",
                    "type": float,
                    "default": 10.0,
                    "help": "seconds to wait for the answer (default: 10)",
                },
            ),
        ),
    ),
)


# --------------------------------------------------------------------------------------------
# Parsing.
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and no usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _help_text(spec: Setting, command: Command) -> str:
    if spec.name in command.required:
        default = "required"
    elif spec.name in command.defaults:
        default = "default: " + spec.describe_default(command.defaults[spec.name])
    elif spec is CONFIG_FILE:
        default = "default: none"
    else:
        default = "default: " + spec.describe_default()
    text = f"{spec.help} ({default}; env {spec.env_var})"
    return text.replace("%", "%%")  # argparse %-formats help strings


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser: one subparser per command, one option per setting it reads."""
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=f"Run '{PROG} COMMAND --help' for the options of a command.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(
        title="commands", dest="command", metavar="COMMAND", required=True
    )
    for command in commands:
        sub = subparsers.add_parser(
            command.name,
            help=command.summary,
            description=command.description,
            epilog=CONFIG_EPILOG if CONFIG_FILE in command.specs() else ENV_EPILOG,
            allow_abbrev=False,
        )
        for spec in command.specs():
            sub.add_argument(
                spec.flag,
                dest=spec.name,
                metavar=spec.metavar,
                default=argparse.SUPPRESS,  # absent flags stay absent: env/file may apply
                action="append" if spec.repeatable else "store",
                # A secret's refused flag is still parsed, to be refused with a message
                # that says what to use (argparse would echo it as "unrecognized").
                help=_help_text(spec, command) if spec.on_command_line else argparse.SUPPRESS,
            )
        for option in command.options:
            sub.add_argument(*option.flags, **option.kwargs)
        sub.set_defaults(_command=command)
    return parser


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


def parse_command_line(
    argv: Sequence[str] | None = None,
) -> tuple[Command, Settings, dict[str, Any]]:
    """The command named in ``argv``, its settings (flags > env > file > defaults) and options.

    Raises:
        UsageError: argparse rejected ``argv``.
        ConfigError: a setting is bad or missing.
        SystemExit: after ``--help`` or ``--version``.
    """
    namespace, extras = build_parser().parse_known_args(argv)
    args = vars(namespace)
    command = args.pop("_command")
    assert isinstance(command, Command)
    if extras:  # argparse would blame the top-level parser, and print its usage
        prog = f"{PROG} {command.name}"
        raise UsageError(
            f"{prog}: unrecognized arguments: {' '.join(extras)} (see '{prog} --help')"
        )
    del args["command"]
    options = {o.kwargs["dest"]: args.pop(o.kwargs["dest"]) for o in command.options}
    settings = load_settings(
        args,
        only=[spec.name for spec in command.specs()],
        defaults=command.defaults,
        required=command.required,
    )
    return command, settings, options


def main(argv: list[str] | None = None) -> int:
    """Run ``pop3proxy`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        command, settings, options = parse_command_line(argv)
    except (UsageError, ConfigError) as exc:
        print(_one_line(str(exc)), file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exc:  # after --help or --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    # SIGHUP re-reads the same flags, the environment and the config file.
    options["reload_settings"] = lambda: parse_command_line(argv)[1]
    return command.run(settings, options)
