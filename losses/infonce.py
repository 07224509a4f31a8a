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

* ``"triton"`` (:func:`kernels.infonce_op.fused_info_nce`): the fused kernel of
  :mod:`kernels.infonce` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); memory
  O(B + N) beyond inputs and gradients.
* ``"torch"`` (:func:`kernels.infonce_op.chunked_info_nce`): plain PyTorch over column
  chunks with an online logsumexp and a backward that recomputes each chunk; the rows are
  blocked by the same chunk_size, so memory is one chunk_size × chunk_size tile, at most
  O(B·chunk_size). The CPU default.
* ``"naive"`` (:func:`losses.infonce_naive.naive_info_nce`): the dense B×N similarity
  matrices of every direction; memory O(B·N). The reference.
* ``"auto"``: ``"triton"`` for CUDA tensors, ``"torch"`` otherwise.

All three return the mean loss in at least fp32 (fp16/bf16 inputs are accumulated in
fp32) and pass gradients to q, d and, when it is a tensor, the temperature.

With ``return_stats=True`` each also returns :class:`kernels.infonce_options.InfoNCEStats`,
per-query ranking statistics of the query→document direction taken from the same pass as
the loss: O(B) memory in the "torch" and "triton" paths, and the same loss and gradients
as without them.

The "torch" and "triton" paths (so "auto") run as the custom operator
``torch.ops.biencoder.info_nce``, whose backward is ``torch.ops.biencoder.info_nce_backward``:
``torch.compile(fullgraph=True)`` traces a function calling :func:`info_nce` and its
backward without a graph break. Both ops (:mod:`kernels.infonce_op`) are registered when
this module is imported.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from biencoder.kernels.infonce_op import chunked_info_nce, fused_info_nce
from biencoder.kernels.infonce_options import InfoNCEStats, loss_terms
from biencoder.losses.infonce_naive import naive_info_nce

IMPLEMENTATIONS = ("auto", "triton", "torch", "naive")


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

    * ``directions``: a subset of :data:`kernels.infonce_options.DIRECTIONS` containing
      ``"query_to_doc"``; ``partition_mode``: ``"joint"`` (default) or ``"per_direction"``
      (query_to_doc and doc_to_query only). ``symmetric=True`` is the per-direction pair
      and excludes both.
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
        # The op imports the kernels when it first runs, so torch.compile traces no import.
        return fused_info_nce(
            q,
            d,
            scale,
            symmetric,
            doc_ids,
            return_stats=return_stats,
            chunk_size=chunk_size,
            **options,
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
