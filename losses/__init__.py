"""Training losses for bi-encoders: InfoNCE (fused, chunked and naive), pair and triplet
losses, distillation from teacher scores (MarginMSE, listwise KL), and Matryoshka
truncation of any of them.

Importing this package registers InfoNCE's custom operators (``torch.ops.biencoder``), which
torch.compile traces without a graph break."""

from losses.distillation import ListwiseKLLoss, MarginMSELoss, listwise_kl, margin_mse
from losses.infonce import InfoNCELoss, InfoNCEStats, info_nce
from losses.pairwise import (
    ContrastiveLoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    MatryoshkaLoss,
    TripletLoss,
)

__all__ = [
    "CoSENTLoss",
    "ContrastiveLoss",
    "CosineSimilarityLoss",
    "InfoNCELoss",
    "InfoNCEStats",
    "ListwiseKLLoss",
    "MarginMSELoss",
    "MatryoshkaLoss",
    "TripletLoss",
    "info_nce",
    "listwise_kl",
    "margin_mse",
]
