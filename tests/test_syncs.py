"""A training step waits for the device a constant number of times (the issue's bound is
3; one process needs 1), whatever the batch, chunking, task or number of columns.

The synchronisations are counted on the CPU (:class:`runtime.syncs.SyncCounter`): the
same calls that would make the host wait for a GPU. A count that grows with the batch or
the number of GradCache chunks is a sync inside a loop, which on a GPU drains the queue
once per chunk; the bound alone would let a few of those through on small batches, so
the tests also compare a small step with one of twice the batch and twice the chunks.
"""

import pytest
import torch
from sync_steps import count_step_syncs, scored_pairs, scored_triplets, trainer

from biencoder.kernels.infonce_chunked import chunked_backward, chunked_forward
from biencoder.kernels.infonce_options import PLAIN, SYMMETRIC
from biencoder.losses.infonce import InfoNCELoss
from biencoder.model.biencoder import BiEncoder
from biencoder.runtime.syncs import SyncCounter
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.tasks import CoSENTTask, ListwiseKLTask, MarginMSETask, TripletTask
from biencoder.training.trainer import all_finite

BOUND = 3
TASKS = {
    "infonce-hard-negatives": lambda: InfoNCETask(temperature=0.05),
    "infonce-symmetric-learnable": lambda: InfoNCETask(
        temperature=0.05, symmetric=True, learnable_temperature=True
    ),
    "infonce-matryoshka": lambda: InfoNCETask(temperature=0.05, matryoshka_dims=[16, 8]),
    "margin-mse": MarginMSETask,
    "listwise-kl": ListwiseKLTask,
    "triplet": TripletTask,
    "cosent": CoSENTTask,
}
# (batch, chunking): each pair of rows doubles the batch and the number of chunks.
CHUNKINGS = {
    "plain": [(4, {}), (8, {})],
    "gradcache-texts": [(4, {"cache_chunk_size": 2}), (8, {"cache_chunk_size": 2})],
    "gradcache-tokens": [(4, {"cache_chunk_tokens": 40}), (8, {"cache_chunk_tokens": 40})],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def step_counts(model_path, make_task, chunking, tmp_path) -> list[SyncCounter]:
    examples = scored_pairs(8) if make_task is CoSENTTask else scored_triplets(8)
    counts = []
    for batch_size, config in CHUNKINGS[chunking]:
        run = trainer(model_path, make_task(), examples, tmp_path, batch_size=batch_size, **config)
        count_step_syncs(run)  # the first step creates the optimiser state
        counts.append(count_step_syncs(run))
    return counts


@pytest.mark.parametrize("chunking", sorted(CHUNKINGS))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_step_synchronises_a_constant_number_of_times(tiny_model_path, tmp_path, task, chunking):
    small, large = step_counts(tiny_model_path, TASKS[task], chunking, tmp_path)
    assert small.count <= BOUND, small.report()
    assert large.count == small.count, f"small: {small.report()}; large: {large.report()}"


def test_a_sync_inside_the_chunk_loop_is_caught(tiny_model_path, tmp_path, monkeypatch):
    """The check above on purpose broken: one ``.item()`` per encoder forward (what
    ``bool(mask.all())`` in the encoder used to cost) makes the count grow with the chunks."""
    forward = BiEncoder.forward

    def reads_a_value(self, features, kind):
        embeddings = forward(self, features, kind)
        embeddings.sum().item()
        return embeddings

    monkeypatch.setattr(BiEncoder, "forward", reads_a_value)
    small, large = step_counts(
        tiny_model_path, TASKS["infonce-hard-negatives"], "gradcache-texts", tmp_path
    )
    assert large.count > small.count
    assert large.by_op["item"] == 2 * small.by_op["item"]


def test_one_process_reads_the_device_once_per_step(tiny_model_path, tmp_path):
    (syncs,) = step_counts(tiny_model_path, TASKS["infonce-hard-negatives"], "plain", tmp_path)[:1]
    assert syncs.count == 1, syncs.report()
    assert syncs.by_op == {"tolist": 1}


@pytest.mark.parametrize("terms", ["plain", "symmetric"])
def test_the_chunked_infonce_implementation_reads_nothing(seed, terms):
    """The loss is a custom op, whose implementation the counter cannot see from a step
    (it lists the op as opaque): run the chunked forward and backward directly, with
    duplicate doc ids (false negatives), hard negatives, statistics and chunks smaller
    than the batch."""
    q, d = torch.randn(6, 8), torch.randn(12, 8)
    doc_ids = torch.tensor([0, 1, 2, 3, 4, 5, 1, 7, 8, 0, 10, 11])
    loss_terms = {"plain": PLAIN, "symmetric": SYMMETRIC}[terms]
    scale = torch.tensor(20.0)
    with SyncCounter() as syncs:
        _, lse, _ = chunked_forward(q, d, scale, doc_ids, None, None, None, loss_terms, 4, True)
        chunked_backward(
            torch.tensor(1.0), q, d, scale, doc_ids, None, None, None, lse, loss_terms, 4
        )
    assert syncs.count == 0, syncs.report()
    with SyncCounter() as syncs:
        InfoNCELoss(temperature=0.05)(q, d, doc_ids)
    assert any("info_nce" in op for op in syncs.opaque), syncs.opaque


def test_the_checkpoint_finiteness_check_is_one_read(seed):
    parameters = [torch.randn(5, 3) for _ in range(50)]
    with SyncCounter() as syncs:
        assert all_finite(parameters)
    assert syncs.count == 1, syncs.report()
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = [p.clone() for p in parameters]
        broken[37][2, 1] = bad
        assert not all_finite(broken)
    assert not all_finite([torch.ones(3, dtype=torch.bfloat16), torch.tensor([float("nan")])])
    assert all_finite([])


@pytest.mark.parametrize(
    "code, op",
    [
        (lambda t: t.sum().item(), "item"),
        (lambda t: bool(t.any()), "__bool__"),
        (lambda t: float(t.max()), "__float__"),
        (lambda t: t.tolist(), "tolist"),
        (lambda t: t.cpu(), "cpu"),
        (lambda t: t.nonzero(), "nonzero"),
        (lambda t: t[t > 0], "index"),
        (lambda t: t.unique(), "_unique2"),
        (lambda t: torch.repeat_interleave(t.long().abs()), "repeat_interleave"),
        (lambda t: t.to("cpu"), "to"),
        (lambda t: torch.tensor([1.0, 2.0], device=t.device), "tensor"),
    ],
)
def test_the_counter_sees_each_kind_of_synchronisation_once(seed, code, op):
    t = torch.randn(6)
    with SyncCounter() as syncs:
        code(t)
    assert syncs.by_op == {op: 1}, syncs.report()


def test_the_counter_ignores_what_does_not_wait(seed):
    t = torch.randn(6)
    with SyncCounter() as syncs:
        t.to("cpu", non_blocking=True)
        t.to(torch.float64)
        (t * 2).softmax(0).argmax()
        t[torch.tensor([0, 2])]
        torch.full((), 3.0, device=t.device)
    assert syncs.count == 0, syncs.report()
