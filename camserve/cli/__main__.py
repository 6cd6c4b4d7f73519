"""``python -m camserve.cli``: the ``camserve`` command."""

from camserve.cli import main

raise SystemExit(main())
