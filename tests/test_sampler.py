"""NoDuplicateBatchSampler: duplicate-free batches, seed-only order, exact resume."""

import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader

from biencoder.data.sampler import NoDuplicateBatchSampler


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


def test_an_empty_epoch_names_the_text_its_examples_share():
    # One pair repeated: no two examples can share a batch.
    sampler = NoDuplicateBatchSampler([("what is x", "x is y")] * 100, batch_size=4, seed=0)
    assert len(sampler) == 0
    assert vars(sampler.text_overlap()) == {
        "examples": 100,
        "distinct_texts": 2,
        "shared_text": "what is x",
        "sharing": 100,
        "largest_batch": 1,
    }
    assert sampler.explain_empty_epoch() == (
        "the sampler can put only 1 of the 100 training examples in a batch without repeating "
        "a text: "
        "100 examples share the text 'what is x' (2 distinct texts in all); "
        "a batch of 4 needs 4 examples with no text in common"
    )


def test_an_empty_epoch_names_a_hub_text_and_shortens_it():
    hub = "a query every example shares, long enough to be cut short in a message " * 3
    examples = [(hub, f"doc {i}") for i in range(50)] + [("q", "doc 0"), ("r", "s")]
    sampler = NoDuplicateBatchSampler(examples, batch_size=8, seed=0)
    assert len(sampler) == 0
    overlap = sampler.text_overlap()
    assert (overlap.examples, overlap.distinct_texts, overlap.sharing) == (52, 54, 50)
    assert overlap.shared_text == hub and overlap.largest_batch <= 3
    message = sampler.explain_empty_epoch()
    assert "of the 52 training examples in a batch without repeating a text: " in message
    assert f"50 examples share the text {hub[:57] + '...'!r} (54 distinct texts in all)" in message


@pytest.mark.parametrize(
    ("examples", "message"),
    [
        (
            [("a", "b"), ("c", "d"), ("e", "f")],
            "there are only 3 training examples; "
            "a batch of 4 needs 4 examples with no text in common",
        ),
        (
            # Too few examples is the cause even when two of them share a text.
            [("a", "b"), ("a", "d"), ("e", "f")],
            "there are only 3 training examples; "
            "a batch of 4 needs 4 examples with no text in common",
        ),
        (
            [],
            "there are no training examples; a batch of 4 needs 4 examples with no text in common",
        ),
    ],
)
def test_an_empty_epoch_from_too_few_examples_says_so(examples, message):
    sampler = NoDuplicateBatchSampler(examples, batch_size=4, seed=0)
    assert len(sampler) == 0
    assert sampler.explain_empty_epoch() == message


def test_next_batch_streams_the_epochs_that_iteration_yields():
    examples = duplicated_examples()
    streamed = NoDuplicateBatchSampler(examples, batch_size=16, seed=5)
    iterated = NoDuplicateBatchSampler(examples, batch_size=16, seed=5)
    first, second = epoch(iterated), epoch(iterated)
    assert [streamed.next_batch() for _ in first + second] == first + second
    assert streamed.state_dict() == {"epoch": 1, "batches_done": len(second)}


def test_next_batch_names_the_shared_text_when_no_batch_fills():
    sampler = NoDuplicateBatchSampler([("what is x", "x is y")] * 10, batch_size=4, seed=0)
    with pytest.raises(ValueError, match="batch_size: the sampler can put only 1 of the 10"):
        sampler.next_batch()
