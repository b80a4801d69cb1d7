"""Part of the BENCH-ONLY PyAV stand-in (see av/__init__.py)."""

from av import __getattr__  # noqa: F401  (placeholder classes for any name)
