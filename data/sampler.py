"""Batches without duplicate texts, in an order that depends on the seed only, resumable;
and batches from several training sets, each from one set (:class:`MultiSetBatchSampler`).

In-batch negatives assume every other text in the batch is irrelevant to a query; the same
text twice in a batch (one query with two positives, a popular document) breaks that and
teaches the model to push a text away from itself.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

# Texts quoted in messages are cut to this many characters.
_QUOTE_CHARS = 60


@dataclass(frozen=True)
class TextOverlap:
    """How much the examples' texts overlap, which bounds how full a batch can get.

    ``shared_text`` is the text found in the most examples (the first seen on a tie) and
    ``sharing`` how many examples hold it: a batch takes at most one of them.
    ``largest_batch`` is how many examples one greedy pass over the current epoch's order
    gathers with no text in common: the sampler's first batch, were ``batch_size`` unlimited.
    """

    examples: int
    distinct_texts: int
    shared_text: str | None
    sharing: int
    largest_batch: int


class NoDuplicateBatchSampler(Sampler[list[int]]):
    """Yields lists of example indices such that no text occurs twice in a batch.

    ``example_texts[i]`` holds the texts of example ``i`` (query, positive, negatives);
    texts are compared exactly, and only across examples, so an example whose own texts
    repeat is kept as is. Epoch ``e`` walks ``torch.randperm`` drawn from a generator seeded
    with ``seed + e``, filling each batch greedily: an example with a text already in the
    batch waits in a queue, and each new batch takes from the queue first. With
    ``drop_last`` the last incomplete batch is dropped, and so are the examples still
    waiting (``dropped`` counts them); without it the remaining examples form smaller
    batches until none is left. Each example appears at most once per epoch.

    Iterating yields the rest of the current epoch, then moves to the next one, so one
    ``for`` loop per epoch works, resumed or not. ``state_dict()`` counts the batches
    yielded; a multi-worker DataLoader draws batches ahead of use, so a trainer behind one
    should save ``{"epoch": ..., "batches_done": <batches it trained on>}`` instead.
    """

    def __init__(
        self,
        example_texts: Sequence[Sequence[str]],
        batch_size: int,
        seed: int,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        ids: dict[str, int] = {}
        # Texts as ints: equal texts are usually distinct string objects, which every set hit
        # would compare character by character, epoch after epoch.
        self._texts = [
            frozenset(ids.setdefault(text, len(ids)) for text in texts) for texts in example_texts
        ]
        # Id -> text, kept to name a shared text in messages.
        self._text_of = list(ids)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.batches_done = 0
        self._plan: list[list[int]] | None = None
        self._plan_epoch = -1
        self._dropped = 0

    def __len__(self) -> int:
        """Batches in the current epoch. Exact for it; other epochs can differ by a few
        batches when duplicates force drops (``drop_last``) or extra small batches."""
        return len(self._epoch_plan())

    @property
    def dropped(self) -> int:
        """Examples left out of the current epoch because no batch could take them."""
        self._epoch_plan()
        return self._dropped

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._epoch_plan()
        while self.batches_done < len(plan):
            batch = plan[self.batches_done]
            self.batches_done += 1
            yield list(batch)
        self.set_epoch(self.epoch + 1)

    @property
    def num_examples(self) -> int:
        return len(self._texts)

    def next_batch(self) -> list[int]:
        """The next batch, moving on to the next epoch when this one is done: a stream of
        batches for a caller that interleaves several samplers (:class:`MultiSetBatchSampler`).
        """
        plan = self._epoch_plan()
        if self.batches_done >= len(plan):
            self.set_epoch(self.epoch + 1)
            plan = self._epoch_plan()
        if not plan:
            raise ValueError(f"batch_size: {self.explain_empty_epoch()}")
        batch = plan[self.batches_done]
        self.batches_done += 1
        return list(batch)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch; the current epoch's position is kept, so a
        loop calling ``set_epoch(epoch)`` at the top of each epoch still resumes mid-way."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]

    def text_overlap(self) -> TextOverlap:
        """Counts that explain a short or empty epoch (see :meth:`explain_empty_epoch`)."""
        counts = Counter(text for texts in self._texts for text in texts)
        shared, sharing = None, 0
        if counts:
            # max() keeps the first of equal counts: the text seen first.
            top = max(counts, key=counts.__getitem__)
            shared, sharing = self._text_of[top], counts[top]
        batch: set[int] = set()
        largest = 0
        for index in self._order(self.epoch):
            if batch.isdisjoint(self._texts[index]):
                batch |= self._texts[index]
                largest += 1
        return TextOverlap(len(self._texts), len(counts), shared, sharing, largest)

    def explain_empty_epoch(self) -> str:
        """Why no batch of ``batch_size`` fills: the text the examples share, or too few of
        them. Meant for the error a trainer raises when ``len(sampler) == 0``."""
        need = (
            f"a batch of {self.batch_size} needs {self.batch_size} examples with no text in common"
        )
        overlap = self.text_overlap()
        if overlap.examples == 0:
            return f"there are no training examples; {need}"
        # Without shared texts every example fits one batch: only too few of them can fail.
        if overlap.examples < self.batch_size:
            return f"there are only {overlap.examples} training examples; {need}"
        text = overlap.shared_text
        if len(text) > _QUOTE_CHARS:
            text = text[: _QUOTE_CHARS - 3] + "..."
        return (
            f"the sampler can put only {overlap.largest_batch} of the {overlap.examples} training "
            f"examples in a batch without repeating a text: {overlap.sharing} examples share "
            f"the text {text!r} ({overlap.distinct_texts} distinct texts in all); {need}"
        )

    def _epoch_plan(self) -> list[list[int]]:
        if self._plan is None or self._plan_epoch != self.epoch:
            self._plan, self._dropped = self._plan_for(self.epoch)
            self._plan_epoch = self.epoch
            if self._dropped:
                log.info(
                    "epoch %d: %d of %d examples left out, their texts duplicating others",
                    self.epoch,
                    self._dropped,
                    len(self._texts),
                )
        return self._plan

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self._texts), generator=generator).tolist()

    def _plan_for(self, epoch: int) -> tuple[list[list[int]], int]:
        order = self._order(epoch)
        batches: list[list[int]] = []
        waiting: list[int] = []
        pos = 0
        while True:
            batch: list[int] = []
            seen: set[int] = set()
            still_waiting = []
            for index in waiting:
                if len(batch) < self.batch_size and seen.isdisjoint(self._texts[index]):
                    batch.append(index)
                    seen |= self._texts[index]
                else:
                    still_waiting.append(index)
            waiting = still_waiting
            while len(batch) < self.batch_size and pos < len(order):
                index = order[pos]
                pos += 1
                if seen.isdisjoint(self._texts[index]):
                    batch.append(index)
                    seen |= self._texts[index]
                else:
                    waiting.append(index)
            if len(batch) == self.batch_size:
                batches.append(batch)
            elif self.drop_last or not batch:
                return batches, len(batch) + len(waiting)
            else:
                batches.append(batch)
                if not waiting:
                    return batches, 0


SAMPLING = ("proportional", "round_robin")


class MultiSetBatchSampler(Sampler[list[int]]):
    """Batches from several training sets, each batch from one set, so that in-batch
    negatives never mix sets (sentence-transformers' multi-dataset batches).

    ``samplers[s]`` draws set s's duplicate-free batches of indices into that set; batches
    come out as indices into the sets' concatenation, in the order of ``samplers``. Epoch
    ``e`` is a plan of which set each batch comes from: with ``proportional``, every set's
    number of batches in its first epoch, shuffled by a generator seeded with ``seed + e``
    (so the sets come up in proportion to their size); with ``round_robin``, the sets in
    turn until the smallest has given all its batches. Each set's sampler goes on from
    where it stopped in the next epoch, starting an epoch of its own when it runs out.
    ``state_dict()`` holds the position in the plan and every set's position, so a resumed
    run draws the same batches.
    """

    def __init__(
        self, samplers: Sequence[NoDuplicateBatchSampler], sampling: str, seed: int
    ) -> None:
        if sampling not in SAMPLING:
            raise ValueError(f"sampling: {sampling!r} is not one of {', '.join(SAMPLING)}")
        self.samplers = list(samplers)
        self.sampling = sampling
        self.seed = seed
        self.starts = list(
            itertools.accumulate((s.num_examples for s in self.samplers[:-1]), initial=0)
        )
        # Fixed at the first epoch's counts, so that an epoch's plan is a function of the
        # seed alone, whatever epoch each set has reached.
        self._batches = [len(s) for s in self.samplers]
        self.epoch = 0
        self.batches_done = 0
        self._plan: list[int] | None = None
        self._plan_epoch = -1

    def __len__(self) -> int:
        """Batches in an epoch."""
        return len(self._epoch_plan())

    def __iter__(self) -> Iterator[list[int]]:
        plan = self._epoch_plan()
        while self.batches_done < len(plan):
            which = plan[self.batches_done]
            batch = self.samplers[which].next_batch()
            self.batches_done += 1
            yield [self.starts[which] + index for index in batch]
        self.set_epoch(self.epoch + 1)

    def set_of(self, index: int) -> int:
        """The set that example ``index`` (of the concatenation) belongs to."""
        return bisect.bisect_right(self.starts, index) - 1

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self.batches_done = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "sets": [s.state_dict() for s in self.samplers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["sets"]) != len(self.samplers):
            raise ValueError(
                f"the sampler state holds {len(state['sets'])} training sets, this run has "
                f"{len(self.samplers)}"
            )
        self.epoch = state["epoch"]
        self.batches_done = state["batches_done"]
        for sampler, saved in zip(self.samplers, state["sets"], strict=True):
            sampler.load_state_dict(saved)

    def _epoch_plan(self) -> list[int]:
        if self._plan is None or self._plan_epoch != self.epoch:
            if self.sampling == "round_robin":
                self._plan = list(range(len(self.samplers))) * min(self._batches)
            else:
                plan = [s for s, count in enumerate(self._batches) for _ in range(count)]
                generator = torch.Generator().manual_seed(self.seed + self.epoch)
                self._plan = [plan[i] for i in torch.randperm(len(plan), generator=generator)]
            self._plan_epoch = self.epoch
        return self._plan
