import functools
import os
import re
import subprocess
import sys

import pytest
import torch

# Tests never reach a model hub; everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# Without CUDA the Triton kernels run in the interpreter on CPU tensors. Triton reads
# this when a kernel is first defined, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The GPU machine's image lacks these. Under bench/device_check.sh (TESTS_SKIP_MISSING=1) a
# test module that imports one is reported as skipped, so that `pytest -m gpu` still
# collects and runs every other module; anywhere else a missing module stays an error.
_OPTIONAL_MODULES = ("datasets", "faiss", "hydra", "omegaconf", "pytrec_eval", "wandb")
_MISSING_MODULE = re.compile(
    r"ModuleNotFoundError: No module named '(" + "|".join(_OPTIONAL_MODULES) + r")[.']"
)


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="tests/test_golden.py records the trajectories it runs in tests/golden/ "
        "instead of comparing them with the recorded ones",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("TESTS_SKIP_MISSING") != "1":
        return
    if not (report.failed and isinstance(collector, pytest.Module)):
        return
    missing = _MISSING_MODULE.search(str(report.longrepr))
    if missing:
        reason = f"Skipped: needs {missing.group(1)}, which is not installed"
        outcome.force_result(
            pytest.CollectReport(report.nodeid, "skipped", (str(collector.path), None, reason), [])
        )


@pytest.fixture
def seed() -> int:
    """Seeds torch's global generator so each test draws the same inputs every run."""
    torch.manual_seed(0)
    return 0


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: a tiny model's ops are far too small to split
    across threads, and on shared cores the threads cost more in waiting than they gain
    (tens of times slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    from biencoder.model.weights import packaged_model_path

    return packaged_model_path()


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from biencoder.model.biencoder import BiEncoder

    return BiEncoder.from_pretrained(minilm_path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, minilm_path) -> str:
    """A randomly initialised 2-layer BERT folder with the MiniLM tokenizer: trains in ms."""
    from biencoder.model.config import EncoderConfig
    from biencoder.model.weights import save_random_bert

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    return str(save_random_bert(folder, minilm_path, EncoderConfig.tiny()))


@pytest.fixture(scope="session")
def tiny_beir_path(tmp_path_factory) -> str:
    """20 SciFact train and 8 test queries, their judged abstracts and 40 distractors."""
    import json

    from biencoder.data.beir import load_beir
    from biencoder.data.paths import SCIFACT_DIR

    train, test = load_beir(SCIFACT_DIR, "train"), load_beir(SCIFACT_DIR, "test")
    splits = {"train": (train, sorted(train.qrels)[:20]), "test": (test, sorted(test.qrels)[:8])}
    docs = {d for ds, qids in splits.values() for q in qids for d in ds.qrels[q]}
    docs |= set(sorted(train.corpus)[:40])
    folder = tmp_path_factory.mktemp("tiny-beir")
    (folder / "qrels").mkdir()
    with open(folder / "corpus.jsonl", "w") as f:
        for doc_id in sorted(docs):
            doc = train.corpus[doc_id]
            f.write(json.dumps({"_id": doc_id, "title": doc.title, "text": doc.text}) + "\n")
    with open(folder / "queries.jsonl", "w") as f:
        for ds, qids in splits.values():
            for q in qids:
                f.write(json.dumps({"_id": q, "text": ds.queries[q]}) + "\n")
    for split, (ds, qids) in splits.items():
        lines = ["query-id\tcorpus-id\tscore"]
        lines += [f"{q}\t{d}\t{r}" for q in qids for d, r in ds.qrels[q].items()]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return str(folder)


@pytest.fixture(scope="session")
def tiny_sts_path(tmp_path_factory) -> str:
    """The first 40 rows of each STS-B split."""
    import gzip

    from biencoder.data.paths import STSB_DIR

    folder = tmp_path_factory.mktemp("tiny-sts")
    for split in ("train", "dev", "test"):
        with gzip.open(STSB_DIR / f"sts-{split}.csv.gz", "rt", encoding="utf-8") as f:
            rows = f.read().splitlines()[:40]
        (folder / f"sts-{split}.csv").write_text("\n".join(rows) + "\n")
    return str(folder)


@pytest.fixture
def tiny_run(tiny_model_path):
    """``tiny_run(data, *extra)``: configs.tiny_overrides with the tiny model."""
    # Imported here: configs needs hydra, which the GPU machine's image lacks, and the GPU
    # tests must still collect there.
    from configs import tiny_overrides

    return functools.partial(tiny_overrides, tiny_model_path)


@pytest.fixture
def held_elsewhere():
    """``held_elsewhere(lock_path)``: another live process takes that lock (runtime.lock)
    and holds it until the test ends; returns its pid."""

    procs = []

    def hold(path) -> int:
        code = (
            "import sys, time, pathlib\n"
            "from biencoder.runtime.lock import Lock\n"
            f"Lock(pathlib.Path({str(path)!r}), 'k').acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc.pid

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()
