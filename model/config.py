"""Encoder hyper-parameters, read from a Hugging Face ``config.json``.

RoBERTa and XLM-RoBERTa are BERT but for fairseq's position ids, so one config and one
module serve the three ``model_type``s; :attr:`EncoderConfig.positions_per_text` is where
they differ. ModernBERT has its own (``model.modernbert``), and so do the Llama-style
decoders (``model.llama``); ``model.backbone`` picks one by ``model_type``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "modernbert",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
)
_BERT_TYPES = ("bert", "roberta", "xlm-roberta")
_ROBERTA_TYPES = ("roberta", "xlm-roberta")
# transformers' defaults where they are not BERT's, for a config.json that omits the field: a
# RoBERTa loaded with BERT's pad id 0 would count its positions from the wrong row.
_TYPE_DEFAULTS = {
    "roberta": {"pad_token_id": 1, "vocab_size": 50265},
    "xlm-roberta": {"pad_token_id": 1},
}
_ARCHITECTURES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class EncoderConfig:
    """The fields of an HF BERT, RoBERTa or XLM-RoBERTa ``config.json`` that shape the
    network."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"

    def __post_init__(self) -> None:
        if self.model_type not in _BERT_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not one that EncoderConfig serves "
                f"({', '.join(_BERT_TYPES)}); model.backbone.read_config reads the others"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def tiny(cls, **overrides) -> EncoderConfig:
        """A 2-layer, 32-wide BERT with BERT's vocabulary: trains in milliseconds on a CPU,
        for tests and benchmarks (``model.weights.save_random_bert`` writes one)."""
        shape = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
        return cls(**(shape | overrides))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def positions_per_text(self) -> bool:
        """RoBERTa's position ids: each text's real tokens count from ``pad_token_id + 1``
        whichever side it is padded on, and padding sits at ``pad_token_id``. BERT's count
        from 0 at the left edge of the padded batch."""
        return self.model_type in _ROBERTA_TYPES

    @property
    def max_tokens(self) -> int:
        """The longest input: RoBERTa's position table starts with ``pad_token_id + 1`` rows
        no token uses (514 rows hold 512 tokens)."""
        if self.positions_per_text:
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        """Read the fields we use from ``config.json``; HF-only keys are ignored."""
        path = Path(path)
        raw = read_config_json(path)
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{path}: field 'position_embedding_type': only 'absolute' is supported, "
                f"got {raw['position_embedding_type']!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        model_type = raw.get("model_type")
        defaults = _TYPE_DEFAULTS.get(model_type, {}) if isinstance(model_type, str) else {}
        fields = defaults | raw
        try:
            return cls(**{k: v for k, v in fields.items() if k in names})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_hf_dict(self) -> dict:
        """The ``config.json`` that ``transformers.AutoModel`` reads back."""
        return {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "position_embedding_type": "absolute",
            **dataclasses.asdict(self),
        }


def read_config_json(path: Path) -> dict:
    """The fields of the ``config.json`` at ``path``; errors name the file."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as err:
        # OSError's own message keeps the path out of repr() and out of wrappers that
        # show only its strerror; a one-string error names the file wherever it is shown.
        raise FileNotFoundError(
            f"encoder config {path} does not exist: a model folder needs the "
            "Hugging Face config.json of its encoder"
        ) from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from err
    if raw.get("auto_map"):
        # Such a model (jina-embeddings-v2: model_type "bert", ALiBi in its own code) would
        # load into our BERT without an error and compute something else.
        raise ValueError(
            f"{path}: field 'auto_map': the model runs its own code "
            f"({', '.join(sorted(raw['auto_map']))}), which this encoder does not "
            "implement; only models that transformers runs without custom code load"
        )
    model_type = raw.get("model_type", "bert")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return raw
