"""Pooling heads: token states [B, T, H] and a padding mask [B, T] -> one vector [B, H].

Every head ignores padded positions. Definitions follow sentence-transformers where it
has the same mode, so a model saved with one of those modes embeds identically there.
"""

from __future__ import annotations

import torch
from torch import nn


def _first_real_token(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's first unpadded token: 0 with right padding. [B]"""
    return mask.int().argmax(1)


class CLSPooling(nn.Module):
    """The first real token's state (BERT's [CLS]; also right for left-padded batches)."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, _first_real_token(mask)]


class MeanPooling(nn.Module):
    """Average over real tokens."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class MaxPooling(nn.Module):
    """Element-wise maximum over real tokens."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), float("-inf")).amax(1)


class WeightedMeanPooling(nn.Module):
    """Mean with weight t for the text's t-th token (1-based, counted from the first real
    token): later tokens count more, which suits causal encoders whose late tokens have
    seen more context (SGPT)."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype)
        positions = positions - _first_real_token(mask).unsqueeze(1).to(hidden.dtype)  # [B, T]
        w = (mask.to(hidden.dtype) * positions).unsqueeze(-1)  # [B, T, 1]
        return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


class LastTokenPooling(nn.Module):
    """The last real token's state; works with left or right padding."""

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # argmax returns the first maximum, so on the flipped mask it finds the last 1.
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class AttentionPooling(nn.Module):
    """A learned query attends over the tokens: softmax(h·w / sqrt(H)) weights the states.

    The query starts at zero, so an untrained head is exactly mean pooling and training
    moves it away only as far as the loss asks.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = hidden @ self.query / hidden.shape[-1] ** 0.5  # [B, T]
        scores = scores.masked_fill(~mask.bool(), float("-inf"))
        weights = scores.softmax(dim=1).unsqueeze(-1)  # [B, T, 1]
        return (hidden * weights).sum(1)


POOLING_HEADS: dict[str, type[nn.Module]] = {
    "cls": CLSPooling,
    "mean": MeanPooling,
    "max": MaxPooling,
    "weighted_mean": WeightedMeanPooling,
    "last_token": LastTokenPooling,
    "attention": AttentionPooling,
}


def build_pooling(name: str, hidden_size: int) -> nn.Module:
    """The pooling head called ``name`` (one of ``POOLING_HEADS``)."""
    if name not in POOLING_HEADS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {', '.join(POOLING_HEADS)}")
    head = POOLING_HEADS[name]
    return head(hidden_size) if head is AttentionPooling else head()
