"""XSR's models load whole in every VRAM mode (ComfyUI's lowvram/novram path), never half on the CPU.

Under ``--novram`` ComfyUI 0.33 gives every model a ~0 byte weight budget and streams only ``comfy.ops``
layers; a plain PyTorch layer that does not fit stays on the offload device and runs there (seen on an
H200: the RFA, I2T and adapter ran on the CPU). The check drives ComfyUI's own ``LoadedModel`` exactly as
``load_models_gpu`` does in NO_VRAM mode (weight budget 0.1 bytes), in a subprocess per ComfyUI version of
the matrix (ComfyUI's modules keep global state), for XSR's patchers and, as the control that shows the
check can fail, for a stock ModelPatcher around the same model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.comfy

# both workers: ComfyUI on the CPU, its model management, and this pack loaded as ComfyUI would load it
PREAMBLE = textwrap.dedent(
    """
    import importlib, importlib.util, json, logging, os, sys
    from pathlib import Path
    comfy_dir, repo = sys.argv[1], Path(sys.argv[2])
    sys.path.insert(0, comfy_dir)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    init = repo / "__init__.py"
    spec = importlib.util.spec_from_file_location("comfyui_xsr", init, submodule_search_locations=[str(repo)])
    sys.modules["comfyui_xsr"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["comfyui_xsr"])
    """
)


def run_worker(body: str, tmp_path: Path, comfy_dir, *, cpu: bool = True) -> dict:
    """Run PREAMBLE + ``body`` in a fresh interpreter (ComfyUI's modules keep global state); ``body`` writes a
    JSON report to ``sys.argv[3]``, returned here. ``cpu=False``: ComfyUI picks its device (CUDA tests)."""
    out = tmp_path / "report.json"
    preamble = PREAMBLE if cpu else PREAMBLE.replace("comfy.cli_args.args.cpu = True", "")
    proc = subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(body), str(comfy_dir), str(REPO), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


WHOLE_LOAD = """
    common = importlib.import_module("comfyui_xsr.nodes.common")
    binding = importlib.import_module("comfyui_xsr.nodes.comfy_binding")
    from comfyui_xsr.xsr_core.models.rfa import RFA, RFAConfig

    cfg = RFAConfig(clip_dim=32, width=32, depth=2, heads=4, num_patches=4, out_dim=32)
    dev = torch.device("cpu")
    out = {}
    for name, cls in (("stock", comfy.model_patcher.ModelPatcher), ("xsr", common.WholeModelPatcher),
                      ("adapter", binding.XSRAdapterPatcher)):
        patcher = cls(RFA(cfg), load_device=dev, offload_device=dev)
        loaded = mm.LoadedModel(patcher)
        loaded.model_load(0.1)  # what load_models_gpu passes in NO_VRAM mode
        row = {"size": patcher.model_size(), "loaded": patcher.loaded_size()}
        row["fully_unloaded"] = bool(loaded.model_unload(memory_to_free=1))  # ComfyUI asks back 1 byte
        out[name] = row
    Path(sys.argv[3]).write_text(json.dumps(out))
"""


def test_xsr_models_load_whole_under_a_novram_budget(tmp_path, comfy_dir):
    rows = run_worker(WHOLE_LOAD, tmp_path, comfy_dir)
    # the control: a stock patcher leaves the plain PyTorch layers of the model unloaded (they would run on
    # the offload device), so the check below can fail
    assert rows["stock"]["loaded"] < rows["stock"]["size"], rows
    for name in ("xsr", "adapter"):
        row = rows[name]
        assert row["loaded"] == row["size"] > 0, (name, row)
        # asked for memory back, ComfyUI unloads it whole instead of leaving a half-loaded model behind
        assert row["fully_unloaded"], (name, row)


OFFLOAD = """
    loaders = importlib.import_module("comfyui_xsr.nodes.loaders")
    warnings = []
    logging.getLogger(loaders.__name__).addHandler(
        type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})()
    )

    class Patcher:  # what offload_after_use reads of a ModelPatcher
        def __init__(self, device):
            self.load_device = torch.device(device)

    class Loaded:  # a comfy.model_management.LoadedModel holding it
        def __init__(self, patcher):
            self.model, self.unloaded = patcher, False

        def model_unload(self):
            self.unloaded = True
            return True

    out = {"policies": {}, "default": loaders.DEFAULT_OFFLOAD}
    for env in (None, "none", " STAGE1 ", "rfa", "bogus"):
        if env is None:
            os.environ.pop("XSR_OFFLOAD", None)
        else:
            os.environ["XSR_OFFLOAD"] = env
        rfa, i2t, cpu_rfa = Patcher("cuda"), Patcher("cuda"), Patcher("cpu")
        held = [Loaded(p) for p in (rfa, i2t, cpu_rfa)]
        mm.current_loaded_models.extend(held)
        try:
            got = {
                "policy": loaders.offload_policy(),
                "rfa": loaders.offload_after_use(rfa, "rfa"),
                "i2t": loaders.offload_after_use(i2t, "i2t"),
                "cpu": loaders.offload_after_use(cpu_rfa, "rfa"),
                "still_held": [i for i, h in enumerate(held) if h in mm.current_loaded_models],
                "unload_called": [h.unloaded for h in held],
            }
        finally:
            for h in held:
                if h in mm.current_loaded_models:
                    mm.current_loaded_models.remove(h)
        out["policies"][str(env)] = got
    out["warnings"] = warnings
    Path(sys.argv[3]).write_text(json.dumps(out))
"""


def test_offload_policies_hand_back_what_they_name(tmp_path, comfy_dir):
    r = run_worker(OFFLOAD, tmp_path, comfy_dir)
    p = r["policies"]
    assert r["default"] == "rfa"
    # rfa (also the default, unset): only the RFA goes back (unloaded and dropped from ComfyUI's list); a CPU
    # model never
    for env in ("rfa", "None"):
        assert p[env] == {
            "policy": "rfa",
            "rfa": True,
            "i2t": False,
            "cpu": False,
            "still_held": [1, 2],
            "unload_called": [True, False, False],
        }, p[env]
    # none: nothing goes back
    assert p["none"]["policy"] == "none" and (p["none"]["rfa"], p["none"]["i2t"]) == (False, False), p["none"]
    assert p["none"]["unload_called"] == [False, False, False] and p["none"]["still_held"] == [0, 1, 2], p["none"]
    assert p[" STAGE1 "]["policy"] == "stage1" and (p[" STAGE1 "]["rfa"], p[" STAGE1 "]["i2t"]) == (True, True)
    assert p["bogus"]["policy"] == "rfa" and any("'bogus'" in w for w in r["warnings"]), r


HOST_COPY = """
    common = importlib.import_module("comfyui_xsr.nodes.common")
    from comfyui_xsr.xsr_core.models.rfa import RFA, RFAConfig

    def cycle():
        torch.manual_seed(0)
        model = RFA(RFAConfig(clip_dim=32, width=32, depth=2, heads=4, num_patches=4, out_dim=32))
        model.register_buffer("steps", torch.arange(3))  # a buffer goes along as the weights do
        model.tied = torch.nn.Linear(32, 32, bias=False)
        model.tied.weight = model.head.weight  # a tied weight (as GPT-2's head) is one tensor: copied once
        want = {k: v.clone() for k, v in model.state_dict().items()}
        unique = {t.data_ptr(): t for t in model.state_dict().values()}  # the tied weight once
        size = sum(t.numel() * t.element_size() for t in unique.values())
        host = common.PinnedHostCopy(pin=False)  # page-locked memory needs CUDA; the bookkeeping does not

        def reload():  # what a load does: new device tensors, then the patcher notes them
            model._apply(lambda t: t.clone())
            host.note_loaded(model)

        def on_host():
            return all(t.untyped_storage().data_ptr() == host.buffer.untyped_storage().data_ptr()
                       for _, _, t in host.tensors(model))

        out = {"size": size, "copied": [host.offload(model)], "on_host": [on_host()]}
        out["aligned"] = all(v.data_ptr() % host.ALIGN == 0 for v in host.views.values())
        reload()
        out["on_host"].append(on_host())
        out["copied"].append(host.offload(model))  # unchanged since its load: nothing to copy
        reload()
        if torch.is_inference_mode_enabled():  # no versions there: a weight replaced by another tensor
            model.head.weight.data = model.head.weight * 2
        else:  # an in-place change on the device bumps the tensor's version
            with torch.no_grad():
                model.head.weight.mul_(2)
        want["head.weight"] *= 2
        want["tied.weight"] *= 2
        out["copied"].append(host.offload(model))
        out["one_weight"] = model.head.weight.numel() * model.head.weight.element_size()
        out["equal"] = all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
        out["params_kept"] = all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
        out["still_tied"] = model.tied.weight is model.head.weight
        # a load from the host copy: one buffer moved, every weight a slice of it, same values, still tied
        out["buffer"] = host.buffer.numel()
        out["staged"] = host.stage(model, torch.device("cpu"))
        storages = {t.untyped_storage().data_ptr() for _, _, t in host.tensors(model)}
        out["staged_one_buffer"] = len(storages) == 1 and not on_host()
        out["staged_equal"] = all(torch.equal(model.state_dict()[k], v) for k, v in want.items())
        out["staged_tied"] = model.tied.weight is model.head.weight and model.steps.tolist() == [0, 1, 2]
        out["staged_again"] = host.stage(model, torch.device("cpu"))  # not on the host copy now: nothing to do
        return out

    report = {"plain": cycle()}
    with torch.inference_mode():  # how ComfyUI runs nodes (and so loads and unloads models)
        report["inference"] = cycle()
    Path(sys.argv[3]).write_text(json.dumps(report))
"""


def test_pinned_host_copy_is_made_once_and_refreshed_only_where_weights_changed(tmp_path, comfy_dir):
    report = run_worker(HOST_COPY, tmp_path, comfy_dir)
    for mode, r in report.items():
        # the first offload copies everything, an unchanged reload nothing, a changed weight only itself
        assert r["copied"] == [r["size"], 0, r["one_weight"]], (mode, r)
        assert r["on_host"] == [True, False] and r["aligned"], (mode, r)
        assert r["equal"] and r["params_kept"] and r["still_tied"], (mode, r)
        assert r["staged"] == r["buffer"] and r["staged_one_buffer"], (mode, r)
        assert r["staged_equal"] and r["staged_tied"] and r["staged_again"] == 0, (mode, r)


PIN_FAILS = """
    common = importlib.import_module("comfyui_xsr.nodes.common")
    from comfyui_xsr.xsr_core.models.rfa import RFA, RFAConfig

    common._pinning_allowed = lambda: True  # as on a CUDA machine; here page-locked memory cannot be had
    model = RFA(RFAConfig(clip_dim=32, width=32, depth=2, heads=4, num_patches=4, out_dim=32))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    patcher = common.WholeModelPatcher(model, load_device=torch.device("cuda"), offload_device=torch.device("cpu"))
    warnings = []
    logging.getLogger(common.__name__).addHandler(
        type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})()
    )
    with torch.inference_mode():
        patcher.unpatch_model(torch.device("cpu"), unpatch_weights=True)  # what ComfyUI's unload calls
    out = {
        "device": str(model.device),
        "equal": all(torch.equal(model.state_dict()[k], v) for k, v in want.items()),
        "host_copy": model._xsr_host_copy is not None,
        "warnings": warnings,
    }
    Path(sys.argv[3]).write_text(json.dumps(out))
"""


def test_unload_without_page_locked_memory_falls_back_to_comfyui_s_way(tmp_path, comfy_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("page-locked memory can be had here: the failure is what this test needs")
    r = run_worker(PIN_FAILS, tmp_path, comfy_dir)
    assert r["device"] == "cpu" and r["equal"] and not r["host_copy"], r
    assert any("no pinned host copy" in w for w in r["warnings"]), r


CUDA_CYCLE = """
    import time
    common = importlib.import_module("comfyui_xsr.nodes.common")
    from comfyui_xsr.xsr_core.models.rfa import RFA, RFAConfig

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = RFA(RFAConfig()).half()  # the real RFA's shapes (101 MiB in fp16)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    for name, cls in (("stock", comfy.model_patcher.ModelPatcher), ("xsr", common.WholeModelPatcher)):
        patcher = cls(model, load_device=dev, offload_device=torch.device("cpu"))
        times, pinned, equal, one = [], [], [], []
        for _ in range(4):
            with torch.inference_mode():  # as ComfyUI runs nodes
                loaded = mm.LoadedModel(patcher)
                torch.cuda.synchronize(); t0 = time.perf_counter()
                loaded.model_load(0)  # a full load
                torch.cuda.synchronize(); t1 = time.perf_counter()
                on_gpu = all(p.device.type == "cuda" for p in model.parameters())
                one.append(len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1)
                loaded.model_unload()
                torch.cuda.synchronize(); t2 = time.perf_counter()
            times.append([(t1 - t0) * 1e3, (t2 - t1) * 1e3])
            pinned.append(on_gpu and all(p.device.type == "cpu" and p.is_pinned() for p in model.parameters()))
            equal.append(all(torch.equal(model.state_dict()[k].cpu(), v) for k, v in want.items()))
        out[name] = {"load_unload_ms": times, "pinned": pinned, "equal": equal, "one_transfer": one}
    out["mib"] = sum(v.numel() * v.element_size() for v in want.values()) / 2**20
    Path(sys.argv[3]).write_text(json.dumps(out))
"""


def test_xsr_unload_reload_cycle_keeps_weights_pinned_on_cuda(tmp_path, comfy_dir):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the GPU machine: bench/run_gpu_all.sh GPUTEST_T)")
    r = run_worker(CUDA_CYCLE, tmp_path, comfy_dir, cpu=False)
    ms = {k: r[k]["load_unload_ms"] for k in ("stock", "xsr")}
    print(f"load / unload ms per cycle of a {r['mib']:.0f} MiB model: {ms}")
    assert all(r["xsr"]["pinned"]) and not any(r["stock"]["pinned"]), r
    assert all(r["xsr"]["equal"]) and all(r["stock"]["equal"]), r
    # reloads from the pinned copy are one transfer into one device buffer (the first load is ComfyUI's own)
    assert r["xsr"]["one_transfer"][1:] == [True] * 3 and not any(r["stock"]["one_transfer"]), r


FAST_LOAD = """
    common = importlib.import_module("comfyui_xsr.nodes.common")
    from comfyui_xsr.xsr_core.models.rfa import RFA, RFAConfig

    dev = mm.get_torch_device()
    calls = []
    original = mm.load_models_gpu
    mm.load_models_gpu = lambda models, *a, **k: (calls.append([id(m) for m in models]), original(models, *a, **k))[1]

    def make():
        model = RFA(RFAConfig(clip_dim=32, width=32, depth=2, heads=4, num_patches=4, out_dim=32))
        return common.WholeModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))

    def rank(p):
        return [i for i, lm in enumerate(mm.current_loaded_models) if lm.model is p]

    a, b = make(), make()
    out = {}
    with torch.inference_mode():
        common.load_models([a, b])  # first load: ComfyUI's call
        out["first"] = calls == [[id(a), id(b)]]
        calls.clear()
        mm.load_models_gpu([b])  # b most recent ...
        calls.clear()
        common.load_models([a, b])  # ... both loaded whole: no ComfyUI call, a and b now the two most recent
        out["warm_calls"] = len(calls)
        out["warm_rank"] = [rank(a), rank(b)]
        out["used"] = all(lm.currently_used for lm in mm.current_loaded_models if lm.model in (a, b))
        for i, lm in enumerate(mm.current_loaded_models):  # what XSR_OFFLOAD does to the RFA
            if lm.model is b:
                lm.model_unload()
                mm.current_loaded_models.pop(i)
                break
        common.load_models([a, b])  # only the dropped one goes through ComfyUI
        out["reload_calls"] = calls == [[id(b)]]
        out["reload_rank"] = [rank(a), rank(b)]
        out["b_loaded"] = b.loaded_size() == b.model_size() and str(b.current_loaded_device()) == str(dev)
        calls.clear()
        c = a.clone()  # another clone of a loaded model: ComfyUI swaps clones, so its call runs
        common.load_models([c])
        out["clone_calls"] = len(calls)
    out["device"] = dev.type
    Path(sys.argv[3]).write_text(json.dumps(out))
"""


def test_load_models_calls_comfyui_only_for_what_is_not_loaded(tmp_path, comfy_dir):
    """On CUDA, models already loaded whole skip load_models_gpu but keep ComfyUI's LRU order; dropped ones and
    clones go through it. On the CPU every call is ComfyUI's (the control: the counting sees calls)."""
    import torch

    cuda = torch.cuda.is_available()
    r = run_worker(FAST_LOAD, tmp_path, comfy_dir, cpu=not cuda)
    assert r["first"] and r["clone_calls"] == 1, r
    if not cuda:
        assert r["device"] == "cpu" and r["warm_calls"] == 1 and r["reload_calls"] is False, r
        return
    assert r["warm_calls"] == 0 and r["warm_rank"] == [[0], [1]] and r["used"], r
    assert r["reload_calls"] and r["reload_rank"] == [[0], [1]] and r["b_loaded"], r
