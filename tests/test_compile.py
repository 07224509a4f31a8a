"""torch.compile traces InfoNCE, forward and backward, as one graph.

``info_nce`` runs as the custom op ``biencoder::info_nce`` with a registered fake and a
registered autograd formula whose backward is the op ``biencoder::info_nce_backward``, so
Dynamo never meets the kernels' Python and AOTAutograd can trace the backward. The tests
mostly use the ``aot_eager`` backend (Dynamo and AOTAutograd, the parts that break graphs
and trace the autograd formula, without Inductor's C++ build); one runs Inductor on the
loss, and the ``slow`` one on the encoder as well.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from biencoder.kernels.infonce_op import info_nce_backward_op, info_nce_op
from biencoder.kernels.infonce_options import DIRECTIONS, SYMMETRIC, LossTerms, loss_terms
from biencoder.losses.infonce import info_nce
from biencoder.losses.infonce_naive import naive_info_nce
from biencoder.model.bert import Encoder
from biencoder.model.config import EncoderConfig
from biencoder.model.pooling import MeanPooling

TEMPERATURE = 0.05
BATCH, NUM_DOCS, DIM = 6, 11, 8
DOC_IDS = torch.tensor([0, 1, 2, 0, 4, 5, 6, 7, 8, 8, 1])
# Compiled against eager: the same op runs in both, so only the few ops around it (1/τ,
# the normalisation) may round differently. Eager against the float64 oracle: the fp32
# sums of the chunked path, as in test_infonce.py.
COMPILED_RTOL = 1e-5
ORACLE_RTOL = 32 * torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """An aot_eager-like backend that keeps the forward and backward graphs it is given."""

    def __init__(self):
        self.graphs = []
        self.backend = aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep)

    def _keep(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return make_boxed_func(graph_module.forward)

    def ops(self, graph_index: int | None = None) -> set[str]:
        graphs = self.graphs if graph_index is None else [self.graphs[graph_index]]
        return {
            str(node.target)
            for graph in graphs
            for node in graph.graph.nodes
            if node.op == "call_function"
        }


def make_inputs(dtype=torch.float32):
    """Unit-norm q [6, 8], d [11, 8] and a learnable temperature, as fresh leaves."""
    generator = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=1)
    d = F.normalize(torch.randn(NUM_DOCS, DIM, generator=generator, dtype=torch.float64), dim=1)
    temperature = torch.tensor(TEMPERATURE, dtype=dtype)
    return [x.to(dtype).requires_grad_() for x in (q, d, temperature)]


def assert_relative_close(actual, expected, rtol, scale=None):
    """|a − e| <= rtol·(scale or max|e|) + rtol·|e|, one tolerance for losses and
    gradients of any magnitude."""
    if scale is None:
        scale = max(expected.detach().abs().max().item(), 1e-6)
    torch.testing.assert_close(
        actual.detach().double(), expected.detach().double(), atol=rtol * scale, rtol=rtol
    )


def loss_with_backward_inside(impl, symmetric, return_stats, options=None):
    """A train-step-like function: the loss, its backward, and the statistics it reports."""
    options = options or {}

    def step(q, d, temperature):
        output = info_nce(
            q, d, temperature, symmetric, DOC_IDS, impl=impl, return_stats=return_stats, **options
        )
        loss, stats = output if return_stats else (output, None)
        loss.backward()
        if stats is None:
            return (loss.detach(),)
        return (loss.detach(), stats.positive, stats.best_other, stats.best_other_index)

    return step


def run_step_leaves(inputs):
    """Fresh leaf copies of the inputs, without gradients yet."""
    return [x.detach().clone().requires_grad_() for x in inputs]


def run_step(step, inputs):
    """step(*inputs) on fresh copies of the leaves: (outputs, (dq, dd, dtemperature))."""
    leaves = run_step_leaves(inputs)
    outputs = step(*leaves)
    return outputs, tuple(leaf.grad for leaf in leaves)


def every_option():
    """Every loss option at once (the default owners are made inside the traced call)."""
    generator = torch.Generator().manual_seed(1)
    return {
        "directions": DIRECTIONS,
        "hardness_mode": "in_batch_negatives",
        "hardness_strength": 3.0,
        "guide_q": F.normalize(torch.randn(BATCH, 4, generator=generator), dim=1),
        "guide_d": F.normalize(torch.randn(NUM_DOCS, 4, generator=generator), dim=1),
        "guide_margin": 0.1,
    }


# The guide can drop every query_to_query candidate of a row: that direction's logsumexp is
# log(0) = −inf, which the joint partition absorbs; only the interpreter's numpy warns.
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize(
    ("impl", "symmetric", "return_stats", "with_options"),
    [
        ("auto", False, False, False),
        ("auto", True, False, False),
        ("auto", False, True, False),
        ("auto", True, True, False),
        ("triton", True, True, False),
        ("auto", False, True, True),
        ("triton", False, True, True),
    ],
    ids=[
        "auto-asym",
        "auto-sym",
        "auto-asym-stats",
        "auto-sym-stats",
        "triton-sym-stats",
        "auto-options-stats",
        "triton-options-stats",
    ],
)
def test_forward_and_backward_compile_without_graph_breaks(
    impl, symmetric, return_stats, with_options
):
    """The backward inside the function (Dynamo traces it with trace_autograd_ops): explain
    sees one graph, fullgraph compiles, both ops are in the traced graph, and the compiled
    loss, statistics and every gradient equal eager's and the float64 oracle's."""
    options = every_option() if with_options else {}
    step = loss_with_backward_inside(impl, symmetric, return_stats, options)
    inputs = make_inputs()
    recorder = GraphRecorder()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(step)(*run_step_leaves(inputs))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        compiled_outputs, compiled_grads = run_step(
            torch.compile(step, fullgraph=True, backend=recorder.backend), inputs
        )
    assert {"biencoder.info_nce.default", "biencoder.info_nce_backward.default"} <= (recorder.ops())
    eager_outputs, eager_grads = run_step(step, inputs)
    stats_names = ("positive", "best_other", "best_other_index") if return_stats else ()
    for name, compiled, eager in zip(
        ("loss", *stats_names, "dq", "dd", "dtemperature"),
        (*compiled_outputs, *compiled_grads),
        (*eager_outputs, *eager_grads),
        strict=True,
    ):
        assert compiled.dtype == eager.dtype, name
        assert_relative_close(compiled, eager, COMPILED_RTOL)

    q64, d64, t64 = [x.detach().double().requires_grad_() for x in inputs]
    options64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    expected = naive_info_nce(q64, d64, 1 / t64, symmetric, DOC_IDS, **options64)
    expected_grads = torch.autograd.grad(expected, (q64, d64, t64))
    assert_relative_close(compiled_outputs[0], expected, ORACLE_RTOL)
    for compiled, wanted in zip(compiled_grads, expected_grads, strict=True):
        assert_relative_close(compiled, wanted, ORACLE_RTOL)


def test_backward_outside_the_compiled_function_is_traced():
    """The usual training loop: compile the loss, call .backward() on its result. The
    backward graph AOTAutograd builds holds the backward op (no eager fallback), and the
    gradients equal eager's."""
    inputs = make_inputs()
    recorder = GraphRecorder()

    def loss_fn(q, d, temperature):
        return info_nce(q, d, temperature, True, DOC_IDS)

    compiled_leaves, eager_leaves = run_step_leaves(inputs), run_step_leaves(inputs)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=recorder.backend)
    compiled_loss = compiled(*compiled_leaves)
    assert "biencoder.info_nce.default" in recorder.ops(0)
    compiled_loss.backward()
    assert len(recorder.graphs) == 2
    assert "biencoder.info_nce_backward.default" in recorder.ops(1)
    eager_loss = loss_fn(*eager_leaves)
    eager_loss.backward()
    assert_relative_close(compiled_loss, eager_loss, COMPILED_RTOL)
    for compiled_leaf, eager_leaf in zip(compiled_leaves, eager_leaves, strict=True):
        assert_relative_close(compiled_leaf.grad, eager_leaf.grad, COMPILED_RTOL)


def test_inductor_compiles_loss_and_backward():
    """Inductor around the op (a fallback kernel to it): fullgraph, gradients as eager's."""
    inputs = make_inputs()

    def loss_fn(q, d, temperature):
        q, d = F.normalize(q, dim=1), F.normalize(d, dim=1)
        loss, stats = info_nce(q, d, temperature, True, DOC_IDS, return_stats=True)
        return loss, stats.best_other_index

    results = []
    for fn in (torch.compile(loss_fn, fullgraph=True, backend="inductor"), loss_fn):
        leaves = run_step_leaves(inputs)
        loss, best_other_index = fn(*leaves)
        loss.backward()
        results.append((loss, best_other_index, *(leaf.grad for leaf in leaves)))
    compiled, eager = results
    assert torch.equal(compiled[1], eager[1])
    for name, a, b in zip(("loss", "", "dq", "dd", "dtemperature"), compiled, eager, strict=True):
        if name:
            assert_relative_close(a, b, COMPILED_RTOL)


GUIDE_Q = F.normalize(torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(1)), dim=1)
GUIDE_D = F.normalize(torch.randn(NUM_DOCS, 4, generator=torch.Generator().manual_seed(2)), dim=1)
# (terms, doc_ids, doc_owners, guides): the plain loss, the symmetric one with ids, and
# every option at once (all four directions jointly, hardness, guide, owners).
OP_CASES = [
    (LossTerms(), None, None, (None, None)),
    (SYMMETRIC, DOC_IDS, None, (None, None)),
    (
        loss_terms(
            directions=DIRECTIONS,
            hardness_mode="in_batch_negatives",
            hardness_strength=3.0,
            guide_margin=0.1,
        ),
        DOC_IDS,
        torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, -1]),
        (GUIDE_Q, GUIDE_D),
    ),
]


@pytest.mark.parametrize("fused", [False, True], ids=["chunked", "triton"])
@pytest.mark.parametrize(
    ("terms", "doc_ids", "doc_owners", "guides", "return_stats"),
    [(*OP_CASES[0], False), (*OP_CASES[1], True), (*OP_CASES[2], True)],
    ids=["asym-loss", "sym-stats-ids", "all-options-stats"],
)
def test_opcheck(fused, terms, doc_ids, doc_owners, guides, return_stats):
    """torch.library.opcheck: schema, fake tensor metadata against the real outputs,
    autograd registration, and AOT tracing with dynamic shapes of forward and backward."""
    q, d, temperature = make_inputs()
    scale = (1 / temperature).detach().requires_grad_()
    tensors = (doc_ids, doc_owners, *guides)
    torch.library.opcheck(
        info_nce_op,
        (q, d, scale, *tensors, *terms.op_args(), return_stats, fused, True, "gemm", 4),
    )
    lse = torch.randn(terms.num_lse, BATCH)
    torch.library.opcheck(
        info_nce_backward_op,
        (
            torch.tensor(1.5),
            q.detach(),
            d.detach(),
            scale.detach(),
            *tensors,
            lse,
            *terms.op_args(),
            fused,
            True,
            "gemm",
            4,
        ),
    )


@pytest.mark.parametrize("case", [1, 2], ids=["sym-ids", "all-options"])
def test_op_gradcheck_float64(case):
    """The op's registered autograd formula against finite differences, learnable scale.
    Without the hardness term: it is a stop-gradient, which finite differences see."""
    q, d, temperature = make_inputs(torch.float64)
    scale = (1 / temperature).detach().requires_grad_()
    terms, doc_ids, doc_owners, guides = OP_CASES[case]
    terms = dataclasses.replace(terms, hardness_mode=None, hardness_strength=0.0)
    guides = tuple(g.double() if g is not None else None for g in guides)

    def loss(q, d, scale):
        options = (False, False, True, "gemm", 4)  # return_stats … chunk_size
        return info_nce_op(q, d, scale, doc_ids, doc_owners, *guides, *terms.op_args(), *options)[0]

    assert torch.autograd.gradcheck(loss, (q, d, scale))


def encoder_step(encoder, pooling, doc_ids):
    """Embed queries and documents with the encoder, mean-pool, normalise, InfoNCE."""

    def step(query_ids, query_mask, doc_token_ids, doc_mask, temperature):
        q = F.normalize(pooling(encoder(query_ids, query_mask), query_mask), dim=-1)
        d = F.normalize(pooling(encoder(doc_token_ids, doc_mask), doc_mask), dim=-1)
        return info_nce(q, d, temperature, symmetric=True, doc_ids=doc_ids)

    return step


@pytest.mark.parametrize(
    ("backend", "device"),
    [
        ("aot_eager", "cpu"),
        pytest.param("inductor", "cpu", marks=pytest.mark.slow),
        # On CUDA the op runs the Triton kernels, inside the compiled graph.
        pytest.param(
            "aot_eager",
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ],
)
def test_encoder_and_loss_compile_fullgraph(backend, device):
    """A tiny BERT, mean pooling and InfoNCE compiled as one graph: loss and the gradients
    of every encoder parameter and the temperature equal eager's.

    The encoder's gradients are compared on the scale of the largest of them: some are
    rounding noise around an exact zero (the key bias cannot change a softmax), which no
    bound relative to the tensor itself fits.
    """
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig.tiny())
    encoder.eval().to(device)
    pooling = MeanPooling()
    length = 8
    query_ids = torch.randint(1000, 2000, (BATCH, length), device=device)
    doc_token_ids = torch.randint(1000, 2000, (NUM_DOCS, length), device=device)
    query_mask = torch.ones(BATCH, length, dtype=torch.long, device=device)
    doc_mask = torch.ones(NUM_DOCS, length, dtype=torch.long, device=device)
    query_mask[0, 5:] = 0
    doc_mask[3, 2:] = 0
    temperature = torch.tensor(TEMPERATURE, requires_grad=True, device=device)
    step = encoder_step(encoder, pooling, DOC_IDS.to(device))
    parameters = [temperature, *encoder.parameters()]

    def loss_and_grads(fn):
        loss = fn(query_ids, query_mask, doc_token_ids, doc_mask, temperature)
        return loss, torch.autograd.grad(loss, parameters)

    compiled_loss, compiled_grads = loss_and_grads(
        torch.compile(step, fullgraph=True, backend=backend)
    )
    eager_loss, eager_grads = loss_and_grads(step)
    assert_relative_close(compiled_loss, eager_loss, COMPILED_RTOL)
    assert_relative_close(compiled_grads[0], eager_grads[0], COMPILED_RTOL)
    largest = max(grad.abs().max().item() for grad in eager_grads[1:])
    for compiled, eager in zip(compiled_grads[1:], eager_grads[1:], strict=True):
        assert_relative_close(compiled, eager, COMPILED_RTOL, scale=largest)
