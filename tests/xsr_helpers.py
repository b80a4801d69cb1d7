"""Helpers shared by tests/unit, tests/comfy and tests/browser.

Imported by module name (``from xsr_helpers import ...``): pytest puts tests/ on sys.path for tests/conftest.py,
and ``tests.`` would resolve to the top-level ``tests`` package that some installed distributions ship.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

SUPPORT_NODES = Path(__file__).resolve().parent / "comfy" / "support" / "xsr_test_support"


def upload_lr8(comfy, folder: Path, name: str, seed: int) -> str:
    """An 8x8 LR (synthetic 128 px image ``seed``, bicubic down) saved as ``folder/name`` and uploaded to the live
    server's input folder; returns its name there."""
    from PIL import Image

    from xsr_core.testing.synthetic import synthetic_image

    p = folder / name
    synthetic_image(seed, 128).resize((8, 8), Image.BICUBIC).save(p)
    return comfy.upload_image(p)


def prepare_folder(out: Path, encoder, images: Path, captions: Path | None = None, **config) -> dict:
    """``train prepare`` of an image folder into ``out`` with the CLIP vision file ``encoder``; returns its info.

    ``captions`` defaults to the ``captions.jsonl`` that ``write_image_set`` / ``write_class_set`` write beside
    the images; ``config``: :class:`~xsr_core.train.data.PrepareConfig` fields (``device`` defaults to the CPU).
    """
    from xsr_core.train.data import PrepareConfig, prepare

    captions = Path(images) / "captions.jsonl" if captions is None else captions
    config = PrepareConfig(**{"device": "cpu", **config})
    return prepare(out, encoder, images=str(images), captions=str(captions), config=config)


def eval_run_cmd(inputs: Path, out: Path, workflow: Path, models: Path, *extra: str) -> list[str]:
    """argv of ``python -m xsr_core eval run`` over ``inputs`` into ``out``, with the test-support custom nodes
    loaded and 2 sampler steps; ``extra``: more flags."""
    return [
        sys.executable,
        "-m",
        "xsr_core",
        "eval",
        "run",
        "--input",
        str(inputs),
        "--out",
        str(out),
        "--workflow",
        str(workflow),
        "--models",
        str(models),
        "--extra-node",
        str(SUPPORT_NODES),
        "--set",
        "KSampler.steps=2",
        *extra,
    ]


def tamper(db: Path, sql: str, *args) -> None:
    """Edit a finished DB's meta.sqlite in place and re-record its size (a crafted DB is consistent on its face)."""
    conn = sqlite3.connect(db / "meta.sqlite")
    conn.execute(sql, args)
    conn.commit()
    conn.close()
    info = json.loads((db / "info.json").read_text())
    info["files"]["meta.sqlite"] = (db / "meta.sqlite").stat().st_size
    (db / "info.json").write_text(json.dumps(info))


def committed_chunks(manifest: Path) -> int:
    """Chunks an unfinished build has committed to its manifest; 0 while the manifest is not readable
    (polled while the build runs in another process)."""
    if not manifest.exists():
        return 0
    try:
        conn = sqlite3.connect(manifest, timeout=1)
        try:
            return conn.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


TINY_RFA = {"width": 64, "depth": 2, "heads": 4}
TINY_I2T = {"width": 32, "depth": 1, "heads": 4, "prefix_len": 4, "max_caption_tokens": 24}


def tiny_stage1(
    tiny_zoo: dict, root: Path, data: Path, *, rfa_steps: int, i2t_steps: int, rfa_log: int, i2t_log: int
) -> dict:
    """The stage-1 chain of the learning proofs on CPU with the tiny zoo: a tiny CLIP tokenizer, ``train rfa`` and
    ``train i2t`` on a prepared ``data`` folder (outputs under ``root``). Returns the RFA training result, the
    config fields every stage shares (``common``) and the stage-2 fields that point at what stage 1 made
    (``stage2``: add resolution, learning rate, dropouts, steps and the output folder)."""
    from xsr_core.testing.tiny_models import train_tiny_clip_tokenizer
    from xsr_core.train.config import I2TTrainConfig, RFATrainConfig
    from xsr_core.train.i2t import train_i2t
    from xsr_core.train.rfa import train_rfa

    clip_tok = root / "cliptok"
    train_tiny_clip_tokenizer(clip_tok)
    common = dict(data=str(data), cpu=True, checkpointing_steps=10_000)
    rfa = train_rfa(
        RFATrainConfig(
            **common,
            output_dir=str(root / "rfa"),
            batch_size=16,
            max_steps=rfa_steps,
            log_steps=rfa_log,
            model=TINY_RFA,
            learning_rate=1e-3,
        )
    )
    rfa_file = root / "rfa" / "final" / "rfa.safetensors"
    train_i2t(
        I2TTrainConfig(
            **common,
            output_dir=str(root / "i2t"),
            batch_size=8,
            max_steps=i2t_steps,
            log_steps=i2t_log,
            rfa=str(rfa_file),
            decoder_dir=str(tiny_zoo["distilgpt2"]),
            pretrained=str(tiny_zoo["diffusers"]),
            clip_tokenizer=str(clip_tok),
            model=TINY_I2T,
            sample_captions=1,
            max_new_tokens=8,
            learning_rate=1e-3,
        )
    )
    stage2 = dict(
        **common,
        batch_size=4,
        rfa=str(rfa_file),
        i2t=str(root / "i2t" / "final" / "i2t.safetensors"),
        pretrained=str(tiny_zoo["diffusers"]),
        clip_tokenizer=str(clip_tok),
        controlnet=str(tiny_zoo["controlnet"]),
    )
    return {"rfa": rfa, "common": common, "stage2": stage2}
