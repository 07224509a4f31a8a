"""Alignment, uniformity and norm statistics against naive Python loops, raw embeddings
from BiEncoder.encode, and the geometry metrics the evaluators report."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from tolerances import assert_close_to_scale, summation_tolerance

from biencoder.data.beir import load_beir
from biencoder.data.sts import load_sts
from biencoder.evaluation.geometry import alignment, geometry_metrics, norm_stats, uniformity
from biencoder.evaluation.metrics import retrieval_metrics
from biencoder.evaluation.retrieval import evaluate_retrieval, evaluate_sts
from biencoder.model.biencoder import BiEncoder

GEOMETRY = {"alignment", "uniformity", "norm_mean", "norm_std", "norm_min", "norm_max"}
TEXTS = [
    "What causes antibiotic resistance in bacteria?",
    "0-dimensional biomaterials show inductive properties.",
    "A",
    "Mitochondrial dysfunction " * 40,  # truncated at max_length
    "The 1,000 genomes project sequenced diverse human populations.",
]


# ------------------------------------------------------------------------- naive oracles


def _rows(x: torch.Tensor) -> list[list[float]]:
    return x.double().tolist()


def _unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def _distance(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b, strict=True)))


def naive_alignment(x, y, alpha=2.0) -> float:
    pairs = list(zip(_rows(x), _rows(y), strict=True))
    return sum(_distance(_unit(a), _unit(b)) ** alpha for a, b in pairs) / len(pairs)


def naive_uniformity(x, t=2.0) -> float:
    unit = [_unit(row) for row in _rows(x)]
    potentials = [
        math.exp(-t * _distance(unit[i], unit[j]) ** 2)
        for i in range(len(unit))
        for j in range(i + 1, len(unit))
    ]
    return math.log(sum(potentials) / len(potentials))


def naive_norm_stats(x) -> dict[str, float]:
    norms = [math.sqrt(sum(v * v for v in row)) for row in _rows(x)]
    mean = sum(norms) / len(norms)
    return {
        "norm_mean": mean,
        "norm_std": math.sqrt(sum((n - mean) ** 2 for n in norms) / len(norms)),
        "norm_min": min(norms),
        "norm_max": max(norms),
    }


# ---------------------------------------------------------------------------- the metrics


@pytest.mark.parametrize("alpha", [1, 2, 3])
def test_alignment_matches_naive_loop(seed, alpha):
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert alignment(x, y, alpha) == pytest.approx(naive_alignment(x, y, alpha), rel=1e-12)


@pytest.mark.parametrize("t", [0.5, 2])
def test_uniformity_matches_naive_double_loop(seed, t):
    x = torch.randn(9, 4, dtype=torch.float64)
    assert uniformity(x, t) == pytest.approx(naive_uniformity(x, t), rel=1e-12)


def test_norm_stats_match_naive_loop(seed):
    x = torch.randn(6, 3, dtype=torch.float64) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    assert norm_stats(x) == pytest.approx(naive_norm_stats(x), rel=1e-12)


def test_float32_inputs_are_measured_in_float64(seed):
    x = torch.randn(9, 4)
    assert uniformity(x) == pytest.approx(naive_uniformity(x), rel=1e-12)


def test_sampled_uniformity_is_seeded_and_uses_max_points_rows(seed, monkeypatch):
    x = torch.randn(12, 3, dtype=torch.float64)
    seen = []
    pdist = torch.pdist

    def spy(rows, *args, **kwargs):
        seen.append(len(rows))
        return pdist(rows, *args, **kwargs)

    monkeypatch.setattr(torch, "pdist", spy)
    values = [uniformity(x, max_points=4, seed=s) for s in range(6)]
    assert seen == [4] * 6
    assert uniformity(x, max_points=4, seed=3) == values[3]
    assert len(set(values)) > 1  # the seed picks the subset
    # Each value is the uniformity of some 4 distinct rows.
    subsets = [naive_uniformity(x[list(rows)]) for rows in itertools.combinations(range(12), 4)]
    for value in values:
        assert min(abs(value - s) for s in subsets) < 1e-12
    assert uniformity(x, max_points=12) == pytest.approx(naive_uniformity(x), rel=1e-12)


def test_collapsed_embeddings_have_zero_alignment_and_uniformity(seed):
    direction = torch.randn(1, 8, dtype=torch.float64)
    collapsed = direction * torch.rand(10, 1, dtype=torch.float64).add(0.5)  # one direction
    assert uniformity(collapsed) == pytest.approx(0.0, abs=1e-12)
    assert alignment(collapsed, collapsed.flip(0)) == pytest.approx(0.0, abs=1e-12)


def test_alignment_and_uniformity_are_scale_invariant_norms_are_not(seed):
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    scale = torch.rand(10, 1, dtype=torch.float64) * 10 + 0.1
    assert alignment(x * scale, y) == pytest.approx(alignment(x, y), rel=1e-12)
    assert uniformity(x * scale) == pytest.approx(uniformity(x), rel=1e-12)
    doubled = norm_stats(2 * x)
    assert doubled == pytest.approx({k: 2 * v for k, v in norm_stats(x).items()}, rel=1e-12)
    assert norm_stats(x * scale) != pytest.approx(norm_stats(x))


def test_geometry_metrics_leave_out_what_has_no_inputs(seed):
    x = torch.randn(5, 4, dtype=torch.float64)
    assert set(geometry_metrics(x[:2], x[2:4], x)) == GEOMETRY
    assert set(geometry_metrics(x[:0], x[:0], x)) == GEOMETRY - {"alignment"}
    assert set(geometry_metrics(x[:1], x[1:2], x[:1])) == GEOMETRY - {"uniformity"}


# --------------------------------------------------------------------- raw embeddings


def _tower_output(model: BiEncoder, texts: list[str], kind: str) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for text in texts:
            features = model.tokenize([text], kind)
            rows.append(
                model.tower(kind)(
                    features["input_ids"],
                    features["attention_mask"],
                    features.get("token_type_ids"),
                )
            )
    return torch.cat(rows)


def assert_same_embeddings(model, actual, expected):
    """Equal up to summation order: ``encode`` pads texts into batches, the reference runs
    them one at a time (measured: 2·eps·max|e| apart)."""
    # The longest sums: the MLP's down-projection, or attention and pooling over the tokens.
    terms = max(model.query_tower.encoder.config.intermediate_size, model.config.max_length)
    assert_close_to_scale(actual, expected, terms=terms)


@pytest.mark.parametrize("normalize", [True, False])
def test_encode_normalize_false_gives_the_raw_tower_output(tiny_model_path, normalize, seed):
    model = BiEncoder.from_pretrained(tiny_model_path, normalize=normalize, projection_dim=24)
    raw = _tower_output(model, TEXTS, "doc")
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(TEXTS)))
    assert_same_embeddings(
        model, model.encode(TEXTS, kind="doc", batch_size=2, normalize=False), raw
    )
    assert_same_embeddings(
        model, model.encode(TEXTS, kind="doc", normalize=True), F.normalize(raw, dim=-1)
    )
    expected = F.normalize(raw, dim=-1) if normalize else raw
    assert_same_embeddings(model, model.encode(TEXTS, kind="doc"), expected)
    # A raw Matryoshka cut is not re-normalised.
    assert_same_embeddings(
        model, model.encode(TEXTS, kind="doc", dim=8, normalize=False), raw[:, :8]
    )


def test_default_encode_is_normalised_raw_encode_bit_for_bit(minilm):
    # The evaluators normalise raw embeddings themselves; scores must not move.
    raw = minilm.encode(TEXTS, normalize=False)
    assert torch.equal(minilm.encode(TEXTS), F.normalize(raw, dim=-1))


# ------------------------------------------------------------------------- evaluators


def test_evaluate_retrieval_reports_geometry_of_the_encoded_texts(tiny_model_path, tiny_beir_path):
    model = BiEncoder.from_pretrained(tiny_model_path)
    dataset = load_beir(tiny_beir_path, "test")
    first = sorted(dataset.qrels)[0]
    unjudged = next(d for d in dataset.corpus if d not in dataset.qrels[first])
    # A non-relevant judgement and one naming a document outside the corpus: neither aligns.
    qrels = {**dataset.qrels, first: {**dataset.qrels[first], unjudged: 0, "no-such-doc": 1}}
    dataset = dataclasses.replace(dataset, qrels=qrels)

    result = evaluate_retrieval(model, dataset, ks=(1, 10), matryoshka_dims=(16,))

    doc_ids, query_ids = list(dataset.corpus), list(dataset.queries)
    docs = model.encode([dataset.corpus[d].full_text for d in doc_ids], kind="doc", normalize=False)
    queries = model.encode([dataset.queries[q] for q in query_ids], kind="query", normalize=False)
    pairs = [
        (query_ids.index(q), doc_ids.index(d))
        for q in query_ids
        for d, relevance in dataset.qrels[q].items()
        if relevance > 0 and d in dataset.corpus
    ]
    assert len(pairs) == sum(len(judged) for judged in dataset.qrels.values()) - 2
    anchors = queries[[q for q, _ in pairs]]
    positives = docs[[d for _, d in pairs]]
    expected = {
        "alignment": naive_alignment(anchors, positives),
        "uniformity": naive_uniformity(docs),
        **naive_norm_stats(torch.cat([docs, queries])),
    }
    assert {k: result.metrics[k] for k in GEOMETRY} == pytest.approx(expected, rel=1e-9)
    ir_names = set(retrieval_metrics(result.run, dataset.qrels, (1, 10)))
    assert set(result.metrics) == GEOMETRY | ir_names | {f"dim16/{n}" for n in ir_names}


def test_evaluate_sts_reports_geometry_of_the_encoded_sentences(tiny_model_path, tiny_sts_path):
    model = BiEncoder.from_pretrained(tiny_model_path)
    # Each pair once: a repeated pair ties with its copy, and a rounding that breaks the tie
    # in one cosine formula but not in the other moves Spearman by 2.5e-6 here.
    pairs = list(dict.fromkeys(load_sts(tiny_sts_path, "test")))

    metrics = evaluate_sts(model, pairs, matryoshka_dims=(16,))

    left = model.encode([p.text1 for p in pairs], normalize=False)
    right = model.encode([p.text2 for p in pairs], normalize=False)
    positive = [i for i, p in enumerate(pairs) if p.score >= 4.0]
    assert 0 < len(positive) < len(pairs)
    expected = {
        "alignment": naive_alignment(left[positive], right[positive]),
        "uniformity": naive_uniformity(torch.cat([left, right])),
        **naive_norm_stats(torch.cat([left, right])),
    }
    assert {k: metrics[k] for k in GEOMETRY} == pytest.approx(expected, rel=1e-9)
    correlations = {"spearman", "pearson"}
    assert set(metrics) == GEOMETRY | correlations | {f"dim16/{n}" for n in correlations}
    cosine = (model.encode([p.text1 for p in pairs]) * model.encode([p.text2 for p in pairs])).sum(
        -1
    )
    gold = [p.score for p in pairs]
    # The evaluator's cosines round differently from these; they rank the pairs alike only
    # if no two lie within rounding of each other (the closest measured: 5.5e-5 apart).
    rounding = summation_tolerance(model.dim)
    assert cosine.sort().values.diff().min() > 2 * rounding, "near-tied cosines: change pairs"
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(cosine, gold)[0], abs=1e-6)

    strict = evaluate_sts(model, pairs, positive_threshold=5.5)
    assert set(strict) == GEOMETRY - {"alignment"} | correlations
