"""Tiny, seeded, deterministic Stage-1 models for tests and the tiny model zoo.

Nothing here touches the network: the GPT-2 tokenizer is a small byte-level BPE trained on a built-in
list of caption-like sentences, the "distilgpt2-family" decoder is a tiny random ``GPT2LMHeadModel``,
and RFA / I2T are randomly initialised from a seed. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..models.i2t import I2T, I2TConfig, save_i2t
from ..models.rfa import RFA, RFAConfig
from ..models.text_decoder import EOS_TOKEN
from ..weights import save_model

CAPTIONS = [
    "a dog sitting on the grass",
    "a cat sleeping on a red sofa",
    "a close up of a yellow flower",
    "a man riding a bike down the street",
    "a woman holding an umbrella in the rain",
    "two birds sitting on a tree branch",
    "a plate of food with rice and vegetables",
    "a red car parked next to a building",
    "a small boat on a calm lake",
    "a group of people standing on a beach",
    "a brown horse running in a field",
    "a bowl of fruit on a wooden table",
    "a tall building under a blue sky",
    "a child playing with a ball in the park",
    "a black and white photo of a city street",
    "a snowy mountain at sunset",
    "a close up of a bird with orange feathers",
    "an old church with a clock tower",
    "a train traveling down the tracks",
    "a person surfing on a large wave",
    "a cup of coffee next to a laptop",
    "a green frog sitting on a leaf",
    "a herd of elephants walking through the grass",
    "a giraffe standing next to a tree",
    "a pizza with cheese and tomatoes",
    "a kitchen with white cabinets and a window",
    "a bedroom with a large bed and a lamp",
    "a dog running on the beach",
    "a cat looking out of a window",
    "a bunch of bananas hanging from a tree",
    "a fish swimming in clear water",
    "a wooden bridge over a river",
    "a motorcycle parked on the side of the road",
    "a butterfly resting on a purple flower",
    "a young boy eating an ice cream",
    "a view of a forest from above",
    "a stop sign on a street corner",
    "an airplane flying in the sky",
    "a sheep standing in a green field",
    "a teddy bear sitting on a chair",
    "a vase with pink roses on a table",
    "a lighthouse on a rocky coast",
    "a bus driving down a busy street",
    "a monkey hanging from a branch",
    "a colorful parrot on a perch",
    "a glass of orange juice and toast",
    "a street market with many fruits",
    "a zebra grazing in the savanna",
    "a white dog with a blue collar",
    "a close up of a spider on its web",
]

CLIP_BOS = "<|startoftext|>"


def tiny_rfa_config(clip_dim: int = 32, num_patches: int = 16) -> RFAConfig:
    return RFAConfig(
        clip_dim=clip_dim, width=32, depth=2, heads=4, mlp_ratio=2.0, num_patches=num_patches, out_dim=clip_dim
    )


def tiny_decoder_config(vocab_size: int, eos_token_id: int | None = None) -> dict[str, Any]:
    eos = 0 if eos_token_id is None else eos_token_id  # the tiny tokenizers put <|endoftext|> at id 0
    return {
        "vocab_size": vocab_size,
        "n_positions": 64,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "bos_token_id": eos,
        "eos_token_id": eos,
    }


def tiny_i2t_config(
    vocab_size: int, clip_dim: int = 32, num_tokens: int = 17, eos_token_id: int | None = None, clip_text_dim: int = 32
) -> I2TConfig:
    return I2TConfig(
        clip_dim=clip_dim,
        width=32,
        depth=2,
        heads=4,
        mlp_ratio=2.0,
        num_tokens=num_tokens,
        max_refs=4,
        prefix_len=4,
        decoder=tiny_decoder_config(vocab_size, eos_token_id),
        clip_text_dim=clip_text_dim,
        max_caption_tokens=24,
    )


def _wrap(tok: Any, **special: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens(special)
    return fast


def train_tiny_gpt2_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = 400) -> Any:
    """A byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as bos/eos/pad, trained on :data:`CAPTIONS`.

    ``<|endoftext|>`` gets id 0. Deterministic. With ``out_dir``, saved as HF tokenizer files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[EOS_TOKEN],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CAPTIONS, trainer=trainer)
    fast = _wrap(tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def train_tiny_clip_tokenizer(out_dir: str | os.PathLike | None = None, vocab_size: int = 300) -> Any:
    """A CLIP-style BPE (lower-case, whitespace split, ``</w>`` word ends) with CLIP's special tokens.

    ``<|startoftext|>`` (bos, id 0) and ``<|endoftext|>`` (eos = pad, id 1). For tests of the soft
    CLIP-text path with a tiny ``CLIPTextModel``. Deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=EOS_TOKEN))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.BPEDecoder(suffix="</w>")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[CLIP_BOS, EOS_TOKEN],
        show_progress=False,
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(CAPTIONS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {EOS_TOKEN}", special_tokens=[(CLIP_BOS, 0), (EOS_TOKEN, 1)]
    )
    fast = _wrap(tok, bos_token=CLIP_BOS, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_clip_text_model(clip_tokenizer: Any, hidden: int = 32, projection_dim: int = 16, seed: int = 0):
    """A tiny random ``CLIPTextModelWithProjection`` matching ``clip_tokenizer`` (eos id from it)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        projection_dim=projection_dim,
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg).eval()


def make_tiny_distilgpt2_dir(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny random GPT2LMHeadModel (safetensors) + its tokenizer into ``path`` (a HF model folder)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_gpt2_tokenizer(path)
    dec = tiny_decoder_config(len(tokenizer), tokenizer.eos_token_id)
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(GPT2Config(**dec, pad_token_id=dec["eos_token_id"]))
    lm.save_pretrained(str(path), safe_serialization=True)
    return path


def make_random_xsr_models(
    out_dir: str | os.PathLike, clip_dim: int, seed: int = 0, *, num_patches: int = 256, clip_text_dim: int = 768
) -> dict[str, Path]:
    """Write randomly initialised ``rfa.safetensors`` and ``i2t.safetensors`` (tiny widths) for the zoo.

    ``clip_dim`` / ``num_patches`` must match the zoo's CLIP vision model (tokens = num_patches + 1).
    The I2T embeds the tiny GPT-2 tokenizer. Same seed → byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rfa = RFA(tiny_rfa_config(clip_dim, num_patches)).eval()
    tokenizer = train_tiny_gpt2_tokenizer()
    torch.manual_seed(seed + 1)
    cfg = tiny_i2t_config(
        len(tokenizer),
        clip_dim=clip_dim,
        num_tokens=num_patches + 1,
        eos_token_id=tokenizer.eos_token_id,
        clip_text_dim=clip_text_dim,
    )
    i2t = I2T(cfg).eval()
    return {
        "rfa": canonicalize_safetensors_header(save_model(rfa, out_dir / "rfa.safetensors")),
        "i2t": canonicalize_safetensors_header(save_i2t(i2t, out_dir / "i2t.safetensors", tokenizer)),
    }


def canonicalize_safetensors_header(path: str | os.PathLike) -> Path:
    """Rewrite a .safetensors header with its metadata keys sorted, so equal content gives equal bytes.

    safetensors serialises ``__metadata__`` from a hash map, in an order that changes from run to run;
    the tensor data and its offsets are untouched.
    """
    path = Path(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    tmp = path.with_name(path.name + ".canon.tmp")
    tmp.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    os.replace(tmp, path)
    return path
