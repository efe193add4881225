"""``python -m workflows.minilm``: runs :func:`workflows.minilm.cli.main`."""

from workflows.minilm.cli import main

raise SystemExit(main())
