"""``python -m xsr_core.eval {metrics,run} ...``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
