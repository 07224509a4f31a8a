"""Scoring a model as the evaluation settings say: the dispatch between retrieval (BEIR) and
STS that both entry points and the trainer's dev evaluations use, and the final evaluation's
files (metrics.json, run.trec) and printed table."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from biencoder.data.beir import BeirDataset
from biencoder.evaluation.config import EvalConfig, FunnelConfig, QuantizationConfig
from biencoder.evaluation.retrieval import evaluate_retrieval, evaluate_sts
from biencoder.evaluation.table import format_table
from biencoder.evaluation.trec import write_trec_run
from biencoder.model.biencoder import BiEncoder
from biencoder.retrieval.store import Sharding

log = logging.getLogger(__name__)

# The run folder's embedding store, unless evaluation.store names another.
STORE_FOLDER = "embeddings"


def score(
    model: BiEncoder,
    dataset,
    evaluation: EvalConfig,
    matryoshka_dims: Sequence[int] = (),
    *,
    funnel: FunnelConfig | None = None,
    quantization: QuantizationConfig | None = None,
    store: Path | None = None,
    sharding: Sharding | None = None,
):
    """Metrics, timings and (for retrieval) the run of ``model`` on a BEIR or STS dataset.

    Full-dimension metrics are always there, so a Matryoshka dim equal to the model's is
    not scored twice. ``funnel`` and ``quantization`` search BEIR data a cheaper way
    (``evaluate_retrieval``); STS data refuses them. ``store`` (``evaluation.store`` when
    set, else the caller's) is where retrieval looks up and writes embeddings, with
    ``sharding`` the processes that encode them together."""
    matryoshka_dims = [d for d in matryoshka_dims if d != model.dim]
    store = store_folder(evaluation, store)
    with model.encoding_precision(evaluation.precision):
        return _score(
            model, dataset, evaluation, matryoshka_dims, funnel, quantization, store, sharding
        )


def store_folder(evaluation: EvalConfig, default: Path | None) -> Path | None:
    """The embedding store an evaluation writes: ``evaluation.store`` when set, else
    ``default`` (the caller's run folder's)."""
    return Path(evaluation.store) if evaluation.store is not None else default


def _score(
    model: BiEncoder,
    dataset,
    evaluation: EvalConfig,
    matryoshka_dims: list[int],
    funnel: FunnelConfig | None,
    quantization: QuantizationConfig | None,
    store: Path | None,
    sharding: Sharding | None,
):
    if isinstance(dataset, BeirDataset):
        result = evaluate_retrieval(
            model,
            dataset,
            ks=list(evaluation.ks),
            index=evaluation.index,
            matryoshka_dims=matryoshka_dims,
            batch_size=evaluation.batch_size,
            ignore_identical_ids=evaluation.ignore_identical_ids,
            funnel=funnel,
            quantization=quantization,
            store=store,
            shard_rows=evaluation.shard_rows,
            sharding=sharding,
        )
        return result.metrics, result.timings, result.run
    if (funnel is not None and funnel.dim is not None) or (
        quantization is not None and quantization.kind != "none"
    ):
        raise ValueError("funnel and quantization search a corpus: they need BEIR data, not STS")
    metrics = evaluate_sts(
        model, dataset, matryoshka_dims=matryoshka_dims, batch_size=evaluation.batch_size
    )
    return metrics, {}, None


def evaluate(
    model: BiEncoder,
    dataset,
    evaluation: EvalConfig,
    out_dir: Path | None,
    matryoshka_dims: Sequence[int] | None = None,
    *,
    funnel: FunnelConfig | None = None,
    quantization: QuantizationConfig | None = None,
    store: Path | None = None,
    sharding: Sharding | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``dataset`` as ``evaluation`` says; write metrics.json (and
    run.trec) into ``out_dir`` and print the table, unless ``out_dir`` is None (the ranks
    of a multi-process run that help encode but do not write). ``matryoshka_dims``
    replaces ``evaluation.matryoshka_dims`` when given; ``funnel``, ``quantization``,
    ``store`` and ``sharding`` as in :func:`score`."""
    dims = list(evaluation.matryoshka_dims if matryoshka_dims is None else matryoshka_dims)
    start = time.perf_counter()
    metrics, timings, run = score(
        model,
        dataset,
        evaluation,
        dims,
        funnel=funnel,
        quantization=quantization,
        store=store,
        sharding=sharding,
    )
    metrics |= timings
    metrics["eval_wall_s"] = time.perf_counter() - start
    if out_dir is None:
        return metrics
    if run is not None:
        write_trec_run(run, out_dir / "run.trec")
        log.info(
            "%d queries over %d documents (%s split)",
            len(dataset.queries),
            len(dataset.corpus),
            dataset.split,
        )
    else:
        log.info("%d sentence pairs", len(dataset))
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(format_table(metrics))
    log.info("wrote %s", out_dir / "metrics.json")
    return metrics
