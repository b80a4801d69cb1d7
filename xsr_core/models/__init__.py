"""Stage-1 models: RFA (reference-finding aligner) and I2T (embedding enhancer + caption decoder).

Importing this package registers both classes with :mod:`xsr_core.weights`, so
``load_model(path)`` can rebuild either from its file.
"""

from .i2t import I2T, I2TConfig, load_i2t, save_i2t, token_cosine_loss
from .rfa import RFA, RFAConfig, align_loss
from .text_decoder import GPT2PrefixDecoder, SoftCLIPText, build_vocab_map, encode_captions

__all__ = [
    "RFA",
    "RFAConfig",
    "align_loss",
    "I2T",
    "I2TConfig",
    "load_i2t",
    "save_i2t",
    "token_cosine_loss",
    "GPT2PrefixDecoder",
    "SoftCLIPText",
    "build_vocab_map",
    "encode_captions",
]
