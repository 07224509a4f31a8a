"""InfoNCETask passes the loss options on with the batch's layout: hard negatives belong to
their Triplet's query (sentence-transformers lays them out column by column, we row by row),
and a guide model embeds the batch's own texts, frozen and outside the checkpoint."""

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss,
)

from biencoder.data.training import Pair, Triplet
from biencoder.losses.infonce import info_nce
from biencoder.model.biencoder import BiEncoder
from biencoder.training.infonce_task import InfoNCETask

K = 2
TRIPLETS = [
    Triplet(f"query {i}", f"positive {i}", tuple(f"negative {i}.{k}" for k in range(K)))
    for i in range(5)
]
GTE = ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]


def embeddings(batch_size: int, negatives: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    columns = [batch_size, batch_size] + ([batch_size * negatives] if negatives else [])
    return [F.normalize(torch.randn(rows, 16, dtype=torch.float64), dim=-1) for rows in columns]


def guide_embeddings(path: str, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide's embeddings of a batch's queries and of its documents, computed here."""
    guide = BiEncoder.from_pretrained(path)
    docs = [text for column in batch.columns[1:] for text in column]
    return guide.encode(batch.columns[0], kind="query"), guide.encode(docs, kind="doc")


@pytest.mark.parametrize(
    "options",
    [
        {"directions": GTE},
        {"directions": ["query_to_doc", "doc_to_doc"], "hardness_mode": "hard_negatives"},
        {"directions": ["query_to_doc", "doc_to_query"], "partition_mode": "per_direction"},
        {"hardness_mode": "in_batch_negatives"},
        {"hardness_mode": "all_negatives"},
    ],
)
def test_task_loss_is_sentence_transformers_loss_on_the_same_columns(options):
    strength = 4.0 if "hardness_mode" in options else 0.0
    task = InfoNCETask(temperature=0.05, hardness_strength=strength, **options)
    batch = task.make_batch(TRIPLETS)
    q, pos, neg = embeddings(len(TRIPLETS), K)
    loss, _ = task([q, pos, neg], batch)
    st_loss = MultipleNegativesRankingLoss(
        model=None,
        scale=20.0,
        directions=tuple(options.get("directions", ["query_to_doc"])),
        partition_mode=options.get("partition_mode", "joint"),
        hardness_mode=options.get("hardness_mode"),
        hardness_strength=strength,
    )
    # sentence-transformers' columns: negative k of every query, one column per k.
    negatives_by_k = [neg[k::K] for k in range(K)]
    expected = st_loss.compute_loss_from_embeddings([q, pos, *negatives_by_k], None)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)


def test_guide_embeds_the_batch_texts_and_is_neither_trained_nor_saved(tiny_model_path):
    # A margin wide enough that the random tiny guide drops some in-batch candidates.
    task = InfoNCETask(temperature=0.05, guide=tiny_model_path, guide_margin=0.1)
    plain = InfoNCETask(temperature=0.05)
    assert list(task.parameters()) == [] and task.state_dict().keys() == plain.state_dict().keys()
    batch = task.make_batch(TRIPLETS)
    columns = [e.float() for e in embeddings(len(TRIPLETS), K)]
    loss, _ = task(columns, batch)

    guide_q, guide_d = guide_embeddings(tiny_model_path, batch)
    q, d = columns[0], torch.cat(columns[1:])
    expected = info_nce(
        q, d, 0.05, doc_ids=batch.doc_ids, guide_q=guide_q, guide_d=guide_d, guide_margin=0.1
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    unguided, _ = plain(columns, batch)
    assert abs(loss.item() - unguided.item()) > 1e-3, "the guide dropped no candidate"


def test_pairs_with_extra_directions():
    """Pair batches (no hard negatives) take the extra directions too."""
    pairs = [Pair(t.query, t.positive) for t in TRIPLETS]
    q, pos = embeddings(len(pairs), 0)
    task = InfoNCETask(directions=GTE)
    loss, _ = task([q, pos], task.make_batch(pairs))
    st_loss = MultipleNegativesRankingLoss(model=None, scale=20.0, directions=tuple(GTE))
    expected = st_loss.compute_loss_from_embeddings([q, pos], None)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)


def test_matryoshka_truncates_the_embeddings_but_not_the_guides(tiny_model_path):
    dims = [8, 16]
    task = InfoNCETask(temperature=0.05, guide=tiny_model_path, matryoshka_dims=dims)
    batch = task.make_batch(TRIPLETS)
    columns = [e.float() for e in embeddings(len(TRIPLETS), K)]
    loss, _ = task(columns, batch)

    guide_q, guide_d = guide_embeddings(tiny_model_path, batch)
    q, d = columns[0], torch.cat(columns[1:])
    expected = sum(
        info_nce(
            F.normalize(q[:, :dim], dim=-1),
            F.normalize(d[:, :dim], dim=-1),
            0.05,
            doc_ids=batch.doc_ids,
            guide_q=guide_q,
            guide_d=guide_d,
        )
        for dim in dims
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
