"""Keyed pseudonyms for user names (GDPR/DSGVO): HMAC-SHA256 under a secret key.

The same user name always maps to the same pseudonym under one key, so the inventory can
still count sessions per user and an admin who knows a name can find its row (``pop3proxy
report`` shows pseudonyms; :meth:`Pseudonymizer.pseudonym` computes one), while the stored
data alone does not reveal the names. A pseudonym is ``u-`` plus 24 hex digits (96 bits of
the MAC). Applying the transform twice is harmless: a value that already has that form is
left as it is, so the log and the inventory can both apply it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["MIN_KEY_LENGTH", "PseudonymKey", "Pseudonymizer", "parse_pseudonym_key"]

MIN_KEY_LENGTH: Final = 16
_PSEUDONYM = re.compile(r"u-[0-9a-f]{24}\Z")
#: Commands whose first argument is the user name (AUTH arguments are SASL data, not names).
_USER_VERBS: Final = frozenset({"USER", "APOP"})


@dataclass(frozen=True, slots=True)
class PseudonymKey:
    """The HMAC key; its ``repr`` never shows the key."""

    value: bytes = field(repr=False)
    source: str = "inline"


def parse_pseudonym_key(raw: object) -> PseudonymKey:
    """A setting parser: the name of a key file, or the key itself.

    A value naming an existing file means that file's contents (surrounding white space
    removed); anything else is the key. Either way the key must be at least
    :data:`MIN_KEY_LENGTH` octets.

    Raises:
        ValueError: with a short description of the problem (never quoting the key).
    """
    text = _text(raw).strip()
    path = Path(text)
    try:
        is_file = bool(text) and path.is_file()
    except OSError:  # a key that is not a valid path (too long, NUL...)
        is_file = False
    if is_file:
        try:
            key = path.read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the key file: {exc.strerror or exc}") from None
        if len(key) < MIN_KEY_LENGTH:
            raise ValueError(f"the key file holds fewer than {MIN_KEY_LENGTH} octets")
        return PseudonymKey(key, source=f"file {path}")
    if len(text.encode()) < MIN_KEY_LENGTH:
        raise ValueError(
            f"neither an existing key file nor a key of at least {MIN_KEY_LENGTH} characters"
        )
    return PseudonymKey(text.encode(), source="inline")


def _text(raw: object) -> str:
    if isinstance(raw, str):
        return raw
    raise ValueError("expected a key file name or a key (a string)")


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
        """The pseudonym of ``value``; None stays None, and a pseudonym stays as it is."""
        if value is None or _PSEUDONYM.match(value):
            return value
        return self.pseudonym(value)

    def event_fields(self, event: str, fields: Mapping[str, Any]) -> Mapping[str, Any]:
        """``fields`` of a session event with every user name replaced by its pseudonym.

        Replaces the ``user`` field (``pop3.login``, ``session.closed``, ``policy.verdict``)
        and the first argument of ``USER`` and ``APOP`` in ``pop3.command``. Returns
        ``fields`` itself when there is nothing to replace (the common case: cheap).
        """
        changed: dict[str, Any] | None = None
        user = fields.get("user")
        if isinstance(user, str):
            changed = dict(fields)
            changed["user"] = self.user(user)
        if event == "pop3.command" and fields.get("verb") in _USER_VERBS:
            args = fields.get("args")
            if isinstance(args, list | tuple) and args and isinstance(args[0], str):
                changed = dict(fields) if changed is None else changed
                changed["args"] = [self.user(args[0]), *args[1:]]
        return fields if changed is None else changed
