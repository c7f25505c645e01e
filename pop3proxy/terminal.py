"""Text for people: characters a terminal would act on are shown as escapes, never sent raw.

A user name, a server greeting or an error message can carry ESC sequences (clear the
screen, move the cursor, rewrite earlier lines, set the window title...) or bidirectional
overrides that make a line read differently from what it holds. Every human-facing output
that shows client- or server-controlled text (``report --format table`` and ``csv``,
``--log-format console``, ``watch``, ``check``) passes it through :func:`printable`. JSON
outputs need nothing more: :func:`json.dumps` escapes every control character.
"""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: str, *, keep: str = "") -> str:
    """``text`` with every character that ``str.isprintable`` rejects written as an escape.

    That is the C0 controls (ESC is ``\\x1b``), DEL, the C1 controls (``\\x9b`` is a
    one-character CSI on some terminals), line and paragraph separators, format characters
    such as U+202E (``\\u202e``) and unassigned code points; the space stays. ``keep``
    names characters to pass through unchanged (``"\\n"`` for a multi-line traceback).
    """
    if text.isprintable():  # nearly every value: one C-level scan
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
