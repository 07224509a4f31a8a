"""Pair and triplet losses for bi-encoders, and Matryoshka truncation of any loss.

Embeddings are ``[B, D]`` tensors; similarity scores and labels are ``[B]``. Distances:
``"cosine"`` is 1 − cos(a, b) (in [0, 2], insensitive to the embeddings' norms) and
``"euclidean"`` is ‖a − b‖₂. Every loss returns the mean over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = ("cosine", "euclidean")


def _check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def pair_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    """Distance between the last-dim vectors of ``a`` and ``b`` (broadcast)."""
    _check_distance(distance)
    if distance == "cosine":
        return 1 - F.cosine_similarity(a, b, dim=-1)
    return torch.linalg.vector_norm(a - b, dim=-1)


class TripletLoss(nn.Module):
    """mean relu(dist(a, p) − dist(a, n) + margin) over anchors and their negatives.

    ``negative`` is ``[B, D]`` (one per anchor) or ``[B, K, D]`` (K per anchor; every
    triplet counts once in the mean). The default margin suits the cosine distance; for
    euclidean distances between unnormalised embeddings sentence-transformers uses 5.
    """

    expects_normalized = False

    def __init__(self, margin: float = 0.5, distance: str = "cosine") -> None:
        super().__init__()
        _check_distance(distance)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.distance = distance

    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor
    ) -> torch.Tensor:
        positive_distance = pair_distance(anchor, positive, self.distance)
        if negative.dim() == anchor.dim() + 1:
            negative_distance = pair_distance(anchor.unsqueeze(-2), negative, self.distance)
        else:
            negative_distance = pair_distance(anchor, negative, self.distance).unsqueeze(-1)
        return F.relu(positive_distance.unsqueeze(-1) - negative_distance + self.margin).mean()


class ContrastiveLoss(nn.Module):
    """Hadsell et al. (2006) as in sentence-transformers, for pairs labelled 1 (similar)
    or 0 (dissimilar):

        loss = mean ½·(label·dist² + (1 − label)·relu(margin − dist)²)

    Similar pairs are pulled together, dissimilar ones pushed beyond ``margin``.
    """

    expects_normalized = False

    def __init__(self, margin: float = 0.5, distance: str = "cosine") -> None:
        super().__init__()
        _check_distance(distance)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.distance = distance

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        dist = pair_distance(a, b, self.distance)
        labels = labels.to(dist.dtype)
        losses = labels * dist.pow(2) + (1 - labels) * F.relu(self.margin - dist).pow(2)
        return 0.5 * losses.mean()


class CosineSimilarityLoss(nn.Module):
    """mean (cos(a, b) − score)²: regresses the cosine onto gold scores in [−1, 1]."""

    expects_normalized = False

    def forward(self, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(a, b, dim=-1)
        return F.mse_loss(cosine, scores.to(cosine.dtype))


class CoSENTLoss(nn.Module):
    """CoSENT (Su, 2022): log(1 + Σ_{score_i > score_j} exp(scale·(cos_j − cos_i))).

    Only the ranking of the gold scores matters: every pair ranked the wrong way round by
    the cosines is penalised.
    """

    expects_normalized = False

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cosine = F.cosine_similarity(a, b, dim=-1) * self.scale
        # Entry (i, j) is cos_j − cos_i; only pairs with score_i > score_j enter the sum.
        differences = cosine[None, :] - cosine[:, None]
        ranked = scores[:, None] > scores[None, :]
        differences = differences.masked_fill(~ranked, float("-inf"))
        # The leading 0 is the "1 +" inside the log.
        return torch.logsumexp(torch.cat([differences.new_zeros(1), differences.flatten()]), 0)


class MatryoshkaLoss(nn.Module):
    """Σ_k weights[k] · loss(embeddings truncated to their first dims[k] components).

    Every floating-point argument with at least two dimensions, positional or keyword, is
    treated as embeddings and truncated; other arguments (labels, scores, doc ids, flags)
    pass through unchanged, and so do the keyword arguments the inner loss names in its
    ``not_embeddings`` attribute (a distillation loss's ``[B, K]`` teacher scores).
    Truncated embeddings are L2-normalised again when ``normalize`` is true; by default
    that follows the inner loss's ``expects_normalized`` attribute, which is set on losses
    built on raw dot products (InfoNCE), where truncating a unit vector would shrink its
    logits. Cosine losses are indifferent to the norm and euclidean ones measure it on
    purpose, so they are left untouched.
    """

    def __init__(
        self,
        loss: Callable[..., torch.Tensor],
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        normalize: bool | None = None,
    ) -> None:
        super().__init__()
        if not dims or any(dim < 1 for dim in dims):
            raise ValueError(f"dims must be a non-empty list of positive ints, got {dims}")
        if weights is None:
            weights = [1.0] * len(dims)
        if len(weights) != len(dims):
            raise ValueError(f"{len(weights)} weights for {len(dims)} dims")
        self.loss = loss
        self.dims = list(dims)
        self.weights = list(weights)
        self.normalize = (
            getattr(loss, "expects_normalized", False) if normalize is None else normalize
        )
        self.not_embeddings = frozenset(getattr(loss, "not_embeddings", ()))

    def _truncate(self, value, dim: int):
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2):
            return value
        if dim > value.shape[-1]:
            raise ValueError(f"cannot truncate {value.shape[-1]}-dim embeddings to {dim}")
        truncated = value[..., :dim]
        return F.normalize(truncated, dim=-1) if self.normalize else truncated

    def forward(self, *args, **kwargs):
        """The weighted sum of the truncated losses. An inner loss that returns
        ``(loss, stats)`` (InfoNCE with ``return_stats=True``) gives ``(sum, stats)``, with
        the statistics of the widest truncation."""
        total, widest_stats = None, None
        for dim, weight in zip(self.dims, self.weights, strict=True):
            out = self.loss(
                *(self._truncate(arg, dim) for arg in args),
                **{
                    name: arg if name in self.not_embeddings else self._truncate(arg, dim)
                    for name, arg in kwargs.items()
                },
            )
            if isinstance(out, tuple):
                out, stats = out
                if dim == max(self.dims):
                    widest_stats = stats
            term = weight * out
            total = term if total is None else total + term
        return total if widest_stats is None else (total, widest_stats)
