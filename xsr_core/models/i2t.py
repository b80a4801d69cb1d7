"""I2T — the Stage-1b image-embedding enhancer and caption decoder (DESIGN §2.3).

Enhancer
    queries = the LR image's CLIP vision tokens (B, 257, C); keys/values = the LR stream ⊕ the K
    retrieved references' tokens (B, K, 257, C), K = 0..max_refs (K = 0 degrades to
    self-attention over the LR tokens; ``ref_mask`` (B, K) marks missing references). Every token
    gets a learned position embedding and a learned *source* embedding (0 = LR, k = reference k),
    so the model knows what it attends to. ``depth`` pre-LN blocks (see
    :class:`~.layers.CrossAttentionBlock`) update the LR stream; the output is a residual on the LR
    tokens, E = F_LR + Linear(LN(x)) (B, 257, C), in CLIP token space so that it can be
    cosine-aligned to the HR image's tokens (:func:`token_cosine_loss`).

Text path
    E → LayerNorm → Linear to ``width`` → *attention pooling* (one learned query, ``heads`` heads,
    over all 257 tokens: the summary vector) → MLP → ``prefix_len`` embeddings of GPT-2 width (+ a
    learned prefix position embedding) → a distilgpt2-family ``GPT2LMHeadModel`` → caption tokens.
    Attention pooling was chosen over a mean so that the summary can weight the object tokens over
    background tokens. The GPT-2 weights are part of the I2T file, and so is its tokenizer (the
    ``tokenizer.json`` string in the metadata key ``xsr.tokenizer_json``; see :func:`save_i2t` and
    :func:`load_i2t`). Decoding (greedy / beam, KV cache, CUDA graph) is
    :class:`~.text_decoder.GPT2PrefixDecoder`.

Design decision — training "CLIP-text(generated caption) ≈ CLIP-text(BLIP-2 caption)" through tokens
    The paper's objective is a cosine between CLIP text embeddings, but the caption is discrete, so
    the cosine has no gradient through sampled tokens. :meth:`I2T.training_losses` combines:

    (a) ``caption_ce`` — teacher-forced cross-entropy of GPT-2 on the BLIP-2 caption tokens (+ EOS)
        given the prefix. This is the main signal: at its optimum the decoder reproduces the
        caption, hence its CLIP text embedding.
    (b) ``text_cos`` — a differentiable *soft* path. The GPT-2's teacher-forced per-position output
        distribution p_t = softmax(logits_t / τ) (or, with ``gumbel=True``, straight-through
        Gumbel-softmax: one-hot forward, soft gradient) is multiplied by a fixed matrix M
        (V_gpt2 × D_clip) mapping every GPT-2 vocabulary entry to the mean CLIP token embedding of
        its CLIP-tokenized string (:func:`~.text_decoder.build_vocab_map`). The resulting soft
        token embeddings, wrapped in CLIP's BOS/EOS embeddings, go as ``inputs_embeds`` into a
        FROZEN CLIP text encoder (:class:`~.text_decoder.SoftCLIPText`), pooled at the EOS position
        (and projected when the model has a projection); loss = 1 − cos(pooled_soft, target),
        target = the same encoder's embedding of the real BLIP-2 caption. Gradients reach GPT-2,
        the prefix and the enhancer, never the CLIP text encoder (its parameters are frozen and it
        is not part of the I2T weights: it is passed in at training time).
    (c) ``token_cos`` — mean(1 − cos) between E and the HR tokens (the enhancer's alignment).

    ``loss = w_token · token_cos + w_ce · caption_ce + w_text · text_cos``. Teacher forcing keeps
    the soft sequence aligned with the real caption (one position per caption token), so the soft
    path measures "how CLIP reads what the decoder believes" rather than a free-running sample;
    it sharpens the distribution towards tokens CLIP reads the same way. At inference the caption
    is decoded greedily (or by beam search) and re-encoded by the user's CLIP model, so the
    reported metric is exactly the paper's cosine on real text.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..weights import XSRWeightsError, load_model, read_metadata, register, save_model
from .layers import Attention, CrossAttentionBlock, MLP, init_transformer_weights
from .text_decoder import (
    DISTILGPT2_CONFIG,
    EOS_TOKEN,
    GPT2PrefixDecoder,
    SoftCLIPText,
    build_gpt2,
    cosine_loss,
    decode_tokens,
    decoder_config_dict,
    tokenizer_from_json,
    tokenizer_to_json,
)

logger = logging.getLogger(__name__)

META_TOKENIZER = "xsr.tokenizer_json"
META_TOKENIZER_EOS = "xsr.tokenizer_eos"


@dataclass
class I2TConfig:
    clip_dim: int = 1024  # width of the CLIP vision tokens (ViT-L/14: 1024); E has this width too
    width: int = 1024  # inner width of the enhancer and of the pooling
    depth: int = 4  # enhancer blocks
    heads: int = 16  # attention heads (enhancer and pooling); width must be divisible by it
    mlp_ratio: float = 4.0  # enhancer MLP hidden width = width * mlp_ratio
    num_tokens: int = 257  # CLIP tokens per image (CLS + 16x16 patches)
    max_refs: int = 8  # most reference images the enhancer accepts (source embeddings 1..max_refs)
    prefix_len: int = 10  # number of GPT-2 prefix embeddings produced from the pooled E
    decoder: dict = field(default_factory=lambda: dict(DISTILGPT2_CONFIG))  # GPT-2 config (DISTILGPT2_CONFIG keys)
    clip_text_dim: int = 768  # CLIP text token-embedding width the soft text path feeds (SD1.x CLIP-L: 768)
    dropout: float = 0.0  # dropout in the enhancer and pooling (training only)
    max_caption_tokens: int = 48  # teacher-forcing cut of caption tokens (incl. EOS)

    def __post_init__(self) -> None:
        for name in ("clip_dim", "width", "depth", "heads", "num_tokens", "prefix_len", "clip_text_dim",
                     "max_caption_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"I2TConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.max_refs, int) or self.max_refs < 0:
            raise ValueError(f"I2TConfig.max_refs must be an int >= 0, got {self.max_refs!r}")
        if self.width % self.heads:
            raise ValueError(f"I2TConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not (self.mlp_ratio > 0 and math.isfinite(self.mlp_ratio)):
            raise ValueError(f"I2TConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"I2TConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.decoder, dict):
            raise ValueError(f"I2TConfig.decoder must be a GPT-2 config dict, got {type(self.decoder).__name__}")
        unknown = sorted(set(self.decoder) - set(DISTILGPT2_CONFIG))
        if unknown:
            raise ValueError(f"I2TConfig.decoder has unknown keys {unknown}; allowed: {sorted(DISTILGPT2_CONFIG)}")
        self.decoder = {**DISTILGPT2_CONFIG, **self.decoder}
        d = self.decoder
        for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "eos_token_id"):
            if not isinstance(d[k], int) or d[k] < 0 or (k != "eos_token_id" and d[k] == 0):
                raise ValueError(f"I2TConfig.decoder[{k!r}] must be a positive int, got {d[k]!r}")
        if d["n_embd"] % d["n_head"]:
            raise ValueError(f"I2TConfig.decoder n_embd ({d['n_embd']}) must be divisible by n_head ({d['n_head']})")
        if d["eos_token_id"] >= d["vocab_size"]:
            raise ValueError(f"I2TConfig.decoder eos_token_id {d['eos_token_id']} >= vocab_size {d['vocab_size']}")
        if self.prefix_len + self.max_caption_tokens > d["n_positions"]:
            raise ValueError(
                f"I2TConfig: prefix_len + max_caption_tokens ({self.prefix_len + self.max_caption_tokens}) "
                f"exceeds the decoder's n_positions ({d['n_positions']})"
            )


def token_cosine_loss(E: torch.Tensor, hr_tokens: torch.Tensor) -> torch.Tensor:
    """mean over batch and tokens of (1 − cos(E_t, HR_t)); both (B, T, C)."""
    if E.shape != hr_tokens.shape:
        raise ValueError(f"token_cosine_loss: E {tuple(E.shape)} and HR tokens {tuple(hr_tokens.shape)} differ")
    return cosine_loss(E, hr_tokens)


@register
class I2T(nn.Module):
    """Embedding enhancer + prefix GPT-2 caption decoder."""

    config_class = I2TConfig

    def __init__(self, config: I2TConfig):
        super().__init__()
        if isinstance(config, dict):
            config = I2TConfig(**config)
        self.config = config
        c = config
        d = c.decoder
        # Enhancer.
        self.in_norm = nn.LayerNorm(c.clip_dim)
        self.in_proj = nn.Linear(c.clip_dim, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens, c.width))
        self.source_embed = nn.Parameter(torch.zeros(1 + c.max_refs, c.width))  # 0 = LR, k = reference k
        self.blocks = nn.ModuleList(CrossAttentionBlock(c.width, c.heads, c.mlp_ratio, c.dropout) for _ in range(c.depth))
        self.out_norm = nn.LayerNorm(c.width)
        self.out_proj = nn.Linear(c.width, c.clip_dim)
        # Text path: attention pooling → summary → prefix.
        self.pool_norm = nn.LayerNorm(c.clip_dim)
        self.pool_in = nn.Linear(c.clip_dim, c.width)
        self.pool_query = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pool_attn = Attention(c.width, c.heads, c.dropout)
        self.prefix_norm = nn.LayerNorm(c.width)
        self.prefix_mlp = MLP(c.width, c.width, out_dim=c.prefix_len * d["n_embd"], dropout=c.dropout)
        self.prefix_pos = nn.Parameter(torch.zeros(1, c.prefix_len, d["n_embd"]))
        init_transformer_weights(self)
        for p in (self.pos_embed, self.source_embed, self.pool_query, self.prefix_pos):
            nn.init.trunc_normal_(p, std=0.02)
        # GPT-2 keeps its own (HF) init; from_decoder_dir loads pretrained distilgpt2 weights.
        self.decoder = build_gpt2(d)
        self._fast: GPT2PrefixDecoder | None = None

    # -- enhancer ---------------------------------------------------------------------------------

    def _check_tokens(self, tokens: torch.Tensor, what: str) -> None:
        c = self.config
        if tokens.shape[-2:] != (c.num_tokens, c.clip_dim):
            raise ValueError(
                f"I2T expects {what} with trailing shape ({c.num_tokens}, {c.clip_dim}) (CLIP vision last_hidden_state), "
                f"got {tuple(tokens.shape)}; check that the CLIP vision model matches this I2T file"
            )

    def forward(
        self, lr_tokens: torch.Tensor, ref_tokens: torch.Tensor | None = None, ref_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Enhanced tokens E (B, T, C) from LR tokens (B, T, C) and references (B, K, T, C), K = 0..max_refs.

        ``ref_mask`` (B, K) bool, True = present; a missing reference is ignored by attention.
        """
        c = self.config
        if lr_tokens.ndim != 3:
            raise ValueError(f"I2T lr_tokens must be (B, {c.num_tokens}, {c.clip_dim}), got {tuple(lr_tokens.shape)}")
        self._check_tokens(lr_tokens, "lr_tokens")
        B, T, _ = lr_tokens.shape
        dtype = self.in_proj.weight.dtype
        lr = lr_tokens.to(dtype)
        x = self.in_proj(self.in_norm(lr)) + self.pos_embed + self.source_embed[0]  # (B, T, W)
        memory = mask = None
        K = 0 if ref_tokens is None else ref_tokens.shape[1]
        if K > 0:
            if ref_tokens.ndim != 4 or ref_tokens.shape[0] != B:
                raise ValueError(f"I2T ref_tokens must be (B={B}, K, {T}, {c.clip_dim}), got {tuple(ref_tokens.shape)}")
            self._check_tokens(ref_tokens, "ref_tokens")
            if K > c.max_refs:
                raise ValueError(f"I2T got {K} references, this model accepts at most {c.max_refs}")
            refs = self.in_proj(self.in_norm(ref_tokens.to(dtype)))  # (B, K, T, W)
            refs = refs + self.pos_embed[:, None] + self.source_embed[1 : K + 1][None, :, None]
            memory = refs.reshape(B, K * T, -1)  # (B, K*T, W)
            if ref_mask is not None:
                if ref_mask.shape != (B, K):
                    raise ValueError(f"I2T ref_mask must be (B={B}, K={K}), got {tuple(ref_mask.shape)}")
                mask = ref_mask.to(device=x.device, dtype=torch.bool).repeat_interleave(T, dim=1)  # (B, K*T)
        for block in self.blocks:
            x = block(x, memory, mask)
        return lr + self.out_proj(self.out_norm(x))

    token_cosine_loss = staticmethod(token_cosine_loss)

    # -- text path --------------------------------------------------------------------------------

    def summary(self, E: torch.Tensor) -> torch.Tensor:
        """Attention-pooled summary vector of E (B, T, C) → (B, width)."""
        h = self.pool_in(self.pool_norm(E.to(self.pool_in.weight.dtype)))  # (B, T, W)
        q = self.pool_query.expand(h.shape[0], -1, -1)
        return self.pool_attn(q, h)[:, 0]  # (B, W)

    def prefix(self, E: torch.Tensor) -> torch.Tensor:
        """GPT-2 prefix embeddings (B, prefix_len, n_embd) from E."""
        c = self.config
        s = self.prefix_mlp(self.prefix_norm(self.summary(E)))  # (B, prefix_len * n_embd)
        return s.view(-1, c.prefix_len, c.decoder["n_embd"]) + self.prefix_pos

    def caption_logits(self, prefix: torch.Tensor, caption_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, L, V): position t predicts caption_ids[:, t] given prefix + ids[:, :t]."""
        tok = self.decoder.transformer.wte(caption_ids[:, :-1])  # (B, L-1, n_embd)
        x = torch.cat([prefix.to(tok.dtype), tok], dim=1)
        logits = self.decoder(inputs_embeds=x, use_cache=False).logits
        return logits[:, prefix.shape[1] - 1 :]

    def training_losses(
        self,
        lr_tokens: torch.Tensor,
        hr_tokens: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        ref_tokens: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
        *,
        soft_text: SoftCLIPText | None = None,
        text_target: torch.Tensor | None = None,
        tau: float = 1.0,
        gumbel: bool = False,
        w_token: float = 1.0,
        w_ce: float = 1.0,
        w_text: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """All I2T losses (see the module docstring) in a dict; ``"loss"`` is the weighted total.

        caption_ids / caption_mask: (B, L) from :func:`~.text_decoder.encode_captions` (caption + EOS).
        soft_text + text_target (B, D_text): enable the soft CLIP-text path (``text_cos``).
        """
        E = self.forward(lr_tokens, ref_tokens, ref_mask)
        out: dict[str, torch.Tensor] = {"token_cos": token_cosine_loss(E, hr_tokens.to(E.dtype))}
        L = min(caption_ids.shape[1], self.config.max_caption_tokens)
        ids, mask = caption_ids[:, :L], caption_mask[:, :L].bool()
        logits = self.caption_logits(self.prefix(E), ids)  # (B, L, V)
        ce = F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none")  # (B, L)
        out["caption_ce"] = (ce * mask).sum() / mask.sum().clamp(min=1)
        total = w_token * out["token_cos"] + w_ce * out["caption_ce"]
        if soft_text is not None:
            if text_target is None:
                raise ValueError("training_losses: soft_text needs text_target (the CLIP text embedding of the caption)")
            content = mask & (ids != self.config.decoder["eos_token_id"])
            soft = soft_text.soft_pooled(logits, content, tau=tau, gumbel=gumbel)
            out["text_cos"] = cosine_loss(soft.pooled, text_target)
            total = total + w_text * out["text_cos"]
        out["loss"] = total
        return out

    # -- inference --------------------------------------------------------------------------------

    @property
    def fast_decoder(self) -> GPT2PrefixDecoder:
        if self._fast is None:
            self._fast = GPT2PrefixDecoder(self.decoder)
        return self._fast

    def _apply(self, fn, *args, **kwargs):  # .to()/.half()/.cuda(): captured CUDA graphs point at old weights
        if self._fast is not None:
            self._fast.clear_graphs()
        return super()._apply(fn, *args, **kwargs)

    def generate_tokens(
        self,
        E: torch.Tensor,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        use_cuda_graph: bool | None = None,
        length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Caption token ids (B, max_new_tokens) for E (B, T, C), padded with EOS after the first EOS."""
        with torch.no_grad():
            prefix = self.prefix(E)
        eos = self.config.decoder["eos_token_id"]
        return self.fast_decoder.generate(
            prefix, eos_token_id=eos, pad_token_id=eos, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            num_beams=num_beams, length_penalty=length_penalty, use_cuda_graph=use_cuda_graph,
        )

    def generate_caption(
        self,
        E: torch.Tensor,
        tokenizer: Any,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        min_new_tokens: int = 0,
        use_cuda_graph: bool | None = None,
    ) -> list[str]:
        """Captions for E (B, T, C): greedy (``num_beams=1``) or beam search; deterministic."""
        tokens = self.generate_tokens(E, max_new_tokens, num_beams, min_new_tokens, use_cuda_graph)
        return decode_tokens(tokenizer, tokens.cpu(), self.config.decoder["eos_token_id"])

    @torch.no_grad()
    def soft_text_embeddings(self, E: torch.Tensor, soft_text: SoftCLIPText, max_new_tokens: int = 32,
                             tau: float = 1.0) -> torch.Tensor:
        """Soft-path CLIP text embedding (B, D_text) of the greedy caption (the training-time view of it)."""
        eos = self.config.decoder["eos_token_id"]
        prefix = self.prefix(E)
        tokens = self.generate_tokens(E, max_new_tokens=max_new_tokens)
        ids = F.pad(tokens, (0, 1), value=eos)  # make sure every row ends with EOS
        content = torch.cumprod((ids != eos).long(), dim=1).bool()
        logits = self.caption_logits(prefix, ids)
        return soft_text.soft_pooled(logits, content, tau=tau).pooled

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_decoder_dir(cls, config: I2TConfig, decoder_dir: str | os.PathLike) -> tuple["I2T", Any]:
        """(I2T, tokenizer) with the decoder initialised from a local HF distilgpt2-family folder.

        The folder holds ``config.json`` + ``model.safetensors`` + tokenizer files (``tokenizer.json``).
        ``config.decoder`` is replaced by the folder's GPT-2 architecture. Local paths only.
        """
        from transformers import AutoTokenizer, GPT2LMHeadModel

        decoder_dir = Path(decoder_dir)
        if not (decoder_dir / "config.json").is_file():
            raise FileNotFoundError(f"{decoder_dir}: no config.json; give a local distilgpt2-family model folder")
        lm = GPT2LMHeadModel.from_pretrained(str(decoder_dir), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(decoder_dir), local_files_only=True)
        if getattr(tokenizer, "backend_tokenizer", None) is None:
            raise ValueError(f"{decoder_dir}: needs a fast tokenizer (tokenizer.json)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dec = decoder_config_dict(lm.config)
        if len(tokenizer) > dec["vocab_size"]:
            raise ValueError(f"{decoder_dir}: tokenizer has {len(tokenizer)} tokens, more than the model's vocab {dec['vocab_size']}")
        model = cls(dataclasses.replace(config, decoder=dec))
        model.decoder.load_state_dict(lm.state_dict())
        return model, tokenizer


def save_i2t(model: I2T, path: str | os.PathLike, tokenizer: Any) -> Path:
    """Save an I2T with its GPT-2 tokenizer embedded in the metadata (the file is self-contained)."""
    eos = tokenizer.eos_token or EOS_TOKEN
    if tokenizer.convert_tokens_to_ids(eos) != model.config.decoder["eos_token_id"]:
        raise ValueError(
            f"tokenizer eos {eos!r} has id {tokenizer.convert_tokens_to_ids(eos)}, the decoder expects "
            f"{model.config.decoder['eos_token_id']}: tokenizer and decoder do not belong together"
        )
    return save_model(model, path, extra_metadata={META_TOKENIZER: tokenizer_to_json(tokenizer), META_TOKENIZER_EOS: eos})


def load_i2t(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[I2T, Any]:
    """(I2T, tokenizer) from a file written by :func:`save_i2t`; raises XSRWeightsError on a wrong file."""
    model = load_model(path, expected=I2T, device=device, dtype=dtype)
    meta = read_metadata(path)
    if META_TOKENIZER not in meta:
        raise XSRWeightsError(f"{path}: I2T file without an embedded tokenizer ({META_TOKENIZER}); re-export it with save_i2t")
    try:
        tokenizer = tokenizer_from_json(meta[META_TOKENIZER], meta.get(META_TOKENIZER_EOS, EOS_TOKEN))
    except Exception as e:  # tokenizers raises its own exception types
        raise XSRWeightsError(f"{path}: corrupt embedded tokenizer ({e}); re-export the file") from e
    if tokenizer.eos_token_id != model.config.decoder["eos_token_id"]:
        raise XSRWeightsError(f"{path}: embedded tokenizer's eos id differs from the decoder's; re-export the file")
    return model, tokenizer
