"""Sweeps: a real Hydra multirun of train.py, compared by compare.py; seed aggregation
against hand computation; reading run folders."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from configs import ROOT, tiny_overrides
from wandb_file import run_contents

from biencoder import compare as compare_cli
from biencoder.data.errors import DataError
from biencoder.evaluation.sweeps import compare_runs, find_runs, markdown_table, read_run, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder: Path, overrides: list[str], final: dict | None, lines=()) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if final is not None:
        (folder / "metrics.json").write_text(json.dumps(final))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_path):
    """A 2x2 multirun (pooling x loss) of 2-step runs, logged to W&B offline too."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    overrides = tiny_overrides(
        tiny_model_path, "beir", "logger=wandb", f"hydra.sweep.dir={sweep_dir}"
    )
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "pooling=cls,mean", "loss=infonce,triplet", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sweep_dir


def test_multirun_writes_a_folder_per_job(sweep):
    runs = find_runs([sweep])
    assert [run.name for run in runs] == ["0", "1", "2", "3"]
    seen = set()
    for run in runs:
        for name in (".hydra/config.yaml", "metrics.jsonl", "metrics.json"):
            assert (run / name).is_file(), run / name
        overrides = read_run(run).overrides
        seen.add((overrides["pooling"], overrides["loss"]))
    assert seen == {
        ("cls", "infonce"),
        ("cls", "triplet"),
        ("mean", "infonce"),
        ("mean", "triplet"),
    }


def test_compare_table_rows_equal_each_runs_metrics_json(sweep, tmp_path, capsys):
    assert compare_cli.main([str(sweep), "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "comparison.csv")
    assert len(rows) == 4
    for run in find_runs([sweep]):
        final = json.loads((run / "metrics.json").read_text())
        overrides = read_run(run).overrides
        (row,) = [
            r
            for r in rows
            if (r["pooling"], r["loss"]) == (overrides["pooling"], overrides["loss"])
        ]
        assert row["runs"] == "1"
        for metric in ("ndcg@10", "recall@100", "mrr@10"):
            assert float(row[f"{metric}:mean"]) == final[metric]
            assert float(row[f"{metric}:std"]) == 0.0
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n| cls |") + table.count("\n| mean |") == 4
    assert "| pooling | loss | n | ndcg@10 |" in table
    for image in ("ndcg_at_10.png", "loss_curves.png"):
        assert (tmp_path / image).read_bytes()[:8] == PNG_MAGIC
    assert "| pooling | loss |" in capsys.readouterr().out


def test_sweep_runs_share_a_wandb_group_and_carry_their_overrides_as_tags(sweep):
    groups = set()
    for run in find_runs([sweep]):
        (folder,) = (run / "wandb").glob("offline-run-*")
        contents = run_contents(folder)
        groups.add(contents["group"])
        overrides = read_run(run).overrides
        assert f"pooling={overrides['pooling']}" in contents["tags"]
        assert f"loss={overrides['loss']}" in contents["tags"]
        # Overrides holding long paths exceed W&B's 64-character tag limit and stay out.
        assert all(len(tag) <= 64 for tag in contents["tags"])
    assert groups == {f"train/{sweep.name}"}


def test_seed_aggregation_matches_hand_computation(tmp_path):
    values = {"cls": [0.50, 0.60, 0.70], "mean": [0.62, 0.66]}
    for pooling, scores in values.items():
        for seed, score in enumerate(scores):
            write_run(
                tmp_path / f"{pooling}-{seed}",
                ["experiment=ablation", f"pooling={pooling}", f"seed={seed}"],
                {"ndcg@10": score},
            )
    comparison = compare_runs([read_run(p) for p in find_runs([tmp_path])])
    assert comparison.axes == ["pooling"]
    stats = {g.values["pooling"]: g.stats["ndcg@10"] for g in comparison.groups}
    # cls: mean 0.6, deviations -0.1, 0, 0.1 -> sample variance 0.02/2, std 0.1;
    # t(0.975, 2 df) = 4.3027 from the t table, interval 0.6 ± 4.3027 * 0.1 / sqrt(3).
    assert stats["cls"].n == 3
    assert stats["cls"].mean == pytest.approx(0.6, abs=1e-12)
    assert stats["cls"].std == pytest.approx(0.1, abs=1e-12)
    assert stats["cls"].ci_low == pytest.approx(0.6 - 4.3027 * 0.1 / math.sqrt(3), abs=1e-4)
    assert stats["cls"].ci_high == pytest.approx(0.6 + 4.3027 * 0.1 / math.sqrt(3), abs=1e-4)
    # mean: 0.64 ± 0.02 * sqrt(2) = 0.028284...; t(0.975, 1 df) = 12.706.
    assert stats["mean"].mean == pytest.approx(0.64, abs=1e-12)
    assert stats["mean"].std == pytest.approx(0.02 * math.sqrt(2), abs=1e-12)
    assert stats["mean"].ci_high == pytest.approx(0.64 + 12.706 * 0.02, abs=1e-3)
    # Ranked by the first metric, best first.
    assert [g.values["pooling"] for g in comparison.groups] == ["mean", "cls"]


def test_single_run_has_no_spread():
    assert summarize([0.3]) == summarize([0.3])
    single = summarize([0.3])
    assert (single.n, single.mean, single.std, single.ci_low, single.ci_high) == (
        1,
        0.3,
        0,
        0.3,
        0.3,
    )
    with pytest.raises(ValueError):
        summarize([])


def test_read_run_takes_dev_metrics_at_the_selected_step_and_averages_the_training_tail(
    tmp_path,
):
    lines = [
        {
            "step": s,
            "time": 0.0,
            "train/loss": float(s),
            "train/accuracy": 0.1 * s,
            "train/examples_per_s": 9.0,
        }
        for s in range(1, 21)
    ]
    lines.insert(5, {"step": 5, "dev/ndcg@10": 0.4, "dev/recall@100": 0.9})
    lines.insert(12, {"step": 11, "dev/ndcg@10": 0.5, "dev/recall@100": 0.7})
    lines.append({"step": 20, "dev/ndcg@10": 0.5, "dev/recall@100": 0.6})
    run = read_run(write_run(tmp_path / "run", ["seed=0"], None, lines))
    assert not run.finished
    # The first maximum of the selection metric, as train.py keeps its best checkpoint.
    assert run.metrics["dev/ndcg@10"] == 0.5 and run.metrics["dev/recall@100"] == 0.7
    # The last tenth of 20 logged steps: steps 19 and 20.
    assert run.metrics["train/loss"] == pytest.approx(19.5)
    assert run.metrics["train/accuracy"] == pytest.approx(1.95)
    assert "train/examples_per_s" not in run.metrics
    assert run.loss_curve[:2] == [(1, 1.0), (2, 2.0)]


def test_read_run_ignores_a_torn_last_line_but_not_corruption(tmp_path):
    folder = write_run(
        tmp_path / "run", ["seed=0"], {"ndcg@10": 0.5}, [{"step": 1, "train/loss": 2.0}]
    )
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')
    assert read_run(folder).loss_curve == [(1, 2.0)]
    (folder / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: malformed JSON"):
        read_run(folder)


def test_compare_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no run folder"):
        find_runs([tmp_path])
    write_run(tmp_path / "a", ["seed=0"], {"ndcg@10": 0.5})
    with pytest.raises(KeyError, match=r"spearman.*available: ndcg@10"):
        compare_runs([read_run(tmp_path / "a")], metrics=["spearman"])


def test_table_marks_metrics_that_only_some_runs_report(tmp_path):
    write_run(tmp_path / "a", ["pooling=cls", "seed=0"], {"ndcg@10": 0.5})
    write_run(tmp_path / "b", ["pooling=cls", "seed=1"], {"recall@100": 0.8})
    write_run(tmp_path / "c", ["pooling=mean", "seed=0"], {"ndcg@10": 0.6})
    comparison = compare_runs([read_run(p) for p in find_runs([tmp_path])])
    table = markdown_table(comparison)
    assert "| mean | 1 | **0.6000 ± 0.0000** |" in table
    assert "| cls | 2 | 0.5000 ± 0.0000 (n=1) |" in table
    assert comparison.unfinished == {}
    assert comparison.axis_values == {"pooling": ["cls", "mean"]}


def write_last_checkpoint(folder: Path, meta: str) -> None:
    (folder / "checkpoints" / "last").mkdir(parents=True)
    (folder / "checkpoints" / "last" / "checkpoint.json").write_text(meta)


def test_unfinished_runs_are_listed_apart_never_ranked_or_bolded(tmp_path, capsys):
    def dev(value):
        return [{"step": 10, "train/loss": 1.0}, {"step": 10, "dev/ndcg@10": value}]

    write_run(tmp_path / "a", ["pooling=cls"], {"ndcg@10": 0.5}, dev(0.4))
    write_run(tmp_path / "b", ["pooling=mean"], {"ndcg@10": 0.6}, dev(0.45))
    killed = write_run(tmp_path / "c", ["pooling=max"], None, dev(0.9))
    # Finished at step 10, then resumed for more steps and killed at step 15: its
    # metrics.json is the stale evaluation of the shorter run.
    resumed = write_run(
        tmp_path / "d",
        ["pooling=first"],
        {"ndcg@10": 0.9},
        [*dev(0.9), {"step": 15, "train/loss": 0.5}],
    )
    write_last_checkpoint(resumed, '{"step": 10, "name": "last"}')
    comparison = compare_runs(
        [read_run(p) for p in find_runs([tmp_path])], metrics=["dev/ndcg@10", "ndcg@10"]
    )
    assert [g.values["pooling"] for g in comparison.groups] == ["mean", "cls"]
    assert comparison.unfinished == {
        killed: "no metrics.json or metrics.summary.json",
        resumed: "metrics.jsonl logs step 15, past checkpoints/last (step 10): "
        "it stopped before the end",
    }
    table = markdown_table(comparison)
    assert "| mean | 1 | **0.4500 ± 0.0000** | **0.6000 ± 0.0000** |" in table
    assert "max" not in table and "first" not in table and "0.9" not in table

    out = tmp_path / "report"
    assert compare_cli.main([str(tmp_path), "--out", str(out), "--metrics", "dev/ndcg@10"]) == 0
    printed = capsys.readouterr().out
    assert "| mean | 1 | **0.4500 ± 0.0000** |" in printed
    assert (
        "unfinished runs, left out of the table:\n"
        f"  {killed}: no metrics.json or metrics.summary.json\n"
        f"  {resumed}: metrics.jsonl logs step 15, past checkpoints/last (step 10)"
    ) in printed
    report = (out / "comparison.md").read_text()
    assert f"- `{killed}`: no metrics.json or metrics.summary.json\n" in report
    assert [r["pooling"] for r in read_csv(out / "comparison.csv")] == ["mean", "cls"]


def test_a_run_without_a_test_evaluation_finishes_with_metrics_summary_json(tmp_path):
    # trainer.eval=false (an Optuna sweep): train.py writes only the best dev value at the end.
    folder = write_run(tmp_path / "run", ["seed=0"], None, [{"step": 5, "dev/ndcg@10": 0.4}])
    (folder / "metrics.summary.json").write_text(json.dumps({"dev/best_ndcg@10": 0.4}))
    write_last_checkpoint(folder, '{"step": 5, "name": "last"}')
    run = read_run(folder)
    assert run.finished and run.stopped is None
    assert run.metrics == {"dev/ndcg@10": 0.4}


def test_comparing_only_unfinished_runs_names_them(tmp_path):
    a = write_run(tmp_path / "a", ["seed=0"], None, [{"step": 1, "train/loss": 1.0}])
    b = write_run(tmp_path / "b", ["seed=1"], None)
    with pytest.raises(ValueError) as excinfo:
        compare_runs([read_run(a), read_run(b)])
    assert str(excinfo.value) == (
        "none of the 2 runs finished, so there is nothing to compare: "
        f"{a} (no metrics.json or metrics.summary.json), "
        f"{b} (no metrics.json or metrics.summary.json)"
    )


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("metrics.json", '{"ndcg@10": 0.5', "invalid JSON: Expecting ',' delimiter"),
        ("metrics.json", "[0.5]", "expected a JSON object, got array"),
        ("checkpoints/last/checkpoint.json", "", "invalid JSON: Expecting value"),
        ("checkpoints/last/checkpoint.json", '{"step": "10"}', "field 'step': expected an int"),
    ],
)
def test_a_corrupt_json_file_is_named(tmp_path, name, content, reason):
    folder = write_run(tmp_path / "run", ["seed=0"], {"ndcg@10": 0.5})
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(content)
    with pytest.raises(DataError) as excinfo:
        read_run(folder)
    assert str(excinfo.value).startswith(f"{folder / name}: {reason}")
