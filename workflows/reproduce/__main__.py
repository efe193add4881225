"""``python -m workflows.reproduce``: runs :func:`workflows.reproduce.cli.main`.

Guarded: the LocalCluster's worker processes import the main module again.
"""

from workflows.reproduce.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
