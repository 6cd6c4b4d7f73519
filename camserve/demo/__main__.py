"""``python -m camserve.demo``: the same as ``python -m camserve.demo.run``."""

from camserve.demo.run import main

raise SystemExit(main())
