"""ComfyUI in-process for the benchmarks (bench_e2e.py, bench_tiled.py) and the in-process test workers.

:func:`start_comfy` does the start-up both benchmarks share: ComfyUI on ``sys.path`` (CPU when there is no
CUDA, API nodes off), the model files written by the caller's ``make_models`` into ``<work>/models``, PyAV
stubbed where missing, ComfyUI's folders pointed at the work folder, this pack (and, for ``--tiny``, the
test-support pack) loaded as custom nodes, and a server-less ``PromptExecutor`` without caches.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
MODEL_FOLDERS = (
    "checkpoints",
    "diffusion_models",
    "controlnet",
    "vae",
    "text_encoders",
    "clip_vision",
    "xsr",
    "xsr_refdb",
)


def stub_av() -> None:
    """PyAV is only needed by ComfyUI's video types; the GPU image lacks it. Stub it for the benchmarks."""
    try:
        import av  # noqa: F401

        return
    except ImportError:
        pass
    for name in (
        "av",
        "av.container",
        "av.subtitles",
        "av.subtitles.stream",
        "av.video",
        "av.video.frame",
        "av.audio",
        "av.audio.frame",
        "av.error",
    ):
        mod = types.ModuleType(name)
        mod.__path__ = []  # package-like
        sys.modules[name] = mod
    sys.modules["av.container"].InputContainer = type("InputContainer", (), {})
    sys.modules["av.container"].OutputContainer = type("OutputContainer", (), {})
    sys.modules["av.subtitles.stream"].SubtitleStream = type("SubtitleStream", (), {})
    sys.modules["av.video.frame"].VideoFrame = type("VideoFrame", (), {})
    sys.modules["av.audio.frame"].AudioFrame = type("AudioFrame", (), {})
    sys.modules["av"].time_base = 1


@dataclass
class InProcessComfy:
    device: str  # "cuda" or "cpu"
    work: Path  # the work folder: models/, input/, output/, temp/, custom_nodes/
    names: dict[str, str]  # what make_models returned: the model file names
    execution: Any  # ComfyUI's execution module (validate_prompt, get_output_data)
    executor: Any  # execution.PromptExecutor, classic cache without LRU / RAM caching


def start_comfy(
    comfy_dir: str, workdir: str | None, prefix: str, tiny: bool, make_models: Callable[[Path, bool, str], dict]
) -> InProcessComfy:
    """Start ComfyUI in this process with this pack on freshly written models (see the module docstring).

    ``make_models(models_dir, tiny, device)`` writes the model files and returns their names; it runs after
    torch and ComfyUI's arguments are set up and before PyAV is stubbed (diffusers probes for ``av``).
    """
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    comfy.cli_args.args.disable_api_nodes = True
    work = Path(workdir or tempfile.mkdtemp(prefix=prefix))
    models = work / "models"
    t0 = time.time()
    names = make_models(models, tiny, device)
    print(f"models written in {time.time() - t0:.0f} s", flush=True)
    stub_av()  # after diffusers (which probes for av with find_spec), before ComfyUI
    if device == "cuda":
        torch.cuda.empty_cache()

    import folder_paths

    folder_paths.set_output_directory(str(work / "output"))
    folder_paths.set_input_directory(str(work / "input"))
    folder_paths.set_temp_directory(str(work / "temp"))
    for sub in MODEL_FOLDERS:
        folder_paths.add_model_folder_path(sub, str(models / sub), is_default=True)
    cn_dir = work / "custom_nodes"
    cn_dir.mkdir(exist_ok=True)
    link = cn_dir / "comfyui-xsr"
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    if tiny:
        sup = REPO / "tests" / "comfy" / "support" / "xsr_test_support"
        (cn_dir / sup.name).exists() or (cn_dir / sup.name).symlink_to(sup, target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(cn_dir)], set())
    import utils.extra_config  # noqa: F401  (ComfyUI: before nodes)
    import nodes
    import execution

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

    class Server:
        client_id = None
        last_node_id = None
        last_prompt_id = None

        def send_sync(self, *a, **k):
            pass

        def queue_updated(self):
            pass

    # 0.33 reads "ram_inactive" too (its RAM-pressure cache; CLASSIC ignores it, 0.3.75 does not know it)
    executor = execution.PromptExecutor(
        Server(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0}
    )
    return InProcessComfy(device, work, names, execution, executor)
