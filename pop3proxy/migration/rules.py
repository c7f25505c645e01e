"""Enforcement phases: which plaintext clients are allowed, warned or refused, and from when.

Theory of operation: the configuration holds an ordered list of rules. A rule matches a
session by client network and/or user name glob (a rule with neither matches every
session) and gives it a phase:

- ``allow``: nothing happens;
- ``warn``: the session goes ahead, but is logged and counted as a client that must
  migrate; an optional ``notice`` is appended to the greeting after ``+OK``;
- ``deny``: the session is refused with ``-ERR [SYS/PERM]`` and a message telling the user
  to switch to port 995 with TLS, before the upstream is contacted (network rules) or
  before the credential is forwarded (user rules).

A rule with a ``from`` date is not in force before that date, so later rules decide until
then: put ``deny from 2027-03-01`` for a network above ``warn`` for the same network, and
its clients are warned until the end of February and refused from March. The first rule in
force that matches decides; when none does, the session is allowed. In ``dry_run`` mode
(global, or per rule) a ``deny`` becomes a ``warn`` verdict marked ``dry_run``: it is
logged and counted as a would-deny, and the session goes ahead.

At connect time only the client address is known. :meth:`RuleSet.on_connect` walks the
rules in order and stops at the first one in force whose network matches: if that rule
has no user condition it decides; if it has one, nothing can be decided yet and the
session is allowed until :meth:`RuleSet.on_login` decides with the user name.

Everything here is pure (no I/O, no clock: callers pass ``now``), and a :class:`RuleSet`
is immutable: a reload (SIGHUP) builds a new one with :meth:`RuleSet.from_settings`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import fnmatch
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

from pop3proxy.policy import ALLOW, IPAddress, Network, Verdict, parse_networks

if TYPE_CHECKING:
    from pop3proxy.config import Settings

__all__ = [
    "DEFAULT_DENY_MESSAGE",
    "PHASES",
    "Classification",
    "Phase",
    "Rule",
    "RuleSet",
    "parse_rules",
    "rules_summary",
]

Phase = Literal["allow", "warn", "deny"]
PHASES: Final[tuple[Phase, ...]] = ("allow", "warn", "deny")

DEFAULT_DENY_MESSAGE: Final = (
    "Plaintext POP3 is switched off: set your mail program to port 995 with SSL/TLS (POP3S)"
)
#: The reply to a login a deny rule might cover but whose user name cannot be read.
REFUSE_USER_UNKNOWN: Final = (
    b"-ERR [SYS/PERM] this login method does not show the user name, which the plaintext "
    b"rules must check: use USER/PASS, AUTH PLAIN or AUTH LOGIN\r\n"
)
#: Text limits keep the reply within RFC 1939's 512 octets and the greeting readable.
MAX_MESSAGE: Final = 300
MAX_NOTICE: Final = 200

_KEYS: Final = ("name", "phase", "networks", "users", "from", "notice", "message", "dry_run")
_ALIASES: Final = {"network": "networks", "user": "users", "net": "networks"}


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule of the configuration.

    Attributes:
        name: shown in logs (``policy.verdict`` ``rule``) and in the report.
        phase: ``allow``, ``warn`` or ``deny``.
        networks: the client must be in one of them; empty: any client.
        users: the user name must match one of these globs (``fnmatch``, case-insensitive);
            empty: any user.
        starts: the rule is in force from this instant on (UTC); None: always.
        notice: for ``warn`` (and dry-run ``deny``): text for the greeting after ``+OK``.
        message: for ``deny``: the text after ``-ERR [SYS/PERM]``.
        dry_run: this rule's ``deny`` only logs (as the global dry-run mode does).
    """

    name: str
    phase: Phase
    networks: tuple[Network, ...] = ()
    users: tuple[str, ...] = ()
    starts: dt.datetime | None = None
    notice: str | None = None
    message: str | None = None
    dry_run: bool = False

    def in_force(self, now: dt.datetime) -> bool:
        return self.starts is None or _utc(now) >= self.starts

    def matches_client(self, client: IPAddress) -> bool:
        if not self.networks:
            return True
        return any(client.version == net.version and client in net for net in self.networks)

    def matches_user(self, user: str) -> bool:
        if not self.users:
            return True
        folded = user.casefold()
        return any(fnmatch.fnmatchcase(folded, glob) for glob in self.users)

    def describe(self) -> str:
        """One line for humans: ``deny from 2027-03-01 (net 10.0.0.0/8; users *@old)``."""
        parts: list[str] = [self.phase]
        if self.starts is not None:
            parts.append("from " + _show_instant(self.starts))
        scope = []
        if self.networks:
            scope.append("net " + ",".join(str(n) for n in self.networks))
        if self.users:
            scope.append("users " + ",".join(self.users))
        text = " ".join(parts)
        return f"{text} ({'; '.join(scope)})" if scope else text


@dataclass(frozen=True, slots=True)
class Classification:
    """Where a client or user stands: for the report.

    Attributes:
        phase: the phase in force now.
        rule: the deciding rule's name, or None when no rule matches (``allow``).
        upcoming: a stricter phase already scheduled, e.g. ``deny from 2027-03-01``.
        dry_run: ``phase`` is ``deny`` but only logged.
    """

    phase: Phase
    rule: str | None = None
    upcoming: str | None = None
    dry_run: bool = False


class RuleSet:
    """The enforcement phases; implements :class:`pop3proxy.policy.Policy`.

    Args:
        rules: in order of precedence.
        dry_run: every ``deny`` only logs (a ``warn`` verdict with ``dry_run=True``).
    """

    __slots__ = ("_rules", "_verdicts", "dry_run")

    def __init__(self, rules: Iterable[Rule] = (), *, dry_run: bool = False) -> None:
        self._rules = tuple(rules)
        self.dry_run = dry_run
        self._verdicts = tuple(self._verdict_of(rule) for rule in self._rules)

    @classmethod
    def from_settings(cls, settings: Settings) -> RuleSet:
        """The rules of ``settings.rules`` with ``settings.dry_run``; call again on reload."""
        return cls(settings.rules, dry_run=settings.dry_run)

    @property
    def rules(self) -> tuple[Rule, ...]:
        return self._rules

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({len(self._rules)} rules, dry_run={self.dry_run})"

    # -- the Policy protocol ----------------------------------------------------------------

    def on_connect(self, client: IPAddress, now: dt.datetime) -> Verdict:
        """Decide on the client address alone, if the rules allow it (see module docs)."""
        for rule, verdict in zip(self._rules, self._verdicts, strict=True):
            if not rule.in_force(now) or not rule.matches_client(client):
                continue
            if rule.users:
                return ALLOW  # that rule may match at login: undecided until then
            return verdict
        return ALLOW

    def on_login(self, client: IPAddress, user: str | None, now: dt.datetime) -> Verdict:
        """Decide with the user name (the first rule in force matching both decides).

        ``user`` None (the engine cannot read it): a ``deny`` rule whose user condition
        cannot be tested refuses the login (fail closed); any other rule with a user
        condition is passed over.
        """
        for rule, verdict in zip(self._rules, self._verdicts, strict=True):
            if not rule.in_force(now) or not rule.matches_client(client):
                continue
            if user is None and rule.users:
                if verdict.action == "deny" or verdict.dry_run:
                    return self._unknown_user_verdict(verdict)
                continue
            if user is None or rule.matches_user(user):
                return verdict
        return ALLOW

    @staticmethod
    def _unknown_user_verdict(verdict: Verdict) -> Verdict:
        """``verdict`` of a rule that may apply to a user whose name cannot be read."""
        return dataclasses.replace(
            verdict,
            reason="user_unknown",
            reply=None if verdict.reply is None else REFUSE_USER_UNKNOWN,
        )

    # -- for the report -----------------------------------------------------------------------

    def classify(
        self, client: IPAddress | None, user: str | None, now: dt.datetime
    ) -> Classification:
        """The phase of a client and/or user now, and any stricter phase already scheduled.

        ``None`` means unknown: rules with a condition on an unknown value are skipped (a
        client address alone is classified by the network-only rules).
        """
        upcoming: Rule | None = None
        for rule in self._rules:
            if rule.networks and (client is None or not rule.matches_client(client)):
                continue
            if rule.users and (user is None or not rule.matches_user(user)):
                continue
            if not rule.in_force(now):
                if upcoming is None or (rule.starts or now) < (upcoming.starts or now):
                    upcoming = rule
                continue
            dry_run = rule.phase == "deny" and (self.dry_run or rule.dry_run)
            later = None
            if upcoming is not None and _rank(upcoming.phase) > _rank(rule.phase):
                later = upcoming.describe().split(" (")[0]
            return Classification(rule.phase, rule.name, later, dry_run)
        later = None
        if upcoming is not None and upcoming.phase != "allow":
            later = upcoming.describe().split(" (")[0]
        return Classification("allow", None, later)

    # -- internals ------------------------------------------------------------------------------

    def _verdict_of(self, rule: Rule) -> Verdict:
        if rule.phase == "allow":
            return Verdict("allow", reason="phase", rule=rule.name)
        if rule.phase == "warn":
            return Verdict("warn", reason="phase", rule=rule.name, notice=rule.notice)
        if self.dry_run or rule.dry_run:
            return Verdict("warn", reason="phase", rule=rule.name, notice=rule.notice, dry_run=True)
        text = rule.message or DEFAULT_DENY_MESSAGE
        reply = f"-ERR [SYS/PERM] {text}\r\n".encode("ascii", "replace")
        return Verdict("deny", reason="phase", rule=rule.name, reply=reply)


def _rank(phase: Phase) -> int:
    return PHASES.index(phase)


def _utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment


def _show_instant(moment: dt.datetime) -> str:
    utc = moment.astimezone(dt.UTC)
    if utc.time() == dt.time(0, 0):
        return utc.date().isoformat()
    return utc.isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# Parsing the ``rules`` setting.
# --------------------------------------------------------------------------------------------


def parse_rules(raw: object) -> tuple[Rule, ...]:
    """A setting parser for ``rules``.

    Accepts a TOML array of tables (``[[rules]]`` with the keys ``name``, ``phase``,
    ``networks``, ``users``, ``from``, ``notice``, ``message``, ``dry_run``), or, from a
    flag (repeatable) or the environment (``;`` between rules), one rule per string as
    ``key=value`` words: ``phase=deny from=2027-03-01 networks=10.0.0.0/8,192.168.0.0/16``
    (quote values holding spaces: ``notice='please move to port 995'``).

    Raises:
        ValueError: naming the rule and the problem.
    """
    items = _rule_items(raw)
    rules = []
    names: set[str] = set()
    for index, item in enumerate(items, start=1):
        label = f"rule {index}"
        try:
            table = _rule_table(item)
            if isinstance(table.get("name"), str):
                label = f"rule {index} ({table['name']})"
            rule = _build_rule(table, default_name=f"rule-{index}")
        except ValueError as exc:
            raise ValueError(f"{label}: {exc}") from None
        if rule.name in names:
            raise ValueError(f"{label}: the name {rule.name!r} is used twice")
        names.add(rule.name)
        rules.append(rule)
    return tuple(rules)


def _rule_items(raw: object) -> list[object]:
    if isinstance(raw, str):
        return [part for part in raw.split(";") if part.strip()]
    if isinstance(raw, list | tuple):
        return list(raw)
    raise ValueError("expected an array of tables ([[rules]]) or rule strings")


def _rule_text(item: object) -> str:
    if isinstance(item, str):
        return item
    raise ValueError("expected a table or a string of key=value words")


def _rule_table(item: object) -> Mapping[str, object]:
    if isinstance(item, Mapping):
        return {str(k): v for k, v in item.items()}
    table: dict[str, object] = {}
    try:
        words = shlex.split(_rule_text(item))
    except ValueError as exc:
        raise ValueError(f"cannot split into words: {exc}") from None
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            if key in PHASES and "phase" not in table:
                table["phase"] = key  # "deny networks=..." reads naturally too
                continue
            raise ValueError(f"{word!r} is not key=value")
        table[key.strip()] = value
    return table


def _build_rule(table: Mapping[str, object], *, default_name: str) -> Rule:
    values: dict[str, object] = {}
    for key, value in table.items():
        canonical = _ALIASES.get(key, key)
        if canonical not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ValueError(f'unknown key "{key}"{hint}')
        values[canonical] = value
    phase = values.get("phase")
    if phase not in PHASES:
        raise ValueError("phase must be one of allow, warn, deny")
    name = values.get("name", default_name)
    if not isinstance(name, str) or not _printable(name) or not name.strip():
        raise ValueError("name must be a non-empty single-line string")
    return Rule(
        name=name.strip(),
        phase=phase,
        networks=_networks(values.get("networks", ())),
        users=tuple(glob.casefold() for glob in _strings(values.get("users", ()), "users")),
        starts=_instant(values["from"]) if "from" in values else None,
        notice=_line(values.get("notice"), "notice", MAX_NOTICE),
        message=_line(values.get("message"), "message", MAX_MESSAGE),
        dry_run=_boolean(values.get("dry_run", False)),
    )


def _strings(raw: object, what: str) -> list[str]:
    if isinstance(raw, str):
        parts = raw.split(",")
    elif isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
        parts = [piece for item in raw for piece in str(item).split(",")]
    else:
        raise ValueError(f"{what} must be a string or an array of strings")
    return [part.strip() for part in parts if part.strip()]


def _networks(raw: object) -> tuple[Network, ...]:
    return parse_networks(_strings(raw, "networks"))


def _instant(raw: object) -> dt.datetime:
    """A TOML date or date-time, or ISO 8601 text; dates mean midnight UTC."""
    if isinstance(raw, str):
        text = raw.strip()
        try:
            raw = dt.datetime.fromisoformat(text) if "T" in text or " " in text else None
            if raw is None:
                raw = dt.date.fromisoformat(text)
        except ValueError:
            raise ValueError(f"from: {text!r} is not a date like 2027-03-01") from None
    if isinstance(raw, dt.datetime):
        return _utc(raw).astimezone(dt.UTC)
    if isinstance(raw, dt.date):
        return dt.datetime(raw.year, raw.month, raw.day, tzinfo=dt.UTC)
    raise ValueError("from must be a date like 2027-03-01")


def _printable(text: str) -> bool:
    return text.isprintable() and "\r" not in text and "\n" not in text


def _line(raw: object, what: str, limit: int) -> str | None:
    if raw is None:
        return None
    text = _string(raw, what).strip()
    if not text:
        return None
    if not text.isascii() or not _printable(text):
        raise ValueError(f"{what} must be one line of printable ASCII")
    if len(text) > limit:
        raise ValueError(f"{what} is longer than {limit} characters")
    return text


def _string(raw: object, what: str) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError(f"{what} must be a string")


def _boolean(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(raw, str) and raw.strip().lower() in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("dry_run must be true or false")


def rules_summary(rules: Sequence[Rule]) -> list[str]:
    """One line per rule, for logs and ``--help``-like listings."""
    return [f"{rule.name}: {rule.describe()}" for rule in rules]
