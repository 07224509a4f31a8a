"""Distillation from teacher scores in the data: the JSONL ``scores`` field, the tasks that
turn Triplets into ``[B, 1 + K]`` candidate lists, and ``loss=margin_mse|listwise_kl`` in
train.py."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from configs import run_entry

from biencoder.data.errors import DataError
from biencoder.data.training import Pair, Triplet, load_triplets
from biencoder.training.tasks import ListwiseKLTask, MarginMSETask, read_stats

# Exact in fp32, where batches hold targets, so the fp64 oracle below needs no slack.
TEACHER = [(2.0, 0.5, -1.0), (0.125, 0.875, 0.25), (1.5, 1.375, 1.625)]
EXAMPLES = [
    Triplet(f"query {i}", f"positive {i}", (f"negative {i}a", f"negative {i}b"), scores=s)
    for i, s in enumerate(TEACHER)
]


@pytest.fixture
def embeddings() -> list[torch.Tensor]:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    return [t.requires_grad_() for t in (q, pos, neg)]


def candidate_scores(q, pos, neg, i: int) -> list[torch.Tensor]:
    """Example i's student scores, written out one candidate at a time: its negatives are
    rows 2i and 2i + 1 of the flattened negatives column."""
    return [q[i] @ pos[i], q[i] @ neg[2 * i], q[i] @ neg[2 * i + 1]]


def test_margin_mse_task_is_the_mean_squared_margin_error(embeddings):
    task = MarginMSETask()
    batch = task.make_batch(EXAMPLES)
    assert batch.columns[2] == ["negative 0a", "negative 0b", "negative 1a", "negative 1b",
                                "negative 2a", "negative 2b"]  # fmt: skip
    loss, stats = task(embeddings, batch)
    stats = read_stats(stats)
    terms = []
    for i, teacher in enumerate(TEACHER):
        s = candidate_scores(*embeddings, i)
        terms += [((s[0] - s[k]) - (teacher[0] - teacher[k])) ** 2 for k in (1, 2)]
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(loss * 3.0, embeddings)
    expected_grads = torch.autograd.grad(expected * 3.0, embeddings)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-12)
    assert set(stats) == {"accuracy", "teacher_agreement"}


@pytest.mark.parametrize("student_temperature, teacher_temperature", [(0.05, 1.0), (0.2, 0.5)])
def test_listwise_kl_task_is_the_kl_of_the_two_softmaxes(
    embeddings, student_temperature, teacher_temperature
):
    task = ListwiseKLTask(student_temperature, teacher_temperature)
    loss, _ = task(embeddings, task.make_batch(EXAMPLES))
    total = 0.0
    for i, teacher in enumerate(TEACHER):
        s = torch.stack(candidate_scores(*embeddings, i)) / student_temperature
        log_student = s - torch.logsumexp(s, 0)
        t = torch.tensor(teacher, dtype=torch.float64) / teacher_temperature
        p_teacher = torch.softmax(t, 0)
        total = total + (p_teacher * (p_teacher.log() - log_student)).sum()
    torch.testing.assert_close(loss, total / len(TEACHER), rtol=1e-12, atol=0)


def test_statistics_count_the_queries_where_the_student_agrees(embeddings):
    q = embeddings[0].detach()
    task = MarginMSETask()
    # The student ranks every positive first (cosine 1, negatives −1); the teacher ranks
    # the positive first for query 0 only (query 1 prefers negative a, query 2 negative b).
    _, stats = task([q, q.clone(), -q.repeat_interleave(2, 0)], task.make_batch(EXAMPLES))
    stats = read_stats(stats)
    assert stats["accuracy"] == 1.0
    assert stats["teacher_agreement"] == pytest.approx(1 / 3)


def test_triplets_without_scores_are_refused_naming_where_they_were_read():
    task = ListwiseKLTask()
    example = Triplet("q", "p", ("n",), source="mined.jsonl:7")
    with pytest.raises(ValueError, match=r"mined\.jsonl:7: ListwiseKLTask needs teacher scores"):
        task.make_batch([example])
    with pytest.raises(ValueError, match="ListwiseKLTask trains on Triplet examples"):
        task.check_accepts(Pair)


def test_the_jsonl_reader_keeps_scores_and_names_bad_ones(tmp_path):
    path = tmp_path / "scored.jsonl"
    records = [
        {"query": "q1", "positive": "p1", "negatives": ["a", "b"], "scores": [3, 1.5, -2]},
        {"query": "q2", "positive": "p2", "negatives": ["c", "d"], "scores": [0, 0, 0]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    first, _ = load_triplets(path)
    assert first.scores == (3.0, 1.5, -2.0) and first.source == f"{path}:1"
    path.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["a"]}) + "\n")
    assert load_triplets(path)[0].scores is None

    for scores, field, reason in [
        ([1.0, 2.0], "scores", "2 scores for 1 positive and 2 negatives"),
        ([1.0, "x", 2.0], "scores[1]", "expected a number"),
        ([1.0, None, 2.0], "scores[1]", "expected a number, got null"),
        ([1.0, True, 2.0], "scores[1]", "expected a number, got true"),
        ([1.0, math.inf, 2.0], "scores[1]", "finite"),
        ([1.0, math.nan, 2.0], "scores[1]", "expected a finite number, got NaN"),
        ("high", "scores", "expected an array of numbers"),
        (None, "scores", "expected an array of numbers, got null"),
    ]:
        bad = {"query": "q", "positive": "p", "negatives": ["a", "b"], "scores": scores}
        path.write_text(json.dumps(bad).replace("Infinity", "1e999") + "\n")
        with pytest.raises(DataError, match=reason) as error:
            load_triplets(path)
        assert f"{path}:1" in str(error.value) and field in str(error.value)


SCORED = {"query": "q", "positive": "p", "negatives": ["a", "b"], "scores": [3.0, 2.0, 1.0]}


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            {**SCORED, "scores": [[3.0, 2.0, 1.0]]},
            "field 'scores[0]': expected a number, got array",
        ),
        (
            {**SCORED, "scores": [3.0, 2.0]},
            "field 'scores': 2 scores for 1 positive and 2 negatives; give 3, one teacher score "
            "per text: the positive's, then each negative's",
        ),
        (
            {key: value for key, value in SCORED.items() if key != "scores"},
            "field 'scores': required field is missing: line 1 has teacher scores, so every "
            "record needs them",
        ),
    ],
)
def test_scores_that_do_not_fit_their_record_or_the_file_are_named(tmp_path, second, message):
    path = tmp_path / "scored.jsonl"
    path.write_text(json.dumps(SCORED) + "\n" + json.dumps(second) + "\n")
    with pytest.raises(DataError) as error:
        load_triplets(path)
    assert str(error.value) == f"{path}:2: {message}"


def test_one_negative_takes_two_scores_and_scores_on_a_later_record_only_are_named(tmp_path):
    path = tmp_path / "scored.jsonl"
    one = {"query": "q", "positive": "p", "negative": "a", "scores": [3.0, 2.0, 1.0]}
    path.write_text(json.dumps(one) + "\n")
    with pytest.raises(DataError) as error:
        load_triplets(path)
    assert str(error.value) == (
        f"{path}:1: field 'scores': 3 scores for 1 positive and 1 negative; give 2, one "
        "teacher score per text: the positive's, then each negative's"
    )
    unscored = {"query": "q", "positive": "p", "negatives": ["a", "b"]}
    path.write_text(json.dumps(unscored) + "\n" + json.dumps(SCORED) + "\n")
    with pytest.raises(DataError) as error:
        load_triplets(path)
    assert str(error.value) == (
        f"{path}:2: field 'scores': line 1 has no teacher scores: give every record scores, or none"
    )


@pytest.mark.parametrize("loss", ["margin_mse", "listwise_kl"])
def test_train_py_distils_from_a_scored_jsonl(tmp_path, tiny_model_path, loss):
    path = tmp_path / "scored.jsonl"
    records = [
        {
            "query": f"question number {i}",
            "positive": f"the answer to question {i}",
            "negatives": [f"unrelated text {i}", f"another text {i + 1}"],
            "scores": [5.0, 1.0 + 0.1 * i, 0.5],
        }
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_dir = tmp_path / "run"
    run_entry(
        "train.py",
        f"model.path={tiny_model_path}",
        "train_data=jsonl",
        "train_data.format=triplets",
        f"train_data.path={path}",
        f"loss={loss}",
        "trainer.batch_size=4",
        "trainer.max_steps=3",
        "trainer.eval=false",
        f"hydra.run.dir={run_dir}",
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "train/loss" in line]
    assert len(steps) == 3
    assert all(math.isfinite(line["train/loss"]) for line in steps)
    assert "train/teacher_agreement" in steps[-1]
