"""InfoNCE: the Triton kernel and the chunked PyTorch path against the naive reference.

Without CUDA the Triton kernels run under the interpreter on CPU tensors: conftest.py sets
TRITON_INTERPRET=1 before any test module imports kernels.infonce.
"""

import pytest
import torch

from kernels import infonce as kernel
from kernels.infonce import (
    BlockSizes,
    InfoNCEFunction,
    fused_info_nce,
    infonce_backward,
    infonce_forward,
)
from losses import InfoNCELoss, info_nce
from losses.infonce import chunked_info_nce, naive_info_nce

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or kernel._INTERPRETED),
    reason="kernels.infonce was imported without CUDA and without TRITON_INTERPRET=1",
)

UPSTREAM = 3.7
TEMPERATURE = 0.05
SHAPES = [(37, 111, 48), (1, 1, 1), (16, 16, 33), (5, 70, 130)]
SHAPE_IDS = ["B37-N111-D48", "B1-N1-D1", "B16-N16-D33", "B5-N70-D130"]
DTYPE_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.float16, 2e-3, 1e-2),
    (torch.bfloat16, 1e-2, 5e-2),
]


@pytest.fixture(autouse=True, scope="module")
def single_cpu_thread():
    """The tiles here are tiny: threads gain nothing, and on a loaded 2-core machine each
    multi-threaded matmul can stall ~16 ms waiting for a descheduled OpenMP worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_embeddings(batch, num_docs, dim, dtype=torch.float32, device=DEVICE):
    """Unit-norm rows, so that logits at temperature 0.05 span a realistic [−20, 20]."""
    q = torch.nn.functional.normalize(torch.randn(batch, dim, dtype=torch.float64), dim=1)
    d = torch.nn.functional.normalize(torch.randn(num_docs, dim, dtype=torch.float64), dim=1)
    return q.to(device, dtype), d.to(device, dtype)


def doc_ids_with_duplicates(batch, num_docs, device=DEVICE):
    """Distinct ids except: two queries share a positive, a hard negative appears twice,
    and a hard negative is another query's positive (each where the shape allows it)."""
    ids = torch.arange(num_docs)
    if batch >= 2:
        ids[batch - 1] = ids[0]
    if num_docs - batch >= 2:
        ids[num_docs - 1] = ids[num_docs - 2]
    if num_docs - batch >= 3:
        ids[batch] = ids[batch // 2]
    return ids.to(device)


def reference(q, d, symmetric, doc_ids, temperature=TEMPERATURE):
    """Naive loss and gradients (q, d, temperature) in float64 on CPU, upstream grad 3.7."""
    q64 = q.detach().cpu().double().requires_grad_()
    d64 = d.detach().cpu().double().requires_grad_()
    t64 = torch.tensor(float(temperature), dtype=torch.float64, requires_grad=True)
    ids = doc_ids.cpu() if doc_ids is not None else None
    loss = naive_info_nce(q64, d64, 1 / t64, symmetric, ids)
    grads = torch.autograd.grad(loss, (q64, d64, t64), torch.tensor(UPSTREAM, dtype=torch.float64))
    return (loss.detach(), *grads)


def loss_and_grads(fn, q, d, temperature=TEMPERATURE):
    """fn(q, d, temperature_tensor) and its gradients for the upstream gradient 3.7."""
    q = q.detach().clone().requires_grad_()
    d = d.detach().clone().requires_grad_()
    t = torch.tensor(float(temperature), device=q.device, requires_grad=True)
    loss = fn(q, d, t)
    grads = torch.autograd.grad(loss, (q, d, t), torch.tensor(UPSTREAM, device=q.device))
    return (loss.detach(), *grads)


def assert_close(actual, expected, atol, rtol):
    """|a − e| <= atol·max|e| + rtol·|e| elementwise: atol is relative to the tensor's
    scale, so one tolerance fits losses and gradients of any magnitude."""
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected, atol=atol * scale, rtol=rtol
    )


def assert_matches_reference(results, expected, atol, rtol):
    for name, actual, wanted in zip(
        ("loss", "dq", "dd", "dtemperature"), results, expected, strict=True
    ):
        try:
            assert_close(actual, wanted, atol, rtol)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


# ------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["no-ids", "dup-ids"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_triton_fp32_matches_naive(seed, shape, symmetric, with_doc_ids):
    q, d = make_embeddings(*shape)
    doc_ids = doc_ids_with_duplicates(shape[0], shape[1]) if with_doc_ids else None
    results = loss_and_grads(
        lambda q, d, t: info_nce(q, d, t, symmetric, doc_ids, impl="triton"), q, d
    )
    assert_matches_reference(results, reference(q, d, symmetric, doc_ids), 1e-5, 1e-5)


@needs_triton
@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPE_TOLERANCES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=[SHAPE_IDS[0], SHAPE_IDS[3]])
def test_triton_dtypes_match_naive(seed, shape, dtype, atol, rtol):
    q, d = make_embeddings(*shape, dtype=dtype)
    doc_ids = doc_ids_with_duplicates(shape[0], shape[1])
    results = loss_and_grads(lambda q, d, t: info_nce(q, d, t, True, doc_ids, impl="triton"), q, d)
    assert results[0].dtype == torch.float32
    assert results[1].dtype == dtype and results[2].dtype == dtype
    # The reference sees the same rounded inputs, so only the kernel's own rounding counts.
    assert_matches_reference(results, reference(q, d, True, doc_ids), atol, rtol)


@needs_triton
@pytest.mark.parametrize("deterministic", [True, False], ids=["owned-dd", "atomic-dd"])
def test_triton_small_tiles_loop_over_d_and_tiles(seed, deterministic):
    """16-wide tiles make every loop run several times: row and column tiles, D slices of
    the logit products and of the gradient accumulators."""
    q, d = make_embeddings(37, 111, 48)
    doc_ids = doc_ids_with_duplicates(37, 111)
    blocks = BlockSizes(m=16, n=16, d=16, d_out=16)
    results = loss_and_grads(
        lambda q, d, t: InfoNCEFunction.apply(q, d, 1 / t, doc_ids, True, deterministic, blocks),
        q,
        d,
    )
    assert_matches_reference(results, reference(q, d, True, doc_ids), 1e-5, 1e-5)


@needs_triton
def test_triton_deterministic_flag(seed):
    """deterministic=True is bitwise reproducible; the atomic variant agrees to rounding."""
    q, d = make_embeddings(37, 111, 48)
    doc_ids = doc_ids_with_duplicates(37, 111)

    def run(deterministic):
        return loss_and_grads(
            lambda q, d, t: fused_info_nce(q, d, 1 / t, True, doc_ids, deterministic), q, d
        )

    first, second, atomic = run(True), run(True), run(False)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    expected = reference(q, d, True, doc_ids)
    assert_matches_reference(atomic, expected, 1e-5, 1e-5)


@needs_triton
def test_triton_non_contiguous_inputs(seed):
    q, d = make_embeddings(37, 111, 48)
    q_strided = torch.zeros(37, 96, device=DEVICE)
    q_strided[:, ::2] = q
    d_transposed = d.T.contiguous().T
    assert not q_strided[:, ::2].is_contiguous() and not d_transposed.is_contiguous()
    results = loss_and_grads(
        lambda q, d, t: fused_info_nce(q, d, 1 / t, True), q_strided[:, ::2], d_transposed
    )
    assert_matches_reference(results, reference(q, d, True, None), 1e-5, 1e-5)


@needs_triton
def test_triton_scale_float_or_tensor(seed):
    q, d = make_embeddings(16, 16, 33)
    from_float = fused_info_nce(q, d, 20.0)
    scale = torch.tensor(20.0, device=DEVICE, requires_grad=True)
    from_tensor = fused_info_nce(q, d, scale)
    assert torch.equal(from_float, from_tensor)
    from_tensor.backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


@needs_triton
def test_triton_saves_only_linear_state(seed):
    """No saved tensor is B×N: D=8 keeps q and d smaller than the 37×111 logits."""
    batch, num_docs = 37, 111
    q, d = make_embeddings(batch, num_docs, 8)
    q.requires_grad_()
    loss = fused_info_nce(q, d, 20.0, symmetric=True, doc_ids=doc_ids_with_duplicates(37, 111))
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) <= num_docs * 8 < batch * num_docs
    assert sorted(t.numel() for t in saved if t.dim() == 1) == [batch, batch, num_docs]


@needs_triton
def test_triton_host_functions_compose(seed):
    """infonce_backward with an explicit upstream gradient reproduces autograd's result."""
    q, d = make_embeddings(16, 40, 24)
    forward = infonce_forward(q, d, 20.0, symmetric=True)
    dq, dd, dscale = infonce_backward(
        q, d, 20.0, torch.tensor(UPSTREAM, device=DEVICE), forward.row_lse, forward.col_lse
    )
    _, ref_dq, ref_dd, ref_dt = reference(q, d, True, None)
    assert_close(forward.loss, reference(q, d, True, None)[0], 1e-5, 1e-5)
    assert_close(dq, ref_dq, 1e-5, 1e-5)
    assert_close(dd, ref_dd, 1e-5, 1e-5)
    # dL/ds = dL/dτ · dτ/ds with τ = 1/s.
    assert_close(dscale, ref_dt * -(TEMPERATURE**2), 1e-5, 1e-5)


@needs_triton
def test_triton_bf16_upcast_only_under_the_interpreter():
    flags = kernel._kernel_flags(torch.bfloat16)
    assert flags["UPCAST_DOT"] is kernel._INTERPRETED
    assert kernel._kernel_flags(torch.float16)["UPCAST_DOT"] is False


@needs_triton
@pytest.mark.parametrize(
    ("q_shape", "d_shape", "kwargs", "error"),
    [
        ((4,), (4, 3), {}, ValueError),
        ((4, 3), (4, 5), {}, ValueError),
        ((5, 3), (4, 3), {}, ValueError),
        ((4, 3), (6, 3), {"doc_ids": torch.zeros(5, dtype=torch.long)}, ValueError),
        ((4, 3), (6, 3), {"doc_ids": torch.zeros(6)}, TypeError),
        ((4, 3), (6, 3), {"d_dtype": torch.float16}, ValueError),
        ((4, 3), (6, 3), {"dtype": torch.float64}, TypeError),
    ],
    ids=["1d", "dim-mismatch", "n<b", "ids-shape", "ids-float", "dtype-mismatch", "fp64"],
)
def test_triton_validates_inputs(q_shape, d_shape, kwargs, error):
    dtype = kwargs.pop("dtype", torch.float32)
    q = torch.randn(q_shape, device=DEVICE, dtype=dtype)
    d = torch.randn(d_shape, device=DEVICE, dtype=kwargs.pop("d_dtype", dtype))
    doc_ids = kwargs.get("doc_ids")
    with pytest.raises(error):
        fused_info_nce(q, d, 20.0, doc_ids=doc_ids.to(DEVICE) if doc_ids is not None else None)


def test_block_sizes_must_suit_tl_dot():
    with pytest.raises(ValueError):
        BlockSizes(m=8, n=16, d=16, d_out=16)
    with pytest.raises(ValueError):
        BlockSizes(m=16, n=48, d=16, d_out=16)


@pytest.mark.slow
@needs_triton
def test_triton_larger_odd_shape_matches_naive(seed):
    q, d = make_embeddings(129, 515, 200)
    doc_ids = torch.randint(0, 300, (515,), device=DEVICE)
    results = loss_and_grads(lambda q, d, t: info_nce(q, d, t, True, doc_ids, impl="triton"), q, d)
    assert_matches_reference(results, reference(q, d, True, doc_ids), 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 5e-2)],
    ids=["fp32", "bf16"],
)
@pytest.mark.parametrize("shape", [(1024, 4096, 768), (1000, 3001, 384)], ids=["pow2", "odd"])
def test_gpu_triton_matches_naive(seed, shape, dtype, atol, rtol):
    q, d = make_embeddings(*shape, dtype=dtype)
    doc_ids = torch.randint(0, shape[1] // 2, (shape[1],), device=DEVICE)
    for deterministic in (True, False):
        results = loss_and_grads(
            lambda q, d, t, deterministic=deterministic: fused_info_nce(
                q, d, 1 / t, True, doc_ids, deterministic
            ),
            q,
            d,
        )
        assert_matches_reference(results, reference(q, d, True, doc_ids), atol, rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_gpu_deterministic_is_bitwise_reproducible(seed):
    q, d = make_embeddings(2048, 4096, 384, dtype=torch.bfloat16)
    runs = [
        loss_and_grads(lambda q, d, t: fused_info_nce(q, d, 1 / t, True), q, d) for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------
# Chunked PyTorch path
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [7, 32, 4096])
@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["no-ids", "dup-ids"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_torch_fp32_matches_naive(seed, shape, symmetric, with_doc_ids, chunk_size):
    q, d = make_embeddings(*shape, device="cpu")
    doc_ids = doc_ids_with_duplicates(shape[0], shape[1], "cpu") if with_doc_ids else None
    results = loss_and_grads(
        lambda q, d, t: info_nce(q, d, t, symmetric, doc_ids, impl="torch", chunk_size=chunk_size),
        q,
        d,
    )
    assert_matches_reference(results, reference(q, d, symmetric, doc_ids), 1e-5, 1e-5)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPE_TOLERANCES, ids=["fp32", "fp16", "bf16"])
def test_torch_dtypes_match_naive(seed, dtype, atol, rtol):
    q, d = make_embeddings(37, 111, 48, dtype=dtype, device="cpu")
    doc_ids = doc_ids_with_duplicates(37, 111, "cpu")
    results = loss_and_grads(
        lambda q, d, t: chunked_info_nce(q, d, 1 / t, True, doc_ids, chunk_size=16), q, d
    )
    assert results[1].dtype == dtype and results[2].dtype == dtype
    assert_matches_reference(results, reference(q, d, True, doc_ids), atol, rtol)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_torch_gradcheck_float64(seed, symmetric):
    q, d = make_embeddings(6, 11, 5, dtype=torch.float64, device="cpu")
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.tensor([0, 1, 0, 2, 3, 4, 5, 1, 5, 6, 2])
    assert torch.autograd.gradcheck(
        lambda q, d, t: info_nce(q, d, t, symmetric, doc_ids, impl="torch", chunk_size=4),
        (q.requires_grad_(), d.requires_grad_(), temperature),
    )


@pytest.mark.slow
def test_torch_larger_odd_shape_matches_naive(seed):
    q, d = make_embeddings(3000, 5000, 384, device="cpu")
    doc_ids = torch.randint(0, 4000, (5000,))
    results = loss_and_grads(
        lambda q, d, t: info_nce(q, d, t, True, doc_ids, impl="torch", chunk_size=1024), q, d
    )
    assert_matches_reference(results, reference(q, d, True, doc_ids), 1e-5, 1e-5)


def test_torch_saves_only_linear_state(seed):
    q, d = make_embeddings(37, 111, 8, device="cpu")
    q.requires_grad_()
    loss = chunked_info_nce(q, d, 20.0, symmetric=True, chunk_size=16)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) <= 111 * 8 < 37 * 111


def test_torch_rejects_bad_chunk_size(seed):
    q, d = make_embeddings(4, 6, 3, device="cpu")
    with pytest.raises(ValueError):
        chunked_info_nce(q, d, 20.0, chunk_size=0)


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def test_auto_impl_uses_torch_on_cpu(seed):
    q, d = make_embeddings(16, 40, 24, device="cpu")
    assert torch.equal(info_nce(q, d, impl="auto"), info_nce(q, d, impl="torch"))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"impl": "cuda"}, ValueError), ({"temperature": 0.0}, ValueError)],
    ids=["impl", "temperature"],
)
def test_info_nce_validates_arguments(seed, kwargs, error):
    q, d = make_embeddings(4, 6, 3, device="cpu")
    with pytest.raises(error):
        info_nce(q, d, **kwargs)


def test_infonce_loss_fixed_temperature(seed):
    q, d = make_embeddings(16, 40, 24, device="cpu")
    module = InfoNCELoss(temperature=0.07, symmetric=True, impl="naive")
    assert module.temperature == 0.07
    assert list(module.parameters()) == []
    expected = info_nce(q, d, 0.07, symmetric=True, impl="naive")
    assert torch.equal(module(q, d), expected)


def test_infonce_loss_learnable_temperature(seed):
    q, d = make_embeddings(16, 40, 24, device="cpu")
    module = InfoNCELoss(temperature=0.05, learnable_temperature=True)
    (log_scale,) = module.parameters()
    assert torch.allclose(module.temperature, torch.tensor(0.05))
    doc_ids = doc_ids_with_duplicates(16, 40, "cpu")
    loss = module(q, d, doc_ids)
    assert torch.allclose(loss, info_nce(q, d, 0.05, doc_ids=doc_ids, impl="naive"))
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad != 0


def test_infonce_loss_clamps_learnable_temperature():
    module = InfoNCELoss(temperature=0.05, learnable_temperature=True)
    with torch.no_grad():
        module.log_scale.fill_(50.0)
    assert module.temperature.item() == pytest.approx(InfoNCELoss.MIN_TEMPERATURE)
    with torch.no_grad():
        module.log_scale.fill_(-50.0)
    assert module.temperature.item() == pytest.approx(InfoNCELoss.MAX_TEMPERATURE)
    with pytest.raises(ValueError):
        InfoNCELoss(temperature=5.0)
