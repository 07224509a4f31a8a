"""Pair, triplet and Matryoshka losses against explicit per-example formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from biencoder.losses.infonce import InfoNCELoss, info_nce
from biencoder.losses.pairwise import (
    ContrastiveLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    MatryoshkaLoss,
    TripletLoss,
)

BATCH, DIM, NEGATIVES = 7, 13, 3


def embeddings(*shape):
    return torch.randn(*shape, DIM, dtype=torch.float64, requires_grad=True)


def cosine(u, v):
    return float(u @ v) / math.sqrt(float(u @ u) * float(v @ v))


def distance(u, v, kind):
    if kind == "cosine":
        return 1 - cosine(u, v)
    return math.sqrt(float((u - v) @ (u - v)))


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("distance_kind", ["cosine", "euclidean"])
@pytest.mark.parametrize("num_negatives", [None, NEGATIVES], ids=["one-negative", "k-negatives"])
def test_triplet_loss_matches_loops(seed, distance_kind, num_negatives):
    margin = 0.3 if distance_kind == "cosine" else 1.5
    anchor, positive = embeddings(BATCH), embeddings(BATCH)
    negative = embeddings(BATCH) if num_negatives is None else embeddings(BATCH, num_negatives)
    loss = TripletLoss(margin=margin, distance=distance_kind)(anchor, positive, negative)

    negatives = negative.detach().reshape(BATCH, -1, DIM)
    terms = [
        max(
            0.0,
            distance(anchor[i].detach(), positive[i].detach(), distance_kind)
            - distance(anchor[i].detach(), negatives[i, k], distance_kind)
            + margin,
        )
        for i in range(BATCH)
        for k in range(negatives.shape[1])
    ]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)
    assert torch.autograd.gradcheck(
        TripletLoss(margin=margin, distance=distance_kind), (anchor, positive, negative)
    )


@pytest.mark.parametrize("distance_kind", ["cosine", "euclidean"])
def test_contrastive_loss_matches_loops(seed, distance_kind):
    margin = 0.8 if distance_kind == "cosine" else 5.0
    a, b = embeddings(BATCH), embeddings(BATCH)
    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    loss = ContrastiveLoss(margin=margin, distance=distance_kind)(a, b, labels)

    expected = 0.0
    for i in range(BATCH):
        dist = distance(a[i].detach(), b[i].detach(), distance_kind)
        expected += dist**2 if labels[i] == 1 else max(0.0, margin - dist) ** 2
    assert loss.item() == pytest.approx(expected / (2 * BATCH), rel=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, b: ContrastiveLoss(margin, distance_kind)(a, b, labels), (a, b)
    )


def test_cosine_similarity_loss_matches_loops(seed):
    a, b = embeddings(BATCH), embeddings(BATCH)
    scores = torch.rand(BATCH, dtype=torch.float64) * 2 - 1
    loss = CosineSimilarityLoss()(a, b, scores)
    expected = (
        sum((cosine(a[i].detach(), b[i].detach()) - scores[i].item()) ** 2 for i in range(BATCH))
        / BATCH
    )
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: CosineSimilarityLoss()(a, b, scores), (a, b))


def test_cosent_loss_matches_loops(seed):
    scale = 7.0
    a, b = embeddings(BATCH), embeddings(BATCH)
    scores = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.0, 1.0, 0.3], dtype=torch.float64)
    loss = CoSENTLoss(scale=scale)(a, b, scores)

    cosines = [cosine(a[i].detach(), b[i].detach()) for i in range(BATCH)]
    total = 1.0
    for i in range(BATCH):
        for j in range(BATCH):
            if scores[i] > scores[j]:
                total += math.exp(scale * (cosines[j] - cosines[i]))
    assert loss.item() == pytest.approx(math.log(total), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: CoSENTLoss(scale)(a, b, scores), (a, b))


def test_cosent_loss_without_ranked_pairs_is_zero(seed):
    a, b = embeddings(BATCH), embeddings(BATCH)
    loss = CoSENTLoss()(a, b, torch.full((BATCH,), 0.5))
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(loss, (a, b)))


def test_distance_must_be_known():
    with pytest.raises(ValueError):
        TripletLoss(distance="manhattan")
    with pytest.raises(ValueError):
        ContrastiveLoss(distance="dot")


# ------------------------------------------------------------------------------------------
# Matryoshka
# ------------------------------------------------------------------------------------------


def test_matryoshka_sums_weighted_truncated_losses(seed):
    dims, weights = [4, 9, DIM], [0.5, 1.0, 2.0]
    a, b = embeddings(BATCH), embeddings(BATCH)
    scores = torch.rand(BATCH, dtype=torch.float64)
    inner = CoSENTLoss(scale=5.0)
    loss = MatryoshkaLoss(inner, dims, weights)(a, b, scores)
    expected = sum(
        w * inner(a[:, :k], b[:, :k], scores) for k, w in zip(dims, weights, strict=True)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: MatryoshkaLoss(inner, dims)(a, b, scores), (a, b))


def test_matryoshka_truncates_k_negatives_and_passes_labels(seed):
    anchor, positive, negative = embeddings(BATCH), embeddings(BATCH), embeddings(BATCH, 3)
    inner = TripletLoss(margin=0.5)
    loss = MatryoshkaLoss(inner, [5])(anchor, positive, negative)
    assert loss.item() == inner(anchor[:, :5], positive[:, :5], negative[..., :5]).item()

    labels = torch.tensor([1, 0, 1, 1, 0, 0, 1])
    contrastive = ContrastiveLoss()
    loss = MatryoshkaLoss(contrastive, [6])(anchor, positive, labels)
    assert loss.item() == contrastive(anchor[:, :6], positive[:, :6], labels).item()


def test_matryoshka_renormalises_for_infonce(seed):
    """InfoNCELoss declares expects_normalized: truncated unit vectors are rescaled."""
    q = F.normalize(torch.randn(BATCH, DIM, dtype=torch.float64), dim=1)
    d = F.normalize(torch.randn(2 * BATCH, DIM, dtype=torch.float64), dim=1)
    doc_ids = torch.arange(2 * BATCH)
    inner = InfoNCELoss(temperature=0.05, impl="naive")
    loss = MatryoshkaLoss(inner, [6, DIM])(q, d, doc_ids=doc_ids)
    expected = info_nce(
        F.normalize(q[:, :6], dim=1), F.normalize(d[:, :6], dim=1), 0.05, impl="naive"
    ) + info_nce(q, d, 0.05, impl="naive")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_matryoshka_normalize_flag_overrides_the_default(seed):
    q = F.normalize(torch.randn(BATCH, DIM, dtype=torch.float64), dim=1)
    d = F.normalize(torch.randn(BATCH, DIM, dtype=torch.float64), dim=1)
    raw = MatryoshkaLoss(InfoNCELoss(impl="naive"), [6], normalize=False)(q, d)
    assert raw.item() == pytest.approx(info_nce(q[:, :6], d[:, :6], impl="naive").item())
    functional = MatryoshkaLoss(lambda q, d: info_nce(q, d, impl="naive"), [6], normalize=True)
    expected = info_nce(F.normalize(q[:, :6], dim=1), F.normalize(d[:, :6], dim=1), impl="naive")
    assert functional(q, d).item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    ("dims", "weights"),
    [([], None), ([0, 4], None), ([4, 8], [1.0])],
    ids=["empty", "zero-dim", "weights-length"],
)
def test_matryoshka_validates_dims_and_weights(dims, weights):
    with pytest.raises(ValueError):
        MatryoshkaLoss(CosineSimilarityLoss(), dims, weights)


def test_matryoshka_rejects_dims_beyond_the_embedding(seed):
    a, b = embeddings(BATCH), embeddings(BATCH)
    with pytest.raises(ValueError):
        MatryoshkaLoss(CosineSimilarityLoss(), [DIM + 1])(a, b, torch.zeros(BATCH))
