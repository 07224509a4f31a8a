"""InfoNCE in plain PyTorch, the dense reference (``impl="naive"``).

:func:`naive_info_nce` writes out every direction's B×N similarity matrix, as
sentence-transformers' losses do; the "torch" and "triton" paths are tested against it.
The options are defined in :mod:`losses.infonce`.
"""

from __future__ import annotations

import math

import torch

from biencoder.kernels.infonce_options import (
    DIAGONAL_EXCLUDED,
    InfoNCEStats,
    check_guide_options,
    check_inputs,
    compute_dtype_of,
    default_doc_owners,
    guide_thresholds,
    loss_terms,
)


def _dense_stats(
    similarities: torch.Tensor,
    false_negatives: torch.Tensor | None,
    dropped: torch.Tensor | None = None,
) -> InfoNCEStats:
    """Ranking statistics from the full B×N similarity matrix (the reference's way);
    ``dropped`` columns (the guide's) leave the competitors but are not counted."""
    batch, num_docs = similarities.shape
    rows = torch.arange(batch, device=similarities.device)
    others = similarities.detach().float().clone()
    others[rows, rows] = -math.inf
    for mask in (false_negatives, dropped):
        if mask is not None:
            others.masked_fill_(mask, -math.inf)
    best_other, best_other_index = others.max(dim=1)
    has_other = best_other > -math.inf
    return InfoNCEStats(
        positive=similarities.detach()[rows, rows].float(),
        best_other=best_other,
        best_other_index=torch.where(has_other, best_other_index, -1),
        false_negatives=(
            false_negatives.sum(dim=1)
            if false_negatives is not None
            else torch.zeros(batch, dtype=torch.int64, device=similarities.device)
        ),
        num_docs=num_docs,
    )


def naive_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    return_stats: bool = False,
    *,
    directions: tuple[str, ...] | None = None,
    partition_mode: str | None = None,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """Reference InfoNCE: every direction's similarity matrix written out densely, as
    sentence-transformers' MultipleNegativesRankingLoss and GISTEmbedLoss build them."""
    terms = loss_terms(
        symmetric,
        directions,
        partition_mode,
        hardness_mode,
        hardness_strength,
        guide_margin,
        guide_margin_strategy,
    )
    check_inputs(q, d, doc_ids, doc_owners, guide_q, guide_d)
    check_guide_options(terms, guide_q)
    batch, num_docs = q.shape[0], d.shape[0]
    compute_dtype = compute_dtype_of(q.dtype)
    owners = doc_owners if doc_owners is not None else default_doc_owners(batch, num_docs, q.device)
    positions = torch.arange(num_docs, device=q.device)
    eye = positions[:batch, None] == positions[None, :]
    # Query i owns its positive and the hard negatives it mined.
    own = eye | ((positions[None, :] >= batch) & (owners[None, :] == positions[:batch, None]))
    ids = doc_ids
    guides = None
    if guide_q is not None:
        thresholds = guide_thresholds(guide_q, guide_d, terms, q.dtype)
        guides = {
            "q": guide_q.to(q.dtype).to(compute_dtype),
            "d": guide_d.to(q.dtype).to(compute_dtype),
        }

    logits_of_terms, stats_masks = [], (None, None)
    for spec in terms.specs():
        rows, cols = spec.rows(q, d), spec.cols(q, d)
        num_cols = cols.shape[0]
        similarities = (rows @ cols.T).to(compute_dtype)
        diagonal = eye[:, :num_cols]
        excluded = torch.zeros_like(diagonal)
        if spec.diagonal == DIAGONAL_EXCLUDED:
            excluded |= diagonal
        if spec.exclude_own:
            excluded |= own[:, :num_cols]
        false_negatives = None
        if ids is not None:
            false_negatives = (ids[:batch, None] == ids[None, :num_cols]) & ~diagonal
            excluded |= false_negatives
        dropped = None
        if guides is not None:
            guide_rows = guides["d"][:batch] if spec.rows_are_docs else guides["q"]
            guide_cols = guides["q"] if spec.cols_are_queries else guides["d"]
            dropped = (guide_rows @ guide_cols.T) > thresholds[:, None]
            if spec.diagonal != DIAGONAL_EXCLUDED:
                dropped &= ~diagonal
            excluded |= dropped
        logits = similarities * scale
        if spec.hardness:
            penalised = {
                "in_batch_negatives": ~own,
                "hard_negatives": own & (positions[None, :] >= batch),
                "all_negatives": ~eye,
            }[terms.hardness_mode]
            logits = logits + terms.hardness_strength * similarities.detach() * penalised
        logits_of_terms.append(logits.masked_fill(excluded, -math.inf))
        if spec.name == "query_to_doc":
            query_similarities, stats_masks = similarities, (false_negatives, dropped)
            positive_logits = logits.diagonal()
    if terms.joint:
        partition = torch.logsumexp(torch.cat(logits_of_terms, dim=1), dim=1)
    else:
        partition = torch.stack([torch.logsumexp(x, dim=1) for x in logits_of_terms]).mean(dim=0)
    loss = (partition - positive_logits).mean()
    if return_stats:
        return loss, _dense_stats(query_similarities, *stats_masks)
    return loss
