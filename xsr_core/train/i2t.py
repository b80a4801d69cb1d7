"""``train i2t`` (Stage 1b, DESIGN §2.3): enhancer (cosine to HR tokens) + caption decoder.

For every train/test image the trained RFA retrieves K references from the prepared reference DB;
the retrieved ids and the references' CLIP tokens are cached under
``DATA/cache/refs-<rfa sha256[:16]>-k<K>/`` (so the I2T and adapter stages, and reruns, reuse them).
The I2T is trained with :meth:`xsr_core.models.i2t.I2T.training_losses`: token cosine to the HR
tokens, teacher-forced caption cross-entropy and the soft CLIP-text path through the SD
checkpoint's own CLIP text encoder (frozen; the design note is in :mod:`xsr_core.models.i2t`).
Evaluation logs the enhancer's token cosine (and the raw LR tokens' as the baseline), the CLIP-text
cosine between greedily decoded captions and the data captions, and sample captions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.i2t import I2T, I2TConfig, save_i2t, token_cosine_loss
from ..models.rfa import RFA
from ..models.text_decoder import SoftCLIPText, encode_captions
from ..weights import load_model
from .config import I2TTrainConfig
from .data import TokenCache, load_items, read_prepare_info
from .engine import make_accelerator, seed_everything, train_loop

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ text side


def load_clip_text(pretrained: str | os.PathLike, clip_tokenizer: str | os.PathLike = "") -> tuple[nn.Module, Any]:
    """(frozen CLIPTextModel, CLIP tokenizer) of an SD1.x diffusers folder (``text_encoder/``, ``tokenizer/``).

    ``clip_tokenizer`` overrides the folder's tokenizer (needed when the folder has none).
    """
    from transformers import AutoTokenizer, CLIPTextModel

    root = Path(pretrained)
    if not (root / "text_encoder" / "config.json").is_file():
        raise FileNotFoundError(
            f"{root}: no text_encoder/ (a diffusers SD1.x folder is needed for the CLIP text "
            "encoder); convert a single-file checkpoint with diffusers or give its config folder"
        )
    tok_dir = Path(clip_tokenizer) if clip_tokenizer else root / "tokenizer"
    if not tok_dir.is_dir() or not any(tok_dir.iterdir()):
        raise FileNotFoundError(
            f"no CLIP tokenizer at {tok_dir}: pass --clip_tokenizer DIR (a folder with "
            "vocab.json/merges.txt or tokenizer.json, e.g. ComfyUI's comfy/sd1_tokenizer)"
        )
    text = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).requires_grad_(False).eval()
    tok = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return text, tok


def clip_tokenize(tok: Any, captions: list[str], max_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# ------------------------------------------------------------------------------ retrieval cache


def _file_sha(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def refs_dir(data: str | os.PathLike, rfa_path: str | os.PathLike, k: int) -> Path:
    return Path(data) / "cache" / f"refs-{_file_sha(rfa_path)[:16]}-k{k}"


class RefCache:
    """Retrieved reference ids per split and the references' CLIP tokens (fp16), for one RFA file and K."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.ids = {p.stem[4:]: json.loads(p.read_text()) for p in folder.glob("ids-*.json")}
        with safe_open(str(folder / "ref_tokens.safetensors"), framework="pt") as f:
            self.tokens = f.get_tensor("tokens")
            db_ids = f.get_tensor("db_ids").tolist()
        self.row = {int(d): i for i, d in enumerate(db_ids)}

    def refs(self, split: str, i: int) -> torch.Tensor:
        """(K, T, D) float32 reference tokens of item ``i`` of ``split``."""
        ids = self.ids[split][i]
        if not ids:
            return self.tokens.new_zeros((0, *self.tokens.shape[1:])).float()
        return self.tokens[[self.row[d] for d in ids]].float()


@torch.no_grad()
def build_ref_cache(
    data: str | os.PathLike,
    rfa_path: str | os.PathLike,
    k: int,
    splits=("train", "test"),
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> RefCache:
    """Retrieve ``k`` references for every item of ``splits`` with the RFA; cache ids and ref tokens."""
    from safetensors.torch import save_file

    from ..clip_vision import ClipVisionEncoder
    from ..refdb import ReferenceDB

    folder = refs_dir(data, rfa_path, k)
    if (folder / "ref_tokens.safetensors").is_file() and all((folder / f"ids-{s}.json").is_file() for s in splits):
        return RefCache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = read_prepare_info(data)
    rfa = load_model(rfa_path, expected=RFA, device=device)
    db_path = Path(data) / "refdb"
    if k > 0 and not (db_path / "info.json").is_file():
        raise FileNotFoundError(
            f"{db_path}: no reference DB (the reference split was empty); prepare with a "
            "non-zero reference share or use --num_refs 0"
        )
    db = ReferenceDB.open(db_path, allowed_roots=[data]) if k > 0 else None  # paths mode: HR crops in data/
    encoder = ClipVisionEncoder.from_file(info["encoder"], device=device)
    if db is not None:
        db.check_encoder(encoder.fingerprint)
    all_ids: set[int] = set()
    for split in splits:
        cache = TokenCache(data, split)
        ids: list[list[int]] = []
        for s in range(0, len(cache), batch_size):
            if k == 0:
                ids.extend([] for _ in range(s, min(len(cache), s + batch_size)))
                continue
            toks = torch.stack([cache.row(i, "lr_tokens") for i in range(s, min(len(cache), s + batch_size))]).float()
            q = rfa.query_embedding(toks.to(device)).cpu()
            _, found = db.search(q.numpy(), k=k)
            ids.extend([int(x) for x in row if x >= 0] for row in found)
        if any(len(r) < min(k, db.n if db else 0) for r in ids):
            raise RuntimeError(f"reference DB {db_path} returned fewer than {k} hits for some {split} queries")
        (folder / f"ids-{split}.json").write_text(json.dumps(ids))
        all_ids.update(d for r in ids for d in r)
    uniq = sorted(all_ids)
    toks = []
    for s in range(0, len(uniq), batch_size):
        imgs = db.load_images(uniq[s : s + batch_size], as_numpy=True)
        for img in imgs:  # references may differ in size: encode one by one
            x = torch.from_numpy(img.copy()).float().div(255.0)[None]
            toks.append(encoder.encode_images(x).tokens.half().cpu())
    T, D = info["num_tokens"], info["clip_dim"]
    tokens = torch.cat(toks) if toks else torch.zeros((0, T, D), dtype=torch.float16)
    tmp = folder / "ref_tokens.safetensors.tmp"
    save_file({"tokens": tokens.contiguous(), "db_ids": torch.tensor(uniq, dtype=torch.int64)}, str(tmp))
    os.replace(tmp, folder / "ref_tokens.safetensors")
    logger.info("retrieved %d references for %s (%d unique)", k, ",".join(splits), len(uniq))
    return RefCache(folder)


# ------------------------------------------------------------------------------ data


class I2TDataset(torch.utils.data.Dataset):
    def __init__(self, data: str | os.PathLike, split: str, refs: RefCache, num_refs: int):
        self.cache = TokenCache(data, split)
        self.items = load_items(data, split)
        if len(self.items) != len(self.cache):
            raise ValueError(
                f"{data}: {split} has {len(self.items)} items but {len(self.cache)} cached rows; rerun prepare"
            )
        missing = [it["source"] for it in self.items if not it.get("caption")]
        if missing:
            raise ValueError(
                f"{data}: {len(missing)} {split} images have no caption (e.g. {missing[:3]}); rerun prepare "
                "with --captions or --blip2"
            )
        self.refs, self.split, self.num_refs = refs, split, num_refs

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        out: dict[str, Any] = self.cache.get(i, ("lr_tokens", "hr_tokens"))
        out["ref_tokens"] = self.refs.refs(self.split, i)[: self.num_refs]
        out["caption"] = self.items[i]["caption"]
        out["index"] = torch.tensor(i)
        return out


class I2TCollate:
    def __init__(self, gpt2_tok: Any, clip_tok: Any, max_caption_tokens: int):
        self.gpt2_tok, self.clip_tok, self.max_len = gpt2_tok, clip_tok, max_caption_tokens

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = {k: torch.stack([r[k] for r in rows]) for k in ("lr_tokens", "hr_tokens", "ref_tokens", "index")}
        caps = [r["caption"] for r in rows]
        out["caption_ids"], out["caption_mask"] = encode_captions(self.gpt2_tok, caps, self.max_len)
        out["clip_ids"], out["clip_mask"] = clip_tokenize(self.clip_tok, caps)
        return out


# ------------------------------------------------------------------------------ stage


class I2TStage(nn.Module):
    def __init__(self, i2t: I2T, soft: SoftCLIPText, cfg: I2TTrainConfig):
        super().__init__()
        self.i2t = i2t
        object.__setattr__(self, "soft", soft)  # frozen, not a registered child (DDP must not see it)
        self.cfg = cfg

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        c = self.cfg
        refs = batch["ref_tokens"] if batch["ref_tokens"].shape[1] > 0 else None
        soft = self.soft if c.w_text > 0 else None
        target = self.soft.encode_ids(batch["clip_ids"], batch["clip_mask"]) if soft is not None else None
        return self.i2t.training_losses(
            batch["lr_tokens"],
            batch["hr_tokens"],
            batch["caption_ids"],
            batch["caption_mask"],
            refs,
            soft_text=soft,
            text_target=target,
            tau=c.tau,
            gumbel=c.gumbel,
            w_token=c.w_token,
            w_ce=c.w_ce,
            w_text=c.w_text,
        )


def build_i2t(cfg: I2TTrainConfig, text_model: nn.Module) -> tuple[I2T, Any]:
    info = read_prepare_info(cfg.data)
    dims = {
        "clip_dim": info["clip_dim"],
        "num_tokens": info["num_tokens"],
        "clip_text_dim": text_model.config.hidden_size,
        "max_refs": max(cfg.num_refs, 1),
    }
    return I2T.from_decoder_dir(I2TConfig(**{**dims, **cfg.model}), cfg.decoder_dir)


def make_evaluator(cfg: I2TTrainConfig, dataset: I2TDataset, collate: I2TCollate, tokenizer: Any, clip_tok: Any):
    def evaluate(stage: I2TStage, step: int) -> dict[str, Any]:
        device = next(stage.parameters()).device
        m, soft = stage.i2t, stage.soft
        tok_cos, base_cos, text_cos, samples = [], [], [], []
        for s in range(0, len(dataset), 32):
            b = collate([dataset[i] for i in range(s, min(len(dataset), s + 32))])
            b = {k: v.to(device) for k, v in b.items()}
            with torch.no_grad():
                E = m(b["lr_tokens"], b["ref_tokens"] if b["ref_tokens"].shape[1] else None)
                tok_cos.append(1 - token_cosine_loss(E, b["hr_tokens"]).item())
                base_cos.append(1 - token_cosine_loss(b["lr_tokens"], b["hr_tokens"]).item())
                caps = m.generate_caption(E, tokenizer, max_new_tokens=cfg.max_new_tokens, use_cuda_graph=False)
                ids, mask = clip_tokenize(clip_tok, caps)
                gen = soft.encode_ids(ids.to(device), mask.to(device))
                ref = soft.encode_ids(b["clip_ids"], b["clip_mask"])
                text_cos.append(F.cosine_similarity(gen.float(), ref.float(), dim=-1).mean().item())
            if len(samples) < cfg.sample_captions:
                samples.extend(
                    {"generated": g, "caption": dataset.items[s + j]["caption"]}
                    for j, g in enumerate(caps[: cfg.sample_captions - len(samples)])
                )
        res = {
            "token_cos": sum(tok_cos) / len(tok_cos),
            "baseline_lr_token_cos": sum(base_cos) / len(base_cos),
            "clip_text_cos": sum(text_cos) / len(text_cos),
            "samples": samples,
        }
        logger.info(
            "step %d i2t eval: token_cos %.4f (LR %.4f), clip_text_cos %.4f; e.g. %r",
            step,
            res["token_cos"],
            res["baseline_lr_token_cos"],
            res["clip_text_cos"],
            samples[:1],
        )
        return res

    return evaluate


def train_i2t(cfg: I2TTrainConfig) -> dict[str, Any]:
    """Train the I2T; writes ``output_dir/final/i2t.safetensors`` (tokenizer inside)."""
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)
    text_model, clip_tok = load_clip_text(cfg.pretrained, cfg.clip_tokenizer)
    i2t, tokenizer = build_i2t(cfg, text_model)
    if accelerator.is_main_process:
        refs = build_ref_cache(cfg.data, cfg.rfa, cfg.num_refs, device=accelerator.device)
    accelerator.wait_for_everyone()
    refs = RefCache(refs_dir(cfg.data, cfg.rfa, cfg.num_refs))
    soft = SoftCLIPText.build(text_model, clip_tok, tokenizer).to(accelerator.device)
    stage = I2TStage(i2t, soft, cfg)
    collate = I2TCollate(tokenizer, clip_tok, i2t.config.max_caption_tokens)
    dataset = I2TDataset(cfg.data, "train", refs, cfg.num_refs)
    evaluate = None
    if accelerator.is_main_process and cfg.eval_split:
        evaluate = make_evaluator(
            cfg, I2TDataset(cfg.data, cfg.eval_split, refs, cfg.num_refs), collate, tokenizer, clip_tok
        )
    result = train_loop(cfg, accelerator, stage, dataset, collate, evaluate=evaluate)
    if accelerator.is_main_process:
        result["path"] = save_i2t(
            result["module"].i2t.eval(), Path(cfg.output_dir) / "final" / "i2t.safetensors", tokenizer
        )
    return result
