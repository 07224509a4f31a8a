"""Text tables of metrics."""

from __future__ import annotations

import pytest

from biencoder.evaluation.metrics import retrieval_metrics
from biencoder.evaluation.table import format_table


def test_flat_metrics_pivot_to_families_by_cutoff():
    metrics = retrieval_metrics({"q": {"a": 2.0, "b": 1.0}}, {"q": {"b": 1}}, ks=(1, 10))
    assert format_table(metrics).splitlines() == [
        "metric         @1     @10",
        "---------  ------  ------",
        "ndcg       0.0000  0.6309",
        "mrr        0.0000  0.5000",
        "recall     0.0000  1.0000",
        "map        0.0000  0.5000",
        "precision  0.0000  0.1000",
    ]


def test_nested_rows_missing_cells_and_plain_names():
    table = format_table(
        {"bm25": {"ndcg@10": 0.4, "spearman": 0.71234}, "ours": {"ndcg@10": 0.55}},
        precision=2,
        corner="model",
    )
    assert table == "\n".join(
        [
            "model  ndcg@10  spearman",
            "-----  -------  --------",
            "bm25      0.40      0.71",
            "ours      0.55         -",
        ]
    )
    assert format_table({"spearman": 0.8, "pearson": 0.75}).splitlines()[2:] == [
        "spearman  0.8000",
        "pearson   0.7500",
    ]


@pytest.mark.parametrize("rows", [{}, {"a": 1.0, "b": {"x": 1.0}}])
def test_bad_rows(rows):
    with pytest.raises(ValueError):
        format_table(rows)
