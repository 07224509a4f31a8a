"""The unpadded ("varlen") encoder path against the padded one and against transformers."""

import copy

import pytest
import torch
from tolerances import assert_close_to_scale, summation_tolerance
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

from biencoder.model.bert import Encoder
from biencoder.model.biencoder import Tower
from biencoder.model.config import EncoderConfig
from biencoder.model.pooling import POOLING_HEADS

CONFIG = EncoderConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# The longest sum behind a state: the MLP's down-projection, or a gradient summed over
# every token of the batch.
TERMS = 4 * 64

LENGTHS = {
    "ragged": [1, 3, 17, 64],
    "one_text": [5],
    "equal": [9, 9, 9],
}


def make_batch(lengths: list[int], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, L], with the pad id where the mask [B, L] is 0, as a tokenizer pads."""
    L = max(lengths)
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    ids = torch.randint(1, CONFIG.vocab_size, mask.shape) * mask
    return ids, mask


def pooled_and_grads(tower: Tower, unpadded: bool, ids, mask, weights):
    tower.zero_grad()
    tower.encoder.unpadded = unpadded
    pooled = tower(ids, mask)  # [B, H]
    (pooled * weights).sum().backward()
    return pooled.detach(), {n: p.grad.clone() for n, p in tower.named_parameters()}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
def test_unpadded_equals_padded_in_forward_and_gradients(seed, pooling, lengths, side):
    tower = Tower(Encoder(CONFIG), pooling, projection_dim=None).train()
    if pooling == "attention":
        with torch.no_grad():
            tower.pooling.query.normal_()
    ids, mask = make_batch(lengths, side)
    weights = torch.randn(len(lengths), CONFIG.hidden_size)
    padded, padded_grads = pooled_and_grads(tower, False, ids, mask, weights)
    unpadded, unpadded_grads = pooled_and_grads(tower, True, ids, mask, weights)
    assert_close_to_scale(unpadded, padded, terms=TERMS)
    assert padded_grads.keys() == unpadded_grads.keys()
    for name, grad in padded_grads.items():
        if name.endswith("attn.key.bias"):
            # Zero up to rounding: a key bias adds the same score to every key of a query,
            # which softmax cancels. Its terms are the size of the key weight's gradient.
            scale = padded_grads[name.replace("bias", "weight")].abs().max()
            atol = summation_tolerance(TERMS) * scale.item()
            for g in (grad, unpadded_grads[name]):
                torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=atol, msg=name)
            continue
        assert_close_to_scale(unpadded_grads[name], grad, terms=TERMS, msg=name)


def test_unpadded_states_equal_padded_states_at_real_tokens(seed):
    encoder = Encoder(CONFIG).eval()
    ids, mask = make_batch(LENGTHS["ragged"])
    real = mask.bool()
    with torch.no_grad():
        for k in range(CONFIG.num_hidden_layers + 1):
            encoder.unpadded = False
            padded = encoder(ids, mask, num_layers=k)
            encoder.unpadded = True
            unpadded = encoder(ids, mask, num_layers=k)
            assert_close_to_scale(unpadded[real], padded[real], terms=TERMS, msg=f"layer {k}")
            # The unpadded path never computes padded positions; the padded one does.
            assert not unpadded[~real].any()
            assert padded[~real].abs().min() > 0


def linear_flops(encoder: Encoder, ids: torch.Tensor, mask: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        encoder(ids, mask)
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if "addmm" in str(op) or op is torch.ops.aten.mm)


def test_unpadded_flag_spends_projection_flops_on_real_tokens_only(seed):
    encoder = Encoder(CONFIG).eval()
    ids, mask = make_batch(LENGTHS["ragged"])
    encoder.unpadded = False
    padded = linear_flops(encoder, ids, mask)
    encoder.unpadded = True
    unpadded = linear_flops(encoder, ids, mask)
    assert padded > 0
    # Every projection runs on the 85 real tokens instead of 4 x 64 padded positions.
    assert unpadded * mask.numel() == padded * int(mask.sum())


def test_unpadded_gradient_checkpointing_gives_the_same_gradients(seed):
    encoder = Encoder(CONFIG).train()
    ids, mask = make_batch(LENGTHS["ragged"])

    def grads(checkpointing: bool) -> list[torch.Tensor]:
        encoder.zero_grad()
        encoder.gradient_checkpointing = checkpointing
        (encoder(ids, mask) ** 2).sum().backward()
        return [p.grad.clone() for p in encoder.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True), strict=True):
        torch.testing.assert_close(plain, checkpointed, rtol=0, atol=0)


def test_unpadded_matches_transformers_on_minilm(minilm, minilm_path):
    texts = ["hello", "A short claim.", "Scientific claims need evidence. " * 12, "Short."]
    batch = minilm.tokenize(texts, "doc")
    mask = batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) == len(texts)
    # Float64, as in test_encoder: float32 rounding is near the size of subtle bugs.
    ours = copy.deepcopy(minilm.query_tower.encoder).double()
    ours.unpadded = True
    theirs = AutoModel.from_pretrained(minilm_path).eval().double()
    with torch.no_grad():
        expected = theirs(**batch).last_hidden_state
        actual = ours(batch["input_ids"], mask, batch["token_type_ids"])
    real = mask.bool()
    assert_close_to_scale(actual[real], expected[real], terms=ours.config.intermediate_size)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
def test_gpu_unpadded_equals_padded_and_the_cpu(seed, pooling):
    """On CUDA SDPA picks other kernels than on CPU: the varlen path must still give the
    padded path's embeddings and gradients, and both the CPU's."""
    tower = Tower(Encoder(CONFIG), pooling, projection_dim=None).train()
    if pooling == "attention":
        with torch.no_grad():
            tower.pooling.query.normal_()
    ids, mask = make_batch(LENGTHS["ragged"])
    weights = torch.randn(len(LENGTHS["ragged"]), CONFIG.hidden_size)
    on_cpu, cpu_grads = pooled_and_grads(tower, True, ids, mask, weights)
    tower.cuda()
    ids, mask, weights = ids.cuda(), mask.cuda(), weights.cuda()
    padded, padded_grads = pooled_and_grads(tower, False, ids, mask, weights)
    unpadded, unpadded_grads = pooled_and_grads(tower, True, ids, mask, weights)
    assert_close_to_scale(unpadded, padded, terms=TERMS)
    # Two devices, two summation orders in every layer: the tolerance of twice the terms.
    assert_close_to_scale(unpadded.cpu(), on_cpu, terms=2 * TERMS)
    for name, grad in cpu_grads.items():
        if name.endswith("attn.key.bias"):
            continue  # rounding noise around an exact zero, as in the CPU test above
        assert_close_to_scale(unpadded_grads[name], padded_grads[name], terms=TERMS, msg=name)
        assert_close_to_scale(unpadded_grads[name].cpu(), grad, terms=2 * TERMS, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_autocast_keeps_the_fp32_embeddings(seed):
    """bf16 autocast, as training and encode use it on a GPU: pooled embeddings within
    bf16 rounding of fp32 ones (cosine > 0.999), on both execution paths."""
    tower = Tower(Encoder(CONFIG), "mean", projection_dim=None).eval().cuda()
    ids, mask = (t.cuda() for t in make_batch(LENGTHS["ragged"]))
    # LayerNorm runs in fp32 under autocast, so the states leave each block in fp32: the
    # MLP's projection shows whether the matrix products ran in bf16.
    seen = []
    tower.encoder.layers[0].mlp.up.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    for unpadded in (False, True):
        tower.encoder.unpadded = unpadded
        with torch.no_grad():
            full = tower(ids, mask)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                half = tower(ids, mask)
        assert seen[-2:] == [torch.float32, torch.bfloat16]
        cosine = torch.nn.functional.cosine_similarity(half.float(), full, dim=-1)
        assert cosine.min() > 0.999, (unpadded, cosine)
