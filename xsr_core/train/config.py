"""Training configuration: dataclasses, YAML/JSON config files and CLI overrides.

Every stage (``rfa``, ``i2t``, ``adapter``) has one config dataclass. The command line
(``transformers.HfArgumentParser``) exposes each field as ``--field value``; a ``--config FILE`` (YAML or
JSON) supplies values first and explicit command-line flags override it. The resolved config is written
beside every checkpoint (``config.json``, and ``config.yaml``) so a run can be reproduced exactly.
Config keys are forever: add fields with defaults, never rename.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..paths import existing_file

if TYPE_CHECKING:
    from transformers import HfArgumentParser


@dataclass
class EngineConfig:
    """Loop options shared by every stage (see :mod:`.engine`)."""

    data: str = ""  # prepared data folder (output of `train prepare`)
    output_dir: str = ""  # run folder: checkpoints, logs, final weights
    seed: int = 0  # global seed (model init, sampling order, dropout)
    batch_size: int = 32  # per-process batch size
    gradient_accumulation_steps: int = 1  # micro-batches per optimiser step
    max_steps: int = 1000  # optimiser steps in total
    learning_rate: float = 1e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    lr_warmup_steps: int = 0  # linear warm-up steps (from 0 to learning_rate)
    lr_schedule: str = "constant"  # after the warm-up: "constant", "cosine" (to 0) or "linear" (to 0)
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    mixed_precision: str = "no"  # accelerate mixed precision: "no", "fp16", "bf16"
    checkpointing_steps: int = 500  # save a resumable checkpoint every N optimiser steps
    checkpoints_total_limit: int = 3  # keep at most this many checkpoints (oldest removed)
    resume_from_checkpoint: str = ""  # "", "latest" or a checkpoint folder
    eval_steps: int = 0  # evaluate every N steps (0 = only at the end)
    log_steps: int = 10  # log losses every N steps
    report_to: str = "none"  # "none" or "tensorboard"
    num_workers: int = 0  # DataLoader worker processes
    cpu: bool = False  # force CPU even when a GPU is present

    def _check_engine(self) -> None:
        if not self.data:
            raise ValueError("--data is required (the folder written by `train prepare`)")
        if not self.output_dir:
            raise ValueError("--output_dir is required")
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpointing_steps", "log_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'linear', got {self.lr_schedule!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no/fp16/bf16, got {self.mixed_precision!r}")
        if self.report_to not in ("none", "tensorboard"):
            raise ValueError(f"report_to must be 'none' or 'tensorboard', got {self.report_to!r}")
        if self.eval_steps < 0 or self.num_workers < 0 or self.lr_warmup_steps < 0:
            raise ValueError("eval_steps, num_workers and lr_warmup_steps must be >= 0")


# --model presets (a name instead of a JSON object of model-config overrides). "paper" = the model classes'
# defaults (DESIGN §2.1/§2.3 sizes); "tiny" = the CPU-trial sizes the tests use. Parameters with ViT-L/14
# tokens (clip_dim 1024), from a meta-device build: RFA paper 52,759,552 (fp32 file ≈ 211 MB), tiny 251,008
# (≈ 1 MB); I2T paper 148,863,744 (≈ 595 MB, of which the distilgpt2 decoder 81,912,576), tiny 82,147,232
# (≈ 329 MB: the decoder is the --decoder_dir GPT-2 either way). See xsr_core/train/README.md.
MODEL_PRESETS: dict[str, dict[str, dict]] = {
    "rfa": {"paper": {}, "tiny": {"width": 64, "depth": 2, "heads": 4}},
    "i2t": {"paper": {}, "tiny": {"width": 32, "depth": 1, "heads": 4, "prefix_len": 4, "max_caption_tokens": 24}},
}


def _resolve_model(stage: str, model: Any) -> dict:
    if isinstance(model, str):
        presets = MODEL_PRESETS[stage]
        if model not in presets:
            raise ValueError(
                f"--model {model!r}: not a preset ({', '.join(presets)}) nor a JSON object of {stage} config fields"
            )
        return dict(presets[model])
    if not isinstance(model, dict):
        raise ValueError(f"model must be a preset name ({', '.join(MODEL_PRESETS[stage])}) or a dict of config fields")
    return model


@dataclass
class RFATrainConfig(EngineConfig):
    """Stage 1a: RFA on cached LR/HR CLIP tokens (L_align), recall@k against the reference DB."""

    model: dict = field(default_factory=dict)  # RFAConfig overrides (clip_dim/num_patches/out_dim come from the data),
    # or a preset name: "paper" (default sizes) / "tiny" (CPU trials); see MODEL_PRESETS
    w_contrastive: float = 0.0  # optional in-batch InfoNCE term weight (0 = the paper's L2 only)
    temperature: float = 0.05  # InfoNCE temperature
    eval_split: str = "test"  # split whose LR queries measure retrieval recall
    recall_k: str = "1,4"  # recall@k values to report

    def __post_init__(self) -> None:
        self._check_engine()
        if self.w_contrastive < 0 or self.temperature <= 0:
            raise ValueError("w_contrastive must be >= 0 and temperature > 0")
        self.model = _resolve_model("rfa", self.model)
        _parse_ks(self.recall_k)


@dataclass
class I2TTrainConfig(EngineConfig):
    """Stage 1b: enhancer (token cosine) + caption decoder (CE + soft CLIP-text path)."""

    rfa: str = ""  # trained RFA weights (rfa.safetensors) used to retrieve the references
    decoder_dir: str = ""  # local distilgpt2-family folder (GPT-2 weights + tokenizer)
    pretrained: str = ""  # SD1.x diffusers folder (its text_encoder/ and tokenizer/ are used, frozen)
    clip_tokenizer: str = ""  # CLIP tokenizer folder when the diffusers folder has none
    num_refs: int = 4  # K references per image
    model: dict = field(default_factory=dict)  # I2TConfig overrides (clip_dim/num_tokens/decoder come from data),
    # or a preset name: "paper" / "tiny"; see MODEL_PRESETS
    w_token: float = 1.0  # weight of the token cosine loss
    w_ce: float = 1.0  # weight of the caption cross-entropy
    w_text: float = 1.0  # weight of the soft CLIP-text cosine (0 disables the soft path)
    tau: float = 1.0  # softmax temperature of the soft path
    gumbel: bool = False  # straight-through Gumbel-softmax in the soft path
    sample_captions: int = 4  # captions printed/logged at each evaluation
    max_new_tokens: int = 32  # caption length cap when decoding for evaluation
    eval_split: str = "test"  # split used for the evaluation metrics

    def __post_init__(self) -> None:
        self._check_engine()
        for name in ("rfa", "decoder_dir", "pretrained"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required for `train i2t`")
        if self.num_refs < 0:
            raise ValueError("num_refs must be >= 0")
        self.model = _resolve_model("i2t", self.model)
        if min(self.w_token, self.w_ce, self.w_text) < 0 or self.tau <= 0:
            raise ValueError("loss weights must be >= 0 and tau > 0")


@dataclass
class AdapterTrainConfig(EngineConfig):
    """Stage 2: AdaIN adapter + ControlNet parts on a frozen SD1.x U-Net (noise-prediction loss)."""

    pretrained: str = ""  # SD1.x base: diffusers folder, or single-file .safetensors (+ pretrained_config)
    pretrained_config: str = ""  # diffusers folder holding the configs (and VAE/text encoder) for a single file
    controlnet: str = ""  # ControlNet to start from: LDM .safetensors or diffusers folder; "" = from the U-Net
    clip_tokenizer: str = ""  # CLIP tokenizer folder when the diffusers folder has none
    i2t: str = ""  # trained I2T weights (i2t.safetensors): produces E for every training image
    rfa: str = ""  # trained RFA weights: retrieves the references the I2T reads
    num_refs: int = 4  # K references per image
    resolution: int = 512  # HR training resolution (prepared data is 512)
    controlnet_train: str = "attention"  # "attention" (attn projections + zero convs; default), "zero_convs", "all",
    # "none", or comma-separated name substrings of the ControlNet parameters to train
    adapter_proj_hidden: int = 256  # AdaINAdapterConfig.proj_hidden
    p_drop_text: float = 0.1  # classifier-free dropout of the text condition (empty prompt)
    p_drop_image: float = 0.1  # classifier-free dropout of the image embedding E (adapter off for that row)
    ema_decay: float = 0.0  # EMA of the trainable weights (0 = off; diffusers EMAModel, warm-up min(d, (1+t)/(10+t)));
    # exported weights are the EMA ones
    gradient_checkpointing: bool = False  # recompute U-Net/ControlNet activations in backward
    noise_offset: float = 0.0  # optional noise offset
    variant: str = "adain"  # "adain": the full model (adapter + ControlNet); "text_only": the paper's Ours_Base
    # (ControlNet + text condition only: no image embedding, no adapter)
    caption_source: str = "blip2"  # stage-2 text condition: "blip2" (prepared captions) or "i2t" (the trained I2T's)

    def __post_init__(self) -> None:
        self._check_engine()
        if self.variant not in ("adain", "text_only"):
            raise ValueError(f"variant must be 'adain' or 'text_only', got {self.variant!r}")
        if self.caption_source not in ("blip2", "i2t"):
            raise ValueError(f"caption_source must be 'blip2' or 'i2t', got {self.caption_source!r}")
        needs = ["pretrained"] + (["i2t", "rfa"] if self.variant == "adain" or self.caption_source == "i2t" else [])
        for name in needs:
            if not getattr(self, name):
                why = (
                    ""
                    if name == "pretrained"
                    else (
                        " (the adain variant needs E from the I2T over RFA references)"
                        if self.variant == "adain"
                        else " (--caption_source i2t)"
                    )
                )
                raise ValueError(f"--{name} is required for `train adapter`{why}")
        for name in ("p_drop_text", "p_drop_image"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.resolution % 64:
            raise ValueError(f"resolution must be a multiple of 64, got {self.resolution}")


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"recall_k must be comma-separated ints, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ValueError(f"recall_k must be positive ints, got {text!r}")
    return ks


# ------------------------------------------------------------------------------- files and CLI


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON config file as a dict."""
    path = existing_file(path, "config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option -> value")
    return data


def write_config(config: Any, folder: str | os.PathLike) -> None:
    """Write ``config.json`` (and ``config.yaml``) of a config dataclass into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(config)
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))
    try:
        import yaml

        (folder / "config.yaml").write_text(yaml.safe_dump(data, sort_keys=True))
    except ImportError:  # pragma: no cover - yaml is optional
        pass


def _json_or_name(text: str) -> Any:
    """A JSON object, or a bare word (a preset name, resolved by the config)."""
    t = text.strip()
    if t.startswith("{"):
        try:
            return json.loads(t)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON object: {e}") from None
    return t


def config_parser(cls: type, **kwargs: Any) -> HfArgumentParser:
    """``transformers.HfArgumentParser`` of ``cls`` (one ``--name`` per field) plus ``--config FILE``."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls, **kwargs)
    parser.add_argument("--config", default=None, help="YAML/JSON file of options; command-line flags override it")
    for action in parser._actions:
        if action.type is dict:  # a JSON object or a preset name (HfArgumentParser would call dict(text))
            action.type = _json_or_name
        if action.help is None:
            action.help = "(default: %(default)r)"
    return parser


def parse_config(cls: type, argv: list[str], **kwargs: Any) -> Any:
    """Resolve the config of ``argv``: dataclass defaults < ``--config`` file < explicit flags."""
    parser = config_parser(cls, **kwargs)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        data = read_config_file(known.config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"config file {known.config}: unknown options {unknown}; known: {sorted(names)}")
        parser.set_defaults(**data)
    return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)[0]
