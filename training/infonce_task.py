"""The InfoNCE training task: a batch's queries against its positives, the other examples'
positives and the hard negatives of Triplets, with the options of :mod:`losses.infonce`.

Its batches, base class and statistics conventions are those of :mod:`training.tasks`. On
several processes it shards the loss itself (:meth:`InfoNCETask.compute_sharded`): each rank
scores its own queries against every rank's documents.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from biencoder.data.training import Pair, Triplet
from biencoder.losses.infonce import InfoNCELoss
from biencoder.model.biencoder import BiEncoder
from biencoder.training.tasks import (
    RETRIEVAL_DATA,
    Task,
    TextBatch,
    flat_negatives,
    owners_one_per_example,
    owners_per_negative,
)


class InfoNCETask(Task):
    """InfoNCE over in-batch negatives, plus the hard negatives of Triplet examples.

    Columns: queries (query tower), positives (doc tower) and, for Triplets, every
    negative flattened row-major (doc tower). The loss sees q = queries and d = positives
    followed by negatives, so ``d[i]`` is the positive of ``q[i]``. Documents with equal
    text share a ``doc_id`` and so mask each other as false negatives: a negative that is
    another query's positive, or a document repeated in the batch, is not pushed away.
    Queries repeated with different positives are not masked: batches should not repeat
    a query.

    Statistics (:meth:`kernels.infonce_options.InfoNCEStats.summary`, of the widest
    Matryoshka truncation):
    ``accuracy`` (the positive scores strictly above every unmasked other column),
    ``margin`` (mean of the positive's score minus the best unmasked other score),
    ``false_negative_fraction`` (masked pairs out of B·(N − 1)),
    ``hardest_negative_mined_fraction`` (rows whose best other column is a mined negative,
    with hard negatives) and ``temperature``.

    Options (see :mod:`losses.infonce`): ``directions`` adds query→query, document→query
    and document→document negatives, in one softmax (``partition_mode="joint"``, GTE's
    improved contrastive loss) or averaged per direction; ``symmetric`` is the
    per-direction query→document and document→query pair. ``hardness_mode`` and
    ``hardness_strength`` weight harder negatives up. ``guide`` is a model folder whose
    embeddings of the batch drop every candidate it scores above the positive (minus
    ``guide_margin``), as GISTEmbed does; the guide is frozen and not saved with the model.
    Hard negatives belong to the query of their Triplet (``doc_owners``).
    """

    accepts = (Pair, Triplet)
    data_hint = RETRIEVAL_DATA

    def __init__(
        self,
        temperature: float = 0.05,
        learnable_temperature: bool = False,
        symmetric: bool = False,
        impl: str = "auto",
        directions: Sequence[str] | None = None,
        partition_mode: str | None = None,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        guide: str | None = None,
        guide_margin: float = 0.0,
        guide_margin_strategy: str = "absolute",
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        if guide is None and (guide_margin != 0 or guide_margin_strategy != "absolute"):
            raise ValueError("guide_margin and guide_margin_strategy need a guide model (guide=)")
        loss = InfoNCELoss(
            temperature,
            learnable_temperature,
            symmetric,
            impl,
            directions=directions,
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
            guide_margin=guide_margin,
            guide_margin_strategy=guide_margin_strategy,
        )
        super().__init__(loss, matryoshka_dims, matryoshka_weights)
        # Frozen and outside the module tree: neither trained, nor checkpointed, nor moved
        # by .to() (it follows the embeddings' device when used).
        self._guide = _Frozen(BiEncoder.from_pretrained(guide).eval()) if guide else None
        # The rank-local path handles the plain and symmetric losses; the other options are
        # computed on the gathered batch (Task.compute_sharded), which is exact for any loss.
        terms = self.base_loss.terms
        self._local_sharding = (
            guide is None
            and terms.hardness_code == 0
            and terms.directions in (("query_to_doc",), ("query_to_doc", "doc_to_query"))
            and not (terms.joint and len(terms.directions) == 2)
        )

    def make_batch(self, examples: Sequence[Pair | Triplet]) -> TextBatch:
        example_type = self._example_type(examples)
        columns = [[e.query for e in examples], [e.positive for e in examples]]
        negatives = flat_negatives(examples) if example_type is Triplet else []
        if negatives:
            columns.append(negatives)
        owners = [owners_one_per_example(examples), owners_one_per_example(examples)]
        if negatives:
            owners.append(owners_per_negative(examples))
        return TextBatch(
            columns=columns,
            kinds=["query"] + ["doc"] * (len(columns) - 1),
            doc_ids=_text_ids(columns[1] + negatives),
            size=len(examples),
            owners=owners,
        )

    def compute(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q, d = embeddings[0], torch.cat(embeddings[1:])
        doc_ids = None
        if batch.doc_ids is not None:
            doc_ids = batch.doc_ids.to(q.device, non_blocking=True)
        owners = torch.tensor([o for column in batch.owners[1:] for o in column])
        owners = owners.to(q.device, non_blocking=True)
        # The loss computes the ranking statistics in its own pass: O(B), never the B×N scores.
        loss, stats = self.loss(
            q, d, doc_ids, return_stats=True, doc_owners=owners, **self._guide_embeddings(batch, q)
        )
        return loss, {**stats.summary_tensors(), **self._temperature_stats()}

    def _guide_embeddings(self, batch: TextBatch, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The guide model's embeddings of the batch's queries and documents (no gradient)."""
        if self._guide is None:
            return {}
        guide = self._guide.model.to(like.device)
        docs = [text for column in batch.columns[1:] for text in column]
        guide_q = guide.encode(batch.columns[0], kind="query", show_progress=False)
        guide_d = guide.encode(docs, kind="doc", show_progress=False)
        # encode() runs in inference mode; the loss saves its inputs for the backward, which
        # inference tensors refuse, so hand it ordinary copies.
        return {
            "guide_q": guide_q.to(like.device).clone(),
            "guide_d": guide_d.to(like.device).clone(),
        }

    def compute_sharded(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's queries against every rank's documents: no rank holds the B×N logits
        or repeats another's queries. The gathered documents are reordered so that this
        rank's positives come first, where the loss expects a query's positive; the loss is
        a sum over columns, so the order of the others does not matter."""
        if not self._local_sharding:
            return super().compute_sharded(embeddings, batch)
        shard = batch.shard
        whole = shard.whole
        q = embeddings[0]
        d = torch.cat([shard.gather(e, c) for c, e in enumerate(embeddings) if c > 0])
        start, stop = shard.examples.start, shard.examples.stop
        columns = _mine_first(start, stop, d.shape[0]).to(q.device, non_blocking=True)
        doc_ids = whole.doc_ids.to(q.device, non_blocking=True)
        extra = {}
        if self.base_loss.symmetric:
            # The document→query term ranks each local positive against every query.
            queries = _mine_first(start, stop, whole.size).to(q.device, non_blocking=True)
            extra = {
                "queries": shard.gather(q, 0)[queries],
                "query_ids": doc_ids[: whole.size][queries],
            }
        loss, stats = self.loss(q, d[columns], doc_ids[columns], return_stats=True, **extra)
        stats = stats.with_columns(columns, num_positives=whole.size)
        return loss, {**stats.summary_tensors(), **self._temperature_stats()}


class _Frozen:
    """Holds a model as a plain attribute, so that nn.Module does not register it."""

    def __init__(self, model: BiEncoder) -> None:
        self.model = model
        model.requires_grad_(False)


def _mine_first(start: int, stop: int, count: int) -> torch.Tensor:
    """``range(count)`` with ``start:stop`` moved to the front, the rest in order."""
    return torch.cat([torch.arange(start, stop), torch.arange(0, start), torch.arange(stop, count)])


def _text_ids(texts: Sequence[str]) -> torch.Tensor:
    """One id per text, equal exactly for equal texts (numbered in order of appearance)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(text, len(ids)) for text in texts], dtype=torch.long)
