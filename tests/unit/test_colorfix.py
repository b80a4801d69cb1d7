"""xsr_core.colorfix: the batched wavelet fix equals StableSR's layer-by-layer formula; AdaIN matches statistics."""

import pytest
import torch
import torch.nn.functional as F

from xsr_core.colorfix import adain_color_fix, color_fix, wavelet_color_fix
from xsr_core.imaging import bicubic_resize


def _stablesr_reference(sr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """StableSR's wavelet colour fix written out level by level (the formula the module implements)."""

    def blur(x, r):
        k = torch.tensor([[1 / 16, 1 / 8, 1 / 16], [1 / 8, 1 / 4, 1 / 8], [1 / 16, 1 / 8, 1 / 16]], dtype=x.dtype)
        k = k[None, None].repeat(x.shape[1], 1, 1, 1)
        return F.conv2d(F.pad(x, (r, r, r, r), mode="replicate"), k, groups=x.shape[1], dilation=r)

    def decompose(x):
        high = torch.zeros_like(x)
        for i in range(5):
            low = blur(x, 2**i)
            high = high + (x - low)
            x = low
        return high, x

    ref = bicubic_resize(lr, tuple(sr.shape[1:3]), antialias=False).expand(sr.shape[0], -1, -1, -1)
    sr_high, _ = decompose(sr.movedim(-1, 1))
    _, ref_low = decompose(ref.movedim(-1, 1))
    return (sr_high + ref_low).clamp(0, 1).movedim(1, -1)


@pytest.mark.parametrize("n_lr", [1, 3])
def test_wavelet_matches_layer_by_layer_formula(n_lr):
    g = torch.Generator().manual_seed(0)
    sr = torch.rand(3, 96, 80, 3, generator=g)
    lr = torch.rand(n_lr, 6, 5, 3, generator=g)
    got = wavelet_color_fix(sr, lr)
    want = _stablesr_reference(sr, lr)
    assert got.shape == sr.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    if n_lr == 1:  # one LR for the whole batch: every image gets the same low frequencies
        torch.testing.assert_close(wavelet_color_fix(sr[1:2], lr), got[1:2], atol=1e-6, rtol=0)


def test_wavelet_takes_the_lr_colours():
    sr = torch.full((1, 64, 64, 3), 0.8)  # flat SR: no detail to keep
    rgb = torch.tensor([0.2, 0.4, 0.6])
    lr = rgb.expand(1, 4, 4, 3)
    torch.testing.assert_close(wavelet_color_fix(sr, lr), rgb.expand(1, 64, 64, 3), atol=1e-5, rtol=0)


def test_adain_matches_statistics_and_bad_batch():
    g = torch.Generator().manual_seed(1)
    sr = torch.rand(2, 32, 32, 3, generator=g) * 0.5
    lr = torch.rand(1, 4, 4, 3, generator=g) * 0.3 + 0.4
    out = adain_color_fix(sr, lr)
    ref = bicubic_resize(lr, (32, 32), antialias=False)
    torch.testing.assert_close(out.mean(dim=(1, 2)), ref.mean(dim=(1, 2)).expand(2, 3), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="2 LR images for 3 SR"):
        color_fix(torch.rand(3, 32, 32, 3), torch.rand(2, 4, 4, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        color_fix(sr, lr, "nope")
