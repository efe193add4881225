"""``python -m workflows.digits``: runs :func:`workflows.digits.cli.main`."""

from workflows.digits.cli import main

raise SystemExit(main())
