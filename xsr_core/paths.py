"""Path confinement: every file XSR reads from a name it was given must lie under an allowed root.

A reference DB, a prompt or a folder can name files; none of them may make XSR read outside the
folders the user meant (the DB folder, ComfyUI's input/models folders, folders the user listed).
:func:`confine` resolves a path (following every symlink) and checks it against roots that are
themselves resolved, so a symlinked ``models/xsr`` folder works while a symlink *inside* a folder
that points elsewhere, an absolute path or a ``../`` climb stored in a DB is refused.

Extra roots come from the ``XSR_ALLOWED_ROOTS`` environment variable (``os.pathsep``-separated;
the older ``XSR_REFDB_ALLOWED_ROOTS`` is read too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

ENV_ROOTS = ("XSR_ALLOWED_ROOTS", "XSR_REFDB_ALLOWED_ROOTS")


class PathConfinementError(ValueError):
    """A path that resolves outside every allowed root; the message names the file and the fix."""


def env_roots() -> list[str]:
    """Roots the user listed in ``XSR_ALLOWED_ROOTS`` (and the legacy ``XSR_REFDB_ALLOWED_ROOTS``)."""
    out: list[str] = []
    for var in ENV_ROOTS:
        out += [r for r in os.environ.get(var, "").split(os.pathsep) if r.strip()]
    return out


def real_roots(roots: Iterable[str | os.PathLike]) -> list[str]:
    """The resolved (symlink-free, absolute) form of ``roots``, duplicates removed, order kept."""
    out: list[str] = []
    for r in roots:
        if r is None or str(r) == "":
            continue
        p = os.path.realpath(os.fspath(r))
        if p not in out:
            out.append(p)
    return out


def is_under(path: str, root: str) -> bool:
    """True when the resolved ``path`` is ``root`` or inside it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def confine(
    path: str | os.PathLike,
    roots: Iterable[str | os.PathLike],
    *,
    what: str = "file",
    base: str | os.PathLike | None = None,
) -> str:
    """Resolve ``path`` (relative paths against ``base``) and return it if it lies under one of ``roots``.

    Raises :class:`PathConfinementError` naming ``what``, the path, where it resolves to and the
    allowed roots.
    """
    raw = os.fspath(path)
    if "\x00" in raw:
        raise PathConfinementError(f"{what}: the path {raw!r} contains a NUL character")
    joined = raw if os.path.isabs(raw) or base is None else os.path.join(os.fspath(base), raw)
    real = os.path.realpath(joined)
    allowed = real_roots(roots)
    if any(is_under(real, r) for r in allowed):
        return real
    shown = f"'{raw}'" + (f" (resolves to {real})" if real != raw else "")
    raise PathConfinementError(
        f"{what} {shown} lies outside the folders XSR may read ({', '.join(allowed) or 'none'}); "
        "move the file there, or, if you trust it, add its folder to the XSR_ALLOWED_ROOTS environment "
        f"variable ({os.pathsep}-separated folders)"
    )


def confined_or_none(path: str | os.PathLike, roots: Iterable[str | os.PathLike]) -> str | None:
    """:func:`confine` without the error: the resolved path, or None when it escapes."""
    try:
        return confine(path, roots)
    except PathConfinementError:
        return None


def within(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """``root / path`` resolved, refused unless inside ``root`` (for paths a DB stores relative to itself)."""
    return Path(confine(path, [root], base=root, what=f"file stored in {root}"))


def existing_file(path: str | os.PathLike, what: str, error: type[Exception] = FileNotFoundError) -> Path:
    """``path`` as a Path; raises ``error`` ("<what> <path> does not exist") where it is no file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic read-by-setting (briefly process-wide)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` gives a new file (temp files from mkstemp get 0600)."""
    return 0o666 & ~current_umask()
