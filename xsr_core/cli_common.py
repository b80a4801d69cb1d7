"""What the command-line tools (``xsr refdb``, ``xsr train``, ``xsr eval``) share: handing parsed options on
to the library function whose keyword arguments have the same names, and the one way a command ends on an
error (one line on stderr, exit status 2; with ``-v`` the caller re-raises, so the traceback shows).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any


def options(args: argparse.Namespace, names: str | Iterable[str]) -> dict[str, Any]:
    """``{name: args.name}`` for ``names`` (a space-separated string or an iterable): the options a command hands
    on unchanged, as keyword arguments, to a library function whose parameters carry the options' names."""
    return {name: getattr(args, name) for name in (names.split() if isinstance(names, str) else names)}


def error_status(exc: BaseException, prog: str, *, expected: bool = True, first_line: bool = False) -> int:
    """Print ``exc`` as ``prog``'s error message on stderr and return the exit status 2.

    ``expected=False`` (an exception type the command does not raise on purpose) puts the type's name in front;
    ``first_line`` cuts a message of several lines (a ComfyUI log tail) to its first one. Callers re-raise
    instead when ``-v`` (``--verbose``) was given.
    """
    text = str(exc).strip() or type(exc).__name__
    if not expected:
        text = f"{type(exc).__name__}: {text}"
    hint = "(-v for the traceback)"
    if first_line and "\n" in text:
        text, hint = text.splitlines()[0], "(-v for the full message and traceback)"
    print(f"{prog}: error: {text} {hint}", file=sys.stderr)
    return 2
