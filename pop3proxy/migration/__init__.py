"""The staged migration off plaintext POP3: pre-flight check, client inventory, phases, report.

- :mod:`~pop3proxy.migration.check`: ``pop3proxy check``, the pre-flight test of the upstream;
- :mod:`~pop3proxy.migration.inventory`: who still speaks plaintext, kept in SQLite;
- :mod:`~pop3proxy.migration.rules`: the enforcement phases (allow, warn, deny from a date);
- :mod:`~pop3proxy.migration.report`: ``pop3proxy report``, the migration progress;
- :mod:`~pop3proxy.migration.pseudonym`: keyed pseudonyms for user names.
"""

from __future__ import annotations
