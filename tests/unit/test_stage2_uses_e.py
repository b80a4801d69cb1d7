"""#11.9: stage-2 validation loss with the true image embedding E is lower than with a shuffled one.

The real chain on CPU with the tiny zoo: ``write_class_set(make=make_detail_class_image)`` → ``prepare`` →
``rfa`` → ``i2t`` → ``train_adapter`` (the adain variant), with the real model, loss, E pipeline (the trained
I2T over the RFA-retrieved references, ``build_embedding_cache``) and validation (``make_evaluator``). The data set is
built so that E is the only source of the detail the loss scores: a strong class texture that the 64 px
training crop keeps and the 32x32 LR averages away, a weak class cue in the LR (a shape's colour: enough for
the RFA to retrieve same-class references), class-free captions. The stage-2 hyper-parameters (64 px, batch
4, a few hundred steps, a high learning rate) are the CPU scale's; the adapter's dependence on E grows from
its zero gates and small-init heads, so a run of a few dozen steps shows the gap within noise.

The proof is the low-noise figure ``val_mse_low_t``: at low noise the HR detail the LR does not show decides
the loss (at high noise it is buried under noise that no condition can tell), and the shuffled twin has the
same images, noise and timesteps with E rolled across the images.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xsr_core.train.config import AdapterTrainConfig
from xsr_core.train.data import PrepareConfig, TokenCache, load_items, prepare
from xsr_core.train.synthetic import _detail_texture, class_of, make_detail_class_image, write_class_set
from xsr_helpers import tiny_stage1

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

N_IMAGES, SPLIT = 128, "64,48,16"
STAGE2_STEPS = 500
MARGIN = 1.01  # shuffled-E loss / true-E loss at least this: a clear margin, not noise


@pytest.fixture(scope="module")
def run(tiny_zoo, tmp_path_factory):
    from xsr_core.train.adapter import build_embedding_cache, train_adapter

    root = tmp_path_factory.mktemp("stage2_uses_e")
    imgs = write_class_set(root / "imgs", n=N_IMAGES, make=make_detail_class_image)
    data = root / "data"
    prepare(
        data,
        tiny_zoo["clip_vision"],
        images=str(imgs),
        captions=str(imgs / "captions.jsonl"),
        config=PrepareConfig(split=SPLIT, device="cpu", refdb_mode="packed", dedup_threshold=0.999),
    )
    stage1 = tiny_stage1(tiny_zoo, root, data, rfa_steps=300, i2t_steps=60, rfa_log=100, i2t_log=20)
    cfg = AdapterTrainConfig(
        **stage1["stage2"],
        output_dir=str(root / "adain"),
        log_steps=50,
        resolution=64,
        learning_rate=5e-3,
        p_drop_text=0.0,
        p_drop_image=0.0,
        max_steps=STAGE2_STEPS,
        eval_steps=STAGE2_STEPS,
    )
    result = train_adapter(cfg)
    return {"data": data, "result": result, "e_folder": build_embedding_cache(cfg, torch.device("cpu"))}


def test_detail_texture_is_kept_at_64px_and_gone_from_the_lr():
    from xsr_core.imaging import make_lr, resize_center_crop_chw

    for cls in range(4):
        tex = torch.from_numpy(_detail_texture(cls, 512, 640, 0, 64)).float()[None, :, :, None].expand(1, 512, 640, 3)
        crop = tex[:, :, 64:576]
        lr = make_lr(crop)  # linear: the LR of the texture alone is what the texture adds to the LR
        at64 = resize_center_crop_chw(crop.movedim(-1, 1), 64)
        # amplitude 1 at HR: nothing of it inside the LR (point-odd about every LR sample), a little at the
        # border rows/columns (where the antialiasing kernel is cut off)
        assert lr[:, 2:-2, 2:-2].abs().max() < 1e-4 and lr.pow(2).mean().sqrt() < 0.05, cls
        assert at64.std() > 0.5, cls  # what the 64 px training target keeps of it


def test_captions_name_no_class(run):
    words = ("red", "green", "blue", "yellow", "stripes", "checks", "dots")
    for it in load_items(run["data"], "train") + load_items(run["data"], "test"):
        assert not any(w in it["caption"] for w in words), it["caption"]


def _ncm_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Nearest-class-mean accuracy (cosine) of ``test_x`` against the class means of ``train_x``."""
    train_x, test_x = F.normalize(train_x.float(), dim=-1), F.normalize(test_x.float(), dim=-1)
    means = torch.stack([train_x[train_y == c].mean(0) for c in range(4)])
    return ((test_x @ means.T).argmax(1) == test_y).float().mean().item()


def test_e_carries_the_class_the_lr_does_not(run):
    from safetensors.torch import load_file

    data, folder = run["data"], run["e_folder"]
    y = {s: torch.tensor([class_of(it["source"]) for it in load_items(data, s)]) for s in ("train", "test")}
    E = {s: load_file(str(folder / f"{s}.safetensors"))["E"].float().mean(1) for s in ("train", "test")}
    lr = {s: TokenCache(data, s).stack("lr_tokens").float().mean(1) for s in ("train", "test")}
    acc_e = _ncm_accuracy(E["train"], y["train"], E["test"], y["test"])
    acc_lr = _ncm_accuracy(lr["train"], y["train"], lr["test"], y["test"])
    print(f"class accuracy (nearest class mean, test split): E {acc_e:.3f}, raw LR tokens {acc_lr:.3f}")
    assert acc_e >= 0.5 and acc_e > acc_lr  # chance: 0.25


def test_stage2_true_embedding_beats_a_shuffled_one(run):
    first, last = run["result"]["evals"][0], run["result"]["evals"][-1]
    assert first["step"] == 0 and last["step"] == STAGE2_STEPS
    # the negative control: zero gates at step 0 make the adapter the identity, so E cannot matter there
    assert first["val_mse_low_t_shuffled_e"] == first["val_mse_low_t"]
    assert last["val_mse"] < first["val_mse"]
    gaps = {n: last[f"{n}_shuffled_e"] / last[n] - 1 for n in ("val_mse", "val_mse_low_t")}
    print("stage-2 validation at step", last["step"], {k: round(v, 4) for k, v in last.items()}, "gaps", gaps)
    assert last["val_mse_low_t_shuffled_e"] > MARGIN * last["val_mse_low_t"]
