"""Tasks: batches from hand-made examples, losses against the losses called by hand, and
statistics against explicit loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from biencoder.data.sts import ScoredPair
from biencoder.data.training import LabelledText, Pair, Triplet
from biencoder.losses.infonce import InfoNCELoss
from biencoder.losses.pairwise import CoSENTLoss, CosineSimilarityLoss, MatryoshkaLoss
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.tasks import (
    ContrastiveTask,
    CoSENTTask,
    CosineSimilarityTask,
    TextBatch,
    TripletTask,
    read_stats,
)

DIM = 8

# "Paris" is the positive of row 1 and a negative of row 0; "K2" is a negative twice.
TRIPLETS = [
    Triplet("q0", "p0", ("Paris", "K2")),
    Triplet("q1", "Paris", ("n1", "p1")),
    Triplet("q2", "p2", ("K2", "n2")),
]
PAIRS = [Pair("q0", "p0"), Pair("q1", "p1"), Pair("q2", "p0")]
SCORED = [
    ScoredPair("a", "b", 4.5),
    ScoredPair("c", "d", 1.0),
    ScoredPair("e", "f", 4.0),
    ScoredPair("g", "h", 2.5),
]


def embed(batch: TextBatch, seed: int = 0, normalize: bool = True) -> list[torch.Tensor]:
    """Random embeddings, one tensor per column, as a model would return them."""
    generator = torch.Generator().manual_seed(seed)
    columns = [torch.randn(len(column), DIM, generator=generator) for column in batch.columns]
    return [F.normalize(c, dim=-1) if normalize else c for c in columns]


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


# ------------------------------------------------------------------------------ batches


def test_infonce_batch_from_triplets_masks_equal_texts():
    batch = InfoNCETask().make_batch(TRIPLETS)
    assert batch.columns == [
        ["q0", "q1", "q2"],
        ["p0", "Paris", "p2"],
        ["Paris", "K2", "n1", "p1", "K2", "n2"],
    ]
    assert batch.kinds == ["query", "doc", "doc"]
    assert batch.size == 3
    assert batch.targets is None
    documents = batch.columns[1] + batch.columns[2]
    ids = batch.doc_ids.tolist()
    assert batch.doc_ids.dtype == torch.long
    assert len(ids) == len(documents)
    for i, text_i in enumerate(documents):
        for j, text_j in enumerate(documents):
            assert (ids[i] == ids[j]) == (text_i == text_j), (text_i, text_j)
    # Spelled out: the negative "Paris" is row 1's positive, the two "K2" are one text.
    assert ids[3] == ids[1] and ids[4] == ids[7]
    assert len(set(ids)) == 7


def test_infonce_batch_from_pairs():
    batch = InfoNCETask().make_batch(PAIRS)
    assert batch.columns == [["q0", "q1", "q2"], ["p0", "p1", "p0"]]
    assert batch.kinds == ["query", "doc"]
    assert batch.doc_ids.tolist() == [0, 1, 0]


def test_triplet_batches():
    task = TripletTask()
    batch = task.make_batch(TRIPLETS)
    assert batch.columns == InfoNCETask().make_batch(TRIPLETS).columns
    assert batch.kinds == ["query", "doc", "doc"]
    assert batch.targets is None and batch.doc_ids is None and batch.size == 3
    pairs = task.make_batch(PAIRS)
    assert pairs.columns == [["q0", "q1", "q2"], ["p0", "p1", "p0"]]
    assert pairs.kinds == ["query", "doc"]


def test_triplet_batch_needs_equal_negative_counts_and_two_pairs():
    task = TripletTask()
    with pytest.raises(ValueError, match=r"same, nonzero number of negatives.*got 1 and 2"):
        task.make_batch([Triplet("q", "p", ("n",)), Triplet("q", "p", ("n", "m"))])
    with pytest.raises(ValueError, match="at least 2 examples; got 1"):
        task.make_batch(PAIRS[:1])


def test_contrastive_batches():
    task = ContrastiveTask()
    triplets = task.make_batch(TRIPLETS[:2])
    assert triplets.columns == [
        ["q0", "q1", "q0", "q0", "q1", "q1"],
        ["p0", "Paris", "Paris", "K2", "n1", "p1"],
    ]
    assert triplets.kinds == ["query", "doc"]
    assert triplets.targets.tolist() == [1, 1, 0, 0, 0, 0]
    assert triplets.size == 2

    pairs = task.make_batch(PAIRS)
    assert pairs.columns == [["q0", "q1", "q2"] * 2, ["p0", "p1", "p0", "p1", "p0", "p0"]]
    assert pairs.targets.tolist() == [1, 1, 1, 0, 0, 0]

    scored = task.make_batch(SCORED)
    assert scored.columns == [["a", "c", "e", "g"], ["b", "d", "f", "h"]]
    assert scored.kinds == ["query", "query"]
    assert scored.targets.dtype == torch.float32
    assert scored.targets.tolist() == [1, 0, 1, 0]  # score >= 4.0


def test_contrastive_checks_the_score_scale():
    with pytest.raises(ValueError, match=r"outside \[0, 5\.0\]"):
        ContrastiveTask().make_batch([ScoredPair("a", "b", 80.0)])
    with pytest.raises(ValueError, match=r"threshold: must be in \(0, score_scale=1.0\]"):
        ContrastiveTask(threshold=4.0, score_scale=1.0)
    low = ContrastiveTask(threshold=0.5, score_scale=1.0)
    assert low.make_batch([ScoredPair("a", "b", 0.7)]).targets.tolist() == [1]


@pytest.mark.parametrize(
    "task", [ContrastiveTask(), CosineSimilarityTask()], ids=["contrastive", "cosine"]
)
def test_scores_outside_the_declared_scale_are_refused_naming_file_and_line(task):
    good = ScoredPair("a", "b", 5.0, source="sts.csv:3")
    bad = ScoredPair("c", "d", 7.5, source="sts.csv:4")
    task.check_examples([good])
    with pytest.raises(ValueError, match=r"^sts.csv:4: score 7.5 outside \[0, 5.0\] \(loss"):
        task.check_examples([good, bad])
    with pytest.raises(ValueError, match=r"sts.csv:3: score -2"):
        task.check_examples([ScoredPair("a", "b", -2.0, source="sts.csv:3")])


def test_cosent_ranks_scores_on_any_scale():
    CoSENTTask().check_examples([ScoredPair("a", "b", 40.0), ScoredPair("c", "d", -3.0)])


def test_scored_pair_batch():
    batch = CosineSimilarityTask().make_batch(SCORED)
    assert batch.columns == [["a", "c", "e", "g"], ["b", "d", "f", "h"]]
    assert batch.kinds == ["query", "query"]
    torch.testing.assert_close(batch.targets, torch.tensor([0.9, 0.2, 0.8, 0.5]))
    assert batch.doc_ids is None and batch.size == 4
    assert CosineSimilarityTask(score_scale=1.0).make_batch(SCORED[:1]).targets == 4.5
    # CoSENT ranks by the gold scores as they are.
    torch.testing.assert_close(
        CoSENTTask().make_batch(SCORED).targets, torch.tensor([4.5, 1, 4, 2.5])
    )


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("task", "examples", "message"),
    [
        (
            CoSENTTask(),
            PAIRS,
            "CoSENTTask needs ScoredPair examples (data with scores, "
            "e.g. train_data=sts); got Pair",
        ),
        (
            InfoNCETask(),
            SCORED,
            "InfoNCETask needs Pair or Triplet examples (query/positive data, e.g. "
            "train_data=scifact); got ScoredPair",
        ),
        (
            TripletTask(),
            SCORED,
            "TripletTask needs Pair or Triplet examples (query/positive data, e.g. "
            "train_data=scifact); got ScoredPair",
        ),
        (
            ContrastiveTask(),
            [LabelledText("t", 1)],
            "ContrastiveTask needs Pair, Triplet or ScoredPair examples (retrieval data, e.g. "
            "train_data=scifact, or data with scores, e.g. train_data=sts); got LabelledText",
        ),
        (
            InfoNCETask(),
            [PAIRS[0], TRIPLETS[0]],
            "InfoNCETask needs one example type per batch; got Pair and Triplet",
        ),
    ],
    ids=["scored-pair", "infonce", "triplet", "contrastive", "mixed"],
)
def test_unsupported_examples_raise_a_type_error_naming_the_task(task, examples, message):
    with pytest.raises(TypeError) as error:
        task.make_batch(examples)
    assert str(error.value) == message


def test_empty_batches_and_stray_matryoshka_weights_are_refused():
    with pytest.raises(ValueError, match="InfoNCETask got an empty batch"):
        InfoNCETask().make_batch([])
    with pytest.raises(ValueError, match="matryoshka_weights: 1 weights for 0 matryoshka_dims"):
        InfoNCETask(matryoshka_weights=[1.0])
    with pytest.raises(ValueError, match=r"matryoshka_dims: must be positive, got \[8, 0\]"):
        InfoNCETask(matryoshka_dims=[8, 0])


# -------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("examples", [TRIPLETS, PAIRS], ids=["triplets", "pairs"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_infonce_loss_is_the_loss_on_queries_and_positives_then_negatives(examples, symmetric):
    task = InfoNCETask(temperature=0.1, symmetric=symmetric, impl="naive")
    loss = task.base_loss
    batch = task.make_batch(examples)
    embeddings = embed(batch)
    if examples is TRIPLETS:
        # positives p0 Paris p2, negatives Paris K2 n1 p1 K2 n2
        doc_ids = torch.tensor([0, 1, 2, 1, 3, 4, 5, 3, 6])
        # Equal texts embed equally: unmasked, the negative "Paris" would rival row 1's positive.
        embeddings[2][0] = embeddings[1][1]
    else:
        doc_ids = torch.tensor([0, 1, 0])
    q, d = embeddings[0], torch.cat(embeddings[1:])
    torch.testing.assert_close(task(embeddings, batch)[0], loss(q, d, doc_ids))
    assert not torch.allclose(task(embeddings, batch)[0], loss(q, d))


def test_matryoshka_infonce_sums_the_truncated_losses():
    task = InfoNCETask(
        temperature=0.1, impl="naive", matryoshka_dims=[2, 4, 8], matryoshka_weights=[0.5, 1, 2]
    )
    loss = InfoNCELoss(temperature=0.1, impl="naive")
    batch = task.make_batch(TRIPLETS)
    embeddings = embed(batch)
    q, d = embeddings[0], torch.cat(embeddings[1:])
    truncated = [(F.normalize(q[:, :k], dim=-1), F.normalize(d[:, :k], dim=-1)) for k in (2, 4, 8)]
    expected = sum(
        weight * loss(q_k, d_k, batch.doc_ids)
        for (q_k, d_k), weight in zip(truncated, [0.5, 1.0, 2.0], strict=True)
    )
    torch.testing.assert_close(task(embeddings, batch)[0], expected)
    assert isinstance(task.loss, MatryoshkaLoss) and isinstance(task.base_loss, InfoNCELoss)
    assert task.matryoshka_dims == [2, 4, 8]


def test_matryoshka_infonce_reports_the_stats_of_the_widest_truncation():
    # Listed out of order, so that "the first" or "the last" dim would give other stats.
    task = InfoNCETask(temperature=0.1, impl="naive", matryoshka_dims=[4, DIM, 2])
    batch = task.make_batch(TRIPLETS)
    embeddings = embed(batch, seed=6)
    _, stats = task(embeddings, batch)
    stats = read_stats(stats)
    _, full = InfoNCETask(temperature=0.1, impl="naive")(embeddings, batch)
    full = read_stats(full)
    assert stats == pytest.approx(full)
    narrow = InfoNCETask(temperature=0.1, impl="naive", matryoshka_dims=[2])
    assert read_stats(narrow(embeddings, batch)[1])["margin"] != pytest.approx(full["margin"])


def test_triplet_loss_with_k_negatives_and_with_in_batch_negatives():
    task = TripletTask(margin=0.3)
    loss = task.base_loss
    assert loss.margin == 0.3
    batch = task.make_batch(TRIPLETS)
    a, p, n = embed(batch)
    torch.testing.assert_close(task([a, p, n], batch)[0], loss(a, p, n.view(3, 2, DIM)))

    batch = task.make_batch(PAIRS)
    a, p = embed(batch)
    torch.testing.assert_close(task([a, p], batch)[0], loss(a, p, p[[1, 2, 0]]))


@pytest.mark.parametrize("examples", [TRIPLETS, PAIRS, SCORED], ids=["triplets", "pairs", "sts"])
def test_contrastive_loss_is_the_loss_on_the_pair_rows(examples):
    task = ContrastiveTask(margin=0.7)
    loss = task.base_loss
    assert loss.margin == 0.7
    batch = task.make_batch(examples)
    left, right = embed(batch)
    torch.testing.assert_close(task([left, right], batch)[0], loss(left, right, batch.targets))


@pytest.mark.parametrize(
    ("task", "loss", "targets"),
    [
        (CoSENTTask(scale=7.0), CoSENTLoss(scale=7.0), [4.5, 1.0, 4.0, 2.5]),
        (CosineSimilarityTask(score_scale=5.0), CosineSimilarityLoss(), [0.9, 0.2, 0.8, 0.5]),
    ],
    ids=["cosent", "cosine"],
)
def test_scored_pair_loss_is_the_loss_on_the_targets(task, loss, targets):
    batch = task.make_batch(SCORED)
    a, b = embed(batch, normalize=False)
    expected = loss(a, b, torch.tensor(targets))
    torch.testing.assert_close(task([a, b], batch)[0], expected)


def test_learnable_temperature_trains_and_saves_with_the_task():
    task = InfoNCETask(learnable_temperature=True, matryoshka_dims=[4, 8])
    assert [name for name, _ in task.named_parameters()] == ["loss.loss.log_scale"]
    batch = task.make_batch(PAIRS)
    loss, _ = task(embed(batch), batch)
    loss.backward()
    assert task.loss.loss.log_scale.grad is not None


# --------------------------------------------------------------------------------- stats


def test_infonce_stats_by_hand():
    task = InfoNCETask(temperature=0.07)
    batch = task.make_batch(TRIPLETS)
    embeddings = embed(batch, seed=3)
    q, d = embeddings[0], torch.cat(embeddings[1:])
    ids = batch.doc_ids.tolist()
    rows, docs = q.shape[0], d.shape[0]
    correct, margins, masked, mined = 0, [], 0, 0
    for i in range(rows):
        scores = [float(q[i] @ d[j]) for j in range(docs)]
        others = [j for j in range(docs) if j != i and ids[j] != ids[i]]
        masked += sum(1 for j in range(docs) if j != i and ids[j] == ids[i])
        correct += all(scores[i] > scores[j] for j in others)
        margins.append(scores[i] - max(scores[j] for j in others))
        mined += max(others, key=lambda j: scores[j]) >= rows

    _, stats = task(embeddings, batch)

    stats = read_stats(stats)
    assert stats.keys() == {
        "accuracy",
        "margin",
        "false_negative_fraction",
        "hardest_negative_mined_fraction",
        "temperature",
    }
    assert stats["hardest_negative_mined_fraction"] == pytest.approx(mined / rows)
    assert stats["accuracy"] == pytest.approx(correct / rows)
    assert stats["margin"] == pytest.approx(sum(margins) / rows, abs=1e-6)
    assert masked == 1  # row 1's positive "Paris" appears again as row 0's negative
    assert stats["false_negative_fraction"] == pytest.approx(masked / (rows * (docs - 1)))
    assert stats["temperature"] == pytest.approx(0.07)


def test_infonce_accuracy_and_margin_on_a_worked_example():
    task = InfoNCETask(learnable_temperature=True, temperature=0.2)
    batch = task.make_batch([Pair("q0", "same"), Pair("q1", "other"), Pair("q2", "same")])
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    d = torch.tensor([[0.8, 0.6], [0.0, 1.0], [0.8, 0.6]])
    # Row 0: d0·q0 = .8, d1 = 0 (d2 is "same" text: masked)          -> correct, margin .8
    # Row 1: d1·q1 = 1, best other .6                                -> correct, margin .4
    # Row 2: d2·q2 = .96, d1 = .8 (d0 masked)                        -> correct, margin .16
    _, stats = task([q, d], batch)
    stats = read_stats(stats)
    assert stats["accuracy"] == 1.0
    assert stats["margin"] == pytest.approx((0.8 + 0.4 + 0.16) / 3)
    assert stats["false_negative_fraction"] == pytest.approx(2 / 6)
    assert stats["temperature"] == pytest.approx(0.2)

    q_wrong = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])  # row 0 now prefers d1
    _, stats = task([q_wrong, d], batch)
    stats = read_stats(stats)
    assert stats["accuracy"] == pytest.approx(2 / 3)
    assert stats["margin"] == pytest.approx((-0.4 + 0.4 + 0.16) / 3)


def test_a_single_pair_has_no_margin():
    task = InfoNCETask()
    batch = task.make_batch(PAIRS[:1])
    _, stats = task(embed(batch), batch)
    stats = read_stats(stats)
    assert "margin" not in stats
    assert stats["accuracy"] == 1.0 and stats["false_negative_fraction"] == 0.0


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_triplet_accuracy_by_hand(distance):
    task = TripletTask(distance=distance)
    batch = task.make_batch(TRIPLETS)
    a, p, n = embed(batch, seed=5, normalize=False)

    def dist(u, v):
        return 1 - cosine(u, v) if distance == "cosine" else float((u - v).norm())

    wins = [dist(a[i], p[i]) < dist(a[i], n[2 * i + k]) for i in range(3) for k in range(2)]
    _, stats = task([a, p, n], batch)
    stats = read_stats(stats)
    assert stats == {"accuracy": pytest.approx(sum(wins) / len(wins))}


def test_contrastive_stats_by_hand():
    task = ContrastiveTask()
    batch = task.make_batch(TRIPLETS)
    left, right = embed(batch, seed=2)
    labels = batch.targets.tolist()
    distances = [1 - cosine(left[i], right[i]) for i in range(len(labels))]
    _, stats = task([left, right], batch)
    stats = read_stats(stats)
    positive = [x for x, y in zip(distances, labels, strict=True) if y == 1]
    negative = [x for x, y in zip(distances, labels, strict=True) if y == 0]
    assert stats["positive_distance"] == pytest.approx(sum(positive) / len(positive))
    assert stats["negative_distance"] == pytest.approx(sum(negative) / len(negative))
    assert "temperature" not in stats


def test_scored_pair_stats_by_hand():
    task = CosineSimilarityTask()
    batch = task.make_batch(SCORED)
    a, b = embed(batch, seed=4, normalize=False)
    cosines = [cosine(a[i], b[i]) for i in range(4)]
    targets = batch.targets.tolist()
    mean_c, mean_t = sum(cosines) / 4, sum(targets) / 4
    covariance = sum((c - mean_c) * (t - mean_t) for c, t in zip(cosines, targets, strict=True))
    pearson = covariance / math.sqrt(
        sum((c - mean_c) ** 2 for c in cosines) * sum((t - mean_t) ** 2 for t in targets)
    )
    _, stats = task([a, b], batch)
    stats = read_stats(stats)
    assert stats["mean_cosine"] == pytest.approx(mean_c, abs=1e-6)
    assert stats["pearson"] == pytest.approx(pearson, abs=1e-5)
