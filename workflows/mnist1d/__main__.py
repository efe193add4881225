"""``python -m workflows.mnist1d``: runs :func:`workflows.mnist1d.cli.main`."""

from workflows.mnist1d.cli import main

raise SystemExit(main())
