"""Replay bad inputs and faults against the command lines, and grade how each is handled.

Every kind below builds its input in a scratch folder (a tiny random BERT, copies of the
bundled tiny data, broken files), runs ``train.py``, ``eval.py`` or ``compare.py`` as a user
would, and checks the outcome: the exit status, the words the message must contain (the
key, file or line at fault), and what must not have happened (work done before the error,
files left behind). GOOD: all of it holds. WEAK: the run failed or succeeded as it should,
but the message or the side effects fall short. BAD: it succeeded when it should have
failed, or failed when it should have worked.

Example (the table committed in bench/results/reliability.md)::

    python bench/reliability.py --out bench/results/reliability.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import REPO_ROOT, report_header

from biencoder.model.weights import TOKENIZER_FILES

TIMEOUT_S = 600


@dataclass
class Outcome:
    code: int | None
    output: str
    seconds: float
    folder: Path


@dataclass
class Kind:
    """One bad input or fault: ``argv`` (after ``python``) run in the repository with
    ``{work}`` naming the scratch folder; ``setup`` builds the input first. ``fails`` says
    whether a clear error is the right outcome; ``says`` are the words its output must hold;
    ``check`` inspects what the run left (None when fine, else what is wrong)."""

    name: str
    argv: list[str]
    fails: bool = True
    says: list[str] = field(default_factory=list)
    setup: Callable[[Path], None] | None = None
    check: Callable[[Outcome], str | None] | None = None
    run: Callable[[list[str], Path], Outcome] | None = None
    wrapper: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ inputs


def tiny_model(work: Path, name: str = "model", **config) -> Path:
    import torch

    from biencoder.model.config import EncoderConfig
    from biencoder.model.weights import packaged_model_path, save_random_bert

    torch.manual_seed(0)
    return save_random_bert(work / name, Path(packaged_model_path()), EncoderConfig.tiny(**config))


def tiny_beir(work: Path, name: str = "beir") -> Path:
    from biencoder.data.paths import TINY_DIR

    folder = work / name
    if not folder.exists():
        shutil.copytree(TINY_DIR, folder)
    return folder


def rewrite_qrels(folder: Path, split: str, rewrite: Callable[[list[str]], list[str]]) -> None:
    path = folder / "qrels" / f"{split}.tsv"
    header, *rows = path.read_text().splitlines()
    path.write_text("\n".join([header, *rewrite(rows)]) + "\n")


def model_without(work: Path, name: str, files: list[str]) -> Path:
    folder = tiny_model(work, name)
    for file in files:
        (folder / file).unlink(missing_ok=True)
    return folder


def nan_model(work: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tiny_model(work, "nan")
    weights = load_file(folder / "model.safetensors")
    save_file({k: v * float("nan") for k, v in weights.items()}, folder / "model.safetensors")


def truncated_weights(work: Path) -> None:
    path = tiny_model(work, "truncated") / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bad_pooling(work: Path) -> None:
    folder = tiny_model(work, "badpool")
    (folder / "biencoder.json").write_text(json.dumps({"pooling": "avg"}))


def scored_pairs(work: Path) -> None:
    rows = [{"text1": f"sentence {i}", "text2": f"another {i}", "score": 4.0} for i in range(8)]
    rows[5]["score"] = 7.5
    (work / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def duplicate_pairs(work: Path) -> None:
    (work / "dups.jsonl").write_text('{"query": "what is x", "positive": "x is y"}\n' * 100)


def long_line(work: Path) -> None:
    folder = tiny_beir(work, "longdoc")
    corpus = folder / "corpus.jsonl.gz"
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = json.loads(lines[0])
    first["text"] = "cells " * 3_500_000  # 21 MB on one line
    lines[0] = json.dumps(first)
    with gzip.open(corpus, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def read_only_checkpoints(work: Path) -> None:
    tiny_model(work)
    (work / "run" / "checkpoints").mkdir(parents=True)
    os.chmod(work / "run" / "checkpoints", 0o500)


def trained_run(work: Path, *extra: str) -> list[str]:
    """Overrides of a 2-step run into {work}/run, and train it."""
    overrides = [
        "debug=tiny",
        f"model.path={work / 'model'}",
        "trainer.eval=false",
        f"hydra.run.dir={work / 'run'}",
        *extra,
    ]
    tiny_model(work)
    subprocess.run(
        [sys.executable, "train.py", *overrides],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    return overrides


def malicious_state(work: Path) -> None:
    trained_run(work)
    last = work / "run" / "checkpoints" / "last"
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (last / name).unlink()

    class Payload:
        def __reduce__(self):
            return (open, (str(work / "PWNED"), "w"))

    (last / "trainer_state.pt").write_bytes(pickle.dumps({"step": Payload()}))


def unfinished_sweep(work: Path) -> None:
    sweep = work / "sweep"
    for number, pooling, ndcg in ((0, "mean", 0.5), (1, "cls", 0.4), (2, "max", None)):
        run = sweep / str(number)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- pooling={pooling}\n- seed=0\n")
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n")
        if ndcg is not None:
            (run / "metrics.json").write_text(json.dumps({"ndcg@10": ndcg}))
    # The killed run logged the best-looking numbers before it died.
    (sweep / "2" / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "train/loss": 0.1, "dev/ndcg@10": 0.99}) + "\n"
    )


def corrupt_metrics(work: Path) -> None:
    unfinished_sweep(work)
    (work / "sweep" / "1" / "metrics.json").write_text('{"ndcg@10": 0.4')


# ------------------------------------------------------------------------------ checks


def no_file(name: str) -> Callable[[Outcome], str | None]:
    def check(outcome: Outcome) -> str | None:
        found = list(outcome.folder.rglob(name))
        return f"left {found[0].relative_to(outcome.folder)}" if found else None

    return check


def before_encoding(outcome: Outcome) -> str | None:
    return "failed only after encoding" if "encode docs" in outcome.output else None


def no_run_files(outcome: Outcome) -> str | None:
    return no_file("metrics.jsonl")(outcome)


def seq_len_at_most_8(outcome: Outcome) -> str | None:
    lines = (outcome.folder / "run" / "metrics.jsonl").read_text().splitlines()
    lengths = [json.loads(x)["train/seq_len_max"] for x in lines if "train/seq_len_max" in x]
    return None if lengths and max(lengths) <= 8 else f"train/seq_len_max {lengths}"


def resumed_same_model(outcome: Outcome) -> str | None:
    config = json.loads((outcome.folder / "run/checkpoints/last/config.json").read_text())
    steps = [
        json.loads(x)["step"]
        for x in (outcome.folder / "run/metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    if config["hidden_size"] != 32 or steps != [1, 2, 3, 4]:
        return f"resumed onto another run: hidden {config['hidden_size']}, steps {steps}"
    return None


def killed_run_not_ranked(outcome: Outcome) -> str | None:
    table = (outcome.folder / "sweep" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "max" in line]
    ranked = [row for row in rows if "**" in row or "0.99" in row]
    return f"the killed run is in the ranking: {ranked[0]}" if ranked else None


def saved_last(outcome: Outcome) -> str | None:
    marker = outcome.folder / "run" / "checkpoints" / "last" / "checkpoint.json"
    return None if marker.is_file() else "no checkpoints/last"


# --------------------------------------------------------------------------- runners


def run_command(argv: list[str], work: Path, wrapper: list[str] = ()) -> Outcome:
    start = time.perf_counter()
    proc = subprocess.run(
        [*wrapper, sys.executable, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    return Outcome(proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start, work)


def run_then_sigterm(argv: list[str], work: Path) -> Outcome:
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(
            [sys.executable, *argv], cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT
        )
        metrics = work / "run" / "metrics.jsonl"
        while proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3
        ):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT_S)
        output.seek(0)
        text = output.read()
    return Outcome(proc.returncode, text, time.perf_counter() - start, work)


def disk_full_snippet(work: Path) -> list[str]:
    code = f"""
import errno, sys
from pathlib import Path
import torch
from biencoder.model.biencoder import BiEncoder
from biencoder.training import checkpoint
from biencoder.training.checkpoint import save_checkpoint, load_trainer_state, latest_checkpoint
root = Path({str(work / "ckpt")!r})
model = BiEncoder.from_pretrained({str(work / "model")!r})
save_checkpoint(root, "last", model, {{"step": 1}})
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
# The trainer state's tensors are the last large write of a checkpoint.
checkpoint.save_file = full
try:
    save_checkpoint(root, "last", model, {{"step": 2}})
except OSError as err:
    print("error:", err)
assert load_trainer_state(latest_checkpoint(root))["step"] == 1, "previous checkpoint lost"
print("previous checkpoint intact")
"""
    return ["-c", code]


# ------------------------------------------------------------------------------- kinds


def kinds() -> list[Kind]:
    model = "model.path={work}/model"
    train = ["train.py", "debug=tiny", model, "hydra.run.dir={work}/run"]
    evaluate = ["eval.py", "hydra.run.dir={work}/eval"]
    need_model: Callable[[Path], None] = tiny_model
    return [
        # ---------------------------------------------------- silent wrong results, lost work
        Kind(
            "a pickled trainer_state.pt with a code payload, resumed",
            [*train, "trainer.resume={work}/run/checkpoints/last", "trainer.eval=false"],
            says=["trainer_state.pt", "pickle"],
            setup=malicious_state,
            check=no_file("PWNED"),
        ),
        Kind(
            "a model folder without tokenizer files",
            [*evaluate, "model.path={work}/notok", "eval_data.path={work}/beir"],
            says=["tokenizer", "notok"],
            setup=lambda w: (model_without(w, "notok", list(TOKENIZER_FILES)), tiny_beir(w)),
            check=before_encoding,
        ),
        Kind(
            "a tokenizer with more tokens than the embedding matrix",
            [*evaluate, "model.path={work}/smallvocab", "eval_data.path={work}/beir"],
            says=["vocab", "smallvocab"],
            setup=lambda w: (tiny_model(w, "smallvocab", vocab_size=1000), tiny_beir(w)),
            check=before_encoding,
        ),
        Kind(
            "divergence: optim.lr=1000 trainer.grad_clip=null",
            [*train, "optim.lr=1000", "trainer.grad_clip=null", "trainer.max_steps=30"],
            says=["training stopped", "last good checkpoint"],
            setup=need_model,
            check=no_file("last"),
        ),
        Kind(
            "eval.py on NaN weights",
            [*evaluate, "model.path={work}/nan", "eval_data.path={work}/beir"],
            says=["non-finite"],
            setup=lambda w: (nan_model(w), tiny_beir(w)),
        ),
        Kind(
            "trainer.resume=true without the run's overrides",
            ["train.py", "hydra.run.dir={work}/run", "trainer.resume=true", "trainer.max_steps=4"],
            fails=False,
            setup=lambda w: trained_run(w, "loss=triplet", "trainer.max_steps=2"),
            check=resumed_same_model,
        ),
        Kind(
            "trainer.resume=true with an override that changes the run",
            ["train.py", "hydra.run.dir={work}/run", "trainer.resume=true", "optim.lr=1e-3"],
            says=["trainer.resume: optim.lr=1e-3", "launch.json"],
            setup=lambda w: trained_run(w),
        ),
        Kind(
            "a second run into a folder that holds a run",
            [*train, "trainer.eval=false"],
            says=["already holds a run", "trainer.overwrite=true"],
            setup=lambda w: trained_run(w),
        ),
        Kind(
            "a full disk while writing a checkpoint",
            ["-c", "'save_checkpoint(...) while every safetensors write fails with ENOSPC'"],
            fails=False,
            says=["no space left on device", "ckpt/last", "previous checkpoint intact"],
            setup=need_model,
            check=no_file(".tmp-*"),
            run=lambda argv, work: run_command(disk_full_snippet(work), work),
        ),
        Kind(
            "qrels whose ids are all unknown",
            [*evaluate, model, "eval_data.path={work}/beir"],
            says=["qrels/test.tsv", "none of the"],
            setup=lambda w: (
                need_model(w),
                rewrite_qrels(tiny_beir(w), "test", lambda rows: [f"x{r}" for r in rows]),
            ),
            check=before_encoding,
        ),
        *(
            Kind(
                f"loss={loss} on scores outside its scale",
                [
                    *train,
                    "experiment=sts",
                    f"loss={loss}",
                    "train_data=jsonl",
                    "train_data.path={work}/scored.jsonl",
                    "train_data.format=scored_pairs",
                ],
                says=["scored.jsonl:6", "score 7.5 outside"],
                setup=lambda w: (need_model(w), scored_pairs(w)),
                check=no_run_files,
            )
            for loss in ("cosine", "contrastive")
        ),
        Kind(
            "SIGTERM during training",
            [*train, "trainer.max_steps=100000", "trainer.save_every=100000", "trainer.eval=false"],
            says=["terminated", "saving checkpoints/last"],
            setup=need_model,
            check=saved_last,
            run=run_then_sigterm,
        ),
        # ------------------------------------------------------------------ late or unclear
        *(
            Kind(
                f"{override}",
                [*train, override],
                says=[key],
                setup=need_model,
                check=no_run_files,
            )
            for override, key in (
                ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints"),
                ("train_data.mining=foo", "train_data.mining"),
                ("loss.matryoshka_dims=[512]", "loss.matryoshka_dims"),
                ("evaluation.matryoshka_dims=[512]", "evaluation.matryoshka_dims"),
                ("model.max_length=1000", "model.max_length"),
                ("model.max_length=0", "model.max_length"),
                ("model.projection_dim=0", "model.projection_dim"),
                ("optim.lr=5e-5x", "optim.lr"),
                ("trainer.batch_size=2.5", "trainer.batch_size"),
                ("trainer.nonsense=1", "trainer.nonsense"),
                ("train_data=sts", "InfoNCETask trains on"),
            )
        ),
        Kind(
            "evaluation/index=ivf_pq with a dim its PQ48 cannot split",
            [*evaluate, model, "eval_data.path={work}/beir", "evaluation/index=ivf_pq"],
            says=["PQ48", "32"],
            setup=lambda w: (need_model(w), tiny_beir(w)),
            check=before_encoding,
        ),
        Kind(
            "a training file whose examples all repeat one text",
            [*train, "train_data=jsonl", "train_data.path={work}/dups.jsonl"],
            says=["share the text 'what is x'"],
            setup=lambda w: (need_model(w), duplicate_pairs(w)),
            check=no_run_files,
        ),
        Kind(
            "qrels whose grades are all 0",
            [*train, "train_data.path={work}/beir"],
            says=["qrels/train.tsv", "above 0"],
            setup=lambda w: (
                need_model(w),
                rewrite_qrels(
                    tiny_beir(w), "train", lambda rows: [r.rsplit("\t", 1)[0] + "\t0" for r in rows]
                ),
            ),
            check=no_run_files,
        ),
        Kind(
            "a 21 MB text on one line",
            [*evaluate, model, "eval_data.path={work}/longdoc"],
            fails=False,
            says=["texts to their first 4096 characters"],
            setup=lambda w: (need_model(w), long_line(w)),
        ),
        Kind(
            "compare.py with a killed run that logged the best dev score",
            ["compare.py", "{work}/sweep"],
            fails=False,
            says=["unfinished"],
            setup=unfinished_sweep,
            check=killed_run_not_ranked,
        ),
        Kind(
            "compare.py with a corrupt metrics.json",
            ["compare.py", "{work}/sweep"],
            says=["sweep/1/metrics.json"],
            setup=corrupt_metrics,
        ),
        Kind(
            "a model folder without config.json",
            [*evaluate, "model.path={work}/noconfig", "eval_data.path={work}/beir"],
            says=["noconfig/config.json"],
            setup=lambda w: (model_without(w, "noconfig", ["config.json"]), tiny_beir(w)),
        ),
        Kind(
            "a truncated model.safetensors",
            [*evaluate, "model.path={work}/truncated", "eval_data.path={work}/beir"],
            says=["truncated/model.safetensors"],
            setup=lambda w: (truncated_weights(w), tiny_beir(w)),
        ),
        Kind(
            "pooling 'avg' in biencoder.json",
            [*evaluate, "model.path={work}/badpool", "eval_data.path={work}/beir"],
            says=["badpool/biencoder.json", "avg"],
            setup=lambda w: (bad_pooling(w), tiny_beir(w)),
        ),
        Kind(
            "a read-only checkpoints/ folder",
            train,
            says=["checkpoints is not writable"],
            setup=read_only_checkpoints,
            check=no_run_files,
            # Root writes through file modes: drop that capability for this run.
            wrapper=["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"],
        ),
        Kind(
            "trainer.max_length=8 (a knob that once did nothing)",
            [*train, "trainer.max_length=8", "trainer.max_steps=2", "trainer.eval=false"],
            fails=False,
            setup=need_model,
            check=seq_len_at_most_8,
        ),
    ]


def grade(kind: Kind, outcome: Outcome) -> tuple[str, str]:
    failed = outcome.code != 0
    if failed != kind.fails:
        what = f"exit {outcome.code}" + (" (it should have failed)" if kind.fails else "")
        return "BAD", what
    missing = [words for words in kind.says if words not in outcome.output]
    problem = kind.check(outcome) if kind.check else None
    if missing or problem:
        return "WEAK", "; ".join([*(f"no {m!r}" for m in missing), *([problem] if problem else [])])
    return "GOOD", f"exit {outcome.code}"


def last_message(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    interesting = [
        line
        for line in lines
        if any(w in line for w in ("Error", "error", "refus", "cut ", "no space", "unfinished"))
    ]
    text = (interesting or lines or [""])[-1]
    return text.replace("|", "\\|")[:220]


def _run_driver(args: argparse.Namespace) -> str:
    load_at_start = os.getloadavg()[0]
    rows = ["| # | kind | command | verdict | outcome | message |", "|---|---|---|---|---|---|"]
    counts = {"GOOD": 0, "WEAK": 0, "BAD": 0}
    for number, kind in enumerate(kinds(), 1):
        if args.only and number not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            argv = [part.format(work=work) for part in kind.argv]
            try:
                if kind.setup:
                    kind.setup(work)
                runner = kind.run or (lambda a, w, k=kind: run_command(a, w, k.wrapper))
                outcome = runner(argv, work)
                verdict, why = grade(kind, outcome)
                message = last_message(outcome.output.replace(str(work), "WORK"))
            except Exception as err:  # a broken scenario is reported, not fatal
                verdict, why, message = "BAD", f"scenario error: {type(err).__name__}", str(err)
            counts[verdict] += 1
            shown = " ".join(a if len(a) < 60 else a[:57] + "..." for a in argv)
            shown = shown.replace(str(work), "WORK").replace("|", "\\|")
            rows.append(
                f"| {number} | {kind.name} | `python {shown}` | {verdict} | {why} | {message} |"
            )
            print(rows[-1], flush=True)
    total = sum(counts.values())
    summary = ", ".join(f"{n} {verdict}" for verdict, n in counts.items())
    header = report_header(
        "Reliability: bad inputs and faults",
        "cpu",
        load_at_start,
        [
            "each kind in a fresh scratch folder (WORK), with a tiny random BERT and tiny data",
            f"**{summary}** of {total} kinds",
        ],
    )
    return "\n".join(header + rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    parser.add_argument("--only", type=int, nargs="+", help="run only these kind numbers")
    args = parser.parse_args(argv)
    report = _run_driver(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
