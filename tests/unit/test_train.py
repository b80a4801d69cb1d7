"""Training subpackage (issue #6): prepare → rfa → i2t → adapter → export on the tiny zoo (CPU).

One module-scoped prepared data set (synthetic shapes with colour-determined fine textures, written
by the test) serves every stage. Sizes are tiny; a few optimiser steps per stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from xsr_core.train.config import AdapterTrainConfig, I2TTrainConfig, RFATrainConfig
from xsr_core.train.data import PrepareError, load_items, prepare
from xsr_core.train.synthetic import write_image_set
from xsr_helpers import prepare_folder

N_IMAGES = 56
SPLIT = "0.65,0.15,0.2"
TINY_RFA = {"width": 64, "depth": 2, "heads": 4}
TINY_I2T = {"width": 32, "depth": 1, "heads": 4, "prefix_len": 4, "max_caption_tokens": 24}
# the tiny random CLIP puts these synthetic images within CLS cosine 0.95 of each other: the real-CLIP default
# test-set dedup threshold would empty the reference DB, so only near-exact copies are excluded here
DEDUP = 0.999
WORLD_PREPARE = dict(split=SPLIT, dedup_threshold=DEDUP)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tiny_zoo, tmp_path_factory):
    """Tiny zoo + prepared data + a CLIP tokenizer folder + trained RFA / I2T runs (few steps)."""
    from xsr_core.testing.tiny_models import train_tiny_clip_tokenizer

    root = tmp_path_factory.mktemp("train")
    imgs = write_image_set(root / "imgs", n=N_IMAGES)
    data = root / "data"
    info = prepare_folder(data, tiny_zoo["clip_vision"], imgs, **WORLD_PREPARE)
    clip_tok = root / "cliptok"
    train_tiny_clip_tokenizer(clip_tok)
    return {
        "root": root,
        "imgs": imgs,
        "data": data,
        "info": info,
        "zoo": tiny_zoo,
        "clip_tok": clip_tok,
        "diffusers": tiny_zoo["diffusers"],
    }


def _run_opts(world, out, batch_size: int, max_steps: int) -> dict:
    """The options every tiny training run of this module shares: the prepared data, CPU, a log line per step."""
    return dict(
        data=str(world["data"]), output_dir=str(out), batch_size=batch_size, max_steps=max_steps, cpu=True, log_steps=1
    )


def _rfa_cfg(world, out, **kw):
    base = dict(
        **_run_opts(world, out, batch_size=8, max_steps=4),
        checkpointing_steps=2,
        model=TINY_RFA,
        learning_rate=1e-3,
    )
    return RFATrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def rfa_run(world):
    from xsr_core.train.rfa import train_rfa

    out = world["root"] / "rfa"
    train_rfa(_rfa_cfg(world, out, max_steps=6))
    return out


@pytest.fixture(scope="module")
def i2t_run(world, rfa_run):
    from xsr_core.train.i2t import train_i2t

    out = world["root"] / "i2t"
    res = train_i2t(
        I2TTrainConfig(
            **_run_opts(world, out, batch_size=4, max_steps=3),
            rfa=str(rfa_run / "final" / "rfa.safetensors"),
            decoder_dir=str(world["zoo"]["distilgpt2"]),
            pretrained=str(world["diffusers"]),
            clip_tokenizer=str(world["clip_tok"]),
            model=TINY_I2T,
            sample_captions=2,
            max_new_tokens=8,
        )
    )
    return out, res


def _adapter_cfg(world, rfa_run, i2t_run, out, **kw):
    base = dict(
        **_run_opts(world, out, batch_size=2, max_steps=3),
        rfa=str(rfa_run / "final" / "rfa.safetensors"),
        i2t=str(i2t_run[0] / "final" / "i2t.safetensors"),
        pretrained=str(world["diffusers"]),
        clip_tokenizer=str(world["clip_tok"]),
        resolution=64,
        learning_rate=1e-3,
    )
    return AdapterTrainConfig(**{**base, **kw})


# ----------------------------------------------------------------------------------- prepare


def test_prepare_layout_split_and_caches(world):
    data, info = world["data"], world["info"]
    items = load_items(data)
    counts = {s: sum(it["split"] == s for it in items) for s in ("train", "reference", "test")}
    assert counts == info["splits"] and sum(counts.values()) == N_IMAGES
    # deterministic split by content hash: ordered by sha256 across the concatenated splits
    order = [it["sha256"] for s in ("train", "reference", "test") for it in items if it["split"] == s]
    assert order == sorted(order)
    it = items[0]
    from PIL import Image

    assert Image.open(data / it["hr"]).size == (512, 512) and Image.open(data / it["lr"]).size == (32, 32)
    assert all(i["caption"] for i in items if i["split"] != "reference")
    from xsr_core.train.data import TokenCache

    c = TokenCache(data, "train")
    assert len(c) == counts["train"]
    row = c.get(0)
    assert row["lr_tokens"].shape == (257, 32) and row["hr_cls"].shape == (32,)
    assert (data / "refdb" / "info.json").is_file()
    from xsr_core.refdb import ReferenceDB

    assert ReferenceDB.open(data / "refdb").n == counts["reference"]


def test_prepare_is_resumable_and_deterministic(world, tmp_path):
    """A second run over the same folder keeps everything (same items, same cache bytes)."""
    data = world["data"]
    before = (data / "items.jsonl").read_text()
    shard = next((data / "cache" / "clip" / "train").glob("shard-*.safetensors"))
    mtime = shard.stat().st_mtime_ns
    prepare_folder(data, world["zoo"]["clip_vision"], world["imgs"], **WORLD_PREPARE)
    assert (data / "items.jsonl").read_text() == before
    assert shard.stat().st_mtime_ns == mtime  # complete shard not rewritten


def test_prepare_bad_inputs(tiny_zoo, tmp_path):
    enc = tiny_zoo["clip_vision"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PrepareError, match="no image files"):
        prepare(tmp_path / "d0", enc, images=str(empty), captions="x.jsonl")
    from xsr_core.train.cli import main

    assert (
        main(
            [
                "prepare",
                "--images",
                str(empty),
                "--out",
                str(tmp_path / "d0"),
                "--encoder",
                str(enc),
                "--captions",
                "x.jsonl",
            ]
        )
        == 2
    )  # the CLI reports the error and exits 2
    imgs = write_image_set(tmp_path / "imgs", n=4, size=128)
    with pytest.raises(PrepareError, match="--captions"):
        prepare(tmp_path / "d1", enc, images=str(imgs))
    with pytest.raises(PrepareError, match="BLIP-2 model folder"):
        prepare(tmp_path / "d2", enc, images=str(imgs), blip2=str(tmp_path / "no_blip2"))
    with pytest.raises(ValueError, match="--degradation"):
        prepare_folder(tmp_path / "d1", enc, imgs, degradation="no_such_module:f")
    # a caption file missing entries names the images
    lines = (imgs / "captions.jsonl").read_text().splitlines()
    (tmp_path / "partial.jsonl").write_text("\n".join(lines[:1]) + "\n")
    with pytest.raises(PrepareError, match="img_0003.png"):
        prepare_folder(tmp_path / "d3", enc, imgs, tmp_path / "partial.jsonl", split="2,0,2", min_side=64)
    # an unreadable image is named, and --skip_bad leaves it out
    (imgs / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PrepareError, match="broken.png"):
        prepare_folder(tmp_path / "d4", enc, imgs, split="2,0,2", min_side=64)
    assert not (tmp_path / "d4").exists()  # nothing written before the checks passed
    with pytest.raises(PrepareError, match="asks for 9 images"):
        prepare_folder(tmp_path / "d5", enc, imgs, split="3,3,3", min_side=64, skip_bad=True)


def test_split_parsing():
    from xsr_core.train.data import split_sizes

    assert split_sizes("100000,800000,2000", 1_000_000) == (100000, 800000, 2000)
    assert split_sizes("0.5,0.3,0.2", 10) == (5, 3, 2)
    assert split_sizes("0.9,0.05,0.05", 10)[2] == 1  # a non-zero share gets at least one image
    with pytest.raises(ValueError):
        split_sizes("0.7,0.7,0.1", 10)
    with pytest.raises(ValueError):
        split_sizes("1,2", 10)


# ----------------------------------------------------------------------------------- config


def test_config_file_overrides_and_validation(tmp_path):
    from xsr_core.train.cli import build_parser
    from xsr_core.train.config import parse_config

    f = tmp_path / "c.yaml"
    f.write_text("data: /d\noutput_dir: /o\nbatch_size: 3\nmax_steps: 7\nmodel: {width: 16}\n")
    build_parser().parse_args(["rfa", "--config", str(f), "--max_steps", "9", "--cpu"])  # the CLI accepts them
    cfg = parse_config(RFATrainConfig, ["--config", str(f), "--max_steps", "9", "--cpu"])
    assert (cfg.batch_size, cfg.max_steps, cfg.cpu, cfg.model) == (3, 9, True, {"width": 16})
    f.write_text("data: /d\noutput_dir: /o\nbatch_sise: 3\n")
    with pytest.raises(ValueError, match="batch_sise"):
        parse_config(RFATrainConfig, ["--config", str(f)])
    with pytest.raises(ValueError, match="mixed_precision"):
        RFATrainConfig(data="/d", output_dir="/o", mixed_precision="fp8")
    with pytest.raises(ValueError, match="--rfa"):
        I2TTrainConfig(data="/d", output_dir="/o", decoder_dir="x", pretrained="y")


# ----------------------------------------------------------------------------------- rfa + resume


def test_rfa_checkpoints_and_resume_continue_exactly(world, tmp_path):
    from safetensors.torch import load_file

    from xsr_core.train.engine import list_checkpoints
    from xsr_core.train.rfa import train_rfa

    full = train_rfa(
        _rfa_cfg(world, tmp_path / "full", max_steps=6, checkpoints_total_limit=2, report_to="tensorboard")
    )
    assert any((tmp_path / "full" / "logs").rglob("events.out.tfevents*"))
    ckpts = list_checkpoints(tmp_path / "full")
    assert [s for s, _ in ckpts] == [4, 6]  # rotation kept the newest two
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["checkpoint_1", "checkpoint_2"]
    assert json.loads((ckpts[-1][1] / "config.json").read_text())["max_steps"] == 6
    train_rfa(_rfa_cfg(world, tmp_path / "part", max_steps=4))
    loads = []
    real_load = torch.load

    def spy(*a, **kw):  # every pickle-format file accelerate reads back goes through the restricted unpickler
        loads.append(kw.get("weights_only"))
        return real_load(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", spy)
        res = train_rfa(_rfa_cfg(world, tmp_path / "part", max_steps=6, resume_from_checkpoint="latest"))
    assert loads and all(w is True for w in loads), loads
    assert [h["step"] for h in res["history"]] == [5, 6]
    a = load_file(str(tmp_path / "full" / "final" / "rfa.safetensors"))
    b = load_file(str(tmp_path / "part" / "final" / "rfa.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert {"rfa_recall@1", "rfa_recall@4", "baseline_lr_cls_recall@1", "baseline_lr_cls_recall@4"} <= set(full["eval"])


def test_resume_refuses_old_format_and_a_used_output_dir(world, tmp_path):
    """Pre-accelerate checkpoints fail with a clear message; a fresh run never mixes into a used folder."""
    from safetensors.torch import save_file

    from xsr_core.train.engine import resolve_resume
    from xsr_core.train.rfa import train_rfa

    old = tmp_path / "old" / "checkpoint-4"
    old.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(old / "trainable.safetensors"))
    (old / "state.json").write_text('{"step": 4}')
    for resume in ("latest", str(old)):
        with pytest.raises(
            ValueError, match=r"checkpoint-4 is a checkpoint in XSR's earlier own format.*new --output_dir"
        ):
            resolve_resume(_rfa_cfg(world, tmp_path / "old", resume_from_checkpoint=resume))
    train_rfa(_rfa_cfg(world, tmp_path / "used", max_steps=2))
    with pytest.raises(ValueError, match=r"already holds checkpoints.*--resume_from_checkpoint latest"):
        train_rfa(_rfa_cfg(world, tmp_path / "used", max_steps=2))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(_rfa_cfg(world, tmp_path / "used", resume_from_checkpoint="checkpoint_7"))


class _ToyStage(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch):
        x, y = batch
        return {"loss": ((self.lin(x) - y) ** 2).mean()}


def _toy_run(out: Path, max_steps: int, ema_decay: float, **kw):
    from xsr_core.train.config import EngineConfig
    from xsr_core.train.engine import make_accelerator, train_loop

    cfg = EngineConfig(
        data="-", output_dir=str(out), batch_size=4, max_steps=max_steps, cpu=True, log_steps=1,
        checkpointing_steps=3, learning_rate=0.05, lr_warmup_steps=2, lr_schedule="cosine", **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    module = _ToyStage()
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
    return train_loop(cfg, make_accelerator(cfg), module, data, ema_decay=ema_decay)


def test_engine_schedule_ema_and_resume_with_ema(tmp_path):
    """diffusers get_scheduler (warm-up from 0, cosine to 0 at max_steps); EMAModel weights are the returned
    (exported) ones and survive a resume exactly."""
    import math

    from safetensors.torch import load_file

    from xsr_core.train.engine import list_checkpoints

    full = _toy_run(tmp_path / "full", 6, 0.8)
    want = [0.0, 0.025] + [0.05 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 6)]
    assert [h["step"] for h in full["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["lr"] for h in full["history"]] == pytest.approx(want)
    last = list_checkpoints(tmp_path / "full")[-1]
    ema = load_file(str(last[1] / "ema.safetensors"))
    assert last[0] == 6 and set(ema) == {"lin.weight", "lin.bias"}
    for k, v in full["module"].state_dict().items():
        torch.testing.assert_close(v, ema[k], rtol=0, atol=0, msg=k)  # the module holds the EMA weights
    plain = _toy_run(tmp_path / "plain", 6, 0.0)["module"].state_dict()
    assert not torch.equal(plain["lin.weight"], full["module"].lin.weight)
    _toy_run(tmp_path / "part", 3, 0.8)
    res = _toy_run(tmp_path / "part", 6, 0.8, resume_from_checkpoint="latest")
    assert [h["step"] for h in res["history"]] == [4, 5, 6]
    for k, v in full["module"].state_dict().items():
        torch.testing.assert_close(res["module"].state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_rfa_learning_beats_raw_lr_cls(world, tmp_path):
    """RFA recall of the correct HR among hard distractors (same LR, other textures) beats the raw LR CLS."""
    from xsr_core.clip_vision import ClipVisionEncoder
    from xsr_core.train.data import center_crop_hr
    from xsr_core.train.rfa import train_rfa
    from xsr_core.train.synthetic import TEXTURES, make_image

    enc = ClipVisionEncoder.from_file(world["zoo"]["clip_vision"])
    dis = []
    for it in load_items(world["data"], "test"):
        i = int(Path(it["source"]).stem.split("_")[1])
        own = next(k for k, t in enumerate(TEXTURES) if t in it["caption"])
        for k in range(len(TEXTURES)):
            if k != own:
                dis.append(enc.encode_images(center_crop_hr(make_image(i, texture=k)[0], 512)).cls)
    res = train_rfa(
        _rfa_cfg(world, tmp_path / "learn", max_steps=120, batch_size=16, log_steps=20, checkpointing_steps=1000),
        distractors=torch.cat(dis),
    )
    ev = res["eval"]
    print("RFA learning check:", {k: round(v, 3) for k, v in ev.items()})
    assert ev["rfa_recall@1"] >= ev["baseline_lr_cls_recall@1"] + 0.2
    assert ev["rfa_recall@4"] > ev["baseline_lr_cls_recall@4"]
    assert res["history"][-1]["loss"] < 0.2 * res["history"][0]["loss"]


# ----------------------------------------------------------------------------------- i2t, adapter, export


def test_i2t_stage(world, i2t_run):
    from xsr_core.models.i2t import load_i2t

    out, res = i2t_run
    model, _ = load_i2t(out / "final" / "i2t.safetensors")
    assert model.config.clip_dim == 32 and model.config.num_tokens == 257
    ev = res["eval"]
    assert {"token_cos", "baseline_lr_token_cos", "clip_text_cos", "samples"} <= set(ev)
    assert len(ev["samples"]) == 2 and all("generated" in s for s in ev["samples"])
    assert {"token_cos", "caption_ce", "text_cos", "loss"} <= set(res["history"][0])
    # the retrieval cache exists and holds K ids per training image
    folder = next((world["data"] / "cache").glob("refs-*-k4"))
    ids = json.loads((folder / "ids-train.json").read_text())
    assert len(ids) == world["info"]["splits"]["train"] and all(len(r) == 4 for r in ids)


def test_adapter_stage_export_and_round_trips(world, rfa_run, i2t_run, tmp_path):
    from diffusers import ControlNetModel

    from xsr_core.adapter import AdaINAdapter
    from xsr_core.models.i2t import load_i2t
    from xsr_core.models.rfa import RFA
    from xsr_core.train.adapter import train_adapter
    from xsr_core.train.export import export
    from xsr_core.weights import load_model

    out = tmp_path / "ad"
    res = train_adapter(
        _adapter_cfg(
            world,
            rfa_run,
            i2t_run,
            out,
            controlnet_train="controlnet_",
            ema_decay=0.9,
            gradient_checkpointing=True,
            p_drop_image=0.5,
        )
    )
    assert res["step"] == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in res["history"])
    models = tmp_path / "models"
    paths = export(models, rfa=str(rfa_run), i2t=str(i2t_run[0]), adapter=str(out))
    assert load_model(paths["rfa"], expected=RFA) is not None
    assert load_i2t(paths["i2t"])[1] is not None
    ad = load_model(paths["adain_adapter"], expected=AdaINAdapter)
    assert ad.gates.abs().sum() > 0  # the gates moved away from 0
    assert paths["controlnet"] == models / "controlnet" / "xsr_controlnet.safetensors"
    cn = ControlNetModel.from_single_file(
        str(paths["controlnet"]), config=str(out / "final" / "controlnet"), local_files_only=True
    )
    ref = ControlNetModel.from_pretrained(str(out / "final" / "controlnet"))
    a, b = cn.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_adapter_resume_and_single_file_base(world, rfa_run, i2t_run, tmp_path):
    """Single-file SD checkpoint + user ControlNet file; a resumed run continues at the right step."""
    from xsr_core.train.adapter import train_adapter

    kw = dict(
        pretrained=str(world["zoo"]["checkpoint"]),
        pretrained_config=str(world["diffusers"]),
        controlnet=str(world["zoo"]["controlnet"]),
        checkpointing_steps=1,
        controlnet_train="none",
    )
    train_adapter(_adapter_cfg(world, rfa_run, i2t_run, tmp_path / "a", max_steps=2, **kw))
    res = train_adapter(
        _adapter_cfg(world, rfa_run, i2t_run, tmp_path / "a", max_steps=3, resume_from_checkpoint="latest", **kw)
    )
    assert [h["step"] for h in res["history"]] == [3]


def test_adapter_loss_falls(world, rfa_run, i2t_run, tmp_path):
    from xsr_core.train.adapter import train_adapter

    res = train_adapter(
        _adapter_cfg(
            world,
            rfa_run,
            i2t_run,
            tmp_path / "fall",
            max_steps=12,
            batch_size=4,
            eval_steps=12,
            p_drop_text=0.0,
            p_drop_image=0.0,
            checkpointing_steps=100,
        )
    )
    first, last = res["evals"][0]["val_mse"], res["evals"][-1]["val_mse"]
    print("stage-2 val mse:", first, "->", last)
    assert last < 0.9 * first


def test_bad_base_checkpoint_and_mismatched_controlnet(world, tmp_path):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from safetensors.torch import save_file

    from xsr_core.testing.zoo import TINY_UNET_CONFIG, write_controlnet
    from xsr_core.train.adapter import (
        BaseModelError,
        check_sd1_checkpoint,
        load_controlnet,
    )

    unet_cfg = json.loads((world["diffusers"] / "unet" / "config.json").read_text())
    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4),
        },
        str(sdxl),
    )
    with pytest.raises(BaseModelError, match="SDXL"):
        check_sd1_checkpoint(sdxl, unet_cfg)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(BaseModelError, match="no Stable Diffusion U-Net"):
        check_sd1_checkpoint(other, unet_cfg)
    with pytest.raises(BaseModelError, match="SD1.x"):  # via the stage entry point, before any training
        from xsr_core.train.adapter import load_base

        load_base(
            AdapterTrainConfig(
                data="/d",
                output_dir="/o",
                rfa="r",
                i2t="i",
                pretrained=str(sdxl),
                pretrained_config=str(world["diffusers"]),
                clip_tokenizer=str(world["clip_tok"]),
            )
        )
    wide = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "block_out_channels": [32, 64, 64, 128]})
    cn_file = write_controlnet(ControlNetModel.from_unet(wide), tmp_path / "cn_wrong.safetensors")
    unet = UNet2DConditionModel.from_pretrained(str(world["diffusers"]), subfolder="unet")
    with pytest.raises(BaseModelError, match="does not match the U-Net"):
        load_controlnet(str(cn_file), unet)
    assert load_controlnet(str(world["zoo"]["controlnet"]), unet) is not None


def test_adapter_stage_prediction_types(world):
    """The stage-2 target follows the scheduler: epsilon → noise, v_prediction → velocity, others refused."""
    from diffusers import DDPMScheduler

    from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig
    from xsr_core.train.adapter import AdapterStage, load_base, load_controlnet

    cfg = AdapterTrainConfig(
        data="/d",
        output_dir="/o",
        rfa="r",
        i2t="i",
        pretrained=str(world["diffusers"]),
        clip_tokenizer=str(world["clip_tok"]),
        p_drop_text=0.0,
        p_drop_image=0.0,
    )
    base = load_base(cfg)
    adapter = AdaINAdapter(AdaINAdapterConfig.from_unet_config(dict(base["unet"].config), embed_dim=32))
    stage = AdapterStage(adapter, load_controlnet("", base["unet"]), base, cfg)
    from xsr_core.train.i2t import clip_tokenize

    stage.set_empty_prompt(*clip_tokenize(base["tokenizer"], [""]))
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixels": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
        "hint": torch.rand(2, 3, 64, 64, generator=g),
        "E": torch.randn(2, 257, 32, generator=g),
        "clip_ids": torch.randint(0, 300, (2, 77), generator=g),
    }
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        stage.scheduler = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind
        )
        torch.manual_seed(0)
        losses[kind] = stage(batch)["mse"].item()
        stage.end_step()
    assert losses["epsilon"] != pytest.approx(losses["v_prediction"], rel=1e-3)
    stage.scheduler = DDPMScheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="prediction_type"):
        stage(batch)
    stage.end_step()
    stage.binding.detach()


def test_adapter_caption_source_i2t_and_scope_counts(world, rfa_run, i2t_run, tmp_path):
    """--caption_source i2t trains on the I2T's cached greedy captions; the named ControlNet scopes count params."""
    from diffusers import ControlNetModel

    from xsr_core.train.adapter import AdapterDataset, controlnet_scope_counts, train_adapter

    res = train_adapter(_adapter_cfg(world, rfa_run, i2t_run, tmp_path / "capi2t", max_steps=1, caption_source="i2t"))
    assert res["step"] == 1
    folder = next((world["data"] / "cache").glob("E-*"))
    caps = json.loads((folder / "captions-i2t-train.json").read_text())
    assert len(caps) == world["info"]["splits"]["train"] and all(isinstance(c, str) for c in caps)
    ds = AdapterDataset(world["data"], "train", folder, 64, caps)
    assert ds[0]["caption"] == caps[0]
    info = json.loads((tmp_path / "capi2t" / "final" / "xsr_stage2.json").read_text())
    assert info["caption_source"] == "i2t" and info["controlnet_train"] == "attention" and info["variant"] == "adain"
    cn = ControlNetModel.from_pretrained(str(tmp_path / "capi2t" / "final" / "controlnet"))
    counts = controlnet_scope_counts(cn)
    assert counts["none"] == 0 < counts["zero_convs"] < counts["attention"] < counts["all"]
    with pytest.raises(ValueError, match="caption_source"):
        _adapter_cfg(world, rfa_run, i2t_run, tmp_path / "x", caption_source="blip3")
    with pytest.raises(ValueError, match="--i2t is required"):
        AdapterTrainConfig(data="/d", output_dir="/o", pretrained="p", caption_source="i2t", variant="text_only")
    AdapterTrainConfig(data="/d", output_dir="/o", pretrained="p", variant="text_only")  # needs no I2T / RFA
