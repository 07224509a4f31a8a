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


def custom_code_model(work: Path) -> None:
    config = tiny_model(work, "custom") / "config.json"
    fields = json.loads(config.read_text())
    fields["auto_map"] = {
        "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel"
    }
    config.write_text(json.dumps(fields))


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


def linked_old_checkpoint(work: Path) -> None:
    """A 2-step run whose step-1 checkpoint was moved to another disk and linked back."""
    trained_run(work, "train_data.dev_queries=0")
    step1 = work / "run" / "checkpoints" / "step-00000001"
    (work / "other-disk").mkdir()
    shutil.move(step1, work / "other-disk" / step1.name)
    step1.symlink_to(work / "other-disk" / step1.name, target_is_directory=True)


def linked_checkpoints(work: Path) -> None:
    """A 2-step run whose checkpoints/ folder lives on another disk, linked in."""
    trained_run(work, "train_data.dev_queries=0")
    shutil.move(work / "run" / "checkpoints", work / "other-disk")
    (work / "run" / "checkpoints").symlink_to(work / "other-disk", target_is_directory=True)


def edited_launch(work: Path) -> None:
    trained_run(work)
    path = work / "run" / "launch.json"
    record = json.loads(path.read_text())
    # Were it replayed, instantiating the loss would call os.system("touch PWNED").
    record["overrides"] += ["loss._target_=os.system", f"+loss.command=touch {work / 'PWNED'}"]
    path.write_text(json.dumps(record))


def killed_run(work: Path) -> None:
    """A run SIGKILLed after its first checkpoint: its lock file stays behind."""
    tiny_model(work)
    proc = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            "debug=tiny",
            f"model.path={work / 'model'}",
            "trainer.eval=false",
            "trainer.max_steps=100000",
            f"hydra.run.dir={work / 'run'}",
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = work / "run" / "checkpoints" / "step-00000001" / "checkpoint.json"
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (work / "run" / "run.lock").exists():
        raise RuntimeError("the killed run left no lock: nothing to recover from")


# -------------------------------------------------------- mine.py and synthesize.py inputs


def mined_out(work: Path) -> Path:
    """{work}/mined/o.jsonl: where the mine.py kinds write."""
    return work / "mined" / "o.jsonl"


def broken_progress(record: str) -> Callable[[Path], None]:
    """An interrupted mine.py run (one line of out written) whose progress record holds
    ``record``."""

    def setup(work: Path) -> None:
        tiny_model(work)
        tiny_beir(work)
        out = mined_out(work)
        out.parent.mkdir()
        out.write_text('{"query": "q", "positive": "p", "negatives": ["n"]}\n')
        out.with_name(out.name + ".progress.json").write_text(record)

    return setup


def empty_teacher(work: Path) -> None:
    tiny_model(work)
    tiny_beir(work)
    (work / "teacher").mkdir()


def custom_code_teacher(work: Path) -> None:
    tiny_model(work)
    tiny_beir(work)
    config = tiny_model(work, "teacher") / "config.json"
    fields = json.loads(config.read_text())
    fields["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    config.write_text(json.dumps(fields))


def read_only_mined(work: Path) -> None:
    tiny_model(work)
    tiny_beir(work)
    mined_out(work).parent.mkdir()
    os.chmod(mined_out(work).parent, 0o500)


def slowed(script: str, function: str, argv: list[str]) -> list[str]:
    """``python SCRIPT ARGV`` whose ``function`` (module:attribute, called once the output
    is locked) sleeps instead: a real run that holds its output for as long as a kind
    needs."""
    module, name = function.split(":")
    code = f"""
import sys, time, importlib
sys.argv = [{script!r}, *{argv!r}]
importlib.import_module({module!r}).{name} = lambda *args, **kwargs: time.sleep(600)
from biencoder import {script.removesuffix(".py")} as entry
entry.main()
"""
    return ["-c", code]


def mine_disk_full_snippet(work: Path) -> list[str]:
    """mine.py while every np.save fails with ENOSPC: the first shard of the corpus
    embeddings, in the store beside out, is the first large write."""
    code = f"""
import errno, sys
import numpy as np
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
np.save = full
sys.argv = ["mine.py", "model.path={work}/model", "data.path={work}/beir",
            "model.max_length=16", "hydra.run.dir={work}/run", "out={work}/mined/o.jsonl"]
from biencoder import mine
mine.main()
"""
    return ["-c", code]


def tiny_gguf(work: Path, name: str = "model.gguf") -> Path:
    """A GGUF file whose header and size are whole (a few hundred bytes, no tokenizer):
    enough for synthesize.py's checks, which run before any generator loads."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(work / name, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((4, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return work / name


def cut_gguf(work: Path) -> None:
    path = tiny_gguf(work, "cut.gguf")
    path.write_bytes(path.read_bytes()[:-100])


def not_gguf(work: Path) -> None:
    (work / "page.gguf").write_text("<html>404 Not Found</html>\n")


def tiny_lm(work: Path) -> None:
    """A 1-layer random Llama over the packaged MiniLM tokenizer: a causal generator that
    loads and writes in a second."""
    from biencoder.data.synthesis.generator import save_random_generator
    from biencoder.model.weights import packaged_model_path

    save_random_generator(work / "lm", packaged_model_path())


def prompt_file(work: Path, name: str, template: str) -> None:
    (work / name).write_text(f"instruction: Write one search query.\ntemplate: |\n{template}")


def json_prompt(work: Path) -> None:
    prompt_file(work, "json.yaml", '  Document: {document}\n  Reply as {"query": "..."}:\n')


def typo_prompt(work: Path) -> None:
    prompt_file(work, "typo.yaml", "  Document: {doc}\n  Query:\n")


# ------------------------------------------------------------------ training data


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def hf_pairs(i: int) -> dict:
    return {"anchor": f"what is thing {i}", "positive": f"thing {i} is a kind of stuff"}


def hf_wrong_type(work: Path) -> None:
    """JSONL whose 'positive' is a number on line 6 (datasets reads the column as JSON)."""
    rows = [hf_pairs(i) for i in range(8)]
    rows[5]["positive"] = 17
    write_jsonl(work / "mixed.jsonl", rows)


def hf_numbers(work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"anchor": [f"q {i}" for i in range(8)], "positive": list(range(8))})
    pq.write_table(table, work / "numbers.parquet")


def hf_null(work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"thing {i}" if i != 5 else None for i in range(8)]
    table = pa.table({"anchor": [f"q {i}" for i in range(8)], "positive": texts})
    pq.write_table(table, work / "null.parquet")


def empty_parquet(work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty = pa.table({"anchor": pa.array([], pa.string()), "positive": pa.array([], pa.string())})
    pq.write_table(empty, work / "empty.parquet")


def empty_csv(work: Path) -> None:
    (work / "empty.csv").write_text("")


def scored_triplets(bad: Callable[[dict], None]) -> Callable[[Path], None]:
    """8 triplets with 2 negatives and teacher scores; ``bad`` spoils line 4."""

    def setup(work: Path) -> None:
        tiny_model(work)
        rows = [
            {
                "query": f"query number {i}",
                "positive": f"the answer to question {i}",
                "negatives": [f"unrelated text {i}", f"another text {i}"],
                "scores": [5.0, 1.0, 0.5],
            }
            for i in range(8)
        ]
        bad(rows[3])
        write_jsonl(work / "scored.jsonl", rows)

    return setup


# Python's json (as a teacher script would use) writes NaN and Infinity, which JSON lacks.
BAD_SCORES: list[tuple[str, str, Callable[[dict], None], list[str]]] = [
    (
        "a record without scores",
        "margin_mse",
        lambda r: r.pop("scores"),
        ["field 'scores'", "required field is missing"],
    ),
    (
        "a string score",
        "listwise_kl",
        lambda r: r.update(scores=[5.0, "1.0", 0.5]),
        ["field 'scores[1]'", "got string"],
    ),
    (
        "a null score",
        "margin_mse",
        lambda r: r.update(scores=[5.0, None, 0.5]),
        ["field 'scores[1]'", "got null"],
    ),
    (
        "a boolean score",
        "listwise_kl",
        lambda r: r.update(scores=[5.0, True, 0.5]),
        ["field 'scores[1]'", "got true"],
    ),
    (
        "a NaN score",
        "margin_mse",
        lambda r: r.update(scores=[5.0, float("nan"), 0.5]),
        ["field 'scores[1]'", "expected a finite number, got NaN"],
    ),
    (
        "an infinite score",
        "listwise_kl",
        lambda r: r.update(scores=[5.0, float("inf"), 0.5]),
        ["field 'scores[1]'", "expected a finite number, got Infinity"],
    ),
    (
        "2 scores for 1 positive and 2 negatives",
        "margin_mse",
        lambda r: r.update(scores=[1.0, 0.5]),
        ["field 'scores'", "2 scores for 1 positive and 2 negatives; give 3"],
    ),
    (
        "3 scores for one 'negative'",
        "listwise_kl",
        lambda r: (r.pop("negatives"), r.update(negative="one negative")),
        ["field 'scores'", "3 scores for 1 positive and 1 negative; give 2"],
    ),
    (
        "scores as a nested list",
        "margin_mse",
        lambda r: r.update(scores=[[5.0, 1.0, 0.5]]),
        ["field 'scores[0]'", "expected a number, got array"],
    ),
    (
        "scores as one number",
        "listwise_kl",
        lambda r: r.update(scores=5.0),
        ["field 'scores'", "expected an array of numbers, got 5.0"],
    ),
]


def no_scores_at_all(work: Path) -> None:
    scored_triplets(lambda r: None)(work)
    rows = [json.loads(line) for line in (work / "scored.jsonl").read_text().splitlines()]
    write_jsonl(
        work / "scored.jsonl", [{k: v for k, v in r.items() if k != "scores"} for r in rows]
    )


def pairs_file(work: Path) -> None:
    write_jsonl(
        work / "pairs.jsonl", [{"query": f"q {i}", "positive": f"doc {i}"} for i in range(8)]
    )


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


def holds_no_run(outcome: Outcome) -> str | None:
    """The refused run left nothing that would make its corrected rerun "a second run"."""
    from biencoder.training.run_folder import existing_run_files

    left = existing_run_files(outcome.folder / "run")
    return f"left {', '.join(left)} in the run folder" if left else None


def other_disk_intact(outcome: Outcome) -> str | None:
    markers = list((outcome.folder / "other-disk").rglob("checkpoint.json"))
    return None if markers else "deleted the files behind a link"


def one_run_s_lines(outcome: Outcome) -> str | None:
    """The live run's metrics and .hydra/ are its own: nothing of the refused command."""
    run = outcome.folder / "run"
    steps = [
        json.loads(x)["step"]
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in x
    ]
    if steps != list(range(1, len(steps) + 1)):
        return f"metrics.jsonl steps {steps}"
    overrides = (run / ".hydra" / "overrides.yaml").read_text()
    return None if "seed=1" in overrides else "the refused command rewrote .hydra/"


def nothing_mined(*left: str) -> Callable[[Outcome], str | None]:
    """No corpus embedded ("encode docs" progress), and no embedding store beside out
    or file matching ``left`` written."""

    def check(outcome: Outcome) -> str | None:
        problems = [before_encoding(outcome)]
        problems += [no_file(name)(outcome) for name in ("*.embeddings", *left)]
        return next((problem for problem in problems if problem), None)

    return check


def no_synthetic_output(outcome: Outcome) -> str | None:
    return no_file("syn.jsonl*")(outcome)


def synthesised_two_documents(outcome: Outcome) -> str | None:
    record = outcome.folder / "syn.jsonl.progress.json"
    done = json.loads(record.read_text())["done"] if record.is_file() else []
    return None if len(done) == 2 else f"progress record lists {len(done)} documents, not 2"


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


def while_running(
    first: list[str], ready: str = "run/metrics.jsonl"
) -> Callable[[list[str], Path], Outcome]:
    """A runner that starts ``first`` (after ``python``, with {work}), runs the kind's
    command once the first has written ``ready`` (under {work}), then stops the first."""

    def run(argv: list[str], work: Path) -> Outcome:
        args = [part.format(work=work) for part in first]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, **quiet)
        try:
            marker = work / ready
            deadline = time.monotonic() + TIMEOUT_S
            while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            outcome = run_command(argv, work)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=TIMEOUT_S)
        return outcome

    return run


def small_disk_snippet(work: Path) -> list[str]:
    """train.py on a disk that reports 1000 bytes free."""
    code = f"""
import shutil, sys
real = shutil.disk_usage
shutil.disk_usage = lambda path: real(path)._replace(free=1000)
sys.argv = ["train.py", "debug=tiny", "model.path={work}/model", "hydra.run.dir={work}/run"]
from biencoder import train
train.main()
"""
    return ["-c", code]


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
    mine = [
        "mine.py",
        "model.path={work}/model",
        "data.path={work}/beir",
        "model.max_length=16",
        "hydra.run.dir={work}/run",
        "out={work}/mined/o.jsonl",
    ]
    synthesize = [
        "synthesize.py",
        "corpus.path={work}/beir",
        "out={work}/syn.jsonl",
        "hydra.run.dir={work}/run",
    ]
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
            check=holds_no_run,
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
        # ------------------------------------------------------- one writer per run folder
        *(
            Kind(
                f"a second train.py into a folder being trained in{extra_name}",
                [*train, "seed=2", "trainer.eval=false", *extra],
                says=["is being written by another process", "pid", "run.lock"],
                setup=need_model,
                check=one_run_s_lines,
                run=while_running(
                    [*train, "seed=1", "trainer.max_steps=100000", "trainer.eval=false"]
                ),
            )
            for extra_name, extra in (
                ("", []),
                (", with trainer.overwrite=true", ["trainer.overwrite=true"]),
            )
        ),
        Kind(
            "trainer.resume=true after the run was SIGKILLed (its lock left behind)",
            [
                "train.py",
                "hydra.run.dir={work}/run",
                "trainer.resume=true",
                "trainer.max_steps=3",
            ],
            fails=False,
            says=["took over the lock of a process that is gone"],
            setup=killed_run,
        ),
        # ------------------------------------------------------ no deletion through links
        Kind(
            "trainer.keep_checkpoints=1 on resume, step-1 linked to another disk",
            [
                "train.py",
                "hydra.run.dir={work}/run",
                "trainer.resume=true",
                "trainer.max_steps=3",
                "trainer.keep_checkpoints=1",
            ],
            fails=False,
            says=["is a link to", "removing the link, keeping its files"],
            setup=linked_old_checkpoint,
            check=other_disk_intact,
        ),
        Kind(
            "trainer.overwrite=true with checkpoints/ linked to another disk",
            [*train, "trainer.overwrite=true", "trainer.eval=false"],
            says=["trainer.overwrite", "checkpoints is a symbolic link", "other-disk"],
            setup=linked_checkpoints,
            check=other_disk_intact,
        ),
        Kind(
            "a launch.json edited to name code to run, resumed",
            ["train.py", "hydra.run.dir={work}/run", "trainer.resume=true", "trainer.max_steps=3"],
            says=["launch.json: overrides[", "loss._target_", "names code to run"],
            setup=edited_launch,
            check=no_file("PWNED"),
        ),
        # ------------------------------------------------------ mine.py and synthesize.py
        *(
            Kind(
                f"a second {script} into an out being written",
                # Its own run folder (as two commands without hydra.run.dir get): only
                # the out is shared.
                [script, *(a.replace("{work}/run", "{work}/run2") for a in args)],
                says=["out: ", "is being written by another process", "pid"],
                setup=setup,
                run=while_running(slowed(script, slow, args), ready=ready),
            )
            for script, args, slow, setup, ready in (
                (
                    "mine.py",
                    mine[1:],
                    "biencoder.data.mining.pipeline:mine",
                    lambda w: (tiny_model(w), tiny_beir(w)),
                    "mined/o.jsonl.lock",
                ),
                (
                    "synthesize.py",
                    [*synthesize[1:], "generator.path={work}/model.gguf"],
                    "biencoder.data.synthesis.run:_synthesize_into",
                    lambda w: (tiny_beir(w), tiny_gguf(w)),
                    "syn.jsonl.lock",
                ),
            )
        ),
        Kind(
            "mine.py resume=true with a progress record holding {}",
            [*mine, "resume=true"],
            says=["resume:", "mined/o.jsonl.progress.json", "missing key 'settings'", "delete it"],
            setup=broken_progress("{}"),
            check=nothing_mined(),
        ),
        Kind(
            "mine.py resume=true with a progress record of invalid JSON",
            [*mine, "resume=true"],
            says=["mined/o.jsonl.progress.json", "invalid JSON at line 1, column 30", "restore it"],
            setup=broken_progress('{"settings": {}, "queries": 3'),
            check=nothing_mined(),
        ),
        Kind(
            "mine.py with teacher.path an empty folder",
            [*mine, "teacher.path={work}/teacher"],
            says=["teacher.path", "teacher has no config.json"],
            setup=empty_teacher,
            check=nothing_mined("o.jsonl*"),
        ),
        Kind(
            "mine.py with a teacher that needs its own code (auto_map in config.json)",
            [*mine, "teacher.path={work}/teacher"],
            says=["teacher.path", "teacher/config.json", "auto_map", "trust_remote_code"],
            setup=custom_code_teacher,
            check=nothing_mined("o.jsonl*"),
        ),
        Kind(
            "mine.py into a read-only out folder",
            mine,
            says=["out:", "mined is not writable"],
            setup=read_only_mined,
            check=nothing_mined("o.jsonl*"),
            wrapper=["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"],
        ),
        Kind(
            "mine.py on a full disk (np.save of the corpus embeddings fails with ENOSPC)",
            ["-c", "'mine.py ... while every np.save fails with ENOSPC'"],
            says=["cannot write the corpus embeddings", "mined/o.jsonl.embeddings", "No space"],
            setup=lambda w: (tiny_model(w), tiny_beir(w)),
            # No shard, whole or written aside: a rerun encodes from the first.
            check=no_file("*shard-*"),
            run=lambda argv, work: run_command(mine_disk_full_snippet(work), work),
        ),
        Kind(
            "synthesize.py with a prompt template holding a literal JSON example",
            [
                *synthesize,
                "generator.path={work}/lm",
                "prompt.file={work}/json.yaml",
                "num_docs=2",
                "num_queries=1",
                "filters.round_trip=none",
                "filters.min_words=1",
                "sampling.max_new_tokens=4",
            ],
            fails=False,
            setup=lambda w: (tiny_beir(w), tiny_lm(w), json_prompt(w)),
            check=synthesised_two_documents,
        ),
        Kind(
            "synthesize.py with a prompt template naming {doc}, not {document}",
            [*synthesize, "generator.path={work}/model.gguf", "prompt.file={work}/typo.yaml"],
            says=["prompt.file: ", "typo.yaml:3", "{doc} is not a placeholder"],
            setup=lambda w: (tiny_beir(w), tiny_gguf(w), typo_prompt(w)),
            check=no_synthetic_output,
        ),
        Kind(
            "synthesize.py with a .gguf generator cut short",
            [*synthesize, "generator.path={work}/cut.gguf"],
            says=["generator.path: ", "cut.gguf", "cut short"],
            setup=lambda w: (tiny_beir(w), cut_gguf(w)),
            check=no_synthetic_output,
        ),
        Kind(
            "synthesize.py with a .gguf generator that is no GGUF file",
            [*synthesize, "generator.path={work}/page.gguf"],
            says=["generator.path: ", "page.gguf", "not a GGUF file"],
            setup=lambda w: (tiny_beir(w), not_gguf(w)),
            check=no_synthetic_output,
        ),
        Kind(
            "synthesize.py with out= below a file",
            [
                "synthesize.py",
                "corpus.path={work}/beir",
                "generator.path={work}/model.gguf",
                "out={work}/blocker/syn.jsonl",
                "hydra.run.dir={work}/run",
            ],
            says=["out: ", "blocker is a file"],
            setup=lambda w: (tiny_beir(w), tiny_gguf(w), (w / "blocker").write_text("")),
            check=no_synthetic_output,
        ),
        Kind(
            "a model whose config.json names its own code (auto_map), evaluated",
            [*evaluate, "model.path={work}/custom", "eval_data.path={work}/beir"],
            says=["custom/config.json", "auto_map"],
            setup=lambda w: (custom_code_model(w), tiny_beir(w)),
            check=before_encoding,
        ),
        Kind(
            "train.py on a disk without room for one checkpoint",
            ["-c", "'train.py debug=tiny ... on a disk with 1000 bytes free'"],
            says=["hydra.run.dir", "MiB free on its disk, a checkpoint takes about"],
            setup=need_model,
            check=holds_no_run,
            run=lambda argv, work: run_command(small_disk_snippet(work), work),
        ),
        # ----------------------------------------------------------------- training data
        Kind(
            "train_data=hf: a JSONL column with a number on line 6",
            [*train, "train_data=hf", "train_data.path={work}/mixed.jsonl"],
            says=["mixed.jsonl:6", "field 'positive'", "expected a string, got 17"],
            setup=lambda w: (need_model(w), hf_wrong_type(w)),
            check=holds_no_run,
        ),
        Kind(
            "train_data=hf: a parquet column of numbers",
            [*train, "train_data=hf", "train_data.path={work}/numbers.parquet"],
            says=["numbers.parquet:1", "field 'positive'", "expected a string, got int64"],
            setup=lambda w: (need_model(w), hf_numbers(w)),
            check=holds_no_run,
        ),
        Kind(
            "train_data=hf: a null text on row 6",
            [*train, "train_data=hf", "train_data.path={work}/null.parquet"],
            says=["null.parquet:6", "field 'positive'", "got null"],
            setup=lambda w: (need_model(w), hf_null(w)),
            check=holds_no_run,
        ),
        Kind(
            "train_data=hf: an empty parquet file",
            [*train, "train_data=hf", "train_data.path={work}/empty.parquet"],
            says=["train_data", "empty.parquet: no rows"],
            setup=lambda w: (need_model(w), empty_parquet(w)),
            check=holds_no_run,
        ),
        Kind(
            "train_data=hf: an empty CSV file",
            [*train, "train_data=hf", "train_data.path={work}/empty.csv"],
            says=["train_data", "empty.csv: no rows"],
            setup=lambda w: (need_model(w), empty_csv(w)),
            check=holds_no_run,
        ),
        Kind(
            "train_data=multi with an empty hf set",
            [
                *train,
                "train_data=multi",
                "+train_data@train_data.sets.pairs=jsonl",
                "train_data.sets.pairs.path={work}/pairs.jsonl",
                "+train_data@train_data.sets.qa=hf",
                "train_data.sets.qa.path={work}/empty.parquet",
            ],
            says=["train_data.sets.qa", "empty.parquet: no rows"],
            setup=lambda w: (need_model(w), pairs_file(w), empty_parquet(w)),
            check=holds_no_run,
        ),
        Kind(
            "train_data=multi with an empty jsonl set",
            [
                *train,
                "train_data=multi",
                "+train_data@train_data.sets.pairs=jsonl",
                "train_data.sets.pairs.path={work}/empty.jsonl",
                "+train_data@train_data.sets.scifact=scifact",
            ],
            says=["train_data.sets.pairs", "empty.jsonl: no records"],
            setup=lambda w: (need_model(w), (w / "empty.jsonl").write_text("")),
            check=holds_no_run,
        ),
        *(
            Kind(
                f"loss={loss}: {what} on line 4",
                [
                    *train,
                    f"loss={loss}",
                    "train_data=jsonl",
                    "train_data.format=triplets",
                    "train_data.path={work}/scored.jsonl",
                ],
                says=["scored.jsonl:4", *words],
                setup=scored_triplets(spoil),
                check=holds_no_run,
            )
            for what, loss, spoil, words in BAD_SCORES
        ),
        Kind(
            "loss=margin_mse on triplets without any scores",
            [
                *train,
                "loss=margin_mse",
                "train_data=jsonl",
                "train_data.format=triplets",
                "train_data.path={work}/scored.jsonl",
            ],
            says=["scored.jsonl:1", "needs teacher scores"],
            setup=no_scores_at_all,
            check=holds_no_run,
        ),
        Kind(
            "debug=tiny train_data=multi (two sets)",
            [
                *train,
                "train_data=multi",
                "+train_data@train_data.sets.scifact=scifact",
                "+train_data@train_data.sets.pairs=jsonl",
                "train_data.sets.pairs.path={work}/pairs.jsonl",
            ],
            fails=False,
            setup=lambda w: (need_model(w), pairs_file(w)),
            check=saved_last,
        ),
        Kind(
            "debug=tiny train_data=synthetic (a tiny random generator, loose filters)",
            [
                *train,
                "train_data=synthetic",
                "train_data.cache_dir={work}/cache",
                "train_data.synthesis.generator.path={work}/lm",
                "train_data.synthesis.prompt.style=keywords",
                "train_data.synthesis.filters.round_trip=none",
                "train_data.synthesis.filters.min_words=1",
            ],
            fails=False,
            setup=lambda w: (need_model(w), tiny_lm(w)),
            check=saved_last,
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
