"""Queue-time validation and confinement helpers shared by the XSR nodes.

ComfyUI calls a V3 node's ``validate_inputs`` classmethod when a prompt is queued (0.3.75 and
0.33 alike: ``execution.validate_inputs``), with the widget values of the prompt; inputs linked
from other nodes arrive as None. An input *named* by ``validate_inputs`` (here: all of them,
through ``**kwargs``) is no longer range- or list-checked by ComfyUI, so :func:`schema_problems`
does those checks itself — and adds what ComfyUI does not check: NaN/inf floats, string lengths.
Every problem of a node is reported at once, each naming the node, the input and the fix.

Caps (documented in the README, set in the server's environment):
``XSR_MAX_BATCH`` (images per batch, default 64), ``XSR_MAX_TILES`` (tiles of one tiled LR, default 256),
``XSR_MAX_PROMPT_CHARS`` (caption / prompt text, default 2000 characters),
``XSR_MAX_IMAGE_PIXELS`` (pixels of a decoded image file, default 64 Mpx, see :mod:`xsr_core.image_io`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import folder_paths
from comfy_api.latest import io

from ..xsr_core.paths import PathConfinementError, confine, env_roots, real_roots

DEFAULT_MAX_BATCH = 64  # the 256-image batch reached 12.5 GB RSS; a quarter of it is the default
DEFAULT_MAX_PROMPT_CHARS = 2000  # ~26 CLIP chunks of 77 tokens would be 6000+; 2000 chars is a long paragraph
ENV_MAX_BATCH = "XSR_MAX_BATCH"
DEFAULT_MAX_TILES = 256  # tiles of one tiled LR: 256 px at overlap <= 16 (225 tiles); the default overlap 8 gives 121
ENV_MAX_TILES = "XSR_MAX_TILES"
ENV_MAX_PROMPT_CHARS = "XSR_MAX_PROMPT_CHARS"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"the server's environment variable {name}={raw!r} is not an integer") from None
    if value < 1:
        raise ValueError(f"the server's environment variable {name} must be >= 1, got {value}")
    return value


def max_batch() -> int:
    return _env_int(ENV_MAX_BATCH, DEFAULT_MAX_BATCH)


def max_prompt_chars() -> int:
    return _env_int(ENV_MAX_PROMPT_CHARS, DEFAULT_MAX_PROMPT_CHARS)


def max_tiles() -> int:
    return _env_int(ENV_MAX_TILES, DEFAULT_MAX_TILES)


def check_batch(node: str, what: str, n: int, *, tiles_ok: bool = False) -> None:
    """Refuse batches above ``XSR_MAX_BATCH`` before any work (a ValueError naming node and input).

    ``tiles_ok``: the node also takes the tiles of one tiled LR (XSR_Retrieve, XSR_Enhance), whose count is
    bounded by ``XSR_MAX_TILES`` instead; these nodes hold per-row tokens only, while the batch that reaches
    the sampler is bounded by XSR_PrepareLR / the folder node (image batches) or by the tiled model's tile batch.
    """
    cap = max(max_batch(), max_tiles()) if tiles_ok else max_batch()
    if n > cap:
        raise ValueError(
            f"{node}: {what} holds {n} images; the most XSR takes in one batch is {cap} "
            f"({ENV_MAX_BATCH} in the server's environment). Split the batch (e.g. ImageFromBatch) "
            "or raise the cap if the machine has the memory."
        )


def check_text(node: str, what: str, text: str | None) -> None:
    cap = max_prompt_chars()
    if text is not None and len(text) > cap:
        raise ValueError(
            f"{node}: {what} is {len(text)} characters; the limit is {cap} "
            f"({ENV_MAX_PROMPT_CHARS}). CLIP reads 77 tokens per chunk: shorten the text."
        )


def float_problem(node: str, name: str, value: Any) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(float(value)):
        return f"{node}: input '{name}' is {value}, not a finite number; enter a number in the widget's range"
    return None


def check_finite(node: str, **values: Any) -> None:
    """Execution-time guard: raise ValueError if any value is NaN or infinite."""
    problems = [p for k, v in values.items() if (p := float_problem(node, k, v))]
    if problems:
        raise ValueError("; ".join(problems))


def schema_problems(cls: type, values: dict[str, Any], *, skip: Iterable[str] = ()) -> list[str]:
    """What ComfyUI would check for the widget inputs of ``cls`` (min/max, combo options), plus
    finiteness of floats and the text cap; linked inputs (None) are skipped."""
    schema = cls.define_schema()
    node = schema.node_id
    skip = set(skip)
    problems = []
    for inp in schema.inputs:
        name = inp.id
        if name in skip or name not in values or values[name] is None:
            continue
        v = values[name]
        if isinstance(inp, (io.Float.Input, io.Int.Input)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                problems.append(f"{node}: input '{name}' must be a number, got {v!r}")
                continue
            if p := float_problem(node, name, v):
                problems.append(p)
                continue
            if inp.min is not None and v < inp.min:
                problems.append(f"{node}: input '{name}' is {v}, below its minimum {inp.min}")
            if inp.max is not None and v > inp.max:
                problems.append(f"{node}: input '{name}' is {v}, above its maximum {inp.max}")
        elif isinstance(inp, io.Combo.Input):
            options = list(inp.options or [])
            if v not in options:
                shown = ", ".join(map(str, options[:20])) + (" ..." if len(options) > 20 else "")
                problems.append(f"{node}: input '{name}' is {v!r}, which is not one of: {shown or '(none)'}")
        elif isinstance(inp, io.String.Input):
            if not isinstance(v, str):
                problems.append(f"{node}: input '{name}' must be text")
            elif len(v) > max_prompt_chars():
                problems.append(
                    f"{node}: input '{name}' is {len(v)} characters; the limit is {max_prompt_chars()} "
                    f"({ENV_MAX_PROMPT_CHARS})"
                )
    return problems


def verdict(problems: list[str]) -> bool | str:
    """``validate_inputs``' return value: True, or every problem in one message."""
    return True if not problems else " | ".join(dict.fromkeys(problems))


def collect(problems: list[str], fn, *args, **kw) -> Any:
    """Run a checking function that raises ValueError; record its message instead of raising."""
    try:
        return fn(*args, **kw)
    except ValueError as e:
        problems.append(str(e))
        return None


# ---------------------------------------------------------------------------------- confinement


def folder_roots(folder: str) -> list[str]:
    """The resolved roots of a ComfyUI model folder (models/<folder> and extra_model_paths entries)."""
    try:
        return real_roots(folder_paths.get_folder_paths(folder))
    except KeyError:
        return []


def confined_model_file(node: str, input_name: str, folder: str, name: str) -> str:
    """The resolved path of file ``name`` in ComfyUI model folder ``folder``; refused unless it lies
    (symlinks followed) under one of the folder's roots or ``XSR_ALLOWED_ROOTS``."""
    path = folder_paths.get_full_path(folder, name) if name else None
    roots = folder_paths.get_folder_paths(folder)
    if path is None:
        raise ValueError(f"{node}: {input_name} '{name}' was not found in models/{folder} ({', '.join(roots)}).")
    try:
        return confine(path, [*folder_roots(folder), *env_roots()], what=f"{node}: {input_name} file")
    except PathConfinementError as e:
        raise ValueError(str(e)) from None


def check_folder_name(node: str, input_name: str, name: str, where: str) -> str:
    """A plain folder name (any printable characters except path separators, '.' and '..')."""
    stripped = (name or "").strip()
    if not stripped:
        raise ValueError(f"{node}: '{input_name}' is empty; name a folder in {where}.")
    bad = [c for c in name if not c.isprintable()]
    if bad:
        raise ValueError(f"{node}: '{input_name}' {name!r} contains non-printable characters; use a plain folder name.")
    if name != stripped:
        raise ValueError(f"{node}: '{input_name}' {name!r} starts or ends with spaces; remove them.")
    if "/" in name or "\\" in name or name in (".", "..") or os.path.isabs(name):
        raise ValueError(
            f"{node}: '{input_name}' '{name}' must be a plain folder name inside {where} (no path separators or '..')."
        )
    if len(name.encode("utf-8")) > 200:
        raise ValueError(f"{node}: '{input_name}' is {len(name.encode('utf-8'))} bytes long; use at most 200.")
    return name
