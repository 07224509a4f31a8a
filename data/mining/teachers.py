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
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)
