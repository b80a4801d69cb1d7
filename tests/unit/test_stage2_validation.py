"""Stage-2 validation (xsr_core.train.adapter.make_evaluator): fixed timesteps over the whole schedule and over
its low-noise part, and the shuffled-E twin of each figure, on a recording stand-in for the stage."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from xsr_core.train.adapter import LOW_T_FRACTION, _spread_timesteps, make_evaluator


class _Collate:
    def __call__(self, rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


class _RecordingStage(nn.Module):
    """Returns as "mse" a function of what it was given; records the batches (timesteps, E, noise seed)."""

    def __init__(self, T: int = 1000):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.scheduler = SimpleNamespace(config=SimpleNamespace(num_train_timesteps=T))
        self.cfg = SimpleNamespace(p_drop_text=0.3, p_drop_image=0.3)
        self.adapter = object()
        self.seen: list[dict] = []

    def forward(self, b):
        assert self.cfg.p_drop_text == self.cfg.p_drop_image == 0.0  # validation never drops a condition
        noise = torch.randn(b["pixels"].shape)  # what AdapterStage draws under the evaluator's seed
        self.seen.append({"t": b["timesteps"].clone(), "E": b["E"][:, 0, 0].clone(), "noise": noise})
        assert len(b["timesteps"]) <= 5  # chunks of the training batch size
        # a loss that is low when each row's E matches its own image (E[i] == i), and grows with t
        err = (b["E"][:, 0, 0] - b["index"].float()).abs() + b["timesteps"].float() / 1000
        return {"mse": err.mean()}

    def end_step(self):
        pass


def _dataset(n: int):
    return [
        {"pixels": torch.zeros(3, 8, 8), "E": torch.full((2, 4), float(i)), "index": torch.tensor(i)} for i in range(n)
    ]


def test_spread_timesteps_are_stratified_and_in_range():
    t = _spread_timesteps(8, 0, 1000)
    assert t.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    low = _spread_timesteps(64, 0, 200)
    assert low.min() >= 0 and low.max() < 200 and len(set(low.tolist())) == 64


def test_validation_low_t_and_shuffled_e_figures():
    n, repeats = 6, 4
    stage = _RecordingStage()
    ev = make_evaluator(SimpleNamespace(batch_size=5), _dataset(n), _Collate(), n=n, repeats=repeats)
    res = ev(stage, 0)
    assert set(res) == {
        "low_t_max",
        "val_mse",
        "val_mse_shuffled_e",
        "val_mse_low_t",
        "val_mse_low_t_shuffled_e",
    }
    assert res["low_t_max"] == round(LOW_T_FRACTION * 1000)
    assert stage.cfg.p_drop_text == 0.3  # restored
    per = -(-n * repeats // 5)  # chunks per figure (24 rows: 5, 5, 5, 5, 4)
    assert len(stage.seen) == 4 * per
    full, full_sh, low, low_sh = (
        {k: torch.cat([c[k] for c in stage.seen[f * per : (f + 1) * per]]) for k in ("t", "E", "noise")}
        for f in range(4)
    )
    # every image is scored at `repeats` timesteps spread over the schedule (one per n-th part), not a narrow range
    for i in range(n):
        ts = full["t"][i::n]
        assert len(ts) == repeats and ts.max() - ts.min() >= (repeats - 1) * 1000 // repeats - 1
    assert full["t"].max() >= 900 and low["t"].max() < res["low_t_max"]
    # the shuffled twins see the same timesteps and noise, only E differs (rolled by one image)
    for a, b in ((full, full_sh), (low, low_sh)):
        assert torch.equal(a["t"], b["t"]) and torch.equal(a["noise"], b["noise"])
        assert torch.equal(b["E"][:n], a["E"][:n].roll(1)) and torch.equal(a["E"], torch.arange(n).repeat(repeats))
    assert res["val_mse_shuffled_e"] > res["val_mse"] and res["val_mse_low_t"] < res["val_mse"]
    assert ev(stage, 1) == res  # deterministic


def test_validation_without_e_has_no_shuffled_figure():
    stage = _RecordingStage()
    stage.adapter = None  # the text-only variant
    rows = [{k: v for k, v in r.items()} for r in _dataset(3)]
    res = make_evaluator(SimpleNamespace(batch_size=5), rows, _Collate(), n=3, repeats=2)(stage, 0)
    assert set(res) == {"low_t_max", "val_mse", "val_mse_low_t"}
