"""GradCache gives the plain step's gradients, dropout included, for every chunk size."""

import pytest
import torch
from examples import SCORED
from transformers import AutoTokenizer

from biencoder.data.training import Pair, Triplet
from biencoder.losses.infonce import InfoNCELoss
from biencoder.model.bert import Encoder
from biencoder.model.biencoder import BiEncoder, BiEncoderConfig, Tower
from biencoder.model.config import EncoderConfig
from biencoder.training import step as step_module
from biencoder.training.infonce_task import InfoNCETask
from biencoder.training.step import (
    RandomState,
    embed_columns,
    token_budget_groups,
    tokenize_batch,
    train_step,
)
from biencoder.training.tasks import CoSENTTask, ListwiseKLTask, MarginMSETask

# 512 positions: the default, as before EncoderConfig.tiny existed, so the texts are not cut.
TINY = EncoderConfig.tiny(
    max_position_embeddings=512, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2
)
# GradCache reorders the same fp32 sums (chunked embedding, a separate loss backward), so
# gradients agree to a few ulps of their own scale on any CPU; compared relative to each
# parameter's largest gradient, 1e-4 leaves two orders of margin over what was measured
# (<1e-6) while a missing dropout replay or a wrong chunk offset is off by >1e-1.
TOLERANCE = 1e-4

TRIPLETS = [
    Triplet("what causes scurvy", "a lack of vitamin C", ("iron deficiency", "too much sun")),
    Triplet("capital of france", "Paris is the capital", ("Lyon", "a lack of vitamin C")),
    Triplet("tallest mountain", "Mount Everest, 8849 m", ("K2", "the Alps are old")),
    Triplet("speed of light", "about 300000 km/s in vacuum", ("sound is slower", "K2")),
    Triplet("who wrote hamlet", "Shakespeare", ("Marlowe wrote plays too", "Paris")),
    Triplet("boiling point of water", "100 degrees Celsius at sea level", ("ice", "steam")),
]
PAIRS = [Pair(t.query, t.positive) for t in TRIPLETS]
SCORED_TRIPLETS = [
    Triplet(t.query, t.positive, t.negatives, scores=(1.0 - 0.1 * i, 0.3 * i, 0.5))
    for i, t in enumerate(TRIPLETS)
]
# Larger than every column, so that each column is one chunk.
WHOLE = 100


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def tiny_model(tokenizer, shared: bool = True) -> BiEncoder:
    torch.manual_seed(0)
    config = BiEncoderConfig(max_length=32, shared=shared)
    doc_tower = None if shared else Tower(Encoder(TINY), "mean", None)
    return BiEncoder(config, Tower(Encoder(TINY), "mean", None), tokenizer, doc_tower).train()


def infonce(symmetric: bool = False, **kwargs) -> InfoNCETask:
    return InfoNCETask(temperature=0.1, learnable_temperature=True, symmetric=symmetric, **kwargs)


def gradients(model, task) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(), *(("task." + n, p) for n, p in task.named_parameters())]
    return {name: p.grad.clone() for name, p in named if p.grad is not None}


def step(model, task, batch, *, cache=None, reference_chunk=None, tokens=None):
    """Gradients and loss of one step from the same random state.

    ``reference_chunk`` is the plain step embedding that many texts per forward pass:
    with dropout, it draws the same masks as GradCache with that chunk size. ``tokens``
    is a token budget: GradCache's chunks, or with ``reference_chunk="tokens"`` the plain
    step's.
    """
    model.zero_grad(set_to_none=True)
    task.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    if reference_chunk is None:
        loss = train_step(
            model, task, batch, cache_chunk_size=cache, cache_chunk_tokens=tokens
        ).loss.item()
    else:
        chunking = {"chunk_tokens": tokens} if reference_chunk == "tokens" else {}
        chunking = chunking or {"chunk_size": reference_chunk}
        loss_tensor, _ = task(embed_columns(model, batch, **chunking), batch)
        loss_tensor.backward()
        loss = loss_tensor.item()
    return loss, gradients(model, task)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference of any parameter's gradients relative to that parameter's
    largest gradient in ``b``, floored at 1e-3 of the largest over all parameters: some
    gradients are exactly 0 in theory (attention key biases) and hold rounding noise only."""
    assert a.keys() == b.keys()
    floor = 1e-3 * max(grad.abs().max().item() for grad in b.values())
    return max(
        (a[name] - b[name]).abs().max().item() / max(b[name].abs().max().item(), floor)
        for name in a
    )


CASES = {
    "infonce-triplets": (infonce, TRIPLETS, True),
    "infonce-pairs": (infonce, PAIRS, True),
    "infonce-symmetric-triplets": (lambda: infonce(symmetric=True), TRIPLETS, True),
    "infonce-symmetric-pairs": (lambda: infonce(symmetric=True), PAIRS, True),
    "infonce-separate-towers": (infonce, TRIPLETS, False),
    "matryoshka-infonce": (lambda: infonce(matryoshka_dims=[8, 16, 32]), TRIPLETS, True),
    "cosent": (CoSENTTask, SCORED, True),
    "margin-mse": (MarginMSETask, SCORED_TRIPLETS, True),
    "listwise-kl-matryoshka": (
        lambda: ListwiseKLTask(matryoshka_dims=[8, 32]),
        SCORED_TRIPLETS,
        True,
    ),
}


@pytest.mark.parametrize("chunk", [1, 4, WHOLE])
@pytest.mark.parametrize("case", CASES)
def test_grad_cache_matches_the_plain_step_with_dropout(tokenizer, case, chunk):
    make_task, examples, shared = CASES[case]
    model, task = tiny_model(tokenizer, shared), make_task()
    batch = task.make_batch(examples)

    cached_loss, cached = step(model, task, batch, cache=chunk)
    reference_chunk = None if chunk == WHOLE else chunk
    plain_loss, plain = step(model, task, batch, reference_chunk=reference_chunk)

    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert max_difference(cached, plain) <= TOLERANCE
    if isinstance(task.base_loss, InfoNCELoss):
        temperature_grad = next(v for k, v in cached.items() if k.endswith("log_scale"))
        assert temperature_grad.abs() > 0
    if not shared:
        assert any(k.startswith("doc_tower") for k in cached)


@pytest.mark.parametrize("chunk", [1, 4])
def test_without_rng_replay_dropout_masks_differ(tokenizer, monkeypatch, chunk):
    model, task = tiny_model(tokenizer), infonce()
    batch = task.make_batch(TRIPLETS)
    _, plain = step(model, task, batch, reference_chunk=chunk)
    monkeypatch.setattr(RandomState, "restore", lambda self: None)
    _, unreplayed = step(model, task, batch, cache=chunk)
    assert max_difference(unreplayed, plain) > 100 * TOLERANCE


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunk_padding_does_not_change_gradients_without_dropout(tokenizer, chunk):
    model, task = tiny_model(tokenizer).eval(), infonce(symmetric=True)
    batch = task.make_batch(TRIPLETS)
    _, cached = step(model, task, batch, cache=chunk)
    _, plain = step(model, task, batch)
    assert max_difference(cached, plain) <= TOLERANCE


@pytest.mark.parametrize("cache", [None, 2])
def test_max_length_truncates_like_a_model_with_that_limit(tokenizer, cache):
    task = infonce()
    batch = task.make_batch(TRIPLETS)
    model = tiny_model(tokenizer).eval()
    model.zero_grad(set_to_none=True)
    train_step(model, task, batch, cache_chunk_size=cache, max_length=6)
    truncated = gradients(model, task)

    limited = tiny_model(tokenizer).eval()
    limited.config.max_length = 6
    _, expected = step(limited, infonce(), batch, cache=cache)
    _, untruncated = step(tiny_model(tokenizer).eval(), infonce(), batch, cache=cache)
    assert max_difference(truncated, expected) <= TOLERANCE
    assert max_difference(truncated, untruncated) > 100 * TOLERANCE


def test_grad_cache_under_bfloat16_autocast(tokenizer):
    model, task = tiny_model(tokenizer), infonce()
    batch = task.make_batch(TRIPLETS)
    torch.manual_seed(1234)
    embeddings = embed_columns(model, batch, chunk_size=4, autocast=torch.bfloat16)
    assert all(e.dtype == torch.float32 for e in embeddings)
    loss, _ = task(embeddings, batch)
    loss.backward()
    plain = gradients(model, task)

    model.zero_grad(set_to_none=True)
    task.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    cached = train_step(model, task, batch, cache_chunk_size=4, autocast=torch.bfloat16)
    cached_loss = cached.loss.item()
    assert cached_loss == pytest.approx(loss.item(), rel=1e-5)
    assert max_difference(gradients(model, task), plain) <= TOLERANCE


def test_replay_leaves_the_random_stream_where_the_first_pass_left_it(tokenizer):
    model, task = tiny_model(tokenizer), infonce()
    batch = task.make_batch(PAIRS)
    torch.manual_seed(7)
    embed_columns(model, batch, chunk_size=4)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train_step(model, task, batch, cache_chunk_size=4)
    torch.testing.assert_close(torch.rand(3), expected)


def test_chunk_sizes_must_be_positive(tokenizer):
    model, task = tiny_model(tokenizer), infonce()
    batch = task.make_batch(PAIRS)
    with pytest.raises(ValueError, match="cache_chunk_size must be a positive"):
        train_step(model, task, batch, cache_chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        embed_columns(model, batch, chunk_size=0)
    with pytest.raises(ValueError, match="cache_chunk_tokens must be a positive"):
        train_step(model, task, batch, cache_chunk_tokens=0)
    with pytest.raises(ValueError, match="set one, not both"):
        train_step(model, task, batch, cache_chunk_size=2, cache_chunk_tokens=64)


# ----------------------------------------------------------------- token-budget chunks

# Token budgets: below the longest text (every text alone), a few texts per chunk, and
# more than a column (one chunk, texts reordered by length).
BUDGETS = [1, 24, 10_000]


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("case", CASES)
def test_token_budget_grad_cache_matches_the_plain_step_with_dropout(tokenizer, case, budget):
    """The plain step embedding the same length-grouped chunks draws the same dropout
    masks: the gradients must agree as closely as with chunks of a fixed size."""
    make_task, examples, shared = CASES[case]
    model, task = tiny_model(tokenizer, shared), make_task()
    batch = task.make_batch(examples)
    cached_loss, cached = step(model, task, batch, tokens=budget)
    plain_loss, plain = step(model, task, batch, reference_chunk="tokens", tokens=budget)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert max_difference(cached, plain) <= TOLERANCE


@pytest.mark.parametrize("budget", BUDGETS)
def test_token_budget_chunks_give_the_unchunked_gradients_without_dropout(tokenizer, budget):
    """Without dropout the chunking is invisible: against one pass over whole columns in
    their own order, an oracle that shares no chunking code with the step."""
    model, task = tiny_model(tokenizer).eval(), infonce(symmetric=True)
    batch = task.make_batch(TRIPLETS)
    cached_loss, cached = step(model, task, batch, tokens=budget)
    plain_loss, plain = step(model, task, batch)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert max_difference(cached, plain) <= TOLERANCE


def test_a_row_order_off_by_one_is_caught(tokenizer, monkeypatch):
    """The check above on purpose broken: putting the chunks' rows back one place off
    (each text takes its neighbour's embedding) moves the gradients far past TOLERANCE."""
    model, task = tiny_model(tokenizer).eval(), infonce(symmetric=True)
    batch = task.make_batch(TRIPLETS)
    _, plain = step(model, task, batch)
    assemble = step_module._assemble

    def off_by_one(parts, restore):
        return assemble(parts, None if restore is None else restore.roll(1))

    monkeypatch.setattr(step_module, "_assemble", off_by_one)
    _, shifted = step(model, task, batch, tokens=24)
    assert max_difference(shifted, plain) > 100 * TOLERANCE


def test_token_budget_chunks_pad_less_than_fixed_size_chunks(tokenizer):
    """Grouped by length, the chunks hold fewer padded tokens than chunks of as many texts
    in batch order, and no chunk of several texts exceeds the budget."""
    model, task = tiny_model(tokenizer), infonce()
    batch = task.make_batch(
        TRIPLETS + [Triplet(t.query * 3, t.positive, t.negatives) for t in TRIPLETS]
    )

    def padded_tokens(tokenized):
        return sum(c.features["input_ids"].numel() for col in tokenized.chunks for c in col)

    by_tokens = tokenize_batch(model, batch, None, None, chunk_tokens=64)
    sizes = [c.size for col in by_tokens.chunks for c in col]
    by_texts = tokenize_batch(model, batch, round(sum(sizes) / len(sizes)), None)
    assert padded_tokens(by_tokens) < padded_tokens(by_texts)
    for column in by_tokens.chunks:
        for chunk in column:
            assert chunk.size == 1 or chunk.features["input_ids"].numel() <= 64
    assert by_tokens.tokens == by_texts.tokens


@pytest.mark.parametrize(
    "lengths, budget, groups",
    [
        ([3, 9, 5, 9, 1], 18, [[1, 3], [2, 0, 4]]),
        ([3, 9, 5, 9, 1], 8, [[1], [3], [2], [0, 4]]),
        ([4, 4, 4], 100, [[0, 1, 2]]),
        ([], 10, []),
    ],
)
def test_token_budget_groups_by_hand(lengths, budget, groups):
    assert token_budget_groups(lengths, budget) == groups
