"""Encoder hyper-parameters, read from a Hugging Face ``config.json``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("bert",)
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass(frozen=True)
class EncoderConfig:
    """The fields of an HF BERT ``config.json`` that shape the network."""

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
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
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

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        """Read the fields we use from ``config.json``; HF-only keys are ignored."""
        path = Path(path)
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
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"{path}: field 'position_embedding_type': only 'absolute' is supported, "
                f"got {raw['position_embedding_type']!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in raw.items() if k in names})
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def to_hf_dict(self) -> dict:
        """The ``config.json`` that ``transformers.AutoModel`` reads back."""
        return {
            "architectures": ["BertModel"],
            "position_embedding_type": "absolute",
            **dataclasses.asdict(self),
        }
