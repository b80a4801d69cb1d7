"""RFA (DESIGN §2.1): shapes, determinism, weights round trip, wrong-kind files, learning sanity."""

import pytest
import torch

from xsr_core.models import I2T, RFA, RFAConfig, align_loss, load_i2t
from xsr_core.testing.tiny_models import tiny_rfa_config
from xsr_core.weights import XSRWeightsError, describe, load_model, save_model

P, C = 16, 32


def _rfa(seed: int = 0) -> RFA:
    torch.manual_seed(seed)
    return RFA(tiny_rfa_config(C, P)).eval()


def _tokens(b: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, P + 1, C, generator=g)


def test_shapes_and_encoder_cls_is_dropped():
    m = _rfa()
    x = _tokens()
    out = m(x)
    assert out.shape == (3, C)
    # The encoder CLS (index 0) is replaced by the learned query: changing it changes nothing.
    x2 = x.clone()
    x2[:, 0] = 100.0
    torch.testing.assert_close(m(x2), out)
    # Patch-only input gives the same result.
    torch.testing.assert_close(m(x[:, 1:]), out)
    # But the patches matter (a new random token: a constant shift would vanish in the input LayerNorm).
    x3 = x.clone()
    x3[:, 5] = torch.randn(3, C, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(m(x3), out)
    q = m.query_embedding(x)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(3))


def test_bad_inputs_and_config():
    m = _rfa()
    with pytest.raises(ValueError, match="patch tokens"):
        m(torch.randn(2, P + 2, C))
    with pytest.raises(ValueError, match="CLIP vision tokens"):
        m(torch.randn(2, P + 1, C + 1))
    with pytest.raises(ValueError, match="divisible"):
        RFAConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="positive int"):
        RFAConfig(depth=0)
    with pytest.raises(ValueError, match="dropout"):
        RFAConfig(dropout=1.0)


def test_default_config_is_the_papers():
    c = RFAConfig()
    assert (c.clip_dim, c.width, c.depth, c.heads, c.mlp_ratio, c.num_patches, c.out_dim) == (
        1024,
        1024,
        4,
        16,
        4.0,
        256,
        1024,
    )


def test_deterministic_init_and_forward():
    x = _tokens()
    a, b = _rfa(seed=3), _rfa(seed=3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert not torch.equal(a(x), _rfa(seed=4)(x))


def test_save_load_round_trip(tmp_path):
    m = _rfa()
    x = _tokens()
    path = save_model(m, tmp_path / "rfa.safetensors")
    assert describe(path)[0] == "RFA"
    m2 = load_model(path, expected=RFA)
    assert m2.config == m.config
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    m3 = load_model(path, expected="RFA", dtype=torch.float64)
    torch.testing.assert_close(m3(x.double()).float(), m(x), rtol=1e-5, atol=1e-5)


def test_wrong_kind_file_is_refused(tmp_path):
    path = save_model(_rfa(), tmp_path / "rfa.safetensors")
    with pytest.raises(XSRWeightsError, match="RFA"):
        load_model(path, expected=I2T)
    with pytest.raises(XSRWeightsError, match="RFA"):
        load_i2t(path)


def test_align_loss_matches_definition():
    pred = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # (1 + 4 + 9 + 16) / 2 = 15
    assert align_loss(pred, target).item() == pytest.approx(15.0)
    assert RFA.align_loss(pred, pred).item() == 0.0
    with pytest.raises(ValueError):
        align_loss(pred, target[:, :1])


def test_gradients_reach_every_parameter():
    m = _rfa().train()
    loss = align_loss(m(_tokens()), torch.randn(3, C))
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_align_loss_decreases_on_a_toy_mapping():
    # Target = a fixed linear map of the mean patch token: learnable, so L_align must fall.
    torch.manual_seed(0)
    m = RFA(tiny_rfa_config(C, P)).train()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, P + 1, C, generator=g)
    A = torch.randn(C, C, generator=g) / C**0.5
    target = 3.0 * x[:, 1:].mean(dim=1) @ A + 0.5
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(50):
        loss = align_loss(m(x), target)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = align_loss(m(x), target).item()
    assert last < 0.5 * first, (first, last)
