"""BM25 against its formula, bm25s and BEIR's published SciFact number; hard-negative mining."""

import dataclasses
import logging
import math
import time
from pathlib import Path

import pytest

from biencoder.data.beir import BeirDataset, Document, load_beir
from biencoder.data.errors import DataError
from biencoder.data.mining.negatives import mine_hard_negatives, triplets_from_beir
from biencoder.data.paths import SCIFACT_DIR
from biencoder.data.training import Triplet
from biencoder.evaluation.metrics import retrieval_metrics
from biencoder.retrieval.bm25 import BM25, tokenize

# ------------------------------------------------------------------------------------- BM25


def test_tokenize_lowercases_words_and_drops_stopwords():
    assert tokenize("The CAT's 2 mats, and a dog!") == ["cat", "s", "2", "mats", "dog"]
    assert tokenize("the cat", stopwords=()) == ["the", "cat"]


def test_bm25_scores_match_the_formula():
    corpus = ["the cat sat on the mat", "the dog sat", "cat cat dog", "a bird"]
    # Without stop words: [cat sat mat] [dog sat] [cat cat dog] [bird]; N=4, avgdl=9/4.
    k1, b, n, avgdl = 0.9, 0.4, 4, 9 / 4

    def term(tf: int, df: int, length: int) -> float:
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avgdl))

    index = BM25(corpus)
    expected = {
        0: term(1, df=2, length=3),  # cat
        1: term(1, df=2, length=2),  # dog
        2: term(2, df=2, length=3) + term(1, df=2, length=3),  # cat x2, dog
    }
    hits = index.search("Cat and DOG", k=10)
    assert [doc for doc, _ in hits] == [2, 1, 0]  # the bird shares no word: not returned
    for doc, score in hits:
        assert score == pytest.approx(expected[doc], rel=1e-6)
    # A repeated query word counts twice, as in Anserini's bag-of-words queries.
    assert index.search("cat cat", k=1)[0][1] == pytest.approx(2 * term(2, 2, 3), rel=1e-6)


def test_bm25_ranks_scifact_as_bm25s_does():
    # bm25s (MTEB's BM25) is slower (bench/results/bm25.md) but an independent oracle: the
    # same words and parameters must give the same top 10, and the same scores once its
    # Lucene variant's missing constant factor k1 + 1 is put back.
    import bm25s

    train = load_beir(SCIFACT_DIR, "train")
    docs = [doc.full_text for doc in train.corpus.values()]
    queries = [train.queries[q] for q in sorted(train.queries)][:200]
    oracle = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
    oracle.index([tokenize(text) for text in docs], show_progress=False)
    ids, scores = oracle.retrieve([tokenize(q) for q in queries], k=10, show_progress=False)
    index = BM25(docs)
    for query, their_ids, their_scores in zip(queries, ids, scores, strict=True):
        hits = index.search(query, 10)
        assert [doc for doc, _ in hits] == their_ids.tolist()
        assert [score for _, score in hits] == pytest.approx(1.9 * their_scores, rel=1e-5)


def test_bm25_top_k_breaks_ties_by_lower_index():
    index = BM25(["apple", "pear", "apple", "apple", "apple pear"])
    assert [doc for doc, _ in index.search("apple", k=2)] == [0, 2]
    assert [doc for doc, _ in index.search("apple", k=4)] == [0, 2, 3, 4]
    assert index.search("kiwi", k=3) == []
    with pytest.raises(ValueError, match="k must be"):
        index.search("apple", k=0)


# ------------------------------------------------------------------------------- toy BEIR


@pytest.fixture
def toy() -> BeirDataset:
    texts = {
        "d1": "Aspirin reduces the risk of heart attack",
        "d2": "Aspirin and heart disease: a randomized trial",
        "d3": "Heart attack symptoms in women",
        "d4": "Statins lower cholesterol and heart attack risk",
        "d5": "Vitamin D deficiency and bone health",
        "d6": "Bone density declines with age",
        "d7": "Vitamin D supplements and fracture risk",
        "d8": "Exercise improves heart health",
        "d9": "Sleep and memory consolidation",
        "d10": "Memory loss in aging adults",
    }
    return BeirDataset(
        corpus={doc_id: Document(doc_id, "", text) for doc_id, text in texts.items()},
        queries={
            "q1": "does aspirin prevent heart attack",
            "q2": "vitamin D and bone fractures",
            "q3": "sleep and memory",
        },
        # d2 is judged not relevant to q1: still never a negative for it.
        qrels={"q1": {"d1": 1, "d2": 0}, "q2": {"d5": 1, "d7": 2}, "q3": {"d9": 1}},
        split="train",
        path=Path("toy"),
        missing={"qrels_unknown_query": 0, "qrels_unknown_doc": 0},
    )


def bm25_ranking(dataset: BeirDataset, query_id: str, depth: int) -> list[str]:
    doc_ids = list(dataset.corpus)
    index = BM25([doc.full_text for doc in dataset.corpus.values()])
    return [doc_ids[i] for i, _ in index.search(dataset.queries[query_id], depth)]


@pytest.mark.parametrize("skip_top", [0, 1, 3])
def test_negatives_are_the_unjudged_hits_below_skip_top(toy, skip_top):
    negatives = mine_hard_negatives(toy, num_negatives=10, depth=10, skip_top=skip_top)
    assert sorted(negatives) == ["q1", "q2", "q3"]
    for query_id, found in negatives.items():
        ranked = bm25_ranking(toy, query_id, depth=10)
        expected = set(ranked[skip_top:]) - set(toy.qrels[query_id])
        assert set(found) == expected and len(found) == len(expected)
    assert set(mine_hard_negatives(toy, 10, depth=10)["q1"]) == {"d3", "d4", "d8"}


def test_sampling_is_seeded_per_query(toy):
    first = mine_hard_negatives(toy, num_negatives=2, depth=10)
    assert first == mine_hard_negatives(toy, num_negatives=2, depth=10)
    assert [len(found) for found in first.values()] == [2, 1, 1]  # q2, q3: one candidate
    # A query's negatives do not depend on the other queries mined with it.
    alone = BeirDataset(**{**vars(toy), "queries": {"q1": toy.queries["q1"]}})
    assert mine_hard_negatives(alone, num_negatives=2, depth=10) == {"q1": first["q1"]}


def test_mining_rejects_bad_arguments(toy):
    with pytest.raises(ValueError, match="num_negatives"):
        mine_hard_negatives(toy, 0)
    with pytest.raises(ValueError, match="skip_top"):
        mine_hard_negatives(toy, 1, depth=5, skip_top=5)
    with pytest.raises(ValueError, match="needs a model"):
        mine_hard_negatives(toy, 1, method="dense")
    with pytest.raises(ValueError, match="method"):
        mine_hard_negatives(toy, 1, method="splade")


def test_dense_mining_excludes_judged_docs(toy, minilm):
    negatives = mine_hard_negatives(toy, num_negatives=3, method="dense", depth=4, model=minilm)
    for query_id, found in negatives.items():
        assert len(found) == len(set(found)) == 4 - len(toy.qrels[query_id])
        assert not set(found) & set(toy.qrels[query_id])
    # The sleep/memory query's nearest unjudged document is about memory, not hearts.
    assert "d10" in negatives["q3"]


def test_triplets_one_per_relevant_pair_with_equal_negative_counts(toy, caplog):
    negatives = {"q1": ["d3", "d4"], "q2": ["d6"]}  # q2 is short; q3 has none
    with caplog.at_level(logging.WARNING, logger="biencoder.data.mining.negatives"):
        triplets = triplets_from_beir(toy, negatives)
    full = {doc_id: doc.full_text for doc_id, doc in toy.corpus.items()}
    assert triplets == [
        Triplet(toy.queries["q1"], full["d1"], (full["d3"], full["d4"])),
        Triplet(toy.queries["q2"], full["d5"], (full["d6"], full["d6"])),
        Triplet(toy.queries["q2"], full["d7"], (full["d6"], full["d6"])),
    ]
    assert "2 pairs have fewer than 2 negatives" in caplog.text
    assert "1 pairs dropped" in caplog.text
    assert len(triplets_from_beir(toy, negatives, num_negatives=1)[0].negatives) == 1
    with pytest.raises(ValueError, match="no negatives"):
        triplets_from_beir(toy, {})


def test_triplets_name_the_qrels_when_none_is_left(toy):
    with pytest.raises(DataError) as excinfo:
        triplets_from_beir(toy, {"q9": ["d3"]})
    assert str(excinfo.value) == (
        f"{Path('toy', 'qrels', 'train.tsv')}: "
        "no triplet: all 4 relevant pairs belong to queries without a negative"
    )
    unjudged = dataclasses.replace(toy, qrels={"q1": {"d2": 0}})
    with pytest.raises(DataError, match="no qrels row of these queries has a score above 0"):
        triplets_from_beir(unjudged, {"q1": ["d3"]})


# -------------------------------------------------------------------------------- SciFact


def test_bm25_on_scifact_finds_relevant_docs_and_mines_in_seconds():
    train = load_beir(SCIFACT_DIR, "train")
    test = load_beir(SCIFACT_DIR, "test")
    doc_ids = list(train.corpus)
    index = BM25([doc.full_text for doc in train.corpus.values()])

    def run(dataset: BeirDataset, depth: int) -> dict[str, dict[str, float]]:
        return {
            query_id: {doc_ids[i]: score for i, score in index.search(text, depth)}
            for query_id, text in dataset.queries.items()
        }

    # Measured: 86.7% of the 809 train queries have a relevant doc in the top 30, and
    # nDCG@10 on test is 0.663, as BEIR reports for BM25 (Anserini: 0.665).
    train_run = run(train, 30)
    found = [any(doc in train_run[q] for doc in train.qrels[q]) for q in train.queries]
    assert sum(found) / len(found) > 0.83
    assert retrieval_metrics(run(test, 100), test.qrels, ks=[10])["ndcg@10"] == pytest.approx(
        0.665, abs=0.01
    )

    start = time.perf_counter()
    negatives = mine_hard_negatives(train, num_negatives=4)
    seconds = time.perf_counter() - start
    assert seconds < 20  # 1.2 s measured on a loaded 2-core CPU
    assert len(negatives) == len(train.queries)
    assert all(len(found) == 4 for found in negatives.values())
    assert not any(set(found) & set(train.qrels[q]) for q, found in negatives.items())
    reseeded = mine_hard_negatives(train, num_negatives=4, seed=1)
    assert sum(negatives[q] != reseeded[q] for q in negatives) > 0.9 * len(negatives)
    triplets = triplets_from_beir(train, negatives)
    assert len(triplets) == sum(v > 0 for q in train.qrels.values() for v in q.values())
