"""Training tasks: how a batch of examples becomes text columns, and embeddings a loss.

A task's ``make_batch`` turns examples into a :class:`TextBatch`, columns of texts that are
each embedded by one tower; its ``forward`` takes one embedding tensor per column and
returns the loss and a few monitoring statistics. Keeping the two apart lets the training
step embed the columns however it likes: all at once, or chunk by chunk under GradCache.

A task is an ``nn.Module`` holding its loss, so that a loss with parameters (InfoNCE's
learnable temperature) trains and checkpoints with the task.

Every batch holds examples of one type. Statistics are plain floats computed without
gradients; a statistic with nothing to measure in a batch (a margin without negatives)
is left out rather than reported as nan.

This module holds the base class and the pair, triplet, scored-pair and distillation tasks;
the InfoNCE task is :class:`training.infonce_task.InfoNCETask`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from biencoder.data.sts import ScoredPair
from biencoder.data.training import Example, Pair, Triplet
from biencoder.losses.distillation import ListwiseKLLoss, MarginMSELoss
from biencoder.losses.pairwise import (
    ContrastiveLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    MatryoshkaLoss,
    TripletLoss,
    pair_distance,
)
from biencoder.model.biencoder import Kind
from biencoder.training.distributed import Distributed, gather

RETRIEVAL_DATA = "query/positive data, e.g. train_data=scifact"


@dataclass
class TextBatch:
    """The texts of one batch, grouped into columns that are embedded separately.

    ``columns[c]`` is embedded by the tower ``kinds[c]`` into a ``[len(columns[c]), dim]``
    tensor. ``targets`` holds a task's float scores or 0/1 labels, one per row of the
    columns; ``doc_ids`` the ids of InfoNCE's documents, the rows of columns 1.. in order
    (equal ids mark equal texts); ``size`` the number of examples; ``owners[c][r]`` the
    example that row r of column c comes from. ``shard`` is set on the part of a batch one
    rank of a multi-process run embeds (see :meth:`shard_for`).
    """

    columns: list[list[str]]
    kinds: list[Kind]
    targets: torch.Tensor | None = None
    doc_ids: torch.Tensor | None = None
    size: int = 0
    owners: list[list[int]] | None = None
    shard: Shard | None = None

    def shard_for(self, dist: Distributed) -> TextBatch:
        """The rows of this rank's examples (a contiguous ``size / world_size`` of them), in
        every column, with the doc ids and targets of those rows; the whole batch stays
        reachable through ``shard`` so that the loss can gather what it needs."""
        examples = dist.shard(self.size)
        per_rank = examples.stop - examples.start

        def rows_of(owners: list[int], rank: int) -> list[int]:
            return [r for r, owner in enumerate(owners) if owner // per_rank == rank]

        local = [rows_of(owners, dist.rank) for owners in self.owners]
        gathered = [
            [r for rank in range(dist.world_size) for r in rows_of(owners, rank)]
            for owners in self.owners
        ]
        # doc_ids number the rows of columns 1.. one after the other.
        starts = [
            sum(len(column) for column in self.columns[1:c]) for c in range(len(self.columns))
        ]
        doc_rows = [starts[c] + r for c in range(1, len(self.columns)) for r in local[c]]
        return TextBatch(
            columns=[[col[r] for r in rows] for col, rows in zip(self.columns, local, strict=True)],
            kinds=self.kinds,
            targets=None if self.targets is None else self.targets[local[0]],
            doc_ids=None if self.doc_ids is None else self.doc_ids[doc_rows],
            size=per_rank,
            owners=[[own[r] for r in rows] for own, rows in zip(self.owners, local, strict=True)],
            shard=Shard(
                dist,
                self,
                examples,
                gathered,
                [
                    [len(rows_of(own, rank)) for rank in range(dist.world_size)]
                    for own in self.owners
                ],
            ),
        )


@dataclass
class Shard:
    """Where one rank's part of a batch sits in the whole batch.

    ``examples`` are the whole batch's examples this rank holds; ``gathered[c]`` is, for
    column c, the whole-batch row of each row that :func:`training.distributed.gather`
    returns (the ranks' rows in rank order), so that gathered embeddings can be put back in
    the whole batch's order; ``counts[c]`` is how many rows of column c each rank holds.
    All of it is known on the host, so gathering needs no exchange of shapes.
    """

    dist: Distributed
    whole: TextBatch
    examples: slice
    gathered: list[list[int]]
    counts: list[list[int]]

    def gather(self, embeddings: torch.Tensor, column: int) -> torch.Tensor:
        """Every rank's embeddings of ``column``, in the whole batch's row order, with
        gradient (see :func:`training.distributed.gather`)."""
        rows = gather(embeddings, self.dist, self.counts[column])
        order = torch.argsort(torch.tensor(self.gathered[column]))
        return rows[order.to(rows.device, non_blocking=True)]


def read_stats(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """A task's statistics as plain floats, read from the device in one transfer; the NaN
    ones (undefined for this batch) left out."""
    if not stats:
        return {}
    values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in stats.values()])
    return {k: v for k, v in zip(stats, values.tolist(), strict=True) if not math.isnan(v)}


def _join(names: Sequence[str], conjunction: str = "or") -> str:
    if len(names) == 1:
        return names[0]
    return f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


class Task(nn.Module):
    """Base of the training tasks: holds the loss, optionally wrapped in Matryoshka.

    ``matryoshka_dims`` trains the loss on the embeddings truncated to each of these
    dimensions, weighted by ``matryoshka_weights`` (1 each by default). ``base_loss`` is
    the loss without the Matryoshka wrapper.
    """

    # The example types a task accepts, and data that provides them, for its TypeError.
    accepts: tuple[type, ...] = ()
    data_hint: str = ""

    def __init__(
        self,
        loss: nn.Module,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if any(dim < 1 for dim in matryoshka_dims):
            raise ValueError(f"matryoshka_dims: must be positive, got {list(matryoshka_dims)}")
        if matryoshka_weights is not None and len(matryoshka_weights) != len(matryoshka_dims):
            raise ValueError(
                f"matryoshka_weights: {len(matryoshka_weights)} weights for "
                f"{len(matryoshka_dims)} matryoshka_dims"
            )
        self.loss = (
            MatryoshkaLoss(loss, matryoshka_dims, matryoshka_weights) if matryoshka_dims else loss
        )

    @property
    def matryoshka_dims(self) -> list[int]:
        """The truncations the loss trains; empty without Matryoshka."""
        return list(self.loss.dims) if isinstance(self.loss, MatryoshkaLoss) else []

    @property
    def base_loss(self) -> nn.Module:
        return self.loss.loss if isinstance(self.loss, MatryoshkaLoss) else self.loss

    def make_batch(self, examples: Sequence[Example]) -> TextBatch:
        """Columns, tower kinds and targets for ``examples``."""
        raise NotImplementedError

    def check_examples(self, examples: Sequence[Example]) -> None:
        """Raise a ValueError naming the file and line of the first example this task cannot
        train on; train.py calls it on the whole training set before the first step, so bad
        data fails at start-up rather than at the batch that happens to hold it."""

    def forward(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one embedding tensor per column of ``batch``, and statistics.

        Statistics are 0-d tensors, left on the device so that nothing waits for it; one
        that a batch cannot define (a mean over no rows) is NaN, which the trainer leaves
        out of its log.

        On a rank's shard of a batch (several processes), the loss this rank backpropagates:
        their mean over ranks is the whole batch's loss, so that DDP, which averages the
        gradients, and the gather, which sums each row's gradient over ranks, reproduce the
        single-process gradient."""
        if batch.shard is None:
            return self.compute(embeddings, batch)
        return self.compute_sharded(embeddings, batch)

    def compute(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and statistics of a whole batch."""
        raise NotImplementedError

    def compute_sharded(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gather every column and compute the whole batch's loss on every rank: simple and
        exact, at the cost of each rank repeating the loss (cheap for the pair losses)."""
        shard = batch.shard
        whole = [shard.gather(e, column) for column, e in enumerate(embeddings)]
        return self.compute(whole, shard.whole)

    def check_accepts(self, example_type: type) -> None:
        """Raise a ValueError, before any data is read, if this task cannot train on
        ``example_type`` examples."""
        if example_type not in self.accepts:
            accepted = _join([t.__name__ for t in self.accepts])
            raise ValueError(
                f"{type(self).__name__} trains on {accepted} examples ({self.data_hint}), "
                f"not on {example_type.__name__} examples"
            )

    def _example_type(self, examples: Sequence[Example]) -> type:
        """The one type of ``examples``; a TypeError names the task and what it got."""
        task = type(self).__name__
        if not examples:
            raise ValueError(f"{task} got an empty batch")
        for example in examples:
            if not isinstance(example, self.accepts):
                accepted = _join([t.__name__ for t in self.accepts])
                raise TypeError(
                    f"{task} needs {accepted} examples ({self.data_hint}); "
                    f"got {type(example).__name__}"
                )
        types = sorted({type(example).__name__ for example in examples})
        if len(types) > 1:
            raise TypeError(f"{task} needs one example type per batch; got {_join(types, 'and')}")
        return type(examples[0])

    def _temperature_stats(self) -> dict[str, torch.Tensor]:
        temperature = getattr(self.base_loss, "temperature", None)
        if temperature is None:
            return {}
        return {"temperature": torch.as_tensor(temperature).detach()}


def _check_score_range(examples: Sequence[Example], score_scale: float) -> None:
    """Scores of ScoredPair examples must lie in [0, score_scale]: past it, targets and
    thresholds derived from the scale stop meaning what they were set for."""
    for example in examples:
        if isinstance(example, ScoredPair) and not 0 <= example.score <= score_scale:
            where = f"{example.source}: " if example.source else ""
            raise ValueError(
                f"{where}score {example.score} outside [0, {score_scale}] "
                f"(loss.score_scale={score_scale}); set loss.score_scale to the top of the "
                "data's scale"
            )


def owners_one_per_example(examples: Sequence[Example]) -> list[int]:
    """Owners of a column with one row per example."""
    return list(range(len(examples)))


def owners_per_negative(examples: Sequence[Triplet]) -> list[int]:
    """Owners of a column with one row per negative, example by example."""
    return [i for i, example in enumerate(examples) for _ in example.negatives]


def flat_negatives(examples: Sequence[Triplet]) -> list[str]:
    """Every example's negatives, flattened row-major (example by example)."""
    return [negative for example in examples for negative in example.negatives]


def _shifted(rows: list[str]) -> list[str]:
    """Row i gets row (i + 1) mod B: every row's in-batch negative is its neighbour's."""
    return rows[1:] + rows[:1]


def _check_in_batch_negatives(task: Task, size: int) -> None:
    if size < 2:
        raise ValueError(
            f"{type(task).__name__} takes in-batch negatives from Pair batches, "
            f"which needs at least 2 examples; got {size}"
        )


class TripletTask(Task):
    """Triplet loss: each query against its positive and each of its K negatives.

    Triplet examples must all have the same number of negatives K (the loss sees them as
    ``[B, K, D]``). Pair examples have no negatives of their own: row i uses the positive
    of row (i + 1) mod B as its one in-batch negative.

    Columns: queries (query tower), positives (doc tower), and for Triplets the negatives
    flattened row-major (doc tower). Statistic: ``accuracy``, the fraction of triplets in
    which the positive is closer to the query than the negative.
    """

    accepts = (Pair, Triplet)
    data_hint = RETRIEVAL_DATA

    def __init__(
        self,
        margin: float = 0.5,
        distance: str = "cosine",
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(TripletLoss(margin, distance), matryoshka_dims, matryoshka_weights)

    def make_batch(self, examples: Sequence[Pair | Triplet]) -> TextBatch:
        example_type = self._example_type(examples)
        columns = [[e.query for e in examples], [e.positive for e in examples]]
        if example_type is Triplet:
            counts = sorted({len(e.negatives) for e in examples})
            if len(counts) > 1 or counts[0] == 0:
                raise ValueError(
                    f"TripletTask needs the same, nonzero number of negatives in every "
                    f"Triplet of a batch; got {_join([str(c) for c in counts], 'and')}"
                )
            columns.append(flat_negatives(examples))
        else:
            _check_in_batch_negatives(self, len(examples))
        owners = [owners_one_per_example(examples), owners_one_per_example(examples)]
        if example_type is Triplet:
            owners.append(owners_per_negative(examples))
        return TextBatch(
            columns=columns,
            kinds=["query"] + ["doc"] * (len(columns) - 1),
            size=len(examples),
            owners=owners,
        )

    def compute(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        anchor, positive = embeddings[0], embeddings[1]
        if len(embeddings) == 3:
            negative = embeddings[2].reshape(anchor.shape[0], -1, anchor.shape[-1])
        else:
            negative = positive.roll(-1, dims=0).unsqueeze(1)
        loss = self.loss(anchor, positive, negative)
        with torch.no_grad():
            distance = self.base_loss.distance
            positive_distance = pair_distance(anchor, positive, distance)
            negative_distance = pair_distance(anchor.unsqueeze(1), negative, distance)
            correct = positive_distance.unsqueeze(1) < negative_distance
        return loss, {"accuracy": correct.float().mean()}


class ContrastiveTask(Task):
    """Contrastive loss on text pairs labelled similar (1) or dissimilar (0).

    Pair rows: a Triplet gives (query, positive, 1) and (query, negative, 0) for each of
    its negatives; a Pair gives (query, positive, 1) and (query, positive of the next row,
    0) (an in-batch negative); a ScoredPair gives (text1, text2, score >= ``threshold``).
    ``threshold`` is on the data's own scale, whose top is ``score_scale`` (STS-B: 0 to
    5); a score outside [0, ``score_scale``] raises, since the threshold would then not
    mean what it was set for.

    Columns: left texts, right texts, one entry per pair row; targets: the labels. Left
    texts go through the query tower, right ones through the doc tower, except for
    ScoredPairs, whose texts are interchangeable and both go through the query tower.

    Statistics: ``positive_distance`` and ``negative_distance``, the mean distance of the
    pairs labelled 1 and 0.
    """

    accepts = (Pair, Triplet, ScoredPair)
    data_hint = "retrieval data, e.g. train_data=scifact, or data with scores, e.g. train_data=sts"

    def __init__(
        self,
        margin: float = 0.5,
        distance: str = "cosine",
        threshold: float = 4.0,
        score_scale: float = 5.0,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(ContrastiveLoss(margin, distance), matryoshka_dims, matryoshka_weights)
        if not 0 < threshold <= score_scale:
            raise ValueError(
                f"threshold: must be in (0, score_scale={score_scale}], got {threshold}"
            )
        self.threshold = threshold
        self.score_scale = score_scale

    def make_batch(self, examples: Sequence[Example]) -> TextBatch:
        example_type = self._example_type(examples)
        if example_type is ScoredPair:
            self.check_examples(examples)
            scores = [e.score for e in examples]
            return TextBatch(
                columns=[[e.text1 for e in examples], [e.text2 for e in examples]],
                kinds=["query", "query"],
                targets=torch.tensor([float(s >= self.threshold) for s in scores]),
                size=len(examples),
                owners=[owners_one_per_example(examples), owners_one_per_example(examples)],
            )
        queries = [e.query for e in examples]
        positives = [e.positive for e in examples]
        if example_type is Triplet:
            left = queries + [e.query for e in examples for _ in e.negatives]
            right = positives + flat_negatives(examples)
            owners = owners_one_per_example(examples) + owners_per_negative(examples)
        else:
            _check_in_batch_negatives(self, len(examples))
            left, right = queries + queries, positives + _shifted(positives)
            # Row B + i pairs query i with the next positive: it belongs to example i.
            owners = owners_one_per_example(examples) + owners_one_per_example(examples)
        labels = [1.0] * len(examples) + [0.0] * (len(left) - len(examples))
        return TextBatch(
            columns=[left, right],
            kinds=["query", "doc"],
            targets=torch.tensor(labels),
            size=len(examples),
            owners=[owners, owners],
        )

    def check_examples(self, examples: Sequence[Example]) -> None:
        _check_score_range(examples, self.score_scale)

    def compute(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        left, right = embeddings
        labels = batch.targets.to(left.device, non_blocking=True)
        loss = self.loss(left, right, labels)
        stats: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            distance = pair_distance(left, right, self.base_loss.distance)
            for name, selected in (("positive", labels == 1), ("negative", labels == 0)):
                # A mean over no pairs is 0/0 = NaN: left out of the log.
                selected = selected.to(distance.dtype)
                stats[f"{name}_distance"] = (distance * selected).sum() / selected.sum()
        return loss, stats


class ScoredPairTask(Task):
    """Base of the tasks on gold-scored pairs: :class:`CoSENTTask` (ranking) and
    :class:`CosineSimilarityTask` (regression).

    Targets are ``score / score_scale`` (STS-B scores 0 to 5 become 0 to 1). Both columns
    (text1, text2) go through the query tower, since the two texts of an STS pair play
    the same role. Statistics: ``mean_cosine`` and, for batches where it is defined,
    ``pearson`` between the cosines and the targets.
    """

    accepts = (ScoredPair,)
    data_hint = "data with scores, e.g. train_data=sts"

    def __init__(
        self,
        loss: nn.Module,
        score_scale: float = 5.0,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(loss, matryoshka_dims, matryoshka_weights)
        if score_scale <= 0:
            raise ValueError(f"score_scale: must be positive, got {score_scale}")
        self.score_scale = score_scale

    def make_batch(self, examples: Sequence[ScoredPair]) -> TextBatch:
        self._example_type(examples)
        return TextBatch(
            columns=[[e.text1 for e in examples], [e.text2 for e in examples]],
            kinds=["query", "query"],
            targets=torch.tensor([e.score / self.score_scale for e in examples]),
            size=len(examples),
            owners=[owners_one_per_example(examples), owners_one_per_example(examples)],
        )

    def compute(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, b = embeddings
        targets = batch.targets.to(a.device, non_blocking=True)
        loss = self.loss(a, b, targets)
        with torch.no_grad():
            cosine = F.cosine_similarity(a.float(), b.float(), dim=-1)
            stats = {"mean_cosine": cosine.mean()}
            if cosine.numel() > 1:
                # 0/0 = NaN when either side is constant: left out of the log.
                x, y = cosine - cosine.mean(), targets.float() - targets.float().mean()
                stats["pearson"] = ((x * y).sum() / (x.norm() * y.norm())).clamp(-1, 1)
        return loss, stats


class CoSENTTask(ScoredPairTask):
    """CoSENT (:class:`losses.CoSENTLoss`, cosines times ``scale``) on gold-scored pairs.

    CoSENT depends on the order of the gold scores only, so they are used as they are:
    a ``score_scale`` would change nothing."""

    def __init__(
        self,
        scale: float = 20.0,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(CoSENTLoss(scale), 1.0, matryoshka_dims, matryoshka_weights)


class CosineSimilarityTask(ScoredPairTask):
    """Mean squared error between the cosine and ``score / score_scale``
    (:class:`losses.CosineSimilarityLoss`)."""

    def __init__(
        self,
        score_scale: float = 5.0,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(CosineSimilarityLoss(), score_scale, matryoshka_dims, matryoshka_weights)

    def check_examples(self, examples: Sequence[Example]) -> None:
        # Targets outside [0, 1] ask the cosine for values it reaches only for opposite texts.
        _check_score_range(examples, self.score_scale)


class DistillationTask(Task):
    """Base of the tasks that learn a teacher's scores of each query's candidates.

    Examples are Triplets with teacher ``scores`` (``mine.py teacher.path=...`` writes them):
    the candidates of query i are its positive and then its K negatives, all Triplets of a
    batch with the same K. Columns: queries (query tower), positives, then the negatives
    flattened row-major (doc tower); targets: the ``[B, 1 + K]`` teacher scores. The loss
    sees ``queries [B, D]`` and ``docs [B, 1 + K, D]``.

    Statistic: ``accuracy``, the fraction of queries whose student score of the positive
    is above every negative's, and ``teacher_agreement``, the fraction of queries whose
    student and teacher pick the same top candidate.
    """

    accepts = (Triplet,)
    data_hint = (
        "triplets with teacher scores, e.g. train_data=jsonl written by mine.py teacher.path=..."
    )

    def make_batch(self, examples: Sequence[Triplet]) -> TextBatch:
        self._example_type(examples)
        self.check_examples(examples)
        counts = sorted({len(e.negatives) for e in examples})
        if len(counts) > 1:
            raise ValueError(
                f"{type(self).__name__} needs the same number of negatives in every Triplet "
                f"of a batch; got {_join([str(c) for c in counts], 'and')}"
            )
        return TextBatch(
            columns=[
                [e.query for e in examples],
                [e.positive for e in examples],
                flat_negatives(examples),
            ],
            kinds=["query", "doc", "doc"],
            targets=torch.tensor([e.scores for e in examples], dtype=torch.float32),
            size=len(examples),
            owners=[
                owners_one_per_example(examples),
                owners_one_per_example(examples),
                owners_per_negative(examples),
            ],
        )

    def check_examples(self, examples: Sequence[Example]) -> None:
        for example in examples:
            if isinstance(example, Triplet) and example.scores is None:
                where = f"{example.source}: " if example.source else ""
                raise ValueError(
                    f"{where}{type(self).__name__} needs teacher scores, and this Triplet has "
                    'none: give each record "scores" (mine.py teacher.path=... writes them)'
                )

    def compute(
        self, embeddings: list[torch.Tensor], batch: TextBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        queries, positives, negatives = embeddings
        size, dim = queries.shape
        docs = torch.cat([positives.unsqueeze(1), negatives.reshape(size, -1, dim)], dim=1)
        teacher = batch.targets.to(queries.device, non_blocking=True)
        loss = self.loss(queries, docs, teacher=teacher)
        with torch.no_grad():
            student = torch.einsum("bd,bkd->bk", queries.float(), docs.float())
            stats = {
                "accuracy": (student[:, 0] > student[:, 1:].amax(dim=1)).float().mean(),
                "teacher_agreement": (student.argmax(dim=1) == teacher.argmax(dim=1))
                .float()
                .mean(),
            }
        return loss, stats


class MarginMSETask(DistillationTask):
    """MarginMSE distillation (:class:`losses.MarginMSELoss`): the student's margins
    s(q, positive) − s(q, negative_k) regress onto the teacher's. Dot products of the
    embeddings as they are (normalised by default: the margins are cosines'), so the
    teacher's scores should be on a comparable scale or the model learns to stretch them."""

    def __init__(
        self,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__(MarginMSELoss(), matryoshka_dims, matryoshka_weights)


class ListwiseKLTask(DistillationTask):
    """Listwise KL distillation (:class:`losses.ListwiseKLLoss`): the student's softmax over
    each query's candidates, at ``student_temperature``, learns the teacher's at
    ``teacher_temperature``."""

    def __init__(
        self,
        student_temperature: float = 0.05,
        teacher_temperature: float = 1.0,
        matryoshka_dims: Sequence[int] = (),
        matryoshka_weights: Sequence[float] | None = None,
    ) -> None:
        loss = ListwiseKLLoss(student_temperature, teacher_temperature)
        super().__init__(loss, matryoshka_dims, matryoshka_weights)
