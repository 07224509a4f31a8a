"""InfoNCE's directions, partitions, guide filter and hardness weighting.

Three layers of checks: the naive reference against sentence-transformers'
MultipleNegativesRankingLoss and GISTEmbedLoss (the independent oracles) and against a
row-by-row loop written from the module docstring (for doc ids in every direction and
explicit document owners, which sentence-transformers has no notion of); then the chunked
("torch") and fused ("triton", under the interpreter without CUDA) paths against the naive
reference, loss and every gradient; then the API: each option changes the loss, invalid
combinations raise, nothing B×N is kept.
"""

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.merged_forward import column_merging_disabled
from sentence_transformers.sentence_transformer.losses.gist_embed import GISTEmbedLoss
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss,
)
from test_infonce import GPU_STRATEGIES, STRATEGIES
from torch.profiler import ProfilerActivity, profile

from biencoder.kernels import infonce as kernel
from biencoder.kernels.infonce_host import infonce_backward, infonce_forward
from biencoder.kernels.infonce_launch import BlockSizes
from biencoder.kernels.infonce_op import fused_info_nce
from biencoder.kernels.infonce_options import DIRECTIONS, loss_terms
from biencoder.losses.infonce import InfoNCELoss, info_nce
from biencoder.losses.infonce_naive import naive_info_nce

# A row whose every candidate of one direction is excluded (the guide can drop all of
# query_to_query's) has that direction's logsumexp log(0) = −inf, which the joint partition
# absorbs; the interpreter's numpy warns about the log where a GPU does not.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or kernel.INTERPRETED),
    reason="biencoder.kernels.infonce was imported without CUDA and without TRITON_INTERPRET=1",
)

UPSTREAM = 3.7
TEMPERATURE = 0.05
ALL4 = DIRECTIONS
FP32_EPS = torch.finfo(torch.float32).eps
# (dtype, atol, rtol) in units of the dtype's epsilon, atol relative to the tensor's largest
# magnitude (see assert_close): the budget of test_infonce.py, whose measured worst cases
# were 3 eps (fp32) and 0.5 eps (fp16/bf16). A wrong mask or a missing term is off by far
# more.
DTYPE_TOLERANCES = [
    (torch.float32, 32 * FP32_EPS, 32 * FP32_EPS),
    (torch.float16, 2 * torch.finfo(torch.float16).eps, 4 * torch.finfo(torch.float16).eps),
    (torch.bfloat16, 2 * torch.finfo(torch.bfloat16).eps, 4 * torch.finfo(torch.bfloat16).eps),
]
FP32_TOLERANCE = DTYPE_TOLERANCES[0][1:]
# float64 against float64 (the oracles): only the summation order differs.
FP64_TOLERANCE = (1e-12, 1e-12)

# (B, N, D): no hard negatives (K=0, B not a multiple of the 32-row interpreter tiles), one
# and three per query, and N − B not a multiple of B (no default owners).
SHAPES = [(37, 37, 24), (33, 66, 8), (5, 20, 16), (6, 11, 8)]
SHAPE_IDS = ["B37-K0", "B33-K1", "B5-K3", "B6-N11"]

# Option sets, each a flag (or combination) with the naive reference as the judge. The
# guide embeddings and owners are filled in per shape by `options_for`.
OPTIONS = {
    "q2q-joint": {"directions": ("query_to_doc", "query_to_query")},
    "d2q-joint": {"directions": ("query_to_doc", "doc_to_query")},
    "d2q-per-direction": {
        "directions": ("query_to_doc", "doc_to_query"),
        "partition_mode": "per_direction",
    },
    "d2d-joint": {"directions": ("query_to_doc", "doc_to_doc")},
    "gte-all4": {"directions": ALL4},
    "hard-in-batch": {"hardness_mode": "in_batch_negatives", "hardness_strength": 5.0},
    "hard-own": {"hardness_mode": "hard_negatives", "hardness_strength": 5.0},
    "hard-all": {"hardness_mode": "all_negatives", "hardness_strength": 5.0},
    "guide-absolute": {"guide": True, "guide_margin": 0.05},
    "guide-relative-all4": {
        "guide": True,
        "guide_margin": 0.1,
        "guide_margin_strategy": "relative",
        "directions": ALL4,
    },
    "everything": {
        "guide": True,
        "guide_margin": 0.02,
        "directions": ALL4,
        "hardness_mode": "in_batch_negatives",
        "hardness_strength": 3.0,
        "owners": True,
    },
}


@pytest.fixture(autouse=True, scope="module")
def single_cpu_thread():
    """Tiny tiles: threads gain nothing on a loaded 2-core machine (see test_infonce.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit_rows(rows, dim, generator):
    return F.normalize(torch.randn(rows, dim, dtype=torch.float64, generator=generator), dim=1)


def make_problem(batch, num_docs, dim, seed=0, guide_dim=12):
    """Unit q, d and guide embeddings in float64 (CPU). The guide sees a noisy copy of the
    model's embeddings, so that it agrees with the model often enough to drop candidates."""
    generator = torch.Generator().manual_seed(seed)
    q, d = unit_rows(batch, dim, generator), unit_rows(num_docs, dim, generator)
    # Positives pulled towards their queries: realistic positive scores, a loss not ~log N.
    d[:batch] = F.normalize(q + 2 * d[:batch], dim=1)
    projection = torch.randn(dim, guide_dim, dtype=torch.float64, generator=generator)
    guide_q = F.normalize(q @ projection + 0.3 * unit_rows(batch, guide_dim, generator), dim=1)
    guide_d = F.normalize(d @ projection + 0.3 * unit_rows(num_docs, guide_dim, generator), dim=1)
    return q, d, guide_q, guide_d


def duplicate_ids(batch, num_docs):
    """Distinct ids except: two queries share a positive, a hard negative repeats another,
    and a hard negative is another query's positive (where the shape allows)."""
    ids = torch.arange(num_docs)
    if batch >= 2:
        ids[batch - 1] = ids[0]
    if num_docs - batch >= 2:
        ids[num_docs - 1] = ids[num_docs - 2]
    if num_docs - batch >= 3:
        ids[batch] = ids[batch // 2]
    return ids


def explicit_owners(batch, num_docs):
    """Hard negative j owned by query (j·7) mod B, every fifth by no query: not the default
    row-major layout, so that a path ignoring doc_owners fails."""
    owners = torch.arange(num_docs)
    for j in range(batch, num_docs):
        owners[j] = -1 if j % 5 == 0 else (j * 7) % batch
    return owners


def options_for(name, guide_q, guide_d, batch, num_docs):
    """The keyword arguments of `info_nce` for option set `name`."""
    options = dict(OPTIONS[name])
    if options.pop("guide", False):
        options["guide_q"], options["guide_d"] = guide_q, guide_d
    if options.pop("owners", False):
        options["doc_owners"] = explicit_owners(batch, num_docs)
    return options


def on(device, dtype, options):
    """The options with their tensors moved to `device` (guides also to `dtype`)."""
    moved = {}
    for key, value in options.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


def loss_and_grads(fn, q, d, temperature=TEMPERATURE):
    """fn(q, d, temperature tensor) and its gradients (q, d, temperature) for upstream 3.7."""
    q = q.detach().clone().requires_grad_()
    d = d.detach().clone().requires_grad_()
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    t = torch.tensor(temperature, dtype=dtype, device=q.device, requires_grad=True)
    loss = fn(q, d, t)
    upstream = torch.tensor(UPSTREAM, dtype=loss.dtype, device=q.device)
    return (loss.detach(), *torch.autograd.grad(loss, (q, d, t), upstream))


def reference(q, d, doc_ids, options):
    """The naive loss and gradients in float64 on CPU, from inputs as the path saw them."""
    options = on("cpu", torch.float64, options)
    ids = doc_ids.cpu() if doc_ids is not None else None
    return loss_and_grads(
        lambda q, d, t: naive_info_nce(q, d, 1 / t, doc_ids=ids, **options),
        q.detach().cpu().double(),
        d.detach().cpu().double(),
    )


def assert_close(actual, expected, atol, rtol, name=""):
    """|a − e| <= atol·max|e| + rtol·|e|: atol relative to the tensor's magnitude."""
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected.double(),
        atol=atol * scale,
        rtol=rtol,
        msg=lambda generated: f"{name}: {generated}",
    )


def assert_matches(results, expected, atol, rtol):
    for name, actual, wanted in zip(("loss", "dq", "dd", "dt"), results, expected, strict=True):
        assert_close(actual, wanted, atol, rtol, name)


# ------------------------------------------------------------------------------------------
# The naive reference against sentence-transformers
# ------------------------------------------------------------------------------------------


def st_columns(q, d, negatives_per_query):
    """Our layout (d = positives, then each query's K negatives row-major) as
    sentence-transformers' columns: [anchors, positives, negative_1, …, negative_K]."""
    batch = q.shape[0]
    negatives = d[batch:].reshape(batch, negatives_per_query, d.shape[1])
    return [q, d[:batch], *negatives.unbind(dim=1)]


DIRECTION_SETS = [
    (("query_to_doc",), "joint"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (ALL4, "joint"),
]


@pytest.mark.parametrize(
    "hardness_mode", [None, "in_batch_negatives", "hard_negatives", "all_negatives"]
)
@pytest.mark.parametrize(("directions", "partition_mode"), DIRECTION_SETS)
@pytest.mark.parametrize("negatives_per_query", [0, 1, 3])
def test_naive_matches_sentence_transformers_mnrl(
    negatives_per_query, directions, partition_mode, hardness_mode
):
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings on the same embeddings
    (cos_sim of unit rows = dot products; its column-major negatives, our row-major ones)."""
    batch = 7
    q, d, _, _ = make_problem(batch, batch * (1 + negatives_per_query), 16)
    strength = 5.0 if hardness_mode else 0.0
    st_loss = MultipleNegativesRankingLoss(
        model=None,
        scale=1 / TEMPERATURE,
        directions=directions,
        partition_mode=partition_mode,
        hardness_mode=hardness_mode,
        hardness_strength=strength,
    )
    expected = st_loss.compute_loss_from_embeddings(st_columns(q, d, negatives_per_query), None)
    ours = naive_info_nce(
        q,
        d,
        1 / TEMPERATURE,
        directions=directions,
        partition_mode=partition_mode,
        hardness_mode=hardness_mode,
        hardness_strength=strength,
    )
    assert_close(ours, expected, *FP64_TOLERANCE)


def gist_math(
    anchor,
    positive,
    negative,
    guide_anchor,
    guide_positive,
    guide_negative,
    temperature,
    margin,
    strategy,
    contrast_anchors,
    contrast_positives,
):
    """GISTEmbedLoss.forward's loss on precomputed embeddings, its lines as written there
    (single device, offset 0)."""

    def sim_matrix(a, b):
        return F.cosine_similarity(a.unsqueeze(1), b.unsqueeze(0), dim=-1)

    ap_sim = sim_matrix(anchor, positive)
    guided_ap_sim = sim_matrix(guide_anchor, guide_positive)
    guided_sim = guided_ap_sim.diagonal().view(-1, 1)

    def mask_false_negatives(guided_sim_mat, sim_mat, positive_mask=None):
        if strategy == "absolute":
            mask = guided_sim_mat > (guided_sim - margin)
        else:
            mask = guided_sim_mat > (guided_sim - guided_sim.abs() * margin)
        if positive_mask is not None:
            mask = mask & ~positive_mask
        sim_mat[mask] = -torch.inf
        return sim_mat

    rows = torch.arange(anchor.shape[0])
    positive_mask = torch.zeros_like(guided_ap_sim, dtype=torch.bool)
    positive_mask[rows, rows] = True
    scores = [mask_false_negatives(guided_ap_sim, ap_sim, positive_mask)]
    if contrast_anchors:
        scores.append(
            mask_false_negatives(sim_matrix(guide_anchor, guide_anchor), sim_matrix(anchor, anchor))
        )
    if contrast_positives:
        scores.append(
            mask_false_negatives(
                sim_matrix(guide_positive, guide_positive), sim_matrix(positive, positive)
            )
        )
    if negative is not None:
        scores.append(
            mask_false_negatives(
                sim_matrix(guide_anchor, guide_negative), sim_matrix(anchor, negative)
            )
        )
    scores = torch.cat(scores, dim=1) / temperature
    return F.cross_entropy(scores, rows)


def gist_directions(contrast_anchors, contrast_positives):
    """GIST's contrast set as directions: anchor-anchor is query_to_query and
    positive-positive doc_to_doc (equal to GIST's only without hard negatives)."""
    directions = ["query_to_doc"]
    if contrast_anchors:
        directions.append("query_to_query")
    if contrast_positives:
        directions.append("doc_to_doc")
    return tuple(directions)


@pytest.mark.parametrize(
    ("contrast_anchors", "contrast_positives", "with_negative"),
    [(True, True, False), (False, False, False), (True, False, True), (False, False, True)],
    ids=["pairs-aa-pp", "pairs", "triplets-aa", "triplets"],
)
@pytest.mark.parametrize(
    ("strategy", "margin"),
    [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.1), ("relative", -0.05)],
)
def test_naive_matches_gist_math(
    strategy, margin, contrast_anchors, contrast_positives, with_negative
):
    """GIST's positive-positive term covers the positives only, ours every document not
    owned by the row: compared where they coincide (pairs, or triplets without it)."""
    batch = 9
    num_docs = 2 * batch if with_negative else batch
    q, d, guide_q, guide_d = make_problem(batch, num_docs, 16)
    negative = d[batch:] if with_negative else None
    guide_negative = guide_d[batch:] if with_negative else None
    expected = gist_math(
        q,
        d[:batch],
        negative,
        guide_q,
        guide_d[:batch],
        guide_negative,
        TEMPERATURE,
        margin,
        strategy,
        contrast_anchors,
        contrast_positives,
    )
    ours = naive_info_nce(
        q,
        d,
        1 / TEMPERATURE,
        directions=gist_directions(contrast_anchors, contrast_positives),
        guide_q=guide_q,
        guide_d=guide_d,
        guide_margin=margin,
        guide_margin_strategy=strategy,
    )
    assert_close(ours, expected, *FP64_TOLERANCE)
    unguided = naive_info_nce(
        q, d, 1 / TEMPERATURE, directions=gist_directions(contrast_anchors, contrast_positives)
    )
    assert not torch.isclose(ours, unguided, rtol=1e-3), "the guide must drop candidates here"


class EmbeddingStub(torch.nn.Module):
    """A SentenceTransformer stand-in that returns the embeddings its features carry."""

    def __init__(self, key, tokenizer):
        super().__init__()
        self.key, self.tokenizer, self.max_seq_length = key, tokenizer, 128

    def forward(self, features):
        return {"sentence_embedding": features[self.key]}


def test_naive_matches_the_gist_class(minilm_path):
    """GISTEmbedLoss itself (with stub model and guide) on a triplet batch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = 8
    q, d, guide_q, guide_d = make_problem(batch, 2 * batch, 16)
    loss = GISTEmbedLoss(
        EmbeddingStub("embedding", tokenizer),
        EmbeddingStub("guide", tokenizer),
        temperature=TEMPERATURE,
        margin=0.05,
        contrast_positives=False,
    )
    columns = zip(
        (q, d[:batch], d[batch:]), (guide_q, guide_d[:batch], guide_d[batch:]), strict=True
    )
    features = [{"embedding": e, "guide": g} for e, g in columns]
    with column_merging_disabled():
        expected = loss(features, None)
    ours = naive_info_nce(
        q,
        d,
        1 / TEMPERATURE,
        directions=("query_to_doc", "query_to_query"),
        guide_q=guide_q,
        guide_d=guide_d,
        guide_margin=0.05,
    )
    assert_close(ours, expected, *FP64_TOLERANCE)


# ------------------------------------------------------------------------------------------
# The naive reference against a row-by-row loop (doc ids in every direction, owners)
# ------------------------------------------------------------------------------------------


def loop_reference(q, d, scale, ids, owners, options):
    """The module docstring's definition, candidate by candidate: row i's softmax gets, per
    direction, every column that no rule excludes."""
    batch, num_docs = q.shape[0], d.shape[0]
    directions = options.get("directions", ("query_to_doc",))
    joint = options.get("partition_mode", "joint") == "joint"
    mode, alpha = options.get("hardness_mode"), options.get("hardness_strength", 0.0)
    guide_q, guide_d = options.get("guide_q"), options.get("guide_d")
    margin = options.get("guide_margin", 0.0)

    def owned(i, j):
        return j == i or (j >= batch and int(owners[j]) == i)

    def same_text(i, j):
        return ids is not None and j != i and int(ids[j]) == int(ids[i])

    losses = []
    for i in range(batch):
        threshold = None
        if guide_q is not None:
            g = guide_q[i] @ guide_d[i]
            relative = options.get("guide_margin_strategy") == "relative"
            threshold = g - (abs(g) * margin if relative else margin)
        rows = {
            "query_to_doc": q[i],
            "query_to_query": q[i],
            "doc_to_query": d[i],
            "doc_to_doc": d[i],
        }
        guide_rows = (
            None
            if guide_q is None
            else {
                "query_to_doc": guide_q[i],
                "query_to_query": guide_q[i],
                "doc_to_query": guide_d[i],
                "doc_to_doc": guide_d[i],
            }
        )
        partitions = []
        for direction in directions:
            to_queries = direction.endswith("query")
            columns = range(batch) if to_queries else range(num_docs)
            logits = []
            for j in columns:
                if direction in ("query_to_query", "doc_to_doc") and j == i:
                    continue
                if direction == "doc_to_doc" and owned(i, j):
                    continue
                if same_text(i, j):
                    continue
                column = q[j] if to_queries else d[j]
                if guide_q is not None and not (
                    j == i and direction in ("query_to_doc", "doc_to_query")
                ):
                    guide_column = guide_q[j] if to_queries else guide_d[j]
                    if guide_rows[direction] @ guide_column > threshold:
                        continue
                similarity = rows[direction] @ column
                logit = scale * similarity
                if direction == "query_to_doc" and mode is not None:
                    penalised = {
                        "in_batch_negatives": not owned(i, j),
                        "hard_negatives": j >= batch and owned(i, j),
                        "all_negatives": j != i,
                    }[mode]
                    if penalised:
                        logit = logit + alpha * similarity.detach()
                logits.append(logit)
            partitions.append(torch.stack(logits) if logits else None)
        present = [p for p in partitions if p is not None]
        if joint:
            partition = torch.logsumexp(torch.cat(present), dim=0)
        else:
            partition = sum(torch.logsumexp(p, dim=0) for p in present) / len(present)
        losses.append(partition - scale * (q[i] @ d[i]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(6, 11, 8), (5, 20, 16)], ids=["B6-N11", "B5-K3"])
def test_naive_matches_loop_reference_with_doc_ids_and_owners(shape, option):
    """Duplicate doc ids and explicit owners (−1 and a non-row-major assignment) in every
    direction: loss and gradients of the naive path against the loop."""
    batch, num_docs, _ = shape
    q, d, guide_q, guide_d = make_problem(*shape)
    ids = duplicate_ids(batch, num_docs)
    options = options_for(option, guide_q, guide_d, batch, num_docs)
    options.setdefault("doc_owners", explicit_owners(batch, num_docs))
    expected = loss_and_grads(
        lambda q, d, t: loop_reference(q, d, 1 / t, ids, options["doc_owners"], options), q, d
    )
    actual = loss_and_grads(
        lambda q, d, t: naive_info_nce(q, d, 1 / t, doc_ids=ids, **options), q, d
    )
    assert_matches(actual, expected, *FP64_TOLERANCE)


# ------------------------------------------------------------------------------------------
# The chunked and fused paths against the naive reference
# ------------------------------------------------------------------------------------------


def path_results(impl, q, d, doc_ids, options, dtype=torch.float32, chunk_size=7):
    device = "cpu" if impl == "torch" else DEVICE
    q, d = q.to(device, dtype), d.to(device, dtype)
    ids = doc_ids.to(device) if doc_ids is not None else None
    options = on(device, dtype, options)
    extra = {"chunk_size": chunk_size} if impl == "torch" else {}
    results = loss_and_grads(
        lambda q, d, t: info_nce(q, d, t, doc_ids=ids, impl=impl, **extra, **options), q, d
    )
    return results, q, d, options


@pytest.mark.parametrize("with_ids", [False, True], ids=["no-ids", "dup-ids"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_torch_matches_naive(shape, option, with_ids):
    q, d, guide_q, guide_d = make_problem(*shape)
    ids = duplicate_ids(*shape[:2]) if with_ids else None
    options = options_for(option, guide_q, guide_d, *shape[:2])
    results, q32, d32, options32 = path_results("torch", q, d, ids, options)
    assert_matches(results, reference(q32, d32, ids, options32), *FP32_TOLERANCE)


@needs_triton
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=[SHAPE_IDS[1], SHAPE_IDS[3]])
def test_triton_matches_naive(shape, option):
    q, d, guide_q, guide_d = make_problem(*shape)
    ids = duplicate_ids(*shape[:2])
    options = options_for(option, guide_q, guide_d, *shape[:2])
    results, q32, d32, options32 = path_results("triton", q, d, ids, options)
    assert_matches(results, reference(q32, d32, ids, options32), *FP32_TOLERANCE)


@needs_triton
@pytest.mark.parametrize("option", ["gte-all4", "everything"])
@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
def test_triton_small_tiles(option, strategy):
    """16-wide tiles: every loop (rows, columns, D and G slices) runs several times; the
    host functions with an explicit upstream gradient."""
    batch, num_docs, dim = 21, 63, 40
    q, d, guide_q, guide_d = make_problem(batch, num_docs, dim, guide_dim=20)
    ids = duplicate_ids(batch, num_docs)
    options = on(DEVICE, torch.float32, options_for(option, guide_q, guide_d, batch, num_docs))
    terms = loss_terms(
        **{k: v for k, v in options.items() if k not in ("guide_q", "guide_d", "doc_owners")}
    )
    tensors = {k: options[k] for k in ("guide_q", "guide_d", "doc_owners") if k in options}
    q32, d32, ids_on = q.to(DEVICE, torch.float32), d.to(DEVICE, torch.float32), ids.to(DEVICE)
    blocks = BlockSizes(m=16, n=16, d=16, d_out=16)
    forward = infonce_forward(
        q32, d32, 1 / TEMPERATURE, ids_on, block_sizes=blocks, terms=terms, **tensors
    )
    dq, dd, dscale = infonce_backward(
        q32,
        d32,
        1 / TEMPERATURE,
        torch.tensor(UPSTREAM, device=DEVICE),
        forward.lse,
        ids_on,
        block_sizes=blocks,
        terms=terms,
        **tensors,
        **strategy,
    )
    expected_loss, expected_dq, expected_dd, expected_dt = reference(q32, d32, ids, options)
    assert_close(forward.loss, expected_loss, *FP32_TOLERANCE, "loss")
    assert_close(dq, expected_dq, *FP32_TOLERANCE, "dq")
    assert_close(dd, expected_dd, *FP32_TOLERANCE, "dd")
    # dL/ds = dL/dτ · dτ/ds with τ = 1/s.
    assert_close(dscale, expected_dt * -(TEMPERATURE**2), *FP32_TOLERANCE, "dscale")


@pytest.mark.parametrize(("dtype", "atol", "rtol"), DTYPE_TOLERANCES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_dtypes_match_naive(impl, dtype, atol, rtol):
    """fp16/bf16 inputs and guides: the reference sees the same rounded values, the paths
    accumulate in fp32, so the plain loss's tolerances hold with every option on."""
    batch, num_docs, dim = SHAPES[1]
    q, d, guide_q, guide_d = make_problem(batch, num_docs, dim)
    ids = duplicate_ids(batch, num_docs)
    options = options_for("everything", guide_q, guide_d, batch, num_docs)
    results, q_low, d_low, options_low = path_results(impl, q, d, ids, options, dtype)
    assert results[1].dtype == dtype and results[2].dtype == dtype
    assert_matches(results, reference(q_low, d_low, ids, options_low), atol, rtol)


@pytest.mark.parametrize("option", ["gte-all4", "d2q-per-direction", "guide-relative-all4"])
def test_torch_gradcheck_float64(option):
    """The chunked path's gradients against finite differences (hardness left out: its
    stop-gradient is invisible to autograd but not to finite differences)."""
    batch, num_docs = 4, 10
    q, d, guide_q, guide_d = make_problem(batch, num_docs, 5, guide_dim=6)
    ids = torch.tensor([0, 1, 0, 3, 4, 5, 6, 1, 8, 9])
    options = options_for(option, guide_q, guide_d, batch, num_docs)
    temperature = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, d, t: info_nce(q, d, t, doc_ids=ids, impl="torch", chunk_size=3, **options),
        (q.requires_grad_(), d.requires_grad_(), temperature),
    )


def test_hardness_is_a_stop_gradient():
    """The penalty changes the softmax weights, not the chain rule: the gradient equals the
    plain loss's formula with the penalised probabilities, which differs from the gradient
    of the penalty taken as a differentiable term."""
    q, d, _, _ = make_problem(6, 18, 8)
    options = {"hardness_mode": "all_negatives", "hardness_strength": 5.0}
    stop_grad = loss_and_grads(lambda q, d, t: naive_info_nce(q, d, 1 / t, **options), q, d)
    through = loss_and_grads(lambda q, d, t: naive_info_nce(q, d, 1 / t + 0 * t, **options), q, d)
    assert_matches(through, stop_grad, *FP64_TOLERANCE)
    # A differentiable penalty would be α·q·d plain, i.e. the scale s + α on the negatives.
    q_leaf = q.clone().requires_grad_()
    similarities = q_leaf @ d.T
    logits = similarities * (1 / TEMPERATURE + 5.0 * (1 - torch.eye(6, 18, dtype=torch.float64)))
    differentiable = F.cross_entropy(logits, torch.arange(6))
    (dq_differentiable,) = torch.autograd.grad(differentiable, q_leaf)
    assert torch.allclose(differentiable, stop_grad[0])
    assert not torch.allclose(dq_differentiable, stop_grad[1] / UPSTREAM)


# ------------------------------------------------------------------------------------------
# API: flags take effect, invalid combinations raise, memory stays linear
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("impl", ["naive", "torch", pytest.param("triton", marks=needs_triton)])
def test_each_option_changes_the_loss(impl, option):
    batch, num_docs, dim = SHAPES[2]
    q, d, guide_q, guide_d = make_problem(batch, num_docs, dim)
    device = "cpu" if impl == "torch" else DEVICE
    q, d = q.to(device, torch.float32), d.to(device, torch.float32)
    options = on(device, torch.float32, options_for(option, guide_q, guide_d, batch, num_docs))
    plain = info_nce(q, d, TEMPERATURE, impl=impl)
    assert abs(info_nce(q, d, TEMPERATURE, impl=impl, **options).item() - plain.item()) > 1e-4


def test_hardness_modes_and_owners_differ():
    """With three hard negatives per query the modes select different columns, and
    doc_owners moves 'own' (the default layout is not what explicit owners say)."""
    batch, num_docs, dim = SHAPES[2]
    q, d, _, _ = make_problem(batch, num_docs, dim)
    losses = {
        mode: naive_info_nce(q, d, 20.0, hardness_mode=mode, hardness_strength=5.0).item()
        for mode in ("in_batch_negatives", "hard_negatives", "all_negatives")
    }
    assert len({round(loss, 6) for loss in losses.values()}) == 3
    owners = explicit_owners(batch, num_docs)
    for directions, mode in ((ALL4, None), (("query_to_doc",), "hard_negatives")):
        strength = 5.0 if mode else 0.0
        options = {"directions": directions, "hardness_mode": mode, "hardness_strength": strength}
        default = naive_info_nce(q, d, 20.0, **options)
        explicit = naive_info_nce(q, d, 20.0, doc_owners=owners, **options)
        assert abs(default.item() - explicit.item()) > 1e-4


def test_symmetric_is_the_per_direction_pair():
    q, d, _, _ = make_problem(*SHAPES[1])
    ids = duplicate_ids(*SHAPES[1][:2])
    for impl in ("naive", "torch"):
        symmetric = info_nce(q, d, TEMPERATURE, True, ids, impl=impl)
        directions = info_nce(
            q,
            d,
            TEMPERATURE,
            doc_ids=ids,
            impl=impl,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )
        assert torch.equal(symmetric, directions)


Q, D = "<q>", "<d>"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"directions": ("doc_to_query",)}, "must contain 'query_to_doc'"),
        ({"directions": ("query_to_doc", "sideways")}, "unknown directions"),
        ({"directions": ("query_to_doc", "query_to_doc")}, "repeat"),
        (
            {"directions": ("query_to_doc", "query_to_query"), "partition_mode": "per_direction"},
            "use partition_mode='joint'",
        ),
        ({"partition_mode": "both"}, "partition_mode must be"),
        ({"symmetric": True, "directions": ALL4}, "pass either symmetric or directions"),
        ({"symmetric": True, "partition_mode": "joint"}, "pass either symmetric or directions"),
        ({"hardness_mode": "hardest"}, "hardness_mode must be"),
        ({"hardness_mode": "all_negatives", "hardness_strength": -1.0}, "finite and >= 0"),
        ({"hardness_strength": 2.0}, "no effect without a hardness_mode"),
        ({"guide_q": Q}, "needs both guide_q and guide_d"),
        ({"guide_q": Q, "guide_d": Q}, "guide_d must be"),
        ({"guide_margin": 0.1}, "need guide_q and guide_d"),
        ({"guide_margin_strategy": "relative"}, "need guide_q and guide_d"),
        ({"guide_q": Q, "guide_d": D, "guide_margin_strategy": "ratio"}, "must be one of"),
        ({"doc_owners": torch.zeros(3, dtype=torch.long)}, "doc_owners must have shape"),
        ({"doc_owners": torch.zeros(11)}, "integer tensor"),
    ],
)
@pytest.mark.parametrize("impl", ["naive", "torch", pytest.param("triton", marks=needs_triton)])
def test_invalid_options_raise(impl, kwargs, message):
    """Q and D stand for q and d, which the invalid guide arguments reuse."""
    device = DEVICE if impl == "triton" else "cpu"
    q, d, _, _ = make_problem(6, 11, 8)
    q, d = q.to(device, torch.float32), d.to(device, torch.float32)
    stand_ins = {Q: q, D: d}
    kwargs = {k: stand_ins.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message):
        info_nce(q, d, TEMPERATURE, impl=impl, **kwargs)


def test_module_options_and_their_validation():
    q, d, guide_q, guide_d = make_problem(*SHAPES[2])
    q, d, guide_q, guide_d = (x.float() for x in (q, d, guide_q, guide_d))
    options = {
        "directions": ALL4,
        "hardness_mode": "in_batch_negatives",
        "hardness_strength": 3.0,
        "guide_margin": 0.02,
    }
    module = InfoNCELoss(temperature=TEMPERATURE, impl="torch", **options)
    loss, stats = module(q, d, return_stats=True, guide_q=guide_q, guide_d=guide_d)
    expected = info_nce(
        q, d, TEMPERATURE, impl="torch", guide_q=guide_q, guide_d=guide_d, **options
    )
    assert torch.equal(loss, expected)
    assert stats.positive.shape == (q.shape[0],)
    with pytest.raises(ValueError, match="use partition_mode='joint'"):
        InfoNCELoss(directions=ALL4, partition_mode="per_direction")
    with pytest.raises(ValueError, match="pass either symmetric or directions"):
        InfoNCELoss(symmetric=True, directions=ALL4)
    # Training on several ranks passes `queries`: only the symmetric pair supports it.
    with pytest.raises(NotImplementedError, match="queries="):
        InfoNCELoss(directions=("query_to_doc", "doc_to_query"))(q, d, queries=q)
    symmetric = InfoNCELoss(
        symmetric=True, impl="torch", hardness_mode="all_negatives", hardness_strength=2.0
    )
    assert torch.allclose(symmetric(q, d, queries=q), symmetric(q, d))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_stats_skip_the_guides_drops(impl):
    """The statistics are those of query_to_doc: the guide's dropped columns are no
    competitors (as in the naive path), the hardness does not touch the similarities."""
    batch, num_docs, dim = SHAPES[1]
    q, d, guide_q, guide_d = make_problem(batch, num_docs, dim)
    device = "cpu" if impl == "torch" else DEVICE
    q, d = q.to(device, torch.float32), d.to(device, torch.float32)
    ids = duplicate_ids(batch, num_docs).to(device)
    options = on(
        device, torch.float32, options_for("everything", guide_q, guide_d, batch, num_docs)
    )
    _, expected = naive_info_nce(q, d, 20.0, doc_ids=ids, return_stats=True, **options)
    _, stats = info_nce(q, d, TEMPERATURE, doc_ids=ids, impl=impl, return_stats=True, **options)
    _, unguided = naive_info_nce(q, d, 20.0, doc_ids=ids, return_stats=True)
    assert not torch.equal(expected.best_other_index, unguided.best_other_index)
    assert torch.equal(stats.best_other_index.cpu(), expected.best_other_index.cpu())
    assert torch.equal(stats.false_negatives.cpu(), expected.false_negatives.cpu())
    assert_close(stats.best_other, expected.best_other, *FP32_TOLERANCE, "best_other")


def largest_allocation(fn) -> int:
    """Bytes of the largest CPU allocation while fn runs (the profiler's allocator events;
    an op's event also counts its children's, so this can only overstate)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(event.cpu_memory_usage for event in prof.events())


def test_torch_path_allocates_nothing_batch_by_docs():
    """Every option on, B = 1024, N = 2048, 128-wide chunks: forward and backward allocate
    no B×N quarter (B·N bytes: a B×N bool mask) while the naive path does."""
    batch, num_docs = 1024, 2048
    q, d, guide_q, guide_d = make_problem(batch, num_docs, 16, guide_dim=8)
    q, d, guide_q, guide_d = (x.float() for x in (q, d, guide_q, guide_d))
    ids = torch.randint(0, 1500, (num_docs,))
    options = {"guide_q": guide_q, "guide_d": guide_d, **OPTIONS["everything"]}
    options.pop("guide"), options.pop("owners")
    limit = batch * num_docs

    def run(impl):
        q_leaf = q.clone().requires_grad_()
        extra = {"chunk_size": 128} if impl == "torch" else {}
        loss = info_nce(q_leaf, d, TEMPERATURE, doc_ids=ids, impl=impl, **extra, **options)
        loss.backward()

    assert largest_allocation(lambda: run("naive")) >= limit
    assert largest_allocation(lambda: run("torch")) < limit


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_saved_state_is_linear(impl):
    """No saved tensor is B×N with every option on: D = G = 4 keep the inputs small."""
    batch, num_docs = 33, 66
    q, d, guide_q, guide_d = make_problem(batch, num_docs, 4, guide_dim=4)
    device = "cpu" if impl == "torch" else DEVICE
    q, d = q.to(device, torch.float32).requires_grad_(), d.to(device, torch.float32)
    options = on(
        device, torch.float32, options_for("everything", guide_q, guide_d, batch, num_docs)
    )
    loss = info_nce(q, d, TEMPERATURE, impl=impl, **options)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) <= num_docs * 4 < batch * num_docs


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-2, 5e-2)],
    ids=["fp32", "bf16"],
)
@pytest.mark.parametrize("option", ["gte-all4", "d2q-per-direction", "everything"])
def test_gpu_options_match_naive(option, dtype, atol, rtol):
    """The compiled kernels (the interpreter cannot show what the code generator does) at
    a size with many tiles, each backward strategy."""
    batch, num_docs, dim = 1000, 3000, 384
    q, d, guide_q, guide_d = make_problem(batch, num_docs, dim, guide_dim=256)
    ids = torch.randint(0, num_docs // 2, (num_docs,), generator=torch.Generator().manual_seed(0))
    options = on(DEVICE, dtype, options_for(option, guide_q, guide_d, batch, num_docs))
    q_low, d_low, ids_on = q.to(DEVICE, dtype), d.to(DEVICE, dtype), ids.to(DEVICE)
    expected = reference(q_low, d_low, ids, options)
    for strategy in GPU_STRATEGIES:
        results = loss_and_grads(
            lambda q, d, t, strategy=strategy: fused_info_nce(
                q, d, 1 / t, doc_ids=ids_on, **strategy, **options
            ),
            q_low,
            d_low,
        )
        assert_matches(results, expected, atol, rtol)
