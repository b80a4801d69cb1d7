"""The shared training loop (accelerate): one GPU, many GPUs (DDP via ``accelerate launch``), or CPU.

A stage hands :func:`train_loop` a *stage module*: an ``nn.Module`` whose registered children are the
trainable parts and whose ``forward(batch)`` returns a dict of losses with ``"loss"`` (frozen models
are held as plain attributes so DDP neither wraps nor broadcasts them). The loop does

* deterministic data order: epoch e is a permutation seeded with (seed, e), split across processes,
  so a resumed run sees exactly the batches the interrupted one would have seen;
* gradient accumulation (``no_sync`` on all but the last micro-batch), clipping, and the learning rate
  of ``diffusers.optimization.get_scheduler`` (``--lr_schedule``, linear warm-up from 0 over
  ``--lr_warmup_steps``; a function of the step, rebuilt on resume);
* per-step seeding (seed, step, rank) of torch's RNG, so noise and dropout decisions resume exactly;
* optional EMA of the trainable weights (``diffusers.training_utils.EMAModel``: the decay of update t is
  ``min(ema_decay, (1 + t) / (10 + t))``, 0 at the first update), copied into the module at the end;
* resumable checkpoints by ``accelerator.save_state`` with automatic naming,
  ``output_dir/checkpoints/checkpoint_<i>/`` (rotation keeps the newest ``checkpoints_total_limit``):
  weights in ``model.safetensors``; optimizer / RNG (/ GradScaler) states are accelerate's ``torch.save``
  files, read back with ``weights_only=True``; we add ``ema.safetensors``, the resolved config and
  ``state.json`` (the optimiser step; written last, so a folder without it is incomplete).
  ``--resume_from_checkpoint latest`` picks the newest complete one;
* tqdm on the main process, ``log.jsonl`` and optional TensorBoard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import EngineConfig, write_config

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"  # accelerate's folder under project_dir with automatic_checkpoint_naming
CKPT_RE = re.compile(r"^checkpoint_(\d+)$")  # accelerate's checkpoint_<save index>
STATE_FILE = "state.json"
EMA_FILE = "ema.safetensors"


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
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir,
            logging_dir=str(Path(cfg.output_dir) / "logs"),
            automatic_checkpoint_naming=True,
            total_limit=cfg.checkpoints_total_limit,
        ),
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


def make_scheduler(cfg: EngineConfig, optimizer: torch.optim.Optimizer, step: int = 0):
    """``diffusers.optimization.get_scheduler`` for ``--lr_schedule`` / ``--lr_warmup_steps``, at ``step``.

    "constant" is diffusers' "constant_with_warmup" (our flag has always included the warm-up). The
    learning rate stays a function of the step and the current config (a resumed run may extend
    ``--max_steps``), so the scheduler is rebuilt at the resumed step instead of being checkpointed.
    """
    from diffusers.optimization import get_scheduler

    for g in optimizer.param_groups:
        g["initial_lr"] = cfg.learning_rate  # LambdaLR's base learning rate (also when resuming)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(
        name, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_steps, last_epoch=step - 1
    )


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


# ----------------------------------------------------------------------------------- checkpoints


def _ckpt_index(folder: Path) -> int:
    m = CKPT_RE.match(folder.name)
    return int(m.group(1)) if m else -1


def _ckpt_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoints/checkpoint_<i>`` folder (complete or not), oldest save first."""
    root = Path(output_dir) / CKPT_DIR
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=_ckpt_index)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete checkpoints in ``output_dir``, oldest save first."""
    out = []
    for p in _ckpt_folders(output_dir):
        if (p / STATE_FILE).is_file():
            out.append((int(json.loads((p / STATE_FILE).read_text())["step"]), p))
    return out


def _legacy_error(folder: Path) -> ValueError:
    return ValueError(
        f"{folder} is a checkpoint in XSR's earlier own format (trainable.safetensors + optimizer.safetensors); "
        "this version resumes only accelerate checkpoints (<output_dir>/checkpoints/checkpoint_<i>/). Start again "
        "without --resume_from_checkpoint in a new --output_dir, or finish that run with the XSR version that wrote it"
    )


def resolve_resume(cfg: EngineConfig) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names ("latest" = the newest save; None = fresh)."""
    r, root = cfg.resume_from_checkpoint, Path(cfg.output_dir)
    ckpts = list_checkpoints(root)
    if not r:
        if ckpts:
            raise ValueError(
                f"{root} already holds checkpoints of a run (newest: {ckpts[-1][1].name}, step {ckpts[-1][0]}): "
                "pass --resume_from_checkpoint latest to continue it, or choose a new --output_dir"
            )
        return None
    if r == "latest":
        if ckpts:
            return ckpts[-1][1]
        legacy = sorted(p for p in root.glob("checkpoint-*") if (p / "trainable.safetensors").is_file())
        if legacy:
            raise _legacy_error(legacy[-1])
        logger.info("no checkpoint in %s: starting from scratch", root)
        return None
    p = Path(r)
    if not p.is_absolute() and not p.exists():
        p = root / CKPT_DIR / r if (root / CKPT_DIR / r).exists() else root / r
    if (p / "trainable.safetensors").is_file():
        raise _legacy_error(p)
    if not (p / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {r}: {p} is not a complete checkpoint folder")
    return p


# EMA is written here, not by accelerator.register_for_checkpointing: accelerate reloads registered objects
# with torch.load(weights_only=False) (custom_checkpoint_<i>.pkl); ours is safetensors + JSON metadata.
def _save_ema(ema: EMAModel, names: list[str], folder: Path) -> None:
    sd = ema.state_dict()
    tensors = {n: t.detach().cpu().contiguous() for n, t in zip(names, sd.pop("shadow_params"))}
    save_file(tensors, str(folder / EMA_FILE), metadata={"ema": json.dumps(sd)})


def _load_ema(ema: EMAModel, names: list[str], folder: Path) -> None:
    with safe_open(str(folder / EMA_FILE), framework="pt") as f:
        sd = json.loads(f.metadata()["ema"])
        sd["shadow_params"] = [f.get_tensor(n) for n in names]
    ema.load_state_dict(sd)


def save_checkpoint(cfg: EngineConfig, accelerator: Any, step: int, ema: EMAModel | None, names: list[str]) -> Path:
    """``accelerator.save_state`` (rotation by ``total_limit``), then EMA, config and ``state.json`` (last)."""
    folder = Path(accelerator.save_state())
    if accelerator.is_main_process:
        if ema is not None:
            _save_ema(ema, names, folder)
        write_config(cfg, folder)
        state = {"step": step, "processes": accelerator.num_processes, "time": time.time()}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        logger.info("saved %s (step %d)", folder, step)
    accelerator.wait_for_everyone()
    return folder


def load_checkpoint(accelerator: Any, folder: Path, ema: EMAModel | None, names: list[str]) -> int:
    """Restore the prepared model/optimizer/scheduler (and EMA) from ``folder``; returns its step."""
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("processes", 1) != accelerator.num_processes:  # DDP-wrapped names, per-rank data order
        raise ValueError(
            f"{folder} was written by {state.get('processes', 1)} training processes, this run has "
            f"{accelerator.num_processes}: resume with the same number (accelerate launch --num_processes N)"
        )
    # accelerate reads the weights from safetensors and optimizer/scheduler/RNG states with torch.load(weights_only)
    accelerator.load_state(str(folder), load_kwargs={"weights_only": True})
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise ValueError(f"{folder} holds no EMA weights ({EMA_FILE}) but --ema_decay is set: resume without EMA")
        _load_ema(ema, names, folder)
        ema.to(device=accelerator.device)
    return int(state["step"])


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
    resume = resolve_resume(cfg)  # before anything is written into output_dir
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        write_config(cfg, root)
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(dataset)
    bs = effective_batch_size(cfg, n, world)
    steps_per_epoch = n // (bs * world)
    raw_optimizer = make_optimizer(cfg, module)
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
    model, optimizer = accelerator.prepare(module, raw_optimizer)
    raw = accelerator.unwrap_model(model)
    names = [n for n, p in raw.named_parameters() if p.requires_grad]
    trainable = [p for p in raw.parameters() if p.requires_grad]
    ema = None
    if ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(trainable, decay=ema_decay)
    folders = _ckpt_folders(root)
    if accelerator.is_main_process:
        for p in folders:
            if not (p / STATE_FILE).is_file():  # an interrupted save: it would count against total_limit
                logger.warning("removing the incomplete checkpoint %s", p)
                shutil.rmtree(p)
    accelerator.wait_for_everyone()
    accelerator.project_configuration.iteration = max((_ckpt_index(p) for p in folders), default=-1) + 1
    step = 0
    if resume is not None:
        step = load_checkpoint(accelerator, resume, ema, names)
        logger.info("resumed from %s at step %d", resume, step)
    scheduler = make_scheduler(cfg, raw_optimizer, step)
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
        lr = scheduler.get_last_lr()[0]
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
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(trainable)
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
            save_checkpoint(cfg, accelerator, step, ema, names)
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
        ema.copy_to(trainable)
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
