"""Training losses for bi-encoders: InfoNCE (fused, chunked and naive) and pairwise losses."""

from losses.infonce import InfoNCELoss, info_nce

__all__ = ["InfoNCELoss", "info_nce"]
