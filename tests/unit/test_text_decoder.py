"""Prefix GPT-2 decoding (parity with HF generate, beam search, EOS handling) and the soft CLIP-text path."""

import pytest
import torch

from xsr_core.models.text_decoder import (
    GPT2PrefixDecoder,
    SoftCLIPText,
    build_gpt2,
    build_vocab_map,
    decode_tokens,
    encode_captions,
    tokenizer_from_json,
    tokenizer_to_json,
)
from xsr_core.testing.tiny_models import (
    make_tiny_clip_text_model,
    tiny_decoder_config,
    train_tiny_clip_tokenizer,
    train_tiny_gpt2_tokenizer,
)

P = 5  # prefix length


@pytest.fixture(scope="module")
def gpt2_tok():
    return train_tiny_gpt2_tokenizer()


@pytest.fixture(scope="module")
def clip_tok():
    return train_tiny_clip_tokenizer()


@pytest.fixture(scope="module")
def lm(gpt2_tok):
    torch.manual_seed(0)
    return build_gpt2(tiny_decoder_config(len(gpt2_tok), gpt2_tok.eos_token_id)).eval()


def _prefix(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, P, 32, generator=torch.Generator().manual_seed(seed))


def _hf_generate(lm, prefix, eos, **kw):
    out = lm.generate(
        inputs_embeds=prefix,
        attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        **kw,
    )
    return out[:, -kw["max_new_tokens"] :] if out.shape[1] > kw["max_new_tokens"] else out


def test_prefill_and_step_logits_match_hf(lm):
    dec = GPT2PrefixDecoder(lm)
    prefix = _prefix()
    with torch.no_grad():
        cache = dec.new_cache(3, P + 4, torch.float32, torch.device("cpu"))
        logits0 = dec.prefill(prefix, cache)
        ref = lm(inputs_embeds=prefix, use_cache=True)
        torch.testing.assert_close(logits0, ref.logits[:, -1], rtol=1e-4, atol=1e-5)
        tok = logits0.argmax(-1)
        logits1 = dec.step(tok, torch.tensor([P]), cache, torch.arange(P + 4))
        ref1 = lm(input_ids=tok[:, None], past_key_values=ref.past_key_values, use_cache=True)
        torch.testing.assert_close(logits1, ref1.logits[:, -1], rtol=1e-4, atol=1e-5)


def test_greedy_matches_hf_generate(lm, gpt2_tok):
    dec = GPT2PrefixDecoder(lm)
    prefix = _prefix()
    eos = gpt2_tok.eos_token_id
    ours = dec.generate(prefix, eos_token_id=eos, max_new_tokens=12, check_every=4)
    theirs = _hf_generate(lm, prefix, eos, max_new_tokens=12)
    assert ours.shape == (3, 12)
    torch.testing.assert_close(ours[:, : theirs.shape[1]], theirs, rtol=0, atol=0)


def test_greedy_eos_handling_matches_hf(lm):
    """Use a token the model really emits as 'EOS', so rows stop early and get padded."""
    dec = GPT2PrefixDecoder(lm)
    prefix = _prefix(4, seed=2)
    free = dec.generate(prefix, eos_token_id=0, max_new_tokens=10, min_new_tokens=10)
    eos = int(free[0, 2])
    for min_new in (0, 4):
        ours = dec.generate(prefix, eos_token_id=eos, max_new_tokens=10, min_new_tokens=min_new, check_every=2)
        theirs = _hf_generate(lm, prefix, eos, max_new_tokens=10, min_new_tokens=min_new)
        torch.testing.assert_close(ours[:, : theirs.shape[1]], theirs, rtol=0, atol=0)
        assert (ours[:, theirs.shape[1] :] == eos).all()  # padding after early stop
        if min_new == 0:
            assert ours[0, 2] == eos and (ours[0, 3:] == eos).all()
        else:
            assert (ours[:, :min_new] != eos).all()


def test_beam_search_matches_hf_without_eos_and_is_deterministic(lm, gpt2_tok):
    dec = GPT2PrefixDecoder(lm)
    prefix = _prefix(2, seed=3)
    eos = gpt2_tok.eos_token_id
    ours = dec.generate(prefix, eos_token_id=eos, max_new_tokens=8, min_new_tokens=8, num_beams=3)
    again = dec.generate(prefix, eos_token_id=eos, max_new_tokens=8, min_new_tokens=8, num_beams=3)
    torch.testing.assert_close(ours, again, rtol=0, atol=0)
    # With EOS suppressed no beam finishes, so the HF beam search must agree exactly.
    theirs = _hf_generate(lm, prefix, eos, max_new_tokens=8, min_new_tokens=8, num_beams=3, early_stopping=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # One beam is greedy.
    greedy = dec.generate(prefix, eos_token_id=eos, max_new_tokens=8, min_new_tokens=8)
    torch.testing.assert_close(
        dec.generate(prefix, eos_token_id=eos, max_new_tokens=8, min_new_tokens=8, num_beams=1), greedy
    )


def test_beam_search_with_eos_pads_after_eos(lm):
    dec = GPT2PrefixDecoder(lm)
    prefix = _prefix(3, seed=4)
    free = dec.generate(prefix, eos_token_id=0, max_new_tokens=10, min_new_tokens=10)
    eos = int(free[1, 1])
    out = dec.generate(prefix, eos_token_id=eos, max_new_tokens=10, num_beams=4)
    assert out.shape == (3, 10)
    for row in out.tolist():
        if eos in row:
            assert all(t == eos for t in row[row.index(eos) :])
    torch.testing.assert_close(out, dec.generate(prefix, eos_token_id=eos, max_new_tokens=10, num_beams=4))


def test_generate_under_inference_mode_and_limits(lm, gpt2_tok):
    dec = GPT2PrefixDecoder(lm)
    prefix = _prefix()
    eos = gpt2_tok.eos_token_id
    ref = dec.generate(prefix, eos_token_id=eos, max_new_tokens=6)
    with torch.inference_mode():
        torch.testing.assert_close(dec.generate(prefix, eos_token_id=eos, max_new_tokens=6), ref)
    with pytest.raises(ValueError, match="n_positions"):
        dec.generate(prefix, eos_token_id=eos, max_new_tokens=lm.config.n_positions)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph path needs a GPU")
def test_cuda_graph_gives_the_eager_tokens(lm, gpt2_tok):
    lm_cuda = build_gpt2(tiny_decoder_config(len(gpt2_tok), gpt2_tok.eos_token_id)).eval()
    lm_cuda.load_state_dict(lm.state_dict())
    lm_cuda.cuda()
    dec = GPT2PrefixDecoder(lm_cuda)
    prefix = _prefix().cuda()
    for beams in (1, 3):
        eager = dec.generate(prefix, eos_token_id=0, max_new_tokens=16, num_beams=beams, use_cuda_graph=False)
        graph = dec.generate(prefix, eos_token_id=0, max_new_tokens=16, num_beams=beams, use_cuda_graph=True)
        graph2 = dec.generate(prefix, eos_token_id=0, max_new_tokens=16, num_beams=beams, use_cuda_graph=True)
        torch.testing.assert_close(graph, eager, rtol=0, atol=0)
        torch.testing.assert_close(graph2, eager, rtol=0, atol=0)


def test_tokenizer_json_round_trip_and_captions(gpt2_tok):
    tok = tokenizer_from_json(tokenizer_to_json(gpt2_tok))
    text = "a dog sitting on a red sofa"
    assert tok(text)["input_ids"] == gpt2_tok(text)["input_ids"]
    assert (tok.eos_token_id, tok.pad_token_id) == (gpt2_tok.eos_token_id, gpt2_tok.eos_token_id)
    ids, mask = encode_captions(tok, [text, "a cat"], max_length=32)
    n = len(tok(text)["input_ids"])
    assert ids.shape == (2, n + 1) and mask[0].sum() == n + 1 and ids[0, n] == tok.eos_token_id
    assert mask[1].sum() == len(tok("a cat")["input_ids"]) + 1
    assert decode_tokens(tok, ids, tok.eos_token_id) == [text, "a cat"]
    cut, cut_mask = encode_captions(tok, [text], max_length=3)
    assert cut.shape == (1, 3) and cut[0, -1] == tok.eos_token_id


def test_vocab_map(gpt2_tok, clip_tok):
    emb = torch.nn.Embedding(len(clip_tok), 8)
    torch.nn.init.normal_(emb.weight, generator=torch.Generator().manual_seed(0))
    M = build_vocab_map(gpt2_tok, clip_tok, emb)
    assert M.shape == (len(gpt2_tok), 8)
    assert torch.count_nonzero(M[gpt2_tok.eos_token_id]) == 0  # special token → zero row
    gid = gpt2_tok.convert_tokens_to_ids("Ġdog")
    cids = clip_tok("dog", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(M[gid], emb.weight[cids].mean(0).detach())


def test_soft_path_equals_clip_on_one_hot_inputs_and_is_differentiable(gpt2_tok, clip_tok):
    clip = make_tiny_clip_text_model(clip_tok)
    soft = SoftCLIPText.build(clip, clip_tok, gpt2_tok)
    table = clip.text_model.embeddings.token_embedding.weight
    captions = ["a dog on the grass", "a red car"]
    enc = clip_tok(captions, padding=True, return_tensors="pt")
    target = soft.encode_ids(enc["input_ids"], enc["attention_mask"])
    # Exact CLIP token embeddings in → the model's own pooled embedding out.
    content = [clip_tok(c, add_special_tokens=False)["input_ids"] for c in captions]
    L = max(len(c) for c in content)
    embeds = torch.zeros(2, L, table.shape[1])
    for i, c in enumerate(content):
        embeds[i, : len(c)] = table[c]
    pooled = soft.encode_embeds(embeds, torch.tensor([len(c) for c in content]))
    torch.testing.assert_close(pooled, target, rtol=1e-4, atol=1e-5)
    # Distributions → gradient reaches the logits, never CLIP.
    logits = torch.randn(2, 6, len(gpt2_tok), requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    for gumbel in (False, True):
        torch.manual_seed(0)
        out = soft.soft_pooled(logits, mask, tau=0.5, gumbel=gumbel)
        assert out.pooled.shape == target.shape and out.lengths.tolist() == [4, 3]
        loss = (1 - torch.cosine_similarity(out.pooled, target, dim=-1)).mean()
        logits.grad = None
        loss.backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clip.parameters())
