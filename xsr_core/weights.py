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
import math
import os
import tempfile
import threading
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


MAX_CONFIG_INT = 1 << 24  # no structural size of an XSR model comes near 16 M (GPT-2's vocab is 50257)
MAX_CONFIG_ITEMS = 4096  # longest list/dict in a config (AdaIN block lists hold 16-32 entries)
NON_PERSISTENT_SLACK = 1 << 26  # elements a model may hold beyond its file (non-persistent buffers, masks)


def check_config_values(cfg: Any, *, source: str, where: str = "config") -> None:
    """Every number in a declared config is finite and bounded; containers are not absurdly long.

    Runs before a model is built from the config, so a file cannot make the loader loop or allocate
    on the strength of its metadata alone.
    """
    if isinstance(cfg, bool) or cfg is None or isinstance(cfg, str):
        if isinstance(cfg, str) and len(cfg) > 4096:
            raise XSRWeightsError(f"{source}: {where} is a {len(cfg)}-character string; the file is damaged or crafted")
        return
    if isinstance(cfg, int):
        if abs(cfg) > MAX_CONFIG_INT:
            raise XSRWeightsError(
                f"{source}: {where} = {cfg} is beyond any XSR model size (limit {MAX_CONFIG_INT}); "
                "the file is damaged or crafted"
            )
        return
    if isinstance(cfg, float):
        if not math.isfinite(cfg) or abs(cfg) > MAX_CONFIG_INT:
            raise XSRWeightsError(
                f"{source}: {where} = {cfg} is not a finite, bounded number; the file is damaged or crafted"
            )
        return
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else None
    if items is None:
        raise XSRWeightsError(f"{source}: {where} has an unsupported value type {type(cfg).__name__}")
    if len(cfg) > MAX_CONFIG_ITEMS:
        raise XSRWeightsError(
            f"{source}: {where} has {len(cfg)} entries (limit {MAX_CONFIG_ITEMS}); the file is damaged or crafted"
        )
    for k, v in items:
        check_config_values(v, source=source, where=f"{where}.{k}" if isinstance(cfg, dict) else f"{where}[{k}]")


def header_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header of ``path`` (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise XSRWeightsError(f"{path}: not a readable .safetensors file ({e}); re-download or re-export it") from e


class _DeclaredSizeGuard:
    """While a model is built on the meta device: stop as soon as it declares more parameters
    (count or elements) than the file holds, so even the meta build stays small. Only the thread
    that entered the guard is counted."""

    def __init__(self, source: str, max_count: int, max_numel: int):
        self.source, self.max_count, self.max_numel = source, max_count, max_numel
        self.count = self.numel = 0

    def __call__(self, module: torch.nn.Module, name: str, param: Any) -> None:
        # the hook is process-wide: count only this thread's build (ComfyUI may be loading models meanwhile)
        if param is None or threading.get_ident() != self._thread:
            return
        self.count += 1
        self.numel += param.numel()
        if self.count > self.max_count or self.numel > self.max_numel:
            raise XSRWeightsError(
                f"{self.source}: its config declares a model larger than the file ({self.count} tensors / "
                f"{self.numel} values so far, the file holds {self.max_count} tensors / {self.max_numel} values); "
                "the metadata is damaged or crafted"
            )

    def __enter__(self) -> "_DeclaredSizeGuard":
        from torch.nn.modules.module import register_module_parameter_registration_hook

        self._thread = threading.get_ident()
        self._handle = register_module_parameter_registration_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def check_against_header(cls: type, config: Any, path: str | os.PathLike) -> torch.nn.Module:
    """Build ``cls(config)`` on the meta device (no memory) and compare its tensors with the file header.

    Raises :class:`XSRWeightsError` naming missing / unexpected / mis-shaped tensors, or a config
    declaring more than the file holds, before any real allocation. Returns the meta-device model
    (:func:`load_model` fills it with the file's tensors instead of building the model again).
    """
    shapes = header_shapes(path)
    file_numel = sum(math.prod(s) for s in shapes.values())
    try:
        # twice the file + slack: tied weights (GPT-2's head) register a parameter before tying replaces it
        guard = _DeclaredSizeGuard(str(path), 2 * len(shapes) + 64, 2 * file_numel + (1 << 20))
        with guard, torch.device("meta"):
            meta = cls(config)
    except XSRWeightsError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError, OverflowError, ZeroDivisionError) as e:
        raise XSRWeightsError(
            f"{path}: its {cls.__name__} config cannot build a model ({type(e).__name__}: {e}); "
            "the file is damaged or from an incompatible XSR version"
        ) from e
    want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    total = sum(p.numel() for p in meta.parameters()) + sum(b.numel() for b in meta.buffers())
    if total > file_numel + NON_PERSISTENT_SLACK:
        raise XSRWeightsError(
            f"{path}: its config declares {total} values but the file holds {file_numel}; the "
            "metadata is damaged or crafted"
        )
    missing = sorted(set(want) - set(shapes))
    unexpected = sorted(set(shapes) - set(want))
    wrong = [f"{k} {shapes[k]} (config: {want[k]})" for k in sorted(set(want) & set(shapes)) if shapes[k] != want[k]]

    def _fmt(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensors: {_fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensors: {_fmt(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} tensors of another shape: {_fmt(wrong)}")
    if parts:
        raise XSRWeightsError(f"{path}: does not match its {cls.__name__} config; " + "; ".join(parts))
    return meta


def _fill_meta_model(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> torch.nn.Module | None:
    """``model`` (built on the meta device) holding the tensors of ``sd``, without building it again on the
    CPU: constructing a model runs its random initialisation, which costs more than reading the file (seconds
    for the I2T's GPT-2 on a CPU). Each tensor takes the dtype the model declares (as a copying
    ``load_state_dict`` would), parameters the model ties (one parameter under several names, e.g. GPT-2's
    head and its token embedding) stay tied. Returns None when something stays on the meta device (a tensor
    the file lacks, or a non-persistent buffer the constructor computed on the meta device): the caller then
    builds the model the ordinary way."""
    declared = model.state_dict(keep_vars=True)
    sd = {k: (v.to(declared[k].dtype) if k in declared and v.dtype != declared[k].dtype else v) for k, v in sd.items()}
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        return None
    for names in aliases.values():
        first = model.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, first)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    return model


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

    The declared config is checked first (finite, bounded values) and the model it describes is
    built on the meta device and compared with the tensor shapes in the file header, so a file
    whose metadata declares a huge model is refused before anything is allocated.

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
    check_config_values(cfg, source=str(path))
    try:
        config = config_from_dict(cls.config_class, cfg, source=str(path))
    except (ValueError, TypeError) as e:
        if isinstance(e, XSRWeightsError):
            raise
        raise XSRWeightsError(f"{path}: invalid {cls.__name__} config ({e})") from e
    meta = check_against_header(cls, config, path)  # on the meta device, before any allocation
    sd = load_state_dict(path)
    model = _fill_meta_model(meta, sd)
    if model is not None:
        model.to(device=device)
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()
    logger.debug("%s: %s built on the CPU (its meta-device build left tensors unfilled)", path, cls_name)
    model = cls(config)
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
