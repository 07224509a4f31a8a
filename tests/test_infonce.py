"""InfoNCE: the Triton kernel and the chunked PyTorch path against the naive reference.

Without CUDA the Triton kernels run under the interpreter on CPU tensors: conftest.py sets
TRITON_INTERPRET=1 before any test module imports kernels.infonce.
"""

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from biencoder.kernels import infonce as kernel
from biencoder.kernels import infonce_launch as launch
from biencoder.kernels.infonce_host import infonce_backward, infonce_forward
from biencoder.kernels.infonce_launch import BlockSizes
from biencoder.kernels.infonce_op import chunked_info_nce, fused_info_nce
from biencoder.kernels.infonce_options import InfoNCEStats, loss_terms
from biencoder.losses.infonce import InfoNCELoss, info_nce
from biencoder.losses.infonce_naive import naive_info_nce

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or kernel.INTERPRETED),
    reason="biencoder.kernels.infonce was imported without CUDA and without TRITON_INTERPRET=1",
)

UPSTREAM = 3.7
TEMPERATURE = 0.05
SHAPES = [(37, 111, 48), (1, 1, 1), (16, 16, 33), (5, 70, 130)]
SHAPE_IDS = ["B37-N111-D48", "B1-N1-D1", "B16-N16-D33", "B5-N70-D130"]
FP32_EPS = torch.finfo(torch.float32).eps
FP16_EPS = torch.finfo(torch.float16).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps
# (dtype, atol, rtol) for assert_close: |a − e| <= atol·max|e| + rtol·|e|, in units of the
# dtype's epsilon. The worst errors measured (AMD EPYC, every comparison in this file and
# the slow ones) were 3 eps for fp32, where the order of the fp32 sums decides the last
# bits, and 0.5 eps for fp16/bf16, the final rounding of the gradients. About 10× that
# absorbs the other sum orders of other x86 CPUs (AVX2 vs AVX-512/AMX kernels, other BLAS
# blockings), while a wrong mask, a missing term or a term counted twice is off by far
# more than 32 eps.
DTYPE_TOLERANCES = [
    (torch.float32, 32 * FP32_EPS, 32 * FP32_EPS),
    (torch.float16, 2 * FP16_EPS, 4 * FP16_EPS),
    (torch.bfloat16, 2 * BF16_EPS, 4 * BF16_EPS),
]
FP32_TOLERANCE = DTYPE_TOLERANCES[0][1:]


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


class WithBlockSizes(torch.autograd.Function):
    """The kernels' forward and backward at chosen tile sizes, which the custom op (the
    path users take) does not expose: tiles smaller than the inputs make every loop run
    several times. Outputs as the op's: the loss, then the statistics with ``return_stats``."""

    @staticmethod
    def forward(ctx, q, d, scale, doc_ids, symmetric, strategy, blocks, return_stats=False):
        result = infonce_forward(q, d, scale, doc_ids, symmetric, blocks, return_stats)
        ctx.save_for_backward(q, d, scale, doc_ids, result.lse)
        ctx.strategy, ctx.blocks = strategy, blocks
        ctx.terms = loss_terms(symmetric)
        if result.stats is None:
            return result.loss
        stats = result.stats
        stats_tensors = (
            stats.positive,
            stats.best_other,
            stats.best_other_index,
            stats.false_negatives,
        )
        ctx.mark_non_differentiable(*stats_tensors)
        return (result.loss, *stats_tensors)

    @staticmethod
    def backward(ctx, grad_loss, *_stats_grads):
        q, d, scale, doc_ids, lse = ctx.saved_tensors
        dq, dd, dscale = infonce_backward(
            q,
            d,
            scale,
            grad_loss,
            lse,
            doc_ids,
            block_sizes=ctx.blocks,
            terms=ctx.terms,
            **ctx.strategy,
        )
        return dq, dd, dscale.reshape(scale.shape), None, None, None, None, None


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
    assert_matches_reference(results, reference(q, d, symmetric, doc_ids), *FP32_TOLERANCE)


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


# The backward strategies of kernels.infonce_host.infonce_backward: column chunks multiplied out
# as GEMMs (a chunk of 32 splits 111 columns into three full chunks and a partial one), and
# the in-kernel recomputation with the column gradients owned or added atomically.
STRATEGIES = {
    "gemm": {"backward": "gemm", "chunk_size": 32},
    "owned-dd": {"backward": "recompute", "deterministic": True},
    "atomic-dd": {"backward": "recompute", "deterministic": False},
}


@needs_triton
@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_triton_small_tiles_loop_over_d_and_tiles(seed, strategy):
    """16-wide tiles make every loop run several times: row and column tiles, D slices of
    the logit products and of the gradient accumulators, column chunks."""
    q, d = make_embeddings(37, 111, 48)
    doc_ids = doc_ids_with_duplicates(37, 111)
    blocks = BlockSizes(m=16, n=16, d=16, d_out=16)
    results = loss_and_grads(
        lambda q, d, t: WithBlockSizes.apply(q, d, 1 / t, doc_ids, True, strategy, blocks),
        q,
        d,
    )
    assert_matches_reference(results, reference(q, d, True, doc_ids), *FP32_TOLERANCE)


@needs_triton
def test_triton_deterministic_flag(seed):
    """deterministic=True and the gemm backward are bitwise reproducible; the atomic
    variant agrees to rounding."""
    q, d = make_embeddings(37, 111, 48)
    doc_ids = doc_ids_with_duplicates(37, 111)

    def run(**strategy):
        return loss_and_grads(
            lambda q, d, t: fused_info_nce(q, d, 1 / t, True, doc_ids, **strategy), q, d
        )

    for strategy in (STRATEGIES["owned-dd"], STRATEGIES["gemm"]):
        first, second = run(**strategy), run(**strategy)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
    expected = reference(q, d, True, doc_ids)
    assert_matches_reference(run(**STRATEGIES["atomic-dd"]), expected, *FP32_TOLERANCE)


@needs_triton
def test_triton_chunk_size_sets_the_gemm_backwards_column_chunks(seed, monkeypatch):
    """info_nce(impl="triton", chunk_size=c) launches the probability kernel once per c
    columns, each writing a [B, c] tile, and every chunking gives the same gradients."""
    q, d = make_embeddings(37, 111, 48)
    doc_ids = doc_ids_with_duplicates(37, 111)
    launched = []
    probs_kernel = launch.infonce_bwd_probs_kernel

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(args[9].shape)  # probs_ptr, the tenth argument
                return probs_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(launch, "infonce_bwd_probs_kernel", Recording())
    expected = reference(q, d, True, doc_ids)
    for chunk_size, launches in ((16, 7), (111, 1), (4096, 1)):
        launched.clear()
        results = loss_and_grads(
            lambda q, d, t, c=chunk_size: info_nce(q, d, t, True, doc_ids, "triton", c), q, d
        )
        # Two directions (symmetric), each over its own 111 or 37 columns.
        assert launched[:launches] == [(37, min(chunk_size, 111))] * launches
        assert len(launched) == launches + -(-37 // chunk_size)
        assert_matches_reference(results, expected, *FP32_TOLERANCE)


@needs_triton
def test_triton_fp16_gradients_do_not_underflow(seed):
    """fp16 with a tiny uniform upstream weight, as G/B is at large B: every negative's
    weighted term row_grad·p_ij (~2e-8) is below half fp16's smallest subnormal, so a kernel
    that casts row_grad·(p − onehot) to fp16 before the tile product drops all negatives,
    while dq itself (up to ~1e-3) and the fp32 ∂/∂scale are well within range."""
    batch, num_docs, dim = 8, 128, 16
    q, d = make_embeddings(batch, num_docs, dim, dtype=torch.float16)
    # |q·d| <= 0.002 at scale 500: logits within ±1, so p_ij <= e²/num_docs ≈ 0.06 and
    # row_grad·p_ij <= 1e-6·0.06 < 2.98e-8, which fp16 rounds to 0. Documents of norm 4
    # keep dq = scale·row_grad·Σ_j (p_ij − onehot)·d_j in fp16's normal range.
    q = (q.double() * 0.0005).to(torch.float16)
    d = (d.double() * 4).to(torch.float16)
    scale = 500.0
    upstream = batch * 1e-6

    def grads(fn, q, d, s):
        q, d = q.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
        s = torch.tensor(s, dtype=q.dtype if q.dtype == torch.float64 else torch.float32)
        s = s.to(q.device).requires_grad_()
        loss = fn(q, d, s)
        dq, dscale = torch.autograd.grad(loss, (q, s), torch.tensor(upstream, device=q.device))
        return dq, dscale

    dq, dscale = grads(lambda q, d, s: fused_info_nce(q, d, s), q, d, scale)
    ref_dq, ref_dscale = grads(
        lambda q, d, s: naive_info_nce(q, d, s), q.cpu().double(), d.cpu().double(), scale
    )
    assert ref_dq.abs().max() > 10 * torch.finfo(torch.float16).smallest_normal
    _, atol, rtol = DTYPE_TOLERANCES[1]
    assert_close(dq, ref_dq, atol, rtol)
    assert_close(dscale, ref_dscale, atol, rtol)


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
    assert_matches_reference(results, reference(q, d, True, None), *FP32_TOLERANCE)


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
@pytest.mark.parametrize("return_stats", [False, True], ids=["loss", "with-stats"])
def test_triton_saves_only_linear_state(seed, return_stats):
    """No saved tensor is B×N: D=8 keeps q and d smaller than the 37×111 logits; the
    statistics are outputs, not saved state. The 1-D ones are the doc ids; the symmetric
    loss's two row logsumexps are one [2, B] tensor."""
    batch, num_docs = 37, 111
    q, d = make_embeddings(batch, num_docs, 8)
    q.requires_grad_()
    doc_ids = doc_ids_with_duplicates(37, 111)
    output = fused_info_nce(q, d, 20.0, True, doc_ids, return_stats=return_stats)
    loss = output[0] if return_stats else output
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) <= num_docs * 8 < batch * num_docs
    assert [t.numel() for t in saved if t.dim() == 1] == [num_docs]
    assert [tuple(t.shape) for t in saved if t.dim() == 2 and t.shape[1] == batch] == [(2, batch)]


@needs_triton
def test_triton_host_functions_compose(seed):
    """infonce_backward with an explicit upstream gradient reproduces autograd's result."""
    q, d = make_embeddings(16, 40, 24)
    forward = infonce_forward(q, d, 20.0, symmetric=True)
    dq, dd, dscale = infonce_backward(
        q, d, 20.0, torch.tensor(UPSTREAM, device=DEVICE), forward.lse, terms=loss_terms(True)
    )
    _, ref_dq, ref_dd, ref_dt = reference(q, d, True, None)
    assert_close(forward.loss, reference(q, d, True, None)[0], *FP32_TOLERANCE)
    assert_close(dq, ref_dq, *FP32_TOLERANCE)
    assert_close(dd, ref_dd, *FP32_TOLERANCE)
    # dL/ds = dL/dτ · dτ/ds with τ = 1/s.
    assert_close(dscale, ref_dt * -(TEMPERATURE**2), *FP32_TOLERANCE)


@needs_triton
def test_triton_bf16_upcast_only_under_the_interpreter():
    flags = launch.kernel_flags(torch.bfloat16)
    assert flags["UPCAST_DOT"] is kernel.INTERPRETED
    assert launch.kernel_flags(torch.float16)["UPCAST_DOT"] is False


def test_kernel_flags_follow_the_fp32_precision_api():
    """TF32 set through torch's fp32_precision API: reading the legacy allow_tf32 then
    raises, so the flags must come from the new setting (which also mirrors the legacy)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert launch.kernel_flags(torch.float32)["INPUT_PRECISION"] == "tf32"
        matmul.fp32_precision = "ieee"
        assert launch.kernel_flags(torch.float32)["INPUT_PRECISION"] == "ieee"
    finally:
        matmul.fp32_precision = previous
    assert launch.kernel_flags(torch.float16)["INPUT_PRECISION"] == "tf32"


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_kernel_flags_fall_back_to_allow_tf32(monkeypatch, allow_tf32):
    """A torch without the fp32_precision API: the legacy flag decides."""
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=allow_tf32))
    expected = "tf32" if allow_tf32 else "ieee"
    assert launch.kernel_flags(torch.float32)["INPUT_PRECISION"] == expected


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


@needs_triton
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backward": "gem"}, "backward must be one of"),
        ({"chunk_size": 0}, "chunk_size must be positive"),
    ],
)
def test_triton_backward_options_are_checked_before_the_forward(seed, options, message):
    q, d = make_embeddings(8, 16, 16)
    with pytest.raises(ValueError, match=message):
        fused_info_nce(q, d, 20.0, **options)


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
    assert_matches_reference(results, reference(q, d, True, doc_ids), *FP32_TOLERANCE)


# At GPU sizes: chunks of 1,024 columns (four at N = 4096, the last one partial at 3001
# and 3000), and the recomputation with owned and atomic column gradients.
GPU_STRATEGIES = (
    {"backward": "gemm", "chunk_size": 1024},
    {"backward": "recompute", "deterministic": True},
    {"backward": "recompute", "deterministic": False},
)


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
    for strategy in GPU_STRATEGIES:
        results = loss_and_grads(
            lambda q, d, t, strategy=strategy: fused_info_nce(
                q, d, 1 / t, True, doc_ids, **strategy
            ),
            q,
            d,
        )
        assert_matches_reference(results, reference(q, d, True, doc_ids), atol, rtol)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backward", ["gemm", "recompute"])
def test_gpu_deterministic_is_bitwise_reproducible(seed, backward):
    q, d = make_embeddings(2048, 4096, 384, dtype=torch.bfloat16)
    runs = [
        loss_and_grads(lambda q, d, t: fused_info_nce(q, d, 1 / t, True, backward=backward), q, d)
        for _ in range(2)
    ]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_kernels_run_on_the_inputs_device(seed):
    """Inputs on cuda:1 while cuda:0 is current: the launches must follow the tensors."""
    q, d = make_embeddings(256, 512, 64, device="cuda:1")
    assert torch.cuda.current_device() == 0
    doc_ids = doc_ids_with_duplicates(256, 512, "cuda:1")
    results = loss_and_grads(lambda q, d, t: fused_info_nce(q, d, 1 / t, True, doc_ids), q, d)
    assert_matches_reference(results, reference(q, d, True, doc_ids), 1e-5, 1e-5)


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
    assert_matches_reference(results, reference(q, d, symmetric, doc_ids), *FP32_TOLERANCE)


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
    assert_matches_reference(results, reference(q, d, True, doc_ids), *FP32_TOLERANCE)


@pytest.mark.parametrize("return_stats", [False, True], ids=["loss", "with-stats"])
def test_torch_saves_only_linear_state(seed, return_stats):
    q, d = make_embeddings(37, 111, 8, device="cpu")
    q.requires_grad_()
    output = chunked_info_nce(q, d, 20.0, True, chunk_size=16, return_stats=return_stats)
    loss = output[0] if return_stats else output
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
    assert_close(module.temperature, torch.tensor(0.05, dtype=torch.float64), *FP32_TOLERANCE)
    doc_ids = doc_ids_with_duplicates(16, 40, "cpu")
    loss = module(q, d, doc_ids)
    expected = info_nce(q, d, 0.05, doc_ids=doc_ids, impl="naive").double()
    assert_close(loss, expected, *FP32_TOLERANCE)
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


# ------------------------------------------------------------------------------------------
# Ranking statistics (return_stats)
# ------------------------------------------------------------------------------------------

STATS_IMPLS = [
    pytest.param("naive", None, id="naive"),
    pytest.param("torch", 3, id="torch-chunk3"),
    pytest.param("torch", 16, id="torch-chunk16"),
    pytest.param("torch", 4096, id="torch-chunk4096"),
    pytest.param("triton", None, id="triton", marks=needs_triton),
]
DOC_ID_CASES = ["no-ids", "dup-ids", "one-id"]


def doc_ids_for(case, batch, num_docs, device=DEVICE):
    """None; distinct ids with duplicates; or a single id, which masks every other column."""
    if case == "no-ids":
        return None
    if case == "dup-ids":
        return doc_ids_with_duplicates(batch, num_docs, device)
    return torch.zeros(num_docs, dtype=torch.int64, device=device)


def make_ranking_embeddings(batch, num_docs, dim, doc_ids=None, device=DEVICE):
    """Unit rows on which ranking mistakes show.

    Positive i is pulled towards q_i by a weight rising from 0 to 0.9 over the batch, so it
    is the row's largest similarity in some rows and not in others: a path that forgets to
    exclude it from best_other then reports it there. Documents sharing an id are near
    copies of the first one, as duplicate texts are, so a false negative that escaped its
    mask would often be its row's best other.
    """
    q, d = make_embeddings(batch, num_docs, dim, dtype=torch.float64, device="cpu")
    pull = torch.linspace(0, 0.9, batch, dtype=torch.float64)[:, None]
    d[:batch] = F.normalize(pull * q + (1 - pull) * d[:batch], dim=1)
    if doc_ids is not None:
        ids = doc_ids.cpu()
        for column in range(num_docs):
            first = int((ids == ids[column]).nonzero()[0, 0])
            if first != column:
                noise = 0.05 * torch.randn(dim, dtype=torch.float64)
                d[column] = F.normalize(d[first] + noise, dim=0)
    return q.to(device, torch.float32), d.to(device, torch.float32)


def oracle_stats(q, d, doc_ids):
    """The statistics from the full B×N similarity matrix in float64, written without any of
    the library's helpers: masked row maxima, their columns, and mask counts."""
    similarities = q.detach().cpu().double() @ d.detach().cpu().double().T
    batch, num_docs = similarities.shape
    diagonal = torch.eye(batch, num_docs, dtype=torch.bool)
    if doc_ids is None:
        false_negative = torch.zeros(batch, num_docs, dtype=torch.bool)
    else:
        ids = doc_ids.cpu()
        false_negative = (ids[:batch, None] == ids[None, :]) & ~diagonal
    others = similarities.masked_fill(false_negative | diagonal, -math.inf)
    best_other, best_other_index = others.max(dim=1)
    has_other = (~(false_negative | diagonal)).any(dim=1)
    return {
        "positive": similarities.diagonal(),
        "best_other": best_other,
        "best_other_index": torch.where(has_other, best_other_index, -1),
        "false_negatives": false_negative.sum(dim=1),
        "others": others,
    }


def assert_stats_match(stats, oracle, atol, rtol):
    others = oracle["others"]
    assert stats.num_docs == others.shape[1]
    assert stats.positive.dtype == stats.best_other.dtype == torch.float32
    assert stats.best_other_index.dtype == stats.false_negatives.dtype == torch.int64
    assert torch.equal(stats.false_negatives.cpu(), oracle["false_negatives"])
    assert_close(stats.positive, oracle["positive"], atol, rtol)

    index = stats.best_other_index.cpu()
    has_other = oracle["best_other_index"] >= 0
    assert torch.equal(index >= 0, has_other), "rows without another column must report -1"
    assert torch.isneginf(stats.best_other.cpu()[~has_other]).all()
    if not has_other.any():
        return
    rows = has_other.nonzero()[:, 0]
    best = oracle["best_other"][rows]
    assert_close(stats.best_other.cpu()[rows], best, atol, rtol)
    # The reported column must itself hold the best value: a neighbouring column (offset
    # off by one), the positive, or a masked column (−inf in `others`) would not.
    assert_close(others[rows, index[rows]], best, atol, rtol)
    # And it is the oracle's column unless the runner-up is within rounding of the best.
    runner_up = others[rows].topk(min(2, others.shape[1]), dim=1).values[:, -1]
    clear = (best - runner_up) > 1e-4
    assert torch.equal(index[rows][clear], oracle["best_other_index"][rows][clear])


def stats_of(impl, chunk_size, q, d, symmetric, doc_ids, temperature=TEMPERATURE):
    extra = {"chunk_size": chunk_size} if chunk_size is not None else {}
    loss, stats = info_nce(
        q, d, temperature, symmetric, doc_ids, impl=impl, return_stats=True, **extra
    )
    assert isinstance(stats, InfoNCEStats)
    return loss, stats


@pytest.mark.parametrize("ids", DOC_ID_CASES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize(("impl", "chunk_size"), STATS_IMPLS)
def test_stats_match_float64_oracle(seed, impl, chunk_size, shape, symmetric, ids):
    """Every path's statistics against the masked float64 matrix; one-id masks every other
    column (best −inf, index −1), B1-N1 has no other column, B16-N16 no hard negatives."""
    device = "cpu" if impl == "torch" else DEVICE
    doc_ids = doc_ids_for(ids, shape[0], shape[1], device)
    q, d = make_ranking_embeddings(*shape, doc_ids, device)
    _, stats = stats_of(impl, chunk_size, q, d, symmetric, doc_ids)
    assert_stats_match(stats, oracle_stats(q, d, doc_ids), *FP32_TOLERANCE)


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPE_TOLERANCES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_stats_dtypes_match_float64_oracle(seed, impl, dtype, atol, rtol):
    """fp16/bf16 inputs: the oracle sees the same rounded inputs, the paths accumulate in
    fp32, so the same tolerances as the loss hold."""
    device = "cpu" if impl == "torch" else DEVICE
    doc_ids = doc_ids_with_duplicates(37, 111, device)
    q, d = make_ranking_embeddings(37, 111, 48, doc_ids, device)
    q, d = q.to(dtype), d.to(dtype)
    _, stats = stats_of(impl, 16 if impl == "torch" else None, q, d, True, doc_ids)
    assert_stats_match(stats, oracle_stats(q, d, doc_ids), atol, rtol)


@needs_triton
def test_triton_stats_with_small_tiles(seed):
    """16-wide tiles: the running best crosses many column tiles and D slices."""
    doc_ids = doc_ids_with_duplicates(37, 111)
    q, d = make_ranking_embeddings(37, 111, 48, doc_ids)
    blocks = BlockSizes(m=16, n=16, d=16, d_out=16)
    scale = torch.tensor(1 / TEMPERATURE, device=DEVICE)
    _, *stats_tensors = WithBlockSizes.apply(q, d, scale, doc_ids, False, True, blocks, True)
    stats = InfoNCEStats(*stats_tensors, num_docs=111)
    assert_stats_match(stats, oracle_stats(q, d, doc_ids), *FP32_TOLERANCE)


@pytest.mark.parametrize(("impl", "chunk_size"), STATS_IMPLS)
def test_stats_are_those_of_the_query_direction(seed, impl, chunk_size):
    """symmetric=True adds the document→query loss but must not touch the statistics."""
    device = "cpu" if impl == "torch" else DEVICE
    doc_ids = doc_ids_with_duplicates(37, 111, device)
    q, d = make_ranking_embeddings(37, 111, 48, doc_ids, device)
    _, asymmetric = stats_of(impl, chunk_size, q, d, False, doc_ids)
    _, symmetric = stats_of(impl, chunk_size, q, d, True, doc_ids)
    for field in ("positive", "best_other", "best_other_index", "false_negatives"):
        assert torch.equal(getattr(asymmetric, field), getattr(symmetric, field)), field


@pytest.mark.parametrize(("impl", "chunk_size"), [p for p in STATS_IMPLS if p.id != "naive"])
def test_stats_ties_keep_the_first_column_and_count_as_wrong(impl, chunk_size):
    """Exactly representable similarities, so every path ties exactly where the test says.

    q_i is the unit vector e_i and d[j, i] = q_i·d_j. Row 0: its positive ties with columns
    5 and 40 (0.5); row 1: columns 2 and 7 tie below the positive; row 2: columns 33 and 69
    beat the positive. With 32-wide Triton tiles and 3-wide chunks, some ties fall in one
    tile and some across tiles.
    """
    device = "cpu" if impl == "torch" else DEVICE
    q = torch.eye(3, 16)
    d = torch.zeros(70, 16)
    d[[0, 5, 40], 0] = 0.5
    d[1, 1], d[[2, 7], 1] = 0.75, 0.25
    d[2, 2], d[[33, 69], 2] = 0.25, 0.5
    q, d = q.to(device), d.to(device)
    _, stats = stats_of(impl, chunk_size, q, d, False, None, temperature=0.25)
    assert stats.positive.tolist() == [0.5, 0.75, 0.25]
    assert stats.best_other.tolist() == [0.5, 0.25, 0.5]
    assert stats.best_other_index.tolist() == [5, 2, 33]
    summary = stats.summary()
    assert summary["accuracy"] == pytest.approx(1 / 3)
    assert summary["margin"] == pytest.approx((0.0 + 0.5 - 0.25) / 3)
    assert summary["hardest_negative_mined_fraction"] == pytest.approx(2 / 3)


def hand_stats(positive, best_other, index, false_negatives, num_docs):
    return InfoNCEStats(
        positive=torch.tensor(positive),
        best_other=torch.tensor(best_other),
        best_other_index=torch.tensor(index),
        false_negatives=torch.tensor(false_negatives),
        num_docs=num_docs,
    )


def test_stats_summary_by_hand():
    """Row 0 wins, row 1 ties its best other (wrong), row 2 loses, row 3 has no other
    column (right, and left out of margin and the mined fraction)."""
    inf = math.inf
    stats = hand_stats([0.9, 0.5, 0.2, 0.7], [0.3, 0.5, 0.6, -inf], [5, 2, 1, -1], [0, 1, 2, 3], 6)
    summary = stats.summary()
    assert summary == pytest.approx(
        {
            "accuracy": 2 / 4,
            "margin": (0.6 + 0.0 - 0.4) / 3,
            "false_negative_fraction": 6 / (4 * 5),
            "hardest_negative_mined_fraction": 1 / 3,
        }
    )
    assert all(type(value) is float for value in summary.values())


def test_stats_summary_omits_undefined_keys():
    """N == B: no mined negatives to speak of; no row with another column: no margin;
    N == 1: no off-diagonal pairs."""
    inf = math.inf
    no_hard_negatives = hand_stats([0.9, 0.1], [0.3, 0.4], [1, 0], [0, 0], 2)
    assert set(no_hard_negatives.summary()) == {"accuracy", "margin", "false_negative_fraction"}
    single = hand_stats([0.9], [-inf], [-1], [0], 1).summary()
    assert single == {"accuracy": 1.0, "false_negative_fraction": 0.0}
    all_masked = hand_stats([0.9, 0.1], [-inf, -inf], [-1, -1], [3, 3], 4).summary()
    assert all_masked == {"accuracy": 1.0, "false_negative_fraction": 1.0}


@pytest.mark.parametrize("with_doc_ids", [False, True], ids=["no-ids", "dup-ids"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize(("impl", "chunk_size"), STATS_IMPLS)
def test_return_stats_leaves_loss_and_gradients_bitwise_identical(
    seed, impl, chunk_size, symmetric, with_doc_ids
):
    """The statistics ride along the forward pass: same loss bits, same gradient bits, and
    the statistics themselves carry no gradient."""
    device = "cpu" if impl == "torch" else DEVICE
    doc_ids = doc_ids_with_duplicates(37, 111, device) if with_doc_ids else None
    q, d = make_ranking_embeddings(37, 111, 48, doc_ids, device)
    extra = {"chunk_size": chunk_size} if chunk_size is not None else {}

    def loss_only(q, d, t):
        return info_nce(q, d, t, symmetric, doc_ids, impl=impl, **extra)

    def loss_with_stats(q, d, t):
        loss, stats = info_nce(q, d, t, symmetric, doc_ids, impl=impl, return_stats=True, **extra)
        assert q.requires_grad and not stats.positive.requires_grad
        assert not stats.best_other.requires_grad
        return loss

    plain, with_stats = loss_and_grads(loss_only, q, d), loss_and_grads(loss_with_stats, q, d)
    for name, a, b in zip(("loss", "dq", "dd", "dtemperature"), plain, with_stats, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [DTYPE_TOLERANCES[0], DTYPE_TOLERANCES[2]],
    ids=["fp32", "bf16"],
)
def test_gpu_triton_stats(seed, dtype, atol, rtol):
    """The compiled kernel: statistics against the oracle, and the loss and gradient bits
    unchanged by WITH_STATS (the interpreter cannot show what the code generator does)."""
    doc_ids = doc_ids_with_duplicates(1000, 3001)
    q, d = make_ranking_embeddings(1000, 3001, 384, doc_ids)
    q, d = q.to(dtype), d.to(dtype)
    _, stats = stats_of("triton", None, q, d, True, doc_ids)
    assert_stats_match(stats, oracle_stats(q, d, doc_ids), atol, rtol)

    def run(return_stats):
        def fn(q, d, t):
            output = fused_info_nce(q, d, 1 / t, True, doc_ids, return_stats=return_stats)
            return output[0] if return_stats else output

        return loss_and_grads(fn, q, d)

    for name, a, b in zip(("loss", "dq", "dd", "dt"), run(False), run(True), strict=True):
        assert torch.equal(a, b), name


def largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation made while fn runs, from the profiler's
    allocator events (an op's event also counts its children's: this can only overstate)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_torch_stats_allocate_nothing_batch_by_docs(seed):
    """B = N = 2048 with 256-wide chunks: a B×N quarter of fp32 (B·N bytes, the size of a
    B×N bool mask) is never allocated, while the naive path's logits are seen."""
    batch = num_docs = 2048
    q, d = make_embeddings(batch, num_docs, 16, device="cpu")
    doc_ids = torch.randint(0, 1500, (num_docs,))
    limit = batch * num_docs * 4 // 4
    naive = largest_allocation(lambda: naive_info_nce(q, d, 20.0, True, doc_ids, True))
    assert naive >= limit, "the probe must see the reference's B×N logits"
    chunked = largest_allocation(
        lambda: chunked_info_nce(q, d, 20.0, True, doc_ids, chunk_size=256, return_stats=True)
    )
    assert chunked < limit


def test_infonce_loss_module_returns_stats(seed):
    q, d = make_embeddings(16, 40, 24, device="cpu")
    doc_ids = doc_ids_with_duplicates(16, 40, "cpu")
    module = InfoNCELoss(temperature=0.05, symmetric=True, impl="torch")
    loss, stats = module(q, d, doc_ids, return_stats=True)
    assert torch.equal(loss, module(q, d, doc_ids))
    assert_stats_match(stats, oracle_stats(q, d, doc_ids), *FP32_TOLERANCE)
