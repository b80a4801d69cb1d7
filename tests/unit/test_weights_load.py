"""``weights.load_model`` fills the meta-device build that the header check makes, instead of building (and
randomly initialising) the model again on the CPU; the result must equal the ordinary build loaded with the
file's tensors: values, declared dtypes, ties and non-persistent buffers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from xsr_core import weights
from xsr_core.adapter import AdaINAdapter, AdaINAdapterConfig
from xsr_core.models import RFA
from xsr_core.models.i2t import I2T, I2TConfig, load_i2t, save_i2t
from xsr_core.testing import zoo
from xsr_core.testing.tiny_models import tiny_rfa_config, train_tiny_gpt2_tokenizer
from xsr_core.weights import load_model, save_model


def _spy(monkeypatch) -> list[bool]:
    """Whether each load_model call took the meta-device path (True) or fell back to the CPU build."""
    taken: list[bool] = []
    orig = weights._fill_meta_model

    def spy(model, sd):
        out = orig(model, sd)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(weights, "_fill_meta_model", spy)
    return taken


def _no_cpu_init(monkeypatch):
    """Random initialisation on the CPU fails the test: the fast path must not run any."""

    def guard(orig):
        def init(tensor, *a, **k):
            if not tensor.is_meta:
                raise AssertionError("a model was randomly initialised on the CPU while loading")
            return orig(tensor, *a, **k)

        return init

    for name in ("kaiming_uniform_", "normal_", "uniform_", "xavier_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, guard(getattr(torch.nn.init, name)))


def test_rfa_loads_without_initialising_and_equals_the_file(tmp_path, monkeypatch):
    rfa = RFA(tiny_rfa_config())
    save_model(rfa, tmp_path / "rfa.safetensors")
    taken = _spy(monkeypatch)
    _no_cpu_init(monkeypatch)
    got = load_model(tmp_path / "rfa.safetensors", expected=RFA)
    assert taken == [True]
    ref = rfa.state_dict()
    assert got.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) and v.dtype == ref[k].dtype for k, v in got.state_dict().items())
    assert not any(t.is_meta for t in (*got.parameters(), *got.buffers()))


def test_a_half_precision_file_loads_in_the_declared_dtype(tmp_path):
    rfa = RFA(tiny_rfa_config())
    save_model(rfa, tmp_path / "rfa.safetensors")
    meta = weights.read_metadata(tmp_path / "rfa.safetensors")
    half = {k: v.half() for k, v in load_file(str(tmp_path / "rfa.safetensors")).items()}
    save_file(half, str(tmp_path / "rfa16.safetensors"), metadata=meta)
    got = load_model(tmp_path / "rfa16.safetensors", expected=RFA)
    assert {p.dtype for p in got.parameters()} == {torch.float32}  # as the copying load_state_dict gave
    assert all(torch.equal(v, half[k].float()) for k, v in got.state_dict().items())


def test_i2t_keeps_gpt2_head_tied_to_its_embedding(tmp_path, monkeypatch):
    tok = train_tiny_gpt2_tokenizer()
    dec = {"vocab_size": len(tok), "eos_token_id": tok.eos_token_id, "bos_token_id": tok.eos_token_id}
    dec.update(n_embd=32, n_layer=1, n_head=2)
    i2t = I2T(I2TConfig(clip_dim=32, width=32, depth=1, heads=2, decoder=dec))
    save_i2t(i2t, tmp_path / "i2t.safetensors", tok)
    taken = _spy(monkeypatch)
    got, _ = load_i2t(tmp_path / "i2t.safetensors")
    assert taken == [True]
    head, wte = got.decoder.lm_head.weight, got.decoder.transformer.wte.weight
    assert head is wte  # one parameter, as the constructor tied them
    ref = i2t.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in got.state_dict().items())


def test_adapter_non_persistent_buffers_are_real(tmp_path, monkeypatch):
    cfg = AdaINAdapterConfig.from_unet_config(dict(zoo.TINY_UNET_CONFIG), embed_dim=32, include_controlnet=True)
    ad = AdaINAdapter(cfg)
    with torch.no_grad():
        ad.gates.uniform_(0.05, 0.2)
    save_model(ad, tmp_path / "ad.safetensors")
    taken = _spy(monkeypatch)
    got = load_model(tmp_path / "ad.safetensors", expected=AdaINAdapter)
    assert taken == [True]
    for (n1, b1), (n2, b2) in zip(ad.named_buffers(), got.named_buffers(), strict=True):
        assert n1 == n2 and b2.device.type == "cpu" and torch.equal(b1, b2)
    e = torch.randn(2, 5, 32)
    want, have = ad.compute_stats(e), got.compute_stats(e)
    assert torch.equal(want.mu, have.mu) and torch.equal(want.sigma, have.sigma)


class _Computed(torch.nn.Module):
    """A registered-class stand-in whose constructor computes a non-persistent buffer (meta under a meta build)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(4.0), persistent=False)


def test_a_buffer_computed_on_the_meta_device_falls_back_to_the_cpu_build():
    with torch.device("meta"):
        meta = _Computed(None)
    sd = {k: torch.randn(v.shape) for k, v in meta.state_dict().items()}
    assert weights._fill_meta_model(meta, sd) is None  # `table` would stay meta: the caller builds on the CPU
