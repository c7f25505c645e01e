"""``python -m pop3proxy`` is the same as the ``pop3proxy`` console script."""

from __future__ import annotations

from pop3proxy.cli import main

raise SystemExit(main())
