"""The InfoNCE vocabulary that the Triton kernels and the PyTorch paths share.

What a loss configuration is (:class:`LossTerms`, its directions as :class:`Direction`
row/column problems, the codes the kernels take for them), how the options and the tensors
beside q and d are checked and resolved, the ranking statistics every path returns, and
the two steps in which every path combines its directions: their row logsumexps into the
saved partition (:func:`combine_partitions`) and their gradients into dq, dd and ∂/∂s
(:func:`accumulate_direction_grads`). The options are defined in :mod:`losses.infonce`.

No Triton here: the kernels, the custom op, its chunked path and the naive reference all
build on this module, and loading it does not decide whether Triton interprets the kernels.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# The fused kernel's backward strategies (kernels.infonce_host.infonce_backward).
FUSED_BACKWARDS = ("gemm", "recompute")


def check_fused_backward(backward: str, chunk_size: int) -> None:
    """Raises ValueError for a backward strategy or column chunk the fused kernel lacks."""
    if backward not in FUSED_BACKWARDS:
        raise ValueError(f"backward must be one of {FUSED_BACKWARDS}, got {backward!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


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
            found,
            columns.to(self.best_other_index.device, non_blocking=True)[
                self.best_other_index.clamp_min(0)
            ],
            -1,
        )
        return dataclasses.replace(self, best_other_index=index, num_positives=num_positives)

    def summary_tensors(self) -> dict[str, torch.Tensor]:
        """:meth:`summary`'s values as 0-d float64 tensors on the statistics' device,
        without reading them back to the host; a mean over no rows is NaN."""
        batch = self.positive.shape[0]
        positives = batch if self.num_positives is None else self.num_positives
        has_other = self.best_other_index >= 0
        beats_others = (self.positive > self.best_other) | ~has_other
        margins = torch.where(has_other, self.positive - self.best_other, 0.0)
        rows_with_other = has_other.double().sum()
        pairs = batch * (self.num_docs - 1)
        summary = {
            "accuracy": beats_others.double().mean(),
            "false_negative_fraction": self.false_negatives.double().sum() / max(pairs, 1),
            "margin": margins.double().sum() / rows_with_other,
        }
        if self.num_docs > positives:
            mined = has_other & (self.best_other_index >= positives)
            summary["hardest_negative_mined_fraction"] = mined.double().sum() / rows_with_other
        return summary

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
        tensors = self.summary_tensors()
        values = torch.stack(list(tensors.values())).tolist()
        return {key: v for key, v in zip(tensors, values, strict=True) if not math.isnan(v)}


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
    """The validated loss configuration (the options of :mod:`losses.infonce`); build it with
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


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 logits lose the small differences the softmax is made of; fp64 stays fp64 so
    # that gradcheck sees exact arithmetic.
    return torch.promote_types(dtype, torch.float32)


def guide_thresholds(
    guide_q: torch.Tensor, guide_d: torch.Tensor, terms: LossTerms, dtype: torch.dtype
) -> torch.Tensor:
    """[B] in ``dtype``'s compute dtype: t_i, above which the guide drops a candidate of
    row i (the guides rounded to ``dtype`` first, as every guide score is)."""
    compute_dtype = compute_dtype_of(dtype)
    batch = guide_q.shape[0]
    guide_positive = guide_q.to(dtype).to(compute_dtype) * guide_d[:batch].to(dtype).to(
        compute_dtype
    )
    positive = guide_positive.sum(dim=1)
    margin = positive.abs() * terms.guide_margin if terms.guide_relative else terms.guide_margin
    return positive - margin


def check_guide_options(terms: LossTerms, guide_q: torch.Tensor | None) -> None:
    """Raises ValueError for a guide margin without the guide embeddings."""
    if guide_q is None and (terms.guide_margin != 0 or terms.guide_relative):
        raise ValueError("guide_margin and guide_margin_strategy need guide_q and guide_d")


@dataclass(frozen=True)
class Extras:
    """The tensors beside q and d that the options bring, resolved for the op."""

    doc_owners: torch.Tensor | None = None
    guide_q: torch.Tensor | None = None
    guide_d: torch.Tensor | None = None


def resolve_extras(q, d, terms, doc_owners, guide_q, guide_d) -> Extras:
    """doc_owners as int64 (its default when the terms need one, None otherwise) and
    detached guides."""
    check_guide_options(terms, guide_q)
    owners = None
    if terms.needs_owners:
        owners = (
            doc_owners.to(device=q.device, dtype=torch.int64)
            if doc_owners is not None
            else default_doc_owners(q.shape[0], d.shape[0], q.device)
        )
    return Extras(
        owners,
        guide_q.detach() if guide_q is not None else None,
        guide_d.detach() if guide_d is not None else None,
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


def validated_options(q, d, doc_ids, symmetric, options) -> tuple[LossTerms, Extras]:
    """The keyword ``options`` of :func:`losses.infonce.info_nce` checked against q, d and
    doc_ids, as (terms, resolved extras); raises TypeError for an unknown option."""
    unknown = set(options) - set(_TERM_OPTIONS) - set(_TENSOR_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected InfoNCE options {sorted(unknown)}")
    terms = loss_terms(symmetric, **{k: options[k] for k in _TERM_OPTIONS if k in options})
    tensors = {k: options.get(k) for k in _TENSOR_OPTIONS}
    check_inputs(q, d, doc_ids, **tensors)
    return terms, resolve_extras(q, d, terms, **tensors)


def combine_partitions(term_lse: list[torch.Tensor], joint: bool) -> torch.Tensor:
    """lse [num_lse, B], what the backward reads, from each direction's row logsumexp
    (query_to_doc first): a joint partition is their logaddexp, per_direction keeps one row
    per direction."""
    if len(term_lse) == 1:
        return term_lse[0][None]
    stacked = torch.stack(term_lse)
    return torch.logsumexp(stacked, dim=0)[None] if joint else stacked


def accumulate_direction_grads(
    totals: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    spec: Direction,
    rows: torch.Tensor,
    d_rows: torch.Tensor,
    d_cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The running (dq, dd, dscale) with one direction's gradients added, all unweighted
    (before the upstream weight and the scale; see the Math comment of kernels.infonce).

    ``d_rows`` [B, D] goes to the direction's rows and ``d_cols`` to its columns, each the
    queries or the documents it is; its ∂/∂s term is ⟨rows, d_rows⟩. ``totals`` is None for
    the first direction, whose gradients become the totals (added to in place after).
    """
    term_dscale = torch.dot(rows.flatten(), d_rows.flatten())
    if totals is None:
        # query_to_doc comes first: its gradients are the totals' first terms.
        return d_rows, d_cols, term_dscale
    dq, dd, dscale = totals
    dscale = dscale + term_dscale
    (dd[: rows.shape[0]] if spec.rows_are_docs else dq).add_(d_rows)
    (dq if spec.cols_are_queries else dd).add_(d_cols)
    return dq, dd, dscale
