"""XSR training (DESIGN §2): produce the XSR weights from a user's own images, on one GPU or many.

Stages, each a ``python -m xsr_core.train <stage>`` subcommand and a library function::

    prepare   data.prepare(out, encoder, images=|list_file=, captions=|blip2=, config=PrepareConfig)
    rfa       rfa.train_rfa(RFATrainConfig)          Stage 1a, recall@k vs the raw LR CLS baseline
    i2t       i2t.train_i2t(I2TTrainConfig)          Stage 1b, enhancer + caption decoder
    adapter   adapter.train_adapter(AdapterTrainConfig)  Stage 2, AdaIN adapter + ControlNet
    export    export.export(out_models, rfa=, i2t=, adapter=)  ComfyUI models/ layout

The loop (:mod:`.engine`) runs on accelerate: CPU, one GPU, or ``accelerate launch`` (DDP).
Heavy imports (diffusers, transformers) happen inside the stage modules.
"""

from .config import AdapterTrainConfig, EngineConfig, I2TTrainConfig, RFATrainConfig
from .data import PrepareConfig, PrepareError, prepare

__all__ = [
    "AdapterTrainConfig",
    "EngineConfig",
    "I2TTrainConfig",
    "PrepareConfig",
    "PrepareError",
    "RFATrainConfig",
    "prepare",
]
