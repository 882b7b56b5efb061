"""``python -m gmem``: the same as the ``gmem`` command."""

from gmem.cli import main

raise SystemExit(main())
