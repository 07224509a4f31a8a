"""Evaluation: trec_eval-exact IR metrics, FAISS search, STS correlation, embedding geometry,
TREC files, and the evaluators that embed a dataset with a BiEncoder and score it."""

from evaluation.config import EvalConfig, IndexSpec
from evaluation.geometry import alignment, geometry_metrics, norm_stats, uniformity
from evaluation.metrics import (
    DEFAULT_KS,
    METRIC_FAMILIES,
    Qrels,
    Run,
    per_query_metrics,
    retrieval_metrics,
    trec_order,
)
from evaluation.retrieval import (
    RetrievalResult,
    evaluate_retrieval,
    evaluate_sts,
)
from evaluation.scoring import evaluate, score
from evaluation.search import build_index, check_index_dims, search, to_run
from evaluation.sts import pearson, spearman, sts_metrics
from evaluation.table import format_table
from evaluation.trec import read_trec_qrels, read_trec_run, write_trec_qrels, write_trec_run

__all__ = [
    "DEFAULT_KS",
    "METRIC_FAMILIES",
    "EvalConfig",
    "IndexSpec",
    "Qrels",
    "RetrievalResult",
    "Run",
    "alignment",
    "build_index",
    "check_index_dims",
    "evaluate",
    "evaluate_retrieval",
    "evaluate_sts",
    "format_table",
    "geometry_metrics",
    "norm_stats",
    "pearson",
    "per_query_metrics",
    "read_trec_qrels",
    "read_trec_run",
    "retrieval_metrics",
    "score",
    "search",
    "spearman",
    "sts_metrics",
    "to_run",
    "trec_order",
    "uniformity",
    "write_trec_qrels",
    "write_trec_run",
]
