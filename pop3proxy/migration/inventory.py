"""Who still speaks plaintext POP3: a SQLite inventory of client addresses and user names.

Theory of operation: writes must never slow down or break a session, so the work is split
in two halves.

- :class:`Inventory` is a telemetry sink (see :mod:`pop3proxy.telemetry`). It runs on the
  relay's task and only updates in-memory aggregates: a :class:`Batch` of per-address and
  per-user :class:`Tally` objects, plus a small state per open session (its client
  address, the command verbs seen so far, its user). Every call is O(1) and both maps are
  bounded; when they are full, new keys are counted as dropped, never stored.
- :func:`inventory_service` (one of :data:`pop3proxy.app.SERVICES`) swaps the batch out every
  ``inventory_flush_interval`` seconds, or sooner after :data:`FLUSH_EVENTS` events, and
  merges it into SQLite in a worker thread (:class:`InventoryStore`). When the database
  cannot be written (disk full, read-only, deleted, corrupt) it logs a warning, keeps the
  batch to retry with the next one, and the proxy carries on. A deleted file is recreated
  on the next write.

What is recorded, per client address and per user name: first and last seen (UTC, ISO
8601), sessions, successful and failed logins, bytes each way, sessions warned, denied and
would-be-denied (dry run) by the enforcement phases, the last phase verdict, the auth
mechanisms used, and client fingerprints: the command verbs from the greeting to the first
login (``CAPA,USER,PASS`` or ``AUTH PLAIN``), which tell kinds of mail programs apart. A
per-day table counts sessions per address and user for the totals over time. With a
pseudonym key, user names arrive as keyed pseudonyms (the telemetry fan-out replaces them
before any sink sees them, :mod:`.pseudonym`) and are stored as they arrive.

What unauthenticated input can create is bounded. A user name is only a claim until the
server accepts the login, and a client can send as many as it likes (``USER junk-1``,
``junk-2``... or the same through APOP, AUTH PLAIN, XOAUTH2). So:

- a user row (``users``, its mechanisms, fingerprints and days) is created only by a
  *successful* login; the verdicts and bytes of that session count on it;
- a failed, cancelled or policy-refused login counts on the client address's row, and on
  the user's row only if that user has logged in successfully before (:attr:`Inventory.
  known_users`, read from the database at start): an admin still sees that alice's device
  fails, a stranger's junk names create nothing;
- each client address keeps a sample of the last :data:`MAX_FAILED_NAMES` names that did
  not log in from it (``failed_names``: name, attempts, last seen), so "this scanner keeps
  trying as carol" stays visible, in at most that many rows per address.

The number of rows then grows with the client addresses (which the allow list bounds) and
the accounts that really log in, not with what clients send.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import structlog
import trio

from pop3proxy.addresses import host_of
from pop3proxy.migration.pseudonym import Pseudonymizer

if TYPE_CHECKING:
    from pop3proxy.app import AppContext
    from pop3proxy.config import Settings

__all__ = [
    "DATABASE_NAME",
    "FLUSH_EVENTS",
    "SCHEMA",
    "Batch",
    "Inventory",
    "InventoryStore",
    "Tally",
    "database_path",
    "default_state_dir",
    "inventory_service",
    "prepare_state_dir",
]

DATABASE_NAME: Final = "inventory.sqlite3"
#: Flush early once this many events are waiting.
FLUSH_EVENTS: Final = 1000
#: Bounds on memory: distinct keys per batch, open sessions tracked, verbs per fingerprint.
MAX_KEYS: Final = 50_000
MAX_SESSIONS: Final = 100_000
MAX_VERBS: Final = 16
#: Names that did not log in, kept per client address (the most recent ones).
MAX_FAILED_NAMES: Final = 5
#: Users known to have logged in, kept in memory to count their failed logins on their row.
MAX_KNOWN_USERS: Final = 200_000
#: Longest user name stored (the engine's line limits bound it too; this bounds the rows).
MAX_NAME: Final = 320
#: A batch that could not be written is kept and retried; a warning at most this often.
WARN_EVERY_S: Final = 60.0
#: On shutdown, the last write may take this long.
FINAL_FLUSH_TIMEOUT: Final = 5.0
_LOGIN_VERB: Final = {"USER": "PASS", "APOP": "APOP"}

_log = structlog.get_logger("pop3proxy")

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    address TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    logins_ok INTEGER NOT NULL DEFAULT 0,
    logins_failed INTEGER NOT NULL DEFAULT 0,
    bytes_from_client INTEGER NOT NULL DEFAULT 0,
    bytes_to_client INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    would_deny INTEGER NOT NULL DEFAULT 0,
    last_action TEXT,
    last_rule TEXT,
    last_peer TEXT
);
CREATE TABLE IF NOT EXISTS users (
    user TEXT PRIMARY KEY,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    logins_ok INTEGER NOT NULL DEFAULT 0,
    logins_failed INTEGER NOT NULL DEFAULT 0,
    bytes_from_client INTEGER NOT NULL DEFAULT 0,
    bytes_to_client INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    denied INTEGER NOT NULL DEFAULT 0,
    would_deny INTEGER NOT NULL DEFAULT 0,
    last_action TEXT,
    last_rule TEXT,
    last_peer TEXT
);
CREATE TABLE IF NOT EXISTS mechanisms (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    mechanism TEXT NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, key, mechanism)
);
CREATE TABLE IF NOT EXISTS fingerprints (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (kind, key, fingerprint)
);
CREATE TABLE IF NOT EXISTS daily (
    day TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    sessions INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, kind, key)
);
CREATE TABLE IF NOT EXISTS failed_names (
    address TEXT NOT NULL,
    user TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_seen TEXT NOT NULL,
    PRIMARY KEY (address, user)
);
"""
#: ``clients.last_peer`` is the last user of an address, ``users.last_peer`` the last
#: address of a user (the report classifies users by it).
_COUNTERS: Final = (
    "sessions",
    "logins_ok",
    "logins_failed",
    "bytes_from_client",
    "bytes_to_client",
    "warned",
    "denied",
    "would_deny",
)


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_DATA_HOME/pop3proxy``, else ``~/.local/share/pop3proxy``."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME")
    if base and Path(base).is_absolute():
        return Path(base) / "pop3proxy"
    return Path.home() / ".local" / "share" / "pop3proxy"


def database_path(state_dir: Path | None) -> str:
    """The SQLite file for ``state_dir`` (default :func:`default_state_dir`), or ``:memory:``."""
    if state_dir is not None and str(state_dir) == ":memory:":
        return ":memory:"
    return str((state_dir or default_state_dir()) / DATABASE_NAME)


def prepare_state_dir(state_dir: Path | None) -> None:
    """At start-up: create the inventory's folder (mode 0700) and prove it can be written.

    The first write comes ``inventory_flush_interval`` seconds after the first session, and a
    failed one only warns (sessions must go on): a folder that can never be written has to
    stop the start instead, or the whole run's migration data is lost without a word.

    Raises:
        ValueError: what is wrong, naming the path: ``/x: cannot create the folder: ...``.
    """
    path = database_path(state_dir)
    if path == ":memory:":
        return
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ValueError(f"{folder}: cannot create the folder: {exc.strerror or exc}") from None
    try:  # SQLite writes its journal next to the database
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{folder}: cannot write in the folder: {exc.strerror or exc}") from None
    store = InventoryStore(path)
    try:
        connection = store.connect()
        connection.execute("BEGIN IMMEDIATE")  # takes the write lock: fails if read-only
        connection.execute("ROLLBACK")
    except (sqlite3.Error, OSError) as exc:
        raise ValueError(f"{path}: cannot write the inventory database: {exc}") from None
    finally:
        store.close()


def _now_text() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# In-memory aggregates.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Tally:
    """What one batch adds for one client address or user name."""

    first_seen: str
    last_seen: str
    sessions: int = 0
    logins_ok: int = 0
    logins_failed: int = 0
    bytes_from_client: int = 0
    bytes_to_client: int = 0
    warned: int = 0
    denied: int = 0
    would_deny: int = 0
    last_action: str | None = None
    last_rule: str | None = None
    last_peer: str | None = None
    mechanisms: dict[str, int] = field(default_factory=dict)
    fingerprints: dict[str, int] = field(default_factory=dict)
    #: Client rows only: name -> (attempts, last seen), least recently seen first, at most
    #: :data:`MAX_FAILED_NAMES`.
    failed_names: dict[str, tuple[int, str]] = field(default_factory=dict)

    def seen(self, now: str) -> None:
        self.last_seen = max(self.last_seen, now)

    def failed_name(self, name: str, now: str) -> None:
        """Note a login as ``name`` that did not succeed; the oldest name beyond the cap goes."""
        names = self.failed_names
        attempts, _ = names.pop(name, (0, now))
        while len(names) >= MAX_FAILED_NAMES:
            names.pop(next(iter(names)))
        names[name] = (attempts + 1, now)

    def merge_older(self, older: Tally) -> None:
        """Add ``older`` (an earlier batch) into this one."""
        self.first_seen = min(self.first_seen, older.first_seen)
        self.last_seen = max(self.last_seen, older.last_seen)
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(older, name))
        self.last_action = self.last_action or older.last_action
        self.last_rule = self.last_rule or older.last_rule
        self.last_peer = self.last_peer or older.last_peer
        for mechanism, uses in older.mechanisms.items():
            self.mechanisms[mechanism] = self.mechanisms.get(mechanism, 0) + uses
        for fingerprint, sessions in older.fingerprints.items():
            self.fingerprints[fingerprint] = self.fingerprints.get(fingerprint, 0) + sessions
        names = dict(older.failed_names)  # older names first: they go first past the cap
        for name, (attempts, last_seen) in self.failed_names.items():
            before, _ = names.pop(name, (0, last_seen))
            names[name] = (attempts + before, last_seen)
        while len(names) > MAX_FAILED_NAMES:
            names.pop(next(iter(names)))
        self.failed_names = names


@dataclass(slots=True)
class Batch:
    """The aggregates since the last write."""

    clients: dict[str, Tally] = field(default_factory=dict)
    users: dict[str, Tally] = field(default_factory=dict)
    daily: dict[tuple[str, str, str], int] = field(default_factory=dict)
    events: int = 0
    dropped: int = 0

    def __bool__(self) -> bool:
        return bool(self.clients or self.users or self.daily)

    def keys(self) -> int:
        return len(self.clients) + len(self.users) + len(self.daily)

    def merge_older(self, older: Batch, limit: int = MAX_KEYS) -> None:
        """Fold an unwritten earlier batch into this one (keys beyond ``limit`` are dropped)."""
        for mine, theirs in ((self.clients, older.clients), (self.users, older.users)):
            for key, tally in theirs.items():
                if key in mine:
                    mine[key].merge_older(tally)
                elif self.keys() < limit:
                    mine[key] = tally
                else:
                    self.dropped += 1
        for day_key, sessions in older.daily.items():
            if day_key in self.daily or self.keys() < limit:
                self.daily[day_key] = self.daily.get(day_key, 0) + sessions
        self.events += older.events
        self.dropped += older.dropped


@dataclass(slots=True)
class _Session:
    client: str
    verbs: list[str] = field(default_factory=list)
    #: The user the session logged in as (only a successful login sets it).
    user: str | None = None
    #: The command verbs up to the first login attempt, once it happened.
    fingerprint: str | None = None
    warned: bool = False
    denied: bool = False
    would_deny: bool = False
    last_action: str | None = None
    last_rule: str | None = None


class Inventory:
    """The telemetry sink half: O(1) updates of bounded in-memory aggregates.

    User names arrive as the telemetry fan-out made them (pseudonyms, with a key) and are
    used as they are: transforming them here again would pseudonymise the pseudonyms.

    Args:
        clock: the current time as ISO 8601 text (tests pass a fixed one).
        flush_events: :attr:`wakeup` is set once this many events are waiting.
        max_keys: most distinct keys (addresses + users + per-day rows) in one batch.
        max_sessions: most open sessions tracked at once (the oldest is forgotten first).
        max_known_users: most names kept in :attr:`known_users`.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], str] = _now_text,
        flush_events: int = FLUSH_EVENTS,
        max_keys: int = MAX_KEYS,
        max_sessions: int = MAX_SESSIONS,
        max_known_users: int = MAX_KNOWN_USERS,
    ) -> None:
        self.clock = clock
        self.flush_events = flush_events
        self.max_keys = max_keys
        self.max_sessions = max_sessions
        self.max_known_users = max_known_users
        self.batch = Batch()
        self.sessions: dict[str, _Session] = {}
        #: Users that have logged in successfully (this run, or before: see
        #: :meth:`know_users`); only their failed logins count on a user row.
        self.known_users: set[str] = set()
        self.wakeup: trio.Event | None = None
        self._handlers: dict[str, Callable[[str, Mapping[str, Any]], None]] = {
            "session.opened": self._opened,
            "pop3.command": self._command,
            "pop3.login": self._login,
            "policy.verdict": self._verdict,
            "session.closed": self._closed,
        }

    def know_users(self, users: Iterable[str]) -> None:
        """Add users that logged in before (read from the database), up to the bound."""
        for user in users:
            if len(self.known_users) >= self.max_known_users:
                return
            self.known_users.add(user)

    # -- the sink ---------------------------------------------------------------------------

    def sink(self, event: str, level: str, fields: Mapping[str, Any]) -> None:
        """A :data:`pop3proxy.telemetry.Sink`: quick, bounded, never raises."""
        handler = self._handlers.get(event)
        if handler is None:
            return
        session_id = fields.get("session_id")
        if not isinstance(session_id, str):
            return
        try:
            handler(session_id, fields)
        except Exception:  # a malformed event must not cost the session anything
            self.batch.dropped += 1
            return
        self.batch.events += 1
        if self.batch.events >= self.flush_events and self.wakeup is not None:
            self.wakeup.set()

    def take(self) -> Batch:
        """Hand the aggregates over for writing and start a new batch."""
        batch, self.batch = self.batch, Batch()
        return batch

    def restore(self, batch: Batch) -> None:
        """Give back a batch that could not be written; it is retried with the next one."""
        self.batch.merge_older(batch, self.max_keys)

    # -- handlers -----------------------------------------------------------------------------

    def _tally(self, table: dict[str, Tally], key: str, now: str) -> Tally | None:
        tally = table.get(key)
        if tally is None:
            if self.batch.keys() >= self.max_keys:
                self.batch.dropped += 1
                return None
            tally = table[key] = Tally(first_seen=now, last_seen=now)
        else:
            tally.seen(now)
        return tally

    def _count_day(self, kind: str, key: str, now: str) -> None:
        day_key = (now[:10], kind, key)
        daily = self.batch.daily
        if day_key in daily or self.batch.keys() < self.max_keys:
            daily[day_key] = daily.get(day_key, 0) + 1

    def _opened(self, session_id: str, fields: Mapping[str, Any]) -> None:
        client = host_of(fields.get("client"))
        if client is None:
            return
        sessions = self.sessions
        if len(sessions) >= self.max_sessions:
            sessions.pop(next(iter(sessions)))  # forget the oldest (it never closed)
        sessions[session_id] = _Session(client)
        now = self.clock()
        tally = self._tally(self.batch.clients, client, now)
        if tally is not None:
            tally.sessions += 1
        self._count_day("client", client, now)

    def _command(self, session_id: str, fields: Mapping[str, Any]) -> None:
        session = self.sessions.get(session_id)
        verb = fields.get("verb")
        if session is None or session.fingerprint is not None or not isinstance(verb, str):
            return
        if len(session.verbs) < MAX_VERBS:
            session.verbs.append(_fingerprint_verb(verb, fields.get("args")))

    def _login(self, session_id: str, fields: Mapping[str, Any]) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        now = self.clock()
        ok = fields.get("result") == "success"
        mechanism = str(fields.get("mechanism") or "?")[:32]
        user = _name(fields.get("user"))
        fingerprint = None
        if session.fingerprint is None:
            # The login's own command completes after this event (the engine reports the
            # result first), so its verb is added here, unless it came first after all.
            login_verb = _LOGIN_VERB.get(mechanism, f"AUTH {mechanism}")
            verbs = session.verbs
            if not verbs or verbs[-1] != login_verb:
                verbs = [*verbs, login_verb]
            fingerprint = session.fingerprint = ",".join(verbs[: MAX_VERBS + 1])
        client_tally = self._tally(self.batch.clients, session.client, now)
        if client_tally is not None:
            _count_login(client_tally, ok=ok, mechanism=mechanism, fingerprint=fingerprint)
        if user is None:
            return
        if not ok:
            self._failed_login(client_tally, user, mechanism, now)
            return
        if len(self.known_users) < self.max_known_users:
            self.known_users.add(user)
        if client_tally is not None:
            client_tally.last_peer = user
        if session.user == user:  # cannot happen in POP3 (one login per session), but cheap
            return
        session.user = user
        user_tally = self._tally(self.batch.users, user, now)
        if user_tally is None:
            return
        self._count_day("user", user, now)
        user_tally.sessions += 1
        user_tally.last_peer = session.client
        _count_login(user_tally, ok=True, mechanism=mechanism, fingerprint=session.fingerprint)
        # The phase verdicts came before the login (at USER, before the credential went
        # upstream): now that the name is proven, they count for the user too.
        user_tally.warned += session.warned
        user_tally.denied += session.denied
        user_tally.would_deny += session.would_deny
        if session.last_action is not None:
            user_tally.last_action = session.last_action
            user_tally.last_rule = session.last_rule

    def _failed_login(self, client: Tally | None, user: str, mechanism: str, now: str) -> None:
        """A login as ``user`` did not succeed: the name is a claim, not proven."""
        if client is not None:
            client.failed_name(user, now)
        if user in self.known_users:  # a real account failing: worth its row
            tally = self._tally(self.batch.users, user, now)
            if tally is not None:
                _count_login(tally, ok=False, mechanism=mechanism, fingerprint=None)

    def _verdict(self, session_id: str, fields: Mapping[str, Any]) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            return
        action = fields.get("action")
        dry_run = bool(fields.get("dry_run"))
        rule = fields.get("rule")
        now = self.clock()
        last_action = "would_deny" if dry_run else str(action)
        last_rule = str(rule) if rule is not None else None
        tally = self._tally(self.batch.clients, session.client, now)
        if tally is not None:
            tally.last_action, tally.last_rule = last_action, last_rule
            if dry_run and not session.would_deny:
                tally.would_deny += 1
            if action == "warn" and not session.warned:
                tally.warned += 1
            if action == "deny" and not session.denied:
                tally.denied += 1
            # A login refused before the credential went upstream: the name is unproven.
            user = _name(fields.get("user"))
            if user is not None and action == "deny" and not dry_run:
                tally.failed_name(user, now)
        session.last_action, session.last_rule = last_action, last_rule
        session.would_deny = session.would_deny or dry_run
        session.warned = session.warned or action == "warn"
        session.denied = session.denied or action == "deny"

    def _closed(self, session_id: str, fields: Mapping[str, Any]) -> None:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return
        now = self.clock()
        from_client = _count(fields.get("bytes_from_client"))
        to_client = _count(fields.get("bytes_to_client"))
        # Only the user the session logged in as: the event's own ``user`` field is not
        # trusted to create anything.
        tallies = [self._tally(self.batch.clients, session.client, now)]
        if session.user is not None:
            tallies.append(self._tally(self.batch.users, session.user, now))
        for tally in tallies:
            if tally is not None:
                tally.bytes_from_client += from_client
                tally.bytes_to_client += to_client


def _name(raw: object) -> str | None:
    """A user name from an event field (bounded in length like every stored key)."""
    if not isinstance(raw, str) or not raw:
        return None
    return raw[:MAX_NAME]


def _count_login(tally: Tally, *, ok: bool, mechanism: str, fingerprint: str | None) -> None:
    if ok:
        tally.logins_ok += 1
    else:
        tally.logins_failed += 1
    tally.mechanisms[mechanism] = tally.mechanisms.get(mechanism, 0) + 1
    if fingerprint is not None:
        tally.fingerprints[fingerprint] = tally.fingerprints.get(fingerprint, 0) + 1


def _count(raw: object) -> int:
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else 0


def _fingerprint_verb(verb: str, args: object) -> str:
    verb = verb.upper()[:12]
    if verb == "AUTH" and isinstance(args, list) and args and isinstance(args[0], str):
        mechanism = args[0].upper()
        if mechanism != "***" and mechanism.replace("-", "").replace("_", "").isalnum():
            return f"AUTH {mechanism[:20]}"
    return verb


# --------------------------------------------------------------------------------------------
# SQLite.
# --------------------------------------------------------------------------------------------


class InventoryStore:
    """The SQLite half: merges batches into the database; called from a worker thread.

    One connection is kept open and reopened after an error, or when the file was deleted
    or replaced (the next write recreates it). Calls must not overlap.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._inode: tuple[int, int] | None = None

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def connect(self) -> sqlite3.Connection:
        """The open connection, (re)opened if needed, with the schema in place."""
        stale = self._connection is not None and self.path != ":memory:"
        if stale and self._file_identity() != self._inode:
            self.close()  # deleted or replaced underneath us
        if self._connection is None:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            connection = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            try:
                connection.executescript(SCHEMA)
                connection.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '1')")
            except BaseException:
                connection.close()
                raise
            self._connection = connection
            self._inode = None if self.path == ":memory:" else self._file_identity()
        return self._connection

    def known_users(self, limit: int = MAX_KNOWN_USERS) -> list[str]:
        """The users that have logged in successfully before (at most ``limit``).

        Raises:
            sqlite3.Error, OSError: the database cannot be read.
        """
        try:
            connection = self.connect()
            rows = connection.execute(
                "SELECT user FROM users WHERE logins_ok > 0 ORDER BY last_seen DESC LIMIT ?",
                (limit,),
            ).fetchall()
        except BaseException:
            self.close()
            raise
        return [row[0] for row in rows]

    def write(self, batch: Batch) -> None:
        """Merge ``batch`` in one transaction.

        Raises:
            sqlite3.Error, OSError: the database cannot be written; the connection is
                closed so that the next call starts afresh.
        """
        try:
            connection = self.connect()
            with _transaction(connection):
                _merge(connection, batch)
        except BaseException:
            self.close()
            raise


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection) -> Iterator[None]:
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _merge(connection: sqlite3.Connection, batch: Batch) -> None:
    for table, column, kind, tallies in (
        ("clients", "address", "client", batch.clients),
        ("users", "user", "user", batch.users),
    ):
        counters = ", ".join(_COUNTERS)
        updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in _COUNTERS)
        placeholders = ", ".join("?" for _ in range(len(_COUNTERS) + 6))
        sql = (
            f"INSERT INTO {table} ({column}, first_seen, last_seen, {counters}, "  # noqa: S608 - fixed names
            f"last_action, last_rule, last_peer) VALUES ({placeholders}) "
            f"ON CONFLICT ({column}) DO UPDATE SET "
            "first_seen = min(first_seen, excluded.first_seen), "
            "last_seen = max(last_seen, excluded.last_seen), "
            f"{updates}, "
            "last_action = coalesce(excluded.last_action, last_action), "
            "last_rule = CASE WHEN excluded.last_action IS NULL THEN last_rule "
            "ELSE excluded.last_rule END, "
            "last_peer = coalesce(excluded.last_peer, last_peer)"
        )
        connection.executemany(
            sql,
            [
                (
                    key,
                    t.first_seen,
                    t.last_seen,
                    *(getattr(t, c) for c in _COUNTERS),
                    t.last_action,
                    t.last_rule,
                    t.last_peer,
                )
                for key, t in tallies.items()
            ],
        )
        connection.executemany(
            "INSERT INTO mechanisms (kind, key, mechanism, uses) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (kind, key, mechanism) DO UPDATE SET uses = uses + excluded.uses",
            [
                (kind, key, mechanism, uses)
                for key, t in tallies.items()
                for mechanism, uses in t.mechanisms.items()
            ],
        )
        connection.executemany(
            "INSERT INTO fingerprints (kind, key, fingerprint, sessions, last_seen) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (kind, key, fingerprint) DO UPDATE SET "
            "sessions = sessions + excluded.sessions, "
            "last_seen = max(last_seen, excluded.last_seen)",
            [
                (kind, key, fingerprint, sessions, t.last_seen)
                for key, t in tallies.items()
                for fingerprint, sessions in t.fingerprints.items()
            ],
        )
    connection.executemany(
        "INSERT INTO daily (day, kind, key, sessions) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (day, kind, key) DO UPDATE SET sessions = sessions + excluded.sessions",
        [(day, kind, key, sessions) for (day, kind, key), sessions in batch.daily.items()],
    )
    named = {address: t.failed_names for address, t in batch.clients.items() if t.failed_names}
    # REPLACE gives the row a new, higher rowid: rowid order is the order the names were
    # last seen in (the batch's names come least recent first), finer than the timestamps.
    connection.executemany(
        "INSERT OR REPLACE INTO failed_names (address, user, attempts, last_seen) VALUES "
        "(?1, ?2, ?3 + coalesce((SELECT attempts FROM failed_names "
        "WHERE address = ?1 AND user = ?2), 0), ?4)",
        [
            (address, user, attempts, last_seen)
            for address, names in named.items()
            for user, (attempts, last_seen) in names.items()
        ],
    )
    # Keep the most recent few per address: the table grows with the addresses only.
    connection.executemany(
        "DELETE FROM failed_names WHERE address = ?1 AND rowid NOT IN (SELECT rowid "
        "FROM failed_names WHERE address = ?1 ORDER BY rowid DESC LIMIT ?2)",
        [(address, MAX_FAILED_NAMES) for address in named],
    )


# --------------------------------------------------------------------------------------------
# The service.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Writer:
    """Flushes with warnings that are rate-limited while the database stays broken."""

    inventory: Inventory
    store: InventoryStore
    failing: bool = False
    last_warning: float = -WARN_EVERY_S
    failures: int = 0
    stats: dict[str, int] = field(default_factory=lambda: {"written": 0, "failed": 0})

    async def flush(self) -> None:
        batch = self.inventory.take()
        if not batch:
            return
        try:
            await trio.to_thread.run_sync(self.store.write, batch)
        except (sqlite3.Error, OSError) as exc:
            self.inventory.restore(batch)
            self.failures += 1
            self.stats["failed"] += 1
            now = trio.current_time()
            if not self.failing or now - self.last_warning >= WARN_EVERY_S:
                _log.warning(
                    "inventory.write_failed",
                    path=self.store.path,
                    error=f"{type(exc).__name__}: {exc}",
                    failures=self.failures,
                    pending_keys=self.inventory.batch.keys(),
                )
                self.last_warning = now
            self.failing = True
            return
        self.stats["written"] += 1
        if self.failing:
            _log.info("inventory.write_recovered", path=self.store.path, failures=self.failures)
        self.failing = False
        self.failures = 0
        if batch.dropped:
            _log.warning("inventory.dropped", path=self.store.path, dropped=batch.dropped)


def pseudonymizer_for(settings: Settings) -> Pseudonymizer | None:
    """The telemetry transform's pseudonymizer, when a key is configured."""
    key = settings.pseudonym_key
    return None if key is None else Pseudonymizer(key)


async def inventory_service(
    ctx: AppContext, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Collect session events into the inventory and write them out until cancelled."""
    settings = ctx.settings
    if not settings.inventory:
        task_status.started()
        return
    inventory = Inventory()
    store = InventoryStore(database_path(settings.state_dir))
    writer = _Writer(inventory, store)
    try:
        inventory.know_users(await trio.to_thread.run_sync(store.known_users))
    except (sqlite3.Error, OSError) as exc:  # written later, or logged then: never fatal
        _log.warning("inventory.read_failed", path=store.path, error=f"{type(exc).__name__}: {exc}")
    ctx.telemetry.add_sink(inventory.sink)
    _log.info(
        "inventory.started",
        path=store.path,
        pseudonymised=settings.pseudonym_key is not None,
        known_users=len(inventory.known_users),
        flush_interval_s=settings.inventory_flush_interval,
    )
    task_status.started()
    try:
        while True:
            inventory.wakeup = trio.Event()
            with trio.move_on_after(settings.inventory_flush_interval):
                await inventory.wakeup.wait()
            await writer.flush()
    finally:
        with contextlib.suppress(ValueError):
            ctx.telemetry.remove_sink(inventory.sink)
        with trio.move_on_after(FINAL_FLUSH_TIMEOUT) as scope:
            scope.shield = True
            await writer.flush()
        store.close()


def tally_as_row(tally: Tally) -> dict[str, Any]:
    """A :class:`Tally` as a plain mapping (for tests and debugging)."""
    return dataclasses.asdict(tally)
