"""Teachers: what scores the lines that mining writes, one float per (query, text) pair,
for distillation losses (a bi-encoder's cosine similarity or a cross-encoder's logit)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from biencoder.model.biencoder import BiEncoder


class Teacher(Protocol):
    """What scores the written lines: one float per (query, text) pair, pairwise."""

    def score(self, queries: list[str], texts: list[str]) -> list[float]: ...


class BiEncoderTeacher:
    """Teacher scores as the dot product of ``model``'s normalised query and text
    embeddings (cosine similarity)."""

    def __init__(self, model: BiEncoder, batch_size: int = 32):
        self.model, self.batch_size = model, batch_size

    def score(self, queries: list[str], texts: list[str]) -> list[float]:
        encode = partial(
            self.model.encode, batch_size=self.batch_size, normalize=True, show_progress=False
        )
        return (encode(queries, kind="query") * encode(texts, kind="doc")).sum(-1).tolist()


class CrossEncoderTeacher:
    """Teacher scores as the relevance logit of a sequence-classification model with one
    label (a cross-encoder), reading (query, text) as a sentence pair truncated to
    ``max_length`` tokens (default: the tokenizer's limit, capped at the model's positions).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        max_length: int | None = None,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"path: {path} classifies into {self.model.config.num_labels} labels; a "
                "teacher needs a cross-encoder with one relevance logit"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        self.max_length = max_length or min(self.tokenizer.model_max_length, positions)
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, queries: list[str], texts: list[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(queries), self.batch_size):
            batch = self.tokenizer(
                queries[start : start + self.batch_size],
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.model.device)
            scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def is_cross_encoder(path: str | Path) -> bool:
    """Whether the model folder at ``path`` holds a sequence-classification model (its
    ``config.json`` names a ``...ForSequenceClassification`` architecture)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no model config: {config_path}")
    return _is_cross_encoder_config(json.loads(config_path.read_text()))


def _is_cross_encoder_config(config: dict) -> bool:
    architectures = config.get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


# What transformers' from_pretrained reads for a cross-encoder (BiEncoder reads fewer: see
# model.weights.WEIGHT_FILES and model.tokenizer.VOCABULARY_FILES).
CROSS_ENCODER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CROSS_ENCODER_VOCABULARIES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)


def check_teacher_folder(path: str | Path, max_length: int | None = None) -> None:
    """Raise ValueError, starting with ``path:`` or ``max_length:`` and naming the file and
    field at fault, where the folder at ``path`` cannot load as a teacher; reads only its
    small JSON files, so that mining refuses it before embedding anything. Refused: no
    ``config.json``, weights or tokenizer vocabulary; custom code (an ``auto_map`` in
    ``config.json`` or ``tokenizer_config.json``, or a cross-encoder architecture that
    transformers lacks), which is never run; a cross-encoder with other than one label;
    ``max_length`` past the model's positions."""
    from biencoder.model.tokenizer import VOCABULARY_FILES
    from biencoder.model.weights import WEIGHT_FILES

    folder = Path(path)
    config_path = folder / "config.json"
    config = _read_json_object(config_path)
    if config is None:
        raise ValueError(
            f"path: {folder} has no config.json; a teacher is a model folder with "
            "config.json, weights and tokenizer files"
        )
    tokenizer_path = folder / "tokenizer_config.json"
    tokenizer_config = _read_json_object(tokenizer_path) or {}
    for file, fields in ((config_path, config), (tokenizer_path, tokenizer_config)):
        if auto_map := fields.get("auto_map"):
            names = ", ".join(map(str, auto_map))
            raise ValueError(
                f"path: {file}: field 'auto_map' ({names}) needs the folder's own Python "
                "code (trust_remote_code), which mining never runs; choose a teacher that "
                "transformers or BiEncoder loads without it"
            )
    cross = _is_cross_encoder_config(config)
    if cross:
        _check_cross_encoder_config(config_path, config)
    weights = CROSS_ENCODER_WEIGHTS if cross else WEIGHT_FILES
    vocabularies = CROSS_ENCODER_VOCABULARIES if cross else VOCABULARY_FILES
    for what, names in (("weights", weights), ("tokenizer vocabulary", vocabularies)):
        if not any((folder / name).is_file() for name in names):
            raise ValueError(f"path: {folder} has no {what}; expected one of {', '.join(names)}")
    positions = config.get("max_position_embeddings")
    if max_length is not None and isinstance(positions, int) and max_length > positions:
        raise ValueError(
            f"max_length: {max_length} tokens exceed the {positions} positions of {config_path} "
            "(field 'max_position_embeddings')"
        )


def _check_cross_encoder_config(config_path: Path, config: dict) -> None:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as KNOWN,
    )

    model_type = config.get("model_type")
    if model_type not in KNOWN:
        raise ValueError(
            f"path: {config_path}: field 'model_type' {model_type!r} is no sequence classifier "
            "that transformers runs without the folder's own code (trust_remote_code), "
            "which mining never runs"
        )
    known = set(KNOWN.values())
    unknown = [name for name in config["architectures"] if name not in known]
    if unknown:
        raise ValueError(
            f"path: {config_path}: field 'architectures' names {', '.join(unknown)}, which "
            "transformers lacks: it needs the folder's own code (trust_remote_code), which "
            "mining never runs"
        )
    # transformers' default when config.json gives neither field.
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    if labels != 1:
        raise ValueError(
            f"path: {config_path}: {labels} labels (field 'id2label' or 'num_labels'); a "
            "teacher needs a cross-encoder with one relevance logit"
        )


def _read_json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, None if there is no such file; ValueError naming the
    file where it holds something else."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"path: {path}: invalid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"path: {path}: expected a JSON object")
    return value
