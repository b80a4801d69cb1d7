"""I2T (DESIGN §2.3): enhancer shapes and masks, losses and gradients, weights + tokenizer round trip."""

import dataclasses

import pytest
import torch

from xsr_core.models import I2T, I2TConfig, RFA, SoftCLIPText, encode_captions, load_i2t, save_i2t, token_cosine_loss
from xsr_core.testing.tiny_models import (
    make_tiny_clip_text_model,
    make_tiny_distilgpt2_dir,
    tiny_i2t_config,
    tiny_rfa_config,
    train_tiny_clip_tokenizer,
    train_tiny_gpt2_tokenizer,
)
from xsr_core.weights import XSRWeightsError, describe, load_model, save_model

T, C = 17, 32
CAPTIONS = ["a dog sitting on the grass", "a red car parked next to a building"]


@pytest.fixture(scope="module")
def tok():
    return train_tiny_gpt2_tokenizer()


def _i2t(tok, seed: int = 0) -> I2T:
    torch.manual_seed(seed)
    return I2T(tiny_i2t_config(len(tok), clip_dim=C, num_tokens=T, eos_token_id=tok.eos_token_id)).eval()


def _data(b: int = 2, k: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, T, C, generator=g), torch.randn(b, k, T, C, generator=g), torch.randn(b, T, C, generator=g)


def test_enhancer_shapes_k0_k4_and_ref_mask(tok):
    m = _i2t(tok)
    lr, refs, _ = _data()
    E0 = m(lr)
    assert E0.shape == lr.shape
    torch.testing.assert_close(m(lr, refs[:, :0]), E0)  # K = 0 given as an empty tensor
    E4 = m(lr, refs)
    assert E4.shape == lr.shape and not torch.allclose(E4, E0)
    # Masked references are ignored: same as passing only the present ones.
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    Em = m(lr, refs, mask)
    torch.testing.assert_close(Em, m(lr, refs[:, :2]), rtol=1e-5, atol=1e-6)
    refs2 = refs.clone()
    refs2[:, 2:] = 7.0
    torch.testing.assert_close(m(lr, refs2, mask), Em, rtol=1e-5, atol=1e-6)
    # Source embeddings: the order of references matters to the model.
    assert not torch.allclose(m(lr, refs.flip(1)), E4)
    # Per-sample masks: row 1 with no refs at all = its K = 0 output.
    rows = m(lr, refs, torch.tensor([[True, True, True, True], [False, False, False, False]]))
    torch.testing.assert_close(rows[1], E0[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[0], E4[0], rtol=1e-5, atol=1e-6)


def test_bad_inputs_and_config(tok):
    m = _i2t(tok)
    lr, refs, _ = _data(k=5)
    with pytest.raises(ValueError, match="at most 4"):
        m(lr, refs)
    with pytest.raises(ValueError, match="trailing shape"):
        m(lr[:, 1:])
    with pytest.raises(ValueError, match="ref_mask"):
        m(lr, refs[:, :2], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown keys"):
        I2TConfig(decoder={"n_embed": 8})
    with pytest.raises(ValueError, match="n_positions"):
        I2TConfig(prefix_len=1000)
    with pytest.raises(ValueError, match="divisible"):
        I2TConfig(width=30, heads=4)
    c = I2TConfig()
    assert (c.depth, c.width, c.heads, c.num_tokens, c.decoder["n_embd"], c.decoder["n_layer"]) == (
        4,
        1024,
        16,
        257,
        768,
        6,
    )


def test_token_cosine_loss():
    a = torch.randn(2, 5, 8)
    assert token_cosine_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert token_cosine_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert token_cosine_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)


def test_determinism_and_round_trip_with_tokenizer(tok, tmp_path):
    m = _i2t(tok)
    lr, refs, _ = _data()
    E = m(lr, refs)
    torch.testing.assert_close(_i2t(tok)(lr, refs), E, rtol=0, atol=0)
    caps = m.generate_caption(E, tok, max_new_tokens=8)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    assert caps == m.generate_caption(E, tok, max_new_tokens=8)
    beams = m.generate_caption(E, tok, max_new_tokens=8, num_beams=3)
    assert beams == m.generate_caption(E, tok, max_new_tokens=8, num_beams=3)

    path = save_i2t(m, tmp_path / "i2t.safetensors", tok)
    assert describe(path)[0] == "I2T"
    m2, tok2 = load_i2t(path)
    assert m2.config == m.config
    torch.testing.assert_close(m2(lr, refs), E, rtol=0, atol=0)
    torch.testing.assert_close(m2.generate_tokens(E, max_new_tokens=8), m.generate_tokens(E, max_new_tokens=8))
    assert m2.generate_caption(E, tok2, max_new_tokens=8) == caps
    assert tok2("a dog on a sofa")["input_ids"] == tok("a dog on a sofa")["input_ids"]


def test_wrong_files_are_refused(tok, tmp_path):
    rfa_path = save_model(RFA(tiny_rfa_config(C, T - 1)), tmp_path / "rfa.safetensors")
    with pytest.raises(XSRWeightsError, match="holds a RFA model"):
        load_i2t(rfa_path)
    bare = save_model(_i2t(tok), tmp_path / "bare.safetensors")  # no tokenizer embedded
    assert isinstance(load_model(bare, expected=I2T), I2T)
    with pytest.raises(XSRWeightsError, match="tokenizer"):
        load_i2t(bare)
    with pytest.raises(XSRWeightsError, match="I2T"):
        load_model(tmp_path / "bare.safetensors", expected=RFA)


def test_training_losses_gradients_and_frozen_clip(tok):
    clip_tok = train_tiny_clip_tokenizer()
    clip = make_tiny_clip_text_model(clip_tok)
    soft = SoftCLIPText.build(clip, clip_tok, tok)
    enc = clip_tok(CAPTIONS, padding=True, return_tensors="pt")
    target = soft.encode_ids(enc["input_ids"], enc["attention_mask"])
    m = _i2t(tok).train()
    lr, refs, hr = _data()
    ids, mask = encode_captions(tok, CAPTIONS, max_length=m.config.max_caption_tokens)
    losses = m.training_losses(lr, hr, ids, mask, refs, soft_text=soft, text_target=target, tau=0.7)
    assert set(losses) == {"loss", "token_cos", "caption_ce", "text_cos"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["token_cos"] + losses["caption_ce"] + losses["text_cos"])
    losses["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
    # The soft text term alone reaches the enhancer (through GPT-2 and the prefix).
    m.zero_grad()
    m.training_losses(lr, hr, ids, mask, refs, soft_text=soft, text_target=target)["text_cos"].backward()
    assert m.in_proj.weight.grad.abs().sum() > 0 and m.prefix_mlp.fc2.weight.grad.abs().sum() > 0
    # Without the soft path: no text_cos, CE + token_cos only.
    plain = m.training_losses(lr, hr, ids, mask)
    assert set(plain) == {"loss", "token_cos", "caption_ce"}
    with pytest.raises(ValueError, match="text_target"):
        m.training_losses(lr, hr, ids, mask, soft_text=soft)
    # Inference-time soft embedding of the generated caption.
    m.eval()
    assert m.soft_text_embeddings(m(lr), soft, max_new_tokens=6).shape == target.shape


def test_a_few_steps_learn_the_caption_and_the_tokens(tok):
    m = _i2t(tok).train()
    lr, refs, hr = _data()
    ids, mask = encode_captions(tok, CAPTIONS, max_length=24)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m.training_losses(lr, hr, ids, mask, refs)
    for _ in range(30):
        losses = m.training_losses(lr, hr, ids, mask, refs)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    last = m.training_losses(lr, hr, ids, mask, refs)
    assert last["caption_ce"] < 0.5 * first["caption_ce"]
    assert last["token_cos"] < first["token_cos"]


def test_from_decoder_dir(tok, tmp_path):
    from transformers import GPT2LMHeadModel

    folder = make_tiny_distilgpt2_dir(tmp_path / "tiny-distilgpt2", seed=0)
    cfg = dataclasses.replace(  # a decoder unlike the folder's: from_decoder_dir must replace it
        tiny_i2t_config(10, clip_dim=C, num_tokens=T),
        decoder={"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10, "eos_token_id": 0},
    )
    m, tok2 = I2T.from_decoder_dir(cfg, folder)
    ref = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True)
    assert m.config.decoder["n_embd"] == ref.config.n_embd and m.config.decoder["vocab_size"] == ref.config.vocab_size
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.decoder.state_dict()[k], v, rtol=0, atol=0)
    assert tok2("a dog")["input_ids"] == tok("a dog")["input_ids"] and tok2.eos_token_id == tok.eos_token_id
    path = save_i2t(m, tmp_path / "i2t.safetensors", tok2)
    m3, _ = load_i2t(path)
    lr = _data()[0]
    torch.testing.assert_close(
        m3.generate_tokens(m3(lr), max_new_tokens=5), m.eval().generate_tokens(m(lr), max_new_tokens=5)
    )
    with pytest.raises(FileNotFoundError):
        I2T.from_decoder_dir(cfg, tmp_path / "nowhere")
