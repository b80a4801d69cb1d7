"""The I2T text decoder (DESIGN §2.3): a distilgpt2-family GPT-2 driven by a prefix of embeddings.

Three parts:

* :class:`GPT2PrefixDecoder` — fast, deterministic greedy and beam decoding over the weights of a
  transformers ``GPT2LMHeadModel`` with a pre-allocated KV cache. The single-token step has static
  shapes (the cache is attended with a position mask), so on CUDA it is captured once in a CUDA
  graph and replayed; the eager path runs the very same step function, so both give the same
  tokens. There are no per-step host syncs: EOS is checked every ``check_every`` steps only.
* tokenizer helpers: the GPT-2 tokenizer travels inside the I2T weights file as its
  ``tokenizer.json`` string (:func:`tokenizer_to_json` / :func:`tokenizer_from_json`), and
  :func:`encode_captions` builds teacher-forcing targets.
* :class:`SoftCLIPText` — the differentiable "soft" path from GPT-2 output distributions to a
  frozen CLIP text encoder's pooled embedding (see the design note in :mod:`.i2t`), with
  :func:`build_vocab_map`, the fixed matrix M (GPT-2 vocab → CLIP token-embedding space).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cuda_streams import side_stream

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"

# distilgpt2's architecture (the GPT2Config keys that define the weights and the decoding).
DISTILGPT2_CONFIG: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 6,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
}
_DECODER_KEYS = tuple(DISTILGPT2_CONFIG)


def decoder_config_dict(hf_config: Any) -> dict[str, Any]:
    """The architecture keys of a transformers GPT2Config (or dict) as a plain JSON-able dict."""
    src = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    return {k: src.get(k, DISTILGPT2_CONFIG[k]) for k in _DECODER_KEYS}


def build_gpt2(decoder: dict[str, Any]) -> nn.Module:
    """A randomly initialised ``GPT2LMHeadModel`` from a decoder config dict (see DISTILGPT2_CONFIG)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(**{**DISTILGPT2_CONFIG, **decoder}, pad_token_id=decoder.get("eos_token_id"))
    return GPT2LMHeadModel(cfg)


# ----------------------------------------------------------------------------------------------
# Tokenizer helpers
# ----------------------------------------------------------------------------------------------


def tokenizer_to_json(tokenizer: Any) -> str:
    """Serialise a fast (tokenizers-backed) GPT-2 tokenizer to its ``tokenizer.json`` string."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} has no tokenizers backend; use a fast GPT-2 tokenizer")
    return backend.to_str()


def tokenizer_from_json(text: str, eos_token: str = EOS_TOKEN) -> Any:
    """Rebuild a ``PreTrainedTokenizerFast`` (bos = eos = pad = ``eos_token``) from ``tokenizer.json`` text."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text))
    tok.add_special_tokens({"bos_token": eos_token, "eos_token": eos_token, "pad_token": eos_token})
    return tok


def encode_captions(
    tokenizer: Any, captions: list[str], max_length: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing targets: ``(ids, mask)`` of shape (B, L), each caption's tokens + EOS, right-padded.

    Captions longer than ``max_length - 1`` tokens are cut (and then carry no EOS). L is the longest
    encoded caption (at most ``max_length``). ``mask`` is 1 on real tokens including the EOS.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the caption tokenizer has no eos token; build it with tokenizer_from_json")
    seqs = []
    for text in captions:
        ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"][: max_length - 1]
        seqs.append(ids + [eos])
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), eos, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def decode_tokens(tokenizer: Any, tokens: torch.Tensor, eos_token_id: int) -> list[str]:
    """Token rows (B, T) → strings, each cut at its first EOS."""
    out = []
    for row in tokens.tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


# ----------------------------------------------------------------------------------------------
# Fast KV-cached decoding over GPT2LMHeadModel weights
# ----------------------------------------------------------------------------------------------


class _StepGraph:
    """A CUDA graph of one decode step for a fixed (rows, cache length, dtype, device)."""

    def __init__(self, dec: "GPT2PrefixDecoder", rows: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = dec.new_cache(rows, max_len, dtype, device)
        self.positions = torch.arange(max_len, device=device)
        stream = side_stream(device)  # one stream for every capture: one cuBLAS workspace, not one per graph
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lets cuBLAS / SDPA pick and allocate their workspaces
                dec.step(self.tokens, self.pos, self.cache, self.positions)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.logits = dec.step(self.tokens, self.pos, self.cache, self.positions)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


class GPT2PrefixDecoder:
    """KV-cached greedy / beam decoding of a ``GPT2LMHeadModel`` from a prefix of input embeddings.

    Reads the HF module's weights directly (``transformer.wte/wpe/h[i]/ln_f``, ``lm_head``), so the
    weights stay in the standard GPT-2 layout. Positions follow HF: the prefix takes positions
    0..P-1 and generated token t is fed at position P+t. Inference only (no dropout, no grad).
    """

    _MAX_GRAPHS = 8

    def __init__(self, lm: nn.Module):
        cfg = lm.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT2PrefixDecoder does not support GPT-2 with cross-attention layers")
        self.lm = lm
        self.n_layer = cfg.n_layer
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.n_positions = cfg.n_positions
        self._graphs: dict[tuple, _StepGraph] = {}

    # -- model pieces ---------------------------------------------------------------------------

    def new_cache(self, rows: int, max_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # One tensor for all layers: (layers, k|v, rows, heads, max_len, head_dim).
        return torch.zeros(self.n_layer, 2, rows, self.n_head, max_len, self.head_dim, dtype=dtype, device=device)

    def _qkv(self, block: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N, T, D = h.shape
        qkv = block.attn.c_attn(block.ln_1(h)).view(N, T, 3, self.n_head, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (N, heads, T, head_dim)
        return q, k, v

    def _finish_block(self, block: nn.Module, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        N, _, T, _ = attn.shape
        h = h + block.attn.c_proj(attn.transpose(1, 2).reshape(N, T, -1))
        return h + block.mlp.c_proj(block.mlp.act(block.mlp.c_fc(block.ln_2(h))))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(self.lm.transformer.ln_f(h[:, -1]))  # (N, V)

    def prefill(self, prefix: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        """Run the prefix (N, P, D) through the model, fill cache[..., :P, :]; return next-token logits (N, V)."""
        tr = self.lm.transformer
        N, P, _ = prefix.shape
        h = prefix + tr.wpe(torch.arange(P, device=prefix.device))[None]
        for i, block in enumerate(tr.h):
            q, k, v = self._qkv(block, h)
            cache[i, 0, :, :, :P] = k
            cache[i, 1, :, :, :P] = v
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=block.attn.scaling)
            h = self._finish_block(block, h, a)
        return self._logits(h)

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row at position ``pos`` (a 1-element device tensor): static shapes, graph-safe."""
        tr = self.lm.transformer
        h = (tr.wte(tokens) + tr.wpe(pos))[:, None]  # (N, 1, D)
        mask = (positions <= pos)[None, None, None, :]  # (1, 1, 1, max_len): attend to filled slots only
        for i, block in enumerate(tr.h):
            q, k, v = self._qkv(block, h)
            cache[i, 0].index_copy_(2, pos, k)
            cache[i, 1].index_copy_(2, pos, v)
            a = F.scaled_dot_product_attention(q, cache[i, 0], cache[i, 1], attn_mask=mask, scale=block.attn.scaling)
            h = self._finish_block(block, h, a)
        return self._logits(h)

    # -- stepping backends ----------------------------------------------------------------------

    def _stepper(self, rows: int, max_len: int, dtype: torch.dtype, device: torch.device, use_graph: bool):
        """(cache, step_fn(tokens, pos_int) -> logits) for the eager or CUDA-graph path."""
        if use_graph:
            w = self.lm.transformer.wte.weight
            key = (rows, max_len, dtype, str(device), w.data_ptr())
            g = self._graphs.get(key)
            if g is None:
                if len(self._graphs) >= self._MAX_GRAPHS:
                    self._graphs.pop(next(iter(self._graphs)))
                g = _StepGraph(self, rows, max_len, dtype, device)
                self._graphs[key] = g
            return g.cache, g
        cache = self.new_cache(rows, max_len, dtype, device)
        positions = torch.arange(max_len, device=device)
        pos_t = torch.zeros(1, dtype=torch.long, device=device)

        def eager(tokens: torch.Tensor, pos: int) -> torch.Tensor:
            pos_t.fill_(pos)
            return self.step(tokens, pos_t, cache, positions)

        return cache, eager

    def clear_graphs(self) -> None:
        """Drop captured CUDA graphs (call after moving or re-loading the model's weights)."""
        self._graphs.clear()

    # -- decoding -------------------------------------------------------------------------------

    def generate(
        self,
        prefix: torch.Tensor,
        *,
        eos_token_id: int,
        pad_token_id: int | None = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        use_cuda_graph: bool | None = None,
        check_every: int = 8,
    ) -> torch.Tensor:
        """Decode from ``prefix`` (B, P, n_embd); return new tokens (B, max_new_tokens), padded after EOS.

        Greedy (``num_beams == 1``) matches ``GPT2LMHeadModel.generate(inputs_embeds=prefix,
        do_sample=False)`` token for token (up to float ties). Beam search keeps finished beams in
        the beam (they extend with pad at zero cost) and returns, per row, the beam with the best
        ``sum log p / length ** length_penalty``. ``use_cuda_graph=None`` means "on CUDA".
        """
        if prefix.ndim != 3:
            raise ValueError(f"prefix must be (B, P, n_embd), got {tuple(prefix.shape)}")
        if max_new_tokens < 1 or min_new_tokens < 0 or num_beams < 1:
            raise ValueError("need max_new_tokens >= 1, min_new_tokens >= 0, num_beams >= 1")
        pad = eos_token_id if pad_token_id is None else pad_token_id
        B, P, _ = prefix.shape
        max_len = P + max_new_tokens
        if max_len > self.n_positions:
            raise ValueError(f"prefix ({P}) + max_new_tokens ({max_new_tokens}) exceeds GPT-2 n_positions ({self.n_positions})")
        device = prefix.device
        if use_cuda_graph is None:
            use_cuda_graph = device.type == "cuda"
        use_cuda_graph = bool(use_cuda_graph) and device.type == "cuda"
        dtype = self.lm.transformer.wte.weight.dtype
        # Works under a caller's torch.inference_mode (ComfyUI runs nodes so): cached graph buffers
        # must stay ordinary tensors, so decode with inference mode off and autograd off.
        with torch.inference_mode(False), torch.no_grad():
            prefix = prefix.to(dtype).clone()
            rows = B * num_beams
            if num_beams > 1:
                prefix = prefix.repeat_interleave(num_beams, dim=0)  # (B*nb, P, D)
            cache, step = self._stepper(rows, max_len, dtype, device, use_cuda_graph)
            logits = self.prefill(prefix, cache)
            if num_beams == 1:
                return self._greedy(logits, step, P, eos_token_id, pad, max_new_tokens, min_new_tokens, check_every, cache)
            return self._beam(
                logits, step, cache, B, num_beams, P, eos_token_id, pad, max_new_tokens, min_new_tokens,
                length_penalty, check_every,
            ).clone()

    def _greedy(self, logits, step, P, eos, pad, max_new, min_new, check_every, cache) -> torch.Tensor:
        N = logits.shape[0]
        device = logits.device
        out = torch.full((N, max_new), pad, dtype=torch.long, device=device)
        finished = torch.zeros(N, dtype=torch.bool, device=device)
        eos_idx = torch.tensor([eos], device=device)
        for t in range(max_new):
            if t < min_new:
                logits = logits.index_fill(1, eos_idx, float("-inf"))
            tok = logits.argmax(dim=-1)
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            out[:, t] = tok
            finished = finished | (tok == eos)
            if t == max_new - 1:
                break
            if t + 1 >= min_new and check_every and (t + 1) % check_every == 0 and bool(finished.all()):
                break  # the one host sync: every check_every steps, and only once EOS is allowed
            logits = step(tok, P + t)
        return out

    def _beam(self, logits, step, cache, B, nb, P, eos, pad, max_new, min_new, length_penalty, check_every):
        device = logits.device
        V = logits.shape[-1]
        scores = torch.zeros(B, nb, device=device)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        seqs = torch.full((B, nb, max_new), pad, dtype=torch.long, device=device)
        finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, nb, device=device)
        # A finished beam may only continue with pad, at no cost.
        done_row = torch.full((V,), float("-inf"), device=device)
        done_row[pad] = 0.0
        row_base = (torch.arange(B, device=device) * nb)[:, None]
        for t in range(max_new):
            logp = F.log_softmax(logits.float(), dim=-1).view(B, nb, V)
            if t < min_new:
                logp[..., eos] = float("-inf")
            logp = torch.where(finished[..., None], done_row, logp)
            top_scores, top_idx = (scores[..., None] + logp).view(B, nb * V).topk(nb, dim=-1)  # (B, nb)
            src = torch.div(top_idx, V, rounding_mode="floor")
            tok = top_idx % V
            seqs = seqs.gather(1, src[..., None].expand(-1, -1, max_new)).clone()
            seqs[:, :, t] = tok
            was_done = finished.gather(1, src)
            lengths = lengths.gather(1, src) + (~was_done).float()
            finished = was_done | (tok == eos)
            scores = top_scores
            if t == max_new - 1:
                break
            if t + 1 >= min_new and check_every and (t + 1) % check_every == 0 and bool(finished.all()):
                break
            rows = (row_base + src).view(-1)
            cache.copy_(cache.index_select(2, rows))  # reorder the KV cache to follow the chosen beams
            logits = step(tok.view(-1), P + t)
        norm = scores / lengths.clamp(min=1.0).pow(length_penalty)
        best = norm.argmax(dim=-1)  # (B,)
        return seqs[torch.arange(B, device=device), best]  # (B, max_new)


# ----------------------------------------------------------------------------------------------
# Soft path: GPT-2 distributions → frozen CLIP text encoder
# ----------------------------------------------------------------------------------------------


def _clip_text_parts(clip_text_model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(CLIPTextTransformer-like module, text_projection or None) of a transformers CLIP text model."""
    projection = getattr(clip_text_model, "text_projection", None)
    inner = getattr(clip_text_model, "text_model", clip_text_model)
    for name in ("embeddings", "encoder", "final_layer_norm"):
        if not hasattr(inner, name):
            raise TypeError(
                f"{type(clip_text_model).__name__} is not a transformers CLIPTextModel / CLIPTextModelWithProjection"
            )
    return inner, projection


@torch.no_grad()
def build_vocab_map(gpt2_tokenizer: Any, clip_tokenizer: Any, clip_token_embedding: nn.Embedding | torch.Tensor,
                    batch_size: int = 4096) -> torch.Tensor:
    """The fixed matrix M (V_gpt2, D_clip): row i = mean CLIP token embedding of GPT-2 token i's string.

    Each GPT-2 vocabulary entry is decoded to its text (leading-space marker and all), stripped and
    CLIP-tokenized without special tokens; its row is the mean of those CLIP token embeddings. Entries
    that decode to nothing CLIP can tokenize (whitespace, special tokens) get a zero row. Word-piece
    boundaries differ between the two BPEs (CLIP marks word ends with ``</w>``), so M is an
    approximation, good enough to carry a gradient (see :mod:`.i2t`).
    """
    table = clip_token_embedding.weight if isinstance(clip_token_embedding, nn.Embedding) else clip_token_embedding
    table = table.detach().float().cpu()
    V = len(gpt2_tokenizer)
    specials = set(getattr(gpt2_tokenizer, "all_special_ids", []) or [])
    M = torch.zeros(V, table.shape[1])
    for start in range(0, V, batch_size):
        ids = list(range(start, min(V, start + batch_size)))
        texts = [gpt2_tokenizer.decode([i]).strip() if i not in specials else "" for i in ids]
        encoded = clip_tokenizer(texts, add_special_tokens=False)["input_ids"]
        for i, toks in zip(ids, encoded):
            toks = [t for t in toks if 0 <= t < table.shape[0]]
            if toks:
                M[i] = table[toks].mean(dim=0)
    return M


@dataclass
class SoftTextOutput:
    pooled: torch.Tensor  # (B, D_text) pooled (EOS) CLIP text embedding, projected when the model has a projection
    lengths: torch.Tensor  # (B,) number of soft content tokens fed per row


class SoftCLIPText:
    """A frozen CLIP text encoder fed with *soft* token embeddings built from GPT-2 distributions.

    Holds the CLIP text model (frozen here: ``requires_grad_(False)``, ``eval()``), the vocab map M
    and the CLIP special-token ids. It is a training-time helper, not part of the I2T weights.
    """

    def __init__(self, clip_text_model: nn.Module, vocab_map: torch.Tensor, *, bos_token_id: int, eos_token_id: int,
                 pad_token_id: int | None = None, max_length: int | None = None):
        self.model = clip_text_model.requires_grad_(False).eval()
        self.inner, self.projection = _clip_text_parts(clip_text_model)
        emb = self.inner.embeddings.token_embedding
        if vocab_map.ndim != 2 or vocab_map.shape[1] != emb.weight.shape[1]:
            raise ValueError(f"vocab map {tuple(vocab_map.shape)} does not match CLIP text width {emb.weight.shape[1]}")
        self.vocab_map = vocab_map.to(emb.weight.device, emb.weight.dtype)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        self.max_length = max_length or self.inner.embeddings.position_embedding.weight.shape[0]

    @classmethod
    def build(cls, clip_text_model: nn.Module, clip_tokenizer: Any, gpt2_tokenizer: Any) -> "SoftCLIPText":
        """Build M from the two tokenizers and the CLIP token embedding; special ids from the CLIP tokenizer."""
        inner, _ = _clip_text_parts(clip_text_model)
        M = build_vocab_map(gpt2_tokenizer, clip_tokenizer, inner.embeddings.token_embedding)
        return cls(clip_text_model, M, bos_token_id=clip_tokenizer.bos_token_id,
                   eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id)

    @property
    def dim(self) -> int:
        return self.vocab_map.shape[1]

    def to(self, device: str | torch.device) -> "SoftCLIPText":
        self.model.to(device)
        self.vocab_map = self.vocab_map.to(device)
        return self

    def encode_embeds(self, token_embeds: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """CLIP text pooled embedding from content-token embeddings (B, L, D) with per-row lengths (B,).

        Builds ``[BOS] + embeds[:length] + [EOS] + pad…`` in embedding space, runs the encoder with
        its causal mask and pools at the EOS position, exactly as ``CLIPTextModel`` does for ids.
        """
        inner = self.inner
        table = inner.embeddings.token_embedding.weight
        B, L, D = token_embeds.shape
        L = min(L, self.max_length - 2)
        token_embeds = token_embeds[:, :L]
        lengths = lengths.clamp(max=L).to(token_embeds.device)
        S = L + 2
        idx = torch.arange(S, device=token_embeds.device)[None]  # (1, S)
        content = (idx >= 1) & (idx <= lengths[:, None])  # (B, S)
        is_eos = idx == (lengths[:, None] + 1)
        x = table[self.pad_token_id].to(token_embeds.dtype).expand(B, S, D)
        x = torch.where(is_eos[..., None], table[self.eos_token_id].to(x.dtype), x)
        x = torch.where((idx == 0)[..., None], table[self.bos_token_id].to(x.dtype), x)
        shifted = F.pad(token_embeds, (0, 0, 1, 1))  # content token j sits at sequence position j+1
        x = torch.where(content[..., None], shifted, x)
        return self._encode(x, lengths + 1)

    def _encode(self, x: torch.Tensor, eos_pos: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        inner = self.inner
        h = inner.embeddings(inputs_embeds=x)
        mask = create_causal_mask(config=inner.config, inputs_embeds=h, attention_mask=None, past_key_values=None)
        h = inner.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True).last_hidden_state
        h = inner.final_layer_norm(h)
        pooled = h[torch.arange(h.shape[0], device=h.device), eos_pos]
        return self.projection(pooled) if self.projection is not None else pooled

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Target embedding of real CLIP-tokenized captions (with BOS/EOS), pooled at the first EOS."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = out.pooler_output
        return pooled

    def soft_pooled(self, logits: torch.Tensor, content_mask: torch.Tensor, *, tau: float = 1.0,
                    gumbel: bool = False) -> SoftTextOutput:
        """Pooled CLIP text embedding of GPT-2 per-position distributions (B, L, V).

        ``content_mask`` (B, L) marks positions predicting caption content (not EOS/pad); content is
        assumed left-aligned. ``gumbel=True`` uses straight-through Gumbel-softmax (hard one-hot
        forward, soft gradient) instead of the tempered softmax.
        """
        if logits.shape[-1] != self.vocab_map.shape[0]:
            raise ValueError(f"logits vocab {logits.shape[-1]} != vocab map rows {self.vocab_map.shape[0]}")
        M = self.vocab_map.to(logits.device)
        if gumbel:
            probs = F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=-1)
        else:
            probs = F.softmax(logits.float() / tau, dim=-1)
        embeds = probs.to(M.dtype) @ M  # (B, L, D_clip)
        lengths = content_mask.long().sum(dim=1)
        return SoftTextOutput(pooled=self.encode_embeds(embeds, lengths), lengths=lengths)


def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos(a, b)) over the leading dims (last dim = features)."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()

