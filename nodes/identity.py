"""The trained ControlNet runs: check the CONTROL_NET an adapter is applied to against the one it was trained with.

``train export`` records in the adapter file the fingerprint (:mod:`xsr_core.fingerprint`) of the
ControlNet it wrote (``models/controlnet/xsr_controlnet.safetensors``) and of the base U-Net. The
adapter's gates were learnt together with that ControlNet's weights, so on another ControlNet (e.g. the
stock tile ControlNet, stage 2's *initialisation*) the adapter is not the trained model.
:func:`check_controlnet` raises a clear error naming both files unless the user allows it (then it warns
once). Fingerprints of live models are cached per model object (a weak key), so a prompt pays nothing
after the first.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

from ..xsr_core import fingerprint as wfp

logger = logging.getLogger(__name__)

META_CONTROLNET = "xsr.controlnet_fingerprint"
META_CONTROLNET_FILE = "xsr.controlnet_file"
META_UNET = "xsr.base_unet_fingerprint"

_live: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_files: dict[tuple[str, int, int], dict] = {}
_warned: set[tuple] = set()


def live_fingerprint(module: Any) -> dict:
    """Fingerprint of a live torch module, computed once per module object."""
    fp = _live.get(module)
    if fp is None:
        fp = wfp.fingerprint_module(module)
        _live[module] = fp
    return fp


def _file_fingerprint(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _files:
        try:
            _files[key] = wfp.fingerprint_file(path)
        except wfp.FingerprintError:
            return None
    return _files[key]


def controlnet_file_name(fp: dict) -> str | None:
    """The models/controlnet file whose weights match ``fp`` (ComfyUI keeps no file name on a CONTROL_NET)."""
    try:
        import folder_paths
    except ImportError:  # pragma: no cover - always present inside ComfyUI
        return None
    for name in folder_paths.get_filename_list("controlnet"):
        path = folder_paths.get_full_path("controlnet", name)
        if path and path.endswith(".safetensors"):
            other = _file_fingerprint(path)
            if other is not None and wfp.same_weights(fp, other):
                return name
    return None


def _warn_once(key: tuple, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def check_controlnet(
    adapter_path: str,
    adapter_meta: dict[str, str],
    control_net: Any,
    allow_other: bool,
    *,
    node: str = "XSR_AdaINPatch",
) -> None:
    """Raise ValueError when ``control_net`` is not the ControlNet the adapter was trained with.

    ``allow_other``: warn once instead. Adapters exported before fingerprints existed (or random test
    adapters) carry none: they are not checked (a warning once says so). Inputs that are not a full
    ControlNet (no ``control_model``) are left to the binding, which refuses them with its own message.
    """
    module = getattr(control_net, "control_model", None)
    if module is None:
        return
    text = adapter_meta.get(META_CONTROLNET)
    if not text:
        _warn_once(
            ("nofp", adapter_path),
            "%s: %s records no ControlNet fingerprint (exported by an older XSR or not "
            "by `train export`); cannot check that the ControlNet is the one it was trained with",
            node,
            adapter_path,
        )
        return
    want = wfp.loads(text, source=adapter_path)
    have = live_fingerprint(module)
    if wfp.same_weights(want, have):
        return
    trained_name = adapter_meta.get(META_CONTROLNET_FILE, "xsr_controlnet.safetensors")
    found = controlnet_file_name(have)
    connected = (
        f"models/controlnet/{found}" if found else f"a ControlNet not found in models/controlnet ({wfp.describe(have)})"
    )
    msg = (
        f"{node}: the adapter {os.path.basename(adapter_path)} was trained with the ControlNet "
        f"models/controlnet/{trained_name} ({wfp.describe(want)}), but control_net is {connected}. "
        f"Load {trained_name} (written by `python -m xsr_core.train export` beside the adapter) in the "
        f"ControlNetLoader; the tile ControlNet is only stage 2's initialisation. To run the adapter on "
        f"another ControlNet anyway, set allow_other_controlnet = true."
    )
    if not allow_other:
        raise ValueError(msg)
    _warn_once(
        ("allow", adapter_path, want.get("id"), have.get("id")),
        "%s (allowed by allow_other_controlnet: results are not the trained model's)",
        msg.split(" To run")[0],
    )


def check_unet(adapter_path: str, adapter_meta: dict[str, str], model: Any, *, node: str = "XSR_AdaINPatch") -> None:
    """Warn once when the MODEL's U-Net is not the base the adapter was trained on (swapping bases is allowed)."""
    text = adapter_meta.get(META_UNET)
    module = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not text or module is None:
        return
    want, have = wfp.loads(text, source=adapter_path), live_fingerprint(module)
    if not wfp.same_weights(want, have):
        _warn_once(
            ("unet", adapter_path, have.get("id")),
            "%s: the adapter %s was trained on another base U-Net (%s; this one: %s); it may work less well",
            node,
            os.path.basename(adapter_path),
            wfp.describe(want),
            wfp.describe(have),
        )
