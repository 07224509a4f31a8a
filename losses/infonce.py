"""InfoNCE (in-batch negatives + shared hard negatives) in three implementations.

``q`` [B, D] are queries and ``d`` [N, D] documents with N >= B: ``d[i]`` is the positive of
``q[i]`` and ``d[B:]`` are hard negatives shared by every query. With s = 1/temperature,

    loss_i = logsumexp_j(s·q_i·d_j) − s·q_i·d_i,        loss = mean_i loss_i

``symmetric=True`` averages in the document→query loss over the B positives (the same as
``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``).

Directions and partitions (sentence-transformers' MultipleNegativesRankingLoss): every
direction ranks the B rows of one kind against a column set, and ``directions`` picks
which enter row i's softmax (query_to_doc always does; it holds the positive):

* ``query_to_doc``: q_i against every document d_j (the positive at j = i);
* ``query_to_query``: q_i against every other query q_j, j != i;
* ``doc_to_query``: the positive d_i against every query q_j (its own query at j = i);
* ``doc_to_doc``: the positive d_i against every document not owned by query i (neither
  itself nor query i's hard negatives).

``partition_mode="joint"`` takes one logsumexp over all selected terms of row i (GTE's
improved contrastive loss with all four); ``"per_direction"`` averages the per-direction
logsumexps and is only defined for query_to_doc and doc_to_query, whose candidates contain
the positive. Either way loss_i = partition_i − s·q_i·d_i.

Ownership of documents: ``doc_owners`` [N] int64 names the query that mined each hard
negative (−1: none); entries j < B are not read, positive j belongs to query j. By default
query i owns d[B + i·K : B + (i+1)·K] when K = (N − B)/B is an integer (K negatives per
query laid out row-major), otherwise no query owns a hard negative. Ownership decides
doc_to_doc's exclusions and the hardness modes' "own" documents.

False negatives by ``doc_ids`` [N] (equal ids = equal texts): every row and column carries
an id, a document its own, a query the id of its positive (q_i and d_i share doc_ids[i]).
In every direction a column j != i whose id equals row i's id leaves row i's softmax: in
query_to_doc and doc_to_doc, the documents with d_i's text; in query_to_query and
doc_to_query, the queries whose positive has d_i's text. The positive (j = i in
query_to_doc and doc_to_query) is never masked.

Guide-model filter (GISTEmbed): with ``guide_q`` [B, G] and ``guide_d`` [N, G], embeddings
of the same texts by a frozen guide model, a candidate c of row i in any direction leaves
row i's softmax when the guide scores the pair (row i, c) above t_i, where g_i is the
guide's score of (q_i, d_i) and t_i = g_i − margin ("absolute") or g_i − |g_i|·margin
("relative"). The positive pair (the diagonal of query_to_doc and doc_to_query) is never
dropped. Guide scores are dot products of the guide embeddings rounded to the inputs'
dtype, accumulated in fp32; guides receive no gradient.

Hardness weighting (Lan et al. 2025; EmbeddingGemma): ``hardness_mode`` adds
α·stop_grad(q_i·d_j) (α = ``hardness_strength``, not divided by the temperature) to the
query_to_doc logits of the selected negatives: "in_batch_negatives" the documents not
owned by query i, "hard_negatives" query i's own hard negatives, "all_negatives" every
document but the positive. The term changes the softmax weights but passes no gradient to
q, d or the temperature.

The similarities are plain dot products: pass L2-normalised embeddings for cosine logits.

Implementations (``impl``):

* ``"triton"``: the fused kernel of :mod:`kernels.infonce` (CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1``); memory O(B + N) beyond inputs and gradients.
* ``"torch"``: plain PyTorch over column chunks with an online logsumexp and a backward
  that recomputes each chunk; the rows are blocked by the same chunk_size, so memory is
  one chunk_size × chunk_size tile, at most O(B·chunk_size). The CPU default.
* ``"naive"``: the dense B×N similarity matrices of every direction; memory O(B·N). The
  reference.
* ``"auto"``: ``"triton"`` for CUDA tensors, ``"torch"`` otherwise.

All three return the mean loss in at least fp32 (fp16/bf16 inputs are accumulated in
fp32) and pass gradients to q, d and, when it is a tensor, the temperature.

With ``return_stats=True`` each also returns :class:`InfoNCEStats`, per-query ranking
statistics of the query→document direction taken from the same pass as the loss: O(B)
memory in the "torch" and "triton" paths, and the same loss and gradients as without them.

The "torch" and "triton" paths (so "auto") run as the custom operator
``torch.ops.biencoder.info_nce``, whose backward is ``torch.ops.biencoder.info_nce_backward``:
``torch.compile(fullgraph=True)`` traces a function calling :func:`info_nce` and its
backward without a graph break. Both ops are registered when this module is imported.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

IMPLEMENTATIONS = ("auto", "triton", "torch", "naive")
# The fused kernel's backward strategies (kernels.infonce.infonce_backward).
FUSED_BACKWARDS = ("gemm", "recompute")


@dataclass(frozen=True)
class InfoNCEStats:
    """Per-query ranking statistics of the query→document direction, O(B).

    "Other" columns of row i are the columns j != i that are neither false negatives of q_i
    nor dropped by the guide model, i.e. the competitors in row i's query→document softmax.
    All tensors are detached and live on the inputs' device.
    """

    positive: torch.Tensor
    """[B] fp32: q_i·d_i, the unscaled similarity (not divided by the temperature)."""
    best_other: torch.Tensor
    """[B] fp32: the largest q_i·d_j over the other columns j; −inf when row i has none."""
    best_other_index: torch.Tensor
    """[B] int64: the column j of ``best_other`` (the first one on ties); −1 when none."""
    false_negatives: torch.Tensor
    """[B] int64: columns j != i with doc_ids[j] == doc_ids[i] (all 0 without doc_ids)."""
    num_docs: int
    """N, the number of columns."""
    num_positives: int | None = None
    """How many leading columns are positives (B); None = one per row. Set where the rows
    are a part of a larger batch whose columns were gathered (training on several ranks)."""

    def with_columns(self, columns: torch.Tensor, num_positives: int) -> InfoNCEStats:
        """These statistics with ``best_other_index`` mapped through ``columns`` (column j
        of the loss was column ``columns[j]`` of the batch) and ``num_positives`` set."""
        found = self.best_other_index >= 0
        index = torch.where(
            found, columns.to(self.best_other_index.device)[self.best_other_index.clamp_min(0)], -1
        )
        return dataclasses.replace(self, best_other_index=index, num_positives=num_positives)

    def summary(self) -> dict[str, float]:
        """Batch means as plain floats, with one host synchronisation.

        * ``accuracy``: fraction of rows whose positive beats every other column strictly.
          A tie counts as wrong (the positive is not ranked first unambiguously); a row with
          no other column counts as right.
        * ``margin``: mean of positive − best_other over the rows that have another column;
          omitted when no row has one.
        * ``false_negative_fraction``: masked false negatives among the B·(N−1) off-diagonal
          pairs; 0.0 when N == 1.
        * ``hardest_negative_mined_fraction``: among the rows that have another column, the
          fraction whose hardest competitor is a mined hard negative (column >= B) rather
          than another query's positive; omitted when N == B or no row has another column.
        """
        batch = self.positive.shape[0]
        positives = batch if self.num_positives is None else self.num_positives
        has_other = self.best_other_index >= 0
        beats_others = (self.positive > self.best_other) | ~has_other
        margins = torch.where(has_other, self.positive - self.best_other, 0.0)
        mined = has_other & (self.best_other_index >= positives)
        accuracy, margin_sum, rows_with_other, false_negatives, mined_rows = torch.stack(
            [
                beats_others.double().mean(),
                margins.double().sum(),
                has_other.double().sum(),
                self.false_negatives.double().sum(),
                mined.double().sum(),
            ]
        ).tolist()
        pairs = batch * (self.num_docs - 1)
        summary = {
            "accuracy": accuracy,
            "false_negative_fraction": false_negatives / pairs if pairs else 0.0,
        }
        if rows_with_other:
            summary["margin"] = margin_sum / rows_with_other
            if self.num_docs > positives:
                summary["hardest_negative_mined_fraction"] = mined_rows / rows_with_other
        return summary


DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
GUIDE_MARGIN_STRATEGIES = ("absolute", "relative")

# What a direction does with its diagonal j = i: the positive pair and the softmax target
# (query_to_doc; doc_to_query per direction), the positive pair without a target
# (doc_to_query in a joint partition, whose target is query_to_doc's), or a row against
# itself (query_to_query, doc_to_doc), which is no candidate. The kernels take these codes.
DIAGONAL_TARGET, DIAGONAL_KEPT, DIAGONAL_EXCLUDED = 0, 1, 2
HARDNESS_CODES = {mode: code for code, mode in enumerate(HARDNESS_MODES)}


@dataclass(frozen=True)
class Direction:
    """One direction as the implementations see it: B row vectors (q, or the positives
    d[:B]) against a column set (q or d) under an exclusion rule."""

    name: str
    rows_are_docs: bool
    cols_are_queries: bool
    diagonal: int
    exclude_own: bool
    hardness: int = 0

    @property
    def uses_owners(self) -> bool:
        """Whether the exclusions or the hardness selection read the document owners."""
        return self.exclude_own or self.hardness in (
            HARDNESS_CODES["in_batch_negatives"],
            HARDNESS_CODES["hard_negatives"],
        )

    def rows(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return d[: q.shape[0]] if self.rows_are_docs else q

    def cols(self, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return q if self.cols_are_queries else d


@dataclass(frozen=True)
class LossTerms:
    """The validated loss configuration (see the module docstring); build it with
    :func:`loss_terms`. ``directions`` are in :data:`DIRECTIONS` order."""

    directions: tuple[str, ...] = ("query_to_doc",)
    joint: bool = True
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    guide_margin: float = 0.0
    guide_relative: bool = False

    @property
    def num_lse(self) -> int:
        """Rows of the saved logsumexps: one joint partition, or one per direction."""
        return 1 if self.joint else len(self.directions)

    @property
    def hardness_code(self) -> int:
        """The kernels' code of the hardness mode; 0 (none) when α = 0 changes nothing."""
        return HARDNESS_CODES[self.hardness_mode] if self.hardness_strength > 0 else 0

    @property
    def needs_owners(self) -> bool:
        return any(spec.uses_owners for spec in self.specs())

    def specs(self) -> tuple[Direction, ...]:
        """The directions as row/column problems, query_to_doc first."""
        target_of_doc_to_query = DIAGONAL_KEPT if self.joint else DIAGONAL_TARGET
        every = {
            "query_to_doc": Direction(
                "query_to_doc", False, False, DIAGONAL_TARGET, False, self.hardness_code
            ),
            "query_to_query": Direction("query_to_query", False, True, DIAGONAL_EXCLUDED, False),
            "doc_to_query": Direction("doc_to_query", True, True, target_of_doc_to_query, False),
            "doc_to_doc": Direction("doc_to_doc", True, False, DIAGONAL_EXCLUDED, True),
        }
        return tuple(every[name] for name in self.directions)

    def op_args(self) -> tuple[str, bool, str, float, float, bool]:
        """The fields as the custom op's schema takes them (no None, no tuples)."""
        return (
            ",".join(self.directions),
            self.joint,
            self.hardness_mode or "",
            float(self.hardness_strength),
            float(self.guide_margin),
            self.guide_relative,
        )

    @classmethod
    def from_op_args(cls, directions, joint, hardness_mode, hardness_strength, margin, relative):
        return cls(
            tuple(directions.split(",")),
            joint,
            hardness_mode or None,
            hardness_strength,
            margin,
            relative,
        )


PLAIN = LossTerms()
SYMMETRIC = LossTerms(("query_to_doc", "doc_to_query"), joint=False)


def loss_terms(
    symmetric: bool = False,
    directions: tuple[str, ...] | list[str] | None = None,
    partition_mode: str | None = None,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
) -> LossTerms:
    """Validates the loss options and returns them as :class:`LossTerms`; raises ValueError
    with the reason for an invalid combination.

    ``symmetric=True`` is ``directions=("query_to_doc", "doc_to_query")`` with
    ``partition_mode="per_direction"`` and excludes passing either. ``directions=None`` is
    ``("query_to_doc",)``; ``partition_mode=None`` is ``"joint"``, sentence-transformers'
    default.
    """
    if symmetric:
        if directions is not None or partition_mode not in (None, "per_direction"):
            raise ValueError(
                "symmetric=True means directions=('query_to_doc', 'doc_to_query') with "
                "partition_mode='per_direction': pass either symmetric or directions"
            )
        directions, partition_mode = SYMMETRIC.directions, "per_direction"
    directions = tuple(directions) if directions is not None else ("query_to_doc",)
    unknown = set(directions) - set(DIRECTIONS)
    if unknown:
        raise ValueError(f"unknown directions {sorted(unknown)}; choose from {DIRECTIONS}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions repeat an entry: {directions}")
    if "query_to_doc" not in directions:
        raise ValueError("directions must contain 'query_to_doc' (it holds the positive pair)")
    partition_mode = partition_mode or "joint"
    if partition_mode not in PARTITION_MODES:
        raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {partition_mode!r}")
    same_kind = set(directions) & {"query_to_query", "doc_to_doc"}
    if partition_mode == "per_direction" and same_kind:
        raise ValueError(
            f"partition_mode='per_direction' needs every direction's candidates to contain the "
            f"positive pair, which {sorted(same_kind)} never do; use partition_mode='joint'"
        )
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if not (hardness_strength >= 0 and math.isfinite(hardness_strength)):
        raise ValueError(f"hardness_strength must be finite and >= 0, got {hardness_strength}")
    if hardness_mode is None and hardness_strength != 0:
        raise ValueError("hardness_strength has no effect without a hardness_mode")
    if guide_margin_strategy not in GUIDE_MARGIN_STRATEGIES:
        raise ValueError(
            f"guide_margin_strategy must be one of {GUIDE_MARGIN_STRATEGIES}, "
            f"got {guide_margin_strategy!r}"
        )
    if not math.isfinite(guide_margin):
        raise ValueError(f"guide_margin must be finite, got {guide_margin}")
    ordered = tuple(name for name in DIRECTIONS if name in directions)
    return LossTerms(
        ordered,
        joint=partition_mode == "joint" or len(ordered) == 1,
        hardness_mode=hardness_mode,
        hardness_strength=float(hardness_strength) if hardness_mode is not None else 0.0,
        guide_margin=float(guide_margin),
        guide_relative=guide_margin_strategy == "relative",
    )


def check_inputs(
    q: torch.Tensor,
    d: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
) -> None:
    """Raises ValueError unless q [B, D], d [N, D] with N >= B, doc_ids [N], doc_owners
    [N] and guide_q [B, G], guide_d [N, G] (both or neither) fit."""
    if q.dim() != 2 or d.dim() != 2:
        raise ValueError(f"q and d must be 2-D, got {tuple(q.shape)} and {tuple(d.shape)}")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"q and d must share the embedding dim, got {q.shape[1]} != {d.shape[1]}")
    batch, num_docs = q.shape[0], d.shape[0]
    if num_docs < batch:
        raise ValueError(f"d needs one positive per query: N={num_docs} < B={batch}")
    if doc_ids is not None and doc_ids.shape != (num_docs,):
        raise ValueError(f"doc_ids must have shape ({num_docs},), got {tuple(doc_ids.shape)}")
    if doc_owners is not None:
        if doc_owners.shape != (num_docs,):
            raise ValueError(
                f"doc_owners must have shape ({num_docs},), got {tuple(doc_owners.shape)}"
            )
        if doc_owners.dtype.is_floating_point or doc_owners.dtype == torch.bool:
            raise ValueError(f"doc_owners must be an integer tensor, got {doc_owners.dtype}")
    if (guide_q is None) != (guide_d is None):
        raise ValueError("the guide filter needs both guide_q and guide_d")
    if guide_q is not None:
        if guide_q.dim() != 2 or guide_q.shape[0] != batch:
            raise ValueError(f"guide_q must be [{batch}, G], got {tuple(guide_q.shape)}")
        if guide_d.shape != (num_docs, guide_q.shape[1]):
            raise ValueError(
                f"guide_d must be [{num_docs}, {guide_q.shape[1]}], got {tuple(guide_d.shape)}"
            )


def default_doc_owners(batch: int, num_docs: int, device: torch.device) -> torch.Tensor:
    """[N] int64: j for the positives, and for K = (N − B)/B hard negatives per query laid
    out row-major the owner (j − B) // K; −1 for every hard negative when N − B is not a
    multiple of B."""
    owners = torch.full((num_docs,), -1, dtype=torch.int64, device=device)
    owners[:batch] = torch.arange(batch, device=device)
    negatives = num_docs - batch
    if negatives and negatives % batch == 0:
        owners[batch:] = torch.arange(negatives, device=device) // (negatives // batch)
    return owners


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 logits lose the small differences the softmax is made of; fp64 stays fp64 so
    # that gradcheck sees exact arithmetic.
    return torch.promote_types(dtype, torch.float32)


def guide_thresholds(
    guide_q: torch.Tensor, guide_d: torch.Tensor, terms: LossTerms, dtype: torch.dtype
) -> torch.Tensor:
    """[B] in ``dtype``'s compute dtype: t_i, above which the guide drops a candidate of
    row i (the guides rounded to ``dtype`` first, as every guide score is)."""
    compute_dtype = _compute_dtype(dtype)
    batch = guide_q.shape[0]
    guide_positive = guide_q.to(dtype).to(compute_dtype) * guide_d[:batch].to(dtype).to(
        compute_dtype
    )
    positive = guide_positive.sum(dim=1)
    margin = positive.abs() * terms.guide_margin if terms.guide_relative else terms.guide_margin
    return positive - margin


def _false_negatives(
    doc_ids: torch.Tensor, rows: slice, col_start: int, col_stop: int
) -> torch.Tensor:
    """Mask of the (i, j) in rows × [col_start, col_stop), j != i, that share a doc id."""
    same_doc = doc_ids[rows, None] == doc_ids[None, col_start:col_stop]
    # Tile element (a, b) is (rows.start + a, col_start + b): i == j on this diagonal.
    same_doc.diagonal(offset=rows.start - col_start).fill_(False)
    return same_doc


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
    _check_guide_options(terms, guide_q)
    batch, num_docs = q.shape[0], d.shape[0]
    compute_dtype = _compute_dtype(q.dtype)
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


def _check_guide_options(terms: LossTerms, guide_q: torch.Tensor | None) -> None:
    if guide_q is None and (terms.guide_margin != 0 or terms.guide_relative):
        raise ValueError("guide_margin and guide_margin_strategy need guide_q and guide_d")


def _tile_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    # A contiguous prefix of one flat buffer, so every tile (the narrower edge tiles too)
    # reuses the same memory instead of page-faulting a fresh allocation per tile.
    return buffer[: rows * cols].view(rows, cols)


def _column_chunks(docs: torch.Tensor, scale: torch.Tensor, chunk_size: int):
    """(col_start, col_stop, scale·docs[col_start:col_stop]) per chunk of document rows."""
    for col_start in range(0, docs.shape[0], chunk_size):
        col_stop = min(col_start + chunk_size, docs.shape[0])
        yield col_start, col_stop, docs[col_start:col_stop] * scale


def _row_chunks(num_rows: int, chunk_size: int):
    for row_start in range(0, num_rows, chunk_size):
        yield slice(row_start, min(row_start + chunk_size, num_rows))


@dataclass(frozen=True)
class _ChunkedTerm:
    """One direction of the chunked path: its rows and columns in the compute dtype and
    what decides, per tile, which logits leave the softmax and which get the hardness."""

    spec: Direction
    rows: torch.Tensor
    cols: torch.Tensor
    doc_ids: torch.Tensor | None
    owners: torch.Tensor | None
    guide_rows: torch.Tensor | None
    guide_cols: torch.Tensor | None
    thresholds: torch.Tensor | None
    hardness_strength: float

    @classmethod
    def build(cls, spec, queries, docs, doc_ids, owners, guides, thresholds, terms):
        guide_rows = guide_cols = None
        if guides is not None:
            guide_rows = spec.rows(*guides)
            guide_cols = spec.cols(*guides)
        return cls(
            spec,
            spec.rows(queries, docs),
            spec.cols(queries, docs),
            doc_ids,
            owners,
            guide_rows,
            guide_cols,
            thresholds,
            terms.hardness_strength,
        )

    def _positions(self, rows: slice, col_start: int, col_stop: int):
        device = self.rows.device
        row_index = torch.arange(rows.start, rows.stop, device=device)[:, None]
        col_index = torch.arange(col_start, col_stop, device=device)[None, :]
        return row_index, col_index

    def _mined_by_row(self, rows: slice, col_start: int, col_stop: int) -> torch.Tensor:
        row_index, col_index = self._positions(rows, col_start, col_stop)
        batch = self.rows.shape[0]
        return (col_index >= batch) & (self.owners[None, col_start:col_stop] == row_index)

    def excluded(self, rows: slice, col_start: int, col_stop: int) -> torch.Tensor | None:
        """Bool tile of the logits that leave the softmax, or None when none do."""
        excluded = None
        if self.doc_ids is not None:
            excluded = _false_negatives(self.doc_ids, rows, col_start, col_stop)
        spec = self.spec
        extra = []
        if spec.diagonal == DIAGONAL_EXCLUDED:
            row_index, col_index = self._positions(rows, col_start, col_stop)
            extra.append(row_index == col_index)
        if spec.exclude_own:
            extra.append(self._mined_by_row(rows, col_start, col_stop))
        if self.guide_rows is not None:
            guide_scores = self.guide_rows[rows] @ self.guide_cols[col_start:col_stop].T
            dropped = guide_scores > self.thresholds[rows, None]
            if spec.diagonal != DIAGONAL_EXCLUDED:
                dropped.diagonal(offset=rows.start - col_start).fill_(False)
            extra.append(dropped)
        for mask in extra:
            excluded = mask if excluded is None else excluded | mask
        return excluded

    def add_hardness_(
        self, logits: torch.Tensor, scale: torch.Tensor, rows: slice, col_start: int, col_stop: int
    ) -> None:
        """logits += α·q·d on the penalised columns, in place: with logits = s·q·d that is
        logits·(α/s) added where selected, so no second product is needed."""
        code = self.spec.hardness
        if not code:
            return
        row_index, col_index = self._positions(rows, col_start, col_stop)
        not_positive = row_index != col_index
        if code == HARDNESS_CODES["all_negatives"]:
            selected = not_positive
        else:
            mined = self._mined_by_row(rows, col_start, col_stop)
            selected = mined if code == HARDNESS_CODES["hard_negatives"] else not_positive & ~mined
        # where, not a product with the mask: excluded logits are −inf and −inf·0 is nan.
        logits.add_(torch.where(selected, logits, 0.0) * (self.hardness_strength / scale))


class _TileStats:
    """Running ranking statistics of the q→d rows, updated from each scaled logit tile.

    O(B) state (plus an O(N) count of the doc ids): each tile is read in place, its diagonal
    set to −inf for the max over the other columns and restored bit for bit before the
    logsumexp reads the tile.
    """

    def __init__(
        self, queries: torch.Tensor, scale: torch.Tensor, doc_ids: torch.Tensor | None
    ) -> None:
        batch = queries.shape[0]
        self.scale = scale
        self.positive = queries.new_empty(batch)
        self.best_other = queries.new_full((batch,), -math.inf)
        self.best_other_index = torch.full((batch,), -1, dtype=torch.int64, device=queries.device)
        # Counted from the ids rather than from the tiles: a bool row sum per tile costs
        # about as much as the tile's matmul on a CPU.
        if doc_ids is None:
            self.false_negatives = torch.zeros_like(self.best_other_index)
        else:
            _, inverse, counts = torch.unique(doc_ids, return_inverse=True, return_counts=True)
            self.false_negatives = counts[inverse[:batch]] - 1

    def update(self, logits: torch.Tensor, rows: slice, col_start: int) -> None:
        """Folds in one tile of logits with false negatives at −inf, rows × [col_start, …)."""
        first, last = max(rows.start, col_start), min(rows.stop, col_start + logits.shape[1])
        diagonal = logits.diagonal(offset=rows.start - col_start)
        if first < last:
            self.positive[first:last] = diagonal
            diagonal.fill_(-math.inf)
        tile_best, tile_index = logits.max(dim=1)
        if first < last:
            diagonal.copy_(self.positive[first:last])
        # Strictly greater: a later tile only wins with a larger value, so ties keep the
        # first column, and a row whose tiles are all −inf keeps index −1.
        best, index = self.best_other[rows], self.best_other_index[rows]
        improved = tile_best > best
        best.copy_(torch.where(improved, tile_best, best))
        index.copy_(torch.where(improved, tile_index + col_start, index))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensor fields of :class:`InfoNCEStats`, in order (autograd outputs)."""
        # The tiles hold s·q·d; dividing by the same s keeps the order of the values.
        return (
            (self.positive / self.scale).float(),
            (self.best_other / self.scale).float(),
            self.best_other_index,
            self.false_negatives,
        )


def _chunked_logsumexp(
    term: _ChunkedTerm,
    scale: torch.Tensor,
    chunk_size: int,
    buffer: torch.Tensor,
    stats: _TileStats | None = None,
) -> torch.Tensor:
    """Row logsumexp of one direction's logits (exclusions left out), tile by tile.

    ``stats``, when given, is updated from the same tiles (before the hardness term) before
    their logsumexp.
    """
    rows_all = term.rows
    lse = rows_all.new_full((rows_all.shape[0],), -math.inf)
    for col_start, col_stop, scaled_cols in _column_chunks(term.cols, scale, chunk_size):
        for rows in _row_chunks(rows_all.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            logits = torch.mm(rows_all[rows], scaled_cols.T, out=tile)
            excluded = term.excluded(rows, col_start, col_stop)
            if excluded is not None:
                logits.masked_fill_(excluded, -math.inf)
            if stats is not None:
                stats.update(logits, rows, col_start)
            term.add_hardness_(logits, scale, rows, col_start, col_stop)
            # Clamped so that a row whose whole tile is excluded gives exp(−inf) = 0, not nan.
            tile_max = logits.amax(dim=1, keepdim=True).clamp_min_(torch.finfo(logits.dtype).min)
            tile_lse = logits.sub_(tile_max).exp_().sum(dim=1).log_().add_(tile_max[:, 0])
            lse[rows] = torch.logaddexp(lse[rows], tile_lse)
    return lse


def _chunked_softmax_products(
    term: _ChunkedTerm,
    scale: torch.Tensor,
    lse: torch.Tensor,
    chunk_size: int,
    buffer: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P @ cols, Pᵀ @ rows) for the softmax rows P = exp(logits − lse), recomputing P
    tile by tile."""
    rows_all, cols_all = term.rows, term.cols
    p_cols = torch.zeros_like(rows_all)
    pt_rows = torch.zeros_like(cols_all)
    for col_start, col_stop, scaled_cols in _column_chunks(cols_all, scale, chunk_size):
        for rows in _row_chunks(rows_all.shape[0], chunk_size):
            tile = _tile_view(buffer, rows.stop - rows.start, col_stop - col_start)
            probs = torch.mm(rows_all[rows], scaled_cols.T, out=tile)
            term.add_hardness_(probs, scale, rows, col_start, col_stop)
            probs.sub_(lse[rows, None]).exp_()
            excluded = term.excluded(rows, col_start, col_stop)
            if excluded is not None:
                probs.masked_fill_(excluded, 0.0)
            p_cols[rows].addmm_(probs, cols_all[col_start:col_stop])
            pt_rows[col_start:col_stop].addmm_(probs.T, rows_all[rows])
    return p_cols, pt_rows


def _tile_buffer(queries: torch.Tensor, docs: torch.Tensor, chunk_size: int) -> torch.Tensor:
    rows = min(chunk_size, queries.shape[0])
    return queries.new_empty(rows * min(chunk_size, docs.shape[0]))


def _chunked_terms(q, d, doc_ids, doc_owners, guide_q, guide_d, terms):
    """(queries, docs, [_ChunkedTerm per direction]) in the compute dtype."""
    compute_dtype = _compute_dtype(q.dtype)
    queries, docs = q.to(compute_dtype), d.to(compute_dtype)
    guides = thresholds = None
    if guide_q is not None:
        guides = (guide_q.to(q.dtype).to(compute_dtype), guide_d.to(q.dtype).to(compute_dtype))
        thresholds = guide_thresholds(guide_q, guide_d, terms, q.dtype)
    chunked = [
        _ChunkedTerm.build(spec, queries, docs, doc_ids, doc_owners, guides, thresholds, terms)
        for spec in terms.specs()
    ]
    return queries, docs, chunked


def _combine_lse(
    term_lse: list[torch.Tensor], positive_logits: torch.Tensor, terms: LossTerms
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse [num_lse, B]) from each direction's row logsumexp and the positive logits:
    a joint partition is the logaddexp of the directions', per_direction their mean."""
    if len(term_lse) == 1:
        lse = term_lse[0][None]
        return (lse[0] - positive_logits).mean(), lse
    stacked = torch.stack(term_lse)
    if terms.joint:
        lse = torch.logsumexp(stacked, dim=0)
        return (lse - positive_logits).mean(), lse[None]
    loss = sum((row_lse - positive_logits).mean() for row_lse in term_lse) / len(term_lse)
    return loss, stacked


def _chunked_forward(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    terms: LossTerms,
    chunk_size: int,
    return_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(loss, lse [num_lse, B], stats tensors) of the chunked path."""
    queries, docs, chunked = _chunked_terms(q, d, doc_ids, doc_owners, guide_q, guide_d, terms)
    scale = scale.to(queries.dtype)
    batch = queries.shape[0]
    # Before the tile buffer exists, so that this B×D temporary does not add to the peak.
    positive_logits = (queries * docs[:batch]).sum(dim=1) * scale
    buffer = _tile_buffer(queries, docs, chunk_size)
    stats = _TileStats(queries, scale, doc_ids) if return_stats else None
    term_lse = [
        _chunked_logsumexp(term, scale, chunk_size, buffer, stats if index == 0 else None)
        for index, term in enumerate(chunked)
    ]
    loss, lse = _combine_lse(term_lse, positive_logits, terms)
    return loss, lse, stats.tensors() if stats is not None else None


def _chunked_backward(
    grad_loss: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    lse: torch.Tensor,
    terms: LossTerms,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dscale) of the chunked path, recomputing each logit tile once per direction.

    Every row has the same upstream weight w = G/B (divided by the number of directions
    per_direction), so dlogits = w·(P − onehot) and the onehot and the weight are applied
    to the B×D products (P @ cols − cols[:B]) instead of to each tile. ∂/∂s =
    Σ dlogits·(rows·colsᵀ) = ⟨rows, dlogits @ cols⟩ reuses the same product; the hardness
    term is a stop-gradient, so it enters only through P.
    """
    queries, docs, chunked = _chunked_terms(q, d, doc_ids, doc_owners, guide_q, guide_d, terms)
    compute_dtype = queries.dtype
    scale = scale.to(compute_dtype)
    batch = queries.shape[0]
    weight = grad_loss.to(compute_dtype) / (batch * (1 if terms.joint else len(chunked)))
    buffer = _tile_buffer(queries, docs, chunk_size)

    dq = dd = dscale = None
    for index, term in enumerate(chunked):
        spec = term.spec
        term_lse = lse[0 if terms.joint else index]
        d_rows, d_cols = _chunked_softmax_products(term, scale, term_lse, chunk_size, buffer)
        if spec.diagonal == DIAGONAL_TARGET:
            d_rows.sub_(term.cols[:batch])
            d_cols[:batch] -= term.rows
        term_dscale = torch.dot(term.rows.flatten(), d_rows.flatten())
        if dq is None:
            # query_to_doc comes first: its products are the gradients' first terms.
            dq, dd, dscale = d_rows, d_cols, term_dscale
            continue
        dscale = dscale + term_dscale
        (dd[:batch] if spec.rows_are_docs else dq).add_(d_rows)
        (dq if spec.cols_are_queries else dd).add_(d_cols)
    return dq.mul_(weight * scale).to(q.dtype), dd.mul_(weight * scale).to(d.dtype), dscale * weight


# ------------------------------------------------------------------------------------------
# The loss as a custom operator, so that torch.compile sees one node with known output
# shapes (the fake) and a known backward (itself an op, so AOTAutograd traces it), instead
# of tracing into the implementations: their chunk loops would unroll into the graph for
# every shape, and the statistics' data-dependent torch.unique breaks the graph. Both the
# chunked and the fused path run behind it: `fused` picks the Triton kernels (CUDA, or CPU
# under TRITON_INTERPRET=1), otherwise the chunked PyTorch code runs on whatever device the
# tensors are on. Custom ops take no dataclasses or None-valued strings, so LossTerms
# travels as six plain arguments (LossTerms.op_args), and return a fixed tuple of tensors,
# so absent outputs (the statistics without `return_stats`) are empty tensors.
# ------------------------------------------------------------------------------------------


def _fused_kernels():
    # Imported on first use: importing the kernels decides whether Triton interprets them.
    from biencoder.kernels import infonce

    return infonce


@torch.library.custom_op("biencoder::info_nce", mutates_args=())
def info_nce_op(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    directions: str,
    joint: bool,
    hardness_mode: str,
    hardness_strength: float,
    guide_margin: float,
    guide_relative: bool,
    return_stats: bool,
    fused: bool,
    deterministic: bool,
    backward: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, positive, best_other, best_other_index, false_negatives)``.

    ``scale`` is a 0-dim tensor (it may require grad); ``directions`` … ``guide_relative``
    are :meth:`LossTerms.op_args`; ``doc_owners`` is resolved (not None) when the terms
    need it; ``fused`` runs the Triton kernels with the ``backward`` strategy of
    :func:`kernels.infonce.infonce_backward` ("gemm" or "recompute", whose dd is
    accumulated atomically unless ``deterministic``); ``chunk_size`` is the chunked
    path's tile, and the "gemm" backward's column chunk. ``lse``
    [num_lse, B] is what the backward needs; the four statistics are empty unless
    ``return_stats``. Use :func:`info_nce`, which validates the arguments and wraps the
    statistics.
    """
    terms = LossTerms.from_op_args(
        directions, joint, hardness_mode, hardness_strength, guide_margin, guide_relative
    )
    if fused:
        result = _fused_kernels().infonce_forward(
            q,
            d,
            scale,
            doc_ids,
            return_stats=return_stats,
            terms=terms,
            doc_owners=doc_owners,
            guide_q=guide_q,
            guide_d=guide_d,
        )
        loss, lse, stats = result.loss, result.lse, result.stats
        stats_tensors = (
            (stats.positive, stats.best_other, stats.best_other_index, stats.false_negatives)
            if stats is not None
            else None
        )
    else:
        loss, lse, stats_tensors = _chunked_forward(
            q, d, scale, doc_ids, doc_owners, guide_q, guide_d, terms, chunk_size, return_stats
        )
    if stats_tensors is None:
        empty = lse.new_empty(0, dtype=torch.float32)
        no_rows = torch.empty(0, dtype=torch.int64, device=q.device)
        stats_tensors = (empty, empty.clone(), no_rows, no_rows.clone())
    return loss, lse, *stats_tensors


@info_nce_op.register_fake
def _info_nce_fake(
    q,
    d,
    scale,
    doc_ids,
    doc_owners,
    guide_q,
    guide_d,
    directions,
    joint,
    hardness_mode,
    hardness_strength,
    guide_margin,
    guide_relative,
    return_stats,
    fused,
    deterministic,
    backward,
    chunk_size,
):
    batch = q.shape[0]
    dtype = _compute_dtype(q.dtype)
    num_lse = 1 if joint else len(directions.split(","))
    stats_rows = batch if return_stats else 0
    return (
        q.new_empty((), dtype=dtype),
        q.new_empty((num_lse, batch), dtype=dtype),
        q.new_empty(stats_rows, dtype=torch.float32),
        q.new_empty(stats_rows, dtype=torch.float32),
        q.new_empty(stats_rows, dtype=torch.int64),
        q.new_empty(stats_rows, dtype=torch.int64),
    )


@torch.library.custom_op("biencoder::info_nce_backward", mutates_args=())
def info_nce_backward_op(
    grad_loss: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    doc_owners: torch.Tensor | None,
    guide_q: torch.Tensor | None,
    guide_d: torch.Tensor | None,
    lse: torch.Tensor,
    directions: str,
    joint: bool,
    hardness_mode: str,
    hardness_strength: float,
    guide_margin: float,
    guide_relative: bool,
    fused: bool,
    deterministic: bool,
    backward: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dd, dscale) of ``info_nce_op``'s loss for the upstream gradient ``grad_loss``."""
    terms = LossTerms.from_op_args(
        directions, joint, hardness_mode, hardness_strength, guide_margin, guide_relative
    )
    if fused:
        dq, dd, dscale = _fused_kernels().infonce_backward(
            q,
            d,
            scale,
            grad_loss,
            lse,
            doc_ids,
            deterministic,
            terms=terms,
            doc_owners=doc_owners,
            guide_q=guide_q,
            guide_d=guide_d,
            backward=backward,
            chunk_size=chunk_size,
        )
    else:
        dq, dd, dscale = _chunked_backward(
            grad_loss, q, d, scale, doc_ids, doc_owners, guide_q, guide_d, lse, terms, chunk_size
        )
    # Contiguous like the fake outputs, whatever the strides of q and d.
    return dq.contiguous(), dd.contiguous(), dscale.to(scale.dtype).reshape(scale.shape)


@info_nce_backward_op.register_fake
def _info_nce_backward_fake(grad_loss, q, d, scale, *_rest):
    return q.new_empty(q.shape), d.new_empty(d.shape), scale.new_empty(scale.shape)


_TERM_ARGS = slice(7, 13)


def _info_nce_setup_context(ctx, inputs, output) -> None:
    q, d, scale, doc_ids, doc_owners, guide_q, guide_d = inputs[:7]
    fused, deterministic, backward, chunk_size = inputs[14:]
    _, lse, *stats_tensors = output
    ctx.mark_non_differentiable(lse, *stats_tensors)
    # The inputs and O(B) logsumexps only: the backward recomputes the logits.
    ctx.save_for_backward(q, d, scale, doc_ids, doc_owners, guide_q, guide_d, lse)
    ctx.term_args = inputs[_TERM_ARGS]
    ctx.fused, ctx.deterministic, ctx.chunk_size = fused, deterministic, chunk_size
    ctx.backward = backward


def _info_nce_backward(ctx, grad_loss, *_other_grads):
    dq, dd, dscale = info_nce_backward_op(
        grad_loss,
        *ctx.saved_tensors,
        *ctx.term_args,
        ctx.fused,
        ctx.deterministic,
        ctx.backward,
        ctx.chunk_size,
    )
    # The guides come from a frozen model: no gradient, like the ids and the options.
    return dq, dd, dscale, *([None] * 15)


info_nce_op.register_autograd(_info_nce_backward, setup_context=_info_nce_setup_context)


def scale_as_tensor(scale: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The scale 1/temperature as the 0-dim tensor ``info_nce_op`` takes, on ``device``; a
    tensor keeps its dtype and its gradient."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a scalar, got shape {tuple(scale.shape)}")
        return scale.to(device).reshape(())
    # fp64 so that the fp64 (gradcheck) path sees 1/temperature unrounded; the kernels and
    # the fp32 chunked path round it to fp32 as before.
    return torch.tensor(float(scale), device=device, dtype=torch.float64)


@dataclass(frozen=True)
class _Extras:
    """The tensors beside q and d that the options bring, resolved for the op."""

    doc_owners: torch.Tensor | None = None
    guide_q: torch.Tensor | None = None
    guide_d: torch.Tensor | None = None


def _resolve_extras(q, d, terms, doc_owners, guide_q, guide_d) -> _Extras:
    """doc_owners as int64 (its default when the terms need one, None otherwise) and
    detached guides."""
    _check_guide_options(terms, guide_q)
    owners = None
    if terms.needs_owners:
        owners = (
            doc_owners.to(device=q.device, dtype=torch.int64)
            if doc_owners is not None
            else default_doc_owners(q.shape[0], d.shape[0], q.device)
        )
    return _Extras(
        owners,
        guide_q.detach() if guide_q is not None else None,
        guide_d.detach() if guide_d is not None else None,
    )


def check_fused_backward(backward: str, chunk_size: int) -> None:
    """Raises ValueError for a backward strategy or column chunk the fused kernel lacks."""
    if backward not in FUSED_BACKWARDS:
        raise ValueError(f"backward must be one of {FUSED_BACKWARDS}, got {backward!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def call_info_nce_op(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: torch.Tensor,
    doc_ids: torch.Tensor | None,
    terms: LossTerms,
    return_stats: bool,
    fused: bool,
    deterministic: bool = True,
    chunk_size: int = 4096,
    extras: _Extras = _Extras(),
    backward: str = "gemm",
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """``info_nce_op`` with its outputs as the public functions return them: the loss, or
    ``(loss, InfoNCEStats)`` with ``return_stats``."""
    if fused:
        # Before the forward runs, not when the backward first reads them.
        check_fused_backward(backward, chunk_size)
    loss, _, *stats_tensors = info_nce_op(
        q,
        d,
        scale,
        doc_ids,
        extras.doc_owners,
        extras.guide_q,
        extras.guide_d,
        *terms.op_args(),
        return_stats,
        fused,
        deterministic,
        backward,
        chunk_size,
    )
    if not return_stats:
        return loss
    return loss, InfoNCEStats(*stats_tensors, num_docs=d.shape[0])


def chunked_info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    scale: float | torch.Tensor,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    chunk_size: int = 4096,
    return_stats: bool = False,
    **options,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """InfoNCE in plain PyTorch, ``chunk_size`` × ``chunk_size`` logits at a time.

    Peak extra memory is one such tile (plus bool masks of that size with ``doc_ids`` and
    the other options) besides the inputs and their gradients; the backward recomputes each
    tile's logits once per direction and takes both gradient products from it.
    ``return_stats`` adds :class:`InfoNCEStats` from the forward's own tiles (O(B) more
    memory; loss and gradients unchanged). ``options`` are :func:`info_nce`'s keywords.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    terms, extras = _validated_options(q, d, doc_ids, symmetric, options)
    return call_info_nce_op(
        q,
        d,
        scale_as_tensor(scale, q.device),
        doc_ids,
        terms,
        return_stats,
        fused=False,
        chunk_size=chunk_size,
        extras=extras,
    )


_TERM_OPTIONS = (
    "directions",
    "partition_mode",
    "hardness_mode",
    "hardness_strength",
    "guide_margin",
    "guide_margin_strategy",
)
_TENSOR_OPTIONS = ("doc_owners", "guide_q", "guide_d")


def _validated_options(q, d, doc_ids, symmetric, options) -> tuple[LossTerms, _Extras]:
    unknown = set(options) - set(_TERM_OPTIONS) - set(_TENSOR_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected InfoNCE options {sorted(unknown)}")
    terms = loss_terms(symmetric, **{k: options[k] for k in _TERM_OPTIONS if k in options})
    tensors = {k: options.get(k) for k in _TENSOR_OPTIONS}
    check_inputs(q, d, doc_ids, **tensors)
    return terms, _resolve_extras(q, d, terms, **tensors)


def info_nce(
    q: torch.Tensor,
    d: torch.Tensor,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    doc_ids: torch.Tensor | None = None,
    impl: str = "auto",
    chunk_size: int = 4096,
    return_stats: bool = False,
    *,
    directions: tuple[str, ...] | list[str] | None = None,
    partition_mode: str | None = None,
    doc_owners: torch.Tensor | None = None,
    guide_q: torch.Tensor | None = None,
    guide_d: torch.Tensor | None = None,
    guide_margin: float = 0.0,
    guide_margin_strategy: str = "absolute",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
    """Mean InfoNCE loss of queries ``q`` [B, D] against documents ``d`` [N, D].

    ``temperature`` is a float or a scalar tensor (learnable: it receives a gradient in every
    implementation). ``impl`` is one of ``"auto"``, ``"triton"``, ``"torch"``, ``"naive"``
    (see the module docstring); ``chunk_size`` is the chunked path's tile with ``"torch"``
    and the backward's column chunk with ``"triton"`` (B × chunk_size probabilities in
    the input dtype, multiplied out as GEMMs).

    Options (all off by default; the module docstring defines each):

    * ``directions``: a subset of :data:`DIRECTIONS` containing ``"query_to_doc"``;
      ``partition_mode``: ``"joint"`` (default) or ``"per_direction"`` (query_to_doc and
      doc_to_query only). ``symmetric=True`` is the per-direction pair and excludes both.
    * ``doc_owners`` [N] int: the query owning each hard negative (−1: none), for
      doc_to_doc and the hardness modes; default K per query, row-major.
    * ``guide_q`` [B, G], ``guide_d`` [N, G]: a frozen guide model's embeddings, which drop
      every candidate scored above the guide's positive score minus ``guide_margin``
      (``guide_margin_strategy`` "absolute", or "relative": minus |score|·margin).
    * ``hardness_mode`` (None, "in_batch_negatives", "hard_negatives", "all_negatives") and
      ``hardness_strength`` α >= 0: α·stop_grad(q·d) added to those query_to_doc logits.

    ``return_stats=True`` returns ``(loss, InfoNCEStats)``: the query→document ranking
    statistics (whatever the directions; the guide's dropped columns are no competitors),
    computed in the loss's own forward pass, detached.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    scale = 1.0 / temperature
    options = {
        "directions": directions,
        "partition_mode": partition_mode,
        "doc_owners": doc_owners,
        "guide_q": guide_q,
        "guide_d": guide_d,
        "guide_margin": guide_margin,
        "guide_margin_strategy": guide_margin_strategy,
        "hardness_mode": hardness_mode,
        "hardness_strength": hardness_strength,
    }
    if impl == "triton":
        # The op directly rather than kernels.infonce.fused_info_nce, so that torch.compile
        # traces no import here; the op imports the kernels when it first runs.
        terms, extras = _validated_options(q, d, doc_ids, symmetric, options)
        return call_info_nce_op(
            q,
            d,
            scale_as_tensor(scale, q.device),
            doc_ids,
            terms,
            return_stats,
            fused=True,
            chunk_size=chunk_size,
            extras=extras,
        )
    if impl == "torch":
        return chunked_info_nce(
            q, d, scale, symmetric, doc_ids, chunk_size, return_stats, **options
        )
    return naive_info_nce(q, d, scale, symmetric, doc_ids, return_stats, **options)


class InfoNCELoss(nn.Module):
    """InfoNCE as a module, optionally with a learnable temperature.

    A learnable temperature is stored CLIP-style as the log of the scale 1/temperature and
    clamped to temperatures in [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``], so that the logits
    can neither blow up nor flatten to a uniform softmax.

    ``directions``, ``partition_mode``, ``hardness_mode``, ``hardness_strength``,
    ``guide_margin`` and ``guide_margin_strategy`` are :func:`info_nce`'s options, fixed
    here and validated at construction; the per-batch tensors (``doc_owners`` and the
    guide embeddings) are arguments of :meth:`forward`.
    """

    MIN_TEMPERATURE = 0.01
    MAX_TEMPERATURE = 1.0
    expects_normalized = True
    # A guide model's embeddings have the guide's width: Matryoshka must not truncate them.
    not_embeddings = ("guide_q", "guide_d")

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        impl: str = "auto",
        *,
        directions: tuple[str, ...] | list[str] | None = None,
        partition_mode: str | None = None,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        guide_margin: float = 0.0,
        guide_margin_strategy: str = "absolute",
    ) -> None:
        super().__init__()
        if not self.MIN_TEMPERATURE <= temperature <= self.MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be in [{self.MIN_TEMPERATURE}, {self.MAX_TEMPERATURE}],"
                f" got {temperature}"
            )
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.options = {
            "directions": tuple(directions) if directions is not None else None,
            "partition_mode": partition_mode,
            "hardness_mode": hardness_mode,
            "hardness_strength": hardness_strength,
            "guide_margin": guide_margin,
            "guide_margin_strategy": guide_margin_strategy,
        }
        self.terms = loss_terms(symmetric, **self.options)
        self.symmetric = symmetric
        self.impl = impl
        if learnable_temperature:
            self.log_scale = nn.Parameter(torch.tensor(-math.log(temperature)))
        else:
            self.register_parameter("log_scale", None)
            self._fixed_temperature = temperature

    @property
    def temperature(self) -> float | torch.Tensor:
        """The temperature: a float if fixed, a differentiable 0-dim tensor if learnable."""
        if self.log_scale is None:
            return self._fixed_temperature
        log_scale = self.log_scale.clamp(
            -math.log(self.MAX_TEMPERATURE), -math.log(self.MIN_TEMPERATURE)
        )
        return torch.exp(-log_scale)

    def forward(
        self,
        q: torch.Tensor,
        d: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        return_stats: bool = False,
        queries: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
        *,
        doc_owners: torch.Tensor | None = None,
        guide_q: torch.Tensor | None = None,
        guide_d: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, InfoNCEStats]:
        """The loss, or ``(loss, InfoNCEStats)`` with ``return_stats`` (see :func:`info_nce`).

        ``queries`` [M, D], M >= B, replaces ``q`` as what the document→query term ranks
        each positive ``d[i]`` against: ``queries[i]`` is its own query, the rest compete
        with it, and ``query_ids`` [M] (the doc ids of the queries' positives) masks false
        negatives among them as ``doc_ids[:B]`` does by default. Training on several ranks
        passes the queries of the whole batch here, this rank's first. It supports the
        directions query_to_doc and doc_to_query per direction (``symmetric``) without a
        guide; other options with ``queries`` raise NotImplementedError.
        """
        extra = {"doc_owners": doc_owners, "guide_q": guide_q, "guide_d": guide_d}
        if queries is None or "doc_to_query" not in self.terms.directions:
            return info_nce(
                q,
                d,
                self.temperature,
                symmetric=self.symmetric,
                doc_ids=doc_ids,
                impl=self.impl,
                return_stats=return_stats,
                **self.options,
                **extra,
            )
        if self.terms.joint or len(self.terms.directions) != 2 or guide_q is not None:
            raise NotImplementedError(
                "queries= (the document→query term against a larger query set) supports "
                "directions query_to_doc and doc_to_query with partition_mode='per_direction' "
                "and no guide model"
            )
        forward_options = dict(self.options, directions=None, partition_mode=None)
        forward = info_nce(
            q,
            d,
            self.temperature,
            doc_ids=doc_ids,
            impl=self.impl,
            return_stats=return_stats,
            **forward_options,
            doc_owners=doc_owners,
        )
        loss, stats = forward if return_stats else (forward, None)
        backward = info_nce(
            d[: q.shape[0]], queries, self.temperature, doc_ids=query_ids, impl=self.impl
        )
        loss = (loss + backward) / 2
        return (loss, stats) if return_stats else loss
