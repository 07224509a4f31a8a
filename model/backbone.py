"""Which encoder a model folder holds: its ``config.json``'s ``model_type`` picks the config
class and the module, BERT's (``bert``, ``roberta``, ``xlm-roberta``), ModernBERT's, or the
Llama-style decoders' (``llama``, ``mistral``, ``qwen2``, ``qwen3``)."""

from __future__ import annotations

from pathlib import Path

from biencoder.model.bert import Encoder
from biencoder.model.config import EncoderConfig, read_config_json
from biencoder.model.llama import DECODER_TYPES, DecoderConfig, LlamaEncoder
from biencoder.model.modernbert import ModernBertEncoder, ModernBertEncoderConfig

AnyConfig = EncoderConfig | ModernBertEncoderConfig | DecoderConfig
AnyEncoder = Encoder | ModernBertEncoder | LlamaEncoder


def read_config(path: str | Path) -> AnyConfig:
    """The encoder config of the ``config.json`` at ``path``; errors name the file."""
    path = Path(path)
    model_type = read_config_json(path).get("model_type")
    if model_type == "modernbert":
        return ModernBertEncoderConfig.from_json(path)
    if model_type in DECODER_TYPES:
        return DecoderConfig.from_json(path)
    return EncoderConfig.from_json(path)


def build_encoder(config: AnyConfig) -> AnyEncoder:
    """A freshly initialised encoder of ``config``'s family."""
    if isinstance(config, ModernBertEncoderConfig):
        return ModernBertEncoder(config)
    if isinstance(config, DecoderConfig):
        return LlamaEncoder(config)
    return Encoder(config)
