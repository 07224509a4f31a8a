"""Which encoder a model folder holds: its ``config.json``'s ``model_type`` picks the config
class and the module, BERT's (``bert``, ``roberta``, ``xlm-roberta``) or ModernBERT's."""

from __future__ import annotations

from pathlib import Path

from biencoder.model.bert import Encoder
from biencoder.model.config import EncoderConfig, read_config_json
from biencoder.model.modernbert import ModernBertEncoder, ModernBertEncoderConfig

AnyConfig = EncoderConfig | ModernBertEncoderConfig
AnyEncoder = Encoder | ModernBertEncoder


def read_config(path: str | Path) -> AnyConfig:
    """The encoder config of the ``config.json`` at ``path``; errors name the file."""
    path = Path(path)
    if read_config_json(path).get("model_type") == "modernbert":
        return ModernBertEncoderConfig.from_json(path)
    return EncoderConfig.from_json(path)


def build_encoder(config: AnyConfig) -> AnyEncoder:
    """A freshly initialised encoder of ``config``'s family."""
    if isinstance(config, ModernBertEncoderConfig):
        return ModernBertEncoder(config)
    return Encoder(config)
