"""``python -m workflows.federated``: runs :func:`workflows.federated.cli.main`."""

from workflows.federated.cli import main

raise SystemExit(main())
