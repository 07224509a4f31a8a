"""Embedding geometry: alignment and uniformity (Wang & Isola, 2020) and embedding norms.

Alignment is the mean distance between the unit embeddings of positive pairs (lower: pairs
closer); uniformity is the log of the mean Gaussian potential between unit embeddings
(lower: spread more evenly over the sphere, 0: all collapsed onto one point). Both
L2-normalise their inputs, so they describe directions only; ``norm_stats`` describes the
raw lengths that normalisation discards. Everything is computed in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a [N, D] matrix, got shape {tuple(x.shape)}")
    return F.normalize(x.detach().to(torch.float64), dim=-1)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2) -> float:
    """Mean of ``||x_i - y_i||_2 ** alpha`` over the rows of ``x`` and ``y`` (positive
    pairs), after L2-normalising every row; 0 when each pair points the same way, at most
    ``2 ** alpha``."""
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) == 0:
        raise ValueError("alignment needs at least one pair")
    distances = (_unit(x) - _unit(y)).norm(dim=-1)
    return distances.pow(alpha).mean().item()


def uniformity(x: torch.Tensor, t: float = 2, max_points: int = 4096, seed: int = 0) -> float:
    """``log mean_{i<j} exp(-t ||x_i - x_j||_2 ** 2)`` over distinct rows of ``x``, after
    L2-normalising every row; between ``-4t`` and 0.

    Cost is quadratic in the rows, so above ``max_points`` rows it is estimated on
    ``max_points`` of them drawn without replacement with a generator seeded by ``seed``:
    the same inputs and seed give the same value.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    if len(x) < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {len(x)}")
    if len(x) > max_points:
        generator = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=generator)[:max_points].to(x.device)]
    squared = torch.pdist(_unit(x)).pow(2)
    # log of a mean of exponentials: logsumexp keeps it finite however small they get.
    return (torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())).item()


def norm_stats(x: torch.Tensor) -> dict[str, float]:
    """Mean, (population) standard deviation, min and max of the rows' L2 norms, for raw
    embeddings taken before any normalisation."""
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] matrix, got {tuple(x.shape)}")
    return norm_summary(x.detach().to(torch.float64).norm(dim=-1))


def norm_summary(norms: torch.Tensor) -> dict[str, float]:
    """``norm_stats`` of embeddings whose row norms ``norms`` are already computed (a corpus
    read shard by shard)."""
    norms = norms.to(torch.float64)
    return {
        "norm_mean": norms.mean().item(),
        "norm_std": norms.std(correction=0).item(),
        "norm_min": norms.min().item(),
        "norm_max": norms.max().item(),
    }


def geometry_metrics(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    norm_embeddings: torch.Tensor | None = None,
    alpha: float = 2,
    t: float = 2,
    max_points: int = 4096,
    seed: int = 0,
) -> dict[str, float]:
    """``alignment`` of the row-aligned positive pairs (``anchors[i]``, ``positives[i]``),
    ``uniformity`` of ``embeddings`` and ``norm_*`` statistics of ``norm_embeddings``
    (``embeddings`` unless given). Pass raw, un-normalised embeddings throughout, or the
    norms say nothing. A metric without its inputs (no positive pairs, fewer than two
    ``embeddings``) is left out rather than reported as NaN."""
    metrics = {}
    if len(anchors) or len(positives):
        metrics["alignment"] = alignment(anchors, positives, alpha)
    if len(embeddings) >= 2:
        metrics["uniformity"] = uniformity(embeddings, t, max_points, seed)
    metrics |= norm_stats(embeddings if norm_embeddings is None else norm_embeddings)
    return metrics
