"""#11.1: XSR_AdaINPatch runs the adapter only on the ControlNet it was trained with (live ComfyUI prompts).

An adapter file records the fingerprint of its ControlNet (``train export``). Here the tiny zoo's
adapter is re-saved with the fingerprint of (a) the zoo ControlNet file the graph loads, (b) another
ControlNet file; (a) runs, (b) fails naming both files, and (b) with ``allow_other_controlnet`` runs.
(a) also proves that the fingerprint of a file and of the model ComfyUI loaded from it agree.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xsr_core import fingerprint as wfp
from xsr_core.comfy_server import ComfyError
from xsr_core.demo import xsr_graph
from xsr_core.testing.zoo import CONTROLNET_NAME, ZOO_NAMES
from xsr_core.weights import load_model, save_model
from xsr_helpers import upload_lr8

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def files(comfy, tiny_zoo):
    """Two adapters (recording the zoo ControlNet / another one) and the other ControlNet file, in the
    server's models folder (each server of the matrix has its own)."""
    from xsr_core.adapter import AdaINAdapter
    from xsr_core.testing.zoo import build_tiny_sd, write_controlnet

    root = Path(comfy.base_dir) / "models"
    other = write_controlnet(
        build_tiny_sd(seed=7)[3], root / "controlnet" / "xsr_identity_other_controlnet.safetensors"
    )
    adapter = load_model(tiny_zoo["adapter"], expected=AdaINAdapter)
    names = {}
    for tag, cn in (("same", tiny_zoo["controlnet"]), ("other", other)):
        name = f"xsr_identity_{tag}.safetensors"
        save_model(
            adapter,
            root / "xsr" / name,
            extra_metadata={
                "xsr.controlnet_fingerprint": wfp.dumps(wfp.fingerprint_file(cn)),
                "xsr.controlnet_file": cn.name,
            },
        )
        names[tag] = name
    return names


@pytest.fixture(scope="module")
def lr(comfy, tmp_path_factory):
    return upload_lr8(comfy, tmp_path_factory.mktemp("ident"), "ident_lr8.png", 5)


def _graph(lr, adapter, allow=False):
    g = xsr_graph(lr, **ZOO_NAMES, adapter=adapter, steps=1)
    g["patch"]["inputs"]["allow_other_controlnet"] = allow
    return g


def test_adapter_runs_on_its_own_controlnet(comfy, files, lr):
    entry = comfy.run(_graph(lr, files["same"]))
    assert comfy.output_images(entry, "save")


def test_other_controlnet_is_a_clear_error_naming_both_files(comfy, files, lr):
    with pytest.raises(ComfyError) as err:
        comfy.run(_graph(lr, files["other"]))
    msg = str(err.value)
    assert "XSR_AdaINPatch" in msg and files["other"] in msg
    assert "xsr_identity_other_controlnet.safetensors" in msg  # the ControlNet it was trained with
    assert f"models/controlnet/{CONTROLNET_NAME}" in msg  # the connected one, found by its fingerprint
    assert "allow_other_controlnet" in msg
    # the server keeps serving, and the explicit option runs the graph anyway (with a warning)
    entry = comfy.run(_graph(lr, files["other"], allow=True))
    assert comfy.output_images(entry, "save")
    assert "allowed by allow_other_controlnet" in comfy.log_text()
