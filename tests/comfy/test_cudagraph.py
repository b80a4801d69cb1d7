"""XSR_CUDAGraph: capture/replay decisions and equality with eager sampling (tiny zoo, real ComfyUI).

ComfyUI runs in-process in a subprocess (cudagraph_worker.py). On the CPU the worker swaps the CUDA
graph for a backend that re-runs the captured closure on the static buffers, so every decision
(warm-up, capture, replay, recapture on a new shape, ControlNet windows, refusals) and the per-plan
conditioning are exercised; the CUDA test (skipped without CUDA) uses real torch.cuda.CUDAGraph.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
pytestmark = pytest.mark.comfy


def _run(tmp_path_factory, comfy_dir, tiny_zoo, mode):
    out = tmp_path_factory.mktemp(f"cudagraph_{mode}") / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "cudagraph_worker.py"),
            str(comfy_dir),
            str(REPO),
            str(tiny_zoo["root"]),
            str(out),
            mode,
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"cudagraph worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def cpu_results(tmp_path_factory, comfy_dir, tiny_zoo):
    return _run(tmp_path_factory, comfy_dir, tiny_zoo, "cpu")


def test_replay_equals_eager_and_progress_runs_every_step(cpu_results):
    p = cpu_results["plain"]
    assert p["refused"] is None
    assert p["maxdiff"] == 0.0 and p["scale"] > 0
    assert (p["eager_steps"], p["graphs"], p["replays"]) == (1, 1, 5)  # 6 steps: warm-up, then capture + replays
    assert p["callback_steps"] == list(range(6))
    s = cpu_results["second_run"]
    assert s["maxdiff"] == 0.0 and s["replays"] == 5 and s["graphs"] == 1


def test_interrupt_stops_a_replaying_run_and_the_next_run_works(cpu_results):
    i = cpu_results["interrupt"]
    assert i["raised"] is True and i["replays_before"] == 3  # steps 0 (warm-up), 1-3 replayed, stop before 4
    assert cpu_results["second_run"]["maxdiff"] == 0.0


def test_controlnet_window_steps_outside_run_eagerly(cpu_results):
    w = cpu_results["window"]
    assert w["refused"] is None and w["maxdiff"] == 0.0
    assert w["graphs"] == 1 and w["replays"] >= 1 and w["eager_steps"] >= 2
    assert w["replays"] + w["eager_steps"] == 8
    # one line for the eager steps; one more as the run's ControlNet window differs from the kept graphs' settings
    assert [line for line in w["log"] if "start/end window" in line] == w["log"][-1:]
    assert len(w["log"]) == 2 and "capturing another graph" in w["log"][0]


@pytest.mark.parametrize("case, needle", [("unknown_wrapper", "someone_else"), ("unknown_patch", "attn2_patch")])
def test_unknown_wrappers_and_patches_fall_back_with_one_log_line(cpu_results, case, needle):
    r = cpu_results[case]
    assert r["maxdiff"] == 0.0
    assert r["refused"] and needle in r["refused"]
    assert len(r["log"]) == 1 and needle in r["log"][0]


def test_xsr_adapter_patches_are_captured(cpu_results):
    x = cpu_results["xsr"]
    assert x["refused"] is None and x["replays"] == 5
    assert x["maxdiff"] == 0.0 and x["adapter_effect"] > 1e-3
    assert x["outermost"] == "xsr_cudagraph"


def test_torch_compile_model_is_captured_without_recompiling(cpu_results):
    """ComfyUI's TorchCompileModel wrapper (aot_eager here) inside the graph: same result as the compiled eager run,
    no compiled frame added by the capture or the replays (the CPU backend re-runs the compiled code at every
    replay, dynamo's guards included), the kept graph reused by a second run."""
    c = cpu_results["compile"]
    assert c["refused"] is None and c["log"] == [], c
    assert (c["captures"], c["replays"], c["second_reused"]) == (1, 5, 1), c
    assert c["maxdiff"] == 0.0 and c["maxdiff_second"] == 0.0, c
    assert c["vs_uncompiled"] <= 1e-4 * max(c["scale"], 1.0), c  # it really ran the XSR model
    assert c["frames_eager"] >= 1 and c["frames_added_by_graph_runs"] == 0, c
    assert c["warm_ups"] == 1, c  # one eager pass of the capture's body, before the one capture
    assert cpu_results["warm_ups_uncompiled"] == 0  # plain and XSR captures without TorchCompileModel: none


def test_torch_compile_settings_that_record_graphs_are_refused(cpu_results):
    r = cpu_results["compile_refusals"]
    assert "cudagraphs" in r["cudagraphs_backend"] and "inductor" in r["cudagraphs_backend"]
    assert "reduce-overhead" in r["reduce_overhead"]
    assert "triton.cudagraphs" in r["inductor_cudagraphs_option"]
    assert r["inductor"] is None and r["max_autotune_no_cudagraphs"] is None
    assert "unknown apply_model wrapper 'torch.compile'" in r["not_comfyui_wrapper"]


def test_recapture_on_shape_change_and_lowvram_refusal(cpu_results):
    s = cpu_results["shapes"]
    assert (s["graphs"], s["replays"], s["eager"]) == (2, 5, 2)
    assert s["maxdiff"] == 0.0
    assert len(s["log"]) == 1 and "(2, 4, 16, 16)" in s["log"][0]
    assert "lowvram" in cpu_results["lowvram_reason"]
    assert cpu_results["static_none_for_plain"] is None


@pytest.mark.parametrize("case", ["reuse_plain", "reuse_xsr"])
def test_second_prompt_replays_the_kept_graph_without_capture(cpu_results, case):
    """New LR (ControlNet hint), caption (text context), seed and image embedding: copied into the kept graph's
    static buffers; the result is the eager one bit for bit (the CPU backend re-runs the captured closure)."""
    r = cpu_results[case]
    first, *later = r["runs"]
    assert first["refused"] is None and (first["captures"], first["reused"], first["replays"]) == (1, 0, 5)
    for run in later:
        assert run["refused"] is None and run["maxdiff"] == 0.0, run
        assert (run["captures"], run["reused"], run["eager_steps"], run["replays"]) == (0, 1, 1, 5), run
    assert first["maxdiff"] == 0.0 and r["kept"] == 1
    assert r["prompts_differ"] > 1e-3  # the prompts really differ: a stale buffer would show
    o = cpu_results["reuse_other_strength"]  # a Python scalar baked into the graph is part of its key
    assert (o["captures"], o["reused"], o["maxdiff"]) == (1, 0, 0.0)


def test_kept_graphs_are_dropped_when_weights_move_or_the_model_is_detached(cpu_results):
    m = cpu_results["moved"]
    assert (m["captures"], m["reused"]) == (1, 0)
    assert (
        len(m["log"]) == 1 and "weights moved" in m["log"][0] and "dropping 2 kept graph" in m["log"][0]
    )  # plain + strength 0.5
    d = cpu_results["detach"]
    assert d["kept"] == 0 and len(d["log"]) == 1 and "unloaded" in d["log"][0]


def test_kept_graphs_are_bounded_and_freed_with_the_model(cpu_results):
    b = cpu_results["bound"]
    assert b["captures"] == 6 and b["kept"] == b["limit"] == 4  # six shapes, the four latest kept
    f = cpu_results["freed_with_model"]
    assert f["had_graphs"] == 1 and f["alive_after_del"] is False


def test_vit_graph_state_does_not_keep_the_encoder_alive(cpu_results):
    # its value listed the module itself among its submodules: every reloaded encoder stayed on the GPU
    assert cpu_results["vision_state"] == {"submodules": 3, "alive_after_del": False, "states": 0}


def test_text_encoder_hook_routes_the_layers_and_is_removed_after(cpu_results):
    h = cpu_results["text_hook"]
    assert "error" not in h, h
    assert h["encoders"] == 1 and h["hooked_inside"] is True, h  # SD1's one CLIP-L
    (name, shapes, extra), *more = h["calls"]
    assert not more and name == "CLIPEncoder", h["calls"]  # one prompt: one pass through the layers
    assert shapes[0][:2] == [1, 77] and extra[0] == "None", h["calls"]  # hidden states of 77 tokens; last layer
    assert h["calls_when_patched"] == 0, h  # an on-the-fly weight patch: ComfyUI's eager forward, not hooked
    assert (h["left_after"], h["left_after_error"]) == (0, 0), h  # the class's forward again, also after a raise
    assert h["maxdiff"] == 0.0, h
    assert h["real_usable"] is False, h  # a CPU CLIP is never graphed


def test_node_is_a_passthrough_on_cpu(cpu_results):
    assert cpu_results["node_passthrough"] is True


def test_cuda_graph_matches_eager_on_cuda(tmp_path_factory, comfy_dir, tiny_zoo):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    r = _run(tmp_path_factory, comfy_dir, tiny_zoo, "cuda")
    p, x = r["plain"], r["xsr"]
    assert p["refused"] is None and p["replays"] == 5, p
    assert x["refused"] is None and x["replays"] == 5, x
    # same kernels, replayed: fp32 tiny model, differences only from run-to-run kernel choice
    assert p["maxdiff"] <= 1e-3 * max(1.0, p["scale"]), p
    assert x["maxdiff"] <= 1e-3 * max(1.0, p["scale"]), x
    assert r["window"]["maxdiff"] <= 1e-3 * max(1.0, p["scale"]), r["window"]
    assert r["shapes"]["maxdiff"] == 0.0 and r["shapes"]["graphs"] == 2
    assert r["node_passthrough"] is False
    # later prompts (new LR, caption, seed, embedding) replay the first prompt's graph: no capture, eager result
    for case in ("reuse_plain", "reuse_xsr"):
        first, *later = r[case]["runs"]
        assert first["captures"] == 1 and r[case]["kept"] == 1, r[case]
        for run in later:
            assert (run["captures"], run["reused"], run["replays"]) == (0, 1, 5), run
            assert run["maxdiff"] <= 1e-3 * max(1.0, run["scale"]), run
    assert r["freed_with_model"]["alive_after_del"] is False
    # the inductor-compiled XSR U-Net captured in its first graph run (a frame the capture's objects need is compiled
    # by the eager pass before it, not mid-capture), nothing compiled after, the compiled eager result
    c = r["compile"]
    assert c["backend"] == "inductor" and c["refused"] is None and c["log"] == [], c
    assert (c["captures"], c["replays"], c["second_reused"], c["frames_added_by_second_graph_run"]) == (1, 5, 1, 0), c
    assert max(c["maxdiff"], c["maxdiff_second"]) <= 1e-3 * max(1.0, c["scale"]), c
    v = r["vision_graphs"]  # XSR_Retrieve's CLIP vision pass: warm-up, capture, then replays of new pixels
    assert v["off"] == [None] and (v["captures"], v["replays"]) == (1, 2), v
    assert v["maxdiff"] <= 1e-3, v
    assert (v["alive_after_del"], v["states_after_del"]) == (False, 0), v  # the encoder and its graphs freed
    t = r["text_graphs"]  # XSR_Enhance's CLIP text encoder: warm-up, capture, replays for new captions
    assert t.get("usable") is True and t["off"] == [None] and (t["captures"], t["replays"]) == (1, 2), t
    assert t["maxdiff"] <= 1e-3 * max(1.0, t["scale"]), t
    assert t["node_states"] == 1 and t["memo_shape"][1] == 77, t  # _encode_text goes through the node's graphs
    d = r["vision_dtype"]  # encode_clip runs fp16 weights in fp16 and agrees with ComfyUI's float32 convention
    assert (d.get("weights"), d.get("compute")) == ("torch.float16", "torch.float16"), d
    assert d["tokens_cos_min"] > 0.999 and d["cls_cos_min"] > 0.999, d
