"""Distillation losses against per-example loops written from their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from biencoder.losses.distillation import ListwiseKLLoss, MarginMSELoss, listwise_kl, margin_mse
from biencoder.losses.pairwise import MatryoshkaLoss

SHAPES = [(1, 2, 3), (5, 4, 16), (7, 3, 33)]  # (B, K, D): one query, odd sizes


def inputs(B, K, D, dtype=torch.float64):
    generator = torch.Generator().manual_seed(B * 100 + K * 10 + D)
    queries = torch.randn(B, D, generator=generator, dtype=dtype, requires_grad=True)
    docs = torch.randn(B, K, D, generator=generator, dtype=dtype, requires_grad=True)
    teacher = 5 * torch.randn(B, K, generator=generator, dtype=dtype)
    return queries, docs, teacher


def margin_mse_loop(queries, docs, teacher):
    terms = []
    for b in range(len(queries)):
        scores = [float(queries[b] @ docs[b, k]) for k in range(docs.shape[1])]
        for k in range(1, docs.shape[1]):
            student = scores[0] - scores[k]
            target = float(teacher[b, 0] - teacher[b, k])
            terms.append((student - target) ** 2)
    return sum(terms) / len(terms)


def listwise_kl_loop(queries, docs, teacher, student_temperature, teacher_temperature):
    total = 0.0
    for b in range(len(queries)):
        student = [float(queries[b] @ d) / student_temperature for d in docs[b]]
        target = [float(t) / teacher_temperature for t in teacher[b]]
        student_norm = math.log(sum(math.exp(s) for s in student))
        target_norm = math.log(sum(math.exp(t) for t in target))
        for s, t in zip(student, target, strict=True):
            p = math.exp(t - target_norm)
            total += p * ((t - target_norm) - (s - student_norm))
    return total / len(queries)


@pytest.mark.parametrize("shape", SHAPES)
def test_margin_mse_is_its_definition(shape):
    queries, docs, teacher = inputs(*shape)
    expected = margin_mse_loop(queries.detach(), docs.detach(), teacher)
    assert margin_mse(queries, docs, teacher).item() == pytest.approx(expected, rel=1e-12)
    assert MarginMSELoss()(queries, docs, teacher=teacher).item() == pytest.approx(
        expected, rel=1e-12
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperatures", [(0.05, 1.0), (0.5, 2.0)])
def test_listwise_kl_is_its_definition(shape, temperatures):
    queries, docs, teacher = inputs(*shape)
    queries = F.normalize(queries, dim=-1)
    docs = F.normalize(docs, dim=-1)
    expected = listwise_kl_loop(queries.detach(), docs.detach(), teacher, *temperatures)
    loss = listwise_kl(queries, docs, teacher, *temperatures)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    assert ListwiseKLLoss(*temperatures)(queries, docs, teacher=teacher).item() == pytest.approx(
        expected, rel=1e-10, abs=1e-14
    )


def test_listwise_kl_is_zero_when_the_student_ranks_like_the_teacher():
    queries, docs, _ = inputs(4, 3, 8)
    teacher = torch.einsum("bd,bkd->bk", queries, docs).detach() / 0.05
    assert listwise_kl(queries, docs, teacher, 0.05, 1.0).item() == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("loss", ["margin_mse", "listwise_kl"])
def test_gradients_in_float64(loss):
    queries, docs, teacher = inputs(3, 4, 5)
    function = {"margin_mse": margin_mse, "listwise_kl": listwise_kl}[loss]
    assert torch.autograd.gradcheck(lambda q, d: function(q, d, teacher), (queries, docs))


@pytest.mark.parametrize(
    ("dtype", "rel"), [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"]
)
def test_non_unit_upstream_gradient_scales_every_gradient(dtype, rel):
    queries, docs, teacher = inputs(5, 3, 7, dtype)
    for function in (margin_mse, listwise_kl):
        (dq, dd) = torch.autograd.grad(function(queries, docs, teacher), (queries, docs))
        (dq3, dd3) = torch.autograd.grad(
            function(queries, docs, teacher),
            (queries, docs),
            grad_outputs=torch.tensor(-3.0, dtype=dtype),
        )
        # Relative to the largest gradient: elements near zero round differently.
        torch.testing.assert_close(dq3, -3 * dq, rtol=0, atol=rel * 3 * dq.abs().max().item())
        torch.testing.assert_close(dd3, -3 * dd, rtol=0, atol=rel * 3 * dd.abs().max().item())


def test_matryoshka_truncates_embeddings_and_leaves_teacher_scores():
    """Teacher scores are [B, K] floats, as embeddings look: truncated like them, to 16 they
    would be refused and to 4 they would drop candidates."""
    queries, docs, teacher = inputs(4, 8, 16)
    wrapped = MatryoshkaLoss(MarginMSELoss(), dims=[16, 8], weights=[1.0, 0.5])
    expected = margin_mse(queries, docs, teacher) + 0.5 * margin_mse(
        queries[:, :8], docs[..., :8], teacher
    )
    torch.testing.assert_close(
        wrapped(queries, docs, teacher=teacher), expected, rtol=1e-12, atol=0
    )

    kl = MatryoshkaLoss(ListwiseKLLoss(), dims=[16, 4])
    expected = listwise_kl(
        F.normalize(queries, dim=-1), F.normalize(docs, dim=-1), teacher
    ) + listwise_kl(
        F.normalize(queries[:, :4], dim=-1), F.normalize(docs[..., :4], dim=-1), teacher
    )
    torch.testing.assert_close(kl(queries, docs, teacher=teacher), expected, rtol=1e-12, atol=0)


def test_bad_shapes_and_temperatures_are_refused():
    queries, docs, teacher = inputs(3, 4, 5)
    with pytest.raises(ValueError, match="docs must be"):
        margin_mse(queries, docs[:2], teacher)
    with pytest.raises(ValueError, match="teacher scores must be"):
        listwise_kl(queries, docs, teacher[:, :3])
    with pytest.raises(ValueError, match="at least 2 candidates"):
        margin_mse(queries, docs[:, :1], teacher[:, :1])
    with pytest.raises(ValueError, match="temperatures must be positive"):
        ListwiseKLLoss(student_temperature=0.0)
