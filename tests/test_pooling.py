"""Each pooling head against a hand-computed expression on padded batches."""

import pytest
import torch

from biencoder.model.pooling import POOLING_HEADS, build_pooling

B, T, H = 4, 6, 5


@pytest.fixture
def batch(seed):
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    right = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    )
    left = right.flip(1)
    return hidden, right, left


def real_tokens(hidden, mask, b):
    return [hidden[b, t] for t in range(T) if mask[b, t]]


def expected(name: str, hidden, mask, query=None):
    rows = []
    for b in range(B):
        toks = torch.stack(real_tokens(hidden, mask, b))  # [n, H]
        n = len(toks)
        if name == "cls":
            rows.append(toks[0])
        elif name == "mean":
            rows.append(sum(toks) / n)
        elif name == "max":
            rows.append(torch.stack([max(toks[:, h]) for h in range(H)]))
        elif name == "weighted_mean":
            weights = [t + 1 for t in range(n)]
            rows.append(sum(w * x for w, x in zip(weights, toks, strict=True)) / sum(weights))
        elif name == "last_token":
            rows.append(toks[-1])
        elif name == "attention":
            scores = torch.tensor([float(x @ query) / H**0.5 for x in toks], dtype=hidden.dtype)
            weights = torch.exp(scores) / torch.exp(scores).sum()
            rows.append(sum(w * x for w, x in zip(weights, toks, strict=True)))
    return torch.stack(rows)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("name", sorted(POOLING_HEADS))
def test_head_matches_hand_computation(name, padding, batch):
    hidden, right, left = batch
    mask = right if padding == "right" else left
    head = build_pooling(name, H).double()
    query = None
    if name == "attention":
        with torch.no_grad():
            head.query.copy_(torch.randn(H, dtype=torch.float64))
        query = head.query.detach()
    torch.testing.assert_close(head(hidden, mask), expected(name, hidden, mask, query))


def test_padding_content_never_leaks(batch):
    hidden, right, _ = batch
    noisy = hidden.masked_fill(~right.bool().unsqueeze(-1), 1e6)
    for name in POOLING_HEADS:
        head = build_pooling(name, H).double()
        torch.testing.assert_close(head(hidden, right), head(noisy, right), msg=name)


def test_untrained_attention_pooling_is_mean_pooling(batch):
    hidden, right, _ = batch
    torch.testing.assert_close(
        build_pooling("attention", H).double()(hidden, right),
        build_pooling("mean", H)(hidden, right),
    )


def test_attention_pooling_learns(batch):
    hidden, right, _ = batch
    head = build_pooling("attention", H).double()
    head(hidden, right)[:, 0].sum().backward()
    assert head.query.grad.abs().sum() > 0


def test_unknown_pooling_lists_choices():
    with pytest.raises(ValueError, match="unknown pooling 'avg'; choose one of cls, mean"):
        build_pooling("avg", H)
