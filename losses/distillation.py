"""Distillation losses: a student bi-encoder learns a teacher's scores for the same
(query, document) candidates, read from the training data.

Scores are dot products of the student's embeddings (cosine when they are normalised), as
in MarginMSE (Hofstätter et al., 2020, "Improving Efficient Neural Ranking Models with
Cross-Architecture Knowledge Distillation") and listwise KL distillation (RocketQAv2,
sentence-transformers' DistillKLDivLoss). Queries are ``[B, D]``; each query has K
candidate documents ``[B, K, D]``, the first usually its positive, and teacher scores
``[B, K]`` for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_shapes(queries: torch.Tensor, docs: torch.Tensor, teacher: torch.Tensor) -> None:
    B, D = queries.shape
    if docs.ndim != 3 or docs.shape[0] != B or docs.shape[2] != D:
        raise ValueError(f"docs must be [B={B}, K, D={D}], got {tuple(docs.shape)}")
    if teacher.shape != docs.shape[:2]:
        raise ValueError(
            f"teacher scores must be [B, K] = {tuple(docs.shape[:2])}, got {tuple(teacher.shape)}"
        )
    if docs.shape[1] < 2:
        raise ValueError(f"distillation needs at least 2 candidates per query, got {docs.shape[1]}")


def student_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """[B, D] queries, [B, K, D] candidates -> [B, K] dot products."""
    return torch.einsum("bd,bkd->bk", queries, docs)


def margin_mse(queries: torch.Tensor, docs: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the student's and the teacher's margins
    ``s(q, d_0) − s(q, d_k)`` over every query and every candidate k ≥ 1 (``d_0`` is the
    positive). Margins rather than scores: the teacher's scale (a cross-encoder's logits)
    need not match the student's, only its differences."""
    _check_shapes(queries, docs, teacher)
    student = student_scores(queries, docs)
    student_margin = student[:, :1] - student[:, 1:]  # [B, K-1]
    teacher_margin = (teacher[:, :1] - teacher[:, 1:]).to(student.dtype)
    return F.mse_loss(student_margin, teacher_margin)


def listwise_kl(
    queries: torch.Tensor,
    docs: torch.Tensor,
    teacher: torch.Tensor,
    student_temperature: float = 0.05,
    teacher_temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher ‖ student) between the softmax distributions over each query's K
    candidates, ``softmax(teacher / teacher_temperature)`` and
    ``softmax(student / student_temperature)``, averaged over queries."""
    _check_shapes(queries, docs, teacher)
    if student_temperature <= 0 or teacher_temperature <= 0:
        raise ValueError(
            f"temperatures must be positive, got student {student_temperature}, "
            f"teacher {teacher_temperature}"
        )
    student = F.log_softmax(student_scores(queries, docs) / student_temperature, dim=-1)
    target = F.log_softmax(teacher.to(student.dtype) / teacher_temperature, dim=-1)
    return F.kl_div(student, target, reduction="batchmean", log_target=True)


class MarginMSELoss(nn.Module):
    """:func:`margin_mse` as a module; pass the teacher scores as ``teacher=``."""

    expects_normalized = False
    not_embeddings = ("teacher",)

    def forward(
        self, queries: torch.Tensor, docs: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        return margin_mse(queries, docs, teacher)


class ListwiseKLLoss(nn.Module):
    """:func:`listwise_kl` as a module, with its two temperatures; pass the teacher scores
    as ``teacher=``."""

    expects_normalized = True
    not_embeddings = ("teacher",)

    def __init__(self, student_temperature: float = 0.05, teacher_temperature: float = 1.0):
        super().__init__()
        if student_temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(
                f"temperatures must be positive, got student {student_temperature}, "
                f"teacher {teacher_temperature}"
            )
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature

    def forward(
        self, queries: torch.Tensor, docs: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        return listwise_kl(
            queries, docs, teacher, self.student_temperature, self.teacher_temperature
        )
