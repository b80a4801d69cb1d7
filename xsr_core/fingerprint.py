"""Cheap, deterministic identity of a model's weights (the ControlNet and base U-Net an adapter was trained with).

The reference DB hashes every byte of its CLIP vision encoder (:func:`xsr_core.clip_vision.fingerprint_state_dict`);
that costs seconds for 0.3 GB and would cost more for a 1.4 GB ControlNet on every prompt. Here each tensor
contributes its name, its shape and :data:`SAMPLES` elements at fixed, evenly strided positions of its
flattened values, canonicalised to float16. So:

- it is computed in one pass of small gathers (no full-tensor copy), from a live module (any device,
  any dtype) or from a ``.safetensors`` file (only the rows holding the sampled elements are read);
- fp32 / fp16 / bf16 copies of the same weights agree: :func:`same_weights` compares the layout
  exactly and the samples within a bf16-sized tolerance, while retrained weights differ far beyond it
  (every element of a trained tensor moves);
- state dicts are compared in the original LDM key layout ComfyUI holds (``control_model.`` /
  ``model.diffusion_model.`` prefixes stripped; diffusers models are converted with
  :mod:`xsr_core.ldm_keys` first).

A fingerprint is a JSON-able dict: ``{"version", "tensors", "params", "layout", "samples", "id"}``
(``samples`` = base64 of the float16 samples in sorted-name order, ``id`` = a short hash for messages).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

VERSION = 1
SAMPLES = 8  # elements sampled per tensor
STRIP_PREFIXES = ("control_model.", "model.diffusion_model.")
RTOL, ATOL = 1e-2, 1e-4  # bf16 keeps ~3 significant digits


class FingerprintError(ValueError):
    """A fingerprint that cannot be computed or read."""


def _positions(numel: int) -> list[int]:
    k = min(SAMPLES, numel)
    return [(j * numel) // k for j in range(k)]


def _canonical_name(name: str) -> str:
    for p in STRIP_PREFIXES:
        if name.startswith(p):
            return name[len(p) :]
    return name


def _finish(entries: list[tuple[str, tuple[int, ...], np.ndarray]]) -> dict[str, Any]:
    entries.sort(key=lambda e: e[0])
    layout = hashlib.sha256(json.dumps([[n, list(s)] for n, s, _ in entries]).encode()).hexdigest()
    samples = np.concatenate([v for _, _, v in entries]).astype(np.float16) if entries else np.zeros(0, np.float16)
    raw = samples.tobytes()
    return {
        "version": VERSION,
        "tensors": len(entries),
        "params": int(sum(int(np.prod(s)) for _, s, _ in entries)),
        "layout": layout,
        "samples": base64.b64encode(raw).decode(),
        "id": hashlib.sha256(layout.encode() + raw).hexdigest()[:16],
    }


@torch.no_grad()
def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Fingerprint of a state dict (live tensors on any device/dtype); keys in the LDM layout."""
    picked = []  # (name, shape, sampled values on the tensor's device)
    index: dict[tuple[torch.device, int], torch.Tensor] = {}
    for name, t in state_dict.items():
        if not torch.is_tensor(t) or not t.is_floating_point():
            continue  # integer buffers (position ids, step counters) are not weights
        flat = t.detach().reshape(-1)
        key = (flat.device, flat.numel())
        if key not in index:
            index[key] = torch.tensor(_positions(flat.numel()), dtype=torch.long, device=flat.device)
        picked.append((_canonical_name(name), tuple(t.shape), flat[index[key]].float()))
    if not picked:
        raise FingerprintError("fingerprint: the state dict holds no floating-point tensors")
    # one device-to-host copy per device, not one per tensor (a model on the GPU has hundreds)
    host: dict[int, np.ndarray] = {}
    for dev in {v.device for _, _, v in picked}:
        mine = [i for i, (_, _, v) in enumerate(picked) if v.device == dev]
        flat = torch.cat([picked[i][2] for i in mine]).cpu().numpy().astype(np.float16)
        for i, part in zip(mine, np.split(flat, np.cumsum([picked[i][2].numel() for i in mine])[:-1])):
            host[i] = part
    return _finish([(n, shape, host[i]) for i, (n, shape, _) in enumerate(picked)])


def fingerprint_module(module: torch.nn.Module) -> dict[str, Any]:
    """:func:`fingerprint_state_dict` of ``module.state_dict()``."""
    return fingerprint_state_dict(module.state_dict())


def fingerprint_diffusers(model: torch.nn.Module, *, controlnet: bool) -> dict[str, Any]:
    """Fingerprint of a diffusers U-Net / ControlNet in the LDM layout (what its exported file and ComfyUI hold)."""
    from .ldm_keys import unet_diffusers_to_ldm

    return fingerprint_state_dict(unet_diffusers_to_ldm(model.state_dict(), dict(model.config), controlnet=controlnet))


def fingerprint_file(path: str | os.PathLike, *, prefix: str | None = None) -> dict[str, Any]:
    """Fingerprint of a ``.safetensors`` file without loading it whole (only sampled rows are read).

    ``prefix``: keep only keys starting with it (e.g. ``"model.diffusion_model."`` for the U-Net of a
    full SD checkpoint); prefixes in :data:`STRIP_PREFIXES` are stripped either way.
    """
    from safetensors import SafetensorError, safe_open

    entries = []
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if prefix is not None and not name.startswith(prefix):
                    continue
                sl = f.get_slice(name)
                shape = tuple(sl.get_shape())
                if sl.get_dtype() not in ("F16", "F32", "BF16", "F64"):
                    continue
                numel = int(np.prod(shape)) if shape else 1
                if not shape:
                    vals = f.get_tensor(name).reshape(1)
                else:
                    row = numel // shape[0] if shape[0] else 0
                    vals = (
                        torch.stack([sl[p // row : p // row + 1].reshape(-1)[p % row] for p in _positions(numel)])
                        if numel
                        else torch.zeros(0)
                    )
                entries.append((_canonical_name(name), shape, vals.float().numpy().astype(np.float16)))
    except (SafetensorError, OSError) as e:
        raise FingerprintError(f"{path}: cannot read as .safetensors ({e})") from e
    if not entries:
        raise FingerprintError(f"{path}: no floating-point tensors{f' under {prefix!r}' if prefix else ''}")
    return _finish(entries)


def _samples(fp: Mapping[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(fp["samples"]), dtype=np.float16).astype(np.float32)


def same_weights(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two fingerprints describe the same weights (same layout; samples equal up to dtype rounding)."""
    if a.get("version") != b.get("version") or a.get("layout") != b.get("layout"):
        return False
    if a.get("id") == b.get("id"):
        return True
    sa, sb = _samples(a), _samples(b)
    return sa.shape == sb.shape and bool(np.allclose(sa, sb, rtol=RTOL, atol=ATOL, equal_nan=True))


def dumps(fp: Mapping[str, Any]) -> str:
    """A fingerprint as the JSON string stored in safetensors metadata."""
    return json.dumps(dict(fp), sort_keys=True)


def loads(text: str, *, source: str = "metadata") -> dict[str, Any]:
    try:
        fp = json.loads(text)
    except json.JSONDecodeError as e:
        raise FingerprintError(f"{source}: corrupt weight fingerprint ({e})") from None
    if not isinstance(fp, dict) or "layout" not in fp or "samples" not in fp:
        raise FingerprintError(f"{source}: not a weight fingerprint")
    return fp


def describe(fp: Mapping[str, Any]) -> str:
    """Short human description: id, tensor and parameter counts."""
    return f"fingerprint {fp.get('id')} ({fp.get('tensors')} tensors, {fp.get('params'):,} parameters)"


def file_name_of(fp: Mapping[str, Any], folder: str | os.PathLike | None, files: list[str]) -> str | None:
    """The first of ``files`` (names under ``folder``) whose fingerprint matches ``fp``, else None."""
    for name in files:
        path = Path(folder) / name if folder else Path(name)
        if path.suffix != ".safetensors" or not path.is_file():
            continue
        try:
            if same_weights(fp, fingerprint_file(path)):
                return name
        except FingerprintError:
            continue
    return None
