"""Checks that run inside the 2-process Gloo groups tests/test_ddp.py starts.

Each rank computes the single-process reference itself (the same global batch through a
second copy of the model, without any collective), then the distributed step on its shard,
and compares: the loss averaged over ranks against the reference loss, and every parameter
gradient after DDP's averaging against the reference gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from examples import SCORED
from parity import perturb_adapters
from torch.nn.parallel import DistributedDataParallel

from biencoder.data.training import Pair, Triplet
from biencoder.model.biencoder import BiEncoder
from biencoder.model.lora import LoraSettings
from biencoder.training.distributed import Distributed
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.step import ColumnEncoder, train_step
from biencoder.training.tasks import (
    ContrastiveTask,
    CoSENTTask,
    CosineSimilarityTask,
    ListwiseKLTask,
    MarginMSETask,
    Task,
    TripletTask,
)
from biencoder.training.trainer import ShardedEncoder

# Texts repeat across examples so that doc-id masking spans ranks: "Paris" is example 1's
# positive and example 0's negative, "K2" a negative of examples 0 and 2 and of 3.
TRIPLETS = [
    Triplet("what causes scurvy", "a lack of vitamin C", ("Paris", "K2")),
    Triplet("capital of france", "Paris", ("Lyon", "a lack of iron")),
    Triplet("tallest mountain", "Mount Everest, 8849 m", ("K2", "the Alps are old")),
    Triplet("speed of light", "about 300000 km/s in vacuum", ("sound is slower", "K2")),
    Triplet("who wrote hamlet", "Shakespeare", ("Marlowe wrote plays too", "Paris")),
    Triplet("boiling point of water", "100 degrees Celsius at sea level", ("ice", "steam")),
]
PAIRS = [Pair(t.query, t.positive) for t in TRIPLETS]
# Teacher scores that disagree with the student's order for some candidates.
SCORED_TRIPLETS = [
    Triplet(t.query, t.positive, t.negatives, scores=(0.9 - 0.1 * i, 0.2 + 0.15 * i, 0.4))
    for i, t in enumerate(TRIPLETS)
]
CASES: dict[str, tuple[Callable[[], Task], list]] = {
    "infonce-triplets": (lambda: InfoNCETask(temperature=0.1), TRIPLETS),
    "infonce-pairs": (lambda: InfoNCETask(temperature=0.1), PAIRS),
    "infonce-symmetric-learnable": (
        lambda: InfoNCETask(temperature=0.1, symmetric=True, learnable_temperature=True),
        TRIPLETS,
    ),
    "infonce-matryoshka": (
        lambda: InfoNCETask(temperature=0.1, symmetric=True, matryoshka_dims=[32, 16, 8]),
        TRIPLETS,
    ),
    "infonce-naive": (lambda: InfoNCETask(temperature=0.1, impl="naive"), TRIPLETS),
    # Computed on the gathered batch: the rank-local path covers q→d and symmetric only.
    "infonce-gte-hardness": (
        lambda: InfoNCETask(
            temperature=0.1,
            directions=["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"],
            hardness_mode="all_negatives",
            hardness_strength=5.0,
        ),
        TRIPLETS,
    ),
    "triplet-triplets": (TripletTask, TRIPLETS),
    "triplet-pairs": (TripletTask, PAIRS),
    "contrastive-pairs": (ContrastiveTask, PAIRS),
    "contrastive-triplets": (ContrastiveTask, TRIPLETS),
    "contrastive-scored": (ContrastiveTask, SCORED),
    "cosent": (CoSENTTask, SCORED),
    "cosine-matryoshka": (lambda: CosineSimilarityTask(matryoshka_dims=[32, 16]), SCORED),
    "margin-mse": (MarginMSETask, SCORED_TRIPLETS),
    "listwise-kl-matryoshka": (
        lambda: ListwiseKLTask(teacher_temperature=0.5, matryoshka_dims=[32, 16]),
        SCORED_TRIPLETS,
    ),
}
# All-reduce sums the ranks' gradients in another order than one process does: fp32
# agrees to ~1e-6 of each gradient's scale, fp64 to ~1e-15.
RELATIVE = {torch.float32: 1e-5, torch.float64: 1e-10}


def load(
    model_path: str,
    shared: bool = True,
    dtype: torch.dtype = torch.float32,
    lora: LoraSettings | None = None,
) -> BiEncoder:
    torch.manual_seed(0)  # the same adapters on every rank and in the reference
    model = BiEncoder.from_pretrained(model_path, shared=shared, lora=lora or LoraSettings())
    model = model.to(dtype).train()
    perturb_adapters(model)
    for tower in {id(t): t for t in (model.query_tower, model.tower("doc"))}.values():
        # Dropout masks depend on each rank's random stream, not on the batch.
        tower.encoder.set_dropout(0.0, 0.0)
    return model


def gradients(model: BiEncoder, task: Task) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(), *(("task." + n, p) for n, p in task.named_parameters())]
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


def assert_same_gradients(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    what: str,
    loss: float,
) -> None:
    """Each gradient within RELATIVE of its scale: its largest value, floored at 1e-3 of the
    largest gradient anywhere (exactly-zero gradients, like attention key biases, hold
    rounding noise only). The loss's own parameters (a learnable temperature) are a sum of
    terms of the loss's size that largely cancel, so their scale is the loss's."""
    assert actual.keys() == expected.keys(), f"{what}: {actual.keys() ^ expected.keys()}"
    floor = 1e-3 * max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        error = (actual[name] - grad).abs().max().item()
        scale = max(grad.abs().max().item(), floor, abs(loss) if name.startswith("task.") else 0)
        relative = RELATIVE[grad.dtype]
        assert error <= relative * scale, f"{what}: {name} off by {error:.3g} (scale {scale:.3g})"


def distributed_step(
    dist: Distributed, model: BiEncoder, task: Task, examples: list, cache: int | None
) -> float:
    """One training step on this rank's shard, gradients averaged as the Trainer does;
    returns the loss averaged over ranks."""
    encoder = DistributedDataParallel(
        ColumnEncoder(model), find_unused_parameters=not model.config.shared
    )
    batch = task.make_batch(examples).shard_for(dist)
    result = train_step(model, task, batch, cache_chunk_size=cache, encoder=encoder)
    dist.average_gradients(task.parameters())
    return dist.mean({"loss": result.loss})["loss"]


def check_steps(
    dist: Distributed, model_path: str, cases: list[str], cache: int | None, dtype: torch.dtype
) -> None:
    for case in cases:
        make_task, examples = CASES[case]
        reference_model, reference_task = load(model_path, dtype=dtype), make_task().to(dtype)
        reference = train_step(reference_model, reference_task, reference_task.make_batch(examples))
        model, task = load(model_path, dtype=dtype), make_task().to(dtype)
        loss = distributed_step(dist, model, task, examples, cache)
        assert abs(loss - reference.loss) <= RELATIVE[dtype] * abs(reference.loss), (
            f"{case}: loss {loss} != single-process {reference.loss}"
        )
        expected = gradients(reference_model, reference_task)
        assert_same_gradients(gradients(model, task), expected, case, reference.loss)


def check_grad_cache(dist: Distributed, model_path: str, shared: bool) -> None:
    """GradCache under DDP (chunks re-embedded under no_sync, one all-reduce) equals the
    plain distributed step, with one tower or two."""
    make_task, examples = CASES["infonce-symmetric-learnable"]
    results = {}
    for cache in (None, 1, 2):
        model, task = load(model_path, shared), make_task()
        loss = distributed_step(dist, model, task, examples, cache)
        results[cache] = (loss, gradients(model, task))
    plain_loss, plain = results[None]
    for cache in (1, 2):
        loss, grads = results[cache]
        assert abs(loss - plain_loss) <= RELATIVE[torch.float32] * abs(plain_loss), cache
        assert_same_gradients(grads, plain, f"GradCache chunk {cache}, shared={shared}", loss)


def check_lora(dist: Distributed, model_path: str, shared: bool) -> None:
    """With LoRA adapters on (frozen encoders, DDP over the adapters alone), one step on 2
    ranks equals one process's, plain and with GradCache, one tower or two."""
    make_task, examples = CASES["infonce-symmetric-learnable"]
    lora = LoraSettings(r=4, alpha=8.0)
    reference_model, reference_task = load(model_path, shared, lora=lora), make_task()
    reference = train_step(reference_model, reference_task, reference_task.make_batch(examples))
    expected = gradients(reference_model, reference_task)
    assert all("lora_" in name or name.startswith("task.") for name in expected), expected.keys()
    for cache in (None, 2):
        model, task = load(model_path, shared, lora=lora), make_task()
        loss = distributed_step(dist, model, task, examples, cache)
        relative = RELATIVE[torch.float32]
        assert abs(loss - reference.loss) <= relative * abs(reference.loss), cache
        assert_same_gradients(gradients(model, task), expected, f"LoRA, GradCache {cache}", loss)


def check_gathered_layout(dist: Distributed) -> None:
    """What the loss receives on a rank: its own queries; the documents with its queries'
    positives first, the other ranks' positives next, and every hard negative after all
    positives, in the whole batch's order (the layout sentence-transformers got wrong in
    PR #3453); doc ids that follow the documents."""
    task = InfoNCETask(temperature=0.1)
    whole = task.make_batch(TRIPLETS)
    texts = sorted({text for column in whole.columns for text in column})
    generator = torch.Generator().manual_seed(0)
    table = dict(zip(texts, torch.randn(len(texts), 8, generator=generator), strict=True))
    batch = whole.shard_for(dist)
    embeddings = [torch.stack([table[t] for t in column]) for column in batch.columns]
    seen = {}

    def record(q, d, doc_ids=None, return_stats=False, **extra):
        seen.update(q=q, d=d, doc_ids=doc_ids)
        return task.base_loss.__class__.forward(task.base_loss, q, d, doc_ids, return_stats)

    task.loss.forward = record
    task(embeddings, batch)
    mine = range(dist.rank * 3, dist.rank * 3 + 3)
    positives = [TRIPLETS[i].positive for i in [*mine, *(i for i in range(6) if i not in mine)]]
    negatives = [n for t in TRIPLETS for n in t.negatives]
    expected = torch.stack([table[t] for t in positives + negatives])
    assert torch.equal(seen["q"], torch.stack([table[TRIPLETS[i].query] for i in mine]))
    assert torch.equal(seen["d"], expected), "gathered documents out of place"
    # Equal ids exactly for equal texts, as the single process numbers them.
    ids = seen["doc_ids"].tolist()
    for a, text_a in enumerate(positives + negatives):
        for b, text_b in enumerate(positives + negatives):
            assert (ids[a] == ids[b]) == (text_a == text_b)


def check_sharded_encode(dist: Distributed, model_path: str) -> None:
    model = load(model_path).eval()
    texts = [t.positive for t in TRIPLETS[:5]]  # an odd count: the ranks' shares differ
    expected = model.encode(texts, kind="doc")
    actual = ShardedEncoder(model, dist).encode(texts, kind="doc")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def check_step_syncs(dist: Distributed, model_path: str, run_dir: str) -> None:
    """On 2 ranks a whole Trainer step synchronises at most 3 times, as often for twice
    the batch and twice the GradCache chunks: DDP's bucketed all-reduce and the gather of
    the loss's columns launch collectives, and only the one gather of the step's numbers
    is read (tests/test_syncs.py does one process)."""
    from pathlib import Path

    from sync_steps import count_step_syncs, scored_triplets, trainer

    tasks = {
        "infonce-hard-negatives": lambda: InfoNCETask(temperature=0.05),
        "infonce-matryoshka": lambda: InfoNCETask(temperature=0.05, matryoshka_dims=[16, 8]),
        "margin-mse": MarginMSETask,
    }
    chunkings = [{}, {"cache_chunk_size": 2}, {"cache_chunk_tokens": 40}]
    for name, make_task in tasks.items():
        for chunking in chunkings:
            counts = []
            for batch_size in (4, 8):
                run = trainer(
                    model_path,
                    make_task(),
                    scored_triplets(8),
                    Path(run_dir) / f"rank{dist.rank}",
                    batch_size=batch_size,
                    dist=dist,
                    **chunking,
                )
                count_step_syncs(run)
                counts.append(count_step_syncs(run))
            small, large = counts
            where = f"rank {dist.rank}, {name}, {chunking}"
            assert small.count <= 3, f"{where}: {small.report()}"
            assert large.count == small.count, f"{where}: {small.report()} / {large.report()}"
