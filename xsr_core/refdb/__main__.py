"""``python -m xsr_core.refdb``: see :mod:`xsr_core.refdb.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
