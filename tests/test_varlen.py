"""The unpadded ("varlen") encoder path against the padded one and against transformers,
and the attention kernels it runs on packed tokens (``model.attention``) against each other."""

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import assert_checkpointing_keeps_gradients
from tolerances import assert_close_to_scale, summation_tolerance
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel

from biencoder.model import attention
from biencoder.model.bert import Encoder, Packing
from biencoder.model.biencoder import BiEncoder, BiEncoderConfig, Tower
from biencoder.model.config import EncoderConfig
from biencoder.model.pooling import POOLING_HEADS
from biencoder.runtime.syncs import SyncCounter

# torch's CPU fallback for jagged SDPA builds a strided nested tensor, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

CONFIG = EncoderConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
# The longest sum behind a state: the MLP's down-projection, or a gradient summed over
# every token of the batch.
TERMS = 4 * 64
# Under bf16 autocast the sums accumulate in fp32 and only their results are rounded, a
# few times per layer: two bf16 computations of a state differ by a few of its ulps, not
# by sqrt(TERMS) of them. The tolerance of a 32-term sum (9 % of the largest value) is 3
# times the largest difference measured on the CPU between the padded and nested kernels
# in the tiny encoder with attentive() weights, where an offset off by one moves the
# pooled states by 27 % or more and the gradients by 88 % or more.
BF16_TERMS = 32

LENGTHS = {
    "ragged": [1, 3, 17, 64],
    "one_text": [5],
    "equal": [9, 9, 9],
}
# The kernels that compute attention on packed tokens on a CPU, forward and backward.
# "varlen" is CUDA-only; FlexAttention, the other candidate, has no CPU backward.
CPU_KERNELS = ["padded", "nested"]
# The kernels that read packing.offsets (the padded one scatters by token positions).
OFFSET_KERNELS = ["nested", "varlen"]
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
NEEDS_VARLEN = pytest.mark.skipif(attention.varlen_attn is None, reason="torch lacks varlen_attn")


def make_batch(lengths: list[int], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids [B, L], with the pad id where the mask [B, L] is 0, as a tokenizer pads."""
    L = max(lengths)
    mask = (torch.arange(L) < torch.tensor(lengths)[:, None]).long()
    if side == "left":
        mask = mask.flip(1)
    ids = torch.randint(1, CONFIG.vocab_size, mask.shape) * mask
    return ids, mask


def make_tower(pooling: str) -> Tower:
    tower = Tower(Encoder(CONFIG), pooling, projection_dim=None).train()
    if pooling == "attention":
        with torch.no_grad():
            tower.pooling.query.normal_()
    return tower


def attentive(encoder: Encoder) -> Encoder:
    """``encoder`` with attention weights of unit gain instead of BERT's 0.02: attention
    then moves the states by their own size, not by 1 %, so a kernel's error shows at
    tolerances as wide as bf16's."""
    with torch.no_grad():
        for layer in encoder.layers:
            for linear in (layer.attn.query, layer.attn.key, layer.attn.value, layer.attn.out):
                linear.weight.normal_(std=CONFIG.hidden_size**-0.5)
    return encoder


def spy(monkeypatch, name: str) -> list[str]:
    """The calls to the attention kernel ``name``, recorded from now on."""
    calls = []
    kernel = attention.KERNELS[name]

    def recorded(*args, **kwargs):
        calls.append(name)
        return kernel(*args, **kwargs)

    monkeypatch.setitem(attention.KERNELS, name, recorded)
    return calls


def pooled_and_grads(
    tower: Tower,
    unpadded: bool,
    ids,
    mask,
    weights,
    kernel: str = "auto",
    packing: Packing | None = None,
    autocast: torch.dtype | None = None,
):
    """Pooled embeddings [B, H] and every parameter's gradient of sum(pooled * weights)."""
    tower.zero_grad()
    tower.encoder.unpadded = unpadded
    tower.encoder.attention = kernel
    with torch.autocast(ids.device.type, dtype=autocast, enabled=autocast is not None):
        pooled = tower(ids, mask, packing=packing)  # [B, H]
    (pooled.float() * weights).sum().backward()
    return pooled.detach().float(), {n: p.grad.clone() for n, p in tower.named_parameters()}


def assert_same_pooled_and_grads(actual, expected, *, terms=TERMS, dtype=torch.float32):
    """Two :func:`pooled_and_grads` results equal up to rounding in ``dtype``."""
    (pooled, grads), (expected_pooled, expected_grads) = actual, expected
    assert_close_to_scale(pooled.to(dtype), expected_pooled.to(dtype), terms=terms)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if name.endswith("attn.key.bias"):
            # Zero up to rounding: a key bias adds the same score to every key of a query,
            # which softmax cancels. Its terms are the size of the key weight's gradient.
            scale = expected_grads[name.replace("bias", "weight")].abs().max()
            atol = summation_tolerance(terms, dtype) * scale.item()
            for g in (grad, grads[name]):
                torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=atol, msg=name)
            continue
        assert_close_to_scale(grads[name].to(dtype), grad.to(dtype), terms=terms, msg=name)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("lengths", LENGTHS.values(), ids=LENGTHS.keys())
@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
def test_unpadded_equals_padded_in_forward_and_gradients(
    seed, monkeypatch, pooling, lengths, side, kernel
):
    tower = make_tower(pooling)
    ids, mask = make_batch(lengths, side)
    weights = torch.randn(len(lengths), CONFIG.hidden_size)  # the upstream gradient
    padded = pooled_and_grads(tower, False, ids, mask, weights)
    calls = spy(monkeypatch, kernel)
    unpadded = pooled_and_grads(tower, True, ids, mask, weights, kernel)
    # Once per layer; a batch without padding is not packed and needs no kernel.
    assert len(calls) == (CONFIG.num_hidden_layers if len(set(lengths)) > 1 else 0)
    assert_same_pooled_and_grads(unpadded, padded)


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
    assert encoder.unpadded
    assert_checkpointing_keeps_gradients(encoder, *make_batch(LENGTHS["ragged"]))


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


# ------------------------------------------------------------------ the attention kernels


def per_row_attention(q, k, v, lengths: list[int]) -> torch.Tensor:
    """The reference: each text's q, k, v [n, A, Dh] through SDPA alone. [T, A, Dh]"""
    rows = [
        F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in row)).transpose(0, 1)
        for row in zip(*(t.split(lengths) for t in (q, k, v)), strict=True)
    ]
    return torch.cat(rows)


def packed_qkv(lengths, side="right", device="cpu", dtype=torch.float32):
    """A leaf qkv [T, 3, A, Dh] of unit scale and the Packing of a batch of ``lengths``."""
    _, mask = make_batch(lengths, side)
    packing = Packing.from_mask(mask).to(device)
    shape = (packing.tokens, 3, CONFIG.num_attention_heads, CONFIG.head_dim)
    qkv = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    return qkv, packing


def kernel_and_grads(kernel, qkv, packing, upstream):
    qkv.grad = None
    y = attention.KERNELS[kernel](qkv, packing)  # [T, A, Dh]
    (y * upstream).sum().backward()
    return y.detach(), qkv.grad.clone()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_each_kernel_attends_within_each_text(seed, kernel, side):
    lengths = LENGTHS["ragged"]
    qkv, packing = packed_qkv(lengths, side)
    upstream = torch.randn(qkv.shape[0], *qkv.shape[2:])
    expected = per_row_attention(*qkv.unbind(1), lengths)
    (expected_grad,) = torch.autograd.grad(expected, qkv, upstream)
    actual, grad = kernel_and_grads(kernel, qkv, packing, upstream)
    # A score sums Dh terms, an output or a key's gradient at most max(lengths).
    assert_close_to_scale(actual, expected.detach(), terms=max(lengths))
    for i, name in enumerate("qkv"):
        assert_close_to_scale(grad[:, i], expected_grad[:, i], terms=max(lengths), msg=name)


def shifted(packing: Packing, row: int) -> Packing:
    """``packing`` with row ``row``'s first token moved to the end of the row before."""
    offsets = packing.offsets.clone()
    offsets[row] += 1
    return packing._replace(offsets=offsets)


@pytest.mark.parametrize(
    "kernel, device, dtype",
    [
        ("nested", "cpu", torch.float32),
        pytest.param("varlen", "cuda", torch.bfloat16, marks=[*GPU, NEEDS_VARLEN]),
    ],
)
def test_an_offset_off_by_one_breaks_the_kernel_parity(seed, kernel, device, dtype):
    """The parity checks above see the offsets: one boundary moved by one token puts
    the kernel's output and gradients far outside the tolerance they pass with."""
    lengths = LENGTHS["ragged"]
    qkv, packing = packed_qkv(lengths, device=device, dtype=dtype)
    upstream = torch.randn(qkv.shape[0], *qkv.shape[2:], device=device, dtype=dtype)
    expected, expected_grad = kernel_and_grads("padded", qkv, packing, upstream)
    actual, grad = kernel_and_grads(kernel, qkv, packing, upstream)
    assert_close_to_scale(actual, expected, terms=max(lengths))
    assert_close_to_scale(grad, expected_grad, terms=max(lengths))
    for row in (1, 2, 3):
        actual, grad = kernel_and_grads(kernel, qkv, shifted(packing, row), upstream)
        for value, reference in ((actual, expected), (grad, expected_grad)):
            with pytest.raises(AssertionError, match="Mismatched elements"):
                assert_close_to_scale(value, reference, terms=max(lengths), msg=f"row {row}")


@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
def test_an_offset_off_by_one_breaks_the_encoder_parity(seed, pooling):
    """The same through the encoder, with the tolerances of its parity test: the states
    and gradients of the rows on either side of the moved boundary change."""
    tower = make_tower(pooling)
    ids, mask = make_batch(LENGTHS["ragged"])
    weights = torch.randn(len(LENGTHS["ragged"]), CONFIG.hidden_size)
    padded = pooled_and_grads(tower, False, ids, mask, weights)
    packing = Packing.from_mask(mask)
    right = pooled_and_grads(tower, True, ids, mask, weights, "nested", packing)
    assert_same_pooled_and_grads(right, padded)
    wrong = pooled_and_grads(tower, True, ids, mask, weights, "nested", shifted(packing, 1))
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_close_to_scale(wrong[0], padded[0], terms=TERMS)
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_same_pooled_and_grads((padded[0], wrong[1]), padded)


@pytest.mark.parametrize(
    "name, runs", [("auto", "padded"), *[(kernel, kernel) for kernel in CPU_KERNELS]]
)
def test_the_attention_knob_picks_the_kernel(seed, monkeypatch, name, runs):
    calls = {kernel: spy(monkeypatch, kernel) for kernel in attention.KERNELS}
    encoder = Encoder(CONFIG).eval()
    assert encoder.attention == "auto"
    encoder.attention = name
    ids, mask = make_batch(LENGTHS["ragged"])
    with torch.no_grad():
        encoder(ids, mask)
    expected = {k: CONFIG.num_hidden_layers if k == runs else 0 for k in attention.KERNELS}
    assert {k: len(c) for k, c in calls.items()} == expected


def test_auto_takes_the_padded_kernel_off_cuda_or_in_fp32_or_with_dropout():
    q = torch.zeros(5, CONFIG.num_attention_heads, CONFIG.head_dim)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert attention.resolve("auto", q.to(dtype), 0.0) == "padded"
    assert attention.resolve("auto", q, 0.1) == "padded"
    assert attention.resolve("nested", q, 0.1) == "nested"


def test_an_unknown_attention_is_refused(seed):
    encoder = Encoder(CONFIG)
    encoder.attention = "flash"
    with pytest.raises(ValueError, match="unknown attention 'flash'; choose one of auto, "):
        encoder(*make_batch(LENGTHS["ragged"]))
    model = BiEncoder(
        BiEncoderConfig(shared=False),
        Tower(Encoder(CONFIG), "mean", None),
        tokenizer=None,
        doc_tower=Tower(Encoder(CONFIG), "mean", None),
    )
    with pytest.raises(ValueError, match="choose one of auto, padded, varlen, nested"):
        model.set_attention("flash")
    towers = (model.query_tower.encoder, model.doc_tower.encoder)
    assert all(encoder.attention == "auto" for encoder in towers)
    for name in attention.CHOICES:
        model.set_attention(name)
        assert all(encoder.attention == name for encoder in towers)


@NEEDS_VARLEN
def test_varlen_refuses_attention_dropout_rather_than_ignore_it(seed):
    """The flash kernel has no dropout: asked for some, it would train without."""
    qkv, packing = packed_qkv(LENGTHS["ragged"])
    with pytest.raises(ValueError, match="no attention dropout"):
        attention.varlen(qkv, packing, dropout=0.1)


@pytest.mark.parametrize("kernel", ["auto", "padded"])
def test_the_packed_padded_kernel_reads_nothing_back(seed, kernel):
    """With the packing made on the host, a training forward and backward reads no value
    back from the device. (The "nested" kernel does on a CPU: torch's CPU fallback for
    jagged SDPA splits the rows by their lengths on the host.)"""
    encoder = Encoder(CONFIG).train()
    encoder.attention = kernel
    ids, mask = make_batch(LENGTHS["ragged"])
    packing = Packing.from_mask(mask)
    with SyncCounter() as syncs:
        (encoder(ids, mask, packing=packing) ** 2).sum().backward()
    assert syncs.count == 0, syncs.report()


def bf16_parity(pooling, side, kernel, device):
    """``kernel`` against the padded kernel, both on packed tokens under bf16 autocast."""
    tower = make_tower(pooling)
    attentive(tower.encoder).to(device)
    ids, mask = make_batch(LENGTHS["ragged"], side)
    packing = Packing.from_mask(mask).to(device)
    ids, mask = ids.to(device), mask.to(device)
    weights = torch.randn(len(LENGTHS["ragged"]), CONFIG.hidden_size, device=device)
    run = (tower, True, ids, mask, weights)
    padded = pooled_and_grads(*run, "padded", packing, autocast=torch.bfloat16)
    actual = pooled_and_grads(*run, kernel, packing, autocast=torch.bfloat16)
    assert_same_pooled_and_grads(actual, padded, terms=BF16_TERMS, dtype=torch.bfloat16)
    # The tolerance is still tight enough to see a boundary moved by one token.
    wrong = pooled_and_grads(*run, kernel, shifted(packing, 1), autocast=torch.bfloat16)
    with pytest.raises(AssertionError, match="Mismatched elements"):
        assert_close_to_scale(wrong[0].bfloat16(), padded[0].bfloat16(), terms=BF16_TERMS)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
def test_nested_equals_padded_under_bf16_autocast(seed, pooling, side):
    """The CPU check of the tolerances the GPU test below uses for the varlen kernel."""
    bf16_parity(pooling, side, "nested", "cpu")


@pytest.mark.parametrize("kernel", [pytest.param("varlen", marks=NEEDS_VARLEN), "nested"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pooling", sorted(POOLING_HEADS))
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_kernels_equal_padded_under_bf16_autocast(seed, pooling, side, kernel):
    bf16_parity(pooling, side, kernel, "cuda")


@NEEDS_VARLEN
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_auto_takes_varlen_in_half_precision_without_dropout(seed, monkeypatch):
    calls = {kernel: spy(monkeypatch, kernel) for kernel in attention.KERNELS}
    encoder = Encoder(CONFIG).cuda()
    ids, mask = (t.cuda() for t in make_batch(LENGTHS["ragged"]))

    def ran(train: bool, autocast: bool, dropout: float = 0.0) -> set[str]:
        for c in calls.values():
            c.clear()
        encoder.train(train).set_dropout(attention=dropout)
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=autocast):
            encoder(ids, mask)
        return {name for c in calls.values() for name in c}

    assert ran(train=False, autocast=True) == {"varlen"}
    assert ran(train=True, autocast=True) == {"varlen"}
    assert ran(train=False, autocast=False) == {"padded"}  # fp32
    assert ran(train=True, autocast=True, dropout=0.1) == {"padded"}
    assert ran(train=False, autocast=True, dropout=0.1) == {"varlen"}  # eval: no dropout


@NEEDS_VARLEN
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_varlen_reads_nothing_back(seed):
    encoder = Encoder(CONFIG).train().cuda()
    encoder.attention = "varlen"
    ids, mask = make_batch(LENGTHS["ragged"])
    packing = Packing.from_mask(mask).to("cuda")
    ids, mask = ids.cuda(), mask.cuda()
    with SyncCounter() as syncs, torch.autocast("cuda", torch.bfloat16):
        (encoder(ids, mask, packing=packing).float() ** 2).sum().backward()
    assert syncs.count == 0, syncs.report()
