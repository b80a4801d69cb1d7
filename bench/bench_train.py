"""Training throughput benchmark (issue #6): stage 2 (U-Net + ControlNet + AdaIN adapter) and stage 1.

Real-size SD1.5 U-Net / ControlNet / VAE / CLIP-L text encoder built from literal diffusers configs with
random weights (no downloads), driven through the *real* training step
(:class:`xsr_core.train.adapter.AdapterStage`) under accelerate (bf16 by default): img/s and peak
memory per batch size, gradient checkpointing off/on. Stage 1: RFA and I2T training steps at real
sizes (ViT-L/14 tokens 257x1024, distilgpt2-size decoder, soft CLIP-text path).

    python bench/bench_train.py                         # GPU, writes bench/results/train_<device>.{json,md}
    python bench/bench_train.py --tiny                  # CPU smoke run with tiny models
    python bench/bench_train.py --stage 2 --controlnet-train attention --controlnet-train all   # scopes side by side
    accelerate launch --num_processes 8 bench/bench_train.py --stage 2   # multi-GPU scaling (issue #8)

img/s counts images over all processes. Stage 2 trains the ControlNet scope of ``--controlnet-train`` (the
trainer's ``--controlnet_train``; default ``attention``, the trainer's default), selected with the trainer's own
``select_controlnet_params``; every row records its scope and trainable parameter counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xsr_core.testing.sd15 import CLIP_L_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG  # noqa: E402


def build_stage2(tiny: bool, device: torch.device, dtype: torch.dtype, grad_ckpt: bool, scope: str = "attention"):
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        DDPMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig
    from xsr_core.train.adapter import AdapterStage, select_controlnet_params
    from xsr_core.train.config import AdapterTrainConfig

    torch.manual_seed(0)
    if tiny:
        from xsr_core.testing.zoo import build_tiny_sd

        unet, text, vae, _ = build_tiny_sd(0)
        embed = 32
    else:
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        embed = 1024
    controlnet = ControlNetModel.from_unet(unet, conditioning_channels=3)
    select_controlnet_params(controlnet, scope)  # what `train adapter --controlnet_train SCOPE` trains
    sched = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
    )
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    if grad_ckpt:
        unet.enable_gradient_checkpointing()
        controlnet.enable_gradient_checkpointing()
    adapter = AdaINAdapter(AdaINAdapterConfig.from_unet_config(dict(unet.config), embed_dim=embed))
    cfg = AdapterTrainConfig(data="-", output_dir="-", pretrained="-", i2t="-", rfa="-")
    stage = AdapterStage(adapter, controlnet, {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": sched}, cfg)
    stage.place_frozen(device, dtype)
    stage.set_empty_prompt(torch.full((1, 77), 49407, dtype=torch.long), None)
    return stage, embed


def bench_stage2(
    acc, tiny: bool, batch: int, grad_ckpt: bool, steps: int, warmup: int, res: int, scope: str = "attention"
) -> dict:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
    stage, embed = build_stage2(tiny, acc.device, dtype, grad_ckpt, scope)
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    model, opt = acc.prepare(stage, opt)
    raw = acc.unwrap_model(model)
    g = torch.Generator().manual_seed(acc.process_index)
    batch_data = {
        "pixels": torch.rand(batch, 3, res, res, generator=g) * 2 - 1,
        "hint": torch.rand(batch, 3, res, res, generator=g),
        "E": torch.randn(batch, 257, embed, generator=g),
        "clip_ids": torch.randint(0, 49407, (batch, 77), generator=g),
    }
    batch_data = {k: v.to(acc.device) for k, v in batch_data.items()}
    cuda = acc.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(acc.device)

    def step():
        with acc.autocast():
            loss = model(batch_data)["loss"]
            acc.backward(loss)
        raw.end_step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt_s = _timed(acc, step, warmup, steps)
    out = {
        "stage": "2",
        "controlnet_train": scope,
        "batch_per_process": batch,
        "processes": acc.num_processes,
        "grad_ckpt": grad_ckpt,
        "resolution": res,
        "img_per_s": batch * acc.num_processes * steps / dt_s,
        "s_per_step": dt_s / steps,
        "peak_mem_gib": torch.cuda.max_memory_allocated(acc.device) / 2**30 if cuda else None,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "controlnet_trainable_params_m": sum(p.numel() for p in stage.controlnet.parameters() if p.requires_grad) / 1e6,
        "adapter_params_m": sum(p.numel() for p in stage.adapter.parameters()) / 1e6,
    }
    raw.binding.detach()
    acc.free_memory(model, opt)  # accelerate keeps references to every prepared object otherwise
    return out


def bench_stage1(acc, tiny: bool, steps: int, warmup: int) -> list[dict]:
    from transformers import CLIPTextConfig, CLIPTextModel

    from xsr_core.models.i2t import I2T, I2TConfig
    from xsr_core.models.rfa import RFA, RFAConfig
    from xsr_core.models.text_decoder import SoftCLIPText

    dev = acc.device
    cuda = dev.type == "cuda"
    if tiny:
        from xsr_core.testing.tiny_models import tiny_i2t_config, tiny_rfa_config

        rcfg, icfg, T, D, B = tiny_rfa_config(32, 256), tiny_i2t_config(400, 32, 257), 257, 32, 4
        text_cfg = {
            **CLIP_L_TEXT_CONFIG,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
    else:
        rcfg, icfg, T, D, B = RFAConfig(), I2TConfig(), 257, 1024, 128
        text_cfg = CLIP_L_TEXT_CONFIG
    results = []
    for name in ("rfa", "i2t"):
        torch.manual_seed(0)
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        bs = B if name == "rfa" else max(1, B // 4)
        lr_t = torch.randn(bs, T, D, device=dev)
        if name == "rfa":
            model = RFA(rcfg)
            tgt = torch.randn(bs, D, device=dev)

            def fn(m, lr_t=lr_t, tgt=tgt):
                return {"loss": torch.nn.functional.mse_loss(m(lr_t).float(), tgt)}
        else:
            model = I2T(icfg)
            text = CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dev).requires_grad_(False).eval()
            V = icfg.decoder["vocab_size"]
            soft = SoftCLIPText(
                text, torch.randn(V, text_cfg["hidden_size"]) * 0.02, bos_token_id=49406, eos_token_id=49407
            )
            refs = torch.randn(bs, 4, T, D, device=dev)
            hr = torch.randn(bs, T, D, device=dev)
            L = min(24, icfg.max_caption_tokens)
            ids = torch.randint(0, V, (bs, L), device=dev)
            mask = torch.ones_like(ids)
            target = torch.randn(bs, text_cfg["hidden_size"], device=dev)

            def fn(m, a=(lr_t, hr, ids, mask, refs), soft=soft, target=target):
                return m.training_losses(*a, soft_text=soft, text_target=target)

        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        model, opt = acc.prepare(model, opt)
        raw = acc.unwrap_model(model)

        def step(fn=fn, raw=raw, opt=opt):
            with acc.autocast():
                loss = fn(raw)["loss"]
                acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt_s = _timed(acc, step, warmup, steps)
        results.append(
            {
                "stage": f"1-{name}",
                "batch_per_process": bs,
                "processes": acc.num_processes,
                "img_per_s": bs * acc.num_processes * steps / dt_s,
                "s_per_step": dt_s / steps,
                "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
            }
        )
        acc.free_memory(model, opt)
        _release(acc)
    return results


def _timed(acc, step, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones, synchronised across devices/ranks."""

    def sync():
        if acc.device.type == "cuda":
            torch.cuda.synchronize(acc.device)
        acc.wait_for_everyone()

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return time.perf_counter() - t0


def _release(acc) -> None:
    import gc

    acc.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(acc) -> str:
    if acc.device.type == "cuda":
        return torch.cuda.get_device_name(acc.device).replace(" ", "_")
    return f"cpu-{platform.machine()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models, 64 px (CPU smoke run)")
    p.add_argument("--stage", default="all", choices=["all", "1", "2"])
    p.add_argument("--batch-sizes", default=None, help="stage-2 per-process batch sizes (default 8,16,32; tiny 1,2)")
    p.add_argument("--grad-ckpt", default="off,on", help="gradient checkpointing settings to run")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--mixed-precision", default=None, help="no/bf16/fp16 (default bf16 on GPU, no on CPU)")
    p.add_argument(
        "--controlnet-train",
        action="append",
        default=None,
        help="stage-2 ControlNet scope (attention, zero_convs, all, none or name substrings, as the trainer's "
        "--controlnet_train); repeat to measure several side by side (default: attention)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args(argv)
    from accelerate import Accelerator

    cpu = args.tiny and not torch.cuda.is_available()
    mp = args.mixed_precision or ("no" if cpu or not torch.cuda.is_available() else "bf16")
    acc = Accelerator(mixed_precision=mp, cpu=cpu)
    steps = args.steps or (2 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    res = 64 if args.tiny else 512
    sizes = [int(x) for x in (args.batch_sizes or ("1,2" if args.tiny else "8,16,32")).split(",")]
    scopes = args.controlnet_train or ["attention"]
    rows: list[dict] = []
    if args.stage in ("all", "2"):
        for scope in scopes:
            for ck in [s.strip() == "on" for s in args.grad_ckpt.split(",")]:
                for bs in sizes:
                    try:
                        r = bench_stage2(acc, args.tiny, bs, ck, steps, warmup, res, scope)
                    except torch.cuda.OutOfMemoryError:
                        r = {
                            "stage": "2",
                            "controlnet_train": scope,
                            "batch_per_process": bs,
                            "grad_ckpt": ck,
                            "resolution": res,
                            "oom": True,
                        }
                    _release(acc)
                    rows.append(r)
                    if acc.is_main_process:
                        print(json.dumps(r), flush=True)
    if args.stage in ("all", "1"):
        for r in bench_stage1(acc, args.tiny, steps, warmup):
            rows.append(r)
            if acc.is_main_process:
                print(json.dumps(r), flush=True)
    if acc.is_main_process:
        write_results(Path(args.out), device_name(acc), rows, acc, args)
    return 0


def write_results(out: Path, device: str, rows: list[dict], acc, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "processes": acc.num_processes,
        "mixed_precision": acc.mixed_precision,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "controlnet_train": args.controlnet_train or ["attention"],
    }
    stem = (
        f"train_{device}" + ("_tiny" if args.tiny else "") + (f"_x{acc.num_processes}" if acc.num_processes > 1 else "")
    )
    (out / f"{stem}.json").write_text(json.dumps({**meta, "results": rows}, indent=2))
    lines = [
        f"# Training throughput — {device}",
        "",
        *(f"- {k}: `{v}`" for k, v in meta.items()),
        "",
        "| stage | ControlNet scope | trainable M | batch/proc | procs | grad ckpt | res | img/s | s/step | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("oom"):
            lines.append(
                f"| {r['stage']} | {r.get('controlnet_train', '')} | | {r['batch_per_process']} | | "
                f"{r.get('grad_ckpt', '')} | {r.get('resolution', '')} | OOM | | |"
            )
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
        tp = f"{r['trainable_params_m']:.1f}" if r.get("trainable_params_m") is not None else "-"
        lines.append(
            f"| {r['stage']} | {r.get('controlnet_train', '-')} | {tp} | {r['batch_per_process']} | "
            f"{r['processes']} | {r.get('grad_ckpt', '')} | {r.get('resolution', '')} | {r['img_per_s']:.1f} | "
            f"{r['s_per_step']:.3f} | {mem} |"
        )
    lines += ["", "Target: stage 2 >= 40 img/s at 512 px on one H100 (bf16)."]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.json/.md")


if __name__ == "__main__":
    raise SystemExit(main())
