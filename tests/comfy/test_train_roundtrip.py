"""#11.9: proof that the loop learns on data where references matter,
and the train → export → ComfyUI → eval round trip.

One module-scoped run on CPU with the tiny zoo:

1. ``write_class_set``: non-square images of 4 classes; a class fixes the shape's colour (visible at 32x32)
   and a fine texture (destroyed by the /16 LR), so an image's HR detail is only recoverable from
   images of its class.
2. ``prepare`` (packed reference DB, test-set dedup) → ``rfa`` → ``i2t`` → ``adapter`` in both variants
   (``adain`` = full model, ``text_only`` = Ours_Base) → ``export`` into a ComfyUI models/ folder.
3. Learning proof: same-class precision@4 / hit@4 of the references the RFA retrieves for the test LR
   images beats raw-LR CLS retrieval; the trained adapter reads E (the validation losses, over the whole
   schedule and its low-noise part, change when E is shuffled; they do not at step 0, where the zero gates
   make the adapter the identity). That the true E gives a clearly *lower* validation loss than a shuffled
   one needs a longer stage 2 on a set built for it: tests/unit/test_stage2_uses_e.py (the 40 steps here
   leave the adapter's E dependence, which grows from zero gates and small-init heads, within noise).
4. ``eval run`` of the shipped workflows (``xsr_x16.json``, ``xsr_x16_text_only.json``) in a live
   ComfyUI on the test split's non-square HR files, with exactly the exported files (asserted by
   fingerprint), then ``eval metrics`` against the originals (x16 crop) and one table with both rows.

The figures are printed (``-s``) and written to ``<tmp>/roundtrip.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from xsr_helpers import eval_run_cmd, tiny_stage1
from xsr_core import fingerprint as wfp
from xsr_core.testing.zoo import CHECKPOINT_NAME, CLIP_VISION_NAME
from xsr_core.train.config import AdapterTrainConfig
from xsr_core.train.data import PrepareConfig, TokenCache, load_items, prepare
from xsr_core.train.synthetic import class_of, write_class_set

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.comfy, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N_IMAGES, SPLIT = 96, "48,32,16"
N_EVAL = 2  # test images run through ComfyUI per workflow (512 px on CPU: the slow part)
DB_NAME = "xsr_roundtrip"
# The tiny random CLIP maps all synthetic images into a narrow cone (same-class CLS cosines above 0.95), so the
# real-CLIP default 0.95 would drop most of the same-class references; only near-exact copies count here.
DEDUP = 0.999
FIGURES: dict = {}


@pytest.fixture(scope="module")
def loop(tiny_zoo, tmp_path_factory):
    from xsr_core.train.adapter import train_adapter
    from xsr_core.train.export import export

    root = tmp_path_factory.mktemp("roundtrip")
    imgs = write_class_set(root / "imgs", n=N_IMAGES)
    data = root / "data"
    info = prepare(
        data,
        tiny_zoo["clip_vision"],
        images=str(imgs),
        captions=str(imgs / "captions.jsonl"),
        config=PrepareConfig(split=SPLIT, device="cpu", refdb_mode="packed", dedup_threshold=DEDUP),
    )
    stage1 = tiny_stage1(tiny_zoo, root, data, rfa_steps=200, i2t_steps=20, rfa_log=50, i2t_log=10)
    rfa, rfa_file = stage1["rfa"], Path(stage1["stage2"]["rfa"])
    stage2 = dict(
        **stage1["stage2"],
        log_steps=10,
        resolution=64,
        learning_rate=2e-3,
        p_drop_text=0.0,
        p_drop_image=0.0,
    )
    adain = train_adapter(AdapterTrainConfig(**stage2, output_dir=str(root / "adain"), max_steps=40, eval_steps=40))
    text_only = train_adapter(
        AdapterTrainConfig(**stage2, output_dir=str(root / "text_only"), max_steps=20, variant="text_only")
    )
    models = root / "models"
    for sub, src in (("checkpoints", tiny_zoo["checkpoint"]), ("clip_vision", tiny_zoo["clip_vision"])):
        (models / sub).mkdir(parents=True)
        (models / sub / src.name).symlink_to(src)
    paths = export(models, rfa=str(root / "rfa"), i2t=str(root / "i2t"), adapter=str(root / "adain"))
    paths_base = export(models, adapter=str(root / "text_only"))
    (models / "xsr_refdb").mkdir()
    # a copy, not a symlink: XSR refuses a DB folder that resolves outside models/xsr_refdb (confinement)
    shutil.copytree(data / "refdb", models / "xsr_refdb" / DB_NAME)
    test_hr = root / "test_hr"
    test_hr.mkdir()
    for it in load_items(data, "test")[:N_EVAL]:
        shutil.copy(it["source"], test_hr / Path(it["source"]).name)
    return {
        "root": root,
        "data": data,
        "info": info,
        "rfa": rfa,
        "rfa_file": rfa_file,
        "adain": adain,
        "text_only": text_only,
        "models": models,
        "paths": paths,
        "paths_base": paths_base,
        "test_hr": test_hr,
    }


def test_rfa_retrieves_same_class_references_better_than_raw_lr_cls(loop):
    from xsr_core.models.rfa import RFA
    from xsr_core.refdb import ReferenceDB
    from xsr_core.weights import load_model

    data = loop["data"]
    refs = load_items(data, "reference")
    ref_class = {it["hr"]: class_of(it["source"]) for it in refs}
    tests = load_items(data, "test")
    want = torch.tensor([class_of(it["source"]) for it in tests])
    cache = TokenCache(data, "test")
    rfa = load_model(loop["rfa_file"], expected=RFA)
    with torch.no_grad():
        q_rfa = rfa.query_embedding(cache.stack("lr_tokens"))
    q_lr = torch.nn.functional.normalize(cache.stack("lr_cls"), dim=-1)
    db = ReferenceDB.open(data / "refdb")
    out = {}
    for name, q in (("rfa", q_rfa), ("raw_lr_cls", q_lr)):
        _, ids = db.search(q.numpy(), k=4)
        got = torch.tensor([[ref_class[_ref_key(r.path)] for r in db.records(row)] for row in ids])
        same = (got == want[:, None]).float()
        out[name] = {"same_class_precision@4": same.mean().item(), "same_class_hit@4": same.amax(1).mean().item()}
    FIGURES["retrieval"] = out
    FIGURES["dedup"] = loop["info"]["dedup"]
    print("same-class retrieval of the test LR images:", out)
    assert out["rfa"]["same_class_precision@4"] > out["raw_lr_cls"]["same_class_precision@4"]
    assert out["rfa"]["same_class_precision@4"] > 0.25  # chance (4 balanced classes)


def _ref_key(path: str) -> str:
    p = Path(path).as_posix()
    return p[p.index("hr/reference/") :]


def test_stage2_validation_figures(loop):
    ev = loop["adain"]["evals"][-1]
    FIGURES["stage2"] = {
        "adain": ev,
        "adain_first_last_loss": [loop["adain"]["history"][0]["loss"], loop["adain"]["history"][-1]["loss"]],
        "text_only_first_last_loss": [
            loop["text_only"]["history"][0]["loss"],
            loop["text_only"]["history"][-1]["loss"],
        ],
    }
    print("stage-2 validation:", ev)
    assert ev["val_mse"] < loop["adain"]["evals"][0]["val_mse"]  # stage 2 learns (deterministic validation batch)


def test_stage2_adapter_reads_the_image_embedding(loop):
    """Wiring of E into the trained model, with its own negative control: the validation batch, noise and
    timesteps are fixed (seeded) and only E differs between ``val_mse`` and ``val_mse_shuffled_e``. At step 0
    the adapter's gates are zero (the adapter is the identity), so shuffling E cannot change the loss; after
    training it must (an adapter detached from the model, a projector that ignores E or gates that never
    leave zero all fail here)."""
    first, last = loop["adain"]["evals"][0], loop["adain"]["evals"][-1]
    assert first["step"] == 0 and last["step"] > 0
    gates = loop["adain"]["module"].adapter.gates.detach()
    FIGURES["stage2_e_shuffle"] = {"gate_absmax": gates.abs().max().item()}
    for name in ("val_mse", "val_mse_low_t"):
        assert first[f"{name}_shuffled_e"] == first[name]
        assert abs(last[f"{name}_shuffled_e"] - last[name]) > 1e-6 * last[name]
        FIGURES["stage2_e_shuffle"][name] = {
            "true_e": last[name],
            "shuffled_e": last[f"{name}_shuffled_e"],
            "rel_diff": last[f"{name}_shuffled_e"] / last[name] - 1,
        }
    assert gates.abs().max().item() > 0


def test_both_variants_export_what_comfyui_runs_and_eval_scores_them(loop):
    from diffusers import ControlNetModel

    from xsr_core.eval.metrics import compute_metrics, write_results
    from xsr_core.eval.paper import format_rows
    from xsr_core.weights import read_metadata

    models, root = loop["models"], loop["root"]
    cn = loop["paths"]["controlnet"]
    cn_base = loop["paths_base"]["controlnet"]
    assert cn.name == "xsr_controlnet.safetensors" and cn_base.name == "xsr_text_only_controlnet.safetensors"
    assert "adain_adapter" not in loop["paths_base"]
    # exactly the exported files: the adapter records the exported ControlNet, and each exported ControlNet is the
    # trained one (fingerprints of the files vs of the trained diffusers models)
    meta = read_metadata(loop["paths"]["adain_adapter"])
    assert wfp.same_weights(wfp.loads(meta["xsr.controlnet_fingerprint"]), wfp.fingerprint_file(cn))
    for run, f in (("adain", cn), ("text_only", cn_base)):
        trained = ControlNetModel.from_pretrained(str(root / run / "final" / "controlnet"))
        assert wfp.same_weights(wfp.fingerprint_diffusers(trained, controlnet=True), wfp.fingerprint_file(f)), run
    assert not wfp.same_weights(wfp.fingerprint_file(cn), wfp.fingerprint_file(cn_base))

    env = dict(os.environ)
    rows = []
    for wf, label in (
        ("xsr_x16_text_only", "XSR text-only base (tiny, CPU)"),
        ("xsr_x16", "XSR full AdaIN (tiny, CPU)"),
    ):
        out = root / f"sr_{wf}"
        models_flags = [f"ckpt={CHECKPOINT_NAME}", f"clip_vision={CLIP_VISION_NAME}", f"refdb={DB_NAME}"]
        wf_file = REPO / "workflows" / f"{wf}.json"
        cmd = eval_run_cmd(loop["test_hr"], out, wf_file, models, *(a for m in models_flags for a in ("--model", m)))
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
        run = json.loads((out / "run.json").read_text())
        assert run["refdb_exclusion"]["dbs"][DB_NAME]["not_excluded"] == 0  # the prepared DB excludes the test split
        assert all(m.get("caption") for m in run["images"].values())
        results = compute_metrics(out, loop["test_hr"], metrics="psnr,ssim")  # against the raw non-square HR files
        assert results["hr_cropped"] == len(run["images"]) == N_EVAL
        write_results(results, root / f"metrics_{wf}", label=label)
        rows.append((label, results))
        FIGURES[wf] = {k: v["value"] for k, v in results["metrics"].items()}
    table = format_rows(rows, paper_rows=True)
    print(table)
    assert "XSR text-only base" in table and "XSR full AdaIN" in table
    (root / "roundtrip.json").write_text(json.dumps(FIGURES, indent=1, default=str))
    print("round-trip figures:", json.dumps(FIGURES, default=str))
