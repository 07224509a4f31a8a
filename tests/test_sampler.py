"""NoDuplicateBatchSampler: duplicate-free batches, seed-only order, exact resume."""

import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from data.sampler import NoDuplicateBatchSampler


def duplicated_examples(n: int = 300) -> list[tuple[str, ...]]:
    """(query, positive, negative) drawn from small pools: many texts repeat across examples,
    including one hub document in a tenth of them."""
    rng = random.Random(0)
    examples = []
    for _ in range(n):
        positive = "hub doc" if rng.random() < 0.1 else f"doc {rng.randrange(80)}"
        examples.append((f"query {rng.randrange(60)}", positive, f"doc {rng.randrange(80)}"))
    return examples


def epoch(sampler: NoDuplicateBatchSampler) -> list[list[int]]:
    return list(sampler)


@pytest.mark.parametrize("drop_last", [True, False])
def test_no_text_twice_in_a_batch_and_no_example_twice_in_an_epoch(drop_last):
    examples = duplicated_examples()
    sampler = NoDuplicateBatchSampler(examples, batch_size=16, seed=0, drop_last=drop_last)
    for _ in range(3):
        expected_len, dropped = len(sampler), sampler.dropped
        batches = epoch(sampler)
        assert len(batches) == expected_len
        for batch in batches:
            texts = [text for index in batch for text in set(examples[index])]
            assert len(texts) == len(set(texts)), batch
        seen = Counter(index for batch in batches for index in batch)
        assert max(seen.values()) == 1
        if drop_last:
            assert all(len(batch) == 16 for batch in batches)
            assert 0 < dropped < 0.2 * len(examples)
            assert len(seen) + dropped == len(examples)
        else:
            assert dropped == 0 and len(seen) == len(examples)


def test_an_examples_own_repeated_texts_do_not_block_it():
    examples = [("same", "same"), ("a", "b"), ("c", "d")]
    sampler = NoDuplicateBatchSampler(examples, batch_size=3, seed=0)
    assert sorted(epoch(sampler)[0]) == [0, 1, 2]


def test_order_is_a_function_of_the_seed_and_epoch():
    examples = duplicated_examples()
    first = NoDuplicateBatchSampler(examples, batch_size=16, seed=1)
    again = NoDuplicateBatchSampler(examples, batch_size=16, seed=1)
    other = NoDuplicateBatchSampler(examples, batch_size=16, seed=2)
    epoch0 = epoch(first)
    assert epoch0 == epoch(again)
    assert epoch0 != epoch(other)
    assert epoch(first) != epoch0  # epoch 1 is shuffled anew
    assert first.state_dict() == {"epoch": 2, "batches_done": 0}


@pytest.mark.parametrize("stop_after", [0, 5, 14])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(stop_after):
    examples = duplicated_examples()
    reference = NoDuplicateBatchSampler(examples, batch_size=16, seed=3)
    full = [epoch(reference) for _ in range(3)]

    interrupted = NoDuplicateBatchSampler(examples, batch_size=16, seed=3)
    epoch(interrupted)
    batches = iter(interrupted)
    for _ in range(stop_after):
        next(batches)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_done": stop_after}

    resumed = NoDuplicateBatchSampler(examples, batch_size=16, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a loop's per-epoch call must not rewind the resumed epoch
    assert epoch(resumed) == full[1][stop_after:]
    assert epoch(resumed) == full[2]


def test_set_epoch_jumps_to_the_start_of_another_epoch():
    examples = duplicated_examples()
    sampler = NoDuplicateBatchSampler(examples, batch_size=16, seed=4)
    reference = NoDuplicateBatchSampler(examples, batch_size=16, seed=4)
    next(iter(sampler))
    sampler.set_epoch(2)
    epoch(reference)
    epoch(reference)
    assert epoch(sampler) == epoch(reference)


def test_works_as_a_dataloader_batch_sampler():
    examples = [(f"q{i}", f"d{i % 5}") for i in range(20)]
    sampler = NoDuplicateBatchSampler(examples, batch_size=4, seed=0)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=list)
    for _ in range(3):
        expected = len(loader)
        batches = list(loader)
        assert len(batches) == expected >= 3
        for batch in batches:
            assert len({doc for _, doc in batch}) == 4


def test_rejects_a_zero_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        NoDuplicateBatchSampler([("a",)], batch_size=0, seed=0)
