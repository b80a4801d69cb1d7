"""Weights I/O: one ``.safetensors`` per model, self-describing through its metadata.

The header metadata carries the format version, the model class name and its JSON config (plus
optional extras), so a file rebuilds its model alone (diffusers ``save_pretrained`` discipline,
nanoGPT ``model_args``). Loading is strict: a missing or unexpected tensor is an error that names
the file and the keys. Formats are never guessed from file names. No pickle anywhere.

A model class takes part by being decorated with :func:`register` and having a ``config_class``
(a dataclass) attribute, an ``__init__(config)`` and a ``config`` attribute.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .paths import default_file_mode

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FORMAT = "xsr.format_version"
META_CLASS = "xsr.class"
META_CONFIG = "xsr.config"

_REGISTRY: dict[str, type[torch.nn.Module]] = {}
T = TypeVar("T", bound=type)


class XSRWeightsError(ValueError):
    """A weights file that cannot be read as the model asked for."""


def register(cls: T) -> T:
    """Class decorator: make ``cls`` loadable by :func:`load_model` under its class name."""
    if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
        raise TypeError(f"{cls.__name__} needs a dataclass `config_class` attribute to be registered")
    _REGISTRY[cls.__name__] = cls
    return cls


def registered_classes() -> dict[str, type[torch.nn.Module]]:
    return dict(_REGISTRY)


def config_to_json(config: Any) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_dict(config_class: type, data: dict[str, Any], *, source: str = "") -> Any:
    """Build a config dataclass from a dict, ignoring nothing silently.

    Keys unknown to this version of the class are an error (a file from a newer XSR); missing keys
    take the dataclass defaults (a file from an older XSR, since config keys are only ever added).
    """
    names = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise XSRWeightsError(
            f"{source}: config keys {unknown} are unknown to {config_class.__name__}; the file was "
            "written by a newer XSR version: update the node pack."
        )
    # Nested dataclass fields (e.g. lists of block specs) are rebuilt by the config's own __post_init__.
    return config_class(**data)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the safetensors header metadata of ``path`` (raises XSRWeightsError if unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise XSRWeightsError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise XSRWeightsError(f"{path}: not a readable .safetensors file ({e}); re-download or re-export it") from e


def describe(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(class name, config dict) of an XSR weights file, without loading its tensors."""
    meta = read_metadata(path)
    if META_CLASS not in meta or META_CONFIG not in meta:
        raise XSRWeightsError(
            f"{path}: no XSR metadata ({META_CLASS}/{META_CONFIG}); this is not an XSR weights file "
            "(an SD checkpoint, ControlNet or CLIP file goes in its own ComfyUI models folder)."
        )
    version = int(meta.get(META_FORMAT, "0"))
    if version > FORMAT_VERSION:
        raise XSRWeightsError(
            f"{path}: format version {version} is newer than this XSR ({FORMAT_VERSION}); update the node pack."
        )
    try:
        cfg = json.loads(meta[META_CONFIG])
    except json.JSONDecodeError as e:
        raise XSRWeightsError(f"{path}: corrupt config metadata ({e})") from e
    return meta[META_CLASS], cfg


def save_model(
    model: torch.nn.Module, path: str | os.PathLike, *, extra_metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model`` (a registered class) to ``path`` atomically (temp file + rename).

    Tensors are stored contiguous, with shared storage broken (safetensors refuses aliases).
    ``extra_metadata`` values must be strings; keys must not clash with the ``xsr.*`` core keys.
    """
    cls_name = type(model).__name__
    if cls_name not in _REGISTRY:
        raise TypeError(f"{cls_name} is not registered with xsr_core.weights.register")
    meta = {META_FORMAT: str(FORMAT_VERSION), META_CLASS: cls_name, META_CONFIG: config_to_json(model.config)}
    for k, v in (extra_metadata or {}).items():
        if k in meta:
            raise ValueError(f"extra metadata key {k!r} clashes with a core key")
        if not isinstance(v, str):
            raise TypeError(f"metadata value for {k!r} must be str, got {type(v).__name__}")
        meta[k] = v
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.chmod(tmp, default_file_mode())  # mkstemp creates 0600; a model file is as readable as any other
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.debug("saved %s (%d tensors) to %s", cls_name, len(tensors), path)
    return path


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise XSRWeightsError(f"{path}: cannot read tensors ({e}); the file is truncated or corrupt") from e


def load_model(
    path: str | os.PathLike,
    *,
    expected: str | type | tuple[str | type, ...] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Rebuild the model stored in ``path`` and load its weights strictly.

    ``expected`` (class or class name, or a tuple of them) guards against a file of the wrong kind,
    e.g. an RFA file chosen where the AdaIN adapter is needed.
    """
    cls_name, cfg = describe(path)
    if expected is not None:
        wanted = expected if isinstance(expected, tuple) else (expected,)
        names = [w if isinstance(w, str) else w.__name__ for w in wanted]
        if cls_name not in names:
            raise XSRWeightsError(f"{path} holds a {cls_name} model, but a {' or '.join(names)} file is needed here")
    cls = _REGISTRY.get(cls_name)
    if cls is None:
        raise XSRWeightsError(f"{path}: model class {cls_name!r} is unknown to this XSR version; update the node pack")
    config = config_from_dict(cls.config_class, cfg, source=str(path))
    model = cls(config)
    sd = load_state_dict(path)
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def _fmt(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} tensors: {_fmt(result.missing_keys)}")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} tensors: {_fmt(result.unexpected_keys)}")
        raise XSRWeightsError(f"{path}: does not match its {cls_name} config; " + "; ".join(parts))
    model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model.eval()
