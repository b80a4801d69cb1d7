"""``train rfa`` (Stage 1a, DESIGN §2.1): L_align on cached CLIP tokens, recall@k against the reference DB.

The RFA reads the cached LR tokens and regresses the cached HR CLS (``align_loss``; an optional
in-batch InfoNCE term is available via ``w_contrastive``). The goal is retrieval, so the evaluation
reports recall@k of held-out LR queries: the gallery is the reference DB *plus* the held-out images'
own HR CLS vectors (the DB never contains them), and a query is a hit when its own HR image is among
the top k. The same figure is reported for the raw LR CLIP CLS as query (the baseline RFA must beat).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.rfa import RFA, RFAConfig, align_loss
from ..weights import save_model
from .config import RFATrainConfig, _parse_ks
from .data import TokenCache, read_prepare_info
from .engine import make_accelerator, seed_everything, train_loop

logger = logging.getLogger(__name__)


class CacheDataset(torch.utils.data.Dataset):
    """Rows of a split's CLIP cache (``keys`` of :class:`~.data.TokenCache`) plus their position."""

    def __init__(self, data: str | Path, split: str, keys: tuple[str, ...]):
        self.cache = TokenCache(data, split)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        out = self.cache.get(i, self.keys)
        out["index"] = torch.tensor(i)
        return out


class RFAStage(nn.Module):
    def __init__(self, rfa: RFA, cfg: RFATrainConfig):
        super().__init__()
        self.rfa = rfa
        self.w_contrastive = cfg.w_contrastive
        self.temperature = cfg.temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pred = self.rfa(batch["lr_tokens"])
        target = batch["hr_cls"]
        out = {"align": align_loss(pred, target)}
        loss = out["align"]
        if self.w_contrastive > 0:
            logits = F.normalize(pred.float(), dim=-1) @ F.normalize(target.float(), dim=-1).T / self.temperature
            out["contrastive"] = F.cross_entropy(logits, torch.arange(len(pred), device=pred.device))
            loss = loss + self.w_contrastive * out["contrastive"]
        out["loss"] = loss
        return out


def build_rfa(cfg: RFATrainConfig) -> RFA:
    """An RFA sized for the prepared data (clip_dim, num_patches from the cache) + ``cfg.model`` overrides."""
    info = read_prepare_info(cfg.data)
    dims = {"clip_dim": info["clip_dim"], "out_dim": info["clip_dim"], "num_patches": info["num_tokens"] - 1}
    return RFA(RFAConfig(**{**dims, **cfg.model}))


@torch.no_grad()
def retrieval_recall(
    queries: torch.Tensor, gallery_extra: torch.Tensor, db: Any, ks: list[int], distractors: torch.Tensor | None = None
) -> dict[str, float]:
    """recall@k of queries (n, D) whose correct answer is row i of ``gallery_extra`` (n, D), searched
    among ``gallery_extra`` ∪ ``distractors`` (m, D) ∪ the reference DB (exact: a query's rank is the
    number of gallery entries scoring strictly higher than its own HR)."""
    q = F.normalize(queries.float(), dim=-1)
    g = F.normalize(gallery_extra.float(), dim=-1)
    kmax = max(ks)
    s_extra = q @ g.T  # (n, n)
    own = s_extra.diagonal()
    higher = (s_extra > own[:, None]).sum(dim=1)
    if distractors is not None and len(distractors):
        higher = higher + (q @ F.normalize(distractors.float(), dim=-1).T > own[:, None]).sum(dim=1)
    if db is not None and db.n > 0:
        scores, _ = db.search(q.numpy(), k=min(kmax, db.n))
        higher = higher + (torch.from_numpy(scores) > own[:, None]).sum(dim=1)
    return {f"recall@{k}": float((higher < k).float().mean()) for k in ks}


def make_evaluator(cfg: RFATrainConfig, distractors: torch.Tensor | None = None):
    """evaluate(rfa_stage, step) → recall@k of RFA queries and of raw LR CLS queries on ``eval_split``."""
    from ..refdb import ReferenceDB

    ks = _parse_ks(cfg.recall_k)
    cache = TokenCache(cfg.data, cfg.eval_split)
    db_path = Path(cfg.data) / "refdb"
    db = ReferenceDB.open(db_path) if (db_path / "info.json").is_file() else None
    hr_cls, lr_cls = cache.stack("hr_cls"), cache.stack("lr_cls")
    baseline = {f"baseline_lr_cls_{k}": v for k, v in retrieval_recall(lr_cls, hr_cls, db, ks, distractors).items()}

    def evaluate(stage: RFAStage, step: int) -> dict[str, float]:
        device = next(stage.parameters()).device
        preds = []
        for s in range(0, len(cache), 64):
            toks = torch.stack([cache.row(i, "lr_tokens") for i in range(s, min(len(cache), s + 64))]).float()
            preds.append(stage.rfa.query_embedding(toks.to(device)).cpu())
        res = {f"rfa_{k}": v for k, v in retrieval_recall(torch.cat(preds), hr_cls, db, ks, distractors).items()}
        res.update(baseline)
        res["gallery"] = (
            len(cache) + (db.n if db is not None else 0) + (len(distractors) if distractors is not None else 0)
        )
        logger.info("step %d retrieval: %s", step, res)
        return res

    return evaluate


def train_rfa(cfg: RFATrainConfig, *, distractors: torch.Tensor | None = None) -> dict[str, Any]:
    """Train the RFA; writes ``output_dir/final/rfa.safetensors``; returns the loop result (+ ``path``).

    ``distractors`` (m, D): extra HR CLS vectors added to the evaluation gallery (hard negatives).
    """
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    stage = RFAStage(build_rfa(cfg), cfg)
    dataset = CacheDataset(cfg.data, "train", ("lr_tokens", "hr_cls"))
    evaluate = make_evaluator(cfg, distractors) if accelerator.is_main_process else None
    result = train_loop(cfg, accelerator, stage, dataset, evaluate=evaluate)
    if accelerator.is_main_process:
        result["path"] = save_model(result["module"].rfa.eval(), Path(cfg.output_dir) / "final" / "rfa.safetensors")
    return result
