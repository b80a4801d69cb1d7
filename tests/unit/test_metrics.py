"""Tests for xsr_core.eval (metrics, paper table, CLI). CPU, no downloads, tiny generated images.

Networks that need published weights are exercised with random weights written to a tmp
``--weights-dir`` under the published file names (LPIPS, DISTS, CLIP) or through injected
factories (FID, MANIQA, MUSIQ plumbing).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from xsr_core.eval import cli
from xsr_core.eval import metrics as M
from xsr_core.eval.paper import PAPER_COLUMNS, PAPER_ROWS, format_table


def _write_set(
    root: Path, n: int = 4, size: int = 64, blur: float = 0.0, ext: str = ".png", seed: int = 0
) -> list[str]:
    """n smooth-ish random RGB images (blurred by ``blur`` px when > 0) under root."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        base = rng.random((size // 4, size // 4, 3))
        img = Image.fromarray((base * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        noise = rng.normal(0, 12, (size, size, 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
        if blur > 0:
            img = img.filter(ImageFilter.GaussianBlur(blur))
        name = f"img{i:02d}"
        img.save(root / f"{name}{ext}")
        names.append(name)
    return names


@pytest.fixture()
def sets(tmp_path: Path) -> dict[str, Path]:
    """hr, sr identical to hr, sr blurred by 1 px and by 2.5 px; 4 images 64x64."""
    out = {k: tmp_path / k for k in ("hr", "same", "blur1", "blur3")}
    _write_set(out["hr"])
    _write_set(out["same"])
    _write_set(out["blur1"], blur=1.0)
    _write_set(out["blur3"], blur=2.5)
    return out


@pytest.fixture()
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point torch hub and the HF cache at empty tmp folders, so weight lookups see nothing."""
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch):
    """Every socket connection attempt (IPv4/6, any library) is recorded and refused; the test fails on any."""
    import socket

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args[1] if len(args) > 1 else args)
        raise OSError("test: network access is forbidden")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(None, a))
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


# ---------------------------------------------------------------------------------------------
# inputs


def test_pairing_by_relative_name_ignoring_extension(tmp_path: Path) -> None:
    _write_set(tmp_path / "hr" / "sub", n=2, ext=".jpg")
    _write_set(tmp_path / "sr" / "sub", n=2, ext=".png")
    pairs = M.pair_images(tmp_path / "sr", tmp_path / "hr")
    assert [p[0] for p in pairs] == ["sub/img00", "sub/img01"]
    assert pairs[0][1].suffix == ".png" and pairs[0][2].suffix == ".jpg"


def test_unmatched_files_are_listed(tmp_path: Path) -> None:
    _write_set(tmp_path / "hr", n=3)
    _write_set(tmp_path / "sr", n=2)
    (tmp_path / "sr" / "img00.png").rename(tmp_path / "sr" / "other.png")
    with pytest.raises(M.MetricInputError) as err:
        M.pair_images(tmp_path / "sr", tmp_path / "hr")
    msg = str(err.value)
    assert "other" in msg and "img00" in msg and "img02" in msg and "--skip-unmatched" in msg
    pairs = M.pair_images(tmp_path / "sr", tmp_path / "hr", skip_unmatched=True)
    assert [p[0] for p in pairs] == ["img01"]


def _textured_hr(w: int, h: int, seed: int = 0) -> Image.Image:
    """A non-square HR image with fine texture (period-3/5 stripes + noise) that any squash or shift destroys."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 3.0) * 60, np.sin(yy / 5.0) * 60, np.sin((xx + yy) / 4.0) * 60], -1) + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


def test_perfect_sr_of_non_square_hr_is_perfect_never_squashed(tmp_path: Path, empty_caches: None) -> None:
    """#11.5: SR = the x16 crop of a 500x375 / 375x500 HR scores PSNR >= 50 dB and LPIPS ~ 0 against the raw HR."""
    from xsr_core.eval.run import hr_crop_and_lr

    (tmp_path / "hr").mkdir()
    (tmp_path / "sr").mkdir()
    for i, (w, h) in enumerate([(500, 375), (375, 500), (640, 480)]):
        hr = _textured_hr(w, h, seed=i)
        hr.save(tmp_path / "hr" / f"im{i}.jpg", quality=100)  # any extension pairs
        crop, lr = hr_crop_and_lr(Image.open(tmp_path / "hr" / f"im{i}.jpg"), 512)
        assert crop.size == (512, 512) and lr.size == (32, 32)
        crop.save(tmp_path / "sr" / f"im{i}.png")
    wdir = tmp_path / "w"
    wdir.mkdir()
    _random_torchvision_features("alexnet", wdir / M.W_ALEXNET.name)
    res = M.compute_metrics(tmp_path / "sr", tmp_path / "hr", metrics="psnr,lpips", weights_dir=wdir)
    assert res["hr_cropped"] == 3
    assert res["metrics"]["psnr"]["value"] >= 50.0
    assert res["metrics"]["lpips"]["value"] == pytest.approx(0.0, abs=1e-6)
    # the old squash would have scored far worse: the crop geometry is what makes it perfect
    squashed = np.asarray(Image.open(tmp_path / "hr" / "im0.jpg").resize((512, 512), Image.BICUBIC), dtype=np.float64)
    mse = ((squashed - np.asarray(Image.open(tmp_path / "sr" / "im0.png"), dtype=np.float64)) ** 2).mean()
    assert 10 * np.log10(255.0**2 / mse) < 20
    with pytest.raises(M.MetricInputError, match="--resize-hr was removed"):
        M.compute_metrics(tmp_path / "sr", tmp_path / "hr", metrics="psnr", resize_hr=True)
    # a non-square SR next to a differently sized HR cannot be explained by the crop: a clear error
    Image.open(tmp_path / "sr" / "im0.png").crop((0, 0, 512, 400)).save(tmp_path / "sr" / "im0.png")
    with pytest.raises(M.MetricInputError, match="not square"):
        M.compute_metrics(tmp_path / "sr", tmp_path / "hr", metrics="psnr")


def test_eval_run_folder_scores_against_saved_crops_and_refuses_other_hr(tmp_path: Path) -> None:
    """An `eval run` folder (run.json + hr_crop/ + lr/): --hr may be left out; a different HR set is an error."""
    from xsr_core.eval.run import hr_crop_and_lr

    sr = tmp_path / "sr"
    (tmp_path / "hr").mkdir()
    images = {}
    for i in range(2):
        _textured_hr(300 + 40 * i, 200, seed=i).save(tmp_path / "hr" / f"a{i}.png")
        crop, lr = hr_crop_and_lr(Image.open(tmp_path / "hr" / f"a{i}.png"), 128)
        for sub, im in (("hr_crop", crop), ("lr", lr), ("", crop)):
            (sr / sub).mkdir(parents=True, exist_ok=True)
            im.save(sr / sub / f"a{i}.png")
        images[f"a{i}.png"] = {"output": f"a{i}.png", "hr_crop": f"hr_crop/a{i}.png", "lr": f"lr/a{i}.png"}
    (sr / "run.json").write_text(json.dumps({"images": images, "hr_crop_dir": "hr_crop", "hr_side": 128}))
    res = M.compute_metrics(sr, None, metrics="psnr")  # side folders are not SR outputs
    assert res["n_images"] == 2 and res["metrics"]["psnr"]["value"] == M.PSNR_CAP_DB
    res = M.compute_metrics(sr, tmp_path / "hr", metrics="psnr")  # originals: the same crop is applied
    assert res["hr_cropped"] == 2 and res["metrics"]["psnr"]["value"] == M.PSNR_CAP_DB
    _textured_hr(300, 200, seed=9).save(tmp_path / "hr" / "a0.png")  # not the image the run degraded
    with pytest.raises(M.MetricInputError, match="does not give the HR crop"):
        M.compute_metrics(sr, tmp_path / "hr", metrics="psnr")
    with pytest.raises(M.MetricInputError, match="--hr is needed"):
        M.compute_metrics(tmp_path / "hr", None, metrics="psnr")
    # a run made with a reference DB not deduplicated against its test images is refused unless allowed
    run = json.loads((sr / "run.json").read_text())
    run["refdb_exclusion"] = {"allowed": True, "dbs": {"xsr_refdb": {"checked": 2, "not_excluded": 2}}}
    (sr / "run.json").write_text(json.dumps(run))
    with pytest.raises(M.MetricInputError, match="not deduplicated"):
        M.compute_metrics(sr, None, metrics="psnr")
    assert M.compute_metrics(sr, None, metrics="psnr", allow_unexcluded_db=True)["n_images"] == 2


def test_captions_formats_and_missing(tmp_path: Path) -> None:
    names = ["a/img00", "img01"]
    (tmp_path / "c.json").write_text(json.dumps({"a/img00.png": "a cat", "img01": "a dog"}))
    (tmp_path / "c.jsonl").write_text(
        '{"file": "img00.jpg", "caption": "a cat"}\n{"image": "img01", "text": "a dog"}\n'
    )
    (tmp_path / "c.tsv").write_text("a/img00\ta cat\nimg01.png\ta dog\n")
    for f in ("c.json", "c.jsonl", "c.tsv"):
        got = M.match_captions(names, M.read_captions(tmp_path / f))
        assert got == {"a/img00": "a cat", "img01": "a dog"}, f
    with pytest.raises(M.MetricInputError, match="img02"):
        M.match_captions(["img02"], M.read_captions(tmp_path / "c.json"))


def test_unknown_metric_and_default_list() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        M.parse_metric_list("fid,nope")
    assert M.parse_metric_list(None) == ["fid", "dists", "lpips", "clip_i", "maniqa", "musiq", "psnr", "ssim"]
    assert "clip_t" in M.parse_metric_list(None, have_captions=True)
    assert M.parse_metric_list("ssim,maniqa-pipal,FID") == ["fid", "maniqa_pipal", "ssim"]  # registry order


# ---------------------------------------------------------------------------------------------
# metrics with known answers


def test_psnr_ssim_identical_perfect_and_blur_worse(sets: dict[str, Path]) -> None:
    vals = {
        k: M.compute_metrics(sets[k], sets["hr"], metrics="psnr,ssim")["metrics"] for k in ("same", "blur1", "blur3")
    }
    assert vals["same"]["psnr"]["value"] == M.PSNR_CAP_DB
    assert vals["same"]["ssim"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert vals["same"]["psnr"]["value"] > vals["blur1"]["psnr"]["value"] > vals["blur3"]["psnr"]["value"]
    assert 1.0 > vals["blur1"]["ssim"]["value"] > vals["blur3"]["ssim"]["value"]
    assert vals["blur1"]["psnr"]["n"] == 4


def _random_torchvision_features(arch: str, path: Path) -> None:
    """Random (He-initialised) ``features.*`` of a torchvision model, saved under the published name."""
    import torchvision

    torch.manual_seed(0)
    with torch.device("meta"):  # skip allocating / initialising the big classifier
        model = getattr(torchvision.models, arch)(weights=None)
    sd = {}
    for k, v in model.features.state_dict().items():
        if k.endswith("weight"):
            sd[f"features.{k}"] = torch.randn(v.shape) * (2.0 / (v.shape[1] * v.shape[2] * v.shape[3])) ** 0.5
        else:
            sd[f"features.{k}"] = torch.zeros(v.shape)
    torch.save(sd, path)


def test_lpips_real_network_with_injected_weights(
    sets: dict[str, Path], tmp_path: Path, empty_caches: None, no_network: list
) -> None:
    wdir = tmp_path / "w"
    wdir.mkdir()
    _random_torchvision_features("alexnet", wdir / M.W_ALEXNET.name)
    v = {
        k: M.compute_metrics(sets[k], sets["hr"], metrics="lpips", weights_dir=wdir)["metrics"]["lpips"]
        for k in ("same", "blur3")
    }
    assert v["same"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert v["blur3"]["value"] > 1e-3
    assert "AlexNet, v0.1" in v["same"]["variant"]


def test_dists_real_network_with_injected_weights(
    sets: dict[str, Path], tmp_path: Path, empty_caches: None, no_network: list
) -> None:
    pytest.importorskip("pyiqa")
    wdir = tmp_path / "w"
    wdir.mkdir()
    _random_torchvision_features("vgg16", wdir / M.W_VGG16.name)
    g = torch.Generator().manual_seed(0)
    torch.save(
        {"alpha": torch.rand(1, 1475, 1, 1, generator=g), "beta": torch.rand(1, 1475, 1, 1, generator=g)},
        wdir / M.W_DISTS.name,
    )
    res = {
        k: M.compute_metrics(sets[k], sets["hr"], metrics="dists", weights_dir=wdir, batch_size=4)["metrics"]["dists"]
        for k in ("same", "blur3")
    }
    assert res["same"]["value"] == pytest.approx(0.0, abs=1e-5)
    assert res["blur3"]["value"] > 1e-3


def test_clip_i_real_loader_and_clip_t_scorer(
    sets: dict[str, Path], tmp_path: Path, empty_caches: None, no_network: list
) -> None:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "w" / M.W_CLIP_IMAGE.name)
    res = {
        k: M.compute_metrics(sets[k], sets["hr"], metrics="clip_i", weights_dir=tmp_path / "w")["metrics"]["clip_i"]
        for k in ("same", "blur3")
    }
    assert res["same"]["value"] == pytest.approx(1.0, abs=1e-5)
    assert res["blur3"]["value"] < 1.0 - 1e-6
    assert res["same"]["column"] == "CLIP-I" and "SR image–HR image cosine" in res["same"]["variant"]

    # CLIP-T: a tiny tokenizer stand-in (character codes) through the same scorer class.
    def tok(texts, **_: object) -> dict[str, torch.Tensor]:
        ids = torch.tensor([[1] + [ord(c) % 60 + 2 for c in t[:10].ljust(10)] + [63] for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    scorer = M.CLIPScorer(model, tok, image_size=32)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s = scorer.image_text(x, x, ["a cat", "a dog"])
    assert s.shape == (2,) and bool(((s >= -1) & (s <= 1)).all())
    with pytest.raises(M.MetricInputError, match="captions"):
        scorer.image_text(x, x, None)


def test_musiq_real_architecture_with_random_weights(tmp_path: Path, empty_caches: None, no_network: list) -> None:
    pytest.importorskip("pyiqa")
    from pyiqa.archs.musiq_arch import MUSIQ

    # One image: MUSIQ's multiscale input (224 + 384 rescales) makes each forward slow on CPU.
    _write_set(tmp_path / "hr", n=1)
    _write_set(tmp_path / "sr", n=1, blur=1.0)
    torch.manual_seed(0)
    wdir = tmp_path / "w"
    wdir.mkdir()
    torch.save(MUSIQ(pretrained=False, num_class=1).state_dict(), wdir / M.W_MUSIQ.name)
    res = M.compute_metrics(tmp_path / "sr", tmp_path / "hr", metrics="musiq", weights_dir=wdir)
    entry = res["metrics"]["musiq"]
    assert entry["n"] == 1 and np.isfinite(entry["value"]) and list(res["per_image"]["musiq"]) == ["img00"]
    assert "KonIQ-10k" in entry["variant"]


# ---------------------------------------------------------------------------------------------
# weights: missing -> early, named error; never a download


def test_missing_weights_fail_early_with_names_folders_urls(
    sets: dict[str, Path], empty_caches: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = []
    for key, spec in list(M.METRICS.items()):  # any build would be a bug: the check must come first
        monkeypatch.setitem(M.METRICS, key, dataclasses.replace(spec, factory=lambda ctx: built.append(1)))
    keys = ["fid", "dists", "lpips", "clip_i", "clip_t", "maniqa", "maniqa_pipal", "musiq"]
    with pytest.raises(M.MissingWeightsError) as err:
        M.compute_metrics(sets["same"], sets["hr"], metrics=keys, captions={f"img{i:02d}": "x" for i in range(4)})
    msg = str(err.value)
    for wf in (M.W_INCEPTION, M.W_VGG16, M.W_DISTS, M.W_ALEXNET, M.W_MANIQA["koniq"], M.W_MANIQA["pipal"], M.W_MUSIQ):
        assert wf.name in msg and wf.url in msg
    assert "openai/clip-vit-large-patch14" in msg and "huggingface-cli download" in msg
    assert str(Path(torch.hub.get_dir()) / "pyiqa") in msg and str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    for label in ("FID", "DISTS", "LPIPS", "CLIP-I", "CLIP-Score", "MANIQA (KonIQ-10k)", "MANIQA (PIPAL)", "MUSIQ"):
        assert label in msg
    assert not built


def test_weight_check_runs_before_any_factory(sets: dict[str, Path], empty_caches: None) -> None:
    calls: list[str] = []

    def factory(ctx: M.MetricContext) -> M.Metric:
        calls.append("psnr")
        return M.build_psnr(ctx)

    with pytest.raises(M.MissingWeightsError, match="musiq_koniq"):
        M.compute_metrics(sets["same"], sets["hr"], metrics="psnr,musiq", factories={"psnr": factory})
    assert calls == []


def test_missing_weights_with_the_real_builders_never_touch_the_network(
    sets: dict[str, Path], empty_caches: None, no_network: list
) -> None:
    """The pre-flight check, not a download attempt, is what stops a run without weights."""
    for key in ("fid", "lpips", "dists", "clip_i", "maniqa", "musiq"):
        with pytest.raises(M.MissingWeightsError, match=r"put it in|huggingface-cli download") as err:
            M.compute_metrics(sets["same"], sets["hr"], metrics=key)
        assert METRIC_FILES[key] in str(err.value)


METRIC_FILES = {
    "fid": M.W_INCEPTION.name,
    "lpips": M.W_ALEXNET.name,
    "dists": M.W_VGG16.name,
    "clip_i": M.CLIP_REPO,
    "maniqa": M.W_MANIQA["koniq"].name,
    "musiq": M.W_MUSIQ.name,
}


def test_socket_guard_sees_a_download_attempt(no_network: list, tmp_path: Path) -> None:
    """The guard the tests above rely on does catch a real library download (torch hub over urllib)."""
    with pytest.raises(Exception, match="network access is forbidden"):
        torch.hub.download_url_to_file("https://example.invalid/w.pth", str(tmp_path / "w.pth"), progress=False)
    assert no_network, "the socket guard recorded nothing"
    no_network.clear()


def test_weight_file_names_match_the_libraries() -> None:
    import torchvision

    assert M.W_ALEXNET.url == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    assert M.W_VGG16.url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    assert M.W_INCEPTION.url == fidelity.URL_INCEPTION_V3
    if pytest.importorskip("pyiqa"):
        from pyiqa.archs import dists_arch, maniqa_arch, musiq_arch

        assert maniqa_arch.default_model_urls["koniq"].endswith(M.W_MANIQA["koniq"].name)
        assert maniqa_arch.default_model_urls["pipal"].endswith(M.W_MANIQA["pipal"].name)
        assert maniqa_arch.default_model_urls["kadid"].endswith(M.W_MANIQA["kadid"].name)
        assert musiq_arch.default_model_urls["koniq10k"].endswith(M.W_MUSIQ.name)
        assert dists_arch.default_model_urls["url"].endswith(M.W_DISTS.name)


class _Opaque:
    """A pickled object that is not a tensor: torch.load(weights_only=True) must refuse it."""


def test_weights_only_loader_rejects_pickled_objects(tmp_path: Path) -> None:
    torch.save({"a": _Opaque()}, tmp_path / "x.pth")
    with pytest.raises(M.MissingWeightsError, match="weights_only=True"):
        M.load_state_dict_file(tmp_path / "x.pth")
    torch.save({"params": {"module.w": torch.ones(2)}}, tmp_path / "y.pth")
    assert list(M.load_state_dict_file(tmp_path / "y.pth")) == ["w"]


# ---------------------------------------------------------------------------------------------
# plumbing with injected tiny networks: JSON, markdown, column order, names


class _TinyFeatures(torch.nn.Module):
    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float())).mean(dim=(2, 3))


def _tiny_fid(ctx: M.MetricContext) -> M.Metric:
    from torchmetrics.image.fid import FrechetInceptionDistance

    return M.FIDMetric(FrechetInceptionDistance(feature=_TinyFeatures(), normalize=True))


def _const(value: float) -> Callable[[M.MetricContext], M.Metric]:
    return lambda ctx: M.PerImageMetric(lambda sr, hr, caps: torch.full((sr.shape[0],), value))


def _tiny_factories() -> dict:
    return {
        "fid": _tiny_fid,
        "dists": lambda ctx: M.PerImageMetric(lambda sr, hr, c: (sr - hr).abs().mean(dim=(1, 2, 3))),
        "lpips": lambda ctx: M.PerImageMetric(lambda sr, hr, c: ((sr - hr) ** 2).mean(dim=(1, 2, 3))),
        "clip_i": _const(0.75),
        "clip_t": lambda ctx: M.PerImageMetric(lambda sr, hr, caps: torch.tensor([len(c) / 100 for c in caps])),
        "maniqa": _const(0.5),
        "musiq": _const(60.0),
    }


def test_plumbing_json_and_table_with_injected_factories(
    sets: dict[str, Path], tmp_path: Path, empty_caches: None
) -> None:
    captions = {f"img{i:02d}": "x" * (10 * (i + 1)) for i in range(4)}
    res = M.compute_metrics(sets["same"], sets["hr"], captions=captions, factories=_tiny_factories(), batch_size=3)
    assert list(res["metrics"]) == ["fid", "dists", "lpips", "clip_i", "clip_t", "maniqa", "musiq", "psnr", "ssim"]
    m = res["metrics"]
    assert m["fid"]["value"] == pytest.approx(0.0, abs=1e-3)  # identical sets
    assert m["dists"]["value"] == 0.0 and m["lpips"]["value"] == 0.0
    assert m["clip_t"]["value"] == pytest.approx(0.25)  # captions reached the metric, per image
    assert m["maniqa"]["variant"].startswith("MANIQA (pyiqa `maniqa` = KonIQ-10k")
    assert all(e["n"] == 4 for e in m.values()) and m["fid"]["custom_factory"] is True
    assert set(res["per_image"]) == set(m) - {"fid"}

    json_path, md_path = M.write_results(res, tmp_path / "out", label="XSR test")
    back = json.loads(json_path.read_text())
    assert back["metrics"]["musiq"]["value"] == 60.0 and back["n_images"] == 4
    table = md_path.read_text()
    header = table.splitlines()[0]
    positions = [header.index(c) for c in PAPER_COLUMNS]
    assert positions == sorted(positions)
    assert all(f"| {name} |" in table for name, _ in PAPER_ROWS)
    ours = next(line for line in table.splitlines() if "XSR test" in line)
    assert ours.split("|")[2:8] == [" 0.00 ", " 0.0000 ", " 0.0000 ", " 0.2500 ", " 0.5000 ", " 60.00 "]
    # the paper's CLIP-Score column is the SR↔text cosine; the SR↔HR image cosine is a named extra column
    assert "CLIP-I (SR↔HR image cosine) | 0.7500" in table and "PSNR (dB)" in table
    assert "- CLIP-Score: CLIP-Score in the paper's sense = CLIP-T" in table
    assert M.parse_metric_list("clip_score,clip_image") == ["clip_i", "clip_t"]


def test_format_table_missing_columns_and_secondary_variant() -> None:
    res = {
        "n_images": 2,
        "metrics": {
            "maniqa": {
                "value": 0.4,
                "variant": "MANIQA koniq",
                "column": "MANIQA",
                "label": "MANIQA (KonIQ-10k)",
                "n": 2,
            },
            "maniqa_pipal": {
                "value": 0.6,
                "variant": "MANIQA pipal",
                "column": "MANIQA",
                "label": "MANIQA (PIPAL)",
                "n": 2,
            },
        },
    }
    table = format_table(res, paper_rows=False)
    row = next(line for line in table.splitlines() if "this run (2 images)" in line)
    assert row.count("—") == 5 and "0.4000" in row and "0.6000" not in row
    assert "| MANIQA (PIPAL) | 0.6000 |" in table and "SeeSR" not in table


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_metrics_outputs_and_errors(
    sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, empty_caches: None
) -> None:
    sr_hr = ["--sr", str(sets["blur1"]), "--hr", str(sets["hr"])]
    rc = cli.main(["metrics", *sr_hr, "--metrics", "psnr,ssim", "--out", str(tmp_path / "o")])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | FID↓ | DISTS↓ | LPIPS↓ | CLIP-Score↑ | MANIQA↑ | MUSIQ↑ |")
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]["ssim"]["n"] == 4
    rc = cli.main(["metrics", *sr_hr, "--metrics", "lpips"])
    err = capsys.readouterr().err
    assert rc == 2 and M.W_ALEXNET.name in err and M.W_ALEXNET.url in err


def test_cli_run_imports_run_module_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    fake = types.ModuleType("xsr_core.eval.run")

    def fake_main(args: object) -> int:
        seen["args"] = args
        return 0

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "xsr_core.eval.run", fake)
    assert cli.main(["run", "--lr", "x", "--steps", "20"]) == 0
    assert seen["args"].command == "run" and seen["args"].run_args == ["--lr", "x", "--steps", "20"]
