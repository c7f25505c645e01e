"""Keyed pseudonyms for user names (GDPR/DSGVO): HMAC-SHA256 under a secret key.

The same user name always maps to the same pseudonym under one key, so the inventory can
still count sessions per user and an admin who knows a name can find its row (``pop3proxy
report --user NAME`` computes the pseudonym; so does :meth:`Pseudonymizer.pseudonym`),
while the stored data alone does not reveal the names. A pseudonym is ``u-`` plus 24 hex
digits (96 bits of the MAC).

Every name a client sends is pseudonymised exactly once, whatever it looks like: the
telemetry fan-out applies :meth:`Pseudonymizer.event_fields` to each event before any sink
(the log, the live feed, the inventory) sees it, and nothing applies it again. A name that
already looks like a pseudonym is no exception: otherwise a client that sends ``USER``
with alice's pseudonym would have its failed logins recorded as alice's.

The key is secret: whoever has it can test names against the pseudonyms. It is read from a
file (:func:`parse_pseudonym_key_file`, e.g. a mounted Kubernetes secret) or from the
environment (:func:`parse_pseudonym_key`), never from the command line (``ps`` shows it to
every local user), and no error message ever quotes it.
"""

from __future__ import annotations

import hashlib
import hmac
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "MAX_KEY_FILE_OCTETS",
    "MIN_KEY_LENGTH",
    "PseudonymKey",
    "Pseudonymizer",
    "parse_pseudonym_key",
    "parse_pseudonym_key_file",
]

MIN_KEY_LENGTH: Final = 16
#: A key file larger than this is not a key file (a mistyped path to a log, a dump...).
MAX_KEY_FILE_OCTETS: Final = 4096
#: Commands whose first argument is the user name (AUTH arguments are SASL data, not names).
_USER_VERBS: Final = frozenset({"USER", "APOP"})
#: How a file name starts: such a value given as the key itself is almost surely a mistake
#: (the setting for a file was meant), and using it as the key would make it public.
_PATH_PREFIXES: Final = ("/", "./", "../", "~")
_GENERATE: Final = "generate one with: openssl rand -hex 32"


@dataclass(frozen=True, slots=True)
class PseudonymKey:
    """The HMAC key; its ``repr`` never shows the key."""

    value: bytes = field(repr=False)
    source: str = "environment"


def parse_pseudonym_key_file(raw: object) -> PseudonymKey:
    """A setting parser: the name of a readable regular file that holds the key.

    The file's contents, surrounding white space removed, are the key: at least
    :data:`MIN_KEY_LENGTH` and at most :data:`MAX_KEY_FILE_OCTETS` octets. A missing file,
    a directory (an unmounted secret volume), anything but a regular file, an unreadable,
    empty or too short file is an error: the proxy must not run with user names in clear,
    or with a guessable key, when a key was asked for.

    Raises:
        ValueError: with a short description of the problem (never quoting the value: a
            key typed where its file name belongs must not end up in a log).
    """
    text = _string(raw, "the name of a file holding the key")
    if not text:
        raise ValueError("empty: expected the name of a file holding the key")
    path = Path(text)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ValueError("no such file (is the secret mounted?)") from None
    except ValueError:  # a NUL in the name
        raise ValueError("not a valid file name") from None
    except OSError as exc:
        raise ValueError(f"cannot read the key file: {_why(exc)}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError("is a directory, expected a file holding the key")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("not a regular file, expected a file holding the key")
    try:
        with path.open("rb") as file:
            data = file.read(MAX_KEY_FILE_OCTETS + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the key file: {_why(exc)}") from None
    if len(data) > MAX_KEY_FILE_OCTETS:
        raise ValueError(f"the key file is larger than {MAX_KEY_FILE_OCTETS} octets: not a key")
    key = data.strip()
    if not key:
        raise ValueError(f"the key file is empty ({_GENERATE})")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"the key file holds fewer than {MIN_KEY_LENGTH} octets ({_GENERATE})")
    return PseudonymKey(key, source="file")


def parse_pseudonym_key(raw: object) -> PseudonymKey:
    """A setting parser: the key itself (read from the environment only).

    Surrounding white space is removed; the key must be at least :data:`MIN_KEY_LENGTH`
    octets. A value that starts like a file name (``/``, ``./``, ``../``, ``~``) is refused:
    the file setting was meant, and the file name as the key would let anyone who reads the
    configuration reverse every pseudonym.

    Raises:
        ValueError: with a short description of the problem (never quoting the key).
    """
    text = _string(raw, "the key").strip()
    if text.startswith(_PATH_PREFIXES):
        raise ValueError(
            "looks like a file name, not a key: give the file as --user-pseudonym-key-file "
            "FILE (POP3PROXY_USER_PSEUDONYM_KEY_FILE)"
        )
    key = text.encode("utf-8", "surrogateescape")
    if len(key) < MIN_KEY_LENGTH:
        raise ValueError(f"shorter than {MIN_KEY_LENGTH} octets ({_GENERATE})")
    return PseudonymKey(key, source="environment")


def _string(raw: object, what: str) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError(f"expected {what} (a string)")


def _why(exc: OSError) -> str:
    """The OS's reason without the file name (``str(exc)`` would quote the value)."""
    return exc.strerror or type(exc).__name__


class Pseudonymizer:
    """Maps user names to pseudonyms under one key."""

    __slots__ = ("_key",)

    def __init__(self, key: PseudonymKey | bytes) -> None:
        self._key = key.value if isinstance(key, PseudonymKey) else key

    def __repr__(self) -> str:
        return "Pseudonymizer(<key>)"

    def pseudonym(self, user: str) -> str:
        """``u-`` plus the first 24 hex digits of HMAC-SHA256(key, UTF-8 user name)."""
        mac = hmac.new(self._key, user.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "u-" + mac.hexdigest()[:24]

    def user(self, value: str | None) -> str | None:
        """The pseudonym of ``value`` (whatever it looks like); None stays None."""
        return None if value is None else self.pseudonym(value)

    def event_fields(self, event: str, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        """``fields`` of a session event with every user name replaced by its pseudonym.

        Replaces the ``user`` field (``pop3.login``, ``session.closed``, ``policy.verdict``)
        and the first argument of ``USER`` and ``APOP`` in ``pop3.command``. Returns
        ``fields`` itself when there is nothing to replace (the common case: cheap). Apply
        it once per event: a second pass would pseudonymise the pseudonyms.
        """
        changed: dict[str, Any] | None = None
        user = fields.get("user")
        if isinstance(user, str):
            changed = dict(fields)
            changed["user"] = self.pseudonym(user)
        if event == "pop3.command" and fields.get("verb") in _USER_VERBS:
            args = fields.get("args")
            if isinstance(args, list | tuple) and args and isinstance(args[0], str):
                changed = dict(fields) if changed is None else changed
                changed["args"] = [self.pseudonym(args[0]), *args[1:]]
        return fields if changed is None else changed
