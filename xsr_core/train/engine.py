"""The shared training loop (accelerate): one GPU, many GPUs (DDP via ``accelerate launch``), or CPU.

A stage hands :func:`train_loop` a *stage module*: an ``nn.Module`` whose registered children are the
trainable parts and whose ``forward(batch)`` returns a dict of losses with ``"loss"`` (frozen models
are held as plain attributes so DDP neither wraps nor broadcasts them). The loop does

* deterministic data order: epoch e is a permutation seeded with (seed, e), split across processes,
  so a resumed run sees exactly the batches the interrupted one would have seen;
* gradient accumulation (``no_sync`` on all but the last micro-batch), clipping, warm-up + constant
  or cosine learning rate (a pure function of the step, nothing to save);
* per-step seeding (seed, step, rank) of torch's RNG, so noise and dropout decisions resume exactly;
* resumable checkpoints ``output_dir/checkpoint-<step>/`` holding ``trainable.safetensors``,
  ``optimizer.safetensors`` (tensors; the non-tensor state in its metadata - no pickle),
  ``state.json`` and the resolved config; rotation keeps the newest ``checkpoints_total_limit``;
  ``--resume_from_checkpoint latest`` picks the highest step;
* tqdm on the main process, ``log.jsonl`` and optional TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import EngineConfig, write_config

logger = logging.getLogger(__name__)

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def make_accelerator(cfg: EngineConfig, *, find_unused_parameters: bool = False):
    """An ``accelerate.Accelerator`` for ``cfg`` (mixed precision, optional TensorBoard)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    kwargs = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    log_with = "tensorboard" if cfg.report_to == "tensorboard" else None
    acc = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu,
        log_with=log_with,
        kwargs_handlers=kwargs,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
    )
    return acc


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one optimiser step on one process (deterministic across resumes)."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def lr_at(cfg: EngineConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
        t = min(1.0, (step - cfg.lr_warmup_steps) / span)
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.learning_rate


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's batches of epoch ``epoch``: a seeded permutation, dropped-last, split by rank."""
    g = torch.Generator().manual_seed(seed * 7_777 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    per_step = batch_size * world
    steps = n // per_step
    return [perm[s * per_step + rank * batch_size : s * per_step + (rank + 1) * batch_size] for s in range(steps)]


def effective_batch_size(cfg: EngineConfig, n: int, world: int) -> int:
    """``cfg.batch_size`` shrunk when the data set is smaller than one global batch."""
    if n < world:
        raise ValueError(f"the training split has {n} samples, fewer than the {world} processes")
    bs = min(cfg.batch_size, n // world)
    if bs < cfg.batch_size:
        logger.warning("training split has %d samples: batch size lowered from %d to %d", n, cfg.batch_size, bs)
    return bs


def make_optimizer(cfg: EngineConfig, module: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (no weight decay on biases, norms and 1-d tensors)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("nothing to train: every parameter of the stage module is frozen")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2)
    )


# ----------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadows)."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{k}": v for k, v in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            if f"ema.{k}" in sd:
                self.shadow[k].copy_(sd[f"ema.{k}"])


# ----------------------------------------------------------------------------------- checkpoints


def _optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def _optimizer_from_file(opt: torch.optim.Optimizer, path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        state: dict[int, dict[str, Any]] = {}
        for key in f.keys():
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = f.get_tensor(key)
    for key, v in json.loads(meta["scalars"]).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints in ``output_dir``, oldest first."""
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = CKPT_RE.match(p.name)
            if m and (p / "state.json").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(cfg: EngineConfig) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names ("latest" = highest step; None = fresh)."""
    r = cfg.resume_from_checkpoint
    if not r:
        return None
    if r == "latest":
        ckpts = list_checkpoints(cfg.output_dir)
        if not ckpts:
            logger.info("no checkpoint in %s: starting from scratch", cfg.output_dir)
            return None
        return ckpts[-1][1]
    p = Path(r)
    if not p.is_absolute() and not p.exists():
        p = Path(cfg.output_dir) / r
    if not (p / "state.json").is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {r}: {p} is not a complete checkpoint folder")
    return p


def save_checkpoint(
    cfg: EngineConfig,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (temp folder + rename) and rotate old ones."""
    root = Path(cfg.output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    if ema is not None:
        sd.update({k: v.cpu().contiguous() for k, v in ema.state_dict().items()})
    save_file(sd, str(tmp / "trainable.safetensors"))
    tensors, meta = _optimizer_to_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"), metadata=meta)
    write_config(cfg, tmp)
    (tmp / "state.json").write_text(json.dumps({"step": step, "time": time.time(), **(extra or {})}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    ckpts = list_checkpoints(root)
    for _, old in ckpts[: max(0, len(ckpts) - cfg.checkpoints_total_limit)]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved %s", final)
    return final


def load_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None = None) -> int:
    """Restore module/optimizer/EMA from ``folder``; returns the step it was saved at."""
    with safe_open(str(folder / "trainable.safetensors"), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    ema_sd = {k: sd.pop(k) for k in list(sd) if k.startswith("ema.")}
    module.load_state_dict(sd, strict=True)
    if ema is not None:
        ema.load_state_dict(ema_sd)
    _optimizer_from_file(optimizer, folder / "optimizer.safetensors")
    return int(json.loads((folder / "state.json").read_text())["step"])


# ----------------------------------------------------------------------------------- the loop


def _to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def train_loop(
    cfg: EngineConfig,
    accelerator: Any,
    module: nn.Module,
    dataset: torch.utils.data.Dataset,
    collate: Callable[[list[Any]], Any] | None = None,
    *,
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None,
    ema_decay: float = 0.0,
) -> dict[str, Any]:
    """Train ``module`` (see the module docstring) for ``cfg.max_steps`` optimiser steps.

    ``evaluate(unwrapped_module, step)`` runs on the main process every ``cfg.eval_steps`` and at the
    end (and at step 0 of a fresh run when ``eval_steps`` > 0). Returns ``{"step", "history" (logged
    losses), "eval" (last evaluation), "evals" (all evaluations), "module" (unwrapped, EMA weights
    copied in when EMA is on)}``.
    """
    root = Path(cfg.output_dir)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        write_config(cfg, root)
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(dataset)
    bs = effective_batch_size(cfg, n, world)
    steps_per_epoch = n // (bs * world)
    optimizer = make_optimizer(cfg, module)
    logger.info(
        "train_loop: processes: %d, device %s, per-process batch %d x %d accumulation, %d steps/epoch, "
        "mixed precision %s",
        world,
        accelerator.device,
        bs,
        cfg.gradient_accumulation_steps,
        steps_per_epoch,
        cfg.mixed_precision,
    )
    ema = EMA(module, ema_decay) if ema_decay > 0 else None
    step = 0
    resume = resolve_resume(cfg)
    if resume is not None:
        step = load_checkpoint(resume, module, optimizer, ema)
        logger.info("resumed from %s at step %d", resume, step)
    model, optimizer = accelerator.prepare(module, optimizer)
    raw = accelerator.unwrap_model(model)
    if cfg.report_to == "tensorboard":
        accelerator.init_trackers(
            "xsr", config={k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
        )
    history: list[dict[str, float]] = []
    last_eval: dict[str, float] = {}
    evals: list[dict[str, Any]] = []
    accum = cfg.gradient_accumulation_steps
    import sys

    from tqdm.auto import tqdm

    show = accelerator.is_local_main_process and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not show, desc="train")
    t_start, step0 = time.monotonic(), step
    batches_iter = _batch_stream(dataset, collate, cfg, bs, steps_per_epoch, step * accum, rank, world)
    if evaluate is not None and accelerator.is_main_process and step == 0 and cfg.eval_steps:
        model.eval()
        first = evaluate(raw, 0)  # the "before training" figure
        with open(root / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": 0, "eval": first}) + "\n")
        evals.append({"step": 0, **first})
    accelerator.wait_for_everyone()
    model.train()
    running: dict[str, float] = {}
    while step < cfg.max_steps:
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        lr = lr_at(cfg, step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        for micro in range(accum):
            batch = _to_device(next(batches_iter), accelerator.device)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                losses = model(batch)
                accelerator.backward(losses["loss"] / accum)
            end = getattr(raw, "end_step", None)
            if end is not None:
                end()
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach()) / accum
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(raw)
        step += 1
        bar.update(1)
        if step % cfg.log_steps == 0 or step == cfg.max_steps:
            row = {
                k: v / (cfg.log_steps if step % cfg.log_steps == 0 else (step % cfg.log_steps))
                for k, v in running.items()
            }
            row = _reduce_mean(accelerator, row)
            row.update(step=step, lr=lr)
            history.append(row)
            running = {}
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if (
                not show and accelerator.is_main_process
            ):  # no terminal (a log file, CI): one progress line per log_steps
                el = time.monotonic() - t_start
                per = el / max(1, step - step0)
                losses = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("step", "lr"))
                logger.info(
                    "step %d/%d (%.0f%%) %s lr %.3g | %.2f s/step, ETA %.0f s",
                    step,
                    cfg.max_steps,
                    100.0 * step / cfg.max_steps,
                    losses,
                    lr,
                    per,
                    per * (cfg.max_steps - step),
                )
            if accelerator.is_main_process:
                with open(root / "log.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
        if step % cfg.checkpointing_steps == 0 or step == cfg.max_steps:
            if accelerator.is_main_process:
                save_checkpoint(cfg, step, raw, optimizer, ema)
            accelerator.wait_for_everyone()
        if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
            if evaluate is not None and accelerator.is_main_process:
                model.eval()
                last_eval = evaluate(raw, step)
                evals.append({"step": step, **last_eval})
                logger.info(
                    "step %d eval: %s", step, {k: v for k, v in last_eval.items() if isinstance(v, (int, float))}
                )
                model.train()
                with open(root / "log.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "eval": last_eval}) + "\n")
                accelerator.log(
                    {f"eval/{k}": v for k, v in last_eval.items() if isinstance(v, (int, float))}, step=step
                )
            accelerator.wait_for_everyone()
    bar.close()
    if ema is not None:
        ema.copy_to(raw)
    accelerator.end_training()
    return {"step": step, "history": history, "eval": last_eval, "evals": evals, "module": raw}


def _reduce_mean(accelerator: Any, row: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return row
    keys = sorted(row)
    t = torch.tensor([row[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))


def _batch_stream(
    dataset, collate, cfg: EngineConfig, bs: int, steps_per_epoch: int, start_micro: int, rank: int, world: int
):
    """Infinite stream of this process's batches, starting at global micro-batch ``start_micro``."""
    epoch, offset = divmod(start_micro, steps_per_epoch)
    while True:
        batches = epoch_batches(len(dataset), bs, cfg.seed, epoch, rank, world)[offset:]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers
        )
        yield from loader
        epoch, offset = epoch + 1, 0
