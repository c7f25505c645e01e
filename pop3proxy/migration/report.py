"""``pop3proxy report``: the migration progress, read from the inventory.

It lists the client addresses and user names still seen on the plaintext listener, when
each was last seen, how it logs in (mechanisms and client fingerprints), and its phase
under the configured rules (with any stricter phase already scheduled), then totals per
day: distinct clients, distinct users and sessions. ``--since DATE`` leaves out what was
last seen before that day. Formats: an aligned ``table`` for people, ``csv`` (one row per
client, user or day, told apart by the ``kind`` column) and ``json`` for tools.
:func:`collect` returns the same data as plain dicts, for the admin dashboard. ``--user
NAME`` shows that user's row and the clients that logged in or failed as that name; with a
pseudonym key configured it looks for the name's pseudonym.

Names, and most other text here, came from POP3 clients. The table escapes control
characters (a name cannot drive the terminal); the CSV also follows OWASP's guidance on
CSV injection: every cell is quoted, and a text cell that begins with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return is prefixed with ``'``, so a spreadsheet shows
``=HYPERLINK(...)`` as text instead of evaluating it. JSON needs neither (``json.dumps``
escapes control characters; a JSON reader does not evaluate formulas).

The database is opened read-only, so a report never disturbs the running proxy.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import ipaddress
import json
import re
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pop3proxy.migration.inventory import database_path
from pop3proxy.migration.pseudonym import Pseudonymizer
from pop3proxy.migration.rules import RuleSet
from pop3proxy.terminal import printable

if TYPE_CHECKING:
    from pop3proxy.config import Settings

__all__ = ["FORMATS", "ReportError", "collect", "main", "parse_since", "render"]

FORMATS: Final = ("table", "csv", "json")
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
_PSEUDONYM = re.compile(r"u-[0-9a-f]{24}\Z")
#: What makes a spreadsheet read a cell as a formula (OWASP, "CSV Injection"), and the NUL
#: that ASVS 1.2.10 adds.
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r", "\0")

CSV_COLUMNS: Final = (
    "kind",
    "name",
    "first_seen",
    "last_seen",
    "sessions",
    "logins_ok",
    "logins_failed",
    "bytes_from_client",
    "bytes_to_client",
    "warned",
    "denied",
    "would_deny",
    "mechanisms",
    "fingerprints",
    "failed_names",
    "last_peer",
    "phase",
    "rule",
    "upcoming",
    "last_action",
    "clients",
    "users",
)


class ReportError(Exception):
    """The inventory cannot be read; the message is one line."""


def parse_since(text: str) -> dt.date:
    """``--since`` as a date (``2026-03-01``); argparse shows the error."""
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-03-01") from None


def _open(path: str) -> sqlite3.Connection:
    if path == ":memory:":
        raise ReportError(
            "the inventory is kept in memory only (--state-dir :memory:): nothing to report"
        )
    file = Path(path)
    if not file.is_file():
        raise ReportError(
            f"no inventory at {file}: has the proxy run with this --state-dir and --inventory on?"
        )
    try:
        connection = sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True, timeout=5.0)
        connection.row_factory = sqlite3.Row
        connection.execute("SELECT 1 FROM clients LIMIT 1").fetchall()
    except sqlite3.Error as exc:
        raise ReportError(f"cannot read the inventory {file}: {exc}") from None
    return connection


def _concerns(
    kind: str, name: str, row: sqlite3.Row, failed: list[tuple[str, int]], wanted: str
) -> bool:
    """Whether a row belongs in ``report --user``: the user's own, or a client it used."""
    if kind == "user":
        return name == wanted
    return row["last_peer"] == wanted or any(user == wanted for user, _ in failed)


def _ip(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(str(text))
    except ValueError:
        return None


def _details(connection: sqlite3.Connection, kind: str) -> tuple[dict[str, str], dict[str, str]]:
    mechanisms: dict[str, list[str]] = {}
    for row in connection.execute(
        "SELECT key, mechanism, uses FROM mechanisms WHERE kind = ? ORDER BY uses DESC, mechanism",
        (kind,),
    ):
        mechanisms.setdefault(row["key"], []).append(row["mechanism"])
    fingerprints: dict[str, list[str]] = {}
    for row in connection.execute(
        "SELECT key, fingerprint, sessions FROM fingerprints WHERE kind = ? "
        "ORDER BY sessions DESC, fingerprint",
        (kind,),
    ):
        fingerprints.setdefault(row["key"], []).append(f"{row['fingerprint']} ({row['sessions']})")
    return (
        {key: ",".join(values) for key, values in mechanisms.items()},
        {key: "; ".join(values) for key, values in fingerprints.items()},
    )


def _failed_names(connection: sqlite3.Connection) -> dict[str, list[tuple[str, int]]]:
    """Per client address, the names that did not log in from it, most recent first."""
    exists = connection.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'failed_names'"
    ).fetchone()
    if exists is None:  # an inventory written before the table existed
        return {}
    names: dict[str, list[tuple[str, int]]] = {}
    for row in connection.execute(
        "SELECT address, user, attempts FROM failed_names ORDER BY rowid DESC"
    ):
        names.setdefault(row["address"], []).append((row["user"], row["attempts"]))
    return names


def collect(
    path: str,
    rules: RuleSet,
    *,
    since: dt.date | None = None,
    now: dt.datetime | None = None,
    user: str | None = None,
    pseudonymizer: Pseudonymizer | None = None,
) -> dict[str, Any]:
    """The report's data: ``clients``, ``users``, ``totals`` (per day) and ``summary``.

    With ``user``: only that user's row, and the clients whose last user it is or that
    failed to log in as it (under ``pseudonymizer``, the rows of its pseudonym).

    Raises:
        ReportError: no readable inventory at ``path``.
    """
    now = now or dt.datetime.now(dt.UTC)
    floor = since.isoformat() if since else ""
    wanted = None if user is None else pseudonymizer.pseudonym(user) if pseudonymizer else user
    connection = _open(path)
    try:
        failed = _failed_names(connection)
        sections: dict[str, list[dict[str, Any]]] = {}
        for table, column, kind in (("clients", "address", "client"), ("users", "user", "user")):
            mechanisms, fingerprints = _details(connection, kind)
            rows = []
            query = (
                f"SELECT * FROM {table} WHERE last_seen >= ? "  # noqa: S608 - fixed names
                f"ORDER BY last_seen DESC, {column}"
            )
            for row in connection.execute(query, (floor,)):
                name = row[column]
                names = failed.get(name, []) if kind == "client" else []
                if wanted is not None and not _concerns(kind, name, row, names, wanted):
                    continue
                if kind == "client":
                    where = rules.classify(_ip(name), None, now)
                else:
                    # The name itself when known (--user); a pseudonym matches no user rule.
                    real = user or (None if _PSEUDONYM.match(name) else name)
                    where = rules.classify(_ip(row["last_peer"]), real, now)
                item = {key: row[key] for key in row.keys()}  # noqa: SIM118 - sqlite3.Row
                item.pop(column)
                rows.append(
                    {
                        "name": name,
                        **item,
                        "mechanisms": mechanisms.get(name, ""),
                        "fingerprints": fingerprints.get(name, ""),
                        "failed_names": "; ".join(f"{n} ({a})" for n, a in names),
                        "phase": where.phase + (" (dry run)" if where.dry_run else ""),
                        "rule": where.rule,
                        "upcoming": where.upcoming,
                    }
                )
            sections[table] = rows
        totals = [
            {
                "day": row["day"],
                "clients": row["clients"],
                "users": row["users"],
                "sessions": row["sessions"],
            }
            for row in connection.execute(
                "SELECT day, "
                "sum(kind = 'client') AS clients, "
                "sum(kind = 'user') AS users, "
                "sum(CASE WHEN kind = 'client' THEN sessions ELSE 0 END) AS sessions "
                "FROM daily WHERE day >= ? GROUP BY day ORDER BY day",
                (floor[:10],),
            )
        ]
    except sqlite3.Error as exc:
        raise ReportError(f"cannot read the inventory {path}: {exc}") from None
    finally:
        connection.close()
    phases: dict[str, int] = {}
    for row in sections["clients"]:
        phases[row["phase"]] = phases.get(row["phase"], 0) + 1
    return {
        "generated": now.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "database": path,
        "since": since.isoformat() if since else None,
        "user": wanted,
        "rules": [f"{rule.name}: {rule.describe()}" for rule in rules.rules],
        "summary": {
            "clients": len(sections["clients"]),
            "users": len(sections["users"]),
            "sessions": sum(row["sessions"] for row in sections["clients"]),
            "clients_by_phase": phases,
        },
        "clients": sections["clients"],
        "users": sections["users"],
        "totals": totals,
    }


# --------------------------------------------------------------------------------------------
# Rendering.
# --------------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[("" if v is None else printable(str(v))) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return lines


def _phase_text(row: Mapping[str, Any]) -> str:
    text = str(row["phase"])
    if row.get("upcoming"):
        text += f", {row['upcoming']}"
    return text


def _people(
    rows: Sequence[Mapping[str, Any]], name: str, peer: str, *, failed_names: bool = False
) -> list[str]:
    headers = [name, "LAST SEEN", "FIRST SEEN", "SESSIONS", "LOGINS OK/FAILED", "MECHANISMS"]
    headers += ["FINGERPRINTS", peer, "PHASE", "RULE"]
    if failed_names:
        headers.append("FAILED AS")
    return _table(
        headers,
        [
            (
                r["name"],
                r["last_seen"],
                r["first_seen"],
                r["sessions"],
                f"{r['logins_ok']}/{r['logins_failed']}",
                r["mechanisms"],
                r["fingerprints"],
                r["last_peer"],
                _phase_text(r),
                r["rule"],
                *([r["failed_names"]] if failed_names else []),
            )
            for r in rows
        ],
    )


def _render_table(data: Mapping[str, Any]) -> str:
    summary = data["summary"]
    since = f" since {data['since']}" if data["since"] else ""
    user = f" of user {data['user']}" if data.get("user") else ""
    lines = [
        printable(
            f"Plaintext POP3 clients{user}{since}: {summary['clients']} addresses, "
            f"{summary['users']} users, {summary['sessions']} sessions (inventory "
            f"{data['database']}, {data['generated']})"
        ),
        "",
        "Clients still on plaintext:",
    ]
    lines += _people(data["clients"], "ADDRESS", "LAST USER", failed_names=True)
    lines += ["", "Users still on plaintext:"]
    lines += _people(data["users"], "USER", "LAST ADDRESS")
    lines += ["", "Totals per day:"]
    lines += _table(
        ("DAY", "CLIENTS", "USERS", "SESSIONS"),
        [(t["day"], t["clients"], t["users"], t["sessions"]) for t in data["totals"]],
    )
    if data["rules"]:
        lines += ["", "Rules:", *(f"  {printable(rule)}" for rule in data["rules"])]
    return "\n".join(lines) + "\n"


def csv_cell(value: object) -> object:
    """One CSV cell that no spreadsheet evaluates and no terminal acts on.

    Text has its control characters escaped (as in the table), then, if it begins like a
    formula (OWASP: ``=``, ``+``, ``-``, ``@``, tab, carriage return), a ``'`` in front:
    ``=HYPERLINK("http://x")`` becomes ``'=HYPERLINK("http://x")``, which a spreadsheet
    shows as it is. Numbers stay numbers.
    """
    if not isinstance(value, str):
        return value
    text = printable(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _render_csv(data: Mapping[str, Any]) -> str:
    out = io.StringIO()
    # Every cell quoted (OWASP): a ';' or ',' inside a name cannot start a new cell in a
    # spreadsheet that splits at another separator than this writer does.
    writer = csv.DictWriter(
        out,
        fieldnames=CSV_COLUMNS,
        extrasaction="ignore",
        lineterminator="\n",
        quoting=csv.QUOTE_ALL,
    )
    writer.writeheader()

    def write(row: Mapping[str, object]) -> None:
        writer.writerow({column: csv_cell(row.get(column)) for column in CSV_COLUMNS})

    for kind, rows in (("client", data["clients"]), ("user", data["users"])):
        for row in rows:
            write({"kind": kind, **row, "clients": "", "users": ""})
    for total in data["totals"]:
        write(
            {
                "kind": "day",
                "name": total["day"],
                "sessions": total["sessions"],
                "clients": total["clients"],
                "users": total["users"],
            }
        )
    return out.getvalue()


def render(data: Mapping[str, Any], fmt: str) -> str:
    """``data`` from :func:`collect` as ``table``, ``csv`` or ``json`` text."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        return _render_csv(data)
    return _render_table(data)


def main(settings: Settings, options: Mapping[str, Any]) -> int:
    """The ``report`` command; returns the exit status."""
    fmt = options.get("format") or "table"
    since = options.get("since")
    key = settings.pseudonym_key
    try:
        data = collect(
            database_path(settings.state_dir),
            RuleSet.from_settings(settings),
            since=since,
            user=options.get("user"),
            pseudonymizer=None if key is None else Pseudonymizer(key),
        )
    except ReportError as exc:
        print(f"pop3proxy report: {exc}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(render(data, fmt))
    return EXIT_OK
