"""The prefetch thread changes when batches are prepared, never what they are."""

from __future__ import annotations

import threading

import pytest
import torch

from biencoder.data.training import Pair
from biencoder.model.biencoder import BiEncoder
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.prefetch import Prefetcher
from biencoder.training.step import tokenize_batch, train_step


def counter():
    calls = []

    def produce():
        calls.append(threading.current_thread().name)
        if len(calls) == 4:
            raise RuntimeError("the fourth item cannot be made")
        return len(calls)

    return produce, calls


@pytest.mark.parametrize("enabled", [True, False])
def test_results_come_in_order_and_errors_where_their_item_would(enabled):
    produce, calls = counter()
    with Prefetcher(produce, enabled=enabled) as items:
        assert [next(items) for _ in range(3)] == [1, 2, 3]
        with pytest.raises(RuntimeError, match="fourth"):
            next(items)
    on_thread = {name.startswith("prefetch") for name in calls}
    assert on_thread == {enabled}


def test_the_next_item_is_made_while_the_caller_works():
    started = threading.Event()
    release = threading.Event()

    def produce():
        started.set()
        release.wait(timeout=10)
        return "item"

    with Prefetcher(produce) as items:
        release.set()
        next(items)
        release.clear()
        started.clear()
        # The caller has its item; the producer is already at the next one.
        assert started.wait(timeout=10)
        release.set()


def test_a_batch_tokenized_ahead_trains_as_one_tokenized_in_the_step(tiny_model_path, seed):
    pairs = [Pair(f"query {i} " * (i + 1), f"document {i}") for i in range(6)]
    task = InfoNCETask(temperature=0.1)
    batch = task.make_batch(pairs)
    gradients = []
    for prepared in (False, True):
        model = BiEncoder.from_pretrained(tiny_model_path)
        model.train()
        for tower in {id(t): t for t in (model.query_tower, model.tower("doc"))}.values():
            tower.encoder.set_dropout(0.0, 0.0)
        step_batch = tokenize_batch(model, batch, 4, 16) if prepared else batch
        train_step(model, task, step_batch, cache_chunk_size=4, max_length=16)
        gradients.append([p.grad.clone() for p in model.parameters()])
    for ahead, inline in zip(*gradients, strict=True):
        assert torch.equal(ahead, inline)

    model = BiEncoder.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="tokenized for chunk_size=4, chunk_tokens=None"):
        train_step(model, task, tokenize_batch(model, batch, 4, 16), max_length=16)
    with pytest.raises(ValueError, match="chunk_tokens=64, max_length=16; this step"):
        tokenized = tokenize_batch(model, batch, None, 16, chunk_tokens=64)
        train_step(model, task, tokenized, cache_chunk_tokens=32, max_length=16)
